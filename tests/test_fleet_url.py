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
        ("etcd://u:pw@a:1/p", {}, "no user or password in the URL"),
        ("etcd://a:1/p?x=1", {}, "no query"),
        ("etcd://a:1/p", {"cacert": "ca.pem"}, "needs etcds://"),
        ("etcds://a:1/p", {"cert": "c.pem"}, "both --etcd-cert and --etcd-key"),
        ("etcd://a:1/p", {"user": "root:secret"}, "never argv"),
        ("etcd://a:1/p", {"password_env": "PW"}, "without a user"),
    ],
)
def test_errors_name_the_bad_part(url: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("?", r"\?")):
        parse_etcd_url(url, **options)


def test_is_etcd_url() -> None:
    assert is_etcd_url("etcd://a/p") and is_etcd_url("ETCDS://a/p")
    assert not is_etcd_url("config.json") and not is_etcd_url("/etc/etcd://x")
