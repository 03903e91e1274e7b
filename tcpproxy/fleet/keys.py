"""The fleet's key layout in etcd, pure: a config file as keys and back, and a push's diff.

Layout under PREFIX (one key per app, so teams change apps independently)::

    PREFIX/defaults      the file's "Defaults" object (optional)
    PREFIX/apps/<Name>   one app's object as in the file, without "Name" (the key says it)
    PREFIX/nodes/<id>    each node's record (written by the nodes, read by status)

Values are written as canonical JSON (sorted keys, no spaces), so pushing the same
file twice writes nothing; values are compared as JSON, so a key written by hand
with other spacing is not rewritten either.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tcpproxy.config import ConfigError

__all__ = [
    "PushPlan",
    "app_key",
    "apps_prefix",
    "canonical",
    "check_key_names",
    "config_keys",
    "defaults_key",
    "file_document",
    "nodes_prefix",
    "plan_push",
    "wanted_keys",
]


def defaults_key(prefix: str) -> str:
    return f"{prefix}/defaults"


def apps_prefix(prefix: str) -> str:
    return f"{prefix}/apps/"


def app_key(prefix: str, name: str) -> str:
    return f"{apps_prefix(prefix)}{name}"


def nodes_prefix(prefix: str) -> str:
    return f"{prefix}/nodes/"


def canonical(value: object) -> bytes:
    """The bytes written for a JSON value: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def config_keys(prefix: str, kvs: dict[str, bytes]) -> dict[str, bytes]:
    """Only the config keys (defaults and apps) of a range over ``prefix + "/"``."""
    apps = apps_prefix(prefix)
    return {k: v for k, v in kvs.items() if k == defaults_key(prefix) or k.startswith(apps)}


def check_key_names(document: dict[str, Any], source: str) -> None:
    """Refuse (`ConfigError`) an app name that cannot be a key's last part ('/').

    What etcd adds to the file checks: ``tcpproxyctl check`` runs it too, so a file
    it calls ok is one ``push`` writes.
    """
    problems = [
        f"Apps[{i}].Name: must not contain '/' in etcd (the name is the key's last part), "
        f"got {app['Name']!r}"
        for i, app in enumerate(document["Apps"])
        if "/" in app["Name"]
    ]
    if problems:
        raise ConfigError(source, problems)


def wanted_keys(prefix: str, document: dict[str, Any], source: str) -> dict[str, bytes]:
    """The keys and values a validated config document becomes.

    Raises `ConfigError` for an app name that cannot be a key's last part ('/').
    """
    check_key_names(document, source)
    keys = {
        app_key(prefix, app["Name"]): canonical({k: v for k, v in app.items() if k != "Name"})
        for app in document["Apps"]
    }
    if "Defaults" in document:
        keys[defaults_key(prefix)] = canonical(document["Defaults"])
    return keys


@dataclass
class PushPlan:
    """What a push changes: the transaction's puts and deletes, and the names for people."""

    puts: dict[str, bytes] = field(default_factory=dict)
    deletes: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    defaults: str | None = None  # "added", "changed", "removed" or None (unchanged)

    @property
    def empty(self) -> bool:
        return not self.puts and not self.deletes

    def describe(self) -> list[str]:
        """One line per change, apps by name, in a stable order."""
        lines = [f"added app {name}" for name in self.added]
        lines += [f"changed app {name}" for name in self.changed]
        lines += [f"removed app {name}" for name in self.removed]
        if self.defaults:
            lines.append(f"{self.defaults} defaults")
        return lines or ["no change"]


def plan_push(prefix: str, current: dict[str, bytes], wanted: dict[str, bytes]) -> PushPlan:
    """The writes that turn the config keys ``current`` into ``wanted`` (both config keys only)."""
    plan = PushPlan()
    apps = apps_prefix(prefix)
    for key in sorted(wanted):
        old = current.get(key)
        if old is not None and _same_json(old, wanted[key]):
            continue
        plan.puts[key] = wanted[key]
        kind = "added" if old is None else "changed"
        if key == defaults_key(prefix):
            plan.defaults = kind
        else:
            (plan.added if old is None else plan.changed).append(key.removeprefix(apps))
    for key in sorted(set(current) - set(wanted)):
        plan.deletes.append(key)
        if key == defaults_key(prefix):
            plan.defaults = "removed"
        else:
            plan.removed.append(key.removeprefix(apps))
    return plan


def file_document(prefix: str, kvs: dict[str, bytes]) -> tuple[dict[str, Any], list[str]]:
    """The config file the keys spell (apps sorted by name), and a problem per unusable key.

    A value that is not a JSON object is left out (and named in the problems): the
    nodes reject it too, so the file shows what they can serve.
    """
    problems = []
    document: dict[str, Any] = {}
    apps = []
    for key in sorted(config_keys(prefix, kvs)):
        try:
            value = json.loads(kvs[key])
        except ValueError as exc:
            problems.append(f"{key}: not JSON ({exc}); left out")
            continue
        if not isinstance(value, dict):
            problems.append(f"{key}: not a JSON object; left out")
        elif key == defaults_key(prefix):
            document["Defaults"] = value
        else:
            apps.append({"Name": key.removeprefix(apps_prefix(prefix)), **value})
    document["Apps"] = apps
    return document, problems


def _same_json(old: bytes, new: bytes) -> bool:
    """Whether ``old`` spells the canonical ``new`` (compared canonically: 1 is not true)."""
    try:
        return canonical(json.loads(old)) == new
    except ValueError:
        return False
