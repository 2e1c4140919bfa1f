"""The library side of ``vlm-fo1 eval``: load a checkpoint and a data file, evaluate, write the report."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import torch

from vlm_fo1.data.records import read_records
from vlm_fo1.decoding import check_close_bias, check_suppress_overlap
from vlm_fo1.evaluation.confidence import check_mode
from vlm_fo1.evaluation.report import EvalReport
from vlm_fo1.evaluation.runner import evaluate

logger = logging.getLogger(__name__)


def _device(device: str | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def run_eval(
    model_dir: str | Path,
    data_path: str | Path,
    out_path: str | Path,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    limit: int | None = None,
    device: str | None = None,
    confidence: str = "product",
    constrained: bool = False,
    stop_by_mass: bool = False,
    suppress_overlap: float | None = None,
    close_bias: float = 0.0,
    unique_labels: bool = False,
    count_from_list: bool = False,
    ranked: bool = False,
    per_class: bool = False,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> EvalReport:
    """Evaluate the checkpoint in ``model_dir`` on the records of ``data_path``; write the report JSON.

    Args:
        model_dir: an FO1 checkpoint (or an official release directory) with its processor files.
        data_path: a record file readable by ``read_records``; relative image paths start from its folder.
        out_path: where the report (metrics, settings, errors, predictions) is written, atomically.
        limit: evaluate only the first ``limit`` records.
        device: ``cpu``, ``cuda``, ``cuda:1`` …; None or ``auto``: CUDA when available.
        confidence / constrained / stop_by_mass / suppress_overlap / close_bias / unique_labels /
            count_from_list / ranked / per_class / batch_size / max_new_tokens / progress: see
            :func:`evaluate`.
        dtype: model dtype (None: as stored).

    Raises:
        ValueError: for an unknown ``confidence``, a bad decoder option, a negative ``limit`` or a
            file that is not a record file.
    """
    from vlm_fo1.model import FO1ForConditionalGeneration
    from vlm_fo1.processing import FO1Processor

    check_mode(confidence)
    check_suppress_overlap(suppress_overlap)
    check_close_bias(close_bias)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    data_path = Path(data_path)
    target = _device(device)
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = FO1ForConditionalGeneration.from_pretrained(model_dir, **kwargs).to(target).eval()
    processor = FO1Processor.from_pretrained(model_dir)
    records = list(itertools.islice(read_records(data_path), limit))
    logger.info("evaluating %s on %d records of %s (%s)", model_dir, len(records), data_path, target)
    report = evaluate(
        model,
        processor,
        records,
        data_path.parent,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        confidence=confidence,
        constrained=constrained,
        stop_by_mass=stop_by_mass,
        suppress_overlap=suppress_overlap,
        close_bias=close_bias,
        unique_labels=unique_labels,
        count_from_list=count_from_list,
        ranked=ranked,
        per_class=per_class,
        progress=progress,
    )
    report.settings.update(model=str(model_dir), data=str(data_path), device=str(target))
    report.write(out_path)
    return report
