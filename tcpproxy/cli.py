"""`tcpproxy`: listen on every port of every app and proxy to the app's targets."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import trio

from tcpproxy.cli_common import (
    FleetOptions,
    access_path,
    common_options,
    fit_connection_limit,
    ignore_sigusr2,
    low_port_capability,
    metrics_for,
    open_config,
    open_notifier,
    reload_check,
    run_cli,
    serving_code,
    setup_logging,
    start_listening,
    worker_options,
)
from tcpproxy.config import Config
from tcpproxy.fdstore import FdStore
from tcpproxy.pidfile import PidFile
from tcpproxy.port_listeners import PortListeners
from tcpproxy.port_plan import TcpPlan
from tcpproxy.privileges import (
    check_access,
    drop_privileges,
    inherited_capabilities,
    target_account,
)
from tcpproxy.service import run_service
from tcpproxy.upgrade import take_handover
from tcpproxy.workers.link import SupervisorLink
from tcpproxy.workers.supervisor import Supervisor

__all__ = ["command", "main"]

EPILOG = """\b
Examples:
  tcpproxy                               # ./config.json, every address
  tcpproxy -c /etc/tcpproxy.json --bind 127.0.0.1
  tcpproxy --workers 2                   # one process per core
  TCPPROXY_CONFIG=prod.json tcpproxy --log-level debug
  kill -HUP $(pidof -x tcpproxy)         # reload now (file changes reload too)
  tcpproxy --pid-file /run/tcpproxy.pid  # then: kill -USR2 $(cat /run/tcpproxy.pid)
                                         # upgrades to the version installed now
  tcpproxy -c etcd://10.0.0.1:2379,10.0.0.2:2379/fleet --etcd-cache cache.json
                                         # follow the apps in etcd under /fleet
"""


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@common_options("tcpproxy")
@click.option(
    "--bind", metavar="ADDRESS", default=None,
    help="Address to listen on.  [default: every address, IPv4 and IPv6]",
)  # fmt: skip
@click.option("--worker-listener", "worker_listeners", metavar="PORT:FD", multiple=True,
              hidden=True)  # fmt: skip
@click.pass_context
def command(
    ctx: click.Context,
    config_path: Path | str,
    bind: str | None,
    drain_timeout: float,
    max_connections: int | None,
    metrics_address: str | None,
    pid_file: Path | None,
    workers: int,
    worker: str | None,
    worker_listeners: tuple[str, ...],
    user: str | None,
    splice: bool,
    log_level: str,
    log_format: str,
    **fleet_params: Any,
) -> int:
    """Proxy TCP connections: one listener per port of every app in the config,
    each connection relayed to one of its app's targets. The config is reloaded
    on change without dropping connections; SIGTERM drains, then exits; SIGUSR2
    starts the command again and hands it the listeners (an upgrade)."""
    ignore_sigusr2()
    if worker is not None:  # started by a supervisor
        link = SupervisorLink.join(worker)
        setup_logging(log_level, prefix=link.log_prefix, log_format=log_format)
        config = link.initial_config()
        frontend = PortListeners(bind, reuse_port=True)
        frontend.open(config, _inherited(worker_listeners))  # binds the ports they lack
        limit = fit_connection_limit(max_connections)
        metrics, _ = metrics_for(None, worker=True)
        trio.run(
            lambda: run_service(
                config_path, b"", config, frontend, drain_timeout=drain_timeout,
                max_connections=limit, use_splice=splice, supervisor=link, metrics=metrics,
                bind=bind, listeners=frontend.sockets,
            )
        )  # fmt: skip
        return 0
    setup_logging(log_level, log_format=log_format)
    handover = take_handover()  # started by an upgrade
    notifier = open_notifier(handover)  # before the drop of privileges
    fdstore = FdStore.at_start(notifier, handover.stored if handover is not None else None)
    account = target_account(user, upgrade=handover is not None)
    fleet = FleetOptions(**fleet_params)
    serving = check_access(
        account, access_path(config_path, fleet), serving_code(), chosen=user is not None
    )
    account, reading = serving.account, serving.keep
    limit = fit_connection_limit(max_connections)
    source, data, config = open_config(
        config_path, fleet, bind=bind, max_connections=limit, handover=handover
    )
    keep = (*reading, *low_port_capability(config.ports, metrics_address))
    if handover is not None:
        keep = inherited_capabilities()
    if workers > 1:
        # Each worker binds its own listeners; the supervisor holds none to store, and
        # closes any the service manager kept (see the README's systemd section).
        fdstore.take({})
        plan = TcpPlan(bind, _options(ctx, math.ceil(limit / workers)), workers)
        if handover is not None:  # the old supervisor's port locks: its ports are ours
            plan.adopt(handover.fds)
        plan.check(Config(apps=()), config)
        plan.restore(config)  # a handed-over lock of a port no longer in the config
        pids = PidFile(pid_file)
        supervisor = Supervisor(
            plan, source, data, config, workers, metrics_address,
            validate=reload_check(config_path, bind=bind, max_connections=limit),
            drain_timeout=drain_timeout, handover=handover, pid_file=pids,
            notifier=notifier,
        )  # fmt: skip
        if handover is None:  # else rewritten once its workers serve, as its user
            pids.write_at_start(account.uid if account is not None else None)
        try:
            drop_privileges(account, keep, ambient=keep)  # the workers bind and import too
            trio.run(supervisor.run)
        finally:
            pids.remove()
        return 0
    metrics, address = metrics_for(metrics_address)
    frontend = PortListeners(bind)
    if handover is not None:
        inherited = handover.sockets
    else:  # after a crash: the listeners the service manager kept, with their queues
        inherited = frontend.from_store(fdstore, config.ports)
    data, config = start_listening(frontend, source, data, config, inherited)
    fdstore.keep(frontend.stored)
    pids = PidFile(pid_file)
    if handover is None:  # else rewritten once this process serves, as its user
        pids.write_at_start(account.uid if account is not None else None)
    try:
        # ambient: a process an upgrade starts (SIGUSR2) keeps them too
        drop_privileges(account, keep, ambient=keep)
        trio.run(
            lambda: run_service(
                source, data, config, frontend, drain_timeout=drain_timeout,
                max_connections=limit, use_splice=splice, metrics=metrics,
                metrics_address=address, bind=bind,
                listeners=frontend.sockets, handover=handover, pid_file=pids,
                notifier=notifier, fdstore=fdstore,
            )
        )  # fmt: skip
    finally:
        pids.remove()
    return 0


def _inherited(values: tuple[str, ...]) -> dict[int, socket.socket]:
    """A worker's listeners its supervisor handed it (an upgrade: the old worker's),
    from ``--worker-listener PORT:FD``, by port."""
    sockets = {}
    for value in values:
        port, fd = (int(part) for part in value.split(":"))
        os.set_inheritable(fd, False)
        sockets[port] = socket.socket(fileno=fd)
    return sockets


def _options(ctx: click.Context, per_worker_limit: int) -> list[str]:
    params = {**ctx.params, "max_connections": per_worker_limit}
    return worker_options(params, skip=set())


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("tcpproxy", command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
