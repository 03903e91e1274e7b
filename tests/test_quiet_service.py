"""`make setup`'s service step (scripts/quiet-service.sh), with and without systemd.

Each test runs the real script with a PATH holding only fake `systemctl`,
`service` and `update-rc.d` (shell scripts that record their arguments and act
like the real ones on a host of the kind tested), so nothing on this machine
is asked to stop or disable anything. Whether systemd is init is the script's
own test of a directory (SYSTEMD_BOOTED_DIR), pointed at one the test makes or not.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT

SCRIPT = ROOT / "scripts" / "quiet-service.sh"
SCRIPT_TIMEOUT = 10  # seconds: the script only runs the fakes
NOT_BOOTED = "System has not been booted with systemd as init system (PID 1). Can't operate."

# systemctl as on a host where it is installed but systemd is not PID 1: anything that
# talks to the manager (--now) fails, editing the links offline (disable) works.
SYSTEMCTL_NOT_BOOTED = f"""
case " $* " in
    *" --now "*) echo "{NOT_BOOTED}" >&2; exit 1 ;;
    *" disable "*) echo "Synchronizing state of etcd.service with SysV service script." ;;
esac
"""
# `service` of a SysV-started etcd, its state in $STATE/etcd (shell builtins only: PATH
# holds nothing else).
SERVICE = """
read -r state <"$STATE/etcd"
case "$2" in
    status) [ "$state" = running ] || exit 3 ;;
    stop) echo stopped >"$STATE/etcd" ;;
esac
"""


class Host:
    """A directory of fake commands, the calls they record, and etcd's state."""

    def __init__(self, root: Path) -> None:
        self.bin = root / "bin"
        self.bin.mkdir()
        self.state = root / "state"
        self.state.mkdir()
        self.set_etcd("stopped")
        self.calls_file = root / "calls"
        self.calls_file.touch()
        self.log = root / "setup.log"
        self.booted_dir = root / "run-systemd-system"  # exists only on a systemd host

    def fake(self, name: str, body: str = "") -> None:
        path = self.bin / name
        path.write_text(f'#!/bin/sh\necho "{name} $*" >>"$CALLS"\n{body}\nexit 0\n')
        path.chmod(0o755)

    def set_etcd(self, state: str) -> None:
        (self.state / "etcd").write_text(f"{state}\n")

    def etcd_running(self) -> bool:
        return (self.state / "etcd").read_text() == "running\n"

    def run(self, service: str = "etcd") -> subprocess.CompletedProcess[str]:
        bash = shutil.which("bash")
        assert bash is not None
        env = {
            "PATH": str(self.bin),  # the fakes only: no real service manager is reached
            "CALLS": str(self.calls_file),
            "STATE": str(self.state),
            "LOG": str(self.log),
            "SYSTEMD_BOOTED_DIR": str(self.booted_dir),
        }
        return subprocess.run([bash, str(SCRIPT), service], env=env, capture_output=True, text=True,
                              timeout=SCRIPT_TIMEOUT, check=False)  # fmt: skip

    @property
    def calls(self) -> list[str]:
        return self.calls_file.read_text().splitlines()


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def test_without_systemd_as_init_disables_offline_and_stops_the_sysv_etcd(host: Host) -> None:
    """The issue's host (a VM, WSL, a chroot): systemctl exists, systemd is not PID 1,
    and the package's SysV script started etcd. The step succeeds without --now."""
    host.fake("systemctl", SYSTEMCTL_NOT_BOOTED)
    host.fake("service", SERVICE)
    host.fake("update-rc.d")
    host.set_etcd("running")
    proc = host.run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert host.calls == ["systemctl disable etcd", "service etcd status", "service etcd stop"]
    assert not host.etcd_running()
    assert "setup: disabled the etcd service at boot (systemctl disable etcd)" in proc.stdout
    assert "setup: stopped the etcd Debian started" in proc.stdout
    assert "warning" not in proc.stdout
    assert NOT_BOOTED not in host.log.read_text()


def test_without_systemd_an_etcd_that_does_not_run_is_left_alone(host: Host) -> None:
    host.fake("systemctl", SYSTEMCTL_NOT_BOOTED)
    host.fake("service", SERVICE)
    proc = host.run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert host.calls == ["systemctl disable etcd", "service etcd status"]


def test_without_systemctl_update_rc_d_disables_it(host: Host) -> None:
    """A container: no systemd package at all, only the SysV tools."""
    host.fake("service", SERVICE)
    host.fake("update-rc.d")
    host.set_etcd("running")
    proc = host.run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert host.calls == ["update-rc.d etcd disable", "service etcd status", "service etcd stop"]
    assert not host.etcd_running()


def test_with_systemd_as_init_disable_now(host: Host) -> None:
    host.booted_dir.mkdir()
    host.fake("systemctl")
    host.fake("service", SERVICE)
    proc = host.run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert host.calls == ["systemctl disable --now etcd"]
    assert "setup: stopped and disabled the etcd service" in proc.stdout


def test_the_same_step_quiets_nginx(host: Host) -> None:
    """nginx-light's nginx (port 80) is stopped the same way."""
    host.booted_dir.mkdir()
    host.fake("systemctl")
    proc = host.run("nginx")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert host.calls == ["systemctl disable --now nginx"]
    assert "setup: stopped and disabled the nginx service" in proc.stdout


@pytest.mark.parametrize("booted", [True, False], ids=["systemd", "no-systemd"])
def test_a_step_that_fails_warns_and_setup_goes_on(host: Host, booted: bool) -> None:
    """Best effort: whatever the service manager answers, setup is not stopped."""
    if booted:
        host.booted_dir.mkdir()
    host.fake("systemctl", 'echo "Failed to disable unit" >&2; exit 1')
    host.fake("update-rc.d", "exit 1")
    host.fake("service", '[ "$2" = status ] || exit 1')  # runs, and cannot be stopped
    proc = host.run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "setup: warning: could not" in proc.stdout
    assert f"see {host.log}" in proc.stdout
    assert "Failed to disable unit" in host.log.read_text()
    if not booted:
        assert host.calls == [
            "systemctl disable etcd", "update-rc.d etcd disable",
            "service etcd status", "service etcd stop",
        ]  # fmt: skip
