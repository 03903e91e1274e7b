#!/usr/bin/env bash
# `make build-in-container` on a real Docker engine, on a machine without one
# and without a container registry (CI as root): installs docker.io and
# debootstrap if missing, starts its own dockerd with everything in a
# temporary directory, makes the Dockerfile's base image (debian:12-slim)
# with debootstrap, runs make build-in-container, then scripts/test-newcomer.sh
# (make setup and make run as root in a fresh container), and always stops the
# daemon and removes what it made.
#
# Environment: DEBIAN_MIRROR (for debootstrap; default: the first Debian URI
# of this machine's apt sources), CA_CERTS_FILE (passed on; default: the
# local CA certificates in /usr/local/share/ca-certificates, if any).
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=$(sed -n 's/^FROM \([^ ]*\) AS base$/\1/p' Dockerfile)
DAEMON_WAIT=60  # seconds for dockerd to answer
say() { echo "test-container: $*"; }
started=$SECONDS

[ "$(id -u)" -eq 0 ] || { echo "test-container: needs root (it starts its own dockerd)" >&2; exit 2; }
[ -n "$BASE_IMAGE" ] || { echo "test-container: no 'FROM ... AS base' in Dockerfile" >&2; exit 2; }

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi
# The client from the same package as the daemon: another `docker` earlier on
# PATH may be newer than this engine and want BuildKit's buildx plugin.
DOCKER=/usr/bin/docker
[ -x "$DOCKER" ] || DOCKER=docker

work=$(mktemp -d /tmp/tcpproxy-container.XXXXXX)
dockerd_pid=""
cleanup() {
    status=$?
    if [ -n "$dockerd_pid" ]; then
        kill "$dockerd_pid" 2>/dev/null || true
        wait "$dockerd_pid" 2>/dev/null || true
    fi
    # anything dockerd left mounted under its data root, then the directory
    grep -o " $work/[^ ]*" /proc/self/mounts | sort -r | xargs -r -n 1 umount -l 2>/dev/null || true
    rm -rf "$work"
    say "done in $((SECONDS - started)) s (exit $status)"
}
trap cleanup EXIT

dockerd --data-root "$work/data" --exec-root "$work/exec" --pidfile "$work/dockerd.pid" \
    --host "unix://$work/docker.sock" --iptables=false --bridge=none \
    >"$work/dockerd.log" 2>&1 &
dockerd_pid=$!
export DOCKER_HOST="unix://$work/docker.sock"
deadline=$((SECONDS + DAEMON_WAIT))
until "$DOCKER" version >/dev/null 2>&1; do
    if ((SECONDS >= deadline)) || ! kill -0 "$dockerd_pid" 2>/dev/null; then
        tail -n 20 "$work/dockerd.log" >&2
        echo "test-container: dockerd did not start" >&2
        exit 1
    fi
    sleep 0.5
done
say "dockerd $("$DOCKER" version --format '{{.Server.Version}}') started ($((SECONDS - started)) s)"

mirror=${DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then  # this machine's own Debian mirror, if its apt sources name one
    mirror=$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
        | grep -o -E 'https?://[^ ]*/debian/?$' | head -n 1 || true)
fi
say "making $BASE_IMAGE with debootstrap from ${mirror:-the default mirror}"
if ! debootstrap --variant=minbase bookworm "$work/rootfs" ${mirror:+"$mirror"} \
    >"$work/debootstrap.log" 2>&1; then
    tail -n 20 "$work/debootstrap.log" >&2
    exit 1
fi
# like Debian's -slim images: no package cache, lists or docs
rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/* \
    "$work"/rootfs/usr/share/doc/* "$work"/rootfs/usr/share/man/* "$work"/rootfs/usr/share/locale/*
tar -C "$work/rootfs" -c . >"$work/base.tar"  # kept only for this run
rm -rf "$work/rootfs"
"$DOCKER" import "$work/base.tar" "$BASE_IMAGE" >/dev/null
say "base image ready ($((SECONDS - started)) s)"

if [ -z "${CA_CERTS_FILE:-}" ] && compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cat /usr/local/share/ca-certificates/*.crt >"$work/ca.pem"
    CA_CERTS_FILE="$work/ca.pem"
fi
status=0
make build-in-container DOCKER="$DOCKER" DOCKER_BUILD_FLAGS=--network=host \
    CA_CERTS_FILE="${CA_CERTS_FILE:-}" || status=$?
say "make build-in-container: exit $status ($((SECONDS - started)) s)"
DOCKER="$DOCKER" CA_CERTS_FILE="${CA_CERTS_FILE:-}" bash scripts/test-newcomer.sh || status=$?
exit "$status"
