"""``tcpproxyctl``: push a config file to etcd, read it back, check it, and see the fleet's state.

Exit codes: 0 done; 1 ``status`` found a node behind or rejecting an app; 2 our error
(a bad file, a bad option, etcd unreachable or refusing), printed on one line
without a traceback.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import trio

from tcpproxy.cli_common import fail, run_cli, version_option
from tcpproxy.config import Config, parse_config
from tcpproxy.fleet.client import EtcdClient, EtcdCompacted, EtcdConflict, EtcdError
from tcpproxy.fleet.keys import (
    PushPlan,
    apps_prefix,
    check_key_names,
    config_keys,
    defaults_key,
    file_document,
    nodes_prefix,
    plan_push,
    wanted_keys,
)
from tcpproxy.fleet.nodes import FleetStatus, judge, parse_record
from tcpproxy.fleet.url import DEFAULT_PASSWORD_ENV, EtcdTarget, parse_etcd_url
from tcpproxy.selfloop import reject_self_loops
from tcpproxy.sources.file import read_config_bytes

__all__ = ["main", "validate_file"]

PROG = "tcpproxyctl"
DEFAULT_MAX_LAG = 5.0  # seconds a node may take to apply a change before status fails
EXIT_UNHEALTHY = 1
PUSH_ATTEMPTS = 3  # reads and diffs again when another writer got in between
GUARD_KEYS_MAX = 120  # per-key guards in a push's transaction, under etcd's default 128


@dataclass(frozen=True)
class _Options:
    url: str | None
    cacert: str | None
    cert: str | None
    key: str | None
    user: str | None
    password_env: str | None

    def target(self) -> EtcdTarget:
        if self.url is None:
            raise click.UsageError("this command needs --etcd URL (or TCPPROXYCTL_ETCD)")
        try:
            return parse_etcd_url(
                self.url, cacert=self.cacert, cert=self.cert, key=self.key,
                user=self.user, password_env=self.password_env,
            )  # fmt: skip
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--etcd") from None


def validate_file(path: Path) -> tuple[Config, dict[str, Any]]:
    """Validate a config file as the proxies do; return it parsed and as a JSON document.

    Besides the file checks, app names must fit in a key (no '/'), and targets
    that loop back into any proxy (a loopback or wildcard address on a port of the
    config) are refused here: every node would refuse them. Targets on a node's
    other own addresses are left to the nodes, whose addresses differ. Used by
    both ``check`` and ``push``, so a file ``check`` passes is one ``push`` writes.
    Raises `ConfigError`.
    """
    data = read_config_bytes(path)
    config = parse_config(data, str(path))
    document = json.loads(data.decode("utf-8-sig"))
    check_key_names(document, str(path))
    reject_self_loops(config, source=str(path), local=())
    return config, document


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--etcd", "url", metavar="URL", envvar="TCPPROXYCTL_ETCD", show_envvar=True,
    help="etcd://HOST:PORT[,HOST:PORT...]/PREFIX, or etcds:// for TLS.",
)  # fmt: skip
@click.option("--etcd-cacert", "cacert", metavar="FILE", help="CA bundle for etcds://.")
@click.option("--etcd-cert", "cert", metavar="FILE", help="Client certificate for etcds://.")
@click.option("--etcd-key", "key", metavar="FILE", help="Client certificate's key.")
@click.option(
    "--etcd-user", "user", metavar="NAME",
    help=f"etcd user; the password is read from ${DEFAULT_PASSWORD_ENV} (never argv).",
)  # fmt: skip
@click.option(
    "--etcd-password-env", "password_env", metavar="VAR",
    help=f"Read the password from this variable instead.  [default: {DEFAULT_PASSWORD_ENV}]",
)  # fmt: skip
@version_option(PROG)
@click.pass_context
def cli(ctx: click.Context, **options: Any) -> None:
    """Manage the configuration a fleet of tcpproxy/bpfproxy nodes follows in etcd."""
    ctx.obj = _Options(**options)


@cli.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
def check(file: Path) -> None:
    """Validate FILE as the proxies would, without etcd.

    A bad file exits 2 naming its first problems, and how many more.
    """
    config, _document = validate_file(file)
    ports = sum(len(app.ports) for app in config.apps)
    click.echo(f"{file}: ok ({len(config.apps)} apps, {ports} ports)")


@cli.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Print what would change; write nothing.")
@click.pass_obj
def push(options: _Options, file: Path, dry_run: bool) -> None:
    """Write FILE to etcd in one transaction: changed apps put, missing apps deleted.

    The whole file is validated first; nothing is written when any of it is wrong.
    """
    target = options.target()
    _config, document = validate_file(file)
    wanted = wanted_keys(target.prefix, document, str(file))

    async def run() -> None:
        async with EtcdClient(target) as client:
            for _attempt in range(PUSH_ATTEMPTS):
                plan, written = await _push_once(client, target.prefix, wanted, dry_run)
                if written is not None or plan.empty or dry_run:
                    break
            else:
                raise EtcdError(
                    f"the config under {target.prefix} changed during the push, "
                    f"{PUSH_ATTEMPTS} times: nothing written; push again"
                )
        for line in plan.describe():
            click.echo(line)
        if dry_run and not plan.empty:
            click.echo("dry run: nothing written")
        elif written is not None:
            click.echo(f"written at revision {written}")

    trio.run(run)


async def _push_once(
    client: EtcdClient, prefix: str, wanted: dict[str, bytes], dry_run: bool
) -> tuple[PushPlan, int | None]:
    """Read, diff and write once, guarded: the plan, and the revision written (None: not
    written because there is nothing to write, a dry run, or a conflict).

    The guard makes a push all-or-nothing against concurrent writers too: no app key
    put after the read (one range compare) and every config key read unchanged (one
    compare each, which also catches deletes; left out beyond GUARD_KEYS_MAX, which
    etcd's default --max-txn-ops would refuse).
    """
    revision, kvs = await client.range_prefix(prefix + "/")
    keys = config_keys(prefix, {kv.key: kv.value for kv in kvs})
    plan = plan_push(prefix, keys, wanted)
    if plan.empty or dry_run:
        return plan, None
    seen = {kv.key: kv.mod_revision for kv in kvs if kv.key in keys}
    expect = seen if len(seen) <= GUARD_KEYS_MAX else {}
    expect.setdefault(defaults_key(prefix), seen.get(defaults_key(prefix), 0))
    try:
        written = await client.txn(
            plan.puts, plan.deletes, expect=expect, quiet_since=(apps_prefix(prefix), revision)
        )
    except EtcdConflict:
        return plan, None
    except EtcdError as exc:
        if "too many operations" not in str(exc):
            raise
        count = len(plan.puts) + len(plan.deletes)
        raise EtcdError(
            f"{exc} ({count} keys change in one transaction: raise etcd's --max-txn-ops, "
            "128 by default)"
        ) from None
    return plan, written


@cli.command()
@click.pass_obj
def get(options: _Options) -> None:
    """Print the configuration in etcd in the config file's format, apps sorted by name."""
    target = options.target()

    async def run() -> dict[str, bytes]:
        async with EtcdClient(target) as client:
            _revision, kvs = await client.range_prefix(target.prefix + "/")
            return {kv.key: kv.value for kv in kvs}

    document, problems = file_document(target.prefix, trio.run(run))
    for problem in problems:
        click.echo(f"{PROG}: warning: {problem}", err=True)
    click.echo(json.dumps(document, indent=2, ensure_ascii=False))


@cli.command()
@click.option(
    "--max-lag", type=click.FloatRange(min=0), default=DEFAULT_MAX_LAG, show_default=True,
    metavar="SECONDS", help="Fail when a node is behind the current config longer than this.",
)  # fmt: skip
@click.pass_obj
def status(options: _Options, max_lag: float) -> int:
    """A table of the nodes following the config: applied revision, lag, rejected apps.

    Exits 1 when a node rejects an app or is behind by more than --max-lag. etcd
    keeps no clock, so the lag is an estimate: the time since the first node applied
    the current config (docs: tcpproxy/fleet/nodes.py).
    """
    target = options.target()
    result = trio.run(_status, target, max_lag)
    click.echo(f"config revision {result.config_revision}")
    if not result.rows:
        click.echo(f"no node records under {nodes_prefix(target.prefix)}")
    else:
        for line in result.table():
            click.echo(line.rstrip())
    return 0 if result.ok else EXIT_UNHEALTHY


async def _status(target: EtcdTarget, max_lag: float) -> FleetStatus:
    prefix = target.prefix
    async with EtcdClient(target) as client:
        latest, kvs = await client.range_prefix(prefix + "/")
        by_key = {kv.key: kv for kv in kvs}
        config = {key: by_key[key].mod_revision for key in config_keys(prefix, _values(kvs))}
        records = {
            kv.key.removeprefix(nodes_prefix(prefix)): kv.value
            for kv in kvs
            if kv.key.startswith(nodes_prefix(prefix))
        }
        revisions = set()
        for value in records.values():
            try:
                revisions.add(parse_record(value, latest)["revision"])
            except ValueError:
                pass
        same: dict[int, bool] = {}
        for revision in sorted(r for r in revisions if 0 < r < latest):
            try:
                _r, then = await client.range_prefix(prefix + "/", revision)
            except EtcdCompacted:  # judged by its revision alone (rule 2)
                continue
            keys_then = config_keys(prefix, _values(then))
            same[revision] = {kv.key: kv.mod_revision for kv in then if kv.key in keys_then} == (
                config
            )
    return judge(latest, list(config.values()), records, same, time.time(), max_lag)


def _values(kvs: list[Any]) -> dict[str, bytes]:
    return {kv.key: kv.value for kv in kvs}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run_cli(PROG, cli, argv)
    except EtcdError as exc:
        return fail(PROG, str(exc))


if __name__ == "__main__":
    raise SystemExit(main())
