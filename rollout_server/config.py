"""Settings of the rollout server: one model, read from flags and ``CPPO_ROLLOUT_*`` environment variables.

Every field is a flag (``--max-batch-size``) and an environment variable (``CPPO_ROLLOUT_MAX_BATCH_SIZE``);
a flag wins over the environment, which wins over the default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.images import ImageLimits
from shared.schemas import MAX_IMAGES_PER_PROMPT


class RolloutSettings(BaseSettings):
    """How the rollout server runs."""

    model_config = SettingsConfigDict(
        env_prefix="CPPO_ROLLOUT_",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_hide_none_type=True,
        extra="forbid",
    )

    model: str = Field(description="model folder (or hub id where a hub is reachable)")
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="generation engine: transformers (CPU) or vllm"
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=1, le=65535, description="port to listen on")
    api_key: SecretStr | None = Field(
        None, description="bearer token required on every route but /health, /ready and /metrics"
    )
    served_model_name: str | None = Field(
        None, description="model name in /v1/models and chat completions; unset: the --model value"
    )
    enable_weight_updates: bool = Field(
        True, description="serve POST /v1/weights (the trainer's weight sync)"
    )
    insecure_no_auth: bool = Field(
        False, description="serve on a non-loopback address without an API key (trusted networks only)"
    )
    weights_root: Path | None = Field(
        None, description="if set, POST /v1/weights only loads checkpoints under this folder"
    )
    max_weights_bytes: int = Field(
        16 * 2**30, ge=1, description="largest weights body for POST /v1/weights/tensors, in bytes"
    )
    max_request_bytes: int = Field(512 * 2**20, ge=1, description="largest JSON request body, in bytes")
    image_root: Path | None = Field(
        None, description="folder that file:// image URLs may read from (default: file:// refused)"
    )
    max_image_bytes: int = Field(20 * 2**20, ge=1, description="largest image file, in bytes")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="largest image, in pixels")
    min_pixels: int | None = Field(
        None,
        ge=1,
        description="fewest pixels of an image given to the model, as Qwen-VL's min_pixels (default: the "
        "model processor's); images are resized as the trainer's data.min_pixels does",
    )
    max_pixels: int | None = Field(
        None,
        ge=1,
        description="most pixels of an image given to the model, as Qwen-VL's max_pixels (default: the "
        "model processor's); images are resized as the trainer's data.max_pixels does",
    )
    max_images_per_prompt: int = Field(
        4,
        ge=1,
        le=MAX_IMAGES_PER_PROMPT,
        description="most images in one prompt (vllm reserves memory for them)",
    )
    max_model_len: int | None = Field(
        None, ge=16, description="context length, prompt and response (default: the model's)"
    )
    max_batch_size: int = Field(64, ge=1, description="transformers: most sequences decoding together")
    max_queued_sequences: int | None = Field(
        None,
        ge=1,
        description="most sequences (prompts x n x images sampled on) waiting or running; a request past it "
        "gets 429 with Retry-After, unless the server is idle (default: 16 x max_batch_size)",
    )
    max_wait_ms: float = Field(
        5.0,
        ge=0,
        description="transformers: how long an idle server waits for more requests to share a prefill, in ms",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="weights dtype")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="vllm: fraction of accelerator (on CPU: NUMA node) memory to use"
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs per replica")
    drain_s: float = Field(
        30.0, ge=0, description="after SIGTERM, seconds running requests may take before they are cancelled"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log verbosity")

    def queue_limit(self) -> int:
        return self.max_queued_sequences or 16 * self.max_batch_size

    def image_limits(self) -> ImageLimits:
        return ImageLimits(
            max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels, file_root=self.image_root
        )

    def name(self) -> str:
        return self.served_model_name or self.model
