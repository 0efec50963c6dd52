# syntax=docker/dockerfile:1
# Trainer, CPU only (the demo). Build from the repository root:
#   docker build -f deploy/docker/trainer-cpu.Dockerfile -t cppo/trainer-cpu:0.1.0 .
# Also the image of the one-shot `prepare` step (cppo tiny-model / cppo synth-data). The training config is
# a file given with --config (the repository's configs/ are copied to /opt/cppo/configs) plus key=value
# overrides; API keys come from CPPO_ROLLOUT_API_KEY and CPPO_REWARD_API_KEY.
ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared shared
COPY trainer trainer
COPY rollout_server rollout_server
COPY reward_server reward_server
RUN pip install .

FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin cppo \
    && mkdir -p /data && chown cppo:cppo /data
COPY --from=build /opt/venv /opt/venv
COPY configs /opt/cppo/configs
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/home/cppo/.cache/huggingface
USER 10001:10001
WORKDIR /home/cppo
# A batch job with no HTTP server: its health is its exit code and the run folder's metrics.jsonl.
HEALTHCHECK NONE
CMD ["cppo", "train", "--config", "/opt/cppo/configs/demo.yaml"]
