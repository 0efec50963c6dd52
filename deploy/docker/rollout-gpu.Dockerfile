# syntax=docker/dockerfile:1
# Rollout server, vLLM backend on NVIDIA GPUs, on the official vLLM image at the version the project pins
# (the `vllm` extra in pyproject.toml: vllm==0.33.0). Build from the repository root:
#   docker build -f deploy/docker/rollout-gpu.Dockerfile -t cppo/rollout-gpu:0.1.0 .
# Models are never baked in: give a mounted folder or a hub id in CPPO_ROLLOUT_MODEL; a gated model's token
# comes from a mounted secret file named by HF_TOKEN_PATH (docker-compose and Kubernetes both do this).
ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm
ARG VLLM_IMAGE=vllm/vllm-openai:v0.33.0

# Stage 1: the project as a wheel (no dependencies), built away from the large base.
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

# Stage 2: the vLLM image plus the wheel. Every package already in the image is held at its version (the
# constraints file), so the install can add the project's own dependencies but never swap vLLM's torch or
# transformers: a conflict fails the build instead of producing a broken engine.
FROM ${VLLM_IMAGE} AS runtime
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
COPY --from=wheel /usr/local/bin/cppo-pip /usr/local/bin/cppo-pip
COPY --from=wheel /wheels /tmp/wheels
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=ca.pem python3 -m pip list --format=freeze > /tmp/constraints.txt \
    && cppo-pip install --constraint /tmp/constraints.txt /tmp/wheels/*.whl \
    && python3 -c "import vllm, rollout_server; assert vllm.__version__.startswith('0.33.0'), vllm.__version__" \
    && rm -rf /tmp/wheels /tmp/constraints.txt \
    && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin cppo \
    && mkdir -p /data && chown cppo:cppo /data
COPY deploy/docker/healthcheck.py /usr/local/bin/cppo-healthcheck
ENV PYTHONUNBUFFERED=1 \
    HF_HOME=/home/cppo/.cache/huggingface \
    CPPO_ROLLOUT_HOST=0.0.0.0 \
    CPPO_ROLLOUT_BACKEND=vllm
USER 10001:10001
WORKDIR /home/cppo
EXPOSE 8000
# The official image's entrypoint is `vllm serve`; this image runs the project's server instead.
ENTRYPOINT []
# Downloading and loading a multi-GB model, and vLLM's CUDA-graph capture, take minutes.
HEALTHCHECK --interval=15s --timeout=5s --start-period=1200s --retries=3 \
    CMD ["python3", "/usr/local/bin/cppo-healthcheck", "rollout", "/ready"]
CMD ["cppo", "rollout-server"]
