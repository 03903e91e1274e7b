"""Every command's --help and --version, and its deprecated options, in-process
(`main(argv) -> int`)."""

from __future__ import annotations

import os

import pytest

from bpfproxy.cli import main as bpfproxy_main
from tcpproxy import __version__
from tcpproxy.build_info import describe
from tcpproxy.cli import main as tcpproxy_main

COMMANDS = pytest.mark.parametrize(
    ("prog", "main"), [("tcpproxy", tcpproxy_main), ("bpfproxy", bpfproxy_main)]
)


@COMMANDS
def test_help_shows_options_and_examples(prog, main, capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "Examples:" in out and prog in out
    for option in ("--config", "--log-level", "--drain-timeout", "--version", "--bind"):
        assert option in out


@COMMANDS
def test_version_says_which_build_runs(prog, main, capsys) -> None:
    assert main(["--version"]) == 0
    build = describe()  # "compiled (mypyc X.Y)" or "interpreted": tests/test_build_info.py
    assert capsys.readouterr().out.strip() == f"{prog}, version {__version__}, {build}"


def test_tcpproxyctl_version_says_which_build(capsys) -> None:
    from tcpproxy.fleet.ctl import main as ctl_main

    assert ctl_main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"tcpproxyctl, version {__version__}, {describe()}"


@COMMANDS
def test_bad_option_is_a_usage_error(prog, main, capsys) -> None:
    assert main(["--no-such-option"]) == 2
    assert "No such option" in capsys.readouterr().err


def test_tcpproxy_bad_config_in_process(tmp_path, capsys) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"Apps": [{"Name": "a", "Ports": [99999], "Targets": ["h:1"]}]}')
    assert tcpproxy_main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tcpproxy: error: ") and "Apps[0].Ports[0]" in err


@COMMANDS
@pytest.mark.parametrize("given", ["option", "environment"])
def test_the_trio_engine_is_refused_saying_where(prog, main, given, monkeypatch, capsys) -> None:
    if given == "environment":
        monkeypatch.setenv("TCPPROXY_ENGINE", "trio")
        argv, where = [], "TCPPROXY_ENGINE=trio"
    else:
        argv, where = ["--engine", "trio"], "--engine trio"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: {where}: the trio engine was removed"), err
    assert "Traceback" not in err


def test_engine_epoll_is_accepted_with_one_warning(tmp_path, monkeypatch, capsys) -> None:
    """An old unit file's --engine epoll still starts the proxy (here: up to its config's
    error); the variable leaves the environment, so workers do not warn again."""
    path = tmp_path / "c.json"
    path.write_text('{"Apps": [{"Name": "a", "Ports": [99999], "Targets": ["h:1"]}]}')
    monkeypatch.setenv("TCPPROXY_ENGINE", "epoll")
    assert tcpproxy_main(["--engine", "epoll", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("warning") == 1, err
    assert "tcpproxy: warning: --engine epoll is deprecated and ignored" in err
    assert "Apps[0].Ports[0]" in err  # the config's error, not the option's
    assert "TCPPROXY_ENGINE" not in os.environ
