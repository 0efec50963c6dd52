"""The tiny Qwen2.5-VL: build → load → generate on an image → teacher-forced log-probs agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2_5_VLForConditionalGeneration

from shared import synth_data
from shared.tiny_model import SPECIAL_TOKENS, build_config, build_tiny_model, train_tokenizer
from shared.vlm import Qwen2_5_VLImageTextProcessor, load_model, load_processor
from trainer.objective import logprobs_and_entropy

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), profile="transformers", seed=3)


@pytest.fixture(scope="module")
def tiny_vllm_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-vllm"), profile="vllm")


def _messages(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def test_loads_through_the_auto_classes_like_a_real_checkpoint(tiny_dir):
    processor = AutoProcessor.from_pretrained(tiny_dir)
    assert isinstance(processor, Qwen2_5_VLImageTextProcessor)
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    config = model.config
    tokenizer = processor.tokenizer
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.text_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert config.text_config.vocab_size >= len(tokenizer)
    assert config.vision_config.out_hidden_size == config.text_config.hidden_size
    head_dim = config.text_config.hidden_size // config.text_config.num_attention_heads
    assert sum(config.text_config.rope_parameters["mrope_section"]) == head_dim // 2


def test_save_then_load_is_bit_exact(tiny_dir, tmp_path):
    # Checkpoint keys are renamed on load (model.layers → model.language_model.layers), so the check
    # is a round trip: load, save again, and compare the two files tensor by tensor.
    load_model(tiny_dir).save_pretrained(tmp_path)
    first = load_file(tiny_dir / "model.safetensors")
    second = load_file(tmp_path / "model.safetensors")
    assert first.keys() == second.keys() and len(first) > 50
    for name, tensor in first.items():
        assert torch.equal(second[name], tensor), name


def test_tokenizer_has_the_qwen_vl_special_tokens_and_single_token_answers(tiny_dir):
    tokenizer = load_processor(tiny_dir).tokenizer
    for token in SPECIAL_TOKENS:
        ids = tokenizer.encode(token, add_special_tokens=False)
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == token
    # A tiny policy learns only if each answer is one token (PLATFORM.md). Words are one token with or
    # without a leading space; digits are split from spaces, as Qwen's pre-tokenizer does.
    words = [*synth_data.COLOURS, *synth_data.SHAPES, *synth_data.POSITIONS]
    texts = [*words, *(f" {w}" for w in words), *synth_data.NUMBER_WORDS]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) == 1, (text, tokenizer.convert_ids_to_tokens(ids))
        assert tokenizer.decode(ids) == text
    text = "<think>the shape is red</think> \\boxed{red}"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_chat_template_places_the_image(tiny_dir):
    processor = load_processor(tiny_dir)
    text = processor.apply_chat_template(
        _messages("What colour?"), add_generation_prompt=True, tokenize=False
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # A 112×112 image is 8×8 patches of 14 px, merged 2×2 → 16 image tokens.
    inputs = processor(text=[text], images=[Image.new("RGB", (112, 112))], return_tensors="pt")
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 16
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]]


def test_generation_logprobs_match_teacher_forced_logprobs(tiny_dir):
    processor = load_processor(tiny_dir)
    processor.tokenizer.padding_side = "left"
    model = load_model(tiny_dir).eval()
    examples = list(synth_data.generate("train", 2, seed=5))
    # Two images of different sizes give prompts of different lengths, so padding is exercised.
    images = [examples[0].image, examples[1].image.resize((84, 56))]
    texts = [
        processor.apply_chat_template(_messages(e.problem), add_generation_prompt=True, tokenize=False)
        for e in examples
    ]
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    prompt_len = inputs["input_ids"].shape[1]
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            do_sample=True,
            temperature=TEMPERATURE,
            top_k=0,
            top_p=1.0,
            max_new_tokens=12,
            min_new_tokens=12,
            output_logits=True,
            return_dict_in_generate=True,
        )
    response = out.sequences[:, prompt_len:]
    assert response.shape == (2, 12)
    generated_logits = torch.stack(out.logits, dim=1)
    logp_generation, _ = logprobs_and_entropy(generated_logits, response, TEMPERATURE)

    # Teacher forcing: one forward pass over prompt + response; position t−1 predicts token t.
    # mm_token_type_ids must be passed: without it the M-RoPE positions of the image tokens are
    # computed differently from generation's, and log-probs drift by ~1e-3.
    attention_mask = torch.cat([inputs["attention_mask"], torch.ones_like(response)], dim=1)
    mm_token_type_ids = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(response)], dim=1)
    with torch.no_grad():
        logits = model(
            input_ids=out.sequences,
            attention_mask=attention_mask,
            mm_token_type_ids=mm_token_type_ids,
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
        ).logits
    logp_forced, entropy = logprobs_and_entropy(logits[:, prompt_len - 1 : -1], response, TEMPERATURE)

    torch.testing.assert_close(logp_forced, logp_generation, atol=1e-5, rtol=1e-5)
    assert torch.all(logp_forced < 0) and torch.all(entropy > 0)
    # A different temperature gives different log-probs: the check above is not vacuous.
    logp_other, _ = logprobs_and_entropy(logits[:, prompt_len - 1 : -1], response, 1.0)
    assert not torch.allclose(logp_other, logp_generation, atol=1e-3)


def test_vllm_profile_has_head_size_64_and_names_the_stock_processor(tiny_vllm_dir):
    config = json.loads((tiny_vllm_dir / "config.json").read_text())
    text = config["text_config"]
    assert text["hidden_size"] // text["num_attention_heads"] == 64
    assert sum(text["rope_parameters"]["mrope_section"]) == 32
    processor_config = json.loads((tiny_vllm_dir / "processor_config.json").read_text())
    assert processor_config["processor_class"] == "Qwen2_5_VLProcessor"
    assert processor_config["video_processor"]["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert (tiny_vllm_dir / "video_preprocessor_config.json").exists()
    # Without torchvision the stock processor cannot be built; the loader falls back to images and text.
    processor = load_processor(tiny_vllm_dir)
    prompt = "<|vision_start|><|image_pad|><|vision_end|>What colour?"
    inputs = processor(text=[prompt], images=[Image.new("RGB", (56, 56))])
    assert inputs["input_ids"][0].count(processor.image_token_id) == 4
    model = load_model(tiny_vllm_dir)
    assert model.config.text_config.hidden_size == 128


def test_the_100mb_profile_holds_about_100_mb_of_float32_weights_with_head_size_64():
    config = build_config(train_tokenizer(), "100mb")
    text = config.text_config
    assert text.hidden_size // text.num_attention_heads == 64
    assert sum(text.rope_parameters["mrope_section"]) == 32
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    # Tied embeddings count once, as save_pretrained writes them.
    megabytes = sum(p.numel() * 4 for p in model.parameters()) / 1e6
    assert 90 < megabytes < 110


def test_unknown_profile_is_refused(tmp_path):
    with pytest.raises(ValueError, match="profile"):
        build_tiny_model(tmp_path, profile="jax")  # type: ignore[arg-type]


def test_a_folder_without_an_image_processor_is_refused_clearly(tiny_dir, tmp_path):
    # AutoProcessor would silently hand back the bare tokenizer; the loader refuses instead.
    load_processor(tiny_dir).tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="cannot load an image processor"):
        load_processor(tmp_path)
