"""Turning a weights update (a checkpoint folder, a safetensors file, or safetensors bytes) into a checked
checkpoint folder that a backend can load.

Backends load Hugging Face folders. A bare safetensors file or body is staged as a folder beside the
served model's ``config.json``. Before anything is loaded, the new tensors' names, shapes and dtypes
are compared with the served checkpoint's, read from the safetensors headers alone, so a wrong
checkpoint is refused while the old weights keep serving. Safetensors is the only format accepted:
nothing from the wire is ever unpickled.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from safetensors import SafetensorError, safe_open

from rollout_server.backend import WeightsLoadError

TensorLayout = dict[str, tuple[tuple[int, ...], str]]
_CONFIG_FILES = ("config.json", "generation_config.json")


def tensor_layout(folder: Path) -> TensorLayout:
    """Name → (shape, dtype) of every tensor in the folder's safetensors files, from their headers."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsLoadError(f"{folder} holds no .safetensors file")
    layout: TensorLayout = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
                    tensor = handle.get_slice(name)
                    layout[name] = (tuple(tensor.get_shape()), tensor.get_dtype())
        except (SafetensorError, OSError) as error:
            raise WeightsLoadError(f"{file.name} is not a readable safetensors file: {error}") from error
    return layout


def check_compatible(new: TensorLayout, served: TensorLayout) -> None:
    """Refuse weights that would not fit the served model, naming the first differences."""
    problems = [f"missing {name}" for name in sorted(served.keys() - new.keys())]
    problems += [f"unexpected {name}" for name in sorted(new.keys() - served.keys())]
    for name in sorted(new.keys() & served.keys()):
        if new[name][0] != served[name][0]:
            problems.append(f"{name} has shape {list(new[name][0])}, the model needs {list(served[name][0])}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise WeightsLoadError(f"the weights do not fit the served model: {shown}")


class WeightsStager:
    """Checks and stages weight updates against the model the server started with."""

    def __init__(self, model_folder: Path, root: Path | None = None) -> None:
        self.model_folder = model_folder
        self.root = root.resolve() if root is not None else None
        self.layout = tensor_layout(model_folder)

    def folder_for_path(self, path: str) -> tuple[Path, Path | None]:
        """The checkpoint folder for ``path`` (a folder or a .safetensors file), and the temporary folder
        to delete after loading, if one was made."""
        try:
            resolved = Path(path).resolve()
        except (OSError, RuntimeError, ValueError) as error:
            # A NUL byte (ValueError), or a symlink loop (RuntimeError before Python 3.13, OSError after).
            raise WeightsLoadError(f"{path!r} cannot be resolved: {error}") from error
        if self.root is not None and not resolved.is_relative_to(self.root):
            raise WeightsLoadError(f"{path} is outside the weights root {self.root}")
        try:
            is_dir, is_file = resolved.is_dir(), resolved.is_file()
        except OSError as error:
            # A name longer than the file system takes (ENAMETOOLONG) is not among the errors these ignore.
            raise WeightsLoadError(f"{path} cannot be looked at: {error.strerror}") from error
        if is_dir:
            check_compatible(tensor_layout(resolved), self.layout)
            return resolved, None
        if is_file and resolved.suffix == ".safetensors":
            staged = self._stage(lambda target: target.symlink_to(resolved))
            return staged, staged
        raise WeightsLoadError(f"{path} is neither a checkpoint folder nor a .safetensors file")

    def folder_for_bytes(self, data: bytes) -> Path:
        """A temporary checkpoint folder holding ``data`` (a safetensors file); the caller deletes it."""
        return self._stage(lambda target: target.write_bytes(data))

    def _stage(self, place) -> Path:
        staged = Path(tempfile.mkdtemp(prefix="cppo-weights-"))
        try:
            place(staged / "model.safetensors")
            for name in _CONFIG_FILES:
                if (self.model_folder / name).exists():
                    shutil.copy(self.model_folder / name, staged / name)
            check_compatible(tensor_layout(staged), self.layout)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        return staged
