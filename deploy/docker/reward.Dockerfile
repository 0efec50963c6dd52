# syntax=docker/dockerfile:1
# Reward server. Build from the repository root:
#   docker build -f deploy/docker/reward.Dockerfile -t cppo/reward:0.1.0 .
# Configuration only through CPPO_REWARD_* variables and flags (`cppo reward-server --help`). Set
# CPPO_REWARD_WORKERS to the container's CPU limit: the default counts the host's cores, not the limit.
ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The package depends on torch (shared code); the CPU build keeps the image small.
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
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=ca.pem cppo-pip install .

FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin cppo \
    && mkdir -p /data && chown cppo:cppo /data
COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /usr/local/bin/cppo-healthcheck
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CPPO_REWARD_HOST=0.0.0.0
USER 10001:10001
WORKDIR /home/cppo
EXPOSE 5000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/usr/local/bin/cppo-healthcheck", "reward", "/ready"]
CMD ["cppo", "reward-server"]
