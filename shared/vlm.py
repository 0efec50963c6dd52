"""Loading a Qwen2.5-VL-family model and its processor, tiny or real, the same way.

The stock ``Qwen2_5_VLProcessor`` always builds a video processor, which needs torchvision, and
torchvision does not import next to the CPU torch build. ``load_processor`` therefore falls back to
an image-and-text processor built from the same files when the stock one cannot be made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from shared.schemas import VISION_PLACEHOLDER_TOKENS, ChatMessage, ImagePart


def suppressed_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids the policy never emits: the vision placeholders.

    The rollout backends mask them when sampling, so the policy's distribution is the softmax over the
    remaining ids. A teacher-forced pass must mask the same ids to compute log-probs of that
    distribution (``trainer.objective.logprobs_and_entropy(..., suppressed_ids=...)``).
    """
    vocab = tokenizer.get_vocab()
    return sorted(vocab[token] for token in VISION_PLACEHOLDER_TOKENS if token in vocab)


class Qwen2_5_VLImageTextProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without the video processor: images and text only.

    Registered with ``AutoProcessor``, so a model folder that names it loads with
    ``AutoProcessor.from_pretrained`` once this module is imported.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


AutoProcessor.register(Qwen2_5_VLConfig, Qwen2_5_VLImageTextProcessor, exist_ok=True)


def load_processor(path: str | Path) -> ProcessorMixin:
    """The model's processor; image-and-text only where the stock one needs torchvision.

    ``AutoProcessor`` silently returns a bare tokenizer for a folder whose processor class it does not
    know; that is treated as a failure too, so a caller never receives a processor that drops images.
    """
    try:
        processor = AutoProcessor.from_pretrained(str(path))
    except (ImportError, OSError) as error:
        stock_problem = f"{type(error).__name__}: {error}"
    else:
        if hasattr(processor, "image_processor"):
            return processor
        stock_problem = f"AutoProcessor found only a {type(processor).__name__}"
    try:
        return Qwen2_5_VLImageTextProcessor.from_pretrained(str(path))
    except Exception as error:
        raise ValueError(
            f"cannot load an image processor from {path}: {stock_problem}; "
            f"the image-and-text fallback failed too: {error}"
        ) from error


@dataclass(frozen=True)
class PixelBounds:
    """How Qwen-VL processors size an image: each side a multiple of ``factor`` (patch × merge size), the
    area within ``min_pixels`` and ``max_pixels``, the aspect ratio kept as well as those allow."""

    factor: int
    min_pixels: int
    max_pixels: int

    def size(self, image: Image.Image) -> tuple[int, int]:
        """The (width, height) ``image`` is resized to."""
        height, width = smart_resize(
            image.height,
            image.width,
            factor=self.factor,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
        )
        return width, height

    def fit(self, image: Image.Image) -> Image.Image:
        """``image`` at :meth:`size`, resampled as the processors do (bicubic), or itself if it fits."""
        size = self.size(image)
        return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


def pixel_bounds(
    processor: ProcessorMixin, min_pixels: int | None = None, max_pixels: int | None = None
) -> PixelBounds:
    """The processor's bounds, narrowed to ``min_pixels``/``max_pixels`` where given. Bounds past the
    processor's own are refused: it would resize the image again."""
    images = processor.image_processor
    own = PixelBounds(
        images.patch_size * images.merge_size, images.size["shortest_edge"], images.size["longest_edge"]
    )
    bounds = PixelBounds(own.factor, min_pixels or own.min_pixels, max_pixels or own.max_pixels)
    if not own.min_pixels <= bounds.min_pixels <= bounds.max_pixels <= own.max_pixels:
        raise ValueError(
            f"pixel bounds {bounds.min_pixels}..{bounds.max_pixels} must lie within the model processor's "
            f"{own.min_pixels}..{own.max_pixels} (its size.shortest_edge and size.longest_edge), min first"
        )
    return bounds


def processed_size(processor: ProcessorMixin, image: Image.Image) -> tuple[int, int]:
    """The (width, height) the processor resizes ``image`` to before it cuts it into patches: a multiple of
    patch × merge size on each side, within the processor's pixel bounds."""
    return pixel_bounds(processor).size(image)


def load_model(path: str | Path, **kwargs) -> PreTrainedModel:
    """The model, through the same auto class for the tiny model and real checkpoints."""
    return AutoModelForImageTextToText.from_pretrained(str(path), **kwargs)


def chat_template_messages(messages: Sequence[ChatMessage]) -> list[dict]:
    """Messages as Hugging Face chat templates take them: each image part becomes an image slot."""
    converted = []
    for message in messages:
        if isinstance(message.content, str):
            converted.append({"role": message.role, "content": message.content})
            continue
        parts = [
            {"type": "image"} if isinstance(part, ImagePart) else {"type": "text", "text": part.text}
            for part in message.content
        ]
        converted.append({"role": message.role, "content": parts})
    return converted
