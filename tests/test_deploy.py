"""The container build and the systemd units, checked as far as this machine allows
(no Docker engine and no systemd as PID 1 here: lint and static verification)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    out = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_unit_is_valid_for_systemd(unit: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    text = unit.read_text().replace("/opt/tcpproxy/.venv", str(Path(sys.prefix)))
    copy = tmp_path / unit.name
    copy.write_text(text)
    out = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    complaints = [line for line in out.stderr.splitlines() if unit.name in line]
    assert out.returncode == 0 and not complaints, out.stderr


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_unit_uses_notify_reload_and_restart(unit: Path) -> None:
    keys = dict(
        line.split("=", 1)
        for line in unit.read_text().splitlines()
        if "=" in line and line[0] != "#"
    )
    assert keys["Type"] == "notify"
    assert keys["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert keys["Restart"] == "on-failure"
    assert keys["NoNewPrivileges"] == "yes"
    assert keys["NotifyAccess"] == "all"  # an upgraded process sends MAINPID=
    assert f"--pid-file {keys['PIDFile']}" in keys["ExecStart"]
    # the listeners outlive a crash in the store; systemd 252 does not set $FDSTORE
    assert int(keys["FileDescriptorStoreMax"]) > 0
    assert keys["Environment"] == f"FDSTORE={keys['FileDescriptorStoreMax']}"
    caps = set(keys["CapabilityBoundingSet"].split())
    if unit.name.startswith("bpfproxy"):
        assert {"CAP_BPF", "CAP_NET_ADMIN"} <= caps and "CAP_SYS_ADMIN" not in caps
    else:
        assert caps == {"CAP_NET_BIND_SERVICE"}
