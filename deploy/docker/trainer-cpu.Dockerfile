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
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
COPY deploy/docker/pip.sh /usr/local/bin/cppo-pip
# An extra index, not the only one: its torch==2.13.0+cpu outranks PyPI's 2.13.0 (a local version sorts
# higher), and torch's own dependencies come from the main index, so an index holding only torch is enough.
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=ca.pem \
    cppo-pip install --extra-index-url "${TORCH_INDEX_URL}" torch==2.13.0
# DeepSpeed with its shared-memory op (deepspeed.comm on CPU, loaded by init_distributed) compiled now, into
# the package: DeepSpeed then imports it instead of JIT-compiling it at run time, so the runtime stage needs
# no compiler, no Python headers and no writable cache. The compiler stays in this stage. The op links torch's
# own libgomp (torch/lib), already loaded when DeepSpeed imports it. --no-build-isolation: setup.py
# compiles against the torch installed above, and skips the op when it cannot import torch; --no-binary:
# a wheel would bring no op.
ARG DEEPSPEED_VERSION=0.19.8
RUN apt-get update \
    && apt-get install --yes --no-install-recommends g++ \
    && if [ ! -f "$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; then \
        apt-get install --yes --no-install-recommends python3-dev; fi \
    && rm -rf /var/lib/apt/lists/*
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=ca.pem \
    cppo-pip install setuptools wheel packaging psutil py-cpuinfo numpy ninja \
    && DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 DS_ACCELERATOR=cpu \
        cppo-pip install --no-build-isolation --no-binary deepspeed "deepspeed==${DEEPSPEED_VERSION}" \
    && python -c "from deepspeed.git_version_info import installed_ops as ops; assert ops['deepspeed_shm_comm'], ops" \
    && python -c "import torch, deepspeed.ops.comm.deepspeed_shm_comm_op"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared shared
COPY trainer trainer
COPY rollout_server rollout_server
COPY reward_server reward_server
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=ca.pem cppo-pip install .

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
