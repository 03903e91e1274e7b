"""The keys under a fleet's etcd prefix assembled into one Config, rejecting apps one by one (pure).

Rules (each assembly judges every key again, from all the keys and the
assembly before it, so a fixed value clears its rejection by itself):

1. Keys: ROOT/defaults (the ``Defaults`` object, optional), ROOT/apps/<Name>
   (one app's object, named by the key). ROOT/nodes/... belong to the nodes
   and are skipped; any other key is listed in `Assembly.ignored`.
2. Each value is validated on its own by the file's validator
   (`config.parse_app`, `config.parse_defaults`): the same checks, the same
   messages, located inside the value.
3. A bad app value: an app not served before is not served; an app served
   before keeps the version it served (its last good one). Either way the
   app has a `Rejection` naming the key, the value's revision and the reason.
4. A port two apps want stays with the app that served it before; if neither
   did, with the value written first (lower mod_revision, then name). The
   other app's value is rejected as in rule 3. Apps with Hostnames want a
   port's names, not the whole port: a (port, name) claim, ("port", "") for
   an app without (the port's default); two apps collide only on the same
   claim. Apps sharing a port must also agree on config.PORT_SETTINGS: one
   that differs from the port's owner (the app that served it before, else
   the first written) is rejected as in rule 3.
5. A bad defaults value: the defaults in force before stay (the built-in
   ones if none were); the rejection is listed under DEFAULTS.
6. An app value `held` (valid alone, but applying it failed: a port that
   cannot be bound) is rejected as in rule 3 until the value changes, or the
   source offers it again (SIGHUP, or its periodic retry).
7. An app a check of the apps together rejects (`cross`: a target that is a
   port of another app served here, which would loop into this proxy) is
   rejected as in rule 3; its last good version is judged the same way. The
   app is the one with the target: the port's owner stays.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

from tcpproxy.config import (
    PORT_SETTINGS,
    AppConfig,
    Config,
    ConfigError,
    Defaults,
    parse_app,
    parse_config,
    parse_defaults,
)

__all__ = [
    "DEFAULTS",
    "Assembly",
    "CrossCheck",
    "Rejection",
    "Served",
    "assemble",
    "assembly_from_document",
    "key_root",
]

DEFAULTS = "(defaults)"  # the rejections' entry for the defaults key (an app name has no "/"
# but may have parentheses: the key in the Rejection says which it is)

Values = Mapping[str, tuple[bytes, int]]  # full key -> (value, mod_revision)
Check = Callable[[Config], None]  # a further check of one app, raising ConfigError
# a check of one app (a one-app Config) against the ports the other apps serve here
# (port -> what it is), raising ConfigError
CrossCheck = Callable[[Config, Mapping[int, str]], None]
Held = Mapping[str, tuple[bytes, str]]  # app name -> (its value, why applying it failed)
Claim = tuple[int, str]  # (port, hostname): "" for the port's default (rule 4)


def _claims(app: AppConfig) -> list[Claim]:
    """What an app wants of its ports (rule 4)."""
    names = app.hostnames or ("",)
    return [(port, name) for port in app.ports for name in names]


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a key's value is not served."""

    key: str  # the full etcd key
    revision: int  # the value's mod_revision
    reason: str  # the validator's problems, as for a file

    def as_dict(self) -> dict[str, object]:
        return {"key": self.key, "revision": self.revision, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class Served:
    """An app's version in force: its value as written, and what it parsed to."""

    value: bytes
    revision: int
    app: AppConfig


@dataclass(frozen=True)
class Assembly:
    """One assembled state of the prefix: what is served, and what is rejected."""

    revision: int  # the etcd revision the keys were read at
    config: Config
    apps: Mapping[str, Served]
    defaults: tuple[bytes, int] | None  # the defaults value in force and its revision
    rejected: Mapping[str, Rejection]  # by app name (DEFAULTS for the defaults)
    ignored: tuple[str, ...]  # keys that are neither defaults, apps nor nodes
    # (app name, value, defaults value) -> the parse's outcome, reused by the next
    # assembly: a change re-parses one value, not all of them (unless defaults change)
    _parsed: dict[tuple[str, bytes, bytes | None], AppConfig | str] = field(
        default_factory=dict, repr=False, compare=False
    )

    # (app name, value) -> the app as `document` renders it, reused by the next assembly
    _rendered: dict[tuple[str, bytes], str] = field(default_factory=dict, repr=False, compare=False)
    # (port, hostname) -> the app serving it in `config`: the next assembly's judge of rule 4
    _owners: dict[Claim, str] = field(default_factory=dict, repr=False, compare=False)

    def document(self) -> bytes:
        """The config served, in the file format (`config.parse_config` reads it back
        to `config`): for the cache file and for the reloader's comparisons.

        What `json.dumps(doc, indent=1)` writes, put together from each app's
        rendering (kept across assemblies): a change renders one app, not all."""
        return self._document

    @cached_property
    def _document(self) -> bytes:
        parts = []
        if self.defaults is not None:
            defaults = json.dumps(_load(self.defaults[0]), indent=1).replace("\n", "\n ")
            parts.append(f' "Defaults": {defaults}')
        rendered = [self._render(app.name) for app in self.config.apps]
        apps = "[\n" + ",\n".join(rendered) + "\n ]" if rendered else "[]"
        parts.append(f' "Apps": {apps}')
        return ("{\n" + ",\n".join(parts) + "\n}\n").encode()

    def _render(self, name: str) -> str:
        """One app as an element of "Apps" (JSON strings hold no raw newline, so
        indenting the lines indents the object)."""
        value = self.apps[name].value
        text = self._rendered.get((name, value))
        if text is None:
            text = "  " + json.dumps({"Name": name, **_load(value)}, indent=1).replace("\n", "\n  ")
            self._rendered[(name, value)] = text
        return text


def key_root(prefix: str) -> str:
    """The prefix as keys start with it: "/fleet" and "/fleet/" both give "/fleet/"."""
    return prefix.rstrip("/") + "/"


def assemble(
    values: Values,
    prefix: str,
    revision: int,
    previous: Assembly | None = None,
    check: Check | None = None,
    held: Held | None = None,
    cross: CrossCheck | None = None,
) -> Assembly:
    """Assemble every key of `values` under `prefix` (read at `revision`) into the
    config to serve, judged against `previous` (the assembly in force; None at start).

    `check`: a further check of each app alone (as a one-app Config), such as
    the self-loop check every load runs; its ConfigError rejects that app.
    `held`: app values set aside by rule 6.
    `cross`: rule 7's check, of each app against the others' ports.
    """
    root = key_root(prefix)
    parsed = previous._parsed if previous is not None else {}
    cache: dict[tuple[str, bytes, bytes | None], AppConfig | str] = {}
    rejected: dict[str, Rejection] = {}
    ignored: list[str] = []
    wanted: dict[str, tuple[str, bytes, int]] = {}  # app name -> (key, value, revision)
    defaults_key = root + "defaults"
    for key in sorted(values):
        if not key.startswith(root):
            ignored.append(key)
            continue
        rest = key[len(root) :]
        if rest == "defaults" or rest.startswith("nodes/"):
            continue
        name = rest.removeprefix("apps/")
        if name == rest or "/" in name:
            ignored.append(key)
            continue
        wanted[name] = (key, *values[key])

    # Rule 5: the defaults.
    in_force = previous.defaults if previous is not None else None
    defaults, defaults_in_force = _defaults(in_force)
    if defaults_key in values:
        value, mod = values[defaults_key]
        try:
            defaults, defaults_in_force = parse_defaults(value, defaults_key), (value, mod)
        except ConfigError as exc:
            rejected[DEFAULTS] = Rejection(defaults_key, mod, _reason(exc))
    else:
        defaults, defaults_in_force = Defaults(), None
    defaults_value = defaults_in_force[0] if defaults_in_force is not None else None

    # Rules 2 and 3: each app alone; `chosen` is the version each app would serve.
    before = dict(previous.apps) if previous is not None else {}
    chosen: dict[str, Served] = {}
    for name, (key, value, mod) in wanted.items():
        memo = (name, value, defaults_value)
        outcome = parsed.get(memo)
        if outcome is None:
            outcome = _parse(value, name, defaults, key, check)
        cache[memo] = outcome
        if held and name in held and held[name][0] == value:
            outcome = held[name][1]
        if isinstance(outcome, AppConfig):
            chosen[name] = Served(value, mod, outcome)
            continue
        rejected[name] = Rejection(key, mod, outcome)
        kept = _last_good(before.get(name), name, defaults, defaults_value, parsed, cache, check)
        if kept is not None:
            chosen[name] = kept

    # Rule 4: ports two apps want, the lowest first; a loser falls back to its last
    # good version (whose ports were its own before) or is dropped. Apps serving what
    # they served before cannot collide with each other (the previous assembly settled
    # that), so only the ports of the others are looked at: a change costs its own
    # apps' ports, not the config's.
    owners = previous._owners if previous is not None else {}
    _settle_ports(chosen, wanted, before, owners, rejected, defaults, defaults_value,
                  parsed, cache, check)  # fmt: skip
    _settle_settings(chosen, wanted, before, owners, rejected)

    if cross is not None:
        _cross_check(chosen, wanted, before, rejected, cross, defaults, defaults_value,
                     parsed, cache, check)  # fmt: skip

    config = Config(apps=tuple(chosen[name].app for name in sorted(chosen)))
    ports = dict(owners)  # the new claims' owners: the old ones, less what moved
    for name, last in before.items():
        if not _same(last, chosen.get(name)):
            for port in _claims(last.app):
                if ports.get(port) == name:
                    del ports[port]
    for name, served in chosen.items():
        if not _same(before.get(name), served):
            ports.update(dict.fromkeys(_claims(served.app), name))
    known = previous._rendered if previous is not None else {}
    rendered = {
        (name, served.value): known[(name, served.value)]
        for name, served in chosen.items()
        if (name, served.value) in known
    }
    return Assembly(
        revision, config, {name: chosen[name] for name in sorted(chosen)}, defaults_in_force,
        rejected, tuple(ignored), cache, rendered, ports,
    )  # fmt: skip


def _settle_ports(
    chosen: dict[str, Served],
    wanted: Mapping[str, tuple[str, bytes, int]],
    before: Mapping[str, Served],
    owners: Mapping[Claim, str],
    rejected: dict[str, Rejection],
    defaults: Defaults,
    defaults_value: bytes | None,
    parsed: dict[tuple[str, bytes, bytes | None], AppConfig | str],
    cache: dict[tuple[str, bytes, bytes | None], AppConfig | str],
    check: Check | None,
) -> None:
    """Rule 4, in place: each claim (port, hostname) two apps want goes to the app that
    served it before, else to the value written first; the lowest is settled first.

    A port's claimants are kept up to date as losers fall and fallbacks come back,
    and a port is looked at again only when one of those claims it: N conflicts
    cost N, where settling one per round over every claim cost N^2."""
    claims: dict[Claim, set[str]] = {}  # claim -> the changed apps that want it

    def claim(name: str, served: Served) -> list[Claim]:
        """`served` now serves `name`: the claims where a conflict may have begun."""
        mine = _claims(served.app)
        if not _same(before.get(name), served):
            for port in mine:
                claims.setdefault(port, set()).add(name)
            return mine
        # back to what it served: an unchanged owner contends for its claims again
        return [port for port in mine if owners.get(port) == name]

    def claimants(port: Claim) -> list[str]:
        names = set(claims.get(port, ()))
        owner = owners.get(port)  # an unchanged app's port is still that app's
        if names and owner is not None and _same(before[owner], chosen.get(owner)):
            names.add(owner)
        return sorted(names)

    for name, served in chosen.items():
        claim(name, served)
    ports = [port for port in claims if len(claimants(port)) > 1]  # a heap, lowest first
    heapq.heapify(ports)
    while ports:
        port = heapq.heappop(ports)
        names = claimants(port)
        if len(names) < 2:  # settled meanwhile (a loser elsewhere wanted it too)
            continue
        owner = owners.get(port)
        winner = owner if owner is not None and owner in names else None
        if winner is None:
            winner = min(names, key=lambda name: (chosen[name].revision, name))
        for loser in names:
            if loser == winner:
                continue
            key, _, mod = wanted[loser]
            served = chosen.pop(loser)
            for lost in _claims(served.app):  # a loser is a changed app: it claimed them
                claims[lost].discard(loser)
            number, hostname = port
            where = f"Ports[{served.app.ports.index(number)}]"
            if hostname:
                what = f"hostname {hostname!r} on port {number}"
                where = f"Hostnames[{served.app.hostnames.index(hostname)}]"
            else:
                what = f"port {number}"
            rejected.setdefault(
                loser,
                Rejection(
                    key, mod, f"{where}: {what} is used by app {winner!r} ({wanted[winner][0]})"
                ),
            )
            last = before.get(loser)
            if last is not None and served is not last and last.value != served.value:
                kept = _last_good(last, loser, defaults, defaults_value, parsed, cache, check)
                if kept is not None:
                    chosen[loser] = kept
                    for again in claim(loser, kept):
                        heapq.heappush(ports, again)


def _settle_settings(
    chosen: dict[str, Served],
    wanted: Mapping[str, tuple[str, bytes, int]],
    before: Mapping[str, Served],
    owners: Mapping[Claim, str],
    rejected: dict[str, Rejection],
) -> None:
    """Rule 4's agreement, in place: on a port several apps share, an app whose
    PORT_SETTINGS differ from the port's owner's (the app that served the port
    before, unchanged; else the first written) is rejected, and not served."""
    sharing: dict[int, list[str]] = {}
    for name in sorted(chosen):
        for port in chosen[name].app.ports:
            sharing.setdefault(port, []).append(name)
    for port in sorted(sharing):
        names = [name for name in sharing[port] if name in chosen]
        if len(names) < 2:
            continue
        unchanged = [
            name for name in names
            if _same(before.get(name), chosen[name])
            and any(owners.get((port, hostname)) == name
                    for hostname in chosen[name].app.hostnames or ("",))
        ]  # fmt: skip
        owner = min(unchanged or names, key=lambda name: (chosen[name].revision, name))
        reference = chosen[owner].app
        for name in names:
            app = chosen[name].app
            differ = [key for field, key in PORT_SETTINGS.items()
                      if getattr(app, field) != getattr(reference, field)]  # fmt: skip
            if name == owner or not differ:
                continue
            key, _, mod = wanted[name]
            rejected.setdefault(
                name,
                Rejection(
                    key, mod,
                    f"{differ[0]}: differs from that of app {owner!r} ({wanted[owner][0]}), "
                    f"which shares port {port}: apps sharing a port must agree on "
                    f"{', '.join(PORT_SETTINGS.values())}",
                ),
            )  # fmt: skip
            del chosen[name]


def _cross_check(
    chosen: dict[str, Served],
    wanted: Mapping[str, tuple[str, bytes, int]],
    before: Mapping[str, Served],
    rejected: dict[str, Rejection],
    cross: CrossCheck,
    defaults: Defaults,
    defaults_value: bytes | None,
    parsed: dict[tuple[str, bytes, bytes | None], AppConfig | str],
    cache: dict[tuple[str, bytes, bytes | None], AppConfig | str],
    check: Check | None,
) -> None:
    """Rule 7, in place. Only an app with a target on another app's port is checked
    (the check may read the host's addresses).

    The apps are judged in name order, one rejection at a time, since a rejection
    frees ports another app may have targeted: the outcome of judging every app
    again after each rejection. An app that passed still passes when ports are
    freed, so it is judged again only when a fallback takes a port it targets:
    N rejections cost N checks, where a round over every app per rejection cost N^2.
    """
    owner = {port: name for name in sorted(chosen) for port in chosen[name].app.ports}
    targeting: dict[int, set[str]] = {}  # port -> the apps with a target on it
    for name, served in chosen.items():
        for target in served.app.targets:
            targeting.setdefault(target.port, set()).add(name)
    fallen: set[str] = set()  # fell back to their last good version already
    pending = sorted(chosen)  # a heap: the apps to judge, first name first
    while pending:
        name = heapq.heappop(pending)
        served = chosen.get(name)
        if served is None:
            continue
        others = {
            target.port: f"a port of app {owner[target.port]!r} ({wanted[owner[target.port]][0]})"
            for target in served.app.targets
            if owner.get(target.port, name) != name
        }
        if not others:
            continue
        try:
            cross(Config(apps=(served.app,)), others)
        except ConfigError as exc:
            problem = _reason(exc)
        else:
            continue
        key, _, mod = wanted[name]
        rejected.setdefault(name, Rejection(key, mod, problem))
        del chosen[name]
        for port in served.app.ports:
            if owner.get(port) == name:
                del owner[port]
        last = before.get(name)
        if name not in fallen and last is not None and last.value != served.value:
            fallen.add(name)
            kept = _last_good(last, name, defaults, defaults_value, parsed, cache, check)
            if kept is not None and not any(port in owner for port in kept.app.ports):
                chosen[name] = kept
                owner.update(dict.fromkeys(kept.app.ports, name))
                for target in kept.app.targets:
                    targeting.setdefault(target.port, set()).add(name)
                heapq.heappush(pending, name)
                for port in kept.app.ports:
                    for other in targeting.get(port, ()):
                        heapq.heappush(pending, other)


def assembly_from_document(
    data: bytes, prefix: str, source: str, check: Check | None = None
) -> Assembly:
    """An assembly of revision 0 from a config in the file format (the --etcd-cache
    file): the keys it would be in etcd, each written "before" anything else.

    Raises ConfigError when `data` is not a valid config (named `source`).
    """
    config = parse_config(data, source)  # the whole file's checks, and its error messages
    doc = json.loads(data.decode("utf-8-sig"))
    root = key_root(prefix)
    values: dict[str, tuple[bytes, int]] = {}
    if "Defaults" in doc:
        values[root + "defaults"] = (json.dumps(doc["Defaults"]).encode(), 0)
    for app in doc["Apps"]:
        obj = {key: value for key, value in app.items() if key != "Name"}
        values[f"{root}apps/{app['Name']}"] = (json.dumps(obj).encode(), 0)
    assembly = assemble(values, prefix, 0, None, check)
    if assembly.config != config or assembly.rejected:  # the same validator: cannot differ
        raise ConfigError(source, ["(top level): does not read back as the config it holds"])
    return assembly


def _same(last: Served | None, now: Served | None) -> bool:
    """An app serves the very version it served before (its AppConfig is reused)."""
    return last is not None and now is not None and last.app is now.app


def _defaults(in_force: tuple[bytes, int] | None) -> tuple[Defaults, tuple[bytes, int] | None]:
    """The defaults in force before (they parsed then, so they parse now)."""
    if in_force is None:
        return Defaults(), None
    return parse_defaults(in_force[0]), in_force


def _parse(
    value: bytes, name: str, defaults: Defaults, key: str, check: Check | None
) -> AppConfig | str:
    """One app's value: its AppConfig, or the reason it is rejected."""
    try:
        app = parse_app(value, name, defaults, key)
        if check is not None:
            check(Config(apps=(app,)))
    except ConfigError as exc:
        return _reason(exc)
    return app


def _last_good(
    last: Served | None,
    name: str,
    defaults: Defaults,
    defaults_value: bytes | None,
    parsed: dict[tuple[str, bytes, bytes | None], AppConfig | str],
    cache: dict[tuple[str, bytes, bytes | None], AppConfig | str],
    check: Check | None,
) -> Served | None:
    """The version an app served before, with today's defaults (rule 3)."""
    if last is None:
        return None
    memo = (name, last.value, defaults_value)
    outcome = parsed.get(memo) or cache.get(memo)
    if outcome is None:
        outcome = _parse(last.value, name, defaults, "", check)
    cache[memo] = outcome
    return Served(last.value, last.revision, outcome) if isinstance(outcome, AppConfig) else None


def _load(value: bytes) -> dict[str, object]:
    """A value that passed validation, as an object (without a "Name": the key names it)."""
    obj = json.loads(value.decode("utf-8-sig"))
    obj.pop("Name", None)
    return obj  # type: ignore[no-any-return]


def _reason(exc: ConfigError) -> str:
    """The problems of a ConfigError, without its source (the Rejection names the key)."""
    more = [f"... and {exc.more} more"] if exc.more else []
    return "; ".join([*exc.problems, *more])
