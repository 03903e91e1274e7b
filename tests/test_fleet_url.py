"""Parsing etcd:// targets: endpoints, prefix, TLS and auth options, and the errors."""

from __future__ import annotations

import pytest

from tcpproxy.fleet.url import EtcdTarget, is_etcd_url, parse_etcd_url


def test_endpoints_and_prefix() -> None:
    target = parse_etcd_url("etcd://10.0.0.1:2379,etcd-b:32379,[::1]:2380,h/fleet/prod/")
    assert target == EtcdTarget(
        endpoints=(("10.0.0.1", 2379), ("etcd-b", 32379), ("::1", 2380), ("h", 2379)),
        prefix="/fleet/prod",
    )
    assert target.base_urls()[2] == "http://[::1]:2380"
    assert target.describe_endpoints() == "10.0.0.1:2379,etcd-b:32379,[::1]:2380,h:2379"


def test_tls_and_auth_options() -> None:
    target = parse_etcd_url(
        "etcds://a:1/p", cacert="ca.pem", cert="c.pem", key="c.key", user="fleet"
    )
    assert target.tls and target.base_urls() == ("https://a:1",)
    assert (target.cacert, target.cert, target.key) == ("ca.pem", "c.pem", "c.key")
    assert (target.user, target.password_env) == ("fleet", "ETCD_PASSWORD")
    assert parse_etcd_url("etcd://a:1/p", user="u", password_env="PW").password_env == "PW"


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("http://a:1/p", {}, "must start with etcd://"),
        ("etcd://a:1", {}, "needs a key prefix"),
        ("etcd://a:1/", {}, "needs a key prefix"),
        ("etcd://a:1/p//q", {}, "empty part in prefix"),
        ("etcd://a:1,,b:2/p", {}, "empty endpoint"),
        ("etcd://a:x/p", {}, "bad port 'x'"),
        ("etcd://a:70000/p", {}, "bad port '70000'"),
        ("etcd://a b:1/p", {}, "bad host 'a b'"),
        ("etcd://[::1]x/p", {}, "bad endpoint"),
        (
            "etcd://999.1.1.1:1/x",
            {},
            "bad host '999.1.1.1' in endpoint '999.1.1.1:1': not an IPv4 address",
        ),
        ("etcd://1.2.3:1/x", {}, "bad host '1.2.3' in endpoint '1.2.3:1': not an IPv4 address"),
        ("etcd://[1::2::3]:1/x", {}, "bad host '[1::2::3]' in endpoint '[1::2::3]:1': not an IPv6"),
        ("etcd://a..b:2379/x", {}, "bad host 'a..b' in endpoint 'a..b:2379': empty label"),
        ("etcd://.a:1/x", {}, "bad host '.a' in endpoint '.a:1': empty label"),
        (f"etcd://{'l' * 64}.example:1/x", {}, "a label over 63 characters"),
        (f"etcd://{'l.' * 127}l:1/x", {}, "name over 253 characters"),
        ("etcd://u:pw@a:1/p", {}, "no user or password in the URL"),
        ("etcd://a:1/p?x=1", {}, "no query"),
        ("etcd://a:1/p", {"cacert": "ca.pem"}, "needs etcds://"),
        ("etcds://a:1/p", {"cert": "c.pem"}, "both --etcd-cert and --etcd-key"),
        ("etcd://a:1/p", {"user": "root:secret"}, "never argv"),
        ("etcd://a:1/p", {"password_env": "PW"}, "without a user"),
    ],
)
def test_errors_name_the_bad_part(url: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_etcd_url(url, **options)
    assert message in str(info.value)


def test_is_etcd_url() -> None:
    assert is_etcd_url("etcd://a/p") and is_etcd_url("ETCDS://a/p")
    assert not is_etcd_url("config.json") and not is_etcd_url("/etc/etcd://x")


def test_valid_hosts_pass() -> None:
    """What the stricter host checks must still accept."""
    url = f"etcd://1.2.3.4,[fe80::1],host.,{'l' * 63}.example,a_b-c.d:1/p"
    hosts = [host for host, _port in parse_etcd_url(url).endpoints]
    assert hosts == ["1.2.3.4", "fe80::1", "host.", f"{'l' * 63}.example", "a_b-c.d"]
