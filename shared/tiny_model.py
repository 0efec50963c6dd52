"""A tiny Qwen2.5-VL, built offline in well under a second.

No model can be downloaded on our CPU machines, so the embedded default is a Qwen2.5-VL-architecture
model with random weights, a byte-level BPE tokenizer trained here on the synthetic task's words, and
the stock PIL image processor. Everything is written with ``save_pretrained``: the code that loads it
is the code that loads ``Qwen/Qwen2.5-VL-3B-Instruct``.

Two profiles differ in the attention head size only: the ``vllm`` profile uses 64, the smallest head
size vLLM's kernels accept; the ``transformers`` profile is smaller and faster still. A third, ``100mb``,
is the ``vllm`` shape grown to about 100 MB of float32 weights, for measuring what weight sync costs per MB
where its fixed costs no longer hide that.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
)

from shared import synth_data
from shared.vlm import Qwen2_5_VLImageTextProcessor

Profile = Literal["transformers", "vllm", "100mb"]

# The Qwen2.5-VL special tokens, in the order of the real vocabulary.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# The paper's answer format; whole tokens so that a tiny policy can emit them in one step.
FORMAT_TOKENS = ("<think>", "</think>", "\\boxed{", "<answer>", "</answer>")

# Qwen2-VL's chat template, restricted to what a message can hold here: text and image parts.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinyDims:
    """Text and vision sizes. ``sum(mrope_section)`` must equal ``head_dim / 2``."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    mrope_section: tuple[int, int, int]
    intermediate_size: int
    num_layers: int = 2
    vision_hidden: int = 32
    vision_depth: int = 2
    vision_heads: int = 2


PROFILES: dict[str, TinyDims] = {
    # head_dim 16: mrope 2+3+3 = 8.
    "transformers": TinyDims(
        hidden_size=64, num_heads=4, num_kv_heads=2, mrope_section=(2, 3, 3), intermediate_size=128
    ),
    # head_dim 64: mrope 8+12+12 = 32.
    "vllm": TinyDims(
        hidden_size=128, num_heads=2, num_kv_heads=1, mrope_section=(8, 12, 12), intermediate_size=256
    ),
    # head_dim 64 as above; 6 layers of ~3.9 M parameters: ~25 M parameters, ~99 MB in float32.
    "100mb": TinyDims(
        hidden_size=512,
        num_heads=8,
        num_kv_heads=4,
        mrope_section=(8, 12, 12),
        intermediate_size=2048,
        num_layers=6,
    ),
}


def train_tokenizer(vocab_size: int = 2048) -> Qwen2Tokenizer:
    """Train a byte-level BPE on the synthetic task's language, with the Qwen-VL special tokens.

    Training from ``Qwen2Tokenizer`` keeps Qwen2's normaliser, pre-tokeniser and decoder, so text
    splits as it does on a real checkpoint (digits one by one, for example).
    """
    tokenizer = Qwen2Tokenizer().train_new_from_iterator(
        synth_data.corpus(), vocab_size=vocab_size, new_special_tokens=list(SPECIAL_TOKENS[1:])
    )
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.add_tokens(list(FORMAT_TOKENS))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_config(tokenizer: Qwen2Tokenizer, profile: Profile) -> Qwen2_5_VLConfig:
    dims = PROFILES[profile]
    ids = tokenizer.convert_tokens_to_ids
    # Exactly the tokenizer's size: padding rows (real checkpoints round up) would hold random weights
    # here, and so real probability of emitting tokens that decode to nothing.
    vocab_size = len(tokenizer)
    text = {
        "vocab_size": vocab_size,
        "hidden_size": dims.hidden_size,
        "intermediate_size": dims.intermediate_size,
        "num_hidden_layers": dims.num_layers,
        "num_attention_heads": dims.num_heads,
        "num_key_value_heads": dims.num_kv_heads,
        "max_position_embeddings": 4096,
        "max_window_layers": dims.num_layers,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "mrope_section": list(dims.mrope_section),
        },
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": ids("<|endoftext|>"),
        # Ten times the stock 0.02 (twice that for the vision tower): at the stock scale a random tiny model's
        # answer barely depends on the image (logits differ by ~0.004 between images), and RL collapses onto
        # one answer before it learns to look. Measured on the colour task (README, "make demo").
        "initializer_range": 0.1,
    }
    vision = {
        "depth": dims.vision_depth,
        "hidden_size": dims.vision_hidden,
        "intermediate_size": 2 * dims.vision_hidden,
        "num_heads": dims.vision_heads,
        "out_hidden_size": dims.hidden_size,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [dims.vision_depth - 1],
        "initializer_range": 0.2,
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )


def build_tiny_model(out_dir: str | Path, profile: Profile = "transformers", seed: int = 0) -> Path:
    """Build and save the tiny model, its tokenizer and its processor to ``out_dir``."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    config = build_config(tokenizer, profile)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.save_pretrained(out)
    # Small images stay small: at most 16x16 patches (64 image tokens) per image.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 224)
    processor = Qwen2_5_VLImageTextProcessor(image_processor, tokenizer, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out)
    if profile != "transformers":
        _name_stock_processor(out)
    return out


def _name_stock_processor(out: Path) -> None:
    """vLLM builds the processor a folder names, and insists on the stock one with a video entry.

    The video processor takes the image processor's settings, as in real Qwen2.5-VL checkpoints.
    """
    config_path = out / "processor_config.json"
    config = json.loads(config_path.read_text())
    video = {k: v for k, v in config["image_processor"].items() if k != "image_processor_type"}
    video["video_processor_type"] = "Qwen2VLVideoProcessor"
    config["processor_class"] = "Qwen2_5_VLProcessor"
    config["video_processor"] = video
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2) + "\n")
