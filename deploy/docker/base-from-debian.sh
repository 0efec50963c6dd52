#!/usr/bin/env bash
# A Python base image made from Debian's packages, for machines that reach no container registry (air-gapped
# sites, our CI): debootstrap a minimal Debian with Python, import it into podman, print its tag on stdout.
# Every Dockerfile takes it as PYTHON_IMAGE:
#   podman build --build-arg PYTHON_IMAGE="$(deploy/docker/base-from-debian.sh)" ...
# An image already under that tag is reused (pass --rebuild to make it again), so repeated runs cost nothing.
#
# Settings (environment):
#   DEBIAN_SUITE   the Debian release (default bookworm: Python 3.11, which the CPU torch wheels are built for)
#   DEBIAN_MIRROR  the apt mirror (default: the first one in this machine's apt sources, else deb.debian.org)
#   BASE_IMAGE     the tag to give it (default localhost/debian-python:$DEBIAN_SUITE)
# Needs root (debootstrap, chroot) and podman; everything but the tag goes to stderr.
set -euo pipefail

suite=${DEBIAN_SUITE:-bookworm}
tag=${BASE_IMAGE:-localhost/debian-python:$suite}
rebuild=0
case "${1:-}" in
    --rebuild) rebuild=1 ;;
    "") ;;
    *) echo "usage: $0 [--rebuild]" >&2; exit 2 ;;
esac

fail() { echo "base-from-debian: $*" >&2; exit 1; }

command -v podman >/dev/null || fail "podman is not installed (apt-get install podman runc)"
if [ "$rebuild" = 0 ] && podman image exists "$tag"; then
    echo "base-from-debian: reusing $tag" >&2
    echo "$tag"
    exit 0
fi
[ "$(id -u)" = 0 ] || fail "debootstrap needs root: run as root or with sudo"
command -v debootstrap >/dev/null || fail "debootstrap is not installed (apt-get install debootstrap)"

# The mirror this machine already uses: the only one an air-gapped site may reach.
mirror_from_apt() {
    local uri
    uri=$(grep -hoE '^URIs:[[:space:]]*[^[:space:]]+' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '{print $2}' | grep -v -- '-security' | head -n1 || true)
    if [ -z "$uri" ]; then
        uri=$(grep -hoE '^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?[^[:space:]]+' /etc/apt/sources.list 2>/dev/null \
            | awk '{print $NF}' | grep -v -- '-security' | head -n1 || true)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}
mirror=${DEBIAN_MIRROR:-$(mirror_from_apt)}

rootfs=$(mktemp -d /var/tmp/cppo-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT

echo "base-from-debian: debootstrap $suite from $mirror" >&2
# python-is-python3: the Dockerfiles call `python`; passwd: they create the non-root user with useradd.
debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates,passwd \
    "$suite" "$rootfs" "$mirror" >&2 \
    || fail "debootstrap of $suite from $mirror failed (see above)"
# The package lists and downloaded .debs are large and stale at once; a build that needs apt updates first.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log

# An imported image has no configuration: give it what the official python images set.
tar -C "$rootfs" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$tag" >&2
echo "$tag"
