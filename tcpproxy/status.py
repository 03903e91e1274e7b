"""The /status snapshot: one layout, for a single process and for a supervisor alike.

A single process counts its connections itself (`Proxy.counts`); a
supervisor sums its workers' multiprocess metrics (`counts_from_samples`).
Either way the counts go through `snapshot`, so the JSON has one shape, and
`as_text` renders it for /status.txt. Pure: callers take the counts (on the
event loop) and metrics.py serves the result.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tcpproxy.config import AppConfig, Config
from tcpproxy.diff import format_ports

__all__ = ["Counts", "Loaded", "as_text", "counts_from_samples", "snapshot"]

ACTIVE_METRIC = "tcpproxy_connections_active"  # gauge per app and target (metrics.py)
UP_METRIC = "tcpproxy_target_up"  # gauge per target: 1 up, 0 marked down (metrics.py)


@dataclass(frozen=True)
class Loaded:
    """The config in force, as the reloader knows it."""

    path: str
    digest: str
    loaded_at: float  # seconds since the epoch
    last_reload: str  # the last reload's outcome


@dataclass(frozen=True)
class Counts:
    """Open connections and targets marked down, however they were counted."""

    total: int = 0
    by_app: Mapping[str, int] = field(default_factory=dict)
    by_target: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (app, target)
    down: Mapping[str, str] = field(default_factory=dict)  # target -> why ("" if unknown)


def snapshot(
    binary: str, pid: int, loaded: Loaded, config: Config, counts: Counts,
    workers: int | None = None, rejected: Mapping[str, Mapping[str, object]] | None = None,
    build: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The /status document; `workers`: the supervisor's count (None in a single process);
    `rejected`: apps a fleet's source refused (by name: key, revision, reason); `build`:
    which build runs (`build_info.describe()`: "compiled (mypyc X.Y)", "interpreted")."""
    status: dict[str, Any] = {"binary": binary, "pid": pid}
    if build is not None:
        status["build"] = build
    if workers is not None:
        status["workers"] = workers
    status["config"] = {
        "path": loaded.path,
        "hash": loaded.digest,
        "loaded": _iso(loaded.loaded_at),
    }
    status["last_reload"] = loaded.last_reload
    if rejected:
        status["rejected"] = {name: dict(why) for name, why in sorted(rejected.items())}
    status["active_connections"] = counts.total
    status["apps"] = [
        {
            "name": app.name,
            "ports": format_ports(app.ports),
            **({"hostnames": list(app.hostnames)} if app.hostnames else {}),
            "active": counts.by_app.get(app.name, 0),
            "targets": [
                {
                    "address": str(t),
                    "state": "down" if str(t) in counts.down else "up",
                    "reason": counts.down.get(str(t), ""),
                    "active": counts.by_target.get((app.name, str(t)), 0),
                }
                for t in app.targets
            ],
        }
        for app in config.apps
    ]
    routes = by_name(config)
    if routes:
        status["routed_by_name"] = routes
    return status


def by_name(config: Config) -> list[dict[str, Any]]:
    """The ports told apart by name (TLS SNI, HTTP Host): each with its names' apps and
    its default app (None: unknown names are reset), ports of the same apps together."""
    groups: dict[tuple[str, ...], list[int]] = {}
    apps_of: dict[tuple[str, ...], list[AppConfig]] = {}
    for port, apps in sorted(config.port_apps().items()):
        if len(apps) == 1 and not apps[0].hostnames:
            continue  # one app's own port: not inspected
        key = tuple(app.name for app in apps)
        groups.setdefault(key, []).append(port)
        apps_of[key] = apps
    return [
        {
            "ports": format_ports(ports),
            "names": {name: app.name for app in apps_of[key] for name in app.hostnames},
            "default": next((app.name for app in apps_of[key] if not app.hostnames), None),
        }
        for key, ports in groups.items()
    ]


def counts_from_samples(samples: Iterable[Any]) -> Counts:
    """Counts from prometheus-client samples (`.name`, `.labels`, `.value`) summed
    over workers: connections add up; a target is down if any worker marked it."""
    by_target: dict[tuple[str, str], float] = {}
    up: dict[str, float] = {}
    for sample in samples:
        if sample.name == ACTIVE_METRIC:
            key = (sample.labels["app"], sample.labels["target"])
            by_target[key] = by_target.get(key, 0) + sample.value
        elif sample.name == UP_METRIC:
            target = sample.labels["target"]
            up[target] = min(up.get(target, 1.0), sample.value)
    by_app: dict[str, float] = {}
    for (app, _), value in by_target.items():
        by_app[app] = by_app.get(app, 0) + value
    return Counts(
        total=int(sum(by_target.values())),
        by_app={app: int(value) for app, value in by_app.items()},
        by_target={key: int(value) for key, value in by_target.items()},
        down={target: "" for target, value in up.items() if not value},
    )


def as_text(status: dict[str, Any]) -> str:
    """The snapshot for people: /status.txt."""
    lines = [
        f"{status['binary']}: {status.get('workers', 1)} process(es), "
        f"{status['active_connections']} active connections"
        + (f", {status['build']} build" if "build" in status else ""),
        f"config {status['config']['hash']} loaded {status['config']['loaded']}, "
        f"last reload: {status['last_reload']}",
    ]
    for app in status["apps"]:
        names = f", hostnames {' '.join(app['hostnames'])}" if "hostnames" in app else ""
        lines.append(f"app {app['name']}: ports {app['ports']}{names}, {app['active']} active")
        for target in app["targets"]:
            lines.append(f"  {target['address']}: {target['state']}, {target['active']} active")
    for route in status.get("routed_by_name", []):
        default = route["default"] or "none (reset)"
        lines.append(f"ports {route['ports']}: by name, {len(route['names'])} names, "
                     f"default {default}")  # fmt: skip
    for name, why in status.get("rejected", {}).items():
        where = f"{why['key']} at revision {why['revision']}"
        lines.append(f"rejected {name}: {where}: {why['reason']}")
    return "\n".join(lines) + "\n"


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(timestamp))
