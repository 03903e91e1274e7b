#!/usr/bin/env bash
# Part of `make setup`: stop and disable a service Debian starts when its package
# is installed (usage: quiet-service.sh SERVICE): etcd-server's etcd (the tests
# start members of their own; a store nobody asked for should not run) and
# nginx-light's nginx (the tests and benchmarks start their own; a web server
# on port 80 nobody asked for should not run). With systemd as init,
# `systemctl disable --now`; without it (a container, WSL, a chroot, a VM whose init is something else,
# where the package started it with its SysV script), the boot links are
# removed offline and a running one is stopped with `service`. Best effort:
# prints what it did or could not do, and never fails setup (exit 0).
#
# Environment: LOG (a file for the commands' output; default: none kept),
# SYSTEMD_BOOTED_DIR (systemd's own test that it is init, default
# /run/systemd/system; the tests point it elsewhere).
set -uo pipefail

SERVICE=${1:?usage: quiet-service.sh SERVICE}

LOG=${LOG:-/dev/null}
BOOTED=${SYSTEMD_BOOTED_DIR:-/run/systemd/system}
say() { echo "setup: $*"; }
run() { "$@" >>"$LOG" 2>&1; }  # the command's status; its output in $LOG
has() { command -v "$1" >/dev/null 2>&1; }

if [ -d "$BOOTED" ]; then
    if run systemctl disable --now "$SERVICE"; then
        say "stopped and disabled the $SERVICE service Debian started (tests run their own)"
    else
        say "warning: could not stop and disable the $SERVICE service (systemctl disable --now $SERVICE; see $LOG)"
    fi
    exit 0
fi

# Not booted with systemd: `systemctl disable` edits the links without a
# running systemd (and calls update-rc.d for the SysV script); else update-rc.d.
disabled=""
for command in "systemctl disable $SERVICE" "update-rc.d $SERVICE disable"; do
    read -r -a argv <<<"$command"
    if has "${argv[0]}" && run "${argv[@]}"; then
        disabled=$command
        break
    fi
done
if [ -n "$disabled" ]; then
    say "disabled the $SERVICE service at boot ($disabled)"
else
    say "warning: could not disable the $SERVICE service at boot (systemctl or update-rc.d; see $LOG)"
fi

# The SysV script the package ran (invoke-rc.d) may have left it running.
if has service; then
    stopper=(service "$SERVICE")
elif has invoke-rc.d; then
    stopper=(invoke-rc.d "$SERVICE")
else
    say "warning: neither service nor invoke-rc.d here: $SERVICE may still run"
    exit 0
fi
if run "${stopper[@]}" status; then
    if run "${stopper[@]}" stop; then
        say "stopped the $SERVICE Debian started (tests run their own)"
    else
        say "warning: could not stop $SERVICE (${stopper[*]} stop; see $LOG)"
    fi
fi
exit 0
