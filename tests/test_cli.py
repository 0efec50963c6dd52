"""The ``cppo`` console script, run as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import load_dataset

from shared.vlm import load_model, load_processor

CPPO = str(Path(sys.executable).parent / "cppo")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CPPO, *args], capture_output=True, text=True, timeout=120)


def test_help_lists_the_subcommands():
    result = run("--help")
    assert result.returncode == 0
    # The services' commands come from entry points: this shows the installed metadata has them.
    for command in (
        "tiny-model",
        "synth-data",
        "rollout-server",
        "reward-server",
        "train",
        "stack",
        "export",
        "openapi",
    ):
        assert command in result.stdout
    assert "--profile" in run("tiny-model", "--help").stdout


@pytest.mark.parametrize("profile", ["transformers", "vllm"])
def test_tiny_model_command_builds_a_loadable_model(tmp_path, profile):
    result = run("tiny-model", str(tmp_path / "m"), "--profile", profile)
    assert result.returncode == 0, result.stderr
    assert "written to" in result.stdout
    model = load_model(tmp_path / "m")
    assert model.config.model_type == "qwen2_5_vl"
    assert load_processor(tmp_path / "m").tokenizer.convert_tokens_to_ids("<|image_pad|>") is not None


def test_synth_data_command_writes_both_splits(tmp_path):
    result = run("synth-data", str(tmp_path / "d"), "--train", "8", "--test", "4", "--seed", "3")
    assert result.returncode == 0, result.stderr
    data = load_dataset(
        "parquet", data_files={s: str(tmp_path / "d" / f"{s}.parquet") for s in ("train", "test")}
    )
    assert (data["train"].num_rows, data["test"].num_rows) == (8, 4)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("synth-data", "x", "--train", "-3"), "--train: must be >= 0"),
        (("synth-data", "x", "--image-size", "9"), "--image-size must be between 56 and 1024"),
        (("tiny-model", "x", "--profile", "jax"), "invalid choice: 'jax'"),
        (("no-such-command",), "invalid choice"),
    ],
)
def test_bad_arguments_give_one_clear_line_and_no_traceback(tmp_path, args, message):
    result = subprocess.run([CPPO, *args], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unwritable_output_folder_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run("synth-data", str(blocker / "d"), "--train", "1", "--test", "1")
    assert result.returncode == 2
    assert "error:" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("service", ["rollout-server", "reward-server"])
def test_the_committed_api_reference_is_up_to_date(service):
    committed = Path(__file__).parent.parent / "docs" / "api" / f"{service}.openapi.json"
    result = run("openapi", service)
    assert result.returncode == 0, result.stderr
    assert result.stdout == committed.read_text(), "the API changed: run `make docs` and commit docs/api"


@pytest.mark.parametrize("service", ["rollout", "reward"])
def test_the_readme_documents_every_server_setting(service):
    from reward_server.config import RewardSettings
    from rollout_server.config import RolloutSettings

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    settings = {"rollout": RolloutSettings, "reward": RewardSettings}[service]
    for name in settings.model_fields:
        assert f"`--{name.replace('_', '-')}" in readme, name
        assert f"`CPPO_{service.upper()}_{name.upper()}`" in readme, name


def test_help_config_lists_every_key_whole_at_80_columns_when_piped():
    from trainer.config import describe_fields

    env = {**os.environ, "COLUMNS": "80"}
    command = [CPPO, "train", "--help-config"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    entries = [line for line in lines if not line.startswith(" ")]
    keys = [key for key, *_ in describe_fields()]
    assert [entry.split(":")[0] for entry in entries] == keys
    assert "train.lr: float = 1e-06" in entries


def test_a_trainer_command_error_is_its_only_line(tmp_path):
    # Not preceded by DeepSpeed's warning that it fell back to the CPU: the trainer names the accelerator.
    result = run("export", str(tmp_path / "no-checkpoint"), str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"cppo export: error: {tmp_path / 'no-checkpoint'} is not a checkpoint "
        "(no policy/config.json or adapter_config.json)"
    ]


def test_a_failed_service_is_shown_by_its_last_lines_without_the_access_log(tmp_path):
    from shared.launch import Service

    log = tmp_path / "rollout-server.log"
    poll = 'INFO:     127.0.0.1:{} - "GET /ready HTTP/1.1" 503 Service Unavailable'
    polls = [poll.format(5000 + i) for i in range(50)]
    said = ["ERROR:    the service failed to start: OSError: no such model", "cppo rollout-server: error: …"]
    lines = ["INFO:     Started server process [1]", *polls, *said]
    log.write_text("\n".join(lines) + "\n")
    service = Service("http://127.0.0.1:1", subprocess.Popen(["true"]), log)
    service.process.wait()
    assert service.tail().splitlines() == [lines[0], *said]
