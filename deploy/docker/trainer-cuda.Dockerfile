# syntax=docker/dockerfile:1
# Trainer on NVIDIA GPUs: a CUDA PyTorch base (the torch the project pins) with DeepSpeed. Build from the
# repository root:
#   docker build -f deploy/docker/trainer-cuda.Dockerfile -t cppo/trainer-cuda:0.1.0 .
# One process per GPU under a standard launcher, e.g.
#   torchrun --nnodes N --nproc_per_node G -m trainer --config FILE     (or: deepspeed --module trainer ...)
# The base is a -devel image: DeepSpeed compiles its fused ops (Adam, ZeRO helpers) with nvcc at first use.
ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm
ARG TORCH_CUDA_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-devel

FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
COPY deploy/docker/pip.sh /usr/local/bin/cppo-pip
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared shared
COPY trainer trainer
COPY rollout_server rollout_server
COPY reward_server reward_server
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=ca.pem cppo-pip wheel --no-deps --wheel-dir /wheels .

FROM ${TORCH_CUDA_IMAGE} AS runtime
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
ARG DEEPSPEED_VERSION=0.19.8
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
COPY --from=wheel /usr/local/bin/cppo-pip /usr/local/bin/cppo-pip
COPY --from=wheel /wheels /tmp/wheels
# torch stays the base's CUDA build: it is held by the constraint, so nothing can replace it with another.
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=ca.pem python -c "import torch; print(f'torch=={torch.__version__.split(\"+\")[0]}')" > /tmp/constraints.txt \
    && cppo-pip install --constraint /tmp/constraints.txt "deepspeed==${DEEPSPEED_VERSION}" /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels /tmp/constraints.txt \
    && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin cppo \
    && mkdir -p /data && chown cppo:cppo /data
COPY configs /opt/cppo/configs
ENV PYTHONUNBUFFERED=1 \
    HF_HOME=/home/cppo/.cache/huggingface
USER 10001:10001
WORKDIR /home/cppo
HEALTHCHECK NONE
CMD ["python", "-m", "trainer", "--config", "/opt/cppo/configs/demo.yaml"]
