"""Where a model comes from: a local directory, the local Hub cache, or (online) the Hub.

:func:`resolve_model_path` fails fast and clearly when the model cannot be had: a name that is
not an existing directory is looked up in the Hub cache first (``local_files_only=True``); when it
is not cached and the Hub is unreachable (``HF_HUB_OFFLINE=1``, or no connection within a couple
of seconds), :class:`ModelNotFoundError` says how to pass a local directory instead. No retries.
This module imports neither torch nor transformers, so the check runs before anything heavy.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

HUB_HOST = "huggingface.co"
CONNECT_TIMEOUT_S = 2.0

LOCAL_HINT = (
    "pass a local checkpoint directory instead (--model /path/to/checkpoint: a folder written by "
    "save_pretrained or `vlm-fo1 convert-official`, or an official release folder)"
)


class ModelNotFoundError(ValueError):
    """The model is neither a local directory nor obtainable from the Hub (a ``ValueError``)."""


def _looks_like_path(name: str) -> bool:
    """Paths (``./x``, ``/x``, ``~/x``, ``a/b/c``, Windows separators) can never be Hub ids."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def hub_reachable(timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """True when ``HF_HUB_OFFLINE`` is unset and a TCP connection to the Hub opens within ``timeout`` s.

    The connection is tried in a daemon thread, so a slow DNS lookup cannot hold the caller longer.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    outcome: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((HUB_HOST, 443), timeout=timeout):
                outcome.append(True)
        except OSError:
            outcome.append(False)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(outcome and outcome[0])


def resolve_model_path(name: str | Path) -> Path:
    """A local directory holding the model ``name`` (a directory, or a Hub id such as ``org/model``).

    Raises:
        ModelNotFoundError: when ``name`` is not an existing directory and cannot be found in the
            Hub cache or downloaded; the message says how to pass a local directory.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    text = str(name)
    if path.exists():
        raise ModelNotFoundError(f"model {text!r} is a file, expected a directory; {LOCAL_HINT}")
    if _looks_like_path(text):
        raise ModelNotFoundError(f"no such model directory: {text!r}; {LOCAL_HINT}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, local_files_only=True))
    except HFValidationError as err:
        raise ModelNotFoundError(
            f"{text!r} is neither a local directory nor a Hub id ({err}); {LOCAL_HINT}"
        ) from None
    except LocalEntryNotFoundError:
        pass
    if not hub_reachable():
        raise ModelNotFoundError(
            f"model {text!r} is not a local directory and the Hugging Face Hub is unreachable "
            f"(offline); {LOCAL_HINT}"
        )
    logger.info("downloading %s from the Hugging Face Hub", text)
    try:
        return Path(snapshot_download(text))
    except Exception as err:  # any Hub failure becomes one clear line, not a stack trace
        raise ModelNotFoundError(f"could not download {text!r} from the Hub: {err}; {LOCAL_HINT}") from None
