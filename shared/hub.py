"""Whether a model or dataset reference can work at all, checked in a moment before anything loads.

A reference is a local folder or a Hugging Face hub id (``gpt2``, ``Qwen/Qwen2.5-VL-3B-Instruct``). A typo
in either used to surface minutes later, as retries against the hub and chained tracebacks; this says
what is wrong in one line instead. Only what is certain is refused: a name the hub could hold is left
to the hub, unless the hub is switched off.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import constants
from huggingface_hub.utils import HFValidationError, validate_repo_id


def reference_problem(reference: str, what: str, marker: str | None = None) -> str | None:
    """Why ``reference`` (named ``what`` in the message, e.g. ``--model``) is neither a usable local folder
    nor a possible hub id; None when it may be either. ``marker`` is a file a usable folder holds."""
    path = Path(reference).expanduser()
    if path.is_dir():
        if marker is not None and not (path / marker).exists():
            return f"{what} {reference} is a folder without {marker}"
        return None
    if path.exists():
        return f"{what} {reference} is a file, not a folder"
    try:
        validate_repo_id(reference)
    except HFValidationError:
        return f"{what} {reference}: no such folder (and not a hub id, which is NAME or ORG/NAME)"
    if str(path.parent) != "." and path.parent.is_dir():
        return f"{what} {reference}: no such folder in {path.parent}"
    if constants.HF_HUB_OFFLINE:  # HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE, read as the hub reads them
        return f"{what} {reference}: no such folder, and the hub is offline (HF_HUB_OFFLINE)"
    return None
