"""Loading a Qwen2.5-VL-family model and its processor, tiny or real, the same way.

The stock ``Qwen2_5_VLProcessor`` always builds a video processor, which needs torchvision, and
torchvision does not import next to the CPU torch build. ``load_processor`` therefore falls back to
an image-and-text processor built from the same files when the stock one cannot be made.
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
)


class Qwen2_5_VLImageTextProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without the video processor: images and text only.

    Registered with ``AutoProcessor``, so a model folder that names it loads with
    ``AutoProcessor.from_pretrained`` once this module is imported.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


AutoProcessor.register(Qwen2_5_VLConfig, Qwen2_5_VLImageTextProcessor, exist_ok=True)


def load_processor(path: str | Path) -> ProcessorMixin:
    """The model's processor; image-and-text only where the stock one needs torchvision."""
    try:
        return AutoProcessor.from_pretrained(str(path))
    except (ImportError, OSError) as stock_error:
        try:
            return Qwen2_5_VLImageTextProcessor.from_pretrained(str(path))
        except Exception as fallback_error:
            raise stock_error from fallback_error


def load_model(path: str | Path, **kwargs) -> PreTrainedModel:
    """The model, through the same auto class for the tiny model and real checkpoints."""
    return AutoModelForImageTextToText.from_pretrained(str(path), **kwargs)
