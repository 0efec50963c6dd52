"""reward_server.client, the reward server as other trainers' reward: TRL's reward function in a real
GRPOTrainer step, verl's compute_score, and both against a live server (with a key) for known answers;
retries, timeouts, chunking and errors against small servers of the tests' own; and the README's examples
run as written."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from servers import app_in_a_thread, running_server
from transformers import Qwen2Config, Qwen2ForCausalLM

import reward_server.client
from reward_server.client import (
    API_KEY_ENV,
    URL_ENV,
    RewardServerClient,
    RewardServerError,
    TRLReward,
    compute_score,
    compute_score_batch,
    make_trl_reward,
    make_verl_compute_score,
)
from reward_server.examples.length_penalty import length_penalty
from reward_server.rewards import math_reward
from shared.launch import Service, free_port
from shared.schemas import ScoreItem, ScoreRequest, ScoreResponse, ScoreResult
from shared.tiny_model import train_tokenizer

KEY = "client-test-key"
REPO = Path(__file__).resolve().parents[1]
RIGHT = "<think>6 x 7 = 42</think> \\boxed{42}"
WRONG = "\\boxed{41}"
UNFORMATTED_RIGHT = "The answer is \\boxed{\\frac{84}{2}}."


CONTEXT_PLUGIN = """
from reward_server.plugins import reward_function


@reward_function("context", needs_ground_truth=False)
def context(
    response: str, ground_truth: str, prompt: str | None = None, data_source: str | None = None
) -> float:
    '''len(prompt) + 1000 for data_source 'geo'.'''
    return len(prompt or "") + 1000.0 * (data_source == "geo")
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The reward server with a key, the example plugin whose scores vary with a response's length, and one
    that scores the prompt and data source it is given."""
    plugin = tmp_path_factory.mktemp("plugin") / "context.py"
    plugin.write_text(CONTEXT_PLUGIN)
    args = ["--workers", "2", "--plugin", "reward_server.examples.length_penalty", "--plugin", str(plugin)]
    logs = tmp_path_factory.mktemp("logs")
    with running_server("reward-server", args, logs, env={API_KEY_ENV: KEY}) as service:
        yield service


@pytest.fixture
def keyed(monkeypatch: pytest.MonkeyPatch, server: Service) -> Service:
    """The server's address and key in the environment, as a verl run has them."""
    monkeypatch.setenv(URL_ENV, server.url)
    monkeypatch.setenv(API_KEY_ENV, KEY)
    return server


# --- TRL -----------------------------------------------------------------------------------------


def test_trl_reward_scores_known_answers_plain_and_conversational(server: Service) -> None:
    reward = make_trl_reward(server.url, reward={"math": 0.9, "format": 0.1}, api_key=KEY)
    assert reward.__name__ == "math+format"
    completions = [RIGHT, WRONG, UNFORMATTED_RIGHT]
    logged: dict[str, float] = {}
    plain = reward(
        prompts=["What is 6 x 7?"] * 3,
        completions=completions,
        solution=["42", "42", "42"],
        log_metric=logged.__setitem__,
    )
    assert plain == [1.0, 0.0, 0.9]
    assert logged == pytest.approx({"math+format/math": 2 / 3, "math+format/format": 1 / 3})
    conversation = [{"role": "user", "content": "What is 6 x 7?"}]
    as_messages = [
        [{"role": "assistant", "content": RIGHT}],
        # An earlier message of tool calls, and content as parts: the last assistant message's text counts.
        [
            {"role": "assistant", "content": None},
            {"role": "tool", "content": "42"},
            {"role": "assistant", "content": [{"type": "text", "text": WRONG}]},
        ],
        [{"role": "assistant", "content": UNFORMATTED_RIGHT}],
    ]
    # Ground truths as a dataset's integer column holds them.
    assert reward(prompts=[conversation] * 3, completions=as_messages, solution=[42, 42, 42]) == plain


def test_trl_reward_reads_the_configured_column_or_none(server: Service) -> None:
    by_answer = make_trl_reward(server.url, reward="math", ground_truth_column="answer", api_key=KEY)
    assert by_answer.__name__ == "math"
    assert by_answer(prompts=["q", "q"], completions=[RIGHT, WRONG], answer=["42", "42"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"no 'answer' column .*\['solution'\].*ground_truth_column"):
        by_answer(prompts=["q"], completions=[RIGHT], solution=["42"], trainer_state=None)
    format_only = make_trl_reward(server.url, reward="format", ground_truth_column=None, api_key=KEY)
    assert format_only(prompts=["q", "q"], completions=[RIGHT, WRONG]) == [1.0, 0.0]


def test_trl_reward_passes_the_prompt_and_data_source(server: Service) -> None:
    reward = make_trl_reward(server.url, reward="context", ground_truth_column=None, api_key=KEY)
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
    ]
    completions = ["r", [{"role": "assistant", "content": "r"}]]
    prompt = "Be brief.\n<image>What colour?"
    assert reward(["What is x?", conversation], completions) == [len("What is x?"), len(prompt)]
    # A dataset's data_source column, as verl-style datasets have.
    assert reward(["ab", "ab"], ["r", "r"], data_source=["geo", "chart"]) == [1002.0, 2.0]


def tiny_causal_lm(folder: Path) -> Path:
    """A two-layer Qwen2 language model with random weights and the project's offline tokenizer."""
    tokenizer = train_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_causal_lm(tmp_path_factory.mktemp("causal-lm"))


def test_grpo_trainer_trains_on_the_servers_rewards(server: Service, causal_lm: Path, tmp_path: Path) -> None:
    """One GRPOTrainer step on conversational prompts: every completion is scored as the reward functions
    score it in-process, and the trainer logs the mean of what the server returned."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    # The random policy never answers 42, but its completions' lengths vary, and so do their penalties.
    reward = make_trl_reward(
        server.url,
        reward={"math": 1.0, "length_penalty": 0.5},
        meta={"length_penalty": {"max_chars": 8}},
        api_key=KEY,
    )
    asked: list[tuple[list[ScoreItem], list[ScoreResult]]] = []
    score = reward.client.score

    def recording(items: list[ScoreItem]) -> list[ScoreResult]:
        asked.append((list(items), score(items)))
        return asked[-1][1]

    reward.client.score = recording  # type: ignore[method-assign]
    prompt = [{"role": "user", "content": "What is 6 x 7?"}]
    dataset = Dataset.from_dict({"prompt": [prompt] * 4, "solution": ["42"] * 4})
    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=12,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
    )
    trainer = GRPOTrainer(model=str(causal_lm), reward_funcs=[reward], args=args, train_dataset=dataset)
    trainer.train()

    assert len(asked) == 1
    items, results = asked[0]
    assert len(items) == 4
    expected = [
        math_reward(item.response, "42") + 0.5 * length_penalty(item.response, "42", max_chars=8)
        for item in items
    ]
    assert [(item.ground_truth, item.prompt) for item in items] == [("42", "What is 6 x 7?")] * 4
    assert [r.reward for r in results] == pytest.approx(expected, abs=1e-12)
    assert any(r.reward > 0 for r in results)  # so that the checks below can tell
    logs = trainer.state.log_history[0]
    mean = sum(r.reward for r in results) / 4
    assert logs["reward"] == pytest.approx(mean, rel=1e-6)
    assert logs["rewards/math+length_penalty/mean"] == pytest.approx(mean, rel=1e-6)
    penalties = [r.components["length_penalty"] for r in results]
    assert logs["math+length_penalty/length_penalty"] == pytest.approx(sum(penalties) / 4, rel=1e-6)


# --- verl ----------------------------------------------------------------------------------------


@pytest.mark.usefixtures("keyed")
def test_verl_compute_score_finds_the_server_in_the_environment() -> None:
    assert compute_score("openai/gsm8k", RIGHT, "42") == 1.0  # 0.9·math + 0.1·format by default
    assert compute_score("math", "\\boxed{0.75}", "\\frac{3}{4}", {"index": 3}) == 0.9
    assert compute_score("math", "no answer at all", "7") == 0.0
    assert compute_score("mc", "The answer is (B).", "B", reward="choice") == 1.0
    assert compute_score("chat", RIGHT, None, reward="format") == 1.0  # no ground truth in the data
    assert compute_score("geo", "r", None, reward="context") == 1000.0  # the data source, and no prompt
    # The batched form, given what verl's batch reward manager passes: numpy arrays of objects.
    sources = np.array(["a", "b", "c"], dtype=object)
    solutions = np.array([RIGHT, WRONG, UNFORMATTED_RIGHT], dtype=object)
    truths = np.array([42, "42", "42"], dtype=object)
    extras = np.array([None, {}, {"split": "train"}], dtype=object)
    assert compute_score_batch(sources, solutions, truths, extras) == [1.0, 0.0, 0.9]
    assert compute_score_batch(sources, solutions, truths, extras, reward="math") == [1.0, 0.0, 1.0]
    geo = np.array(["geo", "chart", "geo"], dtype=np.str_)
    assert compute_score_batch(geo, solutions, truths, extras, reward="context") == [1000.0, 0.0, 1000.0]


@pytest.mark.usefixtures("keyed")
def test_verl_loads_compute_score_from_the_files_path() -> None:
    """As verl's get_custom_reward_fn does: the file imported by path, reward_kwargs added to each call."""
    spec = importlib.util.spec_from_file_location("custom_module", reward_server.client.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Mappings that are not dicts, as omegaconf's DictConfig from a Hydra command line is not.
    reward_kwargs = {
        "reward": MappingProxyType({"iou": 2.0}),
        "meta": MappingProxyType({"iou": MappingProxyType({"mode": "continuous"})}),
    }
    # IoU 0.25, which the default threshold mode would score 0.
    score = module.compute_score("d", "[0, 0, 10, 10]", "[0, 0, 10, 40]", None, **reward_kwargs)
    assert score == 0.5


def test_verl_factory_and_a_missing_url(server: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    score = make_verl_compute_score(server.url, reward="math", api_key=KEY)
    assert [score("d", RIGHT, "42"), score("d", WRONG, "42", None)] == [1.0, 0.0]
    assert make_verl_compute_score(server.url, reward="context", api_key=KEY)("geo", "r", None) == 1000.0
    monkeypatch.delenv(URL_ENV, raising=False)
    with pytest.raises(RewardServerError, match=f"set {URL_ENV}="):
        compute_score("d", RIGHT, "42")


# --- failures ------------------------------------------------------------------------------------


def test_refusals_and_bad_addresses_say_what_is_wrong(server: Service) -> None:
    with pytest.raises(ValueError, match="'localhost:5000' is not an http"):
        RewardServerClient("localhost:5000")
    with pytest.raises(RewardServerError, match=r"refused the request: 422 items\.0\.reward"):
        make_trl_reward(server.url, reward="no_such_function", api_key=KEY)(["q"], [RIGHT], solution=["42"])
    with pytest.raises(RewardServerError, match="refused the request: 401 Authorization"):
        make_trl_reward(server.url, api_key="wrong")(["q"], [RIGHT], solution=["42"])
    nowhere = RewardServerClient(f"http://127.0.0.1:{free_port()}", attempts=2)
    with pytest.raises(
        RewardServerError, match=r"cannot reach the reward server at .* \(2 tries\): ConnectError"
    ):
        nowhere.score([ScoreItem(id="a", response="1", ground_truth="1", reward="exact")])


def scores_by_id(items: list[ScoreItem]) -> JSONResponse:
    """What a reward server answers, each item's reward its id read as a number."""
    results = [ScoreResult(id=i.id, reward=float(i.id), status="ok") for i in items]
    return JSONResponse(ScoreResponse(results=results).model_dump())


@pytest.mark.parametrize("status", [429, 503])
def test_a_busy_servers_retry_after_is_honoured(status: int) -> None:
    asked: list[float] = []
    app = FastAPI()

    @app.post("/v1/score")
    async def score(request: Request) -> JSONResponse:
        asked.append(time.monotonic())
        if len(asked) == 1:
            return JSONResponse(
                {"error": {"message": "busy"}}, status_code=status, headers={"Retry-After": "1"}
            )
        return scores_by_id(ScoreRequest.model_validate_json(await request.body()).items)

    with app_in_a_thread(app) as port:
        score_fn = make_verl_compute_score(f"http://127.0.0.1:{port}", reward="exact")
        assert score_fn("d", "7", "7") == 0.0  # item "0"
    # Asked again after the second the server asked for; the backoff alone starts at 0.2 s.
    assert len(asked) == 2 and asked[1] - asked[0] >= 0.95


def test_a_server_that_does_not_answer_times_out() -> None:
    asked: list[float] = []
    app = FastAPI()

    @app.post("/v1/score")
    async def score() -> JSONResponse:
        asked.append(time.monotonic())
        await asyncio.sleep(5)
        return JSONResponse({})

    with app_in_a_thread(app) as port:
        client = RewardServerClient(f"http://127.0.0.1:{port}", timeout_s=0.5, attempts=2)
        started = time.monotonic()
        with pytest.raises(RewardServerError, match=r"did not answer within 0\.5 s \(2 tries\): ReadTimeout"):
            client.score([ScoreItem(id="a", response="1", ground_truth="1", reward="exact")])
        waited = time.monotonic() - started
    assert len(asked) == 2 and waited >= 1.0


def test_large_calls_are_split_at_the_item_limit_in_order() -> None:
    sizes: list[int] = []
    app = FastAPI()

    @app.post("/v1/score")
    async def score(request: Request) -> JSONResponse:
        items = ScoreRequest.model_validate_json(await request.body()).items
        sizes.append(len(items))
        return scores_by_id(items)

    with (
        app_in_a_thread(app) as port,
        RewardServerClient(f"http://127.0.0.1:{port}", max_items=2) as client,
    ):
        reward = TRLReward(client, "exact", "solution", None, "exact")
        assert reward(["q"] * 5, ["r"] * 5, solution=["t"] * 5) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert sizes == [2, 2, 1]
    with pytest.raises(ValueError, match=r"max_items must be within 1\.\.10000"):
        RewardServerClient("http://127.0.0.1:5000", max_items=10_001)


# --- README --------------------------------------------------------------------------------------


def readme_python_after(marker: str) -> str:
    readme = (REPO / "README.md").read_text()
    start = readme.index("```python\n", readme.index(marker)) + len("```python\n")
    return readme[start : readme.index("```\n", start)]


def run_snippet(code: str, cwd: Path, env: dict[str, str]) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=cwd,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_the_readmes_trl_example_runs_as_written(server: Service, causal_lm: Path, tmp_path: Path) -> None:
    code = readme_python_after("make_trl_reward")
    # Only where the server is and which model it trains differ from the README's own setup.
    assert "http://127.0.0.1:5000" in code and '"Qwen/Qwen2.5-0.5B-Instruct"' in code
    code = code.replace("http://127.0.0.1:5000", server.url)
    code = code.replace('"Qwen/Qwen2.5-0.5B-Instruct"', repr(str(causal_lm)))
    lines = run_snippet(code, tmp_path, {API_KEY_ENV: KEY})
    assert lines[0] == "[1.0, 0.0]"
    assert re.fullmatch(r"-?\d+\.\d+", lines[-1]), lines  # the step's logged mean reward


def test_the_readmes_verl_example_runs_as_written(server: Service, tmp_path: Path) -> None:
    code = readme_python_after("compute_score(")
    lines = run_snippet(code, tmp_path, {URL_ENV: server.url, API_KEY_ENV: KEY})
    assert lines == ["1.0", "[1.0, 0.0]"]
