"""Judge the fleet from its node records, pure: who serves the current config, who lags.

Each node publishes ``PREFIX/nodes/<id>`` (JSON: ``revision`` applied, ``applied_at``,
``rejected`` apps, ...). Rules:

1. The current config revision C is the highest of the config keys' mod_revisions and
   the nodes' revisions: a delete leaves no key behind, but a node that applied it
   reports a revision at least that high.
2. A node is current when the config keys at its revision are the same keys, at
   the same mod_revisions, as now (the caller reads that from etcd: this catches a
   delete nobody applied yet, and ignores revisions that only touched node
   records). When that cannot be read (compacted), when its revision is >= C.
3. etcd keeps no wall-clock time, so "how long behind" is an estimate: now minus
   the earliest ``applied_at`` among the current nodes, i.e. since the first node
   applied the current config (which is soon after it was written). When no node
   is current yet it is unknown.
4. The fleet is unhealthy when a node rejects an app, has an unreadable record, or
   is behind by more than the allowed lag, or by an unknown time.
5. A record is unreadable (a "bad record" row, never an error of the whole command)
   unless it is a JSON object whose ``revision`` is an integer (not a bool) between 0
   and etcd's current revision: a revision from the future would otherwise raise C
   and show its node as the only current one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["FleetStatus", "NodeRow", "judge"]


@dataclass(frozen=True)
class NodeRow:
    """One node's line in the status table."""

    node: str
    revision: int | None  # None: the record is unreadable (see problem)
    current: bool
    behind: float | None  # seconds, estimated (rule 3); None when current or unknown
    rejected: tuple[str, ...]  # "name (reason)"
    problem: str | None = None
    ok: bool = True


@dataclass(frozen=True)
class FleetStatus:
    config_revision: int
    rows: tuple[NodeRow, ...]

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    def table(self) -> list[str]:
        """The status as aligned text lines, a header first."""
        header = ("NODE", "REVISION", "STATE", "BEHIND", "REJECTED")
        lines = [header]
        for row in self.rows:
            if row.problem:
                lines.append((row.node, "-", "bad record", "-", row.problem))
                continue
            state = "current" if row.current else "behind"
            if row.current:
                behind = "-"
            else:
                behind = "unknown" if row.behind is None else f"{row.behind:.1f}s"
            rejected = "; ".join(row.rejected) or "-"
            lines.append((row.node, str(row.revision), state, behind, rejected))
        widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
        return [
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False))
            + "  "
            + line[-1]
            for line in lines
        ]


def parse_record(value: bytes, latest: int) -> dict:
    """A node record's JSON object (rule 5); `ValueError` saying why when it is not one.

    ``latest`` is etcd's current revision, the highest a node can have applied.
    """
    try:
        record = json.loads(value)
    except RecursionError:  # nested too deep for the parser
        raise ValueError("not a node record (JSON nested too deep)") from None
    if not isinstance(record, dict) or type(record.get("revision")) is not int:
        raise ValueError("not a node record (no integer 'revision')")
    revision = record["revision"]
    if not 0 <= revision <= latest:
        raise ValueError(f"revision {revision} is outside 0..{latest} (etcd's current revision)")
    return record


def judge(
    latest: int,
    config_revisions: list[int],
    records: Mapping[str, bytes],
    same_as_current: Mapping[int, bool],
    now: float,
    max_lag: float,
) -> FleetStatus:
    """The fleet's status (see the module's rules).

    Args:
      latest: etcd's current revision, as the range read the records at.
      config_revisions: mod_revision of every config key (defaults and apps).
      records: node id -> its record's bytes.
      same_as_current: node revision -> whether the config keys at it equal today's
        (rule 2); a revision missing here (compacted, say) is judged against C.
      now: the current unix time; max_lag: seconds a node may be behind.
    """
    parsed: dict[str, dict] = {}
    problems: dict[str, str] = {}
    for node, value in records.items():
        try:
            parsed[node] = parse_record(value, latest)
        except ValueError as exc:
            problems[node] = str(exc)
    config_revision = max([*config_revisions, *(r["revision"] for r in parsed.values())], default=0)

    def is_current(record: dict) -> bool:
        revision = record["revision"]
        return same_as_current.get(revision, revision >= config_revision)

    reached = [
        float(r["applied_at"])
        for r in parsed.values()
        if is_current(r) and isinstance(r.get("applied_at"), int | float)
    ]
    since = now - min(reached) if reached else None
    rows = []
    for node in sorted(records):
        if node in problems:
            rows.append(NodeRow(node, None, False, None, (), problems[node], ok=False))
            continue
        record = parsed[node]
        current = is_current(record)
        behind = None if current else since
        rejected = tuple(
            f"{name} ({_reason(why)})" for name, why in sorted(_rejected(record).items())
        )
        late = not current and (behind is None or behind > max_lag)
        ok = not late and not rejected
        rows.append(NodeRow(node, record["revision"], current, behind, rejected, ok=ok))
    return FleetStatus(config_revision, tuple(rows))


def _rejected(record: dict) -> dict:
    rejected = record.get("rejected") or {}
    return rejected if isinstance(rejected, dict) else {"?": rejected}


def _reason(why: object) -> str:
    if isinstance(why, dict):
        return str(why.get("reason", why))
    return str(why)
