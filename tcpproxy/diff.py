"""What a reload changes: a pure diff of two configs, and its one-line summary."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tcpproxy.config import Config

__all__ = ["ConfigDiff", "diff_configs", "format_ports"]

MAX_PORT_RANGES = 8  # port ranges spelled out in a log line before "... (N ports)"


def format_ports(ports: Iterable[int]) -> str:
    """Compact, bounded port list for logs: '5001-5003,6300' or '1-10,... (20000 ports)'."""
    ordered = sorted(ports)
    ranges: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        ranges.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    if len(ranges) > MAX_PORT_RANGES:
        return ",".join(ranges[:MAX_PORT_RANGES]) + f",... ({len(ordered)} ports)"
    return ",".join(ranges) or "none"


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    added_ports: frozenset[int]
    removed_ports: frozenset[int]
    added_apps: tuple[str, ...]
    removed_apps: tuple[str, ...]
    changed_apps: tuple[str, ...]  # same name, different ports, targets or options

    @property
    def empty(self) -> bool:
        return not (
            self.added_ports
            or self.removed_ports
            or self.added_apps
            or self.removed_apps
            or self.changed_apps
        )

    def summary(self) -> str:
        parts = []
        for label, names in (
            ("added", self.added_apps),
            ("removed", self.removed_apps),
            ("changed", self.changed_apps),
        ):
            if names:
                parts.append(f"apps {label}: {', '.join(names)}")
        if self.added_ports:
            parts.append(f"ports added: {format_ports(self.added_ports)}")
        if self.removed_ports:
            parts.append(f"ports removed: {format_ports(self.removed_ports)}")
        return "; ".join(parts) or "no changes"


def diff_configs(old: Config, new: Config) -> ConfigDiff:
    """Apps are compared by identity first: an app a reload leaves alone is usually the
    same object in both (etcd's assembly reuses it), and comparing it field by field
    would make a one-app change cost the whole config."""
    old_apps = {app.name: app for app in old.apps}
    new_apps = {app.name: app for app in new.apps}
    old_ports, new_ports = old.ports, new.ports
    return ConfigDiff(
        added_ports=new_ports - old_ports,
        removed_ports=old_ports - new_ports,
        added_apps=tuple(name for name in new_apps if name not in old_apps),
        removed_apps=tuple(name for name in old_apps if name not in new_apps),
        changed_apps=tuple(
            name
            for name, app in new_apps.items()
            if name in old_apps and old_apps[name] is not app and old_apps[name] != app
        ),
    )
