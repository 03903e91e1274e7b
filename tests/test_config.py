"""Unit tests for tcpproxy.config: the accepted format, and what each mistake reports."""

import ipaddress
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcpproxy.config import (
    MAX_PROBLEMS,
    AppConfig,
    Config,
    ConfigError,
    Strategy,
    Target,
    app_connection_limit,
    no_isolation,
    parse_config,
)
from tcpproxy.sources.file import load_config

# The example from the brief, verbatim.
BRIEF_EXAMPLE = (
    '{"Apps": [{"Name": "five-thousand", "Ports": [5001, 5200], '
    '"Targets": ["tcp-echo.fly.dev:5001", "tcp-echo.fly.dev:5002"]}]}'
)
# The challenge's sample config.json, as it is laid out there.
CHALLENGE = """\
{
  "Apps": [
    {
      "Name": "five-thousand",
      "Ports": [
        5001,
        5200,
        5300,
        5400
      ],
      "Targets": [
        "tcp-echo.fly.dev:5001",
        "tcp-echo.fly.dev:5002"
      ]
    },
    {
      "Name": "six-thousand",
      "Ports": [
        6001,
        6200,
        6300,
        6400
      ],
      "Targets": [
        "tcp-echo.fly.dev:6001",
        "tcp-echo.fly.dev:6002"
      ]
    },
    {
      "Name": "seven-thousand",
      "Ports": [
        7001,
        7200,
        7300,
        7400
      ],
      "Targets": [
        "tcp-echo.fly.dev:7001",
        "tcp-echo.fly.dev:7002"
      ]
    }
  ]
}
"""


def app(**keys: Any) -> dict[str, Any]:
    """A valid app, with keys replaced (or removed, given None)."""
    result = {"Name": "a", "Ports": [1000], "Targets": ["h:1"], **keys}
    return {key: value for key, value in result.items() if value is not None}


def document(*apps: dict[str, Any], **top: Any) -> str:
    return json.dumps({"Apps": list(apps), **top})


def problems(data: str | bytes) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


# --- What loads ---------------------------------------------------------------------


def test_challenge_file_loads_unchanged() -> None:
    config = parse_config(CHALLENGE)
    assert [a.name for a in config.apps] == ["five-thousand", "six-thousand", "seven-thousand"]
    first = config.apps[0]
    assert first == AppConfig(
        name="five-thousand",
        ports=(5001, 5200, 5300, 5400),
        targets=(Target("tcp-echo.fly.dev", 5001), Target("tcp-echo.fly.dev", 5002)),
        strategy=Strategy.ROUND_ROBIN,
        connect_timeout=2.0,
    )


def test_brief_example_loads() -> None:
    (only,) = parse_config(BRIEF_EXAMPLE).apps
    assert only.name == "five-thousand"
    assert only.ports == (5001, 5200)
    assert [str(target) for target in only.targets] == [
        "tcp-echo.fly.dev:5001",
        "tcp-echo.fly.dev:5002",
    ]


def test_repository_config_loads() -> None:
    config = load_config(Path(__file__).parent.parent / "config.json")
    assert config.apps


def test_empty_apps_list_is_allowed() -> None:
    assert parse_config('{"Apps": []}') == Config(apps=())


def test_defaults_then_per_app_overrides() -> None:
    config = parse_config(
        document(
            app(Name="plain", Ports=[1]),
            app(Name="own-strategy", Ports=[2], Strategy="least-connections"),
            app(Name="own-timeout", Ports=[3], ConnectTimeout=0.5),
            Defaults={"Strategy": "random", "ConnectTimeout": 5},
        )
    )
    plain, own_strategy, own_timeout = config.apps
    assert (plain.strategy, plain.connect_timeout) == (Strategy.RANDOM, 5.0)
    assert (own_strategy.strategy, own_strategy.connect_timeout) == (
        Strategy.LEAST_CONNECTIONS,
        5.0,
    )
    assert (own_timeout.strategy, own_timeout.connect_timeout) == (Strategy.RANDOM, 0.5)
    assert type(plain.connect_timeout) is float


def test_built_in_defaults_apply_without_defaults_object() -> None:
    (only,) = parse_config(document(app(), Defaults={})).apps
    assert (only.strategy, only.connect_timeout) == (Strategy.ROUND_ROBIN, 2.0)


def test_admission_defaults_isolate_apps() -> None:
    (only,) = parse_config(document(app())).apps
    # An equal share of the process's --max-connections, at most ten ways: one app's
    # idle clients cannot take every slot from the others, whatever the limit.
    assert only.max_connections is None
    assert app_connection_limit(only, 10_000, 1) == 10_000  # alone: nothing to isolate from
    assert app_connection_limit(only, 10_000, 2) == 5000
    assert app_connection_limit(only, 10_000, 30) == 1000  # many apps: a tenth each
    assert app_connection_limit(only, 10, 2) == 5
    assert app_connection_limit(only, 25, 10) == 2  # rounded down: ten such apps fit
    assert app_connection_limit(only, 5, 10) == 1  # at least one
    assert only.max_connections_per_source is None  # off: NAT and balancers share addresses
    assert only.first_byte_timeout is None  # off: server-speaks-first protocols exist


def test_an_explicit_max_connections_wins_and_may_isolate_nothing() -> None:
    config = parse_config(
        document(
            app(Name="own", Ports=[1], MaxConnections=50),
            app(Name="inherits", Ports=[2]),
            {**app(Name="tenth", Ports=[3]), "MaxConnections": None},  # null: the default
            Defaults={"MaxConnections": 100},
        )
    )
    own, inherits, tenth = config.apps
    assert [app_connection_limit(a, 2000, 10) for a in config.apps] == [50, 100, 200]
    assert (own.max_connections, inherits.max_connections, tenth.max_connections) == (50, 100, None)
    assert no_isolation(config, 2000) == []
    (problem,) = no_isolation(config, 100)  # Defaults' 100 is explicit too
    assert problem.startswith("MaxConnections 100 gives app 'inherits' no isolation")
    assert "--max-connections (100)" in problem
    assert len(no_isolation(config, 50)) == 2
    alone = parse_config(document(app(MaxConnections=5000)))
    assert no_isolation(alone, 100) == []  # one app: nothing to isolate it from


def test_admission_options_per_app_and_in_defaults() -> None:
    plain, own = parse_config(
        document(
            app(Name="plain", Ports=[1]),
            {**app(Name="own", Ports=[2], FirstByteTimeout=0.5), "MaxConnectionsPerSource": None},
            Defaults={"MaxConnectionsPerSource": 20, "FirstByteTimeout": 10},
        )
    ).apps
    assert (plain.max_connections_per_source, plain.first_byte_timeout) == (20, 10.0)
    assert (own.max_connections_per_source, own.first_byte_timeout) == (None, 0.5)


def test_trusted_proxies_default_to_loopback_only() -> None:
    (only,) = parse_config(document(app(AcceptProxyProtocol=True))).apps
    # Not the world: only this host's own balancer is trusted unless the file says more.
    assert only.trusted_proxies == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )


def test_trusted_proxies_per_app_and_in_defaults() -> None:
    plain, own = parse_config(
        document(
            app(Name="plain", Ports=[1]),
            app(Name="own", Ports=[2], TrustedProxies=["192.0.2.7", "2001:db8::/32"]),
            Defaults={"TrustedProxies": ["10.0.0.0/8"]},
        )
    ).apps
    assert plain.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"),)
    assert own.trusted_proxies == (
        ipaddress.ip_network("192.0.2.7/32"),
        ipaddress.ip_network("2001:db8::/32"),
    )


def test_connect_timeout_bounds_are_inclusive_at_300() -> None:
    (only,) = parse_config(document(app(ConnectTimeout=300))).apps
    assert only.connect_timeout == 300.0


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("tcp-echo.fly.dev:5001", Target("tcp-echo.fly.dev", 5001)),
        ("fully.qualified.:80", Target("fully.qualified.", 80)),
        ("_service.example:1", Target("_service.example", 1)),
        ("127.0.0.1:65535", Target("127.0.0.1", 65535)),
        ("[::1]:8080", Target("::1", 8080)),
        ("[2001:db8::7]:443", Target("2001:db8::7", 443)),
    ],
)
def test_target_forms_round_trip(text: str, target: Target) -> None:
    (only,) = parse_config(document(app(Targets=[text]))).apps
    assert only.targets == (target,)
    assert str(only.targets[0]) == text


def test_port_map_and_ports() -> None:
    config = parse_config(CHALLENGE)
    five, six, seven = config.apps
    port_map = config.port_apps()
    assert port_map[5001] == [five]
    assert port_map[6400] == [six]
    assert port_map[7200] == [seven]
    assert len(port_map) == 12
    assert config.ports == frozenset(port_map)


def test_utf8_bom_is_tolerated() -> None:
    assert parse_config(b'\xef\xbb\xbf{"Apps": []}') == Config(apps=())
    assert parse_config('\ufeff{"Apps": []}') == Config(apps=())


# --- What each mistake reports ------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        # Top level
        ("[]", "(top level): must be an object, got a list"),
        ("{}", "Apps: missing required key 'Apps'"),
        ('{"Apps": {}}', "Apps: must be a list, got an object"),
        ('{"Apps": [3]}', "Apps[0]: must be an object, got 3"),
        (document(Defaults=[]), "Defaults: must be an object, got a list"),
        (document(Appz=[]), "Appz: unknown key 'Appz' (did you mean 'Apps'?)"),
        (document(Version=1), "Version: unknown key 'Version' (expected one of: Apps, Defaults)"),
        # Unknown keys and typos
        (document(app(Port=[1])), "Apps[0].Port: unknown key 'Port' (did you mean 'Ports'?)"),
        (document(app(ports=[1])), "Apps[0].ports: unknown key 'ports' (did you mean 'Ports'?)"),
        (
            document(Defaults={"connect_timeout": 1}),
            "Defaults.connect_timeout: unknown key 'connect_timeout'"
            " (did you mean 'ConnectTimeout'?)",
        ),
        (
            document(Defaults={"Ports": [1]}),
            "Defaults.Ports: unknown key 'Ports' (expected one of: AcceptProxyProtocol,"
            " ConnectTimeout, FirstByteTimeout, HealthCheck, IdleTimeout, InspectTimeout,"
            " MaxConnections, MaxConnectionsPerSource, SendProxyProtocol, Strategy,"
            " TrustedProxies)",
        ),
        (
            document(app(**{"a b": 1})),
            "Apps[0][\"a b\"]: unknown key 'a b'"
            " (expected one of: AcceptProxyProtocol, ConnectTimeout, FirstByteTimeout,"
            " HealthCheck, Hostnames, IdleTimeout, InspectTimeout, MaxConnections,"
            " MaxConnectionsPerSource, Name, Ports, SendProxyProtocol, Strategy, Targets,"
            " TrustedProxies)",
        ),
        # Name
        (document(app(Name=None)), "Apps[0].Name: missing required key 'Name'"),
        (document(app(Name=5)), "Apps[0].Name: must be a string, got 5"),
        (document(app(Name="")), 'Apps[0].Name: must not be empty, got ""'),
        (
            document(app(Name=" a")),
            'Apps[0].Name: must not start or end with whitespace, got " a"',
        ),
        (
            document(app(Name="a\n")),
            'Apps[0].Name: must not start or end with whitespace, got "a\\n"',
        ),
        (
            document(app(Name="a\x1bb")),
            'Apps[0].Name: must not contain control characters, got "a\\u001bb"',
        ),
        (
            document(app(Name="x" * 129)),
            f'Apps[0].Name: must be at most 128 characters, got 129: "{"x" * 33}..."',
        ),
        (
            document(app(Ports=[1]), app(Ports=[2]), app(Ports=[3]), app(Ports=[4])),
            "Apps[3].Name: app name 'a' is already used by Apps[0]",
        ),
        # Ports
        (document(app(Ports=None)), "Apps[0].Ports: missing required key 'Ports'"),
        (document(app(Ports=[])), "Apps[0].Ports: must not be empty, got []"),
        (document(app(Ports=5001)), "Apps[0].Ports: must be a list, got 5001"),
        (document(app(Ports=[1, "6300"])), 'Apps[0].Ports[1]: must be an integer, got "6300"'),
        (document(app(Ports=[1, True])), "Apps[0].Ports[1]: must be an integer, got true"),
        (document(app(Ports=[1, 6300.0])), "Apps[0].Ports[1]: must be an integer, got 6300.0"),
        (document(app(Ports=[1, None])), "Apps[0].Ports[1]: must be an integer, got null"),
        (document(app(Ports=[0])), "Apps[0].Ports[0]: must be between 1 and 65535, got 0"),
        (
            document(app(), app(), app(Name="c", Ports=[1, 70000])),
            "Apps[2].Ports[1]: must be between 1 and 65535, got 70000",
        ),
        (
            document(app(Ports=[5001, 5200, 5001])),
            "Apps[0].Ports[2]: port 5001 is listed twice in app 'a'"
            " (Apps[0].Ports[0] and Apps[0].Ports[2])",
        ),
        (
            document(app(Name="five-thousand", Ports=[5001]), app(Name="b", Ports=[5001])),
            "Apps[1].Ports[0]: port 5001 is used by both app 'five-thousand' (Apps[0].Ports[0])"
            " and app 'b' (Apps[1].Ports[0]); apps share a port only if Hostnames tell them apart"
            " (one may go without)",
        ),
        # Targets
        (document(app(Targets=None)), "Apps[0].Targets: missing required key 'Targets'"),
        (document(app(Targets=[])), "Apps[0].Targets: must not be empty, got []"),
        (document(app(Targets="h:1")), 'Apps[0].Targets: must be a list, got "h:1"'),
        (document(app(Targets=["h:1", 5])), "Apps[0].Targets[1]: must be a string, got 5"),
        (
            document(app(Targets=["h:1", "tcp-echo.fly.dev"])),
            "Apps[0].Targets[1]: 'tcp-echo.fly.dev' has no port, expected host:port",
        ),
        (document(app(Targets=["h:"])), "Apps[0].Targets[0]: 'h:' has no port, expected host:port"),
        (
            document(app(Targets=["localhost"])),
            "Apps[0].Targets[0]: 'localhost' has no port, expected host:port",
        ),
        (
            document(app(Targets=[":80"])),
            "Apps[0].Targets[0]: ':80' has no host, expected host:port",
        ),
        (document(app(Targets=[""])), "Apps[0].Targets[0]: '' is empty, expected host:port"),
        (
            document(app(Targets=["h:http"])),
            "Apps[0].Targets[0]: 'h:http' has port 'http', expected a number",
        ),
        (
            document(app(Targets=["h:-1"])),
            "Apps[0].Targets[0]: 'h:-1' has port '-1', expected a number",
        ),
        (
            document(app(Targets=["h:0"])),
            "Apps[0].Targets[0]: 'h:0' has port 0, expected 1 to 65535",
        ),
        (
            document(app(Targets=["h:65536"])),
            "Apps[0].Targets[0]: 'h:65536' has port 65536, expected 1 to 65535",
        ),
        (
            document(app(Targets=["::1:8080"])),
            "Apps[0].Targets[0]: '::1:8080' needs brackets around the IPv6 address:"
            " write it as [::1]:8080",
        ),
        (
            document(app(Targets=["a:b:c"])),
            "Apps[0].Targets[0]: 'a:b:c' has too many ':'; IPv6 addresses need brackets,"
            " as in [::1]:8080",
        ),
        (
            document(app(Targets=["[::1]"])),
            "Apps[0].Targets[0]: '[::1]' has no port, expected [address]:port",
        ),
        (
            document(app(Targets=["[::1]80"])),
            "Apps[0].Targets[0]: '[::1]80' has no ':' after ']', expected [address]:port",
        ),
        (
            document(app(Targets=["[::1:80"])),
            "Apps[0].Targets[0]: '[::1:80' has no ']' after the IPv6 address",
        ),
        (
            document(app(Targets=["[1.2.3.4]:80"])),
            "Apps[0].Targets[0]: '[1.2.3.4]:80' has an invalid IPv6 address '1.2.3.4'",
        ),
        (
            document(app(Targets=["256.1.1.1:80"])),
            "Apps[0].Targets[0]: '256.1.1.1:80' has an invalid IPv4 address '256.1.1.1'",
        ),
        (
            document(app(Targets=["h:1", "H:1"])),
            "Apps[0].Targets[1]: target 'H:1' is listed twice in app 'a'"
            " (as 'h:1' at Apps[0].Targets[0])",
        ),
        (
            document(app(Targets=["x" * 254 + ":1"])),
            f"Apps[0].Targets[0]: '{'x' * 33}...' has a host name longer than 253 characters (254)",
        ),
        *[
            (
                document(app(Targets=[f"{host}:1"])),
                f"Apps[0].Targets[0]: {host + ':1'!r} has an invalid host name {host!r}:"
                " each '.'-separated part"
                " must be 1-63 letters, digits, '-' or '_', and not start or end with '-'",
            )
            for host in ["a..b", ".a", "-a", "a-", "a b", "bücher.de"]
        ],
        (  # long values are shortened
            document(app(Targets=["x" * 64 + ".com:1"])),
            f"Apps[0].Targets[0]: '{'x' * 33}...' has an invalid host name '{'x' * 33}...':"
            " each '.'-separated part must be 1-63 letters, digits, '-' or '_', and not start"
            " or end with '-'",
        ),
        # Options
        (
            document(app(Strategy="fastest")),
            "Apps[0].Strategy: must be one of 'round-robin', 'random', 'least-connections',"
            ' got "fastest"',
        ),
        (
            document(Defaults={"Strategy": 1}),
            "Defaults.Strategy: must be one of 'round-robin', 'random', 'least-connections', got 1",
        ),
        (
            document(Defaults={"ConnectTimeout": 0}),
            "Defaults.ConnectTimeout: must be greater than 0, got 0",
        ),
        (
            document(app(ConnectTimeout=-1.5)),
            "Apps[0].ConnectTimeout: must be greater than 0, got -1.5",
        ),
        (
            document(app(ConnectTimeout=300.5)),
            "Apps[0].ConnectTimeout: must be at most 300, got 300.5",
        ),
        (
            document(app(MaxConnectionsPerSource=0)),
            "Apps[0].MaxConnectionsPerSource: must be at least 1, got 0",
        ),
        (
            document(app(MaxConnectionsPerSource=1.5)),
            "Apps[0].MaxConnectionsPerSource: must be an integer, got 1.5",
        ),
        (
            document(app(FirstByteTimeout=0)),
            "Apps[0].FirstByteTimeout: must be greater than 0, got 0",
        ),
        (
            document(Defaults={"FirstByteTimeout": 3601}),
            "Defaults.FirstByteTimeout: must be at most 3600, got 3601",
        ),
        (
            document(app(TrustedProxies=["10.0.0.0/8", "10.0.0.1/8"])),
            "Apps[0].TrustedProxies[1]: '10.0.0.1/8' has host bits set after the prefix;"
            " did you mean '10.0.0.0/8'?",
        ),
        (
            document(Defaults={"TrustedProxies": ["nope"]}),
            "Defaults.TrustedProxies[0]: 'nope' is not an IP address or CIDR network"
            " (like '10.0.0.0/8' or 'fd00::/8')",
        ),
        (
            document(app(TrustedProxies=["10.0.0.0/33"])),
            "Apps[0].TrustedProxies[0]: '10.0.0.0/33' has an invalid prefix length '33'"
            " (0-32 for IPv4, 0-128 for IPv6)",
        ),
        (
            document(app(TrustedProxies=[" fd00::/8"])),
            "Apps[0].TrustedProxies[0]: ' fd00::/8' is not an IP address or CIDR network"
            " (like '10.0.0.0/8' or 'fd00::/8')",
        ),
        (document(app(TrustedProxies=[5])), "Apps[0].TrustedProxies[0]: must be a string, got 5"),
        (document(app(TrustedProxies=[])), "Apps[0].TrustedProxies: must not be empty, got []"),
        (
            document(app(TrustedProxies="10.0.0.0/8")),
            'Apps[0].TrustedProxies: must be a list, got "10.0.0.0/8"',
        ),
        (
            document(app(ConnectTimeout=True)),
            "Apps[0].ConnectTimeout: must be a number, got true",
        ),
        (document(app(ConnectTimeout="2")), 'Apps[0].ConnectTimeout: must be a number, got "2"'),
        (
            document(app(ConnectTimeout=float("nan"))),
            "Apps[0].ConnectTimeout: must be a finite number, got NaN",
        ),
    ],
)
def test_problem_reported_with_location(doc: str, expected: str) -> None:
    assert expected in problems(doc)


def test_all_problems_reported_together_in_document_order() -> None:
    doc = document(
        app(Name="a", Ports=[1, "2"]),
        app(Name="a", Ports=[1], Targets=["nope"], Strategy="x"),
        Defaults={"ConnectTimeout": 0},
    )
    with pytest.raises(ConfigError) as info:
        parse_config(doc, source="proxy.json")
    assert info.value.source == "proxy.json"
    assert info.value.problems == (
        'Apps[0].Ports[1]: must be an integer, got "2"',
        "Apps[1].Name: app name 'a' is already used by Apps[0]",
        "Apps[1].Ports[0]: port 1 is used by both app 'a' (Apps[0].Ports[0])"
        " and app 'a' (Apps[1].Ports[0]); apps share a port only if Hostnames tell them apart"
        " (one may go without)",
        "Apps[1].Strategy: must be one of 'round-robin', 'random', 'least-connections', got \"x\"",
        "Apps[1].Targets[0]: 'nope' has no port, expected host:port",
        "Defaults.ConnectTimeout: must be greater than 0, got 0",
    )
    assert str(info.value) == "proxy.json: 6 problems:\n  " + "\n  ".join(info.value.problems)


def test_single_problem_message() -> None:
    error = ConfigError("proxy.json", ["Apps: missing required key 'Apps'"])
    assert str(error) == "proxy.json: Apps: missing required key 'Apps'"


def test_config_error_pickles() -> None:
    error = ConfigError("proxy.json", ["a", "b"])
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.source, copy.problems, str(copy)) == (error.source, error.problems, str(error))
    error = ConfigError("proxy.json", ["a"], more=3)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.problems, copy.more, str(copy)) == (("a",), 3, str(error))


def test_config_error_keeps_the_first_problems_and_counts_the_rest() -> None:
    error = ConfigError("proxy.json", (f"p{i}" for i in range(MAX_PROBLEMS + 5)), more=2)
    assert error.problems == tuple(f"p{i}" for i in range(MAX_PROBLEMS))
    assert error.more == 7
    lines = str(error).split("\n")
    assert lines[0] == f"proxy.json: {MAX_PROBLEMS + 7} problems:"
    assert lines[1:-1] == [f"  p{i}" for i in range(MAX_PROBLEMS)]
    assert lines[-1] == "  ... and 7 more"
    assert str(ConfigError("x", ["only"], more=1)) == "x: 2 problems:\n  only\n  ... and 1 more"


def test_thousands_of_bad_apps_report_the_first_few_in_document_order() -> None:
    """One mistake copied over many apps: a bounded message, still in document order
    (pydantic's problems and the cross checks' interleaved), and the count of the rest."""
    apps = [app(Name=f"a{i}", Ports=[70000, 1]) for i in range(3000)]
    with pytest.raises(ConfigError) as info:
        parse_config(document(*apps))
    error = info.value
    assert error.problems[:3] == (
        "Apps[0].Ports[0]: must be between 1 and 65535, got 70000",
        "Apps[1].Ports[0]: must be between 1 and 65535, got 70000",
        "Apps[1].Ports[1]: port 1 is used by both app 'a0' (Apps[0].Ports[1])"
        " and app 'a1' (Apps[1].Ports[1]); apps share a port only if Hostnames tell them apart"
        " (one may go without)",
    )
    assert len(error.problems) == MAX_PROBLEMS
    assert error.more == 3000 + 2999 - MAX_PROBLEMS
    assert str(error).endswith(f"\n  ... and {error.more} more")
    assert len(str(error)) < 200 * MAX_PROBLEMS


def test_problems_in_defaults_and_apps_do_not_mask_each_other() -> None:
    found = problems(document(app(Name=""), app(Name="b", Ports=[1000]), Defaults={"X": 1}))
    assert 'Apps[0].Name: must not be empty, got ""' in found
    assert (
        "Apps[1].Ports[0]: port 1000 is used by both app Apps[0] (Apps[0].Ports[0])"
        " and app 'b' (Apps[1].Ports[0]); apps share a port only if Hostnames tell them apart"
        " (one may go without)" in found
    )
    assert (
        "Defaults.X: unknown key 'X' (expected one of: AcceptProxyProtocol, ConnectTimeout,"
        " FirstByteTimeout, HealthCheck, IdleTimeout, InspectTimeout, MaxConnections,"
        " MaxConnectionsPerSource, SendProxyProtocol, Strategy, TrustedProxies)" in found
    )


# --- JSON-level problems ------------------------------------------------------------


def test_json_syntax_error_has_line_and_column() -> None:
    assert problems('{\n  "Apps": [\n    {"Name": "a",}\n  ]\n}') == (
        "line 3, column 18: expecting property name enclosed in double quotes",
    )


def test_duplicate_json_keys_are_reported_where_they_occur() -> None:
    doc = '{"Apps": [{"Name": "a", "Ports": [1], "Ports": [2], "Targets": ["h:1"]}]}'
    assert problems(doc) == ("Apps[0].Ports: duplicate key 'Ports'",)
    assert "Apps: duplicate key 'Apps'" in problems('{"Apps": [], "Apps": []}')


def test_non_utf8_bytes() -> None:
    assert problems(b'{"Apps": [\n  "\xc3\xa9\xff"]}') == (
        "line 2, column 5: not valid UTF-8 (invalid start byte)",
    )


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ("", "(top level): empty document, expected a JSON object"),
        (" \n", "(top level): empty document, expected a JSON object"),
        ("[" * 100_000, "(top level): nested too deeply"),
        ('{"Apps": [' + "1" * 5000 + "]}", "(top level): a number has too many digits"),
        ('{"Apps": []} x', "line 1, column 14: extra data"),
    ],
)
def test_documents_that_are_not_json_objects(doc: str, expected: str) -> None:
    assert problems(doc) == (expected,)


# --- Files --------------------------------------------------------------------------


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(CHALLENGE)
    assert load_config(path) == parse_config(CHALLENGE)
    assert load_config(str(path)) == parse_config(CHALLENGE)


def test_load_config_names_the_file_in_problems(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("{}")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: Apps: missing required key 'Apps'"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == os.fspath(path)
    assert info.value.problems == ("cannot read file: No such file or directory",)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.problems == ("is a directory, not a regular file",)


# --- Properties ---------------------------------------------------------------------

KEYS = ["Apps", "Defaults", "Name", "Ports", "Targets", "Strategy", "ConnectTimeout"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)
# Mostly well-formed apps, so that generated documents also reach the cross-app checks
# and, sometimes, load.
loose_apps = st.fixed_dictionaries(
    {
        "Name": st.sampled_from(["a", "b", ""]) | json_values,
        "Ports": st.lists(st.integers(0, 70_000) | st.sampled_from([1, 2, "3", True]), max_size=3)
        | json_values,
        "Targets": st.lists(
            st.sampled_from(["h:1", "H:1", "[::1]:2", "::1:2", "h", "1.2.3.4:5"]) | st.text(),
            max_size=3,
        )
        | json_values,
    },
    optional={"Strategy": st.sampled_from(list(Strategy)) | json_values},
)


def assert_config_or_config_error(data: bytes | str) -> None:
    try:
        config = parse_config(data)
    except ConfigError as error:
        assert error.problems
        assert all(problem.strip() for problem in error.problems)
        assert str(error).startswith("<config>: ")
    else:
        assert len(config.port_apps()) == sum(len(app.ports) for app in config.apps)
        assert len({app.name for app in config.apps}) == len(config.apps)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_give_config_or_config_error(data: bytes) -> None:
    assert_config_or_config_error(data)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(json_values | st.dictionaries(st.sampled_from(KEYS), json_values))
def test_any_json_value_gives_config_or_config_error(value: object) -> None:
    assert_config_or_config_error(json.dumps(value))


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(st.lists(loose_apps, max_size=3), st.none() | json_values)
def test_app_shaped_documents_give_config_or_config_error(
    apps: list[dict[str, Any]], defaults: object
) -> None:
    doc: dict[str, Any] = {"Apps": apps}
    if defaults is not None:
        doc["Defaults"] = defaults
    assert_config_or_config_error(json.dumps(doc))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.sets(st.integers(1, 65535), min_size=1, max_size=4), max_size=4),
    st.sampled_from(list(Strategy)),
    st.floats(min_value=0.001, max_value=300),
)
def test_valid_documents_round_trip(
    port_sets: list[set[int]], strategy: Strategy, timeout: float
) -> None:
    taken: set[int] = set()
    apps = []
    for i, ports in enumerate(port_sets):
        ports -= taken  # ports are unique across apps
        taken |= ports
        if ports:
            apps.append(
                AppConfig(
                    name=f"app-{i}",
                    ports=tuple(sorted(ports)),
                    targets=(Target("::1", 1000 + i), Target("example.com", 80)),
                    strategy=strategy,
                    connect_timeout=timeout,
                )
            )
    doc = {
        "Apps": [
            {
                "Name": a.name,
                "Ports": list(a.ports),
                "Targets": [str(t) for t in a.targets],
                "Strategy": str(a.strategy),
                "ConnectTimeout": a.connect_timeout,
            }
            for a in apps
        ]
    }
    assert parse_config(json.dumps(doc)) == Config(apps=tuple(apps))
