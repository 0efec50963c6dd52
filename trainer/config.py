"""The training configuration: one validated schema, read from YAML with ``key=value`` overrides.

Every field has a default, a type and a one-line description (``cppo train --help-config`` prints them
all). A bad key or value stops the run with a message naming it, before anything starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from shared.perturbations import TRANSFORMS_BY_KIND
from shared.schemas import MAX_SAMPLES_PER_PROMPT, MAX_TOKENS, ImageVariant
from trainer.objective import ObjectiveConfig

# The paper's instruction (CPPO, following PAPO and Vision-R1): reason in <think>, answer in \boxed{}.
PAPER_INSTRUCTION = (
    " You FIRST think about the reasoning process as an internal monologue and then provide the final "
    "answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST "
    "BE put in \\boxed{}."
)


Transforms = list[str] | dict[str, list[str] | None] | None
"""Transform names for every example, or by the value of the ``views_by`` column."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSettings(Section):
    r: int = Field(default=8, ge=1, description="Rank of each adapter's update B·A.")
    alpha: float = Field(default=16.0, gt=0, description="Scale of the update: W + (alpha / r)·B·A.")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Linear layers that get an adapter, by the last part of their name (Qwen-VL's language "
        "model: q_proj … down_proj); matched in the vision tower too unless model.freeze_vision.",
    )


class ModelConfig(Section):
    path: str = Field(default="runs/demo/model", description="Policy to start from: a HF folder or hub id.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="Training precision; auto is bf16 on GPU and fp32 on CPU."
    )
    gradient_checkpointing: bool = Field(default=False, description="Trade compute for activation memory.")
    lora: LoraSettings | None = Field(
        default=None,
        description="Train a LoRA adapter (PEFT) on the frozen model instead of every weight; null is full "
        "fine-tuning. `lora: {}` takes the defaults below. The reference policy is then the model with its "
        "adapter off: no second copy. docs/lora.md.",
    )
    freeze_vision: bool = Field(
        default=False,
        description="Keep the vision tower (patch embedding and blocks, not the merger) as it is: no "
        "gradient, and no adapter with lora.",
    )
    freeze_merger: bool = Field(
        default=False,
        description="Keep the vision-to-language merger (projector) as it is; otherwise it trains whole, "
        "with lora too.",
    )


ColumnRole = Literal["problem", "answer", "images", "id", "data_source"]
"""What a dataset column holds, for ``data.columns``."""


class DataConfig(Section):
    path: str = Field(
        default="runs/demo/data",
        description="The dataset as published: a folder (parquet or jsonl files, a hub snapshot, a "
        "save_to_disk folder), one data file, or a hub dataset name. Its layout (EasyR1, ViRL39K, verl) is "
        "detected from its columns: docs/data.md.",
    )
    columns: dict[ColumnRole, str] | None = Field(
        default=None,
        description="The columns holding problem, answer, images (and optionally id, data_source), for a "
        "layout that is not detected, e.g. {problem: question, answer: solution, images: image}.",
    )
    train_split: str = Field(default="train", description="Split to train on.")
    test_split: str = Field(
        default="test", description="Split to evaluate on (of eval.data where that is set)."
    )
    instruction: str = Field(
        default=PAPER_INSTRUCTION,
        description="Appended to every problem; the paper's by default. A verl prompt, which holds its own, "
        "is left as it is.",
    )
    tasks: list[str] | None = Field(
        default=None, description="Keep only rows whose `task` column is one of these; null keeps all."
    )
    shuffle: bool = Field(default=True, description="Shuffle the training split each epoch (seeded).")
    min_pixels: int | None = Field(
        default=None,
        ge=1,
        description="Fewest pixels of an image sent to the model (Qwen-VL's min_pixels); null is the "
        "model processor's own.",
    )
    max_pixels: int | None = Field(
        default=None,
        ge=1,
        description="Most pixels of an image sent to the model (Qwen-VL's max_pixels); null is the model "
        "processor's own. Larger images are scaled down by the trainer, before the rollout server sees them.",
    )
    max_skip_fraction: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="Bad examples (an image that does not decode or is too large, a prompt the rollout "
        "server refuses) are skipped and counted; past this fraction of the split the run stops.",
    )

    @model_validator(mode="after")
    def _pixels_in_order(self) -> DataConfig:
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError("data.min_pixels cannot exceed data.max_pixels")
        return self


class RolloutConfig(Section):
    urls: list[str] = Field(
        default_factory=lambda: ["http://127.0.0.1:8000"], description="Base URLs of the rollout replicas."
    )
    discover: str | None = Field(
        default=None,
        description="One base URL whose host resolves to every ready replica (a headless Service), "
        "re-resolved every step; replaces urls. A name that does not resolve means no replica is ready "
        "yet: waited for up to ready_timeout_s at the start, and as an outage (outage_s) mid-run.",
    )
    api_key: SecretStr | None = Field(
        default_factory=lambda: _env_secret("CPPO_ROLLOUT_API_KEY"),
        description="Bearer key of the rollout servers; defaults to $CPPO_ROLLOUT_API_KEY.",
    )
    n: int = Field(
        default=8, ge=2, le=MAX_SAMPLES_PER_PROMPT, description="Responses per prompt (group size G)."
    )
    temperature: float = Field(default=1.0, gt=0, le=2, description="Sampling temperature T.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_tokens: int = Field(default=1024, ge=1, le=MAX_TOKENS, description="Most tokens per response.")
    views_by: str | None = Field(
        default=None,
        description="A dataset column (e.g. task) whose value picks each example's transforms from the "
        "by-value forms of positive_transforms and negative_transforms.",
    )
    positive_transforms: Transforms = Field(
        default=None,
        description="I⁺ transforms to draw from: a list, or lists by views_by value ('default' for the "
        "rest); null is the official set.",
    )
    negative_transforms: Transforms = Field(
        default=None,
        description="I⁻ transforms to draw from: a list, or lists by views_by value ('default' for the "
        "rest); null is the official set.",
    )
    timeout_s: float = Field(default=600.0, gt=0, description="Seconds one rollout request may take.")
    attempts: int = Field(
        default=4, ge=1, le=20, description="Tries per request before a replica is skipped."
    )
    outage_s: float = Field(
        default=120.0,
        ge=0,
        description="Seconds to wait for a replica to come back once every one has failed, before the run "
        "stops (the step's requests are retried then).",
    )
    ready_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="Seconds to wait at the start for a replica to answer /ready (and for discover's name to "
        "resolve); the wait is logged every 30 s.",
    )

    @field_validator("positive_transforms", "negative_transforms")
    @classmethod
    def _known_transforms(cls, transforms: Transforms, info: ValidationInfo) -> Transforms:
        kind = info.field_name.removesuffix("_transforms")
        lists = transforms.values() if isinstance(transforms, dict) else [transforms]
        for names in lists:
            for name in names or ():
                if name not in TRANSFORMS_BY_KIND[kind]:
                    raise ValueError(
                        f"{name!r} is not a {kind} transform; choose from {list(TRANSFORMS_BY_KIND[kind])}"
                    )
        return transforms

    @model_validator(mode="after")
    def _by_value_needs_a_column(self) -> RolloutConfig:
        for kind in ("positive", "negative"):
            if isinstance(getattr(self, f"{kind}_transforms"), dict) and self.views_by is None:
                raise ValueError(
                    f"{kind}_transforms gives lists by value: set views_by to the column they follow"
                )
        return self

    def transforms(self, kind: str, group: str | None) -> list[str] | None:
        """The ``kind`` transforms of an example whose ``views_by`` column holds ``group``; None is the
        official set."""
        transforms: Transforms = getattr(self, f"{kind}_transforms")
        if isinstance(transforms, dict):
            return transforms.get(str(group), transforms.get("default"))
        return transforms


class RewardConfig(Section):
    url: str = Field(default="http://127.0.0.1:5000", description="Base URL of the reward server.")
    api_key: SecretStr | None = Field(
        default_factory=lambda: _env_secret("CPPO_REWARD_API_KEY"),
        description="Bearer key of the reward server; defaults to $CPPO_REWARD_API_KEY.",
    )
    reward: str | dict[str, float] = Field(
        default_factory=lambda: {"math": 0.9, "format": 0.1},
        description="Reward function name, or weights per name; the paper's 0.9·math + 0.1·format.",
    )
    by_source: dict[str, str | dict[str, float]] = Field(
        default_factory=dict,
        description="The reward of the examples of one data_source (the dataset's data_source column, or "
        "ViRL39K's source), in place of reward.reward: e.g. {chartqa: exact, geometry3k: {math: 1.0}}.",
    )
    accuracy: str = Field(default="math", description="The reward component logged as accuracy.")
    timeout_s: float = Field(default=120.0, gt=0, description="Seconds one scoring request may take.")
    outage_s: float = Field(
        default=120.0,
        ge=0,
        description="Seconds to keep retrying a scoring request while the server fails or is unreachable "
        "(backing off, or as its Retry-After says), before the run stops.",
    )
    ready_timeout_s: float = Field(
        default=600.0, gt=0, description="Seconds to wait for the reward server's workers."
    )

    def for_source(self, data_source: str | None) -> str | dict[str, float]:
        """The reward of an example from ``data_source``."""
        return self.by_source.get(data_source, self.reward) if data_source else self.reward


class TrainLoopConfig(Section):
    steps: int = Field(default=500, ge=1, description="Training steps (one rollout batch each).")
    prompts_per_step: int = Field(default=16, ge=1, description="Prompts per step, over all ranks.")
    mini_batches: int = Field(default=1, ge=1, description="Optimizer steps per training step.")
    micro_batch_size: int = Field(default=64, ge=1, description="Sequences per forward/backward pass.")
    drop_uniform_groups: bool = Field(
        default=False, description="Drop groups whose rewards are all equal (they carry no advantage)."
    )
    max_staleness: int = Field(
        default=0,
        ge=0,
        le=8,
        description="Policy versions a sample may lag behind; 0 is on-policy. From 1 on, the ratio is taken "
        "against the behaviour log-probs.",
    )
    tis_cap: float | None = Field(
        default=None,
        gt=0,
        description="Truncated importance-sampling cap on trainer/rollout ratios; null is off.",
    )
    lr: float = Field(default=1e-6, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field(default=(0.9, 0.999), description="AdamW betas.")
    warmup_steps: int = Field(
        default=0, ge=0, description="Linear learning-rate warm-up, in optimizer steps."
    )
    grad_clip: float = Field(default=1.0, gt=0, description="Gradient norm clip.")


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(default=0, description="ZeRO stage.")
    offload: bool = Field(
        default=False, description="Offload optimizer states (and ZeRO-3 parameters) to CPU."
    )
    config_file: str | None = Field(
        default=None,
        description=(
            'A DeepSpeed JSON config, read the Hugging Face Accelerate way ("auto" takes this config\'s '
            "value); default: the one accelerate launch names, if any."
        ),
    )

    @field_validator("config_file")
    @classmethod
    def _is_a_file(cls, path: str | None) -> str | None:
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{path} is not a file")
        return path


class SyncConfig(Section):
    mode: Literal["reference", "value", "broadcast"] = Field(
        default="value",
        description="reference: a safetensors folder on shared storage; value: the weights in the request; "
        "broadcast: a collective broadcast from the trainer's rank 0 to the replicas (gloo on CPU, NCCL on "
        "GPU), HTTP only coordinating.",
    )
    broadcast_port: int = Field(
        default=29600,
        ge=0,
        le=65535,
        description="For mode=broadcast: the port of the TCP store the replicas join the trainer's group "
        "through (0: any free port, for runs on one machine).",
    )
    dir: str | None = Field(
        default=None,
        description="Shared folder for mode=reference, as the replicas see it; default run_dir/weights.",
    )
    keep: int = Field(default=2, ge=1, description="Published versions kept in dir.")
    timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="Seconds a replica may take to load weights (for mode=broadcast: to join the group, "
        "and for each bucket).",
    )


class CheckpointConfig(Section):
    every: int = Field(default=50, ge=0, description="Steps between checkpoints; 0 only at the end.")
    keep: int = Field(default=2, ge=1, description="Checkpoints kept.")


class EvalConfig(Section):
    every: int = Field(default=25, ge=0, description="Steps between evaluations; 0 is never.")
    prompts: int = Field(default=100, ge=1, description="Test prompts per evaluation.")
    data: str | None = Field(
        default=None,
        description="Evaluate on this dataset (its data.test_split, or its only split) instead of "
        "data.path's test split.",
    )
    holdout: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Hold this fraction of the training split out of training and evaluate on it (for "
        "datasets with no test split, such as ViRL39K); 0 is off.",
    )
    samples: int = Field(
        default=4, ge=1, le=MAX_SAMPLES_PER_PROMPT, description="k of avg@k (sampled accuracy)."
    )
    removed_view: ImageVariant = Field(
        default="negative", description="The view whose greedy accuracy the perception gap subtracts."
    )
    inspect_prompts: int = Field(
        default=4,
        ge=0,
        le=16,
        description="Test prompts whose perception tokens (the picture of `cppo inspect`) are drawn to "
        "TensorBoard and wandb at every evaluation; 0 is none.",
    )


class LogConfig(Section):
    tensorboard: bool = Field(default=True, description="Write TensorBoard events to run_dir/tensorboard.")
    wandb_project: str | None = Field(default=None, description="Log to this wandb project too; null is off.")
    progress: bool = Field(
        default=True, description="Show progress: a bar on a terminal, else a plain line now and then."
    )


class TrainConfig(Section):
    run_dir: Path = Field(default=Path("runs/demo"), description="Checkpoints, metrics and plots go here.")
    seed: int = Field(default=0, ge=0, description="Seeds data order, sampling and perturbations.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The policy.")
    data: DataConfig = Field(default_factory=DataConfig, description="The dataset.")
    rollout: RolloutConfig = Field(
        default_factory=RolloutConfig, description="Rollout replicas and sampling."
    )
    reward: RewardConfig = Field(default_factory=RewardConfig, description="The reward server.")
    objective: ObjectiveConfig = Field(
        default_factory=ObjectiveConfig, description="Algorithm and coefficients."
    )
    train: TrainLoopConfig = Field(default_factory=TrainLoopConfig, description="Batch sizes and optimizer.")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="DeepSpeed engine.")
    sync: SyncConfig = Field(default_factory=SyncConfig, description="Weight publication.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Periodic evaluation.")
    log: LogConfig = Field(default_factory=LogConfig, description="Logging.")

    @field_validator("run_dir")
    @classmethod
    def _run_dir_not_empty(cls, run_dir: Path) -> Path:
        if str(run_dir) in ("", "."):
            raise ValueError("run_dir must name a folder of its own")
        return run_dir

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.train.mini_batches > self.train.prompts_per_step:
            raise ValueError("train.mini_batches cannot exceed train.prompts_per_step")
        if self.eval.holdout and self.eval.data:
            raise ValueError("set eval.holdout or eval.data, not both")
        if self.eval.removed_view == "clean":
            raise ValueError("eval.removed_view must be a perturbed view: positive or negative")
        return self

    def sync_dir(self) -> Path:
        return Path(self.sync.dir) if self.sync.dir else self.run_dir / "weights"


class ConfigError(ValueError):
    """A configuration problem, worded for the command line."""


def _env_secret(name: str) -> SecretStr | None:
    value = os.environ.get(name)
    return SecretStr(value) if value else None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``a.b=value`` sets ``raw["a"]["b"]``; the value is read as YAML (numbers, lists, null)."""
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} must look like key=value (e.g. train.lr=1e-5)")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"{key}: the value {text!r} is not valid YAML: {error}") from error
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {part} is not a section")
            node = child
        node[leaf] = value
    return raw


def load_config(path: Path | None, overrides: list[str] = ()) -> TrainConfig:
    """The validated configuration: defaults, then the YAML file, then the overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as error:
            raise ConfigError(f"cannot read the config {path}: {error.strerror}") from error
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from error
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, not a {type(loaded).__name__}")
        raw = loaded or {}
    raw = apply_overrides(raw, list(overrides))
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(describe_errors(error, path)) from error


def describe_errors(error: ValidationError, path: Path | None) -> str:
    where = f" in {path}" if path else ""
    lines = [f"invalid training config{where}:"]
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = "unknown key" if problem["type"] == "extra_forbidden" else problem["msg"]
        given = "" if problem["type"] in ("extra_forbidden", "missing") else f" (got {problem['input']!r})"
        lines.append(f"  {key}: {message}{given}")
    return "\n".join(lines)


def describe_fields(
    model: type[BaseModel] = TrainConfig, prefix: str = ""
) -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for every field, nested sections flattened to dotted keys."""
    rows = []
    defaults = model()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        value = getattr(defaults, name)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(describe_fields(annotation, f"{prefix}{name}."))
            continue
        if (section := _optional_section(annotation)) is not None:
            # A section that is off unless given (model.lora): listed, then its keys with their defaults.
            rows.append((f"{prefix}{name}", f"{section.__name__} | None", "None", field.description or ""))
            rows.extend(describe_fields(section, f"{prefix}{name}."))
            continue
        shown = (
            "(secret)"
            if isinstance(value, SecretStr)
            else repr(value.__str__() if isinstance(value, Path) else value)
        )
        rows.append((f"{prefix}{name}", _type_name(annotation), shown, field.description or ""))
    return rows


def _optional_section(annotation: Any) -> type[BaseModel] | None:
    """``X`` of an ``X | None`` field whose ``X`` is a section, else None."""
    if get_origin(annotation) not in (Union, UnionType):
        return None
    sections = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return sections[0] if len(sections) == 1 and type(None) in get_args(annotation) else None


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is not None:
        return str(annotation).replace("typing.", "").replace("pathlib.", "")
    return getattr(annotation, "__name__", None) or str(annotation)


def reference_markdown() -> str:
    """The configuration reference (docs/training-config.md), generated from the schema itself."""
    lines = [
        "# Training configuration",
        "",
        "Generated from `trainer/config.py` by `make docs`; do not edit by hand. Every key can be set in",
        "the YAML file (nested sections) or on the command line as `section.key=value` (read as YAML).",
        "",
        "| key | type | default | description |",
        "|---|---|---|---|",
    ]
    for key, kind, default, description in describe_fields():
        cells = [f"`{key}`", f"`{kind}`".replace("|", "\\|"), f"`{default}`".replace("|", "\\|"), description]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
