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
