"""Host names for routing on a shared port: normalize them and match them (pure).

Two sources, two rules. A name in the config (`normalize_name`) is a person's
text: Unicode is converted to its A-label (punycode) with the `idna` package
(IDNA 2008 with the UTS 46 mapping, which also folds case), and anything that
is not a host name is refused with a ValueError saying what is wrong. A name
from the wire (`normalize_wire_name`: a TLS server_name, an HTTP Host) is
the peer's bytes: ASCII host name characters or nothing (None, "no name"),
never an exception, and no IDNA work on the per-connection path (a client
sends A-labels; one that sends anything else matches no config name anyway).

Matching (`NameTable`): exact names and `*.example.com` wildcards; case-
insensitive (both sides are lowercased); a trailing dot is ignored; a
wildcard matches exactly one label, as in certificates (RFC 6125 6.4.3): not
the apex `example.com`, not `a.b.example.com`; an exact name beats a wildcard.

Rules of the config's names, beyond DNS's (labels 1-63 bytes, 253 in all):
1. Letters, digits, '-' and '_' only; no label starts or ends with '-'
   (RFC 1123). '_' is allowed: it is seen in real host names and TLS stacks
   accept it in SNI.
2. '*' only as the whole leftmost label, over a base of two labels or more:
   `*.example.com`, not `*`, `*.com` or `a*.example.com`. A wildcard over a
   top-level domain is what certificate authorities and browsers refuse too;
   the port's default app (the one without Hostnames) is how to take every
   name.
3. An `xn--` label must be a valid A-label (it is decoded to check).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Generic, TypeVar

import idna

__all__ = [
    "MAX_LABEL",
    "MAX_NAME",
    "NameTable",
    "normalize_name",
    "normalize_wire_name",
]

MAX_NAME: Final = 253  # characters of a host name, no trailing dot (RFC 1035's 255 on the wire)
MAX_LABEL: Final = 63  # characters of one label (RFC 1035)

_LDH: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")
# bytes a wire name may hold, either case: bytes.translate deletes them, and what is left is bad
_WIRE_BYTES: Final = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_."

V = TypeVar("V")


def _check_label(label: str) -> None:
    """Rule 1 (and 3) for one lowercased ASCII label; raises ValueError."""
    if not label:
        raise ValueError("an empty label (two dots in a row, or a leading dot)")
    if len(label) > MAX_LABEL:
        raise ValueError(f"a label of {len(label)} characters (at most {MAX_LABEL})")
    bad = sorted(set(label) - _LDH)
    if bad:
        raise ValueError(f"the character {bad[0]!r} (letters, digits, '-' and '_' only)")
    if label[0] == "-" or label[-1] == "-":
        raise ValueError(f"the label {label!r} starts or ends with '-'")
    if label.startswith("xn--"):
        try:
            idna.decode(label)
        except idna.IDNAError as exc:
            raise ValueError(f"the label {label!r} is not a valid A-label ({exc})") from None


def _to_ascii(base: str) -> str:
    """`base` (no wildcard) as lowercase ASCII labels, Unicode converted; raises ValueError."""
    if not base.isascii():
        try:
            base = idna.encode(base, uts46=True, transitional=False).decode("ascii")
        except idna.IDNAError as exc:
            raise ValueError(f"not a valid internationalized name ({exc})") from None
    base = base.lower()
    for label in base.split("."):
        _check_label(label)
    return base


def normalize_name(text: str) -> str:
    """A config name as it is matched: lowercase A-labels, no trailing dot.

    `text` is an exact name or a `*.example.com` wildcard (the module's rules).
    Raises ValueError naming what is wrong; the caller quotes where and the value.
    """
    name = text[:-1] if text.endswith(".") else text
    if not name:
        raise ValueError("an empty name")
    wildcard = name.startswith("*.")
    base = name[2:] if wildcard else name
    if "*" in base:
        raise ValueError("'*' is allowed only as the whole leftmost label, as in '*.example.com'")
    result = _to_ascii(base)
    if wildcard:
        if "." not in result:
            raise ValueError(
                "a wildcard needs a base of two labels or more ('*.example.com', not '*.com')"
            )
        result = "*." + result
    if len(result) > MAX_NAME:
        raise ValueError(f"a name of {len(result)} characters (at most {MAX_NAME})")
    return result


def normalize_wire_name(raw: bytes) -> str | None:
    """A name a client sent (SNI, Host) as it is matched; None if it is not a host name.

    ASCII letters, digits, '-', '_' and dots only, lowercased, a trailing dot
    dropped, labels 1-63 bytes, 253 in all. Never raises: the bytes are the peer's.
    """
    size = len(raw)
    if size and raw[size - 1] == 0x2E:  # '.'
        raw = raw[: size - 1]
        size -= 1
    if size == 0 or size > MAX_NAME:
        return None
    if raw.translate(None, _WIRE_BYTES):  # a byte that is not allowed is left
        return None
    if raw[0] == 0x2E or b".." in raw:
        return None
    if size > MAX_LABEL and max(len(label) for label in raw.split(b".")) > MAX_LABEL:
        return None
    return raw.decode("ascii").lower()


class NameTable(Generic[V]):
    """Normalized names (`normalize_name`) to values (an app), matched by the module's rules.

    Built once per config; `lookup` is on the per-connection path: a dict
    look-up for the exact name, then one for the wildcard of its parent.
    """

    def __init__(self, entries: Iterable[tuple[str, V]]) -> None:
        """`entries`: (normalized name or wildcard, value). Raises ValueError for a name
        given twice, or one that is not normalized."""
        self._exact: dict[str, V] = {}
        # keyed by the wildcard's base: "*.example.com" → "example.com"
        self._wild: dict[str, V] = {}
        for name, value in entries:
            if normalize_name(name) != name:
                raise ValueError(f"{name!r} is not a normalized name")
            table, key = (self._wild, name[2:]) if name.startswith("*.") else (self._exact, name)
            if key in table:
                raise ValueError(f"{name!r} given twice")
            table[key] = value

    def lookup(self, name: str) -> V | None:
        """The value for `name` (normalized, as `normalize_wire_name` gives): an exact
        name's, else the wildcard's one label up; None if neither."""
        value = self._exact.get(name)
        if value is not None:
            return value
        dot = name.find(".")
        if dot <= 0:
            return None
        return self._wild.get(name[dot + 1 :])

    def names(self) -> list[str]:
        """Every name and wildcard, sorted (for /status)."""
        return sorted([*self._exact, *("*." + base for base in self._wild)])

    def __len__(self) -> int:
        return len(self._exact) + len(self._wild)
