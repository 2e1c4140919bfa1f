"""``EvalReport``: the metrics, per-record predictions and errors of one evaluation run."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _json_value(value: Any) -> Any:
    """``nan``/``inf`` become None (strict JSON); containers are walked."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    return value


def _is_count(name: str) -> bool:
    last = name.rsplit("/", 1)[-1]
    return last == "n" or last.startswith("n_")


@dataclass
class EvalReport:
    """The result of an evaluation.

    Attributes:
        metrics: flat ``group/metric`` names → values (``nan`` when undefined, e.g. no negatives);
            counts are named ``…/n`` and ``…/n_negative``.
        predictions: per scored record: ``id``, ``task``, ``group``, ``text`` (raw answer),
            ``target``, ``parsed`` (summary), ``correct`` (None for unscored tasks).
        errors: per record that failed: ``id``, ``task``, ``stage`` (generation / scoring), ``error``.
        settings: how the run was made (confidence mode, batch size …).
    """

    metrics: dict[str, float]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A strict-JSON-ready dict (``nan`` written as null), metrics sorted by name."""
        return _json_value(
            {
                "metrics": {k: self.metrics[k] for k in sorted(self.metrics)},
                "settings": self.settings,
                "errors": self.errors,
                "predictions": self.predictions,
            }
        )

    def write(self, path: str | Path) -> Path:
        """Write :meth:`to_json` atomically (a temporary file in the same folder, renamed)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_json(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def table(self) -> str:
        """The metrics as an aligned two-column table (counts as integers, undefined as n/a)."""
        rows = [("metric", "value")]
        for name in sorted(self.metrics):
            value = self.metrics[name]
            if isinstance(value, float) and not math.isfinite(value):
                shown = "n/a"
            elif _is_count(name):
                shown = str(int(value))
            else:
                shown = f"{value:.4f}"
            rows.append((name, shown))
        width = max(len(name) for name, _ in rows)
        value_width = max(len(v) for _, v in rows)
        lines = [f"{name:<{width}}  {value:>{value_width}}" for name, value in rows]
        lines.insert(1, "-" * (width + 2 + value_width))
        return "\n".join(lines)
