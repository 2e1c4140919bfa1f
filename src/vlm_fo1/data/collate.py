"""Training batches: records → model inputs with labels on the assistant's answers only."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from vlm_fo1.data.records import ConversationRecord
from vlm_fo1.processing import FO1Batch, FO1Processor, PreparedImage

logger = logging.getLogger(__name__)


class RecordDataset(Dataset):
    """Records with the folder their image paths are relative to; items are ``(record, root)`` pairs.

    Args:
        records: the records.
        image_roots: one folder for all records, or one per record (records mixed from files).
    """

    def __init__(
        self, records: Sequence[ConversationRecord], image_roots: str | Path | Sequence[Path | None] | None
    ) -> None:
        self.records = list(records)
        if image_roots is None or isinstance(image_roots, (str, Path)):
            self.roots = [Path(image_roots) if image_roots is not None else None] * len(self.records)
        else:
            self.roots = list(image_roots)
        if len(self.roots) != len(self.records):
            raise ValueError(f"got {len(self.roots)} image roots for {len(self.records)} records")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[ConversationRecord, Path | None]:
        return self.records[index], self.roots[index]


class FO1Collator:
    """Collates ``(record, image_root)`` items into one right-padded training batch.

    Every turn of each record is encoded; ``labels`` are -100 except on assistant answers (and
    their ``<|im_end|>``). Prepared images are cached (``cache_size`` most recent), since a scene
    usually serves several records.
    """

    def __init__(
        self, processor: FO1Processor, *, cache_size: int = 512, max_length: int | None = None
    ) -> None:
        self.processor = processor
        self.max_length = max_length
        self.cache_size = cache_size
        self._cache: OrderedDict[str, PreparedImage] = OrderedDict()

    def _image(self, record: ConversationRecord, root: Path | None) -> PreparedImage | None:
        path = record.image_path(root)
        if path is None:
            return None
        key = str(path)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        prepared = self.processor.prepare_image(path)
        if self.cache_size:
            self._cache[key] = prepared
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return prepared

    def __call__(self, items: Sequence[Any]) -> FO1Batch:
        pairs = [item if isinstance(item, tuple) else (item, None) for item in items]
        return self.processor(
            [record.training_messages() for record, _ in pairs],
            images=[self._image(record, root) for record, root in pairs],
            boxes=[record.boxes for record, _ in pairs],
            add_generation_prompt=False,
            return_labels=True,
            padding_side="right",
            max_length=self.max_length,
            region_texts=[record.region_texts for record, _ in pairs],
        )
