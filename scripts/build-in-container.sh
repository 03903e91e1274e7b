#!/usr/bin/env bash
# make build-in-container: build the tcpproxy and bpfproxy images, then check
# them in containers: both carry the compiled build (`--version`), `bpfproxy
# --check` (compiles and loads the sk_lookup program with the host's kernel
# headers) and a tcpproxy that relays `nc` to an echo backend.
#
# Environment: DOCKER (client, default docker), DOCKER_BUILD_FLAGS (e.g.
# --network=host), CA_CERTS_FILE (PEM file of extra CA certificates for pip,
# on networks that intercept TLS), SYS_RESOURCE=1 (also grant CAP_SYS_RESOURCE).
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKER=${DOCKER:-docker}
read -r -a build_flags <<<"${DOCKER_BUILD_FLAGS:-}"
SMOKE_WAIT=30  # seconds for the smoke test's tcpproxy to start answering
say() { echo "build-in-container: $*"; }
die() { echo "build-in-container: $*" >&2; exit 2; }

# bcc in the bpfproxy container compiles against the host's kernel headers,
# mounted read-only: check them before spending minutes on a build.
release=$(uname -r)
if [ ! -e "/lib/modules/$release/build/include" ] && [ ! -e /sys/kernel/kheaders.tar.xz ]; then
    die "this host has no kernel headers for $release (/lib/modules/$release/build): run \`sudo make setup\` on the host"
fi
command -v nc >/dev/null || die "nc is missing for the smoke test: apt-get install netcat-openbsd (or run \`sudo make setup\`)"

server=$("$DOCKER" version --format '{{.Server.Version}}') || die "no Docker engine answers ($DOCKER version failed)"
# CAP_BPF is known to Docker from Engine 23; before, loading BPF needs CAP_SYS_ADMIN.
if [ "${server%%.*}" -ge 23 ]; then
    caps=(--cap-add BPF --cap-add NET_ADMIN)
else
    caps=(--cap-add SYS_ADMIN --cap-add NET_ADMIN)
fi
# Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK, which bpfproxy raises
# only with CAP_SYS_RESOURCE; newer ones charge the memory cgroup.
if [ "${SYS_RESOURCE:-0}" = 1 ] || [ "$(printf '%s\n' 5.11 "$release" | sort -V | head -n 1)" != 5.11 ]; then
    caps+=(--cap-add SYS_RESOURCE)
fi
say "Docker engine $server: bpfproxy gets ${caps[*]}"

build_args=()
if [ -n "${CA_CERTS_FILE:-}" ]; then
    build_args+=(--build-arg "CA_CERTS=$(cat "$CA_CERTS_FILE")")
fi
for image in tcpproxy bpfproxy; do
    say "building $image"
    "$DOCKER" build "${build_flags[@]}" "${build_args[@]}" --target "$image" -t "$image" .
done
for image in tcpproxy bpfproxy; do  # the images carry the compiled build (setup.py)
    version=$("$DOCKER" run --rm --network none "$image" --version)
    [[ $version == *", compiled ("* ]] || die "the $image image is not the compiled build: $version"
    say "$version"
done
base=$(sed -n 's/^FROM \([^ ]*\) AS base$/\1/p' Dockerfile)
for image in "$base" tcpproxy bpfproxy; do
    size=$("$DOCKER" image inspect --format '{{.Size}}' "$image")
    say "image $image: $((size / 1000000)) MB"
done

# Without its capabilities, then without the host's headers, bpfproxy must say
# what to add to `docker run` and what to do on the host.
expect_hint() {  # expect_hint WHAT-IS-MISSING TEXT-EXPECTED DOCKER-RUN-OPTIONS...
    local missing=$1 hint=$2 out
    shift 2
    if out=$("$DOCKER" run --rm --network none "$@" bpfproxy --check 2>&1); then
        die "bpfproxy --check passed without $missing"
    fi
    grep -q -F -- "$hint" <<<"$out" || die "bpfproxy --check without $missing did not say '$hint': $out"
    say "without $missing: $out"
}
expect_hint "capabilities" "--cap-add" --cap-add NET_ADMIN
if [ ! -e /sys/kernel/kheaders.tar.xz ]; then  # else the kernel carries its own headers
    expect_hint "kernel headers" "on the host" "${caps[@]}"
fi

say "bpfproxy --check in a container"
"$DOCKER" run --rm --network none "${caps[@]}" \
    -v /lib/modules:/lib/modules:ro -v /usr/src:/usr/src:ro bpfproxy --check

# Smoke test: tcpproxy and an echo backend, each in a container on the host's
# network, the config in a mounted directory, and nc from the host; then a
# reload through that directory.
work=$(mktemp -d)
names=("tcpproxy-smoke-$$" "tcpproxy-smoke-echo-$$")
cleanup() {
    "$DOCKER" rm --force "${names[@]}" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
write_config() {  # write_config PORT: atomically, as editors and config managers do
    printf '{"Apps": [{"Name": "smoke", "Ports": [%d], "Targets": ["127.0.0.1:%d"]}]}\n' \
        "$1" "$echo_port" >"$work/config.tmp"
    chmod 644 "$work/config.tmp"
    mv -f "$work/config.tmp" "$work/config.json"
}
relays() {  # relays PORT: true once nc through PORT gets its line back
    local answer="" deadline=$((SECONDS + SMOKE_WAIT))
    while ((SECONDS < deadline)); do
        answer=$(echo hello | nc -N -w 2 127.0.0.1 "$1" 2>/dev/null || true)
        [ "$answer" = hello ] && return 0
        sleep 0.2
    done
    return 1
}
mapfile -t ports < <(shuf -i 20000-29999 -n 3)  # three different ports
echo_port=${ports[0]}
chmod 755 "$work"
write_config "${ports[1]}"
"$DOCKER" run -d --name "${names[1]}" --network host --entrypoint python3 tcpproxy \
    -m tcpproxy.echo "$echo_port" >/dev/null
"$DOCKER" run -d --name "${names[0]}" --network host -v "$work:/etc/tcpproxy:ro" tcpproxy >/dev/null
for port in "${ports[1]}" "${ports[2]}"; do
    if ! relays "$port"; then
        "$DOCKER" logs "${names[0]}" >&2 || true
        die "tcpproxy in a container did not relay nc on port $port within ${SMOKE_WAIT} s"
    fi
    say "ok: tcpproxy in a container relayed nc on port $port to an echo backend"
    if [ "$port" != "${ports[2]}" ]; then
        say "replacing the mounted config: port ${ports[2]} instead of $port (a reload)"
        write_config "${ports[2]}"
    fi
done
