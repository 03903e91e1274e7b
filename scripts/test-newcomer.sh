#!/usr/bin/env bash
# CI stage: what a newcomer does, in a fresh Debian 12 container, as root, with
# Docker's default capabilities (no --privileged, no --cap-add): install make
# and git, clone into /root, `make setup` (its first run), `make run`, and
# `echo hello | nc -N localhost 6300` through it to the echo backend it starts.
# The clone is of the committed HEAD (uncommitted changes are not the
# newcomer's), through a bare copy mounted read-only and cloned with file://.
#
# Needs a Docker engine and the Dockerfile's base image (debian:12-slim);
# scripts/test-container.sh provides both. The container is on the host's
# network (`make run` binds ports 5001-7001 and 9001-9201 of loopback, and
# apt and pip need the network). Environment: DOCKER (client, default
# docker), CA_CERTS_FILE (PEM file of extra CA certificates, given to pip as
# PIP_CERT, on networks that intercept TLS).
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKER=${DOCKER:-docker}
IMAGE=$(sed -n 's/^FROM \([^ ]*\) AS base$/\1/p' Dockerfile)
STAGE_TIMEOUT=1200  # seconds for the whole container: apt and pip download ~400 MB
RUN_WAIT=60         # seconds for `make run` to answer on port 6300 once started
say() { echo "test-newcomer: $*"; }
die() { echo "test-newcomer: $*" >&2; exit 1; }
started=$SECONDS

[ -n "$IMAGE" ] || die "no 'FROM ... AS base' in Dockerfile"
"$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1 || die "no image $IMAGE on this Docker engine"

work=$(mktemp -d)
name="tcpproxy-newcomer-$$"
cleanup() {
    "$DOCKER" rm --force "$name" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

git init -q --bare "$work/tcpproxy.git"
git push -q "$work/tcpproxy.git" HEAD:refs/heads/main
git -C "$work/tcpproxy.git" symbolic-ref HEAD refs/heads/main
mounts=(-v "$work/tcpproxy.git:/src:ro")
if [ -n "${CA_CERTS_FILE:-}" ]; then
    mounts+=(-v "$(realpath "$CA_CERTS_FILE"):/ca.pem:ro" -e PIP_CERT=/ca.pem)
fi

# Inside, as root in /root: the README's steps, then checks. Exit status 0 only if
# nc got its line back through tcpproxy and `make run` stopped cleanly.
newcomer=$(cat <<EOF
set -euo pipefail
say() { echo "newcomer: \$*"; }
# bit 2 of the bounding set: CAP_DAC_READ_SEARCH, which Docker's default set leaves out
if (( 0x\$(sed -n 's/^CapBnd:[[:space:]]*//p' /proc/self/status) & (1 << 2) )); then
    say "this container has CAP_DAC_READ_SEARCH: not the newcomer's"; exit 1
fi
export DEBIAN_FRONTEND=noninteractive
say "apt-get install make git"
apt-get update -qq >/dev/null
apt-get install -y -qq make git >/dev/null
git clone -q file:///src /root/tcpproxy
cd /root/tcpproxy
say "make setup (the first run)"
make setup
for service in etcd nginx; do
    if service \$service status >/dev/null 2>&1; then
        say "the \$service service Debian started still runs after make setup"; exit 1
    fi
done
say "make run"
make run >/root/make-run.log 2>&1 &
make=\$!
answer=""
for _ in \$(seq $((RUN_WAIT * 5))); do
    answer=\$(echo hello | nc -N -w 2 localhost 6300 2>/dev/null || true)
    [ "\$answer" = hello ] && break
    kill -0 \$make 2>/dev/null || break
    sleep 0.2
done
cat /root/make-run.log
[ "\$answer" = hello ] || { say "echo hello | nc -N localhost 6300 answered '\$answer'"; exit 1; }
say "ok: echo hello | nc -N localhost 6300 answered hello"
# make's child is the demo (tcpproxy); SIGTERM drains and stops it, and its echo backends
demo=\$(cat /proc/\$make/task/\$make/children)
kill -TERM \$demo
wait \$make || { say "make run exited \$? after SIGTERM"; exit 1; }
say "ok: make run stopped cleanly"
EOF
)

say "a newcomer's make setup and make run as root in $IMAGE (Docker's default capabilities)"
status=0
timeout "$STAGE_TIMEOUT" "$DOCKER" run --rm --name "$name" --network host "${mounts[@]}" \
    "$IMAGE" bash -c "$newcomer" || status=$?
if [ "$status" -ne 0 ]; then
    die "failed (exit $status) after $((SECONDS - started)) s"
fi
say "ok in $((SECONDS - started)) s"
