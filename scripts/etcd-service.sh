#!/usr/bin/env bash
# Part of `make setup`: stop and disable the etcd service Debian's etcd-server
# starts on install (the tests start etcd members of their own; a store nobody
# asked for should not run). With systemd as init, `systemctl disable --now`;
# without it (a container, WSL, a chroot, a VM whose init is something else,
# where the package started etcd with its SysV script), the boot links are
# removed offline and a running etcd is stopped with `service`. Best effort:
# prints what it did or could not do, and never fails setup (exit 0).
#
# Environment: LOG (a file for the commands' output; default: none kept),
# SYSTEMD_BOOTED_DIR (systemd's own test that it is init, default
# /run/systemd/system; the tests point it elsewhere).
set -uo pipefail

LOG=${LOG:-/dev/null}
BOOTED=${SYSTEMD_BOOTED_DIR:-/run/systemd/system}
say() { echo "setup: $*"; }
run() { "$@" >>"$LOG" 2>&1; }  # the command's status; its output in $LOG
has() { command -v "$1" >/dev/null 2>&1; }

if [ -d "$BOOTED" ]; then
    if run systemctl disable --now etcd; then
        say "stopped and disabled the etcd service Debian started (tests run their own)"
    else
        say "warning: could not stop and disable the etcd service (systemctl disable --now etcd; see $LOG)"
    fi
    exit 0
fi

# Not booted with systemd: `systemctl disable` edits the links without a
# running systemd (and calls update-rc.d for the SysV script); else update-rc.d.
disabled=""
for command in "systemctl disable etcd" "update-rc.d etcd disable"; do
    read -r -a argv <<<"$command"
    if has "${argv[0]}" && run "${argv[@]}"; then
        disabled=$command
        break
    fi
done
if [ -n "$disabled" ]; then
    say "disabled the etcd service at boot ($disabled)"
else
    say "warning: could not disable the etcd service at boot (systemctl or update-rc.d; see $LOG)"
fi

# The SysV script the package ran (invoke-rc.d) may have left etcd running.
if has service; then
    stopper=(service etcd)
elif has invoke-rc.d; then
    stopper=(invoke-rc.d etcd)
else
    say "warning: neither service nor invoke-rc.d here: etcd may still run"
    exit 0
fi
if run "${stopper[@]}" status; then
    if run "${stopper[@]}" stop; then
        say "stopped the etcd Debian started (tests run their own)"
    else
        say "warning: could not stop etcd (${stopper[*]} stop; see $LOG)"
    fi
fi
exit 0
