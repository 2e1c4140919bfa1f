"""VLM-FO1: fine-grained perception for vision-language models by region-token retrieval.

The main classes are imported lazily, so ``import vlm_fo1.prompting`` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "FO1Config": "vlm_fo1.config",
    "FO1ForConditionalGeneration": "vlm_fo1.model",
    "FO1Processor": "vlm_fo1.processing",
}
__all__ = ["FO1Config", "FO1ForConditionalGeneration", "FO1Processor", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlm_fo1' has no attribute {name!r}")
