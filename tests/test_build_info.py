"""The compiled build: which modules run compiled, forcing the interpreted one, staleness,
and setup.py's fallback to a plain install. Real processes: each case starts Python anew,
since which build runs is settled at import."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tcpproxy import build_info
from tcpproxy.build_info import INTERPRETED_ENV, interpreted_requested

ROOT = Path(__file__).resolve().parent.parent  # the checkout: setup.py, tcpproxy/
PACKAGE = Path(build_info.__file__).parent  # the package the tests import (editable: ROOT's)
RUN_TIMEOUT = 60  # seconds for a Python start; setup.py's compile attempt takes ~15 s of CPU
# compiled at install, whether or not this process runs it (TCPPROXY_INTERPRETED=1)
COMPILED = any(PACKAGE.glob(f"{build_info.GROUP.rpartition('.')[2]}__mypyc.*"))
needs_compiled = pytest.mark.skipif(not COMPILED, reason="this install is not compiled")
# `python setup.py build_ext --inplace` (what make setup runs on a stale build)
SETUP = (
    "import runpy, sys; sys.argv = ['setup.py', 'build_ext', '--inplace']; "
    "runpy.run_path('setup.py')"
)

# What a fresh interpreter reports: each compiled module's file, and the build it names.
REPORT = """
import importlib, json, sys
from tcpproxy.build_info import COMPILED_MODULES, describe
for name in COMPILED_MODULES:
    importlib.import_module(name)
print(json.dumps({"files": {m: sys.modules[m].__file__ for m in COMPILED_MODULES},
                  "build": describe()}))
"""


def run(code: str, *, interpreted: bool = False, cwd: Path | None = None, **env: str):
    environ = {k: v for k, v in os.environ.items() if k != INTERPRETED_ENV} | env
    if interpreted:
        environ[INTERPRETED_ENV] = "1"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environ,
        cwd=cwd, timeout=RUN_TIMEOUT, check=False,
    )  # fmt: skip


def report(**kw: object) -> dict:
    out = run(REPORT, **kw)  # type: ignore[arg-type]
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_environment_variable() -> None:
    assert not interpreted_requested({})
    assert not interpreted_requested({INTERPRETED_ENV: ""})
    assert not interpreted_requested({INTERPRETED_ENV: "0"})
    assert interpreted_requested({INTERPRETED_ENV: "1"})


def test_a_module_in_a_package_has_its_source_found(tmp_path) -> None:
    (tmp_path / "tcpproxy" / "engine").mkdir(parents=True)
    found = build_info.source_path("tcpproxy.engine.loop", str(tmp_path))
    assert found == str(tmp_path / "tcpproxy" / "engine" / "loop.py")
    found = build_info.source_path("tcpproxy.engine", str(tmp_path))
    assert found == str(tmp_path / "tcpproxy" / "engine" / "__init__.py")


def test_interpreted_on_demand_loads_every_source() -> None:
    got = report(interpreted=True)
    assert all(path.endswith(".py") for path in got["files"].values()), got
    assert got["build"] == f"interpreted ({INTERPRETED_ENV}=1)"


def test_the_build_named_is_the_one_that_runs() -> None:
    got = report()
    files = got["files"].values()
    if COMPILED:
        assert all(path.endswith(".so") for path in files), got
        stamp = json.loads((PACKAGE / build_info.STAMP).read_text())
        assert got["build"] == f"compiled (mypyc {stamp['mypyc']})"
    else:
        assert all(path.endswith(".py") for path in files), got
        assert got["build"] == "interpreted"


# Rule 1: a compiled module brings its compiled imports with it, over interpreted copies.
MIX = """
import importlib.util, os, sys
from tcpproxy.build_info import source_path
def interpreted(name):
    path = source_path(name, "{root}")
    package = [os.path.dirname(path)] if path.endswith("__init__.py") else None
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=package)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
interpreted("tcpproxy.{first}")
from tcpproxy import engine, flow
from tcpproxy.engine import core
print(flow.__file__.endswith(".so"), engine.__file__.endswith(".so"),
      core.A_CONNECT is flow.A_CONNECT, flow.Flow().accepted() is flow.A_ROUTE)
"""


@needs_compiled
def test_an_interpreted_module_is_replaced_by_a_compiled_one_importing_it() -> None:
    out = run(MIX.format(root=PACKAGE.parent, first="flow"))
    assert out.returncode == 0, out.stderr
    # flow came back compiled: the compiled engine's import replaced the interpreted one
    assert out.stdout.split() == ["True", "True", "True", "True"]
    out = run(
        MIX.format(root=PACKAGE.parent, first="engine")
    )  # the other way round: the engine stays as it was
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False", "True", "True"]


def test_the_start_says_once_that_it_runs_interpreted(tmp_path) -> None:
    code = "import sys; from tcpproxy.cli import main; sys.exit(main(['--config', 'no']))"
    out = run(code, interpreted=True, cwd=tmp_path)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if "build" in line]
    assert len(lines) == 1 and f"interpreted ({INTERPRETED_ENV}=1) build" in lines[0], out.stderr


@needs_compiled
def test_a_source_edited_after_the_compile_is_named_at_start(tmp_path) -> None:
    shutil.copytree(PACKAGE, tmp_path / "tcpproxy", ignore=shutil.ignore_patterns("__pycache__"))
    code = "import sys; from tcpproxy.cli import main; sys.exit(main(['--config', 'no']))"
    out = run(code, cwd=tmp_path, PYTHONPATH=str(tmp_path))
    assert out.returncode == 2 and "stale" not in out.stderr, out.stderr
    with (tmp_path / "tcpproxy" / "flow.py").open("a") as source:
        source.write("# edited\n")
    out = run(code, cwd=tmp_path, PYTHONPATH=str(tmp_path))
    assert out.returncode == 2
    assert "the compiled build is stale: tcpproxy/flow.py changed" in out.stderr, out.stderr


def _checkout_copy(tmp_path: Path) -> Path:
    """The sources setup.py builds from, without any compiled module."""
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    for package in ("tcpproxy", "bpfproxy"):
        shutil.copytree(
            ROOT / package, tmp_path / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.so", build_info.STAMP),
        )  # fmt: skip
    return tmp_path


def test_without_a_compiler_setup_builds_nothing_and_says_why(tmp_path) -> None:
    copy = _checkout_copy(tmp_path)
    out = run(SETUP, cwd=copy, CC="no-such-cc")
    assert out.returncode == 0, out.stderr
    assert "not compiled, the install is interpreted: no C compiler ('no-such-cc'" in out.stderr
    assert not list((copy / "tcpproxy").glob("*.so"))


@pytest.mark.slow  # mypyc's C output, then the failing compile: ~10 s
def test_a_failed_compile_leaves_the_plain_install(tmp_path) -> None:
    copy = _checkout_copy(tmp_path)
    out = run(SETUP, cwd=copy, CC="/bin/false")  # found, but every compile fails
    assert out.returncode == 0, out.stderr
    assert "not compiled, the install is interpreted: the C compile failed" in out.stderr
    assert not list((copy / "tcpproxy").glob("*.so"))
    assert not list(copy.glob("*.so"))
