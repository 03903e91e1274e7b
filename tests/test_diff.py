"""Reload diffs without sockets."""

from __future__ import annotations

from tcpproxy.config import parse_config
from tcpproxy.diff import diff_configs, format_ports


def cfg(*apps: tuple[str, list[int], list[str]]) -> object:
    import json

    return parse_config(
        json.dumps({"Apps": [{"Name": n, "Ports": p, "Targets": t} for n, p, t in apps]})
    )


def test_format_ports_compacts_and_bounds() -> None:
    assert format_ports([6300, 5001, 5002, 5003]) == "5001-5003,6300"
    assert format_ports([]) == "none"
    many = format_ports(range(1, 40000, 2))
    assert many.endswith("(20000 ports)") and len(many) < 120


def test_diff_reports_ports_and_apps() -> None:
    old = cfg(("a", [1, 2], ["h:1"]), ("b", [3], ["h:2"]), ("c", [4], ["h:3"]))
    new = cfg(("a", [1], ["h:1"]), ("b", [3], ["h:9"]), ("d", [5], ["h:4"]), ("c", [4], ["h:3"]))
    d = diff_configs(old, new)
    assert d.added_ports == {5} and d.removed_ports == {2}
    assert d.added_apps == ("d",) and d.removed_apps == ()
    assert d.changed_apps == ("a", "b")
    assert not d.empty
    assert d.summary() == "apps added: d; apps changed: a, b; ports added: 5; ports removed: 2"


def test_identical_configs_have_empty_diff() -> None:
    c = cfg(("a", [1], ["h:1"]))
    assert diff_configs(c, cfg(("a", [1], ["h:1"]))).empty
    assert diff_configs(c, c).summary() == "no changes"
