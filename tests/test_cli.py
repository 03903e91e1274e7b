"""Every command's --help and --version, in-process (`main(argv) -> int`)."""

from __future__ import annotations

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
