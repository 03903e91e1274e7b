"""The life of one proxy process (alone or a worker): start, serve, apply reloads, drain, stop.

A `Frontend` is how connections arrive (tcpproxy: a listener per port;
bpfproxy: one socket steered by BPF). Everything else — routing, target
choice, relaying, reload and shutdown — is the same code.

Lifecycle rules:
1. Startup errors (config, bind, BPF) happen before serving and are raised.
2. A reload (file change or SIGHUP; `reload.Reloader`) validates the new
   file first; an invalid one is logged and changes nothing. A valid one is
   applied as a diff (`apply_locally`):
   the frontend first (it may still reject, e.g. a port that cannot be
   bound), then the routes, with no checkpoint between, so no connection
   sees half a reload. Established connections are never touched.
3. SIGTERM or SIGINT empties the service manager's store (tcpproxy.fdstore
   rule 3), stops accepting, lets connections finish for up to the drain
   timeout, then cuts the rest; a second SIGINT cuts them at once. From
   READY=1 on, the store keeps every listener (a crash leaves their queues
   to the next start), in step with reloads.
4. SIGUSR2 upgrades (tcpproxy.upgrade): a new process started from the same
   command line gets the listeners (and the frontend's `UpgradeState`:
   bpfproxy's BPF descriptors; the names kept in the store); once it
   serves, this one stops accepting and drains as on SIGTERM, but tells
   systemd nothing and leaves the store alone (the new one sent READY=1
   and MAINPID=, and keeps the store). If the new one fails, nothing changes
   here. A SIGUSR2 during an upgrade, or while stopping, is ignored.
   The new process names itself (pid file, MAINPID=) only once the old one
   said "go" (tcpproxy.upgrade rule 2); refused, it drains what it accepted
   and exits with a StartupError, telling systemd nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio

from tcpproxy.build_info import describe as describe_build
from tcpproxy.config import Config, no_isolation
from tcpproxy.diff import format_ports
from tcpproxy.errors import StartupError
from tcpproxy.fdstore import FdStore
from tcpproxy.httpserver import HttpServer
from tcpproxy.listeners import ListenerHost
from tcpproxy.metrics import NullMetrics, current_only
from tcpproxy.notify import Notifier
from tcpproxy.pidfile import PidFile
from tcpproxy.proxy import Proxy
from tcpproxy.reload import ApplyFn, Reloader, digest
from tcpproxy.selfloop import reject_self_loops
from tcpproxy.sources import ConfigSource
from tcpproxy.sources.file import FileSource
from tcpproxy.status import SAMPLED_METRICS, History, Loaded
from tcpproxy.status import snapshot as status_snapshot
from tcpproxy.statusserver import (
    keep_history,
    open_status_server,
    registry_samples,
    status_extra,
)
from tcpproxy.upgrade import (
    CONFIG_FD,
    METRICS_FD,
    NOTIFY_FD,
    Handover,
    config_fd,
    start_successor,
)

if TYPE_CHECKING:
    from tcpproxy.workers.link import SupervisorLink

__all__ = [
    "DEFAULT_DRAIN_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "Frontend",
    "UpgradeState",
    "run_service",
]

log = logging.getLogger("tcpproxy")

DEFAULT_DRAIN_TIMEOUT = 30.0  # seconds open connections may take to finish on shutdown
DEFAULT_MAX_CONNECTIONS = 10000  # open connections per process; see the CLI's --max-connections


class Frontend(Protocol):
    """How connections reach the proxy."""

    name: str

    async def serve(self, host: ListenerHost, *, task_status: trio.TaskStatus[None] = ...) -> None:
        """Hand every listener to `host` (the engine, which accepts) until cancelled, then
        take them back and close them; started() once accepting."""

    def update(self, old: Config, new: Config) -> None:
        """Apply a reload's port changes; raise StartupError (changing nothing) to reject it."""


def validate_config(
    config: Config,
    *,
    source: str,
    listen_ports: Collection[int] = (),
    bind: str | None = None,
    max_connections: int | None = None,
) -> None:
    """What every load of a config checks beyond parsing (start, and each reload).

    Raises ConfigError for a target that is the proxy itself (tcpproxy.selfloop);
    warns about an app whose MaxConnections isolates it from nothing, given the
    whole proxy's limit `max_connections` (None: not judged).
    """
    reject_self_loops(config, listen_ports, source, bind)
    if max_connections is not None:
        for problem in no_isolation(config, max_connections):
            log.warning("%s: %s", source, problem)


def apply_locally(proxy: Proxy, frontend: Frontend) -> ApplyFn:
    """In one process: the frontend first (it may reject), then the routes, with
    no checkpoint between, so no connection sees half a reload."""

    async def apply(old: Config, new: Config) -> None:
        frontend.update(old, new)
        proxy.apply(new)
        proxy.metrics.keep_only(new)  # the series of apps and targets gone

    return apply


async def run_service(
    path: Path | str | ConfigSource,
    data: bytes,
    config: Config,
    frontend: Frontend,
    *,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    use_splice: bool = True,
    supervisor: SupervisorLink | None = None,
    metrics: NullMetrics | None = None,
    metrics_address: tuple[str, int] | None = None,
    listen_ports: frozenset[int] = frozenset(),
    bind: str | None = None,
    listeners: Callable[[], dict[int, socket.socket]] | None = None,
    state: UpgradeState | None = None,
    handover: Handover | None = None,
    pid_file: PidFile | None = None,
    notifier: Notifier | None = None,
    fdstore: FdStore | None = None,
    task_status: trio.TaskStatus[Proxy] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `config` through `frontend` until SIGTERM/SIGINT, then drain.

    Args:
      path: the config file, watched for changes, or another source (etcd).
      data: its contents as loaded (so the first change event is compared
        against what is running).
      drain_timeout: seconds connections may take to finish after a stop.
      supervisor: set in a worker process: configs come from the supervisor
        (which watches the file and validates once), not from the file.
      metrics: where to count (NullMetrics: nowhere).
      metrics_address: serve /metrics and /status there (not in workers:
        their supervisor serves the sum); after an upgrade, on the socket the
        old process handed over (`handover.metrics`), which an upgrade of this
        one hands on.
      listen_ports: ports served besides the apps' (bpfproxy's -p): no target
        may loop back to them.
      bind: the address the ports listen on (--bind; None: every address),
        which decides what loops back (tcpproxy.selfloop).
      listeners: the frontend's listening sockets by port, for an upgrade
        (SIGUSR2; in a worker: handed to its supervisor when it asks, for its
        upgrade); None: none to hand over (a bpfproxy worker: its supervisor
        holds a copy).
      state: what an upgrade hands over besides the listeners, and who is told
        how it ended (bpfproxy: its BPF descriptors; see UpgradeState).
      handover: set in a process started by an upgrade: told once this one
        serves; once the old one says "go" this one rewrites `pid_file` and
        sends MAINPID= (else it stops: rule 4).
      pid_file: rewritten by a process started by an upgrade (the caller
        writes it at a normal start, before dropping privileges, and removes it).
      notifier: speaks to systemd (None: one from the environment, as a
        worker's, which says nothing); the caller's, connected before it
        dropped privileges; an upgrade hands the new process its socket.
      fdstore: the listeners kept in the service manager's store
        (tcpproxy.fdstore): kept in step from READY=1 on and after each reload,
        emptied at a stop by signal, handed on (by name) to an upgrade.
    """
    metrics = metrics or NullMetrics()
    notifier = notifier if notifier is not None else Notifier()
    stop_accepting = trio.CancelScope()
    cut_connections = trio.CancelScope()
    upgrade = _Upgrade()
    refused = False  # started by an upgrade, and the old process did not let go (rule 4)
    wanted = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)
    with trio.open_signal_receiver(*wanted) as signals:
        async with trio.open_nursery() as outer:
            with cut_connections:
                async with trio.open_nursery() as connections:
                    share = supervisor.count if supervisor is not None else 1
                    prefix = f"w{supervisor.index}-" if supervisor is not None else ""
                    proxy = Proxy(
                        config, max_connections=max_connections, share=share,
                        id_prefix=prefix, metrics=metrics, use_splice=use_splice,
                        listen_ports=listen_ports, bind=bind,
                    )  # fmt: skip
                    # the engine serves every connection from one task, in the connections
                    # nursery: the drain deadline and a second SIGINT cut it
                    await connections.start(proxy.engine.run)
                    apply = apply_locally(proxy, frontend)
                    if fdstore is not None:
                        apply = _then_sync(apply, fdstore)
                    source = FileSource(path) if isinstance(path, (Path, str)) else path
                    if supervisor is None:
                        source.use_metrics(metrics)
                    validate = partial(
                        validate_config, source=source.name, listen_ports=listen_ports, bind=bind,
                        max_connections=max_connections * share,
                    )  # fmt: skip
                    reloader = Reloader(
                        source, data, lambda: proxy.config, apply, notifier, metrics, validate
                    )
                    if supervisor is None:
                        metrics.config_loaded(reloader.digest)

                    def status() -> str:
                        return (
                            f"{len(proxy.config.apps)} apps, {len(proxy.config.ports)} ports, "
                            f"{proxy.active_total} active connections, last reload: {reloader.last}"
                        )

                    on_hup = reloader.request if supervisor is None else _ignore

                    def on_usr2() -> None:
                        if supervisor is not None or listeners is None:
                            log.warning("SIGUSR2 ignored: a worker; send it to the "
                                        "supervisor, which upgrades its workers")  # fmt: skip
                        elif upgrade.successor is not None or stop_accepting.cancel_called:
                            log.info("SIGUSR2 ignored: this process is stopping")
                        elif upgrade.in_flight:
                            log.info("SIGUSR2 ignored: an upgrade is in flight")
                        else:
                            upgrade.in_flight = True
                            outer.start_soon(_upgrade, upgrade, listeners, state,
                                             stop_accepting, source.served, fdstore)  # fmt: skip

                    on_stop = fdstore.clear if fdstore is not None else _nothing
                    outer.start_soon(
                        _handle_signals, signals, on_hup, on_usr2, on_stop, stop_accepting,
                        cut_connections,
                    )  # fmt: skip
                    handed = handover.metrics if handover is not None else None
                    if metrics_address is None and handed is not None:
                        handed.close()  # not served here (cannot be: same command line)
                    if metrics_address is not None:
                        from prometheus_client import REGISTRY

                        build = describe_build()  # what runs is settled once imported
                        history = History(time.monotonic(), time.time())
                        extra = status_extra(source, time.time())

                        async def snapshot(with_history: bool | Collection[str]) -> dict[str, Any]:
                            # on the loop: never mid-update
                            loaded = Loaded(
                                source.name, reloader.digest, reloader.loaded_at, reloader.last
                            )
                            return status_snapshot(
                                frontend.name, os.getpid(), loaded, proxy.config,
                                proxy.counts(), rejected=source.rejected(), build=build,
                                history=history, with_history=with_history, extra=extra(),
                            )  # fmt: skip

                        registry = current_only(REGISTRY, lambda: proxy.config)
                        sampled = REGISTRY.restricted_registry(SAMPLED_METRICS)
                        await outer.start(
                            keep_history, history, registry_samples(sampled),
                            lambda: proxy.config, lambda: proxy.counts().down,
                        )  # fmt: skip
                        server = open_status_server(
                            *metrics_address, snapshot, registry, handed=handed
                        )
                        upgrade.fds[METRICS_FD] = server.socket.fileno()  # handed on in turn
                        await outer.start(_serve_until_handed_over, server, upgrade.handed_over)
                    notify_fd = notifier.fileno()
                    if notify_fd is not None:  # the new process may not connect it (unprivileged)
                        upgrade.fds[NOTIFY_FD] = notify_fd
                    with stop_accepting:
                        async with trio.open_nursery() as control:
                            await control.start(proxy.health.run)
                            await control.start(frontend.serve, proxy.engine)
                            if supervisor is None:
                                await control.start(source.watch, reloader.request)
                                control.start_soon(reloader.run, status)
                            else:
                                control.start_soon(
                                    supervisor.follow, lambda: proxy.config, apply, listeners
                                )
                            log.info(
                                "%s started: %d apps, ports %s, config %s, max %d connections",
                                frontend.name, len(config.apps),
                                format_ports(config.ports),
                                digest(data) if supervisor is None else "from the supervisor",
                                max_connections,
                            )  # fmt: skip
                            if handover is not None and not await _take_over(handover, pid_file):
                                refused = True  # the old process serves on: this one stops
                                stop_accepting.cancel()
                            else:
                                if fdstore is not None:  # kept from now on: stored first,
                                    fdstore.serve()  # so READY=1 means "and kept"
                                notifier.ready(status(), main_pid=handover is not None)
                                outer.start_soon(notifier.watchdog, status)  # while draining too
                                if handover is not None and supervisor is None:
                                    # a change between our read and our watch's start (the
                                    # old process no longer reloads): look once more
                                    reloader.request("upgrade: the config as it is now")
                            task_status.started(proxy)
                    # accepting has stopped and every listener is closed
                    proxy.engine.drain()  # its task ends once no connection is left
                    if upgrade.successor is None and not refused:
                        notifier.stopping(status())
                    else:  # the service goes on, in the new process or in the old one
                        notifier.disable()
                    if proxy.active_total:
                        log.info("draining %d connections for up to %gs",
                                 proxy.active_total, drain_timeout)  # fmt: skip
                    connections.cancel_scope.deadline = trio.current_time() + drain_timeout
            if proxy.active_total:
                log.warning("closed %d connections still open at shutdown", proxy.active_total)
            outer.cancel_scope.cancel()
    if upgrade.successor is not None:
        log.info("%s stopped (pid %d serves)", frontend.name, upgrade.successor)
    elif refused:
        raise StartupError("upgrade: the old process did not let this one take over")
    else:
        log.info("%s stopped", frontend.name)


@dataclass
class _Upgrade:
    """Where this process is in an upgrade (rule 4)."""

    in_flight: bool = False
    fds: dict[str, int] = field(default_factory=dict)  # handed over besides the frontend's
    successor: int | None = None  # the pid that took over: this process drains
    handed_over: trio.Event = field(default_factory=trio.Event)  # set with `successor`


class UpgradeState(Protocol):
    """What a frontend hands over besides its listeners (bpfproxy: the BPF state)."""

    def fds(self) -> dict[str, int]:
        """Descriptors by name, still ours (the new process gets its own references)."""

    def upgraded(self, succeeded: bool) -> None:
        """Called once the upgrade ended: True (before this process stops accepting),
        the state is the new process's now; False, it is still ours."""


async def _upgrade(
    upgrade: _Upgrade,
    listeners: Callable[[], dict[int, socket.socket]],
    state: UpgradeState | None,
    stop_accepting: trio.CancelScope,
    served: Callable[[], bytes | None],
    fdstore: FdStore | None,
) -> None:
    """`served`: the source's config in force, handed over as CONFIG_FD (a fleet
    node's: the new process keeps the apps' last good versions). `fdstore`: its
    names go to the new process, which keeps the store from "go" on."""
    fds = {**(state.fds() if state is not None else {}), **upgrade.fds}
    config = served()
    try:
        ours = {CONFIG_FD: config_fd(config)} if config is not None else {}
    except OSError as exc:  # EMFILE, ENOMEM: the new process reads etcd (and the cache) only
        log.warning("upgrade: the config in force is not handed over: %s", exc)
        ours = {}
    try:  # a SIGTERM meanwhile: it refuses the hand-over (and stops the new process)
        pid = await start_successor(
            listeners(), {**fds, **ours}, accept=lambda: not stop_accepting.cancel_called,
            stored=fdstore.stored if fdstore is not None else None,
        )  # fmt: skip
    finally:
        upgrade.in_flight = False
        for fd in ours.values():
            os.close(fd)
    if pid is not None and fdstore is not None:
        fdstore.hand_over()  # no checkpoint since "go": nothing is stored or removed here now
    if state is not None:
        state.upgraded(pid is not None)
    if pid is not None:
        upgrade.successor = pid
        upgrade.handed_over.set()
        stop_accepting.cancel()  # the frontend closes our descriptors, not the sockets


async def _take_over(handover: Handover, pid_file: PidFile | None) -> bool:
    """A process started by an upgrade serves: tell the old one and, once it says
    "go", name this one in the pid file (tcpproxy.upgrade rule 2). False: it did not
    let go (it was stopping, or gave up on this one), so this one must not take over."""
    if not await handover.confirm():
        log.error("upgrade: the old process did not let this one take over: stopping")
        return False
    if pid_file is not None:
        try:
            pid_file.write()
        except OSError as exc:
            log.warning("pid file %s not rewritten: %s", pid_file.path, exc)
    return True


async def _serve_until_handed_over(
    server: HttpServer, handed_over: trio.Event, *, task_status: trio.TaskStatus[None]
) -> None:
    """Serve /metrics and /status until the service ends (this task is cancelled) or an
    upgrade's new process serves them: then the requests open finish (within their
    deadline) while the new one accepts; then close the socket (the new one has its own)."""
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            task_status.started()
            await handed_over.wait()
            server.hand_over()
    finally:
        server.socket.close()


def _ignore(why: str) -> None:
    """A worker's SIGHUP: its supervisor reloads for it."""


def _nothing() -> None:
    """No store to empty at a stop."""


def _then_sync(apply: ApplyFn, fdstore: FdStore) -> ApplyFn:
    """`apply`, then the store in step with the listeners (a port added or dropped)."""

    async def apply_and_sync(old: Config, new: Config) -> None:
        await apply(old, new)
        fdstore.sync()

    return apply_and_sync


async def _handle_signals(
    signals: AsyncIterator[int],
    on_hup: Callable[[str], None],
    on_usr2: Callable[[], None],
    on_stop: Callable[[], None],
    stop_accepting: trio.CancelScope,
    cut_connections: trio.CancelScope,
) -> None:
    """`on_stop`: called before accepting stops (the store is emptied first: a
    listener it kept open would queue connections nobody accepts)."""
    async for signum in signals:
        if signum == signal.SIGHUP:
            on_hup("SIGHUP")
        elif signum == signal.SIGUSR2:
            on_usr2()
        elif not stop_accepting.cancel_called:
            log.info("%s: stopping", signal.Signals(signum).name)
            on_stop()
            stop_accepting.cancel()
        elif signum == signal.SIGINT:
            log.info("SIGINT again: closing connections now")
            cut_connections.cancel()
