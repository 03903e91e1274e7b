"""The fleet's assembly of etcd keys into a Config: per-app rejection (pure, no etcd)."""

from __future__ import annotations

import json

import pytest

from tcpproxy.config import MAX_PROBLEMS, Config, ConfigError, parse_config
from tcpproxy.fleet.assemble import DEFAULTS, Assembly, assemble, key_root

P = "/fleet"


def app(
    ports: list[int], targets: tuple[str, ...] = ("127.0.0.1:9000",), **options: object
) -> bytes:
    return json.dumps({"Ports": ports, "Targets": list(targets), **options}).encode()


class Store:
    """A fake key space with revisions, as etcd keeps them."""

    def __init__(self) -> None:
        self.values: dict[str, tuple[bytes, int]] = {}
        self.revision = 1
        self.last: Assembly | None = None

    def put(self, key: str, value: bytes) -> Assembly:
        self.revision += 1
        self.values[f"{P}/{key}"] = (value, self.revision)
        return self.build()

    def delete(self, key: str) -> Assembly:
        self.revision += 1
        del self.values[f"{P}/{key}"]
        return self.build()

    def build(self, check=None) -> Assembly:  # type: ignore[no-untyped-def]
        self.last = assemble(self.values, P, self.revision, self.last, check)
        return self.last


def served(a: Assembly) -> dict[str, tuple[int, ...]]:
    return {x.name: x.ports for x in a.config.apps}


def test_apps_and_defaults_become_a_config_the_file_parser_reads_back() -> None:
    s = Store()
    s.put("defaults", b'{"ConnectTimeout": 5}')
    s.put("apps/web", app([8080, 8081]))
    a = s.put("apps/db", app([5432], IdleTimeout=60))
    assert served(a) == {"db": (5432,), "web": (8080, 8081)}
    assert a.config.apps[1].connect_timeout == 5.0
    assert a.config.apps[0].idle_timeout == 60.0
    assert a.rejected == {}
    assert a.revision == s.revision
    assert parse_config(a.document()) == a.config  # the cache file is a config file


def test_empty_prefix_is_an_empty_config() -> None:
    a = assemble({}, P, 7)
    assert a.config == Config(apps=())
    assert parse_config(a.document()) == a.config


def test_a_new_bad_app_is_not_served_and_says_why_with_the_files_message() -> None:
    s = Store()
    s.put("apps/web", app([8080]))
    a = s.put("apps/bad", app([70000]))
    assert served(a) == {"web": (8080,)}
    rejection = a.rejected["bad"]
    assert rejection.key == f"{P}/apps/bad"
    assert rejection.revision == s.revision
    assert rejection.reason == "Ports[0]: must be between 1 and 65535, got 70000"


def test_a_rejection_gives_the_first_problems_and_counts_the_rest() -> None:
    s = Store()
    a = s.put("apps/bad", app([70000] * (MAX_PROBLEMS + 3)))
    reasons = a.rejected["bad"].reason.split("; ")
    assert reasons[0] == "Ports[0]: must be between 1 and 65535, got 70000"
    assert len(reasons) == MAX_PROBLEMS + 1 and reasons[-1] == "... and 3 more"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"{", "line 1, column 2: expecting property name enclosed in double quotes"),
        (b"[1]", "(top level): must be an object, got a list"),
        (b'{"Ports": [1], "Targets": ["a:1"], "Prots": 1}',
         "Prots: unknown key 'Prots' (did you mean 'Ports'?)"),
        (b'{"Name": "other", "Ports": [1], "Targets": ["a:1"]}',
         "Name: is \"other\", but the key names the app 'web'; leave \"Name\" out"),
        (b'{"Ports": [1, 1], "Targets": ["a:1"]}',
         "Ports[1]: port 1 is listed twice in app 'web' (Ports[0] and Ports[1])"),
    ],
)  # fmt: skip
def test_bad_values_are_named_like_the_file_validator_names_them(value: bytes, reason: str) -> None:
    a = assemble({f"{P}/apps/web": (value, 3)}, P, 3)
    assert a.config.apps == ()
    assert a.rejected["web"].reason == reason


def test_name_in_the_value_that_agrees_with_the_key_is_accepted() -> None:
    a = assemble({f"{P}/apps/web": (b'{"Name": "web", "Ports": [1], "Targets": ["a:1"]}', 3)}, P, 3)
    assert served(a) == {"web": (1,)}


def test_existing_app_with_a_bad_value_keeps_its_last_good_version_until_fixed() -> None:
    s = Store()
    s.put("apps/web", app([8080]))
    good_rev = s.revision
    a = s.put("apps/web", app([8080], ConnectTimeout=-1))
    assert served(a) == {"web": (8080,)}
    assert a.apps["web"].revision == good_rev
    assert a.rejected["web"].revision == s.revision
    assert "ConnectTimeout: must be greater than 0" in a.rejected["web"].reason
    a = s.put("apps/other", app([9090]))  # another change: web still rejected, still served
    assert set(a.rejected) == {"web"} and served(a)["web"] == (8080,)
    a = s.put("apps/web", app([8080, 8082]))
    assert a.rejected == {}
    assert served(a)["web"] == (8080, 8082)


def test_deleting_an_app_removes_it_and_its_rejection() -> None:
    s = Store()
    s.put("apps/web", app([8080]))
    s.put("apps/web", b"nonsense")
    a = s.delete("apps/web")
    assert a.config.apps == () and a.rejected == {}


def test_a_port_stays_with_the_app_that_had_it() -> None:
    s = Store()
    s.put("apps/old", app([8080]))
    a = s.put("apps/new", app([8080, 8081]))
    assert served(a) == {"old": (8080,)}
    assert a.rejected["new"].reason == f"Ports[0]: port 8080 is used by app 'old' ({P}/apps/old)"
    # the owner rewrites its value, still with the port: still its own
    a = s.put("apps/old", app([8080], IdleTimeout=10))
    assert served(a) == {"old": (8080,)} and set(a.rejected) == {"new"}
    # the owner lets the port go: the newcomer gets it (its rejection clears)
    a = s.put("apps/old", app([9000]))
    assert served(a) == {"new": (8080, 8081), "old": (9000,)}
    assert a.rejected == {}


def test_an_existing_app_taking_anothers_port_keeps_its_last_good_version() -> None:
    s = Store()
    s.put("apps/a", app([1000]))
    s.put("apps/b", app([2000]))
    a = s.put("apps/b", app([2000, 1000]))
    assert served(a) == {"a": (1000,), "b": (2000,)}
    assert "port 1000 is used by app 'a'" in a.rejected["b"].reason


def test_first_written_wins_a_port_nobody_had() -> None:
    values = {f"{P}/apps/z": (app([5000]), 4), f"{P}/apps/a": (app([5000]), 6)}
    a = assemble(values, P, 6)
    assert served(a) == {"z": (5000,)}
    assert set(a.rejected) == {"a"}


def test_bad_defaults_keep_the_last_good_defaults() -> None:
    s = Store()
    s.put("defaults", b'{"ConnectTimeout": 5}')
    s.put("apps/web", app([8080]))
    a = s.put("defaults", b'{"ConnectTimeout": "fast"}')
    assert a.config.apps[0].connect_timeout == 5.0
    assert a.rejected[DEFAULTS].key == f"{P}/defaults"
    assert a.rejected[DEFAULTS].reason == 'ConnectTimeout: must be a number, got "fast"'
    a = s.put("defaults", b'{"ConnectTimeout": 7}')
    assert a.config.apps[0].connect_timeout == 7.0 and a.rejected == {}
    a = s.delete("defaults")
    assert a.config.apps[0].connect_timeout == 2.0  # built in


def test_bad_defaults_at_start_mean_the_built_in_ones() -> None:
    values = {f"{P}/defaults": (b"[]", 2), f"{P}/apps/web": (app([1]), 3)}
    a = assemble(values, P, 3)
    assert a.config.apps[0].connect_timeout == 2.0
    assert set(a.rejected) == {DEFAULTS}


def test_unknown_keys_are_ignored_and_listed_nodes_are_not() -> None:
    values = {
        f"{P}/apps/web": (app([1]), 2),
        f"{P}/nodes/edge-1": (b"{}", 3),
        f"{P}/stray": (b"x", 4),
        f"{P}/apps/a/b": (app([2]), 5),
    }
    a = assemble(values, P + "/", 5)
    assert served(a) == {"web": (1,)}
    assert a.ignored == (f"{P}/apps/a/b", f"{P}/stray")
    assert key_root(P) == key_root(P + "/") == P + "/"


def test_a_check_rejects_one_app_only() -> None:
    def no_port_1(config: Config) -> None:
        if 1 in config.ports:
            raise ConfigError("<config>", ["Targets[0]: loops back"])

    values = {f"{P}/apps/a": (app([1]), 2), f"{P}/apps/b": (app([2]), 3)}
    a = assemble(values, P, 3, check=no_port_1)
    assert served(a) == {"b": (2,)}
    assert a.rejected["a"].reason == "Targets[0]: loops back"


def test_unchanged_values_are_not_parsed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Store()
    for i in range(20):
        s.put(f"apps/app{i}", app([1000 + i]))
    import tcpproxy.fleet.assemble as module

    calls: list[str] = []
    real = module.parse_app
    monkeypatch.setattr(module, "parse_app", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    s.put("apps/app3", app([3333]))
    assert calls == ["app3"]


def test_the_cache_document_reads_back_as_the_same_assembly() -> None:
    s = Store()
    s.put("defaults", b'{"IdleTimeout": 30}')
    s.put("apps/web", app([8080]))
    a = s.put("apps/db", app([5432], Strategy="random"))
    from tcpproxy.fleet.assemble import assembly_from_document

    b = assembly_from_document(a.document(), P, "cache.json")
    assert b.config == a.config and b.revision == 0 and b.rejected == {}
    assert b.document() == a.document()
    with pytest.raises(ConfigError, match=r"cache\.json: "):
        assembly_from_document(b'{"Apps": [{"Name": "x"}]}', P, "cache.json")


def test_a_held_value_is_rejected_until_it_changes() -> None:
    s = Store()
    s.put("apps/web", app([8080]))
    s.put("apps/web", app([8080, 8081]))
    in_force = assemble(s.values, P, s.revision, s.last)  # what runs: 8080 and 8081
    s.put("apps/web", app([8080, 9999]))
    held = {"web": (app([8080, 9999]), "not applied: cannot listen on port 9999")}
    a = assemble(s.values, P, s.revision, in_force, held=held)
    assert served(a) == {"web": (8080, 8081)}
    assert a.rejected["web"].reason == "not applied: cannot listen on port 9999"
    s.put("apps/web", app([8080, 9998]))
    a = assemble(s.values, P, s.revision, in_force, held=held)
    assert served(a) == {"web": (8080, 9998)} and a.rejected == {}


def test_rule_7_an_app_targeting_another_apps_port_is_rejected_and_falls_back() -> None:
    """The cross check sees the other apps' ports; the app with the target is the one
    rejected (keeping its last good version), the port's owner stays."""
    seen: list[dict[int, str]] = []

    def cross(config: Config, others: object) -> None:
        assert isinstance(others, dict)
        seen.append(others)
        raise ConfigError("x", [f"loops into {sorted(others.values())}"])

    values: dict[str, tuple[bytes, int]] = {
        f"{P}/apps/a": (app([8001], ("127.0.0.1:9000",)), 2),
        f"{P}/apps/b": (app([8002]), 3),
    }
    first = assemble(values, P, 3, None, cross=cross)
    assert served(first) == {"a": (8001,), "b": (8002,)} and seen == []
    values[f"{P}/apps/a"] = (app([8001], ("127.0.0.1:8002",)), 4)
    second = assemble(values, P, 4, first, cross=cross)
    assert served(second) == {"a": (8001,), "b": (8002,)}
    assert second.apps["a"].revision == 2  # its last good version
    assert second.rejected["a"].key == f"{P}/apps/a"
    assert second.rejected["a"].revision == 4
    assert second.rejected["a"].reason == f"loops into [\"a port of app 'b' ({P}/apps/b)\"]"
    new = assemble(values, P, 4, None, cross=cross)  # no last good version: not served
    assert served(new) == {"b": (8002,)} and set(new.rejected) == {"a"}


def test_the_document_is_what_json_dumps_writes_across_changes() -> None:
    """It is put together from each app's rendering, kept across assemblies."""

    def reference(a: Assembly) -> bytes:
        doc: dict[str, object] = {}
        if a.defaults is not None:
            doc["Defaults"] = json.loads(a.defaults[0])
        doc["Apps"] = [{"Name": x.name, **json.loads(a.apps[x.name].value)} for x in a.config.apps]
        return json.dumps(doc, indent=1).encode() + b"\n"

    s = Store()
    steps = [
        s.build(),
        s.put("apps/web", app([8080], HealthCheck={"Interval": 1})),
        s.put("defaults", b"{}"),
        s.put("defaults", b'{"ConnectTimeout": 5, "HealthCheck": {"Rise": 1}}'),
        s.put("apps/d\u00e9j\u00e0", app([5432, 5433], ("[::1]:9", "db:5432"))),
        s.put("apps/web", app([8081])),
        s.delete("defaults"),
        s.delete("apps/web"),
    ]
    for a in steps:
        assert a.document() == reference(a)


def test_ports_moved_between_apps_in_one_change_follow_the_values() -> None:
    s = Store()
    s.put("apps/a", app([1000, 1001]))
    s.put("apps/b", app([2000]))
    s.put("apps/c", app([3000]))
    s.values[f"{P}/apps/a"] = (app([1001]), s.revision + 1)
    s.values[f"{P}/apps/b"] = (app([2000, 1000]), s.revision + 1)
    s.revision += 1
    a = s.build()
    assert served(a) == {"a": (1001,), "b": (2000, 1000), "c": (3000,)}
    assert a.rejected == {}
    # an unchanged app keeps its port against two newcomers; the older newcomer
    # wins the port nobody had
    s.put("apps/x", app([3000, 4000]))
    a = s.put("apps/y", app([4000, 3000]))
    assert served(a) == {"a": (1001,), "b": (2000, 1000), "c": (3000,)}
    assert "port 3000 is used by app 'c'" in a.rejected["x"].reason
    assert "port 3000 is used by app 'c'" in a.rejected["y"].reason
    # the owner lets its port go: the two newcomers settle by age
    a = s.delete("apps/c")
    assert served(a) == {"a": (1001,), "b": (2000, 1000), "x": (3000, 4000)}
    assert "port 3000 is used by app 'x'" in a.rejected["y"].reason


def test_rule_7_many_apps_looping_into_one_port_are_judged_once_each() -> None:
    """Rejected one at a time in name order, yet an app that passed is not judged again
    after each rejection (a round over every app per rejection made N apps cost N^2)."""
    n = 400
    names = [f"a{i:03}" for i in range(n)]
    bad = set(names[1::2])  # every other app is one the cross check refuses
    calls: list[str] = []

    def cross(config: Config, others: object) -> None:
        calls.append(config.apps[0].name)
        if config.apps[0].name in bad:
            raise ConfigError("x", [f"{config.apps[0].name} loops"])

    values = {  # each app's target is a port of a000: all but a000 are checked
        f"{P}/apps/{name}": (app([1000 + i], ("127.0.0.1:1000",)), 2 + i)
        for i, name in enumerate(names)
    }
    a = assemble(values, P, n + 2, None, cross=cross)
    assert set(a.rejected) == bad
    assert {name: r.reason for name, r in a.rejected.items()} == {x: f"{x} loops" for x in bad}
    assert sorted(calls) == names[1:]  # each judged once


def test_rule_4_many_port_conflicts_cost_linear_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two new apps for each of n/2 ports: settled lowest port first, the older value
    winning, with work linear in the apps (counted as comparisons of an app with
    its version before; settling one port per round over every app made it N^2)."""
    import tcpproxy.fleet.assemble as module

    n = 400
    calls = [0]
    same = module._same

    def counted(last: object, now: object) -> bool:
        calls[0] += 1
        return same(last, now)  # type: ignore[arg-type]

    monkeypatch.setattr(module, "_same", counted)
    values = {f"{P}/apps/a{i:03}": (app([1000 + i // 2]), 2 + i) for i in range(n)}
    a = assemble(values, P, n + 2, None)
    assert served(a) == {f"a{i:03}": (1000 + i // 2,) for i in range(0, n, 2)}
    assert a.rejected["a001"].reason == f"Ports[0]: port 1000 is used by app 'a000' ({P}/apps/a000)"
    assert len(a.rejected) == n // 2
    assert calls[0] <= 10 * n, calls


def test_apps_told_apart_by_hostnames_share_a_port() -> None:
    s = Store()
    s.put("apps/shop", app([443], Hostnames=["shop.example"]))
    s.put("apps/tenants", app([443], Hostnames=["*.example.com"]))
    a = s.put("apps/fallback", app([443]))
    assert served(a) == {"fallback": (443,), "shop": (443,), "tenants": (443,)}
    assert a.rejected == {}
    assert parse_config(a.document()) == a.config


def test_a_name_or_a_default_on_a_port_stays_with_the_app_that_had_it() -> None:
    """Rule 4 for names: the claim is (port, name); the newcomer is set aside alone."""
    s = Store()
    s.put("apps/shop", app([443, 80], Hostnames=["shop.example"]))
    s.put("apps/fallback", app([443]))
    a = s.put("apps/copycat", app([443], Hostnames=["other.example", "SHOP.example."]))
    assert served(a) == {"fallback": (443,), "shop": (443, 80)}
    assert a.rejected["copycat"].reason == (
        f"Hostnames[1]: hostname 'shop.example' on port 443 is used by app 'shop' ({P}/apps/shop)"
    )
    a = s.put("apps/second-default", app([443]))
    assert "second-default" not in served(a)
    assert a.rejected["second-default"].reason == (
        f"Ports[0]: port 443 is used by app 'fallback' ({P}/apps/fallback)"
    )
    # the holder drops the name: the newcomer gets it at its next judging
    a = s.put("apps/shop", app([443, 80], Hostnames=["www.example"]))
    assert served(a)["copycat"] == (443,) and "copycat" not in a.rejected


def test_apps_sharing_a_port_must_agree_on_what_is_read_before_routing() -> None:
    s = Store()
    s.put("apps/shop", app([443], Hostnames=["shop.example"], InspectTimeout=2))
    a = s.put("apps/blog", app([443], Hostnames=["blog.example"]))
    assert served(a) == {"shop": (443,)}
    assert a.rejected["blog"].reason.startswith(
        f"InspectTimeout: differs from that of app 'shop' ({P}/apps/shop), which shares port 443"
    )
    a = s.put("apps/blog", app([443], Hostnames=["blog.example"], InspectTimeout=2))
    assert served(a) == {"blog": (443,), "shop": (443,)} and a.rejected == {}
