"""The rollout server's parts, one at a time: sampling, the version gate, weight checks, auth, readiness."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from servers import running_server

from rollout_server.app import create_app
from rollout_server.backend import SamplingSpec, WeightsLoadError
from rollout_server.config import RolloutSettings
from rollout_server.service import VersionGate, derive_seed, gather_or_cancel
from rollout_server.transformers_backend import _Row, draw, processed_logprobs, sample_seed
from rollout_server.weights import WeightsStager, check_compatible, tensor_layout
from shared.settings import exposure_problem, warn_if_exposed
from shared.tiny_model import build_tiny_model

LN = math.log


# --- sampling ------------------------------------------------------------------------------------


def probs(logits: list[float], **sampling) -> list[float]:
    return processed_logprobs(torch.tensor(logits), SamplingSpec(**sampling)).exp().tolist()


def test_processed_logprobs_by_hand():
    logits = [LN(1), LN(2), LN(3), LN(4)]  # p = [.1, .2, .3, .4]
    assert probs(logits) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    # T = 2: p ∝ √[1, 2, 3, 4] = [1, 1.414214, 1.732051, 2] / 6.146264
    assert probs(logits, temperature=2.0) == pytest.approx([0.162700, 0.230093, 0.281805, 0.325401], abs=1e-6)
    # top-k 2 keeps .3 and .4: renormalised [3/7, 4/7]
    assert probs(logits, top_k=2) == pytest.approx([0, 0, 3 / 7, 4 / 7])
    # top-p .5: sorted [.4, .3, .2, .1], mass before each [0, .4, .7, .9]; dropped where it is ≥ .5
    assert probs(logits, top_p=0.5) == pytest.approx([0, 0, 3 / 7, 4 / 7])
    # top-p .4: the mass before .3 is .4, already enough: only .4 is kept
    assert probs(logits, top_p=0.4) == pytest.approx([0, 0, 0, 1])
    # greedy reports the model's own distribution
    assert probs(logits, temperature=0.0) == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_gumbel_max_sampling_draws_from_the_processed_distribution():
    # 20 000 draws from p = [.1, .2, .3, .4]: each frequency within 4 standard errors (~0.014).
    logits = torch.tensor([[LN(1), LN(2), LN(3), LN(4)]])
    row = _Row(SamplingSpec(max_tokens=20_000), torch.Generator().manual_seed(0))
    for _ in range(20_000):
        draw([row], logits, suppressed_ids=[])
    counts = torch.bincount(torch.tensor(row.tokens), minlength=4).float() / 20_000
    torch.testing.assert_close(counts, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.014, rtol=0)
    assert row.logprobs[0] == pytest.approx(LN([0.1, 0.2, 0.3, 0.4][row.tokens[0]]), abs=1e-6)


def test_suppressed_tokens_are_never_drawn():
    logits = torch.tensor([[0.0, 5.0, 0.0]])
    row = _Row(SamplingSpec(max_tokens=500), torch.Generator().manual_seed(1))
    for _ in range(500):
        draw([row], logits, suppressed_ids=[1])
    assert 1 not in row.tokens and {0, 2} <= set(row.tokens)
    assert all(lp == pytest.approx(LN(0.5)) for lp in row.logprobs)


def test_seeds_are_derived_deterministically():
    assert sample_seed(7, 0) == sample_seed(7, 0) != sample_seed(7, 1)
    assert sample_seed(None, 0) != sample_seed(None, 0)
    assert derive_seed(3, "p1", "clean") == derive_seed(3, "p1", "clean")
    assert (
        len({derive_seed(3, "p1", "clean"), derive_seed(3, "p2", "clean"), derive_seed(3, "p1", "positive")})
        == 3
    )
    assert all(0 <= derive_seed(s, "x") < 2**63 for s in (0, 2**62))


# --- the version gate ----------------------------------------------------------------------------


def test_version_gate_lets_readers_share_and_a_writer_wait_for_them():
    async def scenario() -> list[str]:
        gate, events = VersionGate(), []
        first_reading, release = asyncio.Event(), asyncio.Event()

        async def reader(name: str, hold: asyncio.Event | None) -> None:
            async with gate.reading():
                events.append(f"{name} in")
                if hold is not None:
                    first_reading.set()
                    await hold.wait()
                events.append(f"{name} out")

        async def writer() -> None:
            await first_reading.wait()
            async with gate.writing():
                events.append("swap")

        tasks = [asyncio.create_task(reader("r1", release)), asyncio.create_task(writer())]
        await first_reading.wait()
        # Let the writer queue up, then a late reader arrive: it must wait for the swap.
        for _ in range(5):
            await asyncio.sleep(0)
        tasks.append(asyncio.create_task(reader("r2", None)))
        for _ in range(5):
            await asyncio.sleep(0)
        release.set()
        await asyncio.gather(*tasks)
        return events

    assert asyncio.run(scenario()) == ["r1 in", "r1 out", "swap", "r2 in", "r2 out"]


# --- weight checks -------------------------------------------------------------------------------


def test_weight_layouts_are_compared_from_headers(tiny, tmp_path):
    same = build_tiny_model(tmp_path / "same", seed=5)
    other = build_tiny_model(tmp_path / "other", profile="vllm")
    check_compatible(tensor_layout(same), tensor_layout(tiny))
    with pytest.raises(WeightsLoadError, match="shape") as refused:
        check_compatible(tensor_layout(other), tensor_layout(tiny))
    assert "and" in str(refused.value)  # more than five problems are summarised
    layout = tensor_layout(tiny)
    name = next(iter(layout))
    with pytest.raises(WeightsLoadError, match=f"missing {name}"):
        check_compatible({k: v for k, v in layout.items() if k != name}, layout)


def test_stager_refuses_paths_outside_the_root_and_non_checkpoints(tiny, tmp_path):
    stager = WeightsStager(tiny, root=tmp_path)
    with pytest.raises(WeightsLoadError, match="outside the weights root"):
        stager.folder_for_path(str(tiny))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(WeightsLoadError, match="neither a checkpoint folder nor"):
        stager.folder_for_path(str(tmp_path / "notes.txt"))
    staged = stager.folder_for_bytes((tiny / "model.safetensors").read_bytes())
    assert (staged / "config.json").exists() and tensor_layout(staged) == stager.layout


@pytest.mark.parametrize("path", ["\x00", "ok/\x00/x", "a" * 300, "/" + "a" * 300 + "/model.safetensors"])
def test_stager_refuses_paths_the_file_system_cannot_look_up(tiny, path):
    # A NUL byte fails to resolve; a name over 255 bytes fails the lookup (a 500 from POST /v1/weights once).
    with pytest.raises(WeightsLoadError, match="cannot be"):
        WeightsStager(tiny).folder_for_path(path)


# --- settings, auth and readiness ----------------------------------------------------------------


def test_refuses_to_serve_openly_on_a_reachable_address(tiny):
    """Without a key, anyone who can reach the server could sample from it and replace its weights, even
    with weight updates off; --insecure-no-auth serves anyway, with a warning."""
    command = [
        sys.executable,
        "-m",
        "shared.cli",
        "rollout-server",
        "--model",
        str(tiny),
        "--host",
        "0.0.0.0",
    ]
    for extra in ([], ["--no-enable-weight-updates"]):
        result = subprocess.run([*command, *extra], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "refusing to serve on 0.0.0.0 without an API key" in result.stderr
    allowed = [
        RolloutSettings(model="m", host="0.0.0.0", api_key="k"),
        RolloutSettings(model="m", host="0.0.0.0", insecure_no_auth=True),
        RolloutSettings(model="m", host="127.0.0.1"),
        RolloutSettings(model="m", host="::1"),
    ]
    assert [exposure_problem(s.host, s.api_key, s.insecure_no_auth) for s in allowed] == [None] * 4


def test_insecure_no_auth_warns(capsys):
    warn_if_exposed("0.0.0.0", None)
    assert "warning" in capsys.readouterr().err
    warn_if_exposed("127.0.0.1", None)
    assert capsys.readouterr().err == ""


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("CPPO_ROLLOUT_MODEL", "/models/x")
    monkeypatch.setenv("CPPO_ROLLOUT_MAX_BATCH_SIZE", "7")
    settings = RolloutSettings()
    assert (settings.model, settings.max_batch_size) == ("/models/x", 7)


def test_an_api_key_guards_every_route_but_health_ready_and_metrics(tiny, tmp_path):
    args = ["--model", str(tiny), "--api-key", "s3cret", "--no-enable-weight-updates"]
    with running_server("rollout-server", args, tmp_path) as server, server.client() as client:
        for open_path in ("/health", "/ready", "/metrics"):
            assert client.get(open_path).status_code == 200
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        denied = client.get("/v1/weights")
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "unauthorized"
        authorised = {"Authorization": "Bearer s3cret"}
        assert client.get("/v1/models", headers=authorised).status_code == 200
        # With updates disabled there is no route to post weights to.
        update = client.post("/v1/weights", json={"path": str(tiny), "version": 1}, headers=authorised)
        assert update.status_code == 405


def test_ready_reports_a_model_that_failed_to_load(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    app = create_app(RolloutSettings(model=str(tmp_path)))

    async def probe() -> tuple[httpx.Response, httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                for _ in range(200):
                    ready = await client.get("/ready")
                    if app.state.startup.error is not None:
                        break
                    await asyncio.sleep(0.05)
                return ready, await client.post("/v1/rollouts", json={"prompts": []})

    ready, rollouts = asyncio.run(probe())
    assert ready.status_code == 503 and ready.json()["ready"] is False
    assert "safetensors" in ready.json()["detail"]
    assert rollouts.status_code == 503 and rollouts.json()["error"]["code"] == "not_ready"


def test_gather_or_cancel_stops_the_rest_at_the_first_failure():
    # One thread: the failing call runs first, so the two behind it have not started when it fails,
    # and must never start. A coroutine waiting alongside is cancelled.
    ran: list[str] = []

    def fail() -> None:
        ran.append("fail")
        raise ValueError("bad image")

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(1))
        waiter = asyncio.ensure_future(asyncio.Event().wait())
        with pytest.raises(ValueError, match="bad image"):
            await gather_or_cancel(
                asyncio.to_thread(fail),
                asyncio.to_thread(ran.append, "b"),
                asyncio.to_thread(ran.append, "c"),
                waiter,
            )
        await asyncio.sleep(0)  # let the cancellations land
        assert waiter.cancelled()
        await loop.run_in_executor(None, ran.append, "after")  # the executor works, and ran what it had

    asyncio.run(scenario())
    assert ran == ["fail", "after"]


def test_gather_or_cancel_returns_results_in_order():
    async def twice(x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    assert asyncio.run(gather_or_cancel(twice(1), asyncio.to_thread(lambda: 5), twice(3))) == [2, 5, 6]


# --- failing fast, in one line -------------------------------------------------------------------


def test_model_and_dataset_references_are_checked_before_anything_loads(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from shared.hub import reference_problem

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "file").write_text("")
    assert reference_problem(str(tmp_path / "model"), "--model", "config.json") is None
    assert reference_problem("Qwen/Qwen2.5-VL-3B-Instruct", "--model") is None  # the hub may hold it
    assert reference_problem("gpt2", "--model") is None
    problems = {
        str(tmp_path): "is a folder without config.json",
        str(tmp_path / "file"): "is a file, not a folder",
        str(tmp_path / "nope"): "no such folder (and not a hub id",  # absolute: never a hub id
        "runs/demo/modell": "no such folder (and not a hub id",
        f"{tmp_path.name}/nope": "no such folder in",  # could be ORG/NAME, but ORG is a local folder
    }
    monkeypatch.chdir(tmp_path.parent)
    for reference, why in problems.items():
        assert why in (reference_problem(reference, "--model", "config.json") or ""), reference
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "the hub is offline" in (reference_problem("Qwen/Qwen2.5-VL-3B-Instruct", "--model") or "")


@pytest.mark.parametrize(
    ("model", "env", "why"),
    [
        ("/no/such/model", {}, "--model /no/such/model: no such folder"),
        ("Org/model", {"HF_HUB_OFFLINE": "1"}, "--model Org/model: no such folder, and the hub is offline"),
    ],
)
def test_a_model_that_cannot_exist_stops_the_rollout_server_in_one_line(model, env, why):
    command = [sys.executable, "-m", "shared.cli", "rollout-server", "--model", model]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert done.returncode == 2
    assert done.stderr.strip().startswith(f"cppo rollout-server: error: {why}")
    assert "Traceback" not in done.stderr


def test_a_model_that_fails_to_load_stops_the_rollout_server_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a folder that looks like a model and is not one
    command = [sys.executable, "-m", "shared.cli", "rollout-server", "--model", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("cppo rollout-server: error: the service failed to start:")
    assert "Traceback" not in done.stderr
