"""LoRA (model.lora) without servers: what trains, the merged weights the replicas get, the reference with the
adapter off, and checkpoints and both exports of the adapter."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file

from shared.images import encode_image_data_url
from shared.schemas import ChatMessage, ImagePart, ImageURL, PromptRollout, Sample, TextPart
from shared.vlm import load_model, load_processor, suppressed_token_ids
from trainer import checkpoint
from trainer.config import ConfigError, TrainConfig, load_config
from trainer.data import Example
from trainer.distributed import init_distributed
from trainer.experience import Batch, collate, make_rows, prompt_inputs
from trainer.policy import Policy, response_logprobs


def _policy(tiny: Path, *overrides: str) -> Policy:
    init_distributed()
    config = load_config(None, [f"model.path={tiny}", "train.micro_batch_size=4", *overrides])
    return Policy(config, 1, suppressed_token_ids(load_processor(tiny).tokenizer))


def _train_the_adapter_a_little(policy: Policy) -> None:
    """Random adapter and merger weights, as training would leave them (PEFT starts B at zero, a no-op)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in policy.engine.module.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))


def _batch(tiny: Path) -> tuple[Batch, TrainConfig]:
    processor = load_processor(tiny)
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    image.paste((200, 30, 30), (12, 12, 52, 52))
    parts = [
        ImagePart(type="image_url", image_url=ImageURL(url=encode_image_data_url(image))),
        TextPart(type="text", text="What colour is the shape?"),
    ]
    example = Example("a", (ChatMessage(role="user", content=parts),), (image,), "red")
    words = processor.tokenizer("red green blue yellow").input_ids
    ids = prompt_inputs(processor, example, {"clean": example.images})["clean"].input_ids.tolist()
    samples = [
        Sample(
            prompt_id="a",
            sample_index=i,
            token_ids=tokens,
            text="",
            logprobs=[-1.0] * len(tokens),
            finish_reason="stop",
            policy_version=0,
        )
        for i, tokens in enumerate([words[0:2], words[2:4]])
    ]
    rollout = PromptRollout(prompt_id="a", prompt_token_ids=ids, samples=samples)
    rewards = {("a", 0): (1.0, {}), ("a", 1): (0.0, {})}
    rows = make_rows(processor, [example], [rollout], rewards, ["clean"], seed=0)
    return collate(rows, ["clean"], processor.tokenizer.pad_token_id), load_config(None)


def test_lora_trains_the_adapters_and_the_merger_only(tiny):
    policy = _policy(tiny, "model.lora={r: 4, target_modules: [q_proj, down_proj]}")
    trainable = {n: p.numel() for n, p in policy.engine.module.named_parameters() if p.requires_grad}
    # Per layer r·(in + out): q_proj 64 → 64, down_proj 128 → 64, in the 2 language layers; the vision
    # blocks' down_proj (64 → 32) too, as freeze_vision is off. The merger whole: its norm over the vision
    # width (32), then 128 → 128 → 64 with biases.
    adapters = 2 * 4 * (64 + 64) + 2 * 4 * (128 + 64) + 2 * 4 * (64 + 32)
    merger = 32 + 128 * 128 + 128 + 128 * 64 + 64
    assert sum(trainable.values()) == adapters + merger
    assert all("lora_" in n or ".merger.modules_to_save." in n for n in trainable)

    lora = "model.lora={r: 4, target_modules: [q_proj, down_proj]}"
    frozen = _policy(tiny, lora, "model.freeze_vision=true", "model.freeze_merger=true")
    trainable = {n for n, p in frozen.engine.module.named_parameters() if p.requires_grad}
    assert len(trainable) == 8 and not any(".visual." in n for n in trainable)


def test_full_fine_tuning_freezes_the_vision_tower_and_the_merger_on_their_switches(tiny):
    policy = _policy(tiny, "model.freeze_vision=true")
    frozen = {n for n, p in policy.engine.module.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("model.visual.") and ".merger." not in n for n in frozen)
    policy = _policy(tiny, "model.freeze_merger=true")
    frozen = {n for n, p in policy.engine.module.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in policy.engine.module.named_parameters() if ".merger." in n}


@pytest.mark.parametrize(
    ("lora", "named"),
    [
        ("{target_modules: [q_proj, qkv_proj]}", "'qkv_proj' names no linear layer"),
        ("{target_modules: [qkv]}", "'qkv' names only layers of the vision tower"),
    ],
)
def test_target_modules_that_adapt_nothing_are_refused_by_name(tiny, lora, named):
    with pytest.raises(ConfigError, match=r"model\.lora\.target_modules") as error:
        _policy(tiny, f"model.lora={lora}", "model.freeze_vision=true")
    assert named in str(error.value)


def test_published_weights_are_peft_merge_and_unload_under_the_checkpoint_names(tiny, tmp_path):
    policy = _policy(tiny, "model.lora={r: 4, alpha: 12}")
    _train_the_adapter_a_little(policy)
    expected = copy.deepcopy(policy.engine.module).merge_and_unload().state_dict()
    with policy.full_weights() as weights:
        assert weights is not None
        policy.save_pretrained(tmp_path / "published", weights)
    assert weights.keys() <= expected.keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, expected[name]), name
    # By hand, one layer: W + (alpha / r)·B·A.
    layer = policy.model.model.language_model.layers[1].self_attn.v_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    by_hand = layer.base_layer.weight + 12 / 4 * b @ a
    torch.testing.assert_close(weights["model.language_model.layers.1.self_attn.v_proj.weight"], by_hand)
    # The merger trained whole, and the file the replicas load has exactly the starting checkpoint's names.
    trained = policy.model.model.visual.merger.modules_to_save["default"]
    assert torch.equal(weights["model.visual.merger.mlp.0.weight"], trained.mlp[0].weight)
    published = load_file(tmp_path / "published/model.safetensors")
    assert published.keys() == load_file(tiny / "model.safetensors").keys()


def test_the_reference_is_the_base_model_with_the_adapter_off(tiny):
    policy = _policy(tiny, "model.lora={}", "objective.beta=0.01")
    assert policy.reference is None, "LoRA needs no second copy of the model"
    _train_the_adapter_a_little(policy)
    batch, config = _batch(tiny)
    base = load_model(tiny, dtype=torch.float32).eval()
    suppressed = policy.suppressed_ids
    with torch.no_grad():
        expected, _ = response_logprobs(
            base, batch, "clean", torch.float32, config.rollout.temperature, suppressed
        )
    valid = batch.response_mask
    reference = policy.reference_logprobs(batch)
    torch.testing.assert_close(reference[valid], expected[valid], atol=1e-6, rtol=1e-6)
    trained, _ = policy.score_old(batch, ("clean",))["clean"]
    assert (trained[valid] - expected[valid]).abs().max() > 1e-3, "the adapter changed nothing"


def test_a_lora_checkpoint_holds_the_adapter_and_exports_it_or_the_merged_model(tiny, tmp_path):
    policy = _policy(tiny, "model.lora={r: 4}")
    _train_the_adapter_a_little(policy)
    processor = load_processor(tiny)
    state = checkpoint.TrainerState(step=1, policy_version=2, data={})
    saved = checkpoint.save(policy, processor, tmp_path / "run", state, keep=1)
    with policy.full_weights() as merged:
        assert merged is not None
        policy.save_pretrained(tmp_path / "published", merged)
    published = load_file(tmp_path / "published/model.safetensors")

    # The adapter, as PEFT loads it onto the base model (the checkpoint names the base by its path).
    adapter = checkpoint.export(saved, tmp_path / "adapter")
    assert not (adapter / "model.safetensors").exists() and (adapter / "tokenizer.json").is_file()
    loaded = PeftModel.from_pretrained(load_model(tiny, dtype=torch.float32), str(adapter))
    for name, tensor in loaded.get_base_model().state_dict().items():
        if "lora_" in name or "modules_to_save" in name:
            trained = policy.engine.module.get_base_model().state_dict()[name]
            assert torch.equal(tensor, trained), name

    # Merged: a plain model folder, the published weights, which the processor loads beside.
    whole = checkpoint.export(saved, tmp_path / "merged", merge=True)
    served = load_file(whole / "model.safetensors")
    assert served.keys() == published.keys()
    for name, tensor in served.items():
        torch.testing.assert_close(tensor, published[name], atol=1e-6, rtol=1e-6, msg=name)
    load_processor(whole)

    # A resumed run loads the adapter and optimizer back; a full fine-tuning run refuses the checkpoint.
    fresh = _policy(tiny, "model.lora={r: 4}")
    assert checkpoint.load(fresh, saved) == state
    with fresh.full_weights() as resumed:
        assert all(torch.equal(resumed[name], merged[name]) for name in merged)
    with pytest.raises(checkpoint.CheckpointError, match="written by a LoRA run"):
        checkpoint.load(_policy(tiny), saved)


def test_under_zero3_the_merged_weights_and_the_reference_are_stage_0s(tiny, tmp_path):
    """Sharded (one process here), the adapters are gathered with the rest for the merge and the reference."""
    import deepspeed

    whole = _policy(tiny, "model.lora={r: 4}", "objective.beta=0.01")
    _train_the_adapter_a_little(whole)
    sharded = _policy(tiny, "model.lora={r: 4}", "objective.beta=0.01", "deepspeed.zero_stage=3")
    assert sharded.engine.zero_optimization_stage() == 3 and sharded.reference is None
    trained = dict(whole.engine.module.named_parameters())
    parameters = list(sharded.engine.module.named_parameters())
    with torch.no_grad(), deepspeed.zero.GatheredParameters([p for _, p in parameters], modifier_rank=0):
        for name, parameter in parameters:
            parameter.copy_(trained[name])
    with whole.full_weights() as expected, sharded.full_weights() as published:
        assert published.keys() == expected.keys()
        assert all(torch.equal(published[name], expected[name]) for name in expected)
    batch, _ = _batch(tiny)
    torch.testing.assert_close(sharded.reference_logprobs(batch), whole.reference_logprobs(batch))
    sharded.save_adapter(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter/adapter_model.safetensors")
    assert saved and all(saved[name].numel() for name in saved)
