#!/usr/bin/env bash
# Idempotent setup for a Debian 12 machine: system packages (only those
# missing), kernel headers for bcc, and the project venv. Prints a line per
# step it has to take; apt's and pip's own output go to a log file it names.
set -euo pipefail
cd "$(dirname "$0")/.."

# etcd-server and etcd-client: fleet mode's store; the tests start their own members.
# gcc and python3-dev: the install compiles the hot path with mypyc (setup.py).
# nginx-light, curl and openssl: real TLS and HTTP clients and servers for routing by name.
# chromium and chromium-driver: the status page's browser tests (selenium drives them).
APT_PACKAGES=(python3-venv python3-bpfcc linux-headers-amd64 netcat-openbsd nftables iproute2
    etcd-server etcd-client gcc python3-dev nginx-light curl openssl chromium chromium-driver)
EXTRAS=test
if [ "${1:-}" = "--bench" ]; then  # the load tools and peers `make bench` measures with
    APT_PACKAGES+=(sockperf iperf3 wrk haproxy)
    EXTRAS=test,bench
fi
LOG="${TMPDIR:-/tmp}/tcpproxy-setup-$(id -u).log"
: >"$LOG"

# Run "$@" with its output in $LOG; on failure show the end of it.
logged() {
    if ! "$@" >>"$LOG" 2>&1; then
        echo "setup: failed: $*; the last lines of $LOG:" >&2
        tail -n 20 "$LOG" >&2
        exit 1
    fi
}

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: missing Debian packages: ${missing[*]} (run 'sudo make setup' once)" >&2
        exit 2
    fi
    echo "setup: installing ${missing[*]} (apt output in $LOG)"
    export DEBIAN_FRONTEND=noninteractive
    logged apt-get update
    logged apt-get install -y --no-install-recommends "${missing[@]}"
    # Debian starts etcd and nginx as services on install; the tests start their own on
    # free ports, and servers nobody asked for should not run. Only those installed now;
    # with or without systemd as init, and never a reason for setup to fail.
    if [[ " ${missing[*]} " == *" etcd-server "* ]]; then
        LOG="$LOG" bash scripts/quiet-service.sh etcd
    fi
    if [[ " ${missing[*]} " == *" nginx-light "* ]]; then  # its nginx would hold port 80
        LOG="$LOG" bash scripts/quiet-service.sh nginx
    fi
fi

# bcc compiles against /lib/modules/$(uname -r)/build. A kernel without its
# own headers package (as on some cloud/VM kernels) gets Debian's generic
# linux-headers-amd64 linked in; a kernel that has headers is left alone.
kdir="/lib/modules/$(uname -r)"
if [ ! -e "$kdir/build/include" ] && [ "$(id -u)" -eq 0 ]; then
    amd64=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
    common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$amd64" ] && [ -n "$common" ]; then
        echo "setup: kernel $(uname -r) has no headers; linking $amd64 for bcc"
        mkdir -p "$kdir"
        ln -sfn "$amd64" "$kdir/build"
        ln -sfn "$common" "$kdir/source"
    fi
fi

# The venv belongs to whoever owns the checkout: `sudo make setup` in your own
# clone installs the Debian packages as root but makes .venv as you.
as_owner=()
owner=$(stat -c %u .)
if [ "$(id -u)" -eq 0 ] && [ "$owner" -ne 0 ]; then
    home=$(getent passwd "$owner" | cut -d: -f6)
    as_owner=(setpriv --reuid="$owner" --regid="$(stat -c %g .)" --init-groups env HOME="$home")
fi
stamp=".venv/.installed-${EXTRAS/,/-}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ]; then
    echo "setup: installing the project and its Python packages into .venv (pip output in $LOG)"
    if [ ! -x .venv/bin/python ]; then
        logged "${as_owner[@]}" /usr/bin/python3 -m venv --system-site-packages .venv
    fi
    logged "${as_owner[@]}" .venv/bin/pip install --disable-pip-version-check -e ".[$EXTRAS]"
    logged "${as_owner[@]}" touch "$stamp"
fi

# The compiled build (setup.py) of an editable install sits beside the sources, and
# Python imports it before them: a source edited since it was compiled would not run.
# Each run compares the sources with the digests the last build recorded (build_info
# rule 3) and compiles again in place when one changed. If that fails (a type error:
# `make typecheck`), the compiled modules are removed so the current sources run,
# interpreted, and the stamp is emptied so that each run tries again until it works.
changed_sources='import sys; from tcpproxy.build_info import changed_sources as c; s = c(); print(*s); sys.exit(bool(s))'
compiled='import sys; from tcpproxy.build_info import changed_sources as c, describe as d; sys.exit(bool(c()) or not d().startswith("compiled"))'
python=("${as_owner[@]}" env -u TCPPROXY_INTERPRETED .venv/bin/python)  # as the checkout's owner
if ! changed=$("${python[@]}" -c "$changed_sources"); then
    echo "setup: $changed changed since compiled: compiling again (output in $LOG)"
    # every compiled module is built again; none of an earlier layout may stay (a module
    # compiled once as tcpproxy/engine.py would shadow nothing, but misleads)
    find tcpproxy -name '*.so' -delete
    logged "${python[@]}" setup.py build_ext --inplace
    if ! "${python[@]}" -c "$compiled"; then
        echo "setup: the compile failed (see $LOG, or run 'make typecheck'); the sources" \
            "run interpreted until it works" >&2
        find tcpproxy -name '*.so' -delete
        echo '{"sources": {}}' >tcpproxy/compiled.json
    fi
fi
