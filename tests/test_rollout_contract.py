"""One contract for every rollout backend, checked over HTTP against a real server.

The transformers backend runs everywhere; the vLLM backend runs where vLLM is installed (the
``.venv-vllm`` tier, ``make test-vllm``, and GPU machines).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from servers import metric, running_server

from shared import synth_data
from shared.images import decode_image_url, encode_image_data_url
from shared.perturbations import ViewSpec, apply_spec
from shared.schemas import RolloutResponse
from shared.tiny_model import build_tiny_model
from shared.vlm import load_model, load_processor, suppressed_token_ids
from trainer.objective import logprobs_and_entropy

# vLLM computes in its own kernels, so its log-probs agree with a transformers pass less tightly.
LOGPROB_TOLERANCE = {"transformers": 1e-4, "vllm": 2e-2}


def _vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


BACKENDS = [
    "transformers",
    pytest.param(
        "vllm",
        marks=[
            pytest.mark.vllm,
            pytest.mark.slow,
            pytest.mark.skipif(not _vllm_available(), reason="vLLM is not installed here"),
        ],
    ),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Policy A (served first), policy B (same architecture, other weights), and a model of another size."""
    root = tmp_path_factory.mktemp("models")
    return {
        "a": build_tiny_model(root / "a", profile="vllm", seed=0),
        "b": build_tiny_model(root / "b", profile="vllm", seed=1),
        "other_shape": build_tiny_model(root / "other", profile="transformers", seed=0),
    }


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, models, tmp_path_factory):
    backend = request.param
    args = [
        "--model",
        str(models["a"]),
        "--backend",
        backend,
        "--max-model-len",
        "512",
        "--max-image-bytes",
        "300000",
        "--max-image-pixels",
        str(600 * 600),
    ]
    if backend == "vllm":
        # On CPU the memory fraction is of one NUMA node, which is small on these machines.
        args += ["--dtype", "float32", "--gpu-memory-utilization", "0.3"]
    timeout = 600 if backend == "vllm" else 120
    with running_server("rollout-server", args, tmp_path_factory.mktemp("logs"), timeout) as running:
        running.backend = backend
        yield running


@pytest.fixture(scope="module")
def reference(models):
    """Teacher-forced log-probs under either policy, computed in this process with transformers."""
    cache = {}

    def logprobs(policy: str, prompt_token_ids: list[int], images, response: list[int], temperature: float):
        if policy not in cache:
            cache[policy] = (load_model(models[policy]).eval(), load_processor(models[policy]))
        model, processor = cache[policy]
        ids = torch.tensor([prompt_token_ids + response])
        kwargs = {}
        if images:
            pixels = processor.image_processor(images=images, return_tensors="pt")
            kwargs = {"pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}
        # M-RoPE needs to know which tokens are image tokens (1) and which are text (0).
        mm = (ids == processor.image_token_id).long()
        with torch.no_grad():
            logits = model(input_ids=ids, mm_token_type_ids=mm, **kwargs).logits
        suppressed = suppressed_token_ids(processor.tokenizer)
        start = len(prompt_token_ids) - 1
        logp, _ = logprobs_and_entropy(
            logits[:, start:-1], torch.tensor([response]), temperature, suppressed_ids=suppressed
        )
        return logp[0]

    return logprobs


def image_prompt(prompt_id: str, image: Image.Image, question: str) -> dict:
    return {
        "prompt_id": prompt_id,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": encode_image_data_url(image)}},
                    {"type": "text", "text": question},
                ],
            }
        ],
    }


@pytest.fixture(scope="module")
def examples() -> list[synth_data.Example]:
    return list(synth_data.generate("test", 3, seed=11))


def rollout(server, body: dict, **kwargs) -> RolloutResponse:
    with server.client() as client:
        response = client.post("/v1/rollouts", json=body, **kwargs)
    assert response.status_code == 200, response.text
    return RolloutResponse.model_validate(response.json())


# --- the routes everyone calls -------------------------------------------------------------------


def test_health_ready_models_and_metrics(server):
    with server.client() as client:
        assert client.get("/health").json() == {"status": "ok"}
        ready = client.get("/ready").json()
        assert ready["ready"] is True and ready["policy_version"] == 0
        models = client.get("/v1/models").json()
        assert models["data"][0]["max_model_len"] == 512
        assert "cppo_rollout_requests_total" in client.get("/metrics").text
        assert client.get("/openapi.json").json()["paths"]["/v1/rollouts"]


def test_rollouts_have_the_requested_shape_and_views(server, examples):
    body = {
        "prompts": [
            image_prompt(f"p{i}", e.image, e.problem.removeprefix("<image>")) for i, e in enumerate(examples)
        ],
        "n": 3,
        "sampling": {"max_tokens": 5, "temperature": 1.0},
        "views": {"positive": {"seed": 7}, "negative": {"seed": 8, "transforms": ["zoom_crop"]}},
    }
    result = rollout(server, body)
    assert [p.prompt_id for p in result.prompts] == ["p0", "p1", "p2"]
    for prompt, example in zip(result.prompts, examples, strict=True):
        assert [s.sample_index for s in prompt.samples] == [0, 1, 2]
        for sample in prompt.samples:
            assert sample.sampled_on == "clean" and sample.policy_version == 0
            assert 1 <= len(sample.token_ids) <= 5 and len(sample.logprobs) == len(sample.token_ids)
            assert all(lp <= 0 for lp in sample.logprobs)
            assert sample.finish_reason in ("stop", "length")
        assert {v.kind for v in prompt.views} == {"positive", "negative"}
        for view in prompt.views:
            image = decode_image_url(view.image_url)
            assert image.size == example.image.size
            # The spec rebuilds the view bit for bit from the original image.
            rebuilt = apply_spec(example.image, ViewSpec.model_validate(view.spec.model_dump()))
            assert rebuilt.tobytes() == image.tobytes()
        negative = next(v for v in prompt.views if v.kind == "negative")
        assert negative.spec.transform == "zoom_crop"


def test_prompt_tokens_and_logprobs_match_a_teacher_forced_pass(server, models, examples, reference):
    example = examples[0]
    body = {
        "prompts": [image_prompt("p", example.image, "What colour is the shape?")],
        "n": 2,
        "sampling": {"max_tokens": 8, "temperature": 0.7, "seed": 3},
    }
    prompt = rollout(server, body).prompts[0]
    processor = load_processor(models["a"])
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}],
        }
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.prompt_token_ids == processor(text=[text], images=[example.image])["input_ids"][0]
    for sample in prompt.samples:
        expected = reference("a", prompt.prompt_token_ids, [example.image], sample.token_ids, 0.7)
        torch.testing.assert_close(
            torch.tensor(sample.logprobs), expected, atol=LOGPROB_TOLERANCE[server.backend], rtol=0
        )


def test_seed_makes_samples_reproducible(server, examples):
    def tokens(seed: int) -> list[list[int]]:
        body = {
            "prompts": [image_prompt("p", examples[1].image, "What shape?")],
            "n": 3,
            "sampling": {"max_tokens": 6, "seed": seed},
        }
        return [s.token_ids for s in rollout(server, body).prompts[0].samples]

    first = tokens(5)
    assert tokens(5) == first
    assert tokens(6) != first
    assert len({tuple(t) for t in first}) > 1, "the n samples of one request must differ"


def test_views_per_prompt_follow_each_prompts_transforms(server, examples):
    """One request, prompts of different tasks: each prompt's own views stand in for the request's."""
    body = {
        "prompts": [
            {
                **image_prompt("grey", examples[0].image, "What colour?"),
                "views": {"negative": {"transforms": ["grey_out"]}, "positive": None},
            },
            {
                **image_prompt("mirror", examples[1].image, "Left or right?"),
                "views": {"negative": {"transforms": ["mirror_average"]}, "positive": None},
            },
            image_prompt("request", examples[2].image, "How many?"),
        ],
        "sampling": {"max_tokens": 2},
        "views": {"positive": None, "negative": {"transforms": ["cutout"], "seed": 3}},
        "sample_on": ["clean", "negative"],
    }
    result = rollout(server, body)
    made = {p.prompt_id: [(v.kind, v.spec.transform) for v in p.views] for p in result.prompts}
    assert made == {
        "grey": [("negative", "grey_out")],
        "mirror": [("negative", "mirror_average")],
        "request": [("negative", "cutout")],
    }
    for prompt in result.prompts:
        assert [s.sampled_on for s in prompt.samples] == ["clean", "negative"]


def test_sampling_on_views_tags_each_sample(server, examples):
    body = {
        "prompts": [image_prompt("p", examples[2].image, "How many?")],
        "n": 2,
        "sampling": {"max_tokens": 3},
        "sample_on": ["clean", "positive", "negative"],
    }
    samples = rollout(server, body).prompts[0].samples
    assert [(s.sampled_on, s.sample_index) for s in samples] == [
        ("clean", 0),
        ("clean", 1),
        ("positive", 0),
        ("positive", 1),
        ("negative", 0),
        ("negative", 1),
    ]


def test_max_tokens_and_stop_strings(server):
    text_only = {"prompt_id": "t", "messages": [{"role": "user", "content": "Say something."}]}
    result = rollout(server, {"prompts": [text_only], "n": 4, "sampling": {"max_tokens": 4, "seed": 1}})
    for sample in result.prompts[0].samples:
        assert len(sample.token_ids) <= 4
        assert (sample.finish_reason == "length") == (len(sample.token_ids) == 4)
    # A stop string taken from a sample's own text ends that sample early, the string excluded.
    full = rollout(server, {"prompts": [text_only], "n": 1, "sampling": {"max_tokens": 12, "seed": 9}})
    text = full.prompts[0].samples[0].text
    stop = next((text[i : i + 2] for i in range(1, len(text) - 1) if text[i : i + 2].strip()), None)
    if stop is None:
        pytest.skip(f"the sampled text {text!r} has no usable stop string")
    stopped = (
        rollout(
            server,
            {"prompts": [text_only], "n": 1, "sampling": {"max_tokens": 12, "seed": 9, "stop": [stop]}},
        )
        .prompts[0]
        .samples[0]
    )
    assert stopped.finish_reason == "stop"
    assert stop not in stopped.text and text.startswith(stopped.text)


def test_the_readmes_openai_example_runs_as_written(server, examples, tmp_path):
    pytest.importorskip("openai")
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    after = readme.index("The OpenAI client works unchanged")
    code = readme[readme.index("```python\n", after) + len("```python\n") : readme.index("```\n", after + 40)]
    with server.client() as client:
        served = client.get("/v1/models").json()["data"][0]["id"]
    # Only where the server is and what it serves differ from the README's own setup.
    code = code.replace("http://localhost:8000/v1", server.url + "/v1").replace(
        '"artifacts/tiny-qwen2.5-vl"', repr(served)
    )
    image = tmp_path / "artifacts/synth/images/test/test-000000.png"
    image.parent.mkdir(parents=True)
    examples[0].image.save(image)
    command = [sys.executable, "-c", code]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines[0:4:2]] == ["0", "1"]  # each choice, then its first tokens
    assert lines[-1].startswith("CompletionUsage(")


def test_the_readmes_streaming_example_runs_as_written(server, tmp_path):
    pytest.importorskip("openai")
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    after = readme.index("With `stream=True` the same call")
    start = readme.index("```python\n", after) + len("```python\n")
    code = readme[start : readme.index("```\n", start)]
    with server.client() as client:
        served = client.get("/v1/models").json()["data"][0]["id"]
    code = code.replace("http://localhost:8000/v1", server.url + "/v1").replace(
        '"artifacts/tiny-qwen2.5-vl"', repr(served)
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # The role chunk, a chunk per token (with its id), the finish chunk, then the usage.
    assert lines[0] == "0 '' None None" and lines[-1].startswith("CompletionUsage(")
    assert lines[-2] in ("0 None stop None", "0 None length None")
    token_ids = [line.rpartition(" ")[2] for line in lines[1:-2]]
    completion_tokens = int(lines[-1].split("completion_tokens=")[1].split(",")[0])
    assert len(token_ids) == completion_tokens and all(re.fullmatch(r"\[\d+\]", ids) for ids in token_ids)


def test_openai_client_works_unchanged(server, examples):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    model = client.models.list().data[0].id
    completion = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": encode_image_data_url(examples[0].image)}},
                    {"type": "text", "text": "What colour is the shape?"},
                ],
            }
        ],
        n=2,
        max_tokens=5,
        temperature=0.8,
        seed=4,
        logprobs=True,
        top_logprobs=2,
    )
    assert len(completion.choices) == 2
    choice = completion.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 10 and completion.usage.prompt_tokens > 16
    for token in choice.logprobs.content:
        assert len(token.top_logprobs) == 2
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob
        assert token.logprob <= token.top_logprobs[0].logprob + 1e-4


# --- weights -------------------------------------------------------------------------------------


def _weights(server) -> dict:
    with server.client() as client:
        return client.get("/v1/weights").json()


def test_weight_swaps_are_atomic_and_versioned(server, models, examples, reference):
    image = examples[0].image
    body = {
        "prompts": [image_prompt("p", image, "What colour?")],
        "n": 2,
        "sampling": {"max_tokens": 6, "temperature": 1.0},
    }

    async def traffic_during_swap() -> tuple[list[RolloutResponse], dict]:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            requests = [client.post("/v1/rollouts", json=body) for _ in range(6)]
            swap = client.post("/v1/weights", json={"path": str(models["b"]), "version": 1})
            responses = await asyncio.gather(*requests[:3], swap, *requests[3:])
        swapped = responses.pop(3)
        assert swapped.status_code == 200, swapped.text
        return [RolloutResponse.model_validate(r.json()) for r in responses], swapped.json()

    responses, status = asyncio.run(traffic_during_swap())
    assert status["version"] == 1 and status["path"] == str(models["b"])
    assert _weights(server)["version"] == 1
    # Every sample was made by the weights of the version it reports, whichever side of the swap it fell.
    for response in responses:
        for sample in response.prompts[0].samples:
            policy = {0: "a", 1: "b"}[sample.policy_version]
            expected = reference(policy, response.prompts[0].prompt_token_ids, [image], sample.token_ids, 1.0)
            torch.testing.assert_close(
                torch.tensor(sample.logprobs), expected, atol=LOGPROB_TOLERANCE[server.backend], rtol=0
            )
    after = rollout(server, body)
    assert after.policy_version == 1 and all(s.policy_version == 1 for s in after.prompts[0].samples)


def test_failed_weight_loads_leave_the_old_weights_serving(server, models, tmp_path):
    before = _weights(server)["version"]
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((models["a"] / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    cases = [
        ({"path": str(tmp_path / "missing"), "version": before + 1}, 422, "path"),
        ({"path": str(models["other_shape"]), "version": before + 1}, 422, "path"),
        ({"path": str(corrupt), "version": before + 1}, 422, "path"),
        ({"path": str(models["a"]), "version": before}, 409, "version"),
    ]
    with server.client() as client:
        for payload, status, field in cases:
            response = client.post("/v1/weights", json=payload)
            assert response.status_code == status, (payload, response.text)
            assert response.json()["error"]["field"] == field
        wrong_shape = client.post(
            "/v1/weights", json={"path": str(models["other_shape"]), "version": before + 1}
        )
        assert "shape" in wrong_shape.json()["error"]["message"]
    assert _weights(server)["version"] == before
    assert rollout(server, {"prompts": [{"prompt_id": "x", "messages": [{"role": "user", "content": "hi"}]}]})


def test_weights_by_value(server, models, examples, reference):
    version = _weights(server)["version"] + 1
    data = (models["a"] / "model.safetensors").read_bytes()
    with server.client() as client:
        response = client.post(
            "/v1/weights/tensors",
            params={"version": version},
            content=data,
            headers={"content-type": "application/octet-stream"},
        )
        assert response.status_code == 200, response.text
        assert response.json()["version"] == version
        refused = client.post("/v1/weights/tensors", params={"version": version + 1}, content=b"garbage")
        assert refused.status_code == 422 and refused.json()["error"]["field"] == "body"
    image = examples[1].image
    body = {"prompts": [image_prompt("p", image, "Which side?")], "n": 1, "sampling": {"max_tokens": 5}}
    prompt = rollout(server, body).prompts[0]
    sample = prompt.samples[0]
    assert sample.policy_version == version
    expected = reference("a", prompt.prompt_token_ids, [image], sample.token_ids, 1.0)
    torch.testing.assert_close(
        torch.tensor(sample.logprobs), expected, atol=LOGPROB_TOLERANCE[server.backend], rtol=0
    )


# --- bad input -----------------------------------------------------------------------------------


def _png_data_url(size: tuple[int, int], noise: bool = False) -> str:
    image = Image.effect_noise(size, 100).convert("RGB") if noise else Image.new("RGB", size, (10, 200, 30))
    return encode_image_data_url(image)


def _with_image(url: str) -> dict:
    return {
        "prompts": [
            {
                "prompt_id": "p",
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
            }
        ]
    }


BAD_REQUESTS = {
    "corrupt image": (
        _with_image("data:image/png;base64," + base64.b64encode(b"\x89PNG broken").decode()),
        400,
        "prompts.0.messages.0.content.0.image_url.url",
        "corrupt",
    ),
    "unsupported mime": (
        _with_image("data:image/gif;base64,R0lGODlh"),
        400,
        "prompts.0.messages.0.content.0.image_url.url",
        "unsupported_mime",
    ),
    "too many bytes": (
        _with_image(_png_data_url((400, 400), noise=True)),
        413,
        "prompts.0.messages.0.content.0.image_url.url",
        "too_large",
    ),
    "too many pixels": (
        _with_image(_png_data_url((700, 700))),
        413,
        "prompts.0.messages.0.content.0.image_url.url",
        "too_many_pixels",
    ),
    "an image too thin for the processor to resize": (
        _with_image(_png_data_url((4000, 1))),
        400,
        "prompts.0.messages.0.content.0.image_url.url",
        "aspect_ratio",
    ),
    "a top_p whose nucleus underflows": (
        {**_with_image(_png_data_url((28, 28))), "sampling": {"top_p": 5e-324}},
        422,
        "sampling.top_p",
        "validation_error",
    ),
    "a temperature that overflows the logits": (
        {**_with_image(_png_data_url((28, 28))), "sampling": {"temperature": 1e-40}},
        422,
        "sampling.temperature",
        "validation_error",
    ),
    "too many images": (
        {
            "prompts": [
                {
                    "prompt_id": "p",
                    "messages": [
                        {
                            "role": "user",
                            "content": [{"type": "image_url", "image_url": {"url": _png_data_url((28, 28))}}]
                            * 33,
                        }
                    ],
                }
            ]
        },
        422,
        "prompts.0.messages",
        "validation_error",
    ),
    "more images than the server takes": (
        {
            "prompts": [
                {
                    "prompt_id": "p",
                    "messages": [
                        {
                            "role": "user",
                            "content": [{"type": "image_url", "image_url": {"url": _png_data_url((28, 28))}}]
                            * 5,
                        }
                    ],
                }
            ]
        },
        422,
        "prompts.0.messages",
        "too_many_images",
    ),
    "too many prompts": (
        {
            "prompts": [
                {"prompt_id": str(i), "messages": [{"role": "user", "content": "x"}]} for i in range(1025)
            ]
        },
        422,
        "prompts",
        "validation_error",
    ),
    "n over the limit": ({**_with_image(_png_data_url((28, 28))), "n": 65}, 422, "n", "validation_error"),
    "max_tokens over the limit": (
        {**_with_image(_png_data_url((28, 28))), "sampling": {"max_tokens": 10**6}},
        422,
        "sampling.max_tokens",
        "validation_error",
    ),
    "unknown field": (
        {**_with_image(_png_data_url((28, 28))), "temperature": 0.5},
        422,
        "temperature",
        "validation_error",
    ),
    "prompt longer than the context": (
        {"prompts": [{"prompt_id": "p", "messages": [{"role": "user", "content": "red " * 600}]}]},
        400,
        "prompts.0.messages",
        "context_length_exceeded",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_a_4xx_naming_the_field_and_the_server_keeps_serving(server, case):
    body, status, field, code = BAD_REQUESTS[case]
    with server.client() as client:
        response = client.post("/v1/rollouts", json=body)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert (error["field"], error["code"]) == (field, code), error
        ok = client.post(
            "/v1/rollouts",
            json={
                "prompts": [{"prompt_id": "ok", "messages": [{"role": "user", "content": "hi"}]}],
                "sampling": {"max_tokens": 2},
            },
        )
        assert ok.status_code == 200, ok.text


def test_malformed_json_is_a_400_naming_the_body(server):
    with server.client() as client:
        response = client.post(
            "/v1/rollouts", content=b'{"prompts": [', headers={"content-type": "application/json"}
        )
        assert response.status_code == 400
        assert response.json()["error"] == {
            "field": "body",
            "code": "invalid_json",
            "message": response.json()["error"]["message"],
        }
        assert client.get("/ready").status_code == 200


def _metrics(server) -> str:
    with server.client() as client:
        return client.get("/metrics").text


def _wait_for_metrics(server, holds, what: str, timeout: float = 120) -> str:
    """Poll ``/metrics`` until ``holds(text)``; returns that text."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = _metrics(server)
        if holds(text):
            return text
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _long_request(text: str) -> dict:
    return {
        "prompts": [{"prompt_id": "long", "messages": [{"role": "user", "content": text}]}],
        "n": 2,
        "sampling": {"max_tokens": 400, "temperature": 0},
    }


def _runs_full_length(server, request: dict) -> bool:
    with server.client() as client:
        full = RolloutResponse.model_validate(client.post("/v1/rollouts", json=request, timeout=120).json())
    return [s.finish_reason for s in full.prompts[0].samples] == ["length", "length"]


def test_greedy_sampling_with_n_above_one_returns_n_equal_samples(server):
    request = {**_long_request("hi"), "sampling": {"max_tokens": 12, "temperature": 0}}
    with server.client() as client:
        response = client.post("/v1/rollouts", json=request)
    assert response.status_code == 200, response.text
    first, second = RolloutResponse.model_validate(response.json()).prompts[0].samples
    assert first.token_ids == second.token_ids and first.text == second.text
    assert first.logprobs == pytest.approx(second.logprobs)


def test_a_client_that_disconnects_frees_its_slot(server):
    # The abandoned request must not end on its own before the disconnect (or before the poll below sees it
    # start), or the abort is a race. Greedy decoding of the random tiny model is deterministic: pick a
    # prompt that runs its full budget.
    candidates = [_long_request(text) for text in ("Tell a long story.", "hi", "Count.", "Describe it.")]
    long = next((c for c in candidates if _runs_full_length(server, c)), None)
    assert long is not None, "every candidate prompt ends early under greedy decoding"
    before = _metrics(server)
    # The transformers backend reports each batch as it starts; vLLM takes the request at once.
    started = (
        "cppo_rollout_batch_size_count" if server.backend == "transformers" else "cppo_rollout_queue_depth"
    )
    aborted = 'cppo_rollout_samples_total{finish_reason="abort"}'
    generated = "cppo_rollout_generated_tokens_total"

    def grew(name: str, by: float):
        return lambda text: metric(text, name) - metric(before, name) >= by

    async def abandon() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=None) as client:
            request = asyncio.ensure_future(client.post("/v1/rollouts", json=long))
            await asyncio.to_thread(_wait_for_metrics, server, grew(started, 1), "the request to start")
            request.cancel()

    asyncio.run(abandon())
    if server.backend == "transformers":
        after = _wait_for_metrics(server, grew(aborted, 2), "both samples to be aborted")
        # Both samples stopped well before their 400-token budget.
        assert metric(after, aborted) - metric(before, aborted) == 2
        assert metric(after, generated) - metric(before, generated) < 2 * 400
    _wait_for_metrics(
        server, lambda text: metric(text, "cppo_rollout_queue_depth") == 0, "the queue to drain"
    )
    with server.client() as client:
        hello = {"prompts": [{"prompt_id": "ok", "messages": [{"role": "user", "content": "hi"}]}]}
        ok = client.post("/v1/rollouts", json={**hello, "sampling": {"max_tokens": 2}})
    assert ok.status_code == 200


def test_a_request_that_fails_on_one_prompt_stops_the_others(server):
    # Prompt 0 would run its whole 400-token budget; prompt 1 is longer than the context, which the
    # backend finds out while prompt 0 waits or runs. The 400 must stop prompt 0's generation too, and
    # its two samples count as aborted.
    candidates = [_long_request(text) for text in ("Tell a long story.", "hi", "Count.", "Describe it.")]
    long = next((c for c in candidates if _runs_full_length(server, c)), None)
    assert long is not None, "every candidate prompt ends early under greedy decoding"
    too_long = {"prompt_id": "too-long", "messages": [{"role": "user", "content": "red " * 600}]}
    before = _metrics(server)
    aborted = 'cppo_rollout_samples_total{finish_reason="abort"}'
    with server.client() as client:
        response = client.post("/v1/rollouts", json={**long, "prompts": [*long["prompts"], too_long]})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["field"] == "prompts.1.messages"
    after = _wait_for_metrics(
        server, lambda text: metric(text, "cppo_rollout_queue_depth") == 0, "the queue to drain"
    )
    assert metric(after, aborted) - metric(before, aborted) == 2
    generated = "cppo_rollout_generated_tokens_total"
    assert metric(after, generated) - metric(before, generated) < 2 * 400


def test_the_server_json_errors_follow_one_schema(server):
    with server.client() as client:
        response = client.post("/v1/chat/completions", json={"messages": [], "model": "x"})
    assert response.status_code == 422
    assert set(json.loads(response.text)["error"]) == {"field", "code", "message"}


def test_unknown_model_names_are_refused_by_chat_completions(server):
    with server.client() as client:
        response = client.post(
            "/v1/chat/completions", json={"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}
        )
    assert response.status_code == 404 and response.json()["error"]["field"] == "model"


# --- OpenAI and vLLM compatibility: streaming, token ids, the tokenizer routes, metrics ----------


def _chat(server, body: dict) -> dict:
    with server.client(timeout=120) as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _streamed(server, body: dict) -> list[dict]:
    """The chunks of a streamed chat completion, after checking the events' framing and the final [DONE]."""
    with (
        server.client(timeout=120) as client,
        client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response,
    ):
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def _assembled(chunks: list[dict], n: int) -> list[dict]:
    """Each choice put together from its chunks, after checking their order: the role first, the finish
    reason last, nothing after it."""
    choices = [{"text": "", "token_ids": [], "logprobs": [], "finish_reason": None} for _ in range(n)]
    seen_role = [False] * n
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk" and chunk["id"] == chunks[0]["id"]
        for part in chunk["choices"]:
            choice, index = choices[part["index"]], part["index"]
            assert choice["finish_reason"] is None, f"choice {index} has a chunk after its finish reason"
            if not seen_role[index]:
                assert part["delta"] == {"role": "assistant", "content": ""}, part
                seen_role[index] = True
                continue
            assert "role" not in part["delta"]
            choice["text"] += part["delta"].get("content", "")
            choice["token_ids"] += part["token_ids"] or []
            choice["logprobs"] += (part["logprobs"] or {"content": []})["content"]
            if part["finish_reason"] is not None:
                assert part["delta"] == {}
                choice["finish_reason"] = part["finish_reason"]
    assert all(choice["finish_reason"] for choice in choices), choices
    return choices


def _image_chat(image: Image.Image, **fields) -> dict:
    content = [
        {"type": "image_url", "image_url": {"url": encode_image_data_url(image)}},
        {"type": "text", "text": "What colour is the shape?"},
    ]
    return {"messages": [{"role": "user", "content": content}], **fields}


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 12}])
def test_a_streamed_chat_completion_is_the_whole_one_in_pieces(server, examples, sampling):
    body = _image_chat(
        examples[0].image,
        n=2,
        max_tokens=12,
        logprobs=True,
        top_logprobs=2,
        return_token_ids=True,
        **sampling,
    )
    whole = _chat(server, body)
    chunks = _streamed(server, {**body, "stream_options": {"include_usage": True}})
    # The prompt's tokens come once, in the first chunk; the usage alone, in the last.
    assert chunks[0]["prompt_token_ids"] == whole["prompt_token_ids"]
    assert all(chunk["prompt_token_ids"] is None for chunk in chunks[1:])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    streamed = _assembled(chunks[:-1], 2)
    for piecewise, choice in zip(streamed, whole["choices"], strict=True):
        assert piecewise["text"] == choice["message"]["content"]
        assert piecewise["token_ids"] == choice["token_ids"]
        assert piecewise["finish_reason"] == choice["finish_reason"]
        assert [t["token"] for t in piecewise["logprobs"]] == [
            t["token"] for t in choice["logprobs"]["content"]
        ]
        assert [t["logprob"] for t in piecewise["logprobs"]] == pytest.approx(
            [t["logprob"] for t in choice["logprobs"]["content"]], abs=LOGPROB_TOLERANCE[server.backend]
        )
        assert all(len(t["top_logprobs"]) == 2 for t in piecewise["logprobs"])
    completion_tokens = sum(len(choice["token_ids"]) for choice in whole["choices"])
    assert whole["usage"]["completion_tokens"] == completion_tokens
    assert whole["usage"]["prompt_tokens"] == len(whole["prompt_token_ids"])


def test_a_stop_string_is_held_back_from_the_stream(server):
    body = {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 16, "temperature": 0}
    text = _chat(server, body)["choices"][0]["message"]["content"]
    clean = [text[i : i + 3] for i in range(1, len(text) - 2)]
    stop = next(
        (s for s in clean if s.strip() and "\ufffd" not in s and s not in text[: text.index(s)]), None
    )
    if stop is None:
        pytest.skip(f"the greedy text {text!r} has no usable stop string")
    stopped = _chat(server, {**body, "stop": [stop]})["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["message"]["content"] == text[: text.index(stop)]
    streamed = _assembled(_streamed(server, {**body, "stop": [stop]}), 1)[0]
    assert streamed["text"] == stopped["message"]["content"] and streamed["finish_reason"] == "stop"


def test_the_openai_clients_streaming_api_works(server, examples):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    model = client.models.list().data[0].id
    body = _image_chat(examples[1].image, model=model, n=2, max_tokens=10, temperature=0.9, seed=5)
    whole = client.chat.completions.create(**body)
    texts, reasons, usage = ["", ""], [None, None], None
    for chunk in client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
        usage = chunk.usage or usage
    assert texts == [choice.message.content for choice in whole.choices]
    assert reasons == [choice.finish_reason for choice in whole.choices]
    assert usage == whole.usage
    # The client's stream helper, which accumulates the chunks into a completion as it reads them.
    with client.chat.completions.stream(**body) as stream:
        deltas = [event for event in stream if event.type == "content.delta"]
        final = stream.current_completion_snapshot
    assert [choice.message.content for choice in final.choices] == texts
    assert deltas[-1].snapshot in texts


def test_logprobs_line_up_with_completion_tokens_special_tokens_included(server, models):
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "n": 8,
        "max_tokens": 32,
        "temperature": 1.0,
        "seed": 2,
        "logprobs": True,
        "return_token_ids": True,
    }
    completion = _chat(server, body)
    tokenizer = load_processor(models["a"]).tokenizer
    special = set(tokenizer.all_special_ids)
    for choice in completion["choices"]:
        entries = choice["logprobs"]["content"]
        assert [entry["token"] for entry in entries] == [tokenizer.decode([t]) for t in choice["token_ids"]]
    sampled = [t for choice in completion["choices"] for t in choice["token_ids"]]
    assert special & set(sampled), "no special token was sampled: the test proves nothing"
    assert completion["usage"]["completion_tokens"] == len(sampled)


def test_tokenize_gives_the_tokens_generation_sees_and_detokenize_inverts_it(server, models, examples):
    tokenizer = load_processor(models["a"]).tokenizer
    body = _image_chat(examples[2].image, max_tokens=2, return_token_ids=True)
    prompt_ids = _chat(server, body)["prompt_token_ids"]
    text = "What colour is the shape? Red, grün or 青?"
    with server.client() as client:
        chat = client.post("/tokenize", json={"messages": body["messages"], "return_token_strs": True}).json()
        plain = client.post("/tokenize", json={"prompt": text}).json()
        back = client.post("/detokenize", json={"tokens": plain["tokens"]}).json()
        specials = client.post("/detokenize", json={"tokens": prompt_ids[:3]}).json()
    # The image is expanded into its tokens, as the model sees it.
    assert chat["tokens"] == prompt_ids and chat["count"] == len(prompt_ids) and chat["max_model_len"] == 512
    assert chat["token_strs"] == tokenizer.convert_ids_to_tokens(prompt_ids)
    assert prompt_ids.count(tokenizer.convert_tokens_to_ids("<|image_pad|>")) > 1
    assert plain["tokens"] == tokenizer.encode(text) and plain["token_strs"] is None
    assert back == {"prompt": text}
    assert specials["prompt"] == tokenizer.decode(prompt_ids[:3]) and specials["prompt"].startswith(
        "<|im_start|>"
    )


BAD_OPENAI_REQUESTS = {
    "an http image URL": (
        "/v1/chat/completions",
        {"messages": _with_image("http://example.com/cat.png")["prompts"][0]["messages"], "stream": True},
        400,
        "messages.0.content.0.image_url.url",
        "bad_url",
    ),
    "a streamed prompt longer than the context": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "red " * 600}], "stream": True},
        400,
        "messages",
        "context_length_exceeded",
    ),
    "stream options without a stream": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}},
        422,
        "stream_options",
        "validation_error",
    ),
    "a streamed request for another model": (
        "/v1/chat/completions",
        {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        404,
        "model",
        "model_not_found",
    ),
    "tokenize with a prompt and messages": (
        "/tokenize",
        {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]},
        422,
        "messages",
        "validation_error",
    ),
    "tokenize with neither": ("/tokenize", {}, 422, "messages", "validation_error"),
    "tokenize a prompt over the limit": (
        "/tokenize",
        {"prompt": "a" * 1_000_001},
        422,
        "prompt",
        "validation_error",
    ),
    "tokenize an http image": (
        "/tokenize",
        {"messages": _with_image("https://example.com/cat.png")["prompts"][0]["messages"]},
        400,
        "messages.0.content.0.image_url.url",
        "bad_url",
    ),
    "detokenize a token past the vocabulary": (
        "/detokenize",
        {"tokens": [1, 10**6]},
        422,
        "tokens.1",
        "unknown_token",
    ),
    "detokenize a negative token": ("/detokenize", {"tokens": [-1]}, 422, "tokens.0", "validation_error"),
    "detokenize too many tokens": (
        "/detokenize",
        {"tokens": [1] * 163_841},
        422,
        "tokens",
        "validation_error",
    ),
}


@pytest.mark.parametrize("case", list(BAD_OPENAI_REQUESTS))
def test_bad_openai_requests_get_a_json_4xx_naming_the_field_before_any_stream(server, case):
    path, body, status, field, code = BAD_OPENAI_REQUESTS[case]
    with server.client() as client:
        response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert (error["field"], error["code"]) == (field, code), error
    if code == "bad_url":
        assert "data: URL (base64)" in error["message"]


def test_a_streaming_client_that_disconnects_aborts_its_samples(server):
    candidates = [_long_request(text) for text in ("Tell a long story.", "hi", "Count.", "Describe it.")]
    long = next((c for c in candidates if _runs_full_length(server, c)), None)
    assert long is not None, "every candidate prompt ends early under greedy decoding"
    body = {"messages": long["prompts"][0]["messages"], "n": 2, "max_tokens": 400, "temperature": 0}
    before = _metrics(server)
    aborted = 'cppo_rollout_samples_total{finish_reason="abort"}'
    generated = "cppo_rollout_generated_tokens_total"
    with (
        httpx.Client(base_url=server.url, timeout=120) as client,
        client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response,
    ):
        lines = response.iter_lines()
        # Leave as soon as a token has arrived: the connection closes with the block.
        assert any('"content":' in line and '"role"' not in line for line in lines)
    after = _wait_for_metrics(
        server,
        lambda text: metric(text, aborted) - metric(before, aborted) >= 2,
        "both samples to be aborted",
    )
    assert metric(after, aborted) - metric(before, aborted) == 2
    assert metric(after, generated) - metric(before, generated) < 2 * 400
    _wait_for_metrics(
        server, lambda text: metric(text, "cppo_rollout_queue_depth") == 0, "the queue to drain"
    )
    assert _chat(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})


def test_the_engines_own_metrics_are_on_metrics_beside_ours(server):
    _chat(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0})
    text = _metrics(server)
    assert metric(text, "cppo_rollout_generated_tokens_total") > 0
    if server.backend == "transformers":
        assert "vllm:" not in text
        return
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("vllm:")}
    assert {"vllm:num_requests_running", "vllm:generation_tokens_total", "vllm:prompt_tokens_total"} <= names
    assert not any(line.startswith(("python_gc_", "process_")) for line in text.splitlines())
    tokens = sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("vllm:generation_tokens_total")
    )
    assert tokens >= 3
