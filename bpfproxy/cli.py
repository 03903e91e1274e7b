"""`bpfproxy`: every configured port on one listening socket, steered by sk_lookup."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import trio

from bpfproxy.pinning import BPFFS_ENV, DEFAULT_BPFFS, check_instance_name, default_instance
from bpfproxy.plan import BpfPlan, kept_group
from bpfproxy.steered import STORE_NAME, SharedListener, SteeredListener, check_listen_port
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
    worker_options,
)
from tcpproxy.errors import StartupError
from tcpproxy.fdstore import FdStore, Wanted
from tcpproxy.listeners import open_listener
from tcpproxy.pidfile import PidFile
from tcpproxy.privileges import (
    CAP_BPF,
    CAP_NET_BIND_SERVICE,
    Account,
    check_access,
    drop_privileges,
    inherited_capabilities,
    target_account,
)
from tcpproxy.service import run_service
from tcpproxy.upgrade import Handover, take_handover
from tcpproxy.workers.link import SupervisorLink
from tcpproxy.workers.supervisor import Supervisor

if TYPE_CHECKING:
    from bpfproxy.pinning import Instance
    from tcpproxy.config import Config
    from tcpproxy.metrics import NullMetrics
    from tcpproxy.notify import Notifier
    from tcpproxy.sources import ConfigSource

__all__ = ["command", "main"]

log = logging.getLogger("tcpproxy")

DEFAULT_LISTEN_PORT = 8000  # the one socket's own port; it must not be an app port

EPILOG = """\b
Examples:
  sudo bpfproxy -p 8000                  # ./config.json, all its ports on one socket
  sudo bpfproxy -p 8000 -c /etc/tcpproxy.json --log-level debug
  sudo bpfproxy -p 8000 --workers 2      # one process per core, one reuseport group
  sudo bpfproxy --check                  # can this machine load the program?
  sudo bpfproxy --release                # remove the pinned state of a crashed -p 8000
  sudo bpfproxy -p 8000 -c etcd://10.0.0.1:2379/fleet   # follow the apps in etcd under /fleet
"""


def _instance_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return check_instance_name(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@common_options("bpfproxy")
@click.option(
    "-p",
    "--port",
    "listen_port",
    type=click.IntRange(1, 65535),
    default=DEFAULT_LISTEN_PORT,
    show_default=True,
    help="Port of the one listening socket (served normally; not an app port).",
)
@click.option(
    "--bind",
    metavar="ADDRESS",
    default=None,
    help="Address of the listening socket; app ports are steered on this address only."
    "  [default: [::] dual-stack, every address]",
)
@click.option(
    "--check",
    is_flag=True,
    help="Compile and load the BPF program without attaching it, then exit.",
)
@click.option(
    "--instance",
    metavar="NAME",
    default=None,
    callback=_instance_name,
    help="Name of the state pinned in /sys/fs/bpf/bpfproxy/NAME (program, maps, link), "
    "which a restart reuses.  [default: port-PORT, from -p]",
)
@click.option(
    "--release",
    is_flag=True,
    help="Remove the pinned state of an instance that is not running (its ports are "
    "released), say what was removed, and exit.",
)
@click.option("--bpffs", default=DEFAULT_BPFFS, envvar=BPFFS_ENV, hidden=True)  # fmt: skip
@click.option("--worker-listener", type=int, default=None, hidden=True)  # fmt: skip
@click.pass_context
def command(
    ctx: click.Context,
    config_path: Path | str,
    listen_port: int,
    bind: str | None,
    check: bool,
    instance: str | None,
    release: bool,
    bpffs: str,
    drain_timeout: float,
    max_connections: int | None,
    metrics_address: str | None,
    pid_file: Path | None,
    workers: int,
    worker: str | None,
    worker_listener: int | None,
    user: str | None,
    splice: bool,
    log_level: str,
    log_format: str,
    **fleet_params: Any,
) -> int:
    """Proxy TCP connections for every port of every app through ONE listening
    socket: an sk_lookup BPF program steers each configured port to it, and the
    connection's destination port picks the app. Needs root (CAP_BPF and
    CAP_NET_ADMIN) to set up, then serves as --user with no capability (but
    CAP_NET_BIND_SERVICE if -p or --metrics is below 1024);
    Linux 5.9+, bcc and kernel headers."""
    ignore_sigusr2()
    if worker is not None:  # started by a supervisor, which owns the BPF side
        return _run_worker(worker, worker_listener, config_path, drain_timeout,
                           max_connections, splice, log_level, log_format,
                           listen_port, bind)  # fmt: skip
    setup_logging(log_level, log_format=log_format)
    from bpfproxy.dispatcher import Dispatcher
    from bpfproxy.errors import SteeringError
    from bpfproxy.loader import check_environment, compile_check

    fleet = FleetOptions(**fleet_params)
    name = instance or default_instance(listen_port)
    handover = take_handover() if not (check or release) else None
    if handover is not None and workers > 1:  # an upgrade's new supervisor
        return _run_handed_over_workers(
            handover, config_path, fleet, listen_port, bind, bpffs, name, user,
            drain_timeout, max_connections, metrics_address, pid_file, workers, ctx.params,
        )  # fmt: skip
    if handover is not None:  # started by an upgrade: the state comes with the listener
        return _run_handed_over(
            handover, config_path, fleet, listen_port, bind, bpffs, name, user,
            drain_timeout, max_connections, metrics_address, pid_file, splice,
        )  # fmt: skip
    try:
        if check:
            compile_check()
            click.echo("bpfproxy: ok: the sk_lookup program compiles and loads on this machine")
            return 0
        if release:
            return _release(bpffs, name)
        check_environment()  # first: "run it with sudo" is what a user must fix first
        notifier = open_notifier(None)  # before the drop of privileges
        fdstore = FdStore.at_start(notifier, None)
        code = [*serving_code(), Path(__file__).parent]
        serving = check_access(
            target_account(user), access_path(config_path, fleet), code, chosen=user is not None
        )
        account, reading = serving.account, serving.keep
        keep = (*reading, *_bpf_capability(), *low_port_capability({listen_port}, metrics_address))
        limit = fit_connection_limit(max_connections)
        source, data, config = open_config(config_path, fleet, (listen_port,), bind, limit)
        check_listen_port(listen_port, config)
        with contextlib.ExitStack() as stack:
            # Closed last: unpins after a clean stop (or a failed first start), then unlocks.
            pins = _open_pins(bpffs, name)
            if pins is not None:
                stack.callback(pins.close)
            if workers > 1:
                # --bind too: the worker's self-loop guard needs it (the listener is given)
                options = worker_options(
                    {**ctx.params, "max_connections": math.ceil(limit / workers)}, skip=set()
                )
                kept = kept_group(fdstore, bind, listen_port, workers)  # after a crash
                plan = BpfPlan(bind, listen_port, options, workers, pins, kept)
                stack.callback(plan.close)
                plan.steer(config)
                supervisor = Supervisor(
                    plan, source, data, config, workers, metrics_address,
                    validate=reload_check(
                        config_path, (listen_port,), bind, max_connections=limit
                    ),
                    drain_timeout=drain_timeout, notifier=notifier, fdstore=fdstore,
                )  # fmt: skip
                plan.hand_to(account)
                _write_pid_file(stack, pid_file, account)
                # ambient: workers import code too (reading); a restarted worker's listener
                # on a low -p, and the supervisor an upgrade starts, bind as this user
                listen_low = low_port_capability({listen_port}, None)
                _drop(pins, account, keep, ambient=(*reading, *listen_low))
                plan.serving()
                _serving(pins)  # the supervisor's StartupError below unpins again
                try:
                    trio.run(supervisor.run)
                except StartupError:
                    _stopped_cleanly(pins)  # its workers did not start: release every port
                    raise
                if not plan.handed_over:  # else the state is the new supervisor's
                    _stopped_cleanly(pins)
                return 0
            # after a crash: the listener the service manager kept, with its queue
            kept_listener = fdstore.take({STORE_NAME: Wanted(bind, listen_port)})
            listener = kept_listener.get(STORE_NAME) or open_listener(bind, listen_port)
            stack.callback(listener.close)
            dispatcher = pins.dispatcher(listener) if pins else Dispatcher(listener)
            stack.callback(dispatcher.close)  # runs before listener.close: unsteer first
            metrics, address = metrics_for(metrics_address)
            frontend = SteeredListener(listener, dispatcher, listen_port, metrics, pins)
            frontend.steer(config)
            pids = _write_pid_file(stack, pid_file, account)
            fdstore.keep(frontend.stored)
            # ambient: the process an upgrade starts (SIGUSR2) keeps the same, no more
            _drop(pins, account, keep, ambient=keep)
            _serve(source, data, config, frontend, pins, pids, None, notifier, fdstore,
                   drain_timeout, limit, splice, metrics, address, listen_port, bind)  # fmt: skip
    except SteeringError as exc:
        raise StartupError(str(exc)) from None
    return 0


def _write_pid_file(
    stack: contextlib.ExitStack, path: Path | None, account: Account | None
) -> PidFile:
    """Once set up, before the drop (tcpproxy.pidfile); removed when `stack` closes."""
    pids = PidFile(path)
    pids.write_at_start(account.uid if account is not None else None)
    stack.callback(pids.remove)
    return pids


def _serve(
    config_path: Path | ConfigSource,
    data: bytes,
    config: Config,
    frontend: SteeredListener,
    pins: Instance | None,
    pids: PidFile,
    handover: Handover | None,
    notifier: Notifier,
    fdstore: FdStore,
    drain_timeout: float,
    limit: int,
    splice: bool,
    metrics: NullMetrics,
    address: tuple[str, int] | None,
    listen_port: int,
    bind: str | None,
) -> None:
    """Serve until stopped or upgraded; a clean stop unpins, a hand-over does not (the
    state is the new process's)."""
    trio.run(
        lambda: run_service(
            config_path, data, config, frontend, drain_timeout=drain_timeout,
            max_connections=limit, use_splice=splice, metrics=metrics,
            metrics_address=address, listen_ports=frozenset({listen_port}), bind=bind,
            listeners=frontend.sockets, state=frontend, handover=handover,
            pid_file=pids, notifier=notifier, fdstore=fdstore, task_status=_Serving(pins),
        )
    )  # fmt: skip
    if not frontend.handed_over and (handover is None or handover.served):
        _stopped_cleanly(pins)  # not a new process stopped before it served: the old owns it


def _handed_config(
    handover: Handover,
    config_path: Path | str,
    fleet: FleetOptions,
    listen_port: int,
    bind: str | None,
    user: str | None,
    max_connections: int | None,
) -> tuple[Path | ConfigSource, bytes, Config, int]:
    """What a process an upgrade started serves (both paths): its user can read the
    config, which is valid here; and its connection limit."""
    account = target_account(user, upgrade=True)
    code = [*serving_code(), Path(__file__).parent]
    check_access(account, access_path(config_path, fleet), code, chosen=user is not None)
    limit = fit_connection_limit(max_connections)
    source, data, config = open_config(config_path, fleet, (listen_port,), bind, limit, handover)
    check_listen_port(listen_port, config)
    return source, data, config, limit


def _run_handed_over(
    handover: Handover,
    config_path: Path | str,
    fleet: FleetOptions,
    listen_port: int,
    bind: str | None,
    bpffs: str,
    name: str,
    user: str | None,
    drain_timeout: float,
    max_connections: int | None,
    metrics_address: str | None,
    pid_file: Path | None,
    splice: bool,
) -> int:
    """A process started by an upgrade (SIGUSR2): unprivileged from the start, it
    validates its config, takes the listener and the BPF state it was handed
    (bpfproxy.handover: no compile, no capability, no bpffs), diffs the port map
    to its config and serves; the old process drains once it says so."""
    from bpfproxy.errors import SteeringError
    from bpfproxy.handover import adopt

    with contextlib.ExitStack() as stack:
        stack.callback(handover.close)  # not ready: the old process goes on serving
        stack.callback(_close_all, handover)
        try:
            source, data, config, limit = _handed_config(
                handover, config_path, fleet, listen_port, bind, user, max_connections
            )
            listener = handover.sockets.pop(listen_port, None)
            if listener is None:
                raise StartupError(f"upgrade: the old process did not hand over port {listen_port}")
            stack.callback(listener.close)
            fds, handover.fds = handover.fds, {}
            pins, dispatcher = adopt(fds, listener, bpffs, name)
        except SteeringError as exc:
            raise StartupError(str(exc)) from None
        if pins is not None:
            stack.callback(pins.close)  # unpins only after a clean stop (_serve)
        stack.callback(dispatcher.close)
        metrics, address = metrics_for(metrics_address)
        frontend = SteeredListener(listener, dispatcher, listen_port, metrics, pins)
        frontend.steer(config)
        pids = PidFile(pid_file)  # rewritten once serving (run_service), as this user
        stack.callback(pids.remove)
        notifier = open_notifier(handover)
        fdstore = FdStore.at_start(notifier, handover.stored)
        fdstore.keep(frontend.stored)
        keep = inherited_capabilities()
        drop_privileges(None, keep, ambient=keep)
        _serve(source, data, config, frontend, pins, pids, handover, notifier, fdstore,
               drain_timeout, limit, splice, metrics, address, listen_port, bind)  # fmt: skip
    return 0


def _run_handed_over_workers(
    handover: Handover,
    config_path: Path | str,
    fleet: FleetOptions,
    listen_port: int,
    bind: str | None,
    bpffs: str,
    name: str,
    user: str | None,
    drain_timeout: float,
    max_connections: int | None,
    metrics_address: str | None,
    pid_file: Path | None,
    workers: int,
    params: dict[str, object],
) -> int:
    """A supervisor started by an upgrade (SIGUSR2): unprivileged from the start, it
    validates its config, takes the group's listeners, the port lock and the BPF
    state it was handed (BpfPlan.adopt), diffs the port map to its config and starts
    its workers, worker i on the old worker i's listener; the old supervisor stops
    its workers once this one says it serves."""
    from bpfproxy.errors import SteeringError

    with contextlib.ExitStack() as stack:
        stack.callback(handover.close)  # not ready: the old supervisor goes on serving
        stack.callback(_close_all, handover)
        try:
            source, data, config, limit = _handed_config(
                handover, config_path, fleet, listen_port, bind, user, max_connections
            )
            handover.sockets.pop(listen_port, None)  # (none: the group comes by name)
            options = worker_options(
                {**params, "max_connections": math.ceil(limit / workers)}, skip=set()
            )
            plan = BpfPlan.adopt(bind, listen_port, options, workers, handover, bpffs, name)
        except SteeringError as exc:
            raise StartupError(str(exc)) from None
        pins = plan.pins
        if pins is not None:
            stack.callback(pins.close)  # unpins only after a clean stop (below)
        stack.callback(plan.close)
        plan.steer(config)
        pids = PidFile(pid_file)  # rewritten once its workers serve, as this user
        stack.callback(pids.remove)
        notifier = open_notifier(handover)
        supervisor = Supervisor(
            plan, source, data, config, workers, metrics_address,
            validate=reload_check(config_path, (listen_port,), bind, max_connections=limit),
            drain_timeout=drain_timeout, handover=handover, pid_file=pids,
            notifier=notifier, fdstore=FdStore.at_start(notifier, handover.stored),
        )  # fmt: skip
        keep = inherited_capabilities()
        drop_privileges(None, keep, ambient=keep)
        trio.run(supervisor.run)
        if handover.served and not plan.handed_over:
            _stopped_cleanly(pins)  # a clean stop: every port released
    return 0


def _close_all(handover: Handover) -> None:
    """Whatever the hand-over brought that nothing took (closed, not shut down)."""
    for sock in handover.sockets.values():
        sock.close()
    if handover.metrics is not None:
        handover.metrics.close()
    if handover.notify is not None:
        handover.notify.close()
    for fd in handover.fds.values():
        with contextlib.suppress(OSError):
            os.close(fd)


def _open_pins(bpffs: str, name: str) -> Instance | None:
    """The instance's pinned state, locked; None (with a warning) where no bpffs can be had."""
    from bpfproxy.pinning import Instance, NoBpffs

    try:
        return Instance.open(bpffs, name)
    except NoBpffs as exc:
        log.warning("%s; running without it: a crash releases every port", exc)
        return None


#: Linux 5.19 lets a process without capabilities use the BPF objects it holds even
#: when kernel.unprivileged_bpf_disabled is set; before, every bpf(2) call needs CAP_BPF.
_UNPRIVILEGED_BPF_USE = (5, 19)


def _bpf_capability() -> tuple[int, ...]:
    """The capability to keep after the drop: CAP_BPF on a kernel that refuses map
    updates to processes without it (see _UNPRIVILEGED_BPF_USE), else none."""
    from bpfproxy.loader import _kernel_version

    try:
        with open("/proc/sys/kernel/unprivileged_bpf_disabled") as sysctl:
            disabled = int(sysctl.read()) != 0
    except (OSError, ValueError):
        disabled = True
    old = _kernel_version(os.uname().release) < _UNPRIVILEGED_BPF_USE
    return (CAP_BPF,) if disabled and old else ()


def _drop(
    pins: Instance | None,
    account: Account | None,
    keep: tuple[int, ...],
    ambient: tuple[int, ...] = (),
) -> None:
    """Set up is done: the pins become the account's to remove, then drop privileges."""
    if pins is not None and account is not None:
        pins.hand_to(account.uid, account.gid)
    drop_privileges(account, keep, ambient=ambient)


class _Serving:
    """run_service's task status: the pins are kept from the moment it serves, not
    before (a failed start, e.g. --metrics in use, unpins: no port stays captured)."""

    def __init__(self, pins: Instance | None) -> None:
        self._pins = pins

    def started(self, value: object = None) -> None:
        _serving(self._pins)


def _serving(pins: Instance | None) -> None:
    if pins is not None:
        pins.unpin_at_close = False  # serving: a crash keeps the pins


def _stopped_cleanly(pins: Instance | None) -> None:
    if pins is not None:
        pins.unpin_at_close = True  # a clean stop releases every port


def _release(bpffs: str, name: str) -> int:
    """``--release``: remove an instance's pins and say what went (nothing pinned is fine)."""
    from bpfproxy.pinning import release

    path, removed = release(bpffs, name)
    if not removed:
        click.echo(f"bpfproxy: instance {name} has no pinned state ({path} does not exist)")
        return 0
    click.echo(f"bpfproxy: released instance {name}: removed {path} with {', '.join(removed)}")
    return 0


def _run_worker(
    worker: str,
    listener_fd: int | None,
    config_path: Path | str,
    drain_timeout: float,
    max_connections: int | None,
    splice: bool,
    log_level: str,
    log_format: str,
    listen_port: int,
    bind: str | None,
) -> int:
    if listener_fd is None:
        raise click.UsageError("--worker needs --worker-listener")
    link = SupervisorLink.join(worker)
    setup_logging(log_level, prefix=link.log_prefix, log_format=log_format)
    held = inherited_capabilities()
    keep = tuple(cap for cap in held if cap != CAP_NET_BIND_SERVICE)
    if keep != held:  # the supervisor binds for its workers (ambient to reach its successor)
        drop_privileges(None, keep, ambient=keep)
    config = link.initial_config()
    listener = socket.socket(fileno=listener_fd)
    listener.setblocking(False)
    limit = fit_connection_limit(max_connections)
    metrics, _ = metrics_for(None, worker=True)
    trio.run(
        lambda: run_service(
            config_path, b"", config, SharedListener(listener), drain_timeout=drain_timeout,
            max_connections=limit, use_splice=splice, supervisor=link, metrics=metrics,
            listen_ports=frozenset({listen_port}), bind=bind,
        )
    )  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("bpfproxy", command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
