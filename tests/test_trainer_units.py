"""Trainer pieces without servers: the teacher-forced passes, rows and batches, advantages, config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from shared.images import encode_image_data_url
from shared.schemas import ChatMessage, ImagePart, ImageURL, PromptRollout, Sample, TextPart
from shared.tiny_model import build_tiny_model
from shared.vlm import load_model, load_processor
from trainer.data import Example
from trainer.experience import Batch, Row, collate, make_rows
from trainer.policy import teacher_forced_logits

LN = math.log


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=3)


def _example(name: str, text: str, colour: tuple[int, int, int]) -> Example:
    image = Image.new("RGB", (64, 64), colour)
    parts = [
        ImagePart(type="image_url", image_url=ImageURL(url=encode_image_data_url(image))),
        TextPart(type="text", text=text),
    ]
    return Example(name, (ChatMessage(role="user", content=parts),), (image,), "red")


def _rollout(processor, example: Example, responses: list[list[int]]) -> PromptRollout:
    from trainer.experience import prompt_inputs

    ids = prompt_inputs(processor, example, {"clean": example.images})["clean"].input_ids.tolist()
    samples = [
        Sample(
            prompt_id=example.id,
            sample_index=i,
            token_ids=tokens,
            text="",
            logprobs=[0.0] * len(tokens),
            finish_reason="stop",
            policy_version=0,
        )
        for i, tokens in enumerate(responses)
    ]
    return PromptRollout(prompt_id=example.id, prompt_token_ids=ids, samples=samples)


def _clean_rows(processor, examples: list[Example]) -> tuple[list[Row], Batch]:
    """Two responses to prompt "a" and three to "b", of ordinary words (a vision placeholder in a response
    would break a whole-sequence reference pass), and their clean-pass batch."""
    words = processor.tokenizer("red green blue yellow purple orange circle square left right").input_ids
    responses = {"a": [words[0:4], words[4:5]], "b": [words[5:7], words[1:4], words[6:10]]}
    rollouts = [_rollout(processor, e, responses[e.id]) for e in examples]
    rewards = {(e.id, i): (0.0, {}) for e in examples for i in range(len(responses[e.id]))}
    rows = make_rows(processor, examples, rollouts, rewards, ["clean"], seed=0)
    return rows, collate(rows, ["clean"], processor.tokenizer.pad_token_id)


def test_prefix_shared_passes_equal_full_sequence_passes(tiny):
    """One pass per prompt plus cached continuations gives the logits of a pass per whole sequence."""
    processor = load_processor(tiny)
    model = load_model(tiny, dtype=torch.float32).eval()
    examples = [
        _example("a", "What colour is the shape?", (200, 30, 30)),
        _example("b", "Tell me, in one word, what colour fills this picture?", (30, 30, 200)),
    ]
    rows, batch = _clean_rows(processor, examples)
    with torch.no_grad():
        shared = teacher_forced_logits(
            model, batch.inputs["clean"], batch.owner, batch.response_ids, torch.float32
        )
        for b, row in enumerate(rows):
            prompt = row.prompt["clean"]
            ids = torch.cat([prompt.input_ids, torch.tensor(row.response_ids)])[None]
            types = torch.cat(
                [prompt.mm_token_type_ids, torch.zeros(len(row.response_ids), dtype=torch.long)]
            )
            full = model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                mm_token_type_ids=types[None],
                pixel_values=prompt.pixel_values,
                image_grid_thw=prompt.image_grid_thw,
            ).logits[0]
            length = len(row.response_ids)
            expected = full[len(prompt.input_ids) - 1 : len(prompt.input_ids) - 1 + length]
            torch.testing.assert_close(shared[b, :length], expected, atol=1e-5, rtol=1e-5)


def test_under_gradient_checkpointing_whole_sequences_give_the_shared_passes_logits_and_gradients(tiny):
    """Checkpointed layers keep no KV cache, so each response runs with its prompt: prompts with one and two
    images, their patches repeated per response, give the prefix-shared logits and the same gradient."""
    processor = load_processor(tiny)
    two = Image.new("RGB", (56, 84), (30, 200, 30))
    example_two = _example("b", "Which colours?", (30, 30, 200))
    parts = [
        *example_two.messages[0].content,
        ImagePart(type="image_url", image_url=ImageURL(url=encode_image_data_url(two))),
    ]
    example_two = Example("b", (ChatMessage(role="user", content=parts),), (*example_two.images, two), "blue")
    examples = [_example("a", "What colour is the shape?", (200, 30, 30)), example_two]
    _, batch = _clean_rows(processor, examples)
    gradients, logits = {}, {}
    for checkpointed in (False, True):
        model = load_model(tiny, dtype=torch.float32).train()
        if checkpointed:
            model.gradient_checkpointing_enable()
        out = teacher_forced_logits(
            model, batch.inputs["clean"], batch.owner, batch.response_ids, torch.float32
        )
        picked = out.log_softmax(-1).gather(-1, batch.response_ids[..., None])[..., 0]
        picked[batch.response_mask].sum().backward()
        logits[checkpointed] = out.detach()[batch.response_mask]
        gradients[checkpointed] = {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=1e-5)
    assert gradients[True].keys() == gradients[False].keys() and gradients[True]
    for name, gradient in gradients[True].items():
        torch.testing.assert_close(gradient, gradients[False][name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_stale_sample_is_clipped_against_its_behaviour_policy(tiny):
    """With max_staleness ≥ 1, ℓ_old is the rollout server's behaviour log-prob, so the ratio and the clip act
    on a sample an older version made; on-policy, the pass itself (detached) is ℓ_old and every ratio is 1."""
    from trainer.config import load_config
    from trainer.loop import old_logprobs
    from trainer.objective import clipped_policy_loss

    processor = load_processor(tiny)
    example = _example("a", "What colour is the shape?", (200, 30, 30))
    word = processor.tokenizer("red").input_ids[:1]
    rollout = _rollout(processor, example, [word, word])
    # An older version sampled the two responses with probability 1/4 and 1/8.
    for sample, logprob in zip(rollout.samples, (LN(0.25), LN(0.125)), strict=True):
        sample.logprobs = [logprob]
    rewards = {("a", 0): (1.0, {}), ("a", 1): (0.0, {})}
    rows = make_rows(processor, [example], [rollout], rewards, ["clean"], seed=0)
    batch = collate(rows, ["clean"], processor.tokenizer.pad_token_id)
    stale = load_config(None, ["train.max_staleness=1"])
    logp_old = old_logprobs(batch, rows, {}, stale)
    torch.testing.assert_close(logp_old, torch.tensor([[LN(0.25)], [LN(0.125)]]))
    assert old_logprobs(batch, rows, {}, load_config(None)) is None

    # The current policy gives the token probability 1/2: ρ = 2 and 4.
    logp = torch.full((2, 1), LN(0.5))
    mask = torch.ones((2, 1), dtype=torch.bool)
    # Â = +1 on both: −min(ρ, clip(ρ, 0.8, 1.2)) = −1.2 each; every token clipped.
    loss, clipped = clipped_policy_loss(logp, logp_old, torch.tensor([1.0, 1.0]), mask)
    assert loss.item() == pytest.approx(-1.2) and clipped.item() == 1.0
    # Â = −1 on both: max(ρ, 1.2) = 2 and 4; dual clip c = 3 caps the second: (2 + 3) / 2 = 2.5.
    loss, _ = clipped_policy_loss(logp, logp_old, torch.tensor([-1.0, -1.0]), mask, dual_clip=3.0)
    assert loss.item() == pytest.approx(2.5)
    # On-policy, ℓ_old = ℓ: ρ = 1, nothing clipped, L = −Â.
    loss, clipped = clipped_policy_loss(logp, logp.detach(), torch.tensor([1.0, 1.0]), mask)
    assert loss.item() == pytest.approx(-1.0) and clipped.item() == 0.0


def test_papos_masked_patches_are_the_vision_towers_patches(tiny):
    """I_mask is blackened on the 14-pixel grid of the image as the processor resizes it, so every patch the
    vision tower sees is either untouched or wholly black (PAPO's patch masking)."""
    import numpy as np

    from trainer.experience import pass_images, prompt_inputs

    processor = load_processor(tiny)
    noise = np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    example = _example("a", "What colour is the shape?", (0, 0, 0))
    example = Example(example.id, example.messages, (Image.fromarray(noise),), example.answer)
    rollout = _rollout(processor, example, [[1]])
    images = pass_images(processor, example, rollout, ["clean", "masked"], seed=4)
    inputs = prompt_inputs(processor, example, images)
    clean, masked = inputs["clean"], inputs["masked"]
    assert torch.equal(clean.image_grid_thw, masked.image_grid_thw)
    assert images["masked"][0].size == tuple(int(x) * 14 for x in clean.image_grid_thw[0, [2, 1]])
    changed = ~torch.isclose(clean.pixel_values, masked.pixel_values, atol=1e-5).all(dim=1)
    assert 0.3 < changed.float().mean() < 0.9  # p = 0.6 of the patches
    # A changed patch is black all over: one value per channel (3 channels × 2 frames × 14 × 14 pixels).
    per_channel = masked.pixel_values[changed].view(-1, 3, 2 * 14 * 14)
    assert torch.allclose(per_channel, per_channel[..., :1].expand_as(per_channel), atol=1e-5)


def test_the_config_reference_is_up_to_date():
    """docs/training-config.md is generated by `make docs`; a new or changed key must be regenerated."""
    from trainer.config import reference_markdown

    document = Path(__file__).resolve().parent.parent / "docs" / "training-config.md"
    assert document.read_text() == reference_markdown(), "run `make docs`"


def _rows_for(rewards: dict[str, list[float]]):
    from trainer.experience import Row

    return [
        Row(prompt_id=pid, prompt={}, response_ids=[1], rollout_logprobs=[0.0], reward=r)
        for pid, values in rewards.items()
        for r in values
    ]


def test_group_advantages_and_dropped_groups(monkeypatch):
    """Â = (r − mean)/(std + ε) per prompt: rewards [1, 0, 0, 0] have mean 0.25 and sample std 0.5."""
    import trainer.experience as experience
    from trainer.config import load_config
    from trainer.rollouts import ScoredBatch

    rows = _rows_for({"p": [1.0, 0.0, 0.0, 0.0], "q": [1.0, 1.0, 1.0, 1.0]})
    monkeypatch.setattr(experience, "make_rows", lambda *args: rows)
    batch = ScoredBatch(step=1, examples=[], rollouts=[], rewards={})
    kept, dropped, spare = experience.rows_with_advantages(None, batch, ("clean",), load_config(None))
    assert dropped == 0 and len(kept) == 8 and spare is rows[0]
    assert [round(r.advantage, 4) for r in kept[:4]] == [1.5, -0.5, -0.5, -0.5]
    assert [r.advantage for r in kept[4:]] == [0.0] * 4
    config = load_config(None, ["train.drop_uniform_groups=true"])
    kept, dropped, _ = experience.rows_with_advantages(None, batch, ("clean",), config)
    assert dropped == 1 and {r.prompt_id for r in kept} == {"p"}


def test_per_response_metrics_become_token_means_overall_and_per_group():
    from trainer.experience import Row
    from trainer.loop import TokenMeans

    def row(group: str | None, tokens: int) -> Row:
        return Row("p", {}, [1] * tokens, [0.0] * tokens, 0.0, group=group)

    means = TokenMeans(["colour", "count", "shape"])
    means.add("fraction", [row("colour", 2), row("colour", 6)], [0.5, 0.25])
    # A zero-row pass (a placeholder's values) adds nothing; a group outside the list counts overall only.
    means.add("fraction", [], [0.9])
    means.add("fraction", [row("shape", 4), row(None, 8)], [1.0, 0.0])
    # colour: (0.5·2 + 0.25·6) / 8 = 2.5 / 8; shape: 4 / 4; overall: (2.5 + 4 + 0) / 20; count: no tokens.
    got = means.over_ranks()
    assert got["fraction"] == pytest.approx(6.5 / 20)
    assert got["fraction/colour"] == pytest.approx(2.5 / 8) and got["fraction/shape"] == 1.0
    assert math.isnan(got["fraction/count"])
    assert set(got) == {"fraction", "fraction/colour", "fraction/count", "fraction/shape"}


def test_micro_batches_are_fixed_per_run():
    from trainer.config import load_config
    from trainer.loop import micro_batches_per_mini_batch

    # 16 prompts x 16 samples over 2 mini-batches of 128 rows: 4 micro-batches of 32 each.
    config = load_config(
        None,
        ["train.prompts_per_step=16", "rollout.n=16", "train.mini_batches=2", "train.micro_batch_size=32"],
    )
    assert micro_batches_per_mini_batch(config) == 4


def test_overrides_are_yaml_and_nested():
    from trainer.config import ConfigError, apply_overrides

    raw = apply_overrides(
        {"train": {"lr": 1.0}}, ["train.lr=3.0e-4", "rollout.urls=[http://a:1, http://b:2]", "x=null"]
    )
    assert raw == {"train": {"lr": 3e-4}, "rollout": {"urls": ["http://a:1", "http://b:2"]}, "x": None}
    with pytest.raises(ConfigError, match="train is not a section"):
        apply_overrides({"train": 3}, ["train.lr=1"])


def test_the_prompt_stream_is_seeded_and_restores(tmp_path):
    from shared.synth_data import SynthSettings, write_dataset
    from trainer.config import load_config
    from trainer.data import training_prompts

    data = write_dataset(tmp_path / "data", SynthSettings(train=12, test=4, seed=0, image_size=56))
    config = load_config(None, [f"data.path={data}", "seed=5"])

    def stream():
        return training_prompts(config)

    first = stream()
    ids = [e.id for e in first.take(8)]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 8
    state = first.state()
    after = [e.id for e in first.take(10)]  # crosses into the next epoch
    resumed = stream()
    resumed.restore(state)
    assert [e.id for e in resumed.take(10)] == after
    assert first.state()["epoch"] == 1


def test_views_follow_the_examples_group(tmp_path):
    """rollout.views_by names a column; its value picks each example's transforms, 'default' the rest."""
    from shared.synth_data import SynthSettings, write_dataset
    from trainer.config import load_config
    from trainer.data import DataError, training_prompts
    from trainer.rollouts import prompt_views

    data = write_dataset(tmp_path / "data", SynthSettings(train=24, test=4, seed=0, image_size=56))
    config = load_config(
        None,
        [
            f"data.path={data}",
            "rollout.views_by=task",
            "rollout.negative_transforms="
            "{colour: [grey_out], position: [mirror_average], default: [zoom_crop]}",
            "rollout.positive_transforms=[rotation]",
        ],
    )
    stream = training_prompts(config)
    assert stream.groups == ["colour", "count", "position", "shape"]
    examples = stream.take(24)
    assert {e.group for e in examples} == {"colour", "shape", "count", "position"}
    expected = {
        "colour": ["grey_out"],
        "position": ["mirror_average"],
        "shape": ["zoom_crop"],
        "count": ["zoom_crop"],
    }
    for example in examples:
        views = prompt_views(config, example, seed=9, kinds=("negative",))
        assert views.positive is None and views.negative is not None
        assert (views.negative.transforms, views.negative.seed) == (expected[example.group], 9)
        both = prompt_views(config, example, seed=9, kinds=("positive", "negative"))
        assert both.positive is not None and both.positive.transforms == ["rotation"]
    # Without a 'default' entry, a group not listed gets the official set (None).
    plain = load_config(None, ["rollout.views_by=task", "rollout.negative_transforms={colour: [grey_out]}"])
    assert plain.rollout.transforms("negative", "shape") is None
    with pytest.raises(
        DataError, match=r"views_by is 'colour_name', but the train split .* has no such column"
    ):
        training_prompts(load_config(None, [f"data.path={data}", "rollout.views_by=colour_name"]))


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["rollout.negative_transforms={colour: [grey_out]}"], "set views_by"),
        (["rollout.negative_transforms=[rotation]"], "'rotation' is not a negative transform"),
        (["rollout.views_by=task", "rollout.positive_transforms={colour: [grey_out]}"], "not a positive"),
    ],
)
def test_view_transforms_are_checked_with_the_config(overrides, named):
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=named):
        load_config(None, overrides)


def test_datasets_with_a_wrong_layout_are_refused(tmp_path):
    from trainer.config import DataConfig
    from trainer.data import DataError, load_split

    with pytest.raises(DataError, match=r"no train\.parquet, train\.jsonl or data/train-\*\.parquet"):
        load_split(str(tmp_path), "train", DataConfig())
    (tmp_path / "train.jsonl").write_text('{"problem": "<image>What?", "answer": "red"}\n')
    with pytest.raises(DataError, match=r"cannot tell the layout .* from its columns \(problem, answer\)"):
        load_split(str(tmp_path), "train", DataConfig())


def test_discovery_lists_every_address_of_a_name():
    from trainer.clients import discover_replicas

    assert discover_replicas("http://127.0.0.1:8123") == ["http://127.0.0.1:8123"]
    assert "http://127.0.0.1:8000" in discover_replicas("http://localhost:8000")


CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    from trainer.config import load_config

    load_config(path)


@pytest.mark.parametrize("algorithm", ["grpo", "papo"])
def test_the_baselines_differ_from_cppo_only_in_the_algorithm(algorithm):
    from trainer.config import load_config

    cppo = load_config(CONFIGS / "qwen2_5_vl_3b_virl39k.yaml").model_dump()
    other = load_config(CONFIGS / f"qwen2_5_vl_3b_virl39k_{algorithm}.yaml").model_dump()
    assert other["objective"].pop("algorithm") == algorithm and cppo["objective"].pop("algorithm") == "cppo"
    assert {k: v for k, v in other.items() if k != "run_dir"} == {
        k: v for k, v in cppo.items() if k != "run_dir"
    }


# --- one run per run folder ----------------------------------------------------------------------


def test_a_run_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    from trainer.rundir import RunExistsError, check_run_dir

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)  # inputs alone are no run
    assert check_run_dir(run, None, False) is None
    assert check_run_dir(run, "latest", False) is None  # nothing to continue yet: a new run starts
    assert check_run_dir(run, "elsewhere/step-000010", False) == "elsewhere/step-000010"
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunExistsError, match=r"already holds a run.*--resume.*--overwrite.*run\.replaced-"):
        check_run_dir(run, None, False)
    assert check_run_dir(run, "latest", False) == "latest"
    assert check_run_dir(run, None, True) is None
    with pytest.raises(ValueError, match="give one of them"):
        check_run_dir(run, "latest", True)


def test_overwrite_moves_the_earlier_run_aside_and_keeps_the_inputs(tmp_path):
    from trainer.rundir import move_aside

    run = tmp_path / "run"
    for folder in ("model", "data", "checkpoints/step-000200", "tensorboard", "logs"):
        (run / folder).mkdir(parents=True)
    for file in ("config.yaml", "metrics.jsonl", "learning_curves.png", "model/config.json"):
        (run / file).write_text(file)
    first = move_aside(run)
    assert first is not None and first.parent == tmp_path and first.name.startswith("run.replaced-")
    assert sorted(path.name for path in run.iterdir()) == ["data", "model"]
    assert (run / "model/config.json").read_text() == "model/config.json"
    moved = sorted(str(path.relative_to(first)) for path in first.rglob("*"))
    assert moved == [
        "checkpoints",
        "checkpoints/step-000200",
        "config.yaml",
        "learning_curves.png",
        "logs",
        "metrics.jsonl",
        "tensorboard",
    ]
    assert move_aside(run) is None  # nothing left to move
    (run / "config.yaml").write_text("second")
    second = move_aside(run)  # within the same second: a name of its own
    assert second is not None and second != first and (second / "config.yaml").read_text() == "second"
    assert (first / "config.yaml").read_text() == "config.yaml"


# --- what a run prints ---------------------------------------------------------------------------


def test_progress_and_evaluation_lines_fit_80_columns():
    from trainer.logs import evaluation_line, progress_line, tensorboard_name

    metrics = {"step": 120, "reward_mean": 0.8125, "accuracy_mean": 0.8, "cpl_loss": 0.69}
    line = progress_line(metrics, steps_per_second=0.5, steps_left=130)
    assert line == "0.50 step/s  eta 0:04:20  reward 0.812  acc 0.800"
    assert len(f"step 120/250 {'━' * 16} {line}") <= 80
    assert progress_line({"step": 0}, steps_per_second=float("nan"), steps_left=250) == ""
    evaluation = {
        "step": 100,
        "eval_accuracy_greedy": 1.0,
        "eval_accuracy_greedy_removed": 0.2,
        "eval_perception_gap": 0.8,
        "eval_accuracy_sampled": None,  # not measured: left out
    }
    assert evaluation_line(evaluation) == "eval at step 100: greedy 1.000  I⁻ 0.200  gap 0.800"
    names = ["reward_mean", "eval_accuracy_greedy", "seconds_train", "perception_token_fraction/colour"]
    assert [tensorboard_name(name) for name in names] == [
        "train/reward_mean",
        "eval/accuracy_greedy",
        "time/train",
        "train/perception_token_fraction/colour",
    ]


def test_evaluation_asks_for_no_more_prompts_than_the_split_has(tmp_path):
    from shared.synth_data import SynthSettings, write_dataset
    from trainer.config import load_config
    from trainer.data import DataError, evaluation_examples

    folder = write_dataset(tmp_path / "data", SynthSettings(train=8, test=8))
    config = load_config(None, [f"data.path={folder}", "data.tasks=[colour]"])
    assert len(evaluation_examples(config, 2)) == 2  # a quarter of the test split is the colour task
    refused = r"--prompts is 3, but the test split .* has 2 rows of tasks \['colour'\]; ask for at most 2"
    with pytest.raises(DataError, match=refused):
        evaluation_examples(config, 3, asked_by="--prompts")


def test_chance_accuracy_guesses_among_each_groups_answers():
    from trainer.evaluate import chance_accuracy

    def example(answer: str, group: str | None) -> Example:
        return Example(id=answer, messages=(), images=(), answer=answer, group=group)

    # Colour: 3 distinct answers over 4 examples (1/3 each); shape: 2 (1/2 each).
    examples = [example(a, "colour") for a in ("red", "blue", "green", "red")]
    examples += [example(a, "shape") for a in ("circle", "square")]
    assert chance_accuracy(examples) == pytest.approx((4 / 3 + 2 / 2) / 6)
    assert chance_accuracy([example(a, None) for a in ("1", "2", "2", "3")]) == pytest.approx(1 / 3)
    assert math.isnan(chance_accuracy([]))


def test_the_learning_curves_plot_draws_every_panel(tmp_path):
    from trainer.logs import plot_curves

    losses = {"cpl_loss": 0.69, "kl_loss": None, "grad_norm": 1.0, "lr": 1e-3}
    metrics = [{"step": step, "reward_mean": 0.1 * step, **losses} for step in range(1, 4)]
    metrics[0] |= {"eval_accuracy_greedy": 0.2, "eval_accuracy_greedy_removed": 0.2}
    metrics[0] |= {"eval_chance_accuracy": 1 / 6}
    out = plot_curves(metrics, tmp_path / "curves.png", "demo: CPPO, seed 0")
    assert out.stat().st_size > 10_000


def test_score_items_carry_the_prompt_source_and_metadata_and_the_sources_reward():
    from shared.schemas import Sample
    from trainer.config import load_config
    from trainer.data import Example
    from trainer.rollouts import score_item

    config = load_config(None, ["reward.by_source={chartqa: exact, geo: {math: 0.5, format: 0.5}}"])
    sample = Sample(
        prompt_id="q", sample_index=3, sampled_on="clean", token_ids=[1], text="red", logprobs=[-0.1],
        finish_reason="stop", policy_version=0,
    )  # fmt: skip

    def item(source: str | None):
        example = Example(
            "q", (), (), "red", prompt="<image>Colour?", data_source=source, metadata={"level": 2}
        )
        return score_item(config, example, sample)

    chart = item("chartqa")
    assert (chart.id, chart.response, chart.ground_truth, chart.reward) == ("q/3", "red", "red", "exact")
    assert (chart.prompt, chart.data_source, chart.metadata) == ("<image>Colour?", "chartqa", {"level": 2})
    assert item("geo").reward == {"math": 0.5, "format": 0.5}
    assert item("other").reward == item(None).reward == {"math": 0.9, "format": 0.1}  # reward.reward
