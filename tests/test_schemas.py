"""Wire schemas: validators name the field at fault, limits hold, and responses survive JSON unchanged."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pydantic
import pytest

from shared.perturbations import ViewSpec
from shared.schemas import (
    MAX_IMAGES_PER_PROMPT,
    MAX_PROMPTS_PER_REQUEST,
    MAX_SAMPLES_PER_PROMPT,
    MAX_TOKENS,
    MIN_TEMPERATURE,
    MIN_TOP_P,
    VISION_PLACEHOLDER_TOKENS,
    ChatCompletionRequest,
    ChatMessage,
    ErrorResponse,
    Health,
    ImagePart,
    OpenRLHFRewardRequest,
    OpenRLHFRewardResponse,
    PerturbedView,
    PromptRollout,
    Readiness,
    RequestedViews,
    RolloutPrompt,
    RolloutRequest,
    RolloutResponse,
    Sample,
    SamplingParams,
    ScoreItem,
    ScoreRequest,
    ScoreResponse,
    WeightsStatus,
    WeightsUpdate,
)

IMAGE_URL = "data:image/png;base64,iVBORw0KGgo="


def user_message(text: str = "What colour is the shape?", images: int = 1) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": IMAGE_URL}}] * images
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def prompt(prompt_id: str = "p0", **fields: Any) -> dict[str, Any]:
    return {"prompt_id": prompt_id, "messages": [user_message()], **fields}


def rollout_request(**fields: Any) -> dict[str, Any]:
    return {"prompts": [prompt("p0"), prompt("p1")], **fields}


def sample(**fields: Any) -> dict[str, Any]:
    return {
        "prompt_id": "p0",
        "sample_index": 0,
        "token_ids": [11, 12, 13],
        "text": "red",
        "logprobs": [-0.1, -0.2, -0.3],
        "finish_reason": "stop",
        "policy_version": 3,
        **fields,
    }


def errors(model: type[pydantic.BaseModel], data: Any) -> list[tuple[str, str, str]]:
    """The (dotted field, error type, message) of each error ``data`` raises."""
    with pytest.raises(pydantic.ValidationError) as caught:
        model.model_validate(data)
    return [(".".join(map(str, e["loc"])), e["type"], e["msg"]) for e in caught.value.errors()]


def only_error(model: type[pydantic.BaseModel], data: Any) -> tuple[str, str, str]:
    found = errors(model, data)
    assert len(found) == 1, found
    return found[0]


# --- chat messages -------------------------------------------------------------------------------


def test_openai_message_with_an_image_parses() -> None:
    message = ChatMessage.model_validate(
        {
            "role": "user",
            "name": "alice",  # an OpenAI field we ignore
            "content": [
                {"type": "text", "text": "Describe"},
                {"type": "image_url", "image_url": {"url": IMAGE_URL, "detail": "high"}},
                {"type": "image_url", "image_url": {"url": "file:///data/b.png"}},
            ],
        }
    )
    assert message.image_urls() == [IMAGE_URL, "file:///data/b.png"]
    assert isinstance(message.content[1], ImagePart) and message.content[1].image_url.detail == "high"


def test_text_message_has_no_images() -> None:
    assert ChatMessage(role="assistant", content="blue").image_urls() == []


def test_unknown_content_part_type_is_named() -> None:
    field, kind, _ = only_error(ChatMessage, {"role": "user", "content": [{"type": "audio", "audio": "x"}]})
    assert (field, kind) == ("content.parts.0", "union_tag_invalid")


def test_content_errors_are_reported_once() -> None:
    too_long = {"role": "user", "content": [{"type": "text", "text": "x"}] * 257}
    assert only_error(ChatMessage, too_long)[:2] == ("content.parts", "too_long")
    assert only_error(ChatMessage, {"role": "user", "content": 7})[:2] == ("content.parts", "list_type")


@pytest.mark.parametrize("token", VISION_PLACEHOLDER_TOKENS)
def test_message_text_may_not_hold_a_vision_placeholder(token: str) -> None:
    # Only the server writes them, for each image part; in a prompt's text the processor raised on them
    # (a 500 from both generation routes, found by tests/test_fuzz.py).
    field, kind, message = only_error(ChatMessage, {"role": "user", "content": f"what is {token}?"})
    assert (field, kind) == ("content.text", "value_error") and token in message
    in_a_part = only_error(ChatMessage, user_message(f"what is {token}?"))
    assert in_a_part[:2] == ("content.parts.1.text.text", "value_error")
    assert ChatMessage(role="user", content="image_pad <|image|> <|im_end|>").content  # look-alikes pass


def test_prompt_image_urls_and_image_limit() -> None:
    two = RolloutPrompt.model_validate({"prompt_id": "p", "messages": [user_message(), user_message()]})
    assert two.image_urls() == [IMAGE_URL, IMAGE_URL]
    too_many = {"prompt_id": "p", "messages": [user_message(images=MAX_IMAGES_PER_PROMPT + 1)]}
    field, _, message = only_error(RolloutPrompt, too_many)
    assert field == "messages" and "images" in message


# --- rollout requests ----------------------------------------------------------------------------


def test_rollout_request_defaults() -> None:
    request = RolloutRequest.model_validate(rollout_request())
    assert request.n == 1 and request.sample_on == ["clean"]
    assert request.sampling == SamplingParams()
    assert request.views.positive is not None and request.views.negative is not None
    assert request.views.positive.transforms is None


def test_duplicate_prompt_ids_are_named() -> None:
    field, _, message = only_error(RolloutRequest, {"prompts": [prompt("a"), prompt("b"), prompt("a")]})
    assert field == "prompts" and "'a'" in message


def test_unknown_field_is_rejected_and_named() -> None:
    assert only_error(RolloutRequest, rollout_request(nn=4))[:2] == ("nn", "extra_forbidden")
    nested = rollout_request(sampling={"temprature": 0.5})
    assert only_error(RolloutRequest, nested)[:2] == ("sampling.temprature", "extra_forbidden")


@pytest.mark.parametrize("view", ["positive", "negative"])
def test_sampling_on_a_view_requires_the_view(view: str) -> None:
    field, _, message = only_error(RolloutRequest, rollout_request(sample_on=[view], views={view: None}))
    assert field == "sample_on" and f"views.{view}" in message


def test_sampling_on_requested_views() -> None:
    request = RolloutRequest.model_validate(
        rollout_request(sample_on=["clean", "positive"], views={"positive": {"seed": 3}, "negative": None})
    )
    assert request.views.negative is None and request.sample_on == ["clean", "positive"]


def test_views_per_prompt_stand_in_for_the_requests() -> None:
    grey = {"negative": {"transforms": ["grey_out"]}, "positive": None}
    mirror = {"negative": {"transforms": ["mirror_average"]}, "positive": None}
    data = {
        "prompts": [prompt("p0", views=grey), prompt("p1", views=mirror)],
        "views": {"positive": None, "negative": None},
        "sample_on": ["clean", "negative"],
    }
    request = RolloutRequest.model_validate(data)
    assert [p.views.negative.transforms for p in request.prompts] == [["grey_out"], ["mirror_average"]]
    # One prompt without a view of its own falls back to the request's, which has none: refused.
    data["prompts"][1] = prompt("p1")
    field, _, message = only_error(RolloutRequest, data)
    assert field == "sample_on" and "views.negative is null" in message
    # A prompt's own views that lack the view sampled on are refused, naming the prompt.
    data["prompts"][1] = prompt("p1", views={"positive": None, "negative": None})
    field, _, message = only_error(RolloutRequest, data)
    assert field == "sample_on" and "prompts.1.views.negative" in message
    # Transform names are checked per prompt as for the request.
    field, _, message = only_error(
        RolloutPrompt, prompt("p0", views={"negative": {"transforms": ["rotation"]}})
    )
    assert field == "views.negative" and "rotation" in message


@pytest.mark.parametrize("sample_on", [[], ["clean", "clean"], ["blurred"]])
def test_sample_on_must_be_distinct_known_views(sample_on: list[str]) -> None:
    field, _, _ = only_error(RolloutRequest, rollout_request(sample_on=sample_on))
    assert field.startswith("sample_on")


def test_view_transforms_must_belong_to_the_kind() -> None:
    field, _, message = only_error(RequestedViews, {"positive": {"transforms": ["rotation", "zoom_crop"]}})
    assert field == "positive" and "'zoom_crop'" in message
    views = RequestedViews.model_validate({"negative": {"transforms": ["zoom_crop"]}})
    assert views.negative is not None and views.negative.transforms == ["zoom_crop"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"n": 0}, "n"),
        ({"n": MAX_SAMPLES_PER_PROMPT + 1}, "n"),
        ({"sampling": {"temperature": -0.1}}, "sampling.temperature"),
        ({"sampling": {"top_p": 0.0}}, "sampling.top_p"),
        # Values that would overflow the logits or empty the nucleus: refused, not NaN log-probs.
        ({"sampling": {"top_p": 5e-324}}, "sampling.top_p"),
        ({"sampling": {"temperature": 1e-40}}, "sampling.temperature"),
        ({"sampling": {"temperature": 0.0099}}, "sampling.temperature"),
        ({"sampling": {"top_p": 1.01}}, "sampling.top_p"),
        ({"sampling": {"top_k": 0}}, "sampling.top_k"),
        ({"sampling": {"top_k": -2}}, "sampling.top_k"),
        ({"sampling": {"max_tokens": 0}}, "sampling.max_tokens"),
        ({"sampling": {"max_tokens": MAX_TOKENS + 1}}, "sampling.max_tokens"),
        ({"sampling": {"stop": [""]}}, "sampling.stop.0"),
        ({"sampling": {"stop": ["x"] * 17}}, "sampling.stop"),
        ({"sampling": {"seed": -1}}, "sampling.seed"),
        ({"views": {"positive": {"transforms": []}}}, "views.positive.transforms"),
        ({"prompts": []}, "prompts"),
        ({"prompts": [prompt("x" * 257)]}, "prompts.0.prompt_id"),
        ({"prompts": [prompt(messages=[])]}, "prompts.0.messages"),
    ],
)
def test_limits_are_enforced(fields: dict[str, Any], field: str) -> None:
    assert only_error(RolloutRequest, rollout_request(**fields))[0] == field


def test_prompt_count_limit() -> None:
    prompts = [prompt(f"p{i}") for i in range(MAX_PROMPTS_PER_REQUEST + 1)]
    assert only_error(RolloutRequest, {"prompts": prompts})[:2] == ("prompts", "too_long")


def test_sampling_bounds_are_inclusive() -> None:
    params = SamplingParams(temperature=0.0, top_p=1.0, top_k=1, max_tokens=MAX_TOKENS)
    assert params.temperature == 0.0 and params.max_tokens == MAX_TOKENS
    low = SamplingParams(temperature=MIN_TEMPERATURE, top_p=MIN_TOP_P)
    assert (low.temperature, low.top_p) == (MIN_TEMPERATURE, MIN_TOP_P)
    chat = {"messages": [{"role": "user", "content": "hi"}], "temperature": 1e-40}
    field, _, message = only_error(ChatCompletionRequest, chat)
    assert field == "temperature" and "0 (greedy)" in message


# --- rollout responses ---------------------------------------------------------------------------


def test_logprobs_must_match_tokens() -> None:
    field, _, message = only_error(Sample, sample(logprobs=[-0.1, -0.2]))
    assert field == "logprobs" and "2 entries" in message and "token_ids has 3" in message


def test_logprobs_must_be_finite() -> None:
    assert only_error(Sample, sample(logprobs=[-0.1, float("-inf"), -0.3]))[0] == "logprobs.1"


def test_samples_must_belong_to_their_prompt() -> None:
    data = {"prompt_id": "p1", "prompt_token_ids": [1], "samples": [sample(prompt_id="p0")]}
    field, _, message = only_error(PromptRollout, data)
    assert field == "samples" and "'p0'" in message and "'p1'" in message


def test_view_spec_kind_must_match() -> None:
    spec = {"kind": "negative", "transform": "zoom_crop", "params": {"box": [0, 0, 8, 8]}, "seed": 1}
    field, _, message = only_error(PerturbedView, {"kind": "positive", "image_url": IMAGE_URL, "spec": spec})
    assert field == "spec" and "'negative'" in message


def test_view_image_must_be_a_data_url() -> None:
    spec = ViewSpec(kind="positive", transform="rotation", params={"angle": 2.0}, seed=1)
    data = {"kind": "positive", "image_url": "http://x/y.png", "spec": spec}
    assert only_error(PerturbedView, data)[0] == "image_url"


def test_rollout_response_round_trips_through_json() -> None:
    views = [
        PerturbedView(
            kind="positive",
            image_url=IMAGE_URL,
            spec=ViewSpec(kind="positive", transform="rotation", params={"angle": -4.25}, seed=17),
        ),
        PerturbedView(
            kind="negative",
            image_url=IMAGE_URL,
            spec=ViewSpec(
                kind="negative",
                transform="noise_occlusion",
                params={"boxes": [[1, 2, 9, 10]], "noise_seed": 5, "image_size": [112, 112]},
                seed=18,
            ),
        ),
    ]
    samples = [
        Sample.model_validate(sample(sample_index=i, sampled_on=view, logprobs=[-0.1, -1e-9, -12.5]))
        for view in ("clean", "positive")
        for i in range(2)
    ]
    samples.append(Sample.model_validate(sample(token_ids=[], text="", logprobs=[], finish_reason="length")))
    response = RolloutResponse(
        policy_version=3,
        prompts=[
            PromptRollout(prompt_id="p0", prompt_token_ids=[1, 2, 151655], views=views, samples=samples),
            PromptRollout(prompt_id="p1", prompt_token_ids=[4], views=[], samples=[]),
        ],
    )
    text = response.model_dump_json()
    again = RolloutResponse.model_validate_json(text)
    assert again == response
    assert again.model_dump_json() == text


# --- weights, rewards, errors, health ------------------------------------------------------------


def test_weights_round_trip() -> None:
    status = WeightsStatus(
        version=2, path="/ckpt/step-2", loaded_at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    )
    assert WeightsStatus.model_validate_json(status.model_dump_json()) == status
    assert WeightsStatus(version=0).path is None
    assert only_error(WeightsUpdate, {"path": "/ckpt", "version": -1})[0] == "version"
    assert only_error(WeightsUpdate, {"path": "", "version": 1})[0] == "path"


def score_item(item_id: str = "a", **fields: Any) -> dict[str, Any]:
    return {"id": item_id, "response": r"\boxed{red}", "ground_truth": "red", "reward": "accuracy", **fields}


def test_score_item_reward_is_a_name_or_weights() -> None:
    assert ScoreItem.model_validate(score_item()).reward == "accuracy"
    weighted = ScoreItem.model_validate(
        score_item(reward={"accuracy": 0.9, "format": 0.1}, meta={"task": "c"})
    )
    assert weighted.reward == {"accuracy": 0.9, "format": 0.1}


@pytest.mark.parametrize(
    "reward",
    [
        {},
        {"accuracy": float("inf")},
        {"accuracy": float("nan")},
        "",
        {"": 1.0},
        {"math": 1e308, "format": 1e308},
    ],
)
def test_score_item_bad_reward(reward: Any) -> None:
    assert all(field.startswith("reward") for field, _, _ in errors(ScoreItem, score_item(reward=reward)))


def test_score_ids_are_unique() -> None:
    field, _, message = only_error(
        ScoreRequest, {"items": [score_item("a"), score_item("b"), score_item("b")]}
    )
    assert field == "items" and "'b'" in message


def test_score_request_rejects_unknown_fields() -> None:
    assert only_error(ScoreRequest, {"items": [score_item(rewrd="x")]})[:2] == (
        "items.0.rewrd",
        "extra_forbidden",
    )


def test_score_response_round_trips() -> None:
    response = ScoreResponse.model_validate(
        {
            "results": [
                {"id": "a", "reward": 1.0, "components": {"accuracy": 1.0}, "status": "ok"},
                {"id": "b", "reward": 0.0, "status": "timeout", "detail": "over 5 s"},
            ]
        }
    )
    assert ScoreResponse.model_validate_json(response.model_dump_json()) == response


def test_openrlhf_request_ignores_extra_fields() -> None:
    request = OpenRLHFRewardRequest.model_validate(
        {"query": ["q1", "q2"], "prompts": ["p1", "p2"], "labels": ["red", "2"], "datasource": "x"}
    )
    assert request.labels == ["red", "2"]
    assert OpenRLHFRewardRequest.model_validate({"query": ["q"]}).prompts == []


@pytest.mark.parametrize("field", ["prompts", "labels"])
def test_openrlhf_lengths_must_match_query(field: str) -> None:
    name, _, message = only_error(OpenRLHFRewardRequest, {"query": ["q1", "q2"], field: ["only one"]})
    assert name == field and field in message and "query has 2" in message


def test_openrlhf_response() -> None:
    response = OpenRLHFRewardResponse(
        rewards=[1.0, 0.0], scores=[1.0, 0.0], extra_logs={"format": [1.0, 1.0]}
    )
    assert OpenRLHFRewardResponse.model_validate_json(response.model_dump_json()) == response


def test_error_response_and_health() -> None:
    body = {"error": {"field": "prompts.0.prompt_id", "message": "too long", "code": "validation_error"}}
    assert ErrorResponse.model_validate(body).model_dump() == body
    assert Health().model_dump() == {"status": "ok"}
    assert only_error(Health, {"status": "degraded"})[0] == "status"
    assert Readiness(ready=False, detail="loading weights").policy_version is None


def test_every_field_is_documented() -> None:
    """Descriptions end up in the OpenAPI docs, which need each model's JSON schema."""
    models = [
        RolloutRequest, RolloutResponse, PromptRollout, Sample, PerturbedView, RequestedViews, SamplingParams,
        ChatMessage, WeightsUpdate, WeightsStatus, ScoreRequest, ScoreItem, ScoreResponse,
        OpenRLHFRewardRequest, OpenRLHFRewardResponse, ErrorResponse, Health, Readiness,
    ]  # fmt: skip
    for model in models:
        assert model.model_json_schema()["properties"]
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name}"
