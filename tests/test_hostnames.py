"""Host names: the config's (normalized or refused), the wire's (normalized or None), matching."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcpproxy.hostnames import MAX_NAME, NameTable, normalize_name, normalize_wire_name

pytestmark = pytest.mark.engine  # the per-connection path's: CI runs them interpreted too


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.com", "example.com"),
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("*.Example.com.", "*.example.com"),
        ("a_b.example.com", "a_b.example.com"),
        ("10.0.0.1", "10.0.0.1"),
        ("localhost", "localhost"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.Example", "xn--bcher-kva.example"),
        ("*.bücher.example", "*.xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("例え.テスト", "xn--r8jz45g.xn--zckzah"),
        ("a" * 63 + ".com", "a" * 63 + ".com"),
    ],
)
def test_config_names_are_normalized(text: str, expected: str) -> None:
    assert normalize_name(text) == expected
    assert normalize_name(expected) == expected  # normalizing again changes nothing


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty name"),
        (".", "empty name"),
        ("a..example.com", "empty label"),
        (".example.com", "empty label"),
        ("example.com..", "empty label"),
        ("*", "leftmost label"),
        ("*.", "leftmost label"),
        ("a.*.example.com", "leftmost label"),
        ("a*.example.com", "leftmost label"),
        ("*.*.example.com", "leftmost label"),
        ("*.com", "two labels"),
        ("a" * 64 + ".com", "64 characters"),
        (".".join(["a" * 63] * 4), "255 characters"),
        ("exa mple.com", "' '"),
        ("example.com/", "'/'"),
        ("user@example.com", "'@'"),
        ("example.com:443", "':'"),
        ("-a.example.com", "starts or ends with '-'"),
        ("a-.example.com", "starts or ends with '-'"),
        ("xn--zz.example.com", "not a valid A-label"),
        ("a\u200db.example.com", "internationalized"),
        ("exa\x00mple.com", "'\\x00'"),
    ],
)
def test_bad_config_names_are_refused(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        normalize_name(text)


def test_the_longest_name_is_accepted() -> None:
    name = ".".join(["a" * 63] * 3 + ["a" * 61])
    assert len(name) == MAX_NAME
    assert normalize_name(name) == name
    with pytest.raises(ValueError, match="254 characters"):
        normalize_name(name + "a")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"example.com", "example.com"),
        (b"ExAmPlE.CoM", "example.com"),
        (b"example.com.", "example.com"),
        (b"xn--bcher-kva.example", "xn--bcher-kva.example"),
        (b"a_b.example", "a_b.example"),
        (b"localhost", "localhost"),
        (b"", None),
        (b".", None),
        (b"..", None),
        (b".example.com", None),
        (b"a..example.com", None),
        (b"exa\x00mple.com", None),
        (b"example.com\x00", None),
        (b"*.example.com", None),
        (b"b\xc3\xbccher.example", None),  # UTF-8: clients send A-labels
        (b"a b", None),
        (b"a/b", None),
        (b"a" * 64 + b".com", None),
        (b"a" * 254, None),
        (b"x" * 300, None),
    ],
)
def test_wire_names(raw: bytes, expected: str | None) -> None:
    assert normalize_wire_name(raw) == expected


@given(st.binary(max_size=300))
def test_wire_names_never_raise_and_are_hostnames(raw: bytes) -> None:
    name = normalize_wire_name(raw)
    if name is not None:
        assert name == name.lower() and name.isascii()
        assert 0 < len(name) <= MAX_NAME and not name.endswith(".")
        assert normalize_wire_name(name.encode()) == name


def test_matching_rules() -> None:
    table = NameTable(
        [
            ("example.com", "apex"),
            ("*.example.com", "wild"),
            ("www.example.com", "www"),
            ("*.b.example.com", "deeper"),
        ]
    )
    assert len(table) == 4
    assert table.names() == ["*.b.example.com", "*.example.com", "example.com", "www.example.com"]
    assert table.lookup("example.com") == "apex"
    assert table.lookup("www.example.com") == "www"  # exact beats wildcard
    assert table.lookup("a.example.com") == "wild"
    assert table.lookup("b.example.com") == "wild"
    assert table.lookup("a.b.example.com") == "deeper"
    assert table.lookup("a.c.example.com") is None  # one label only
    assert table.lookup("com") is None
    assert table.lookup(".example.com") is None
    assert table.lookup("") is None
    assert table.lookup("example.org") is None


def test_a_wildcard_does_not_match_its_apex() -> None:
    table = NameTable([("*.example.com", 1)])
    assert table.lookup("example.com") is None
    assert table.lookup("x.example.com") == 1


def test_wire_names_match_config_names() -> None:
    """What the sniffer gives (normalize_wire_name) meets what the config holds."""
    idn, wild = normalize_name("Bücher.Example."), normalize_name("*.Shop.Example")
    table = NameTable([(idn, "idn"), (wild, "w")])
    assert table.lookup(normalize_wire_name(b"XN--BCHER-KVA.example.") or "") == "idn"
    assert table.lookup(normalize_wire_name(b"Cart.SHOP.example") or "") == "w"


def test_table_refuses_names_twice_or_not_normalized() -> None:
    with pytest.raises(ValueError, match="given twice"):
        NameTable([("*.example.com", 1), ("*.example.com", 2)])
    with pytest.raises(ValueError, match="not a normalized name"):
        NameTable([("Example.com", 1)])
    with pytest.raises(ValueError, match="leftmost label"):
        NameTable([("*", 1)])
