"""`bpfproxy`: every configured port on one listening socket, steered by sk_lookup."""

from __future__ import annotations

import contextlib
import logging
import math
import socket
from collections.abc import Sequence
from pathlib import Path

import click
import trio

from bpfproxy.steered import SharedListener, SteeredListener, check_listen_port
from tcpproxy.cli_common import (
    common_options,
    fit_connection_limit,
    metrics_for,
    read_config,
    run_cli,
    self_loop_check,
    setup_logging,
    worker_options,
)
from tcpproxy.config import Config
from tcpproxy.errors import StartupError
from tcpproxy.listeners import open_listener
from tcpproxy.service import run_service
from tcpproxy.workers.link import SupervisorLink, worker_argv
from tcpproxy.workers.supervisor import Supervisor

__all__ = ["command", "main"]

log = logging.getLogger("tcpproxy")

DEFAULT_LISTEN_PORT = 8000  # the one socket's own port; it must not be an app port

EPILOG = """\b
Examples:
  sudo bpfproxy -p 8000                  # ./config.json, all its ports on one socket
  sudo bpfproxy -p 8000 -c /etc/tcpproxy.json --log-level debug
  sudo bpfproxy -p 8000 --workers 2      # one process per core, one reuseport group
  sudo bpfproxy --check                  # can this machine load the program?
"""


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
@click.option("--worker-listener", type=int, default=None, hidden=True)  # fmt: skip
@click.pass_context
def command(
    ctx: click.Context,
    config_path: Path,
    listen_port: int,
    bind: str | None,
    check: bool,
    drain_timeout: float,
    max_connections: int | None,
    metrics_address: str | None,
    workers: int,
    worker: str | None,
    worker_listener: int | None,
    splice: bool,
    log_level: str,
    log_format: str,
) -> int:
    """Proxy TCP connections for every port of every app through ONE listening
    socket: an sk_lookup BPF program steers each configured port to it, and the
    connection's destination port picks the app. Needs root (CAP_BPF and
    CAP_NET_ADMIN), Linux 5.9+, bcc and kernel headers."""
    if worker is not None:  # started by a supervisor, which owns the BPF side
        return _run_worker(worker, worker_listener, config_path, drain_timeout,
                           max_connections, splice, log_level, log_format,
                           listen_port)  # fmt: skip
    setup_logging(log_level, log_format=log_format)
    from bpfproxy.dispatcher import Dispatcher
    from bpfproxy.errors import SteeringError
    from bpfproxy.loader import check_environment, compile_check

    try:
        if check:
            compile_check()
            click.echo("bpfproxy: ok: the sk_lookup program compiles and loads on this machine")
            return 0
        check_environment()  # first: "run it with sudo" is what a user must fix first
        data, config = read_config(config_path, (listen_port,))
        check_listen_port(listen_port, config)
        limit = fit_connection_limit(max_connections)
        with contextlib.ExitStack() as stack:
            if workers > 1:
                options = worker_options(
                    {**ctx.params, "max_connections": math.ceil(limit / workers)}, skip={"bind"}
                )
                plan = BpfPlan(bind, listen_port, options, workers)
                stack.callback(plan.close)
                plan.steer(config)
                supervisor = Supervisor(
                    plan, config_path, data, config, workers, metrics_address,
                    validate=self_loop_check(config_path, (listen_port,)),
                )  # fmt: skip
                trio.run(supervisor.run)
                return 0
            listener = open_listener(bind, listen_port)
            stack.callback(listener.close)
            dispatcher = Dispatcher(listener)
            stack.callback(dispatcher.close)  # runs before listener.close: unsteer first
            metrics, address = metrics_for(metrics_address)
            frontend = SteeredListener(listener, dispatcher, listen_port, metrics)
            frontend.steer(config)
            trio.run(
                lambda: run_service(
                    config_path, data, config, frontend, drain_timeout=drain_timeout,
                    max_connections=limit, use_splice=splice, metrics=metrics,
                    metrics_address=address, listen_ports=frozenset({listen_port}),
                )
            )  # fmt: skip
    except SteeringError as exc:
        raise StartupError(str(exc)) from None
    return 0


def _run_worker(
    worker: str,
    listener_fd: int | None,
    config_path: Path,
    drain_timeout: float,
    max_connections: int | None,
    splice: bool,
    log_level: str,
    log_format: str,
    listen_port: int,
) -> int:
    if listener_fd is None:
        raise click.UsageError("--worker needs --worker-listener")
    link = SupervisorLink.join(worker)
    setup_logging(log_level, prefix=link.log_prefix, log_format=log_format)
    config = link.initial_config()
    listener = socket.socket(fileno=listener_fd)
    listener.setblocking(False)
    limit = fit_connection_limit(max_connections)
    metrics, _ = metrics_for(None, worker=True)
    trio.run(
        lambda: run_service(
            config_path, b"", config, SharedListener(listener), drain_timeout=drain_timeout,
            max_connections=limit, use_splice=splice, supervisor=link, metrics=metrics,
            listen_ports=frozenset({listen_port}),
        )
    )  # fmt: skip
    return 0


class BpfPlan:
    """bpfproxy's workers: one listener each, all in one SO_REUSEPORT group on
    the -p port; the supervisor owns the BPF program, its maps and link, and
    keeps a copy of every listener so it can steer to a live one when a worker
    dies (the sockmap entry of a closed socket disappears)."""

    name = "bpfproxy"

    def __init__(self, bind: str | None, listen_port: int, options: list[str], count: int):
        from bpfproxy.dispatcher import Dispatcher

        self._bind, self._port, self._options, self._count = bind, listen_port, options, count
        self._listeners: list[socket.socket | None] = []
        self.dispatcher: Dispatcher | None = None
        try:
            # Bound once WITHOUT SO_REUSEPORT first: fails if anyone listens on the
            # port, where our reuseport group would otherwise join theirs.
            open_listener(bind, listen_port, listen=False).close()
            self._listeners = [self._open() for _ in range(count)]
            self.dispatcher = Dispatcher(self._listeners[0])  # type: ignore[arg-type]
            self._steered: int | None = 0  # whose listener is in the sockmap
        except BaseException:
            self.close()
            raise

    def _open(self) -> socket.socket:
        return open_listener(self._bind, self._port, reuse_port=True)

    def steer(self, config: Config) -> None:
        assert self.dispatcher is not None
        self.dispatcher.set_ports(config.ports)

    def check(self, old: Config, new: Config) -> None:
        check_listen_port(self._port, new)

    def worker_argv(self, index: int, control_fd: int) -> tuple[list[str], tuple[int, ...]]:
        listener = self._listeners[index]
        if listener is None:  # its worker died: a fresh member of the group
            listener = self._listeners[index] = self._open()
        fd = listener.fileno()
        options = [*self._options, "--port", str(self._port), "--worker-listener", str(fd)]
        return worker_argv("bpfproxy", control_fd, index, self._count, options), (fd,)

    def worker_started(self, index: int) -> None:
        if self._steered is None:  # every worker had died: steer to this new one
            self._steer_to(index)

    def worker_died(self, index: int) -> None:
        dead = self._listeners[index]
        self._listeners[index] = None
        if self._steered == index:
            live = next((i for i, sock in enumerate(self._listeners) if sock is not None), None)
            self._steered = None
            if live is not None:
                self._steer_to(live)
        if dead is not None:
            dead.close()  # leaves the group; connections queued on it are reset

    def _steer_to(self, index: int) -> None:
        from bpfproxy.errors import SteeringError

        sock = self._listeners[index]
        if sock is None or self.dispatcher is None:
            return
        try:
            self.dispatcher.set_listener(sock)
        except SteeringError as exc:
            log.error("cannot steer to worker %d's listener: %s", index, exc)
            return
        self._steered = index

    def before_workers(self, old: Config, new: Config) -> None:
        self._set_ports(old.ports & new.ports)  # withdraw removed ports first

    def after_workers(self, old: Config, new: Config) -> None:
        self._set_ports(new.ports)  # then steer added ones, routes in place

    def restore(self, config: Config) -> None:
        self._set_ports(config.ports)  # a rejected reload: steer exactly the running ports

    def _set_ports(self, ports: frozenset[int]) -> None:
        from bpfproxy.errors import SteeringError

        assert self.dispatcher is not None
        try:
            self.dispatcher.set_ports(ports)
        except SteeringError as exc:
            raise StartupError(f"port map: {exc}") from None

    def stopping(self) -> None:
        for sock in self._listeners:
            if sock is not None:
                sock.close()  # the workers' copies close as they stop; then ports refuse

    def close(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.close()
            self.dispatcher = None
        self.stopping()


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("bpfproxy", command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
