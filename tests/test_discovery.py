"""Replica discovery by a name that resolves only while a replica is ready (a headless Service with
``publishNotReadyAddresses: false``): the trainer waits for the name instead of exiting, and a name that
stops resolving mid-run is an outage it rides out.

The trainer runs in a mount namespace of its own whose /etc/hosts is a file of the test's, so the test
makes the name resolve, and stop resolving, through the system's real resolver.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from servers import running_server

from shared.launch import free_port
from shared.synth_data import SynthSettings, write_dataset
from shared.tiny_model import build_tiny_model
from trainer.clients import ReplicaError, RolloutReplicas

REPO = Path(__file__).resolve().parents[1]
# RFC 6761: names under .invalid never resolve, whatever the network.
NOWHERE = "cppo-rollout-headless.invalid"
# The name the test lists in, and removes from, the trainer's /etc/hosts.
SERVICE = "cppo-rollout-headless"
# Runs its arguments with the file $0 in place of /etc/hosts, seen by that process tree only.
WITH_HOSTS = [
    "unshare",
    "--user",
    "--map-root-user",
    "--mount",
    "sh",
    "-c",
    'mount --bind "$0" /etc/hosts && exec "$@"',
]


def test_a_name_that_does_not_resolve_is_no_replica_yet_and_the_wait_says_so(caplog):
    replicas = RolloutReplicas([], f"http://{NOWHERE}:8000", None, 5, attempts=1, outage_s=1)
    try:
        assert replicas.urls == [] and replicas.live() == []
        assert replicas.unresolved and replicas.unresolved.startswith(f"{NOWHERE} does not resolve (")
        started = time.monotonic()
        with pytest.raises(
            ReplicaError, match=rf"no rollout replica became ready in 2 s: {NOWHERE} does not"
        ):
            replicas.wait_until_ready(2)
        # It waited out its time, polling the name, instead of failing at the first lookup.
        assert time.monotonic() - started >= 2
        assert f"waiting for a rollout replica (0 s of 2): {NOWHERE} does not resolve" in caplog.text
    finally:
        replicas.close()


def _hosts_namespaces_work(hosts: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run([*WITH_HOSTS, str(hosts), "true"], capture_output=True, timeout=30, check=False)
    return probe.returncode == 0


def _wait_for(condition, what: str, process: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the trainer exited while waiting for {what}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()}"
        time.sleep(0.2)


def _steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_the_trainer_waits_for_the_name_to_resolve_and_rides_out_its_absence(tmp_path):
    hosts = tmp_path / "hosts"
    system_hosts = Path("/etc/hosts").read_text()
    hosts.write_text(system_hosts)
    if not _hosts_namespaces_work(hosts):
        pytest.skip("unshare cannot make a user and mount namespace here (needed for a private /etc/hosts)")
    model = build_tiny_model(tmp_path / "model", seed=0)
    data = write_dataset(tmp_path / "data", SynthSettings(train=48, test=16, seed=0, image_size=56))
    rollout_port = free_port()
    config = {
        "seed": 3,
        "run_dir": str(tmp_path / "run"),
        "model": {"path": str(model)},
        "data": {"path": str(data), "tasks": ["colour"], "instruction": ""},
        "rollout": {
            "discover": f"http://{SERVICE}:{rollout_port}",
            "n": 4,
            "max_tokens": 2,
            "ready_timeout_s": 120,
            "outage_s": 120,
        },
        "reward": {"reward": {"exact": 1.0}, "accuracy": "exact"},
        "train": {"steps": 10, "prompts_per_step": 4, "micro_batch_size": 8, "lr": 1e-3},
        "checkpoint": {"every": 0},
        "eval": {"every": 0},
        "log": {"tensorboard": False, "progress": False},
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "trainer.log"
    rollout_args = ["--model", str(model), "--weights-root", str(tmp_path)]
    with (
        running_server("rollout-server", rollout_args, logs, port=rollout_port),
        running_server("reward-server", ["--workers", "1"], logs) as reward,
    ):
        config["reward"]["url"] = reward.url
        (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
        command = [*WITH_HOSTS, str(hosts), sys.executable, "-m", "shared.cli", "train"]
        env = {**os.environ, "MASTER_PORT": str(free_port())}
        with log.open("w") as stderr:
            process = subprocess.Popen(
                [*command, "--config", str(tmp_path / "train.yaml")],
                env=env,
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                text=True,
            )
        try:
            # Before the name resolves, the trainer waits (it used to exit at once with status 2).
            waiting = f"waiting for a rollout replica (0 s of 120): {SERVICE} does not resolve"
            _wait_for(lambda: waiting in log.read_text(), "the wait for the name", process, log)
            hosts.write_text(system_hosts + f"127.0.0.1 {SERVICE}\n")
            _wait_for(lambda: 1 in _steps(tmp_path / "run"), "step 1", process, log)
            # Mid-run the name goes away (the replica unready): an outage, not the end of the run.
            hosts.write_text(system_hosts)
            _wait_for(lambda: "no rollout replica is left" in log.read_text(), "the outage", process, log)
            hosts.write_text(system_hosts + f"127.0.0.1 {SERVICE}\n")
            process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    output = log.read_text()
    assert process.returncode == 0, output
    assert f"no rollout replica is left ({SERVICE} does not resolve (" in output
    assert _steps(tmp_path / "run") == list(range(1, 11))
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # Every step trained on all its prompts: 4 prompts x 4 responses.
    assert all(m["rows"] + 4 * m["groups_dropped"] == 16 for m in metrics)
