"""The wire schemas of the three services, defined once and imported by both sides of every call.

* trainer -> rollout server: ``POST /v1/rollouts`` (:class:`RolloutRequest` -> :class:`RolloutResponse`),
  ``POST /v1/weights`` (:class:`WeightsUpdate` -> :class:`WeightsStatus`) and ``POST /v1/weights/broadcast``
  (:class:`WeightsBroadcast` -> :class:`WeightsStatus`);
* trainer -> reward server: ``POST /v1/score`` (:class:`ScoreRequest` -> :class:`ScoreResponse`), and
  OpenRLHF's remote reward protocol, ``POST /get_reward``
  (:class:`OpenRLHFRewardRequest` -> :class:`OpenRLHFRewardResponse`);
* every service: :class:`Health`, :class:`Readiness`, and :class:`ErrorResponse` as the body of a 4xx.

Models we own forbid unknown fields, so a misspelled field is a 422 that names it rather than a setting
silently ignored. The OpenAI-compatible chat models and the OpenRLHF models ignore unknown fields,
since their clients send fields we have no use for.

Every list and string is bounded by the constants below; they bound what a single field may hold, and
the HTTP layer bounds the size of a whole request body.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    Tag,
    ValidationInfo,
    field_validator,
    model_serializer,
)

from shared.perturbations import SEED_LIMIT, TRANSFORMS_BY_KIND, ViewSpec

MAX_PROMPTS_PER_REQUEST = 1024
"""Prompts in one rollout request."""
MAX_SAMPLES_PER_PROMPT = 64
"""Samples drawn per prompt and image variant (``RolloutRequest.n``)."""
MAX_TOKENS = 32768
"""Tokens one sample may generate."""
MAX_PROMPT_TOKENS = 131_072
"""Tokens of one prompt, image tokens included."""
MAX_TEXT_CHARS = 1_000_000
"""Characters of one text: a message, a response, a ground truth."""
MAX_MESSAGES = 256
"""Messages in one conversation."""
MAX_CONTENT_PARTS = 256
"""Content parts in one message."""
MAX_IMAGES_PER_PROMPT = 32
"""Images across all messages of one prompt."""
MAX_IMAGE_URL_CHARS = 30_000_000
"""Characters of one image URL: a base64 data: URL of a 20 MiB file, with room for its header."""
MAX_VIEWS_PER_PROMPT = 3 * MAX_IMAGES_PER_PROMPT
"""Views returned for one prompt: one per image and perturbation kind."""
MAX_TRANSFORMS = 16
"""Transforms named in one view request."""
MAX_STOP_SEQUENCES = 16
"""Stop strings in one sampling request."""
MAX_STOP_CHARS = 256
"""Characters of one stop string."""
MAX_ID_CHARS = 256
"""Characters of a prompt or score item id."""
MAX_NAME_CHARS = 128
"""Characters of a name: a transform, a reward function, a log key, an error code."""
MAX_PATH_CHARS = 4096
"""Characters of a filesystem path."""
MAX_DETAIL_CHARS = 16_384
"""Characters of a human-readable detail or error message."""
MAX_SCORE_ITEMS = 10_000
"""Items in one score request, and queries in one OpenRLHF reward request."""
MAX_REWARD_COMPONENTS = 64
"""Reward functions weighted in one item, components in one result, keys in a ``meta`` or log dict."""
MAX_METADATA_ENTRIES = 64
"""Most entries of a score item's ``metadata``."""
MAX_METADATA_CHARS = 4096
"""Longest text value of a score item's ``metadata``."""
MAX_TEMPERATURE = 2.0
"""Highest sampling temperature, as in the OpenAI API."""
MIN_TEMPERATURE = 0.01
"""Lowest temperature above 0: below it, the logits divided by it overflow (0 itself is greedy)."""
MIN_TOP_P = 0.001
"""Lowest top-p: below it, the nucleus underflows to no token at all."""
MAX_REWARD_WEIGHT = 1e6
"""Largest weight of a reward function, in absolute value, so that the weighted sum stays finite."""
MAX_TOP_K = 1 << 20
"""Highest top-k; above any vocabulary size in use."""
TOKEN_ID_LIMIT = 2**31
"""Token ids are in ``[0, TOKEN_ID_LIMIT)``: they fit an int32, and vocabularies are far smaller."""

ImageVariant = Literal["clean", "positive", "negative"]
"""Which image a sample was drawn on: the original, or one of its perturbed views."""
IMAGE_VARIANTS: tuple[str, ...] = get_args(ImageVariant)

Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME_CHARS)]
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]

VISION_PLACEHOLDER_TOKENS: tuple[str, ...] = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
"""The Qwen-VL markers of where an image's (or a video's) tokens go. The server writes them for each image
part; written in a message's text, they claim images that are not there (the processor raises on them).
Sampled in a response, the next teacher-forced pass over it would fail the same way, so the rollout
backends never sample them either (``shared.vlm.suppressed_token_ids``)."""
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
MetadataValue = (
    Annotated[str, StringConstraints(max_length=MAX_METADATA_CHARS)] | bool | int | FiniteFloat | None
)
"""One value of a score item's metadata: a scalar, so that it fits a dataset column as published."""


def _no_vision_placeholders(text: str) -> str:
    for token in VISION_PLACEHOLDER_TOKENS:
        if token in text:
            raise ValueError(f"the text holds {token}, a vision placeholder; send images as image_url parts")
    return text


MessageText = Annotated[Text, AfterValidator(_no_vision_placeholders)]
"""A message's text: any text but the vision placeholders, which only the server writes."""


def _temperature(value: float) -> float:
    if 0 < value < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}; {value} overflows the logits")
    return value


Temperature = Annotated[float, Field(ge=0.0, le=MAX_TEMPERATURE), AfterValidator(_temperature)]
TopP = Annotated[float, Field(ge=MIN_TOP_P, le=1.0)]
RewardWeight = Annotated[float, Field(ge=-MAX_REWARD_WEIGHT, le=MAX_REWARD_WEIGHT, allow_inf_nan=False)]
TokenId = Annotated[int, Field(ge=0, lt=TOKEN_ID_LIMIT)]
Version = Annotated[int, Field(ge=0)]
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT)]


def _refuse_duplicates(ids: list[str], name: str) -> None:
    seen: set[str] = set()
    for value in ids:
        if value in seen:
            raise ValueError(f"{name} {value!r} appears more than once")
        seen.add(value)


class _Owned(BaseModel):
    """A model of our own API: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid")


class _Compatible(BaseModel):
    """A model of someone else's protocol: unknown fields are dropped."""

    model_config = ConfigDict(extra="ignore")


# --- chat content (OpenAI format) -----------------------------------------------------------------


class TextPart(_Compatible):
    """A text part of a message's content."""

    type: Literal["text"] = Field(description="Always 'text'.")
    text: MessageText = Field(description="The text.")


class ImageURL(_Compatible):
    """Where an image part's image is."""

    url: str = Field(
        min_length=1,
        max_length=MAX_IMAGE_URL_CHARS,
        description="A data:image/{png,jpeg,webp};base64 URL, or a file:// URL where the server allows one.",
    )
    detail: Literal["auto", "low", "high"] = Field(
        default="auto", description="OpenAI's resolution hint; accepted for compatibility."
    )


class ImagePart(_Compatible):
    """An image part of a message's content."""

    type: Literal["image_url"] = Field(description="Always 'image_url'.")
    image_url: ImageURL = Field(description="The image.")


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


def _content_kind(content: Any) -> str:
    """Which way a message's content is written: ``text`` or a list of ``parts``."""
    return "text" if isinstance(content, str) else "parts"


# Tagged, so that an error is reported once, under 'content.parts.<i>' or 'content.text', rather than
# once for each way the content could have been read.
MessageContent = Annotated[
    Annotated[MessageText, Tag("text")]
    | Annotated[list[ContentPart], Field(max_length=MAX_CONTENT_PARTS), Tag("parts")],
    Discriminator(_content_kind),
]


class ChatMessage(_Compatible):
    """One message of a conversation, in the OpenAI chat format."""

    role: Literal["system", "user", "assistant"] = Field(description="Who speaks.")
    content: MessageContent = Field(
        description="Plain text, or a list of text and image parts in reading order."
    )

    def image_urls(self) -> list[str]:
        """The URLs of the message's images, in order."""
        if isinstance(self.content, str):
            return []
        return [part.image_url.url for part in self.content if isinstance(part, ImagePart)]


# --- sampling ------------------------------------------------------------------------------------


class SamplingParams(_Owned):
    """How responses are sampled."""

    temperature: Temperature = Field(
        default=1.0, description="Softmax temperature: 0 is greedy, any other value at least 0.01."
    )
    top_p: TopP = Field(default=1.0, description="Nucleus sampling mass; 1 is off.")
    top_k: int = Field(
        default=-1, ge=-1, le=MAX_TOP_K, description="Sample among the k likeliest tokens; -1 is off."
    )
    max_tokens: int = Field(default=256, ge=1, le=MAX_TOKENS, description="Most tokens a sample generates.")
    stop: list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]] = Field(
        default_factory=list,
        max_length=MAX_STOP_SEQUENCES,
        description="Strings that end a sample; the stop string is not part of the text.",
    )
    seed: Seed | None = Field(
        default=None, description="Seed for reproducible sampling; none draws fresh randomness."
    )

    @field_validator("top_k")
    @classmethod
    def _top_k_not_zero(cls, top_k: int) -> int:
        # Engines disagree on what 0 means; one spelling of "off" avoids the question.
        if top_k == 0:
            raise ValueError("top_k must be -1 (off) or at least 1, not 0")
        return top_k


# --- views ---------------------------------------------------------------------------------------


class ViewRecipe(_Owned):
    """Which perturbed view of each image to make."""

    transforms: list[Name] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_TRANSFORMS,
        description="Transforms to draw one from; none means the kind's default set.",
    )
    seed: Seed | None = Field(
        default=None, description="Seed of the perturbation; none derives one per prompt and image."
    )


class RequestedViews(_Owned):
    """The perturbed views to make of each prompt's images; a null kind is not made."""

    positive: ViewRecipe | None = Field(
        default_factory=ViewRecipe, description="Information-preserving view (I+), or null for none."
    )
    negative: ViewRecipe | None = Field(
        default_factory=ViewRecipe, description="Information-removing view (I-), or null for none."
    )

    @field_validator("positive", "negative")
    @classmethod
    def _transforms_of_kind(cls, view: ViewRecipe | None, info: ValidationInfo) -> ViewRecipe | None:
        if view is None or view.transforms is None:
            return view
        allowed = TRANSFORMS_BY_KIND[info.field_name]
        for name in view.transforms:
            if name not in allowed:
                raise ValueError(
                    f"{name!r} is not a {info.field_name} transform; choose from {list(allowed)}"
                )
        return view


class PerturbedView(_Owned):
    """One perturbed view of one of a prompt's images, and how it was made."""

    kind: Literal["positive", "negative", "masked"] = Field(description="The perturbation kind.")
    image_index: int = Field(
        default=0,
        ge=0,
        lt=MAX_IMAGES_PER_PROMPT,
        description="Which of the prompt's images, counted in reading order from 0.",
    )
    image_url: str = Field(
        max_length=MAX_IMAGE_URL_CHARS, description="The view, as a data:image/png;base64 URL."
    )
    spec: ViewSpec = Field(description="Kind, transform, drawn parameters and seed; rebuilds the view.")

    @field_validator("image_url")
    @classmethod
    def _data_url(cls, url: str) -> str:
        if not url.startswith("data:image/"):
            raise ValueError("a view's image_url must be a data:image/... URL")
        return url

    @field_validator("spec")
    @classmethod
    def _spec_of_kind(cls, spec: ViewSpec, info: ValidationInfo) -> ViewSpec:
        kind = info.data.get("kind")
        if kind is not None and spec.kind != kind:
            raise ValueError(f"spec.kind is {spec.kind!r} but the view's kind is {kind!r}")
        return spec


# --- rollouts ------------------------------------------------------------------------------------


class RolloutPrompt(_Owned):
    """One prompt to sample responses to."""

    prompt_id: Id = Field(description="The caller's id for the prompt, unique within a request.")
    messages: list[ChatMessage] = Field(
        min_length=1, max_length=MAX_MESSAGES, description="The conversation to continue."
    )
    views: RequestedViews | None = Field(
        default=None,
        description="This prompt's perturbed views, in place of the request's `views`, so that one request "
        "can hold prompts that need different transforms; absent or null takes the request's.",
    )

    @field_validator("messages")
    @classmethod
    def _image_count(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        count = sum(len(message.image_urls()) for message in messages)
        if count > MAX_IMAGES_PER_PROMPT:
            raise ValueError(
                f"the messages hold {count} images, more than the limit of {MAX_IMAGES_PER_PROMPT}"
            )
        return messages

    def image_urls(self) -> list[str]:
        """The URLs of the prompt's images, in reading order: ``PerturbedView.image_index`` counts in it."""
        return [url for message in self.messages for url in message.image_urls()]


class RolloutRequest(_Owned):
    """``POST /v1/rollouts``: sample ``n`` responses per prompt and per image variant in ``sample_on``."""

    prompts: list[RolloutPrompt] = Field(
        min_length=1, max_length=MAX_PROMPTS_PER_REQUEST, description="The prompts; ids unique."
    )
    n: int = Field(
        default=1, ge=1, le=MAX_SAMPLES_PER_PROMPT, description="Samples per prompt and per image variant."
    )
    sampling: SamplingParams = Field(default_factory=SamplingParams, description="How to sample.")
    views: RequestedViews = Field(
        default_factory=RequestedViews, description="Perturbed views to make and return with each prompt."
    )
    sample_on: list[ImageVariant] = Field(
        default_factory=lambda: ["clean"],
        min_length=1,
        max_length=len(IMAGE_VARIANTS),
        description="Images to sample on: the clean prompt, and any requested view in place of its images.",
    )

    @field_validator("prompts")
    @classmethod
    def _unique_prompt_ids(cls, prompts: list[RolloutPrompt]) -> list[RolloutPrompt]:
        _refuse_duplicates([prompt.prompt_id for prompt in prompts], "prompt_id")
        return prompts

    @field_validator("sample_on")
    @classmethod
    def _sample_on_requested_views(
        cls, sample_on: list[ImageVariant], info: ValidationInfo
    ) -> list[ImageVariant]:
        if len(set(sample_on)) != len(sample_on):
            raise ValueError(f"sample_on lists an image variant more than once: {sample_on}")
        # Missing when `views` or `prompts` failed validation; that error is reported on its own.
        views: RequestedViews | None = info.data.get("views")
        prompts: list[RolloutPrompt] = info.data.get("prompts") or []
        for view in sample_on:
            if view == "clean" or views is None:
                continue
            if any(p.views is None for p in prompts) and getattr(views, view) is None:
                raise ValueError(f"sample_on has {view!r} but views.{view} is null; request that view")
            for index, prompt in enumerate(prompts):
                if prompt.views is not None and getattr(prompt.views, view) is None:
                    raise ValueError(
                        f"sample_on has {view!r} but prompts.{index}.views.{view} is null; request that view"
                    )
        return sample_on


class Sample(_Owned):
    """One sampled response."""

    prompt_id: Id = Field(description="The prompt it answers.")
    sample_index: int = Field(
        ge=0, lt=MAX_SAMPLES_PER_PROMPT, description="Index among the prompt's samples on this image variant."
    )
    sampled_on: ImageVariant = Field(default="clean", description="The image it was sampled on.")
    token_ids: list[TokenId] = Field(max_length=MAX_TOKENS, description="The generated tokens.")
    text: Text = Field(description="The generated tokens, detokenised.")
    logprobs: list[FiniteFloat] = Field(
        max_length=MAX_TOKENS,
        description="Log-probability of each generated token under the sampling policy, one per token.",
    )
    finish_reason: Literal["stop", "length", "abort"] = Field(
        description="'stop': an end token or stop string; 'length': max_tokens; 'abort': cut short."
    )
    policy_version: Version = Field(description="The weights version that sampled it.")

    @field_validator("logprobs")
    @classmethod
    def _one_logprob_per_token(cls, logprobs: list[float], info: ValidationInfo) -> list[float]:
        token_ids = info.data.get("token_ids")
        if token_ids is not None and len(logprobs) != len(token_ids):
            raise ValueError(
                f"logprobs has {len(logprobs)} entries but token_ids has {len(token_ids)}; "
                "there must be one per token"
            )
        return logprobs


class PromptRollout(_Owned):
    """One prompt's rollouts: its tokens, its views, and its samples."""

    prompt_id: Id = Field(description="The prompt's id, as requested.")
    prompt_token_ids: list[TokenId] = Field(
        max_length=MAX_PROMPT_TOKENS, description="The clean prompt's tokens, chat template applied."
    )
    views: list[PerturbedView] = Field(
        default_factory=list, max_length=MAX_VIEWS_PER_PROMPT, description="The views made of its images."
    )
    samples: list[Sample] = Field(
        max_length=len(IMAGE_VARIANTS) * MAX_SAMPLES_PER_PROMPT,
        description="``n`` samples per image variant sampled on.",
    )

    @field_validator("samples")
    @classmethod
    def _samples_of_this_prompt(cls, samples: list[Sample], info: ValidationInfo) -> list[Sample]:
        prompt_id = info.data.get("prompt_id")
        for sample in samples:
            if prompt_id is not None and sample.prompt_id != prompt_id:
                raise ValueError(f"a sample of prompt {sample.prompt_id!r} is listed under {prompt_id!r}")
        return samples


class RolloutResponse(_Owned):
    """The answer to ``POST /v1/rollouts``."""

    policy_version: Version = Field(description="The weights version loaded when the request finished.")
    prompts: list[PromptRollout] = Field(
        max_length=MAX_PROMPTS_PER_REQUEST, description="One entry per requested prompt, in request order."
    )


# --- weights -------------------------------------------------------------------------------------


class WeightsUpdate(_Owned):
    """``POST /v1/weights``: load new policy weights."""

    path: str = Field(
        min_length=1,
        max_length=MAX_PATH_CHARS,
        description="Folder of the checkpoint, as the server sees it.",
    )
    version: Version = Field(description="The policy version the weights are; samples are tagged with it.")


MAX_BROADCAST_TENSORS = 100_000
"""Most tensors in one broadcast (a 70B checkpoint has a few thousand)."""
MAX_GROUP_RANKS = 4096
"""Most members of a broadcast group: the trainer and the rollout replicas."""
MAX_TENSOR_DIMS = 8
MIN_BUCKET_BYTES = 1 << 20
MAX_BUCKET_BYTES = 1 << 32
MAX_BROADCAST_TIMEOUT_S = 3600.0
TensorDtype = Literal["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"]
"""A tensor's element type, by its safetensors name."""


class TensorSpec(_Owned):
    """One tensor of a broadcast, by its checkpoint name."""

    name: str = Field(min_length=1, max_length=MAX_PATH_CHARS, description="Its name in the checkpoint.")
    shape: list[Annotated[int, Field(ge=0, le=1 << 40)]] = Field(max_length=MAX_TENSOR_DIMS)
    dtype: TensorDtype


class WeightsBroadcast(_Owned):
    """``POST /v1/weights/broadcast``: join the trainer's process group and receive new weights from it.

    The trainer hosts a TCP store at ``host:port``; every replica it invited joins under ``session`` with its
    ``rank``, and the tensors arrive by broadcast from rank 0, packed in buckets of ``bucket_bytes`` (a tensor
    larger than that travels alone), in the order of ``tensors``. The group outlives the broadcast: the next
    one uses it again if its members are the same."""

    version: Version = Field(description="The policy version the weights are; samples are tagged with it.")
    host: str = Field(
        min_length=1, max_length=MAX_NAME_CHARS, description="The trainer's TCP store: address."
    )
    port: int = Field(ge=1, le=65535, description="The trainer's TCP store: port.")
    session: str = Field(
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="This broadcast's name in the store; fresh for each one.",
    )
    rank: int = Field(ge=1, lt=MAX_GROUP_RANKS, description="This replica's rank; the trainer is 0.")
    backend: Literal["gloo", "nccl"] = Field(description="gloo (CPU tensors) or nccl (CUDA tensors).")
    tensors: list[TensorSpec] = Field(min_length=1, max_length=MAX_BROADCAST_TENSORS)
    bucket_bytes: int = Field(ge=MIN_BUCKET_BYTES, le=MAX_BUCKET_BYTES)
    timeout_s: float = Field(
        gt=0, le=MAX_BROADCAST_TIMEOUT_S, description="Seconds any step of joining or receiving may take."
    )


class WeightsStatus(_Owned):
    """The policy weights a rollout server holds."""

    version: Version = Field(description="The loaded policy version; 0 is the initial model.")
    path: str | None = Field(
        default=None, max_length=MAX_PATH_CHARS, description="Where the weights were loaded from."
    )
    loaded_at: datetime | None = Field(default=None, description="When they were loaded.")


# --- rewards -------------------------------------------------------------------------------------


class ScoreItem(_Owned):
    """One response to score."""

    id: Id = Field(description="The caller's id for the item, unique within a request.")
    response: Text = Field(description="The policy's response.")
    ground_truth: Text = Field(description="The reference answer.")
    reward: (
        Name | Annotated[dict[Name, RewardWeight], Field(min_length=1, max_length=MAX_REWARD_COMPONENTS)]
    ) = Field(description="A reward function's name, or a weight per reward function name.")
    meta: dict[str, Any] | None = Field(
        default=None,
        max_length=MAX_REWARD_COMPONENTS,
        description="Parameters of the reward functions, by function name (meta.<name>), passed through.",
    )
    prompt: Text | None = Field(
        default=None,
        description="The prompt's text (images as <image>), for reward functions that take a 'prompt'.",
    )
    data_source: Name | None = Field(
        default=None,
        description="Which dataset the item comes from (verl's data_source), for reward functions that take "
        "a 'data_source'.",
    )
    metadata: dict[Name, MetadataValue] | None = Field(
        default=None,
        max_length=MAX_METADATA_ENTRIES,
        description="Free-form facts about the example (its category, difficulty...), for reward functions "
        "that take a 'metadata'.",
    )


class ScoreRequest(_Owned):
    """``POST /v1/score``: score responses against ground truths."""

    items: list[ScoreItem] = Field(max_length=MAX_SCORE_ITEMS, description="The items; ids unique.")

    @field_validator("items")
    @classmethod
    def _unique_ids(cls, items: list[ScoreItem]) -> list[ScoreItem]:
        _refuse_duplicates([item.id for item in items], "id")
        return items


class ScoreResult(_Owned):
    """One item's score."""

    id: Id = Field(description="The item's id.")
    reward: FiniteFloat = Field(description="The weighted sum of the components; 0 unless status is 'ok'.")
    components: dict[Name, FiniteFloat] = Field(
        default_factory=dict, max_length=MAX_REWARD_COMPONENTS, description="Each reward function's score."
    )
    status: Literal["ok", "timeout", "error"] = Field(
        description="'ok', or why the item could not be scored."
    )
    detail: str | None = Field(
        default=None, max_length=MAX_DETAIL_CHARS, description="What went wrong, when status is not 'ok'."
    )


class ScoreResponse(_Owned):
    """The answer to ``POST /v1/score``."""

    results: list[ScoreResult] = Field(
        max_length=MAX_SCORE_ITEMS, description="One result per item, in request order."
    )


class OpenRLHFRewardRequest(_Compatible):
    """``POST /get_reward``, OpenRLHF's remote reward model protocol."""

    query: list[Text] = Field(
        max_length=MAX_SCORE_ITEMS, description="Prompt and response, as one decoded text per sample."
    )
    prompts: list[Text] = Field(
        default_factory=list, max_length=MAX_SCORE_ITEMS, description="The prompts, one per query, or none."
    )
    labels: list[Text | int | FiniteFloat] = Field(
        default_factory=list,
        max_length=MAX_SCORE_ITEMS,
        description="The ground-truth answers, one per query, or none; numbers are read as their text.",
    )

    @field_validator("labels")
    @classmethod
    def _labels_as_text(cls, values: list[str | int | float]) -> list[str]:
        return [value if isinstance(value, str) else str(value) for value in values]

    @field_validator("prompts", "labels")
    @classmethod
    def _one_per_query(cls, values: list[str], info: ValidationInfo) -> list[str]:
        query = info.data.get("query")
        if values and query is not None and len(values) != len(query):
            raise ValueError(
                f"{info.field_name} has {len(values)} entries but query has {len(query)}; "
                "send one per query or none"
            )
        return values


class OpenRLHFRewardResponse(_Compatible):
    """The answer to ``POST /get_reward``."""

    rewards: list[FiniteFloat] = Field(
        max_length=MAX_SCORE_ITEMS, description="The reward of each query, used for the advantage."
    )
    scores: list[FiniteFloat] = Field(
        max_length=MAX_SCORE_ITEMS, description="The score of each query, used for dynamic filtering."
    )
    extra_logs: dict[Name, Annotated[list[FiniteFloat], Field(max_length=MAX_SCORE_ITEMS)]] = Field(
        default_factory=dict,
        max_length=MAX_REWARD_COMPONENTS,
        description="Per-query values to log, by name (the reward components).",
    )


# --- errors and health ---------------------------------------------------------------------------


class ErrorDetail(_Owned):
    """What was wrong with a request."""

    field: str | None = Field(
        default=None,
        max_length=MAX_PATH_CHARS,
        description="The offending field as a dotted path (e.g. 'prompts.0.messages'), if one is to blame.",
    )
    message: str = Field(max_length=MAX_DETAIL_CHARS, description="What is wrong, for a person.")
    code: Name = Field(description="What is wrong, for a program (e.g. 'validation_error', 'too_large').")


class ErrorResponse(_Owned):
    """The JSON body of every 4xx response."""

    error: ErrorDetail = Field(description="The error.")


class Health(_Owned):
    """``GET /health``: the process is up."""

    status: Literal["ok"] = Field(default="ok", description="Always 'ok'.")


class Readiness(_Owned):
    """``GET /ready``: whether the service can take requests now."""

    ready: bool = Field(description="True once the service can take requests.")
    detail: str | None = Field(
        default=None, max_length=MAX_DETAIL_CHARS, description="Why it is not ready, or what it serves."
    )
    policy_version: Version | None = Field(
        default=None, description="The loaded policy version, on a rollout server."
    )


# --- OpenAI chat completions (POST /v1/chat/completions) -----------------------------------------

MAX_TOP_LOGPROBS = 20
"""Alternatives per token in a chat completion's log-probs, as in the OpenAI API."""


class StreamOptions(_Compatible):
    """OpenAI's options of a streamed chat completion."""

    include_usage: bool = Field(
        default=False,
        description="Send a last chunk, before [DONE], whose usage counts the whole request's tokens.",
    )


class ChatCompletionRequest(_Compatible):
    """OpenAI's chat completion request; the fields a VLM server can honour, and vLLM's ``top_k`` and
    ``return_token_ids``."""

    model: str | None = Field(default=None, max_length=MAX_PATH_CHARS, description="The served model's name.")
    messages: list[ChatMessage] = Field(
        min_length=1, max_length=MAX_MESSAGES, description="The conversation to continue."
    )
    n: int = Field(default=1, ge=1, le=MAX_SAMPLES_PER_PROMPT, description="Completions to sample.")
    temperature: Temperature = Field(
        default=1.0, description="Softmax temperature: 0 is greedy, any other value at least 0.01."
    )
    top_p: TopP = Field(default=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(default=-1, ge=-1, le=MAX_TOP_K, description="vLLM extension: top-k; -1 is off.")
    max_tokens: int | None = Field(
        default=None, ge=1, le=MAX_TOKENS, description="Most tokens per completion (legacy name)."
    )
    max_completion_tokens: int | None = Field(
        default=None, ge=1, le=MAX_TOKENS, description="Most tokens per completion."
    )
    stop: str | list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]] | None = (
        Field(default=None, description="Up to 16 strings that end a completion.")
    )
    seed: Seed | None = Field(default=None, description="Seed for reproducible sampling.")
    logprobs: bool = Field(default=False, description="Return each token's log-probability.")
    top_logprobs: int | None = Field(
        default=None, ge=0, le=MAX_TOP_LOGPROBS, description="Alternatives per token; needs logprobs."
    )
    stream: bool = Field(
        default=False,
        description="Send the completion as server-sent events: chat.completion.chunk objects, then [DONE].",
    )
    stream_options: StreamOptions | None = Field(default=None, description="Needs stream=true.")
    return_token_ids: bool | None = Field(
        default=None,
        description="vLLM extension: also return the prompt's token ids (image tokens expanded) and each "
        "choice's, so that a client need not tokenise again. A stream sends the prompt's in its first chunk "
        "and each chunk's new tokens with it.",
    )

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop strings")
        if isinstance(stop, str) and not 0 < len(stop) <= MAX_STOP_CHARS:
            raise ValueError(f"a stop string has 1 to {MAX_STOP_CHARS} characters")
        return stop

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_a_stream(
        cls, options: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("stream_options needs stream=true")
        return options

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, top_logprobs: int | None, info: ValidationInfo) -> int | None:
        if top_logprobs and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs=true")
        return top_logprobs

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class TopLogprob(_Compatible):
    """One alternative token at a position."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(_Compatible):
    """One generated token, its log-probability and the likeliest alternatives."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Compatible):
    content: list[TokenLogprob] | None = None


class AssistantMessage(_Compatible):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Compatible):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "abort"]
    logprobs: ChoiceLogprobs | None = None
    token_ids: list[int] | None = Field(
        default=None, description="The completion's tokens, end token included (with return_token_ids)."
    )


class Usage(_Compatible):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(_Compatible):
    """OpenAI's chat completion response."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = Field(
        default=None, description="The prompt's tokens, image tokens expanded (with return_token_ids)."
    )


class ChatDelta(_Compatible):
    """What a chunk adds to one choice's message; fields with nothing to add are left out, as OpenAI does."""

    role: Literal["assistant"] | None = Field(default=None, description="In each choice's first chunk.")
    content: str | None = Field(default=None, description="The next piece of the text.")

    @model_serializer(mode="wrap")
    def _leave_out_nothing(self, serialize: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in serialize(self).items() if value is not None}


class ChatChunkChoice(_Compatible):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = Field(
        default=None, description="The log-probs of this chunk's tokens (with logprobs)."
    )
    finish_reason: Literal["stop", "length", "abort"] | None = Field(
        default=None, description="Set in the choice's last chunk."
    )
    token_ids: list[int] | None = Field(
        default=None, description="This chunk's new tokens (with return_token_ids)."
    )


class ChatCompletionChunk(_Compatible):
    """One server-sent event of a streamed chat completion (``data: {chunk}``), as OpenAI sends them: per
    choice, a chunk with the role, chunks with the content, and a last one with the finish reason; with
    ``stream_options.include_usage``, a chunk without choices that carries the usage. ``data: [DONE]`` ends
    the stream."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(default=None, description="Only in the usage chunk.")
    prompt_token_ids: list[int] | None = Field(
        default=None, description="In the first chunk only (with return_token_ids)."
    )


class ModelCard(_Compatible):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "cppo"
    max_model_len: int | None = None


class ModelList(_Compatible):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- vLLM's tokenizer routes (POST /tokenize, POST /detokenize) ----------------------------------

MAX_DETOKENIZE_TOKENS = MAX_PROMPT_TOKENS + MAX_TOKENS
"""Tokens in one detokenize request: a whole context, prompt and response."""


class TokenizeRequest(_Compatible):
    """vLLM's tokenize request, in either of its forms: a ``prompt``, tokenised as it is, or chat
    ``messages``, rendered by the chat template with each image expanded into its tokens, as generation
    sees them."""

    model: str | None = Field(default=None, max_length=MAX_PATH_CHARS, description="The served model's name.")
    prompt: Text | None = Field(default=None, description="Text to tokenise as it is; or send messages.")
    messages: list[ChatMessage] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_MESSAGES,
        validate_default=True,
        description="A conversation to render and tokenise, as a chat completion would; or send prompt.",
    )
    add_generation_prompt: bool = Field(
        default=True, description="messages: end with the assistant's header, as a chat completion does."
    )
    continue_final_message: bool = Field(
        default=False,
        description="messages: leave the last message open for the model to continue; needs "
        "add_generation_prompt=false.",
    )
    add_special_tokens: bool | None = Field(
        default=None,
        description="Add the tokenizer's own special tokens (e.g. BOS); unset: true for a prompt, false for "
        "messages, whose chat template writes them (as in vLLM).",
    )
    return_token_strs: bool = Field(default=False, description="Also return each token's string.")

    @field_validator("messages")
    @classmethod
    def _prompt_or_messages(
        cls, messages: list[ChatMessage] | None, info: ValidationInfo
    ) -> list[ChatMessage] | None:
        if (messages is None) == (info.data.get("prompt") is None):
            raise ValueError("send exactly one of prompt and messages")
        return messages

    @field_validator("continue_final_message")
    @classmethod
    def _open_or_answered(cls, continue_final_message: bool, info: ValidationInfo) -> bool:
        if continue_final_message and info.data.get("add_generation_prompt"):
            raise ValueError("continue_final_message needs add_generation_prompt=false")
        return continue_final_message


class TokenizeResponse(_Compatible):
    """vLLM's tokenize response."""

    count: int = Field(description="How many tokens.")
    max_model_len: int = Field(description="The served context length, prompt and response.")
    tokens: list[int] = Field(description="The token ids.")
    token_strs: list[str] | None = Field(default=None, description="Each token's string (return_token_strs).")


class DetokenizeRequest(_Compatible):
    """vLLM's detokenize request."""

    model: str | None = Field(default=None, max_length=MAX_PATH_CHARS, description="The served model's name.")
    tokens: list[TokenId] = Field(
        max_length=MAX_DETOKENIZE_TOKENS, description="Token ids of the served tokenizer's vocabulary."
    )


class DetokenizeResponse(_Compatible):
    """vLLM's detokenize response."""

    prompt: str = Field(description="The text of the tokens, special tokens included.")
