"""Inference: the :class:`Predictor` (set an image once, ask many questions), typed results, batch runs.

>>> from vlm_fo1.inference import Predictor
>>> predictor = Predictor.from_pretrained("path/to/checkpoint", proposer="omdet-turbo")
>>> predictor.set_image("photo.jpg", labels=["cat"])
>>> result = predictor.detect("cat")
>>> result.detections[0].box, result.detections[0].score
>>> print(result.to_json(indent=2))

Modules: ``predictor`` (Predictor), ``results`` (frozen results and their JSON schema), ``inputs``
(proposal forms, image lists), ``hub`` (local directory or Hub id, failing fast
offline), ``tasks`` (one function per CLI command: ``run_query``, ``predict_dataset``).
Names are imported lazily, so ``vlm_fo1.inference.hub`` stays light (no torch).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Predictor": "vlm_fo1.inference.predictor",
    "NoImageError": "vlm_fo1.inference.predictor",
    "ImageState": "vlm_fo1.inference.predictor",
    "split_labels": "vlm_fo1.inference.inputs",
    "Prediction": "vlm_fo1.inference.results",
    "DetectionResult": "vlm_fo1.inference.results",
    "CountResult": "vlm_fo1.inference.results",
    "AnswerResult": "vlm_fo1.inference.results",
    "RegionDetection": "vlm_fo1.inference.results",
    "RegionMention": "vlm_fo1.inference.results",
    "as_proposals": "vlm_fo1.inference.inputs",
    "list_images": "vlm_fo1.inference.inputs",
    "ModelNotFoundError": "vlm_fo1.inference.hub",
    "resolve_model_path": "vlm_fo1.inference.hub",
    "run_query": "vlm_fo1.inference.tasks",
    "predict_dataset": "vlm_fo1.inference.tasks",
    "DatasetSummary": "vlm_fo1.inference.tasks",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlm_fo1.inference' has no attribute {name!r}")
