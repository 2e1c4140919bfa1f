"""One library function per CLI command: a question about one image, or detection over many.

- :func:`run_query` (``vlm-fo1 detect | ground | count | describe | ocr | ask``): load the model
  (:class:`ModelSettings`), set the image with its proposals, ask, optionally save a drawing.
- :func:`run_predict` / :func:`predict_dataset` (``vlm-fo1 predict``): detection over a folder,
  a text list or a COCO image list, written as COCO results.

``predict`` output, next to ``--out results.json``:

- ``results.json``: COCO results ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``
  (original pixels; ``category_id`` = 1 + the label's position in ``--labels``);
- ``results.meta.json``: ``{"categories": [{"id", "name"}], "images": [{"id", "file_name",
  "width", "height"}], "failed": [{"image_id", "file_name", "error"}], "labels", "num_detections"}``;
- ``results.progress.jsonl``: one line per finished image (and a header with the labels). A
  re-run with the same ``--out`` skips the images already done there and retries failed ones.
A bad or corrupt image is logged, listed in ``failed`` and skipped; it never ends the run.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from vlm_fo1.boxes import xyxy_to_xywh
from vlm_fo1.images import load_image
from vlm_fo1.inference.hub import resolve_model_path
from vlm_fo1.inference.inputs import ImageEntry, list_images, make_proposer, propose, split_labels
from vlm_fo1.inference.predictor import Predictor
from vlm_fo1.inference.results import DetectionResult, Prediction

logger = logging.getLogger(__name__)

TASKS = ("detect", "ground", "count", "describe", "ocr", "ask")
DEFAULT_DETECTOR = "omdet-turbo"


@dataclass(frozen=True)
class ModelSettings:
    """How to build a :class:`Predictor` (the CLI's common options).

    Attributes:
        model: local checkpoint directory or Hub id (a Hub id fails fast offline).
        proposer: proposal network name; None: ``given`` when ``boxes`` is set, else ``omdet-turbo``.
        proposer_model: the detector's checkpoint (default: ``inputs.DETECTOR_MODELS[proposer]``).
        boxes: a box file for the ``given`` proposer (formats: ``vlm_fo1.proposals.given``).
        device / dtype / max_new_tokens / confidence: as for :class:`Predictor`.
    """

    model: str
    proposer: str | None = None
    proposer_model: str | None = None
    boxes: str | None = None
    device: str | None = "auto"
    dtype: str | None = None
    max_new_tokens: int = 128
    confidence: str = "product"

    @property
    def proposer_name(self) -> str:
        return self.proposer or ("given" if self.boxes else DEFAULT_DETECTOR)

    def build_proposer(self) -> Any:
        """The proposal network (None for ``given`` without a box file); detectors run on ``device``."""
        import torch

        device = self.device
        if device in (None, "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return make_proposer(self.proposer_name, model=self.proposer_model, boxes=self.boxes, device=device)

    def load(self, with_proposer: bool = True) -> Predictor:
        """Resolve the model first (fast failure), then build the proposer (unless not wanted) and
        the predictor."""
        path = resolve_model_path(self.model)
        proposer = self.build_proposer() if with_proposer else None
        return Predictor.from_pretrained(
            path,
            proposer,
            device=self.device,
            dtype=self.dtype,
            max_new_tokens=self.max_new_tokens,
            confidence=self.confidence,
        )


def parse_box(value: str | Sequence[float]) -> list[float]:
    """``"x1,y1,x2,y2"`` (or 4 numbers) → a list of 4 floats; ValueError otherwise."""
    parts = value.replace(" ", "").split(",") if isinstance(value, str) else list(value)
    try:
        box = [float(v) for v in parts]
    except (TypeError, ValueError):
        box = []
    if len(box) != 4:
        raise ValueError(f"expected a box as x1,y1,x2,y2 (4 numbers), got {value!r}")
    return box


def answer_query(
    predictor: Predictor,
    task: str,
    image: str | Path,
    query: Any,
    *,
    detailed: bool = False,
    save: str | Path | None = None,
    ranked: int | None = None,
    per_class: bool = False,
) -> Prediction:
    """Set ``image`` and ask one question (``task`` in :data:`TASKS`; ``query``: labels, expression,
    label, box or question); draw the detections to ``save`` when given. ``ranked`` (detect
    only): the ``ranked`` best proposals by the model's ranking (:meth:`Predictor.rank`) instead
    of generating; ``per_class`` (detect only): each label asked on its own
    (:meth:`Predictor.detect`)."""
    if ranked is not None and task != "detect":
        raise ValueError(f"ranked applies to the detect task, got {task!r}")
    if per_class and task != "detect":
        raise ValueError(f"per_class applies to the detect task, got {task!r}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    box = parse_box(query) if task in ("describe", "ocr") else None
    labels = split_labels(query) if task == "detect" else [query] if task in ("count", "ground") else None
    proposals = None
    if predictor.proposer is None:
        if box is None:
            raise ValueError("no candidate boxes: pass --boxes FILE or choose a detector with --proposer")
        proposals = [box]
    predictor.set_image(image, proposals, labels=labels)  # a path: the key of per-image box files
    ask = {
        "detect": lambda: (
            predictor.detect(query, per_class=per_class)
            if ranked is None
            else predictor.rank(query, top=ranked)
        ),
        "ground": lambda: predictor.ground(query),
        "count": lambda: predictor.count(query),
        "describe": lambda: predictor.describe(box, detailed=detailed),
        "ocr": lambda: predictor.ocr(box),
        "ask": lambda: predictor.ask(query),
    }
    result = ask[task]()
    if save is not None:
        from vlm_fo1.drawing import draw_detections

        marks = list(result.detections) or ([{"label": result.answer[:40], "box": box}] if box else [])
        draw_detections(image, marks).save(save)
    return result


def run_query(
    settings: ModelSettings,
    task: str,
    image: str | Path,
    query: Any,
    *,
    detailed: bool = False,
    save: Any = None,
    ranked: int | None = None,
    per_class: bool = False,
) -> Prediction:
    """Load the predictor of ``settings`` and answer one question (see :func:`answer_query`).

    ``describe`` / ``ocr`` without a box file or an explicit proposer use no detector: the given
    box is the only candidate.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    box_only = task in ("describe", "ocr")
    if box_only:
        parse_box(query)  # a bad box fails before anything is loaded
    detector = not (box_only and settings.proposer is None and settings.boxes is None)
    return answer_query(
        settings.load(with_proposer=detector),
        task,
        image,
        query,
        detailed=detailed,
        save=save,
        ranked=ranked,
        per_class=per_class,
    )


# -- many images -------------------------------------------------------------------------------------------
@dataclass
class DatasetSummary:
    """What a ``predict`` run did (``skipped``: done by an earlier run with the same ``--out``)."""

    results_path: Path
    meta_path: Path
    progress_path: Path
    images: int
    processed: int = 0
    skipped: int = 0
    detections: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        text = (
            f"{self.images} images: {self.processed} processed, {self.skipped} already done, "
            f"{len(self.failed)} failed; {self.detections} detections written to {self.results_path}"
        )
        for item in self.failed:
            text += f"\n  failed: {item['file_name']}: {item['error']}"
        return text


def _paths(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.stem + ".meta.json"), out.with_name(out.stem + ".progress.jsonl")


def _read_progress(path: Path, labels: list[str], entries: list[ImageEntry]) -> dict[str, dict[str, Any]]:
    """Finished images of an earlier run (last line per file wins); ValueError when it does not match."""
    if not path.is_file():
        return {}
    ids = {entry.file_name: entry.image_id for entry in entries}
    done: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s:%d: unreadable progress line skipped (interrupted write?)", path, number)
            continue
        if record.get("kind") == "header":
            if record.get("labels") != labels:
                raise ValueError(
                    f"{path} was written for labels {record.get('labels')}, now {labels}; "
                    "use another --out or delete the progress file"
                )
            continue
        name = record["file_name"]
        if name in ids and ids[name] != record["image_id"]:
            raise ValueError(
                f"{path}: {name!r} had image id {record['image_id']}, now {ids[name]}; the image list "
                "changed, use another --out or delete the progress file"
            )
        done[name] = record
    return done


def _coco_entries(result: DetectionResult, image_id: int, categories: dict[str, int]) -> list[dict[str, Any]]:
    entries = []
    for d in result.detections:
        if d.label not in categories:
            logger.debug("label %r is not among the requested labels; not written", d.label)
            continue
        x, y, w, h = xyxy_to_xywh([list(d.box)])[0].tolist()
        bbox = [round(v, 2) for v in (x, y, w, h)]
        entries.append(
            {"image_id": image_id, "category_id": categories[d.label], "bbox": bbox, "score": d.score}
        )
    return entries


def _write_json(path: Path, data: Any) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data) + "\n")
    os.replace(temporary, path)


def _run_chunk(
    predictor: Predictor, chunk: list[tuple[ImageEntry, Any, Any]], labels: list[str]
) -> list[tuple[ImageEntry, Any, DetectionResult | Exception]]:
    """Predict a chunk; when the batch fails, each image alone, so one bad image fails alone."""
    try:
        results = predictor.predict_batch(
            [image for _, image, _ in chunk], labels, [p for _, _, p in chunk], batch_size=len(chunk)
        )
        return [(entry, image, r) for (entry, image, _), r in zip(chunk, results, strict=True)]
    except Exception as err:  # a batch failure is isolated per image below, never ends the run
        if len(chunk) == 1:
            return [(chunk[0][0], chunk[0][1], err)]
        logger.info("a batch of %d failed (%r); retrying its images one by one", len(chunk), err)
        return [item for one in chunk for item in _run_chunk(predictor, [one], labels)]


def _load_chunk(entries: list[ImageEntry], given: Any, labels: list[str]) -> tuple[list[Any], list[Any]]:
    """``(entry, image, proposals)`` for the readable images, ``(entry, None, error)`` for the others."""
    chunk, failed = [], []
    for entry in entries:
        try:
            image = load_image(entry.path)
            keys = [entry.image_id, entry.file_name, str(entry.path)]
            chunk.append((entry, image, None if given is None else propose(given, image, labels, keys)))
        except (ValueError, OSError) as err:  # unreadable image, or no boxes for it
            failed.append((entry, None, err))
    return chunk, failed


def _record(
    entry: ImageEntry, outcome: DetectionResult | Exception, categories: dict[str, int]
) -> dict[str, Any]:
    """The progress line of one image: its COCO detections, or its error."""
    record: dict[str, Any] = {"image_id": entry.image_id, "file_name": entry.file_name}
    if isinstance(outcome, Exception):
        logger.warning("image %s failed: %s", entry.file_name, outcome)
        return record | {"kind": "failed", "error": str(outcome)}
    width, height = outcome.image_size
    coco = _coco_entries(outcome, entry.image_id, categories)
    return record | {"kind": "done", "width": width, "height": height, "detections": coco}


def predict_dataset(
    predictor: Predictor,
    source: str | Path,
    labels: str | Sequence[str],
    out: str | Path,
    *,
    batch_size: int = 8,
    progress: bool = True,
    image_root: str | Path | None = None,
) -> DatasetSummary:
    """Detect ``labels`` in every image of ``source``; write COCO results (module docstring).

    ``image_root``: where relative paths of a text list or COCO JSON start (default: its folder).

    With a ``GivenProposer`` each image's boxes are looked up by COCO id, listed path or file name.
    """
    from vlm_fo1.proposals import GivenProposer

    names = split_labels(labels)
    if predictor.proposer is None:
        raise ValueError(
            "predict needs candidate boxes: pass --boxes FILE or choose a detector with --proposer"
        )
    entries = list_images(source, image_root)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta_path, progress_path = _paths(out)
    done = _read_progress(progress_path, names, entries)
    summary = DatasetSummary(out, meta_path, progress_path, images=len(entries))
    todo = [e for e in entries if done.get(e.file_name, {}).get("kind") != "done"]
    summary.skipped = len(entries) - len(todo)
    categories = {name: i for i, name in enumerate(names, start=1)}
    given = predictor.proposer if isinstance(predictor.proposer, GivenProposer) else None
    with progress_path.open("a") as log:
        if not progress_path.stat().st_size:
            log.write(json.dumps({"kind": "header", "labels": names}) + "\n")
        bar = tqdm(total=len(todo), desc="predict", unit="image", disable=not progress)
        for start in range(0, len(todo), batch_size):
            chunk, outcomes = _load_chunk(todo[start : start + batch_size], given, names)
            if chunk:
                outcomes += _run_chunk(predictor, chunk, names)
            for entry, _, outcome in outcomes:
                record = _record(entry, outcome, categories)
                summary.processed += record["kind"] == "done"
                done[entry.file_name] = record
                log.write(json.dumps(record) + "\n")
            log.flush()
            bar.update(len(outcomes))
        bar.close()
    return _finish(summary, entries, done, names)


def _finish(
    summary: DatasetSummary, entries: list[ImageEntry], done: dict[str, dict[str, Any]], names: list[str]
) -> DatasetSummary:
    """Write the results and the sidecar from every finished image, in listing order."""
    results, images = [], []
    for entry in entries:
        record = done.get(entry.file_name)
        if record is None:
            continue
        if record["kind"] == "failed":
            summary.failed.append({k: record[k] for k in ("image_id", "file_name", "error")})
            continue
        results.extend(record["detections"])
        images.append(
            {
                "id": record["image_id"],
                "file_name": entry.file_name,
                "width": record["width"],
                "height": record["height"],
            }
        )
    summary.detections = len(results)
    _write_json(summary.results_path, results)
    meta = {
        "categories": [{"id": i, "name": name} for i, name in enumerate(names, start=1)],
        "images": images,
        "failed": summary.failed,
        "labels": names,
        "num_detections": len(results),
    }
    _write_json(summary.meta_path, meta)
    return summary


def run_predict(
    settings: ModelSettings,
    source: str | Path,
    labels: str | Sequence[str],
    out: str | Path,
    *,
    batch_size: int = 8,
    progress: bool = True,
    image_root: str | Path | None = None,
) -> DatasetSummary:
    """Load the predictor of ``settings`` and run :func:`predict_dataset`."""
    predictor = settings.load()
    return predict_dataset(
        predictor, source, labels, out, batch_size=batch_size, progress=progress, image_root=image_root
    )
