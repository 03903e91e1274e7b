"""What both binaries' command lines share: options, logging, error exits."""

from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from tcpproxy import __version__, build_info
from tcpproxy.config import Config, ConfigError, no_isolation, parse_config
from tcpproxy.errors import ProxyError, StartupError
from tcpproxy.heap import return_large_blocks
from tcpproxy.httpserver import MAX_CLIENTS
from tcpproxy.privileges import CAP_NET_BIND_SERVICE, unprivileged_port_start
from tcpproxy.selfloop import reject_self_loops
from tcpproxy.service import DEFAULT_DRAIN_TIMEOUT, DEFAULT_MAX_CONNECTIONS, validate_config
from tcpproxy.sources import ConfigSource
from tcpproxy.sources.file import read_config_bytes

if TYPE_CHECKING:
    from tcpproxy.notify import Notifier
    from tcpproxy.port_listeners import PortListeners
    from tcpproxy.upgrade import Handover

__all__ = [
    "EXIT_USAGE",
    "ConfigLocation",
    "FleetOptions",
    "access_path",
    "common_options",
    "fail",
    "fit_connection_limit",
    "open_config",
    "open_notifier",
    "read_config",
    "reload_check",
    "run_cli",
    "serving_code",
    "setup_logging",
    "start_listening",
    "version_option",
]

EXIT_USAGE = 2  # our error: bad config, bad option, cannot start as asked
DEFAULT_WORKERS = 1  # see README: measured on 2 cores
ENGINE_ENV = "TCPPROXY_ENGINE"  # --engine's variable, for both binaries (see _engine_gone)
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"

F = TypeVar("F", bound=Callable[..., Any])


class ConfigLocation(click.ParamType):
    """--config: a file's path (a Path), or an etcd:// or etcds:// URL (kept as text)."""

    name = "PATH|etcd://HOST:PORT[,...]/PREFIX"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, Path):
            return value
        from tcpproxy.fleet.url import is_etcd_url

        return str(value) if is_etcd_url(str(value)) else Path(value)


@dataclass(frozen=True)
class FleetOptions:
    """The options that matter only with --config etcd://... (see `fleet_options`)."""

    etcd_cache: Path | None = None
    node_id: str | None = None
    etcd_cacert: str | None = None
    etcd_cert: str | None = None
    etcd_key: str | None = None
    etcd_user: str | None = None
    etcd_password_env: str | None = None


def fleet_options() -> list[Callable[[F], F]]:
    """The options of --config etcd://...; the same in both binaries."""
    path = click.Path(dir_okay=False, readable=False)
    return [
        click.option(
            "--etcd-cache", type=click.Path(path_type=Path, dir_okay=False, readable=False),
            metavar="FILE", default=None,
            help="With etcd: the last good config, written (atomically) on each change; "
            "started from when etcd is unreachable at start.  [default: none]",
        ),
        click.option(
            "--node-id", metavar="ID", default=None,
            help="With etcd: this node's name in PREFIX/nodes/.  [default: the host name]",
        ),
        click.option("--etcd-cacert", type=path, metavar="FILE", default=None,
                     help="With etcds://: the CA certificate that signed etcd's."),
        click.option("--etcd-cert", type=path, metavar="FILE", default=None,
                     help="With etcds://: this client's certificate."),
        click.option("--etcd-key", type=path, metavar="FILE", default=None,
                     help="With etcds://: this client's private key."),
        click.option(
            "--etcd-user", metavar="NAME", default=None,
            help="With etcd: authenticate as NAME; the password is read from the "
            "environment (ETCD_PASSWORD, or --etcd-password-env), never from argv.",
        ),
        click.option(
            "--etcd-password-env", metavar="VAR", default=None,
            help="The environment variable holding --etcd-user's password.  "
            "[default: ETCD_PASSWORD]",
        ),
    ]  # fmt: skip


def common_options(prog: str) -> Callable[[F], F]:
    """The options both binaries take, with the same names, defaults and help."""

    def decorate(func: F) -> F:
        for option in reversed(
            [
                click.option(
                    "-c", "--config", "config_path",
                    # Not checked as readable: click uses access(2), which ignores
                    # capabilities and would refuse a worker the config its
                    # CAP_DAC_READ_SEARCH reads. Opening the file says it (same exit status).
                    type=ConfigLocation(), metavar="PATH|URL",
                    default=Path("config.json"), show_default=True,
                    envvar=f"{prog.upper()}_CONFIG", show_envvar=True,
                    help="Config file, watched for changes (also reloaded on SIGHUP); or "
                    "etcd://HOST:PORT[,HOST:PORT...]/PREFIX (etcds:// for TLS): follow "
                    "the apps kept in etcd under PREFIX.",
                ),
                click.option(
                    "--drain-timeout", type=click.FloatRange(min=0), metavar="SECONDS",
                    default=DEFAULT_DRAIN_TIMEOUT, show_default=True,
                    help="On SIGTERM/SIGINT, how long open connections may take to finish.",
                ),
                click.option(
                    "--max-connections", type=click.IntRange(min=1), metavar="N",
                    default=None,
                    help="Open connections at once, all apps together; at the limit new "
                    f"ones wait in the listen queue.  [default: {DEFAULT_MAX_CONNECTIONS}, "
                    "or fewer if the descriptor limit allows fewer (6 per connection)]",
                ),
                click.option(
                    "--metrics", "metrics_address", metavar="ADDRESS:PORT", default=None,
                    help="Serve Prometheus /metrics and /status (JSON; /status.txt for "
                    "people) there, e.g. 127.0.0.1:9100.  [default: off]",
                ),
                click.option(
                    "--pid-file", type=click.Path(path_type=Path, dir_okay=False, readable=False),
                    metavar="PATH", default=None,
                    help="Write this process's pid there at start (rewritten by the "
                    "new process after an upgrade, SIGUSR2); removed at a clean exit.  "
                    "[default: none]",
                ),
                click.option(
                    "--workers", type=click.IntRange(min=1), metavar="N",
                    default=DEFAULT_WORKERS, show_default=True,
                    help="Worker processes (a Python event loop uses one core). With more "
                    "than one, a supervisor validates the config once and feeds them; "
                    "limits are divided among them.",
                ),
                click.option(
                    "--worker", "worker", metavar="FD:INDEX:COUNT", default=None,
                    hidden=True, help="Internal: run as a worker of a supervisor.",
                ),
                click.option(
                    "--user", metavar="NAME", default=None,
                    envvar=f"{prog.upper()}_USER", show_envvar=True,
                    help="Started as root: after setup, serve as this user (and its "
                    "group, no other groups) with no capability; 'root' keeps uid 0 but "
                    "drops every capability. Not root: only your own name is accepted. "
                    "Not given and nobody cannot read the config or the code: nobody "
                    "keeping CAP_DAC_READ_SEARCH or, where that is not permitted (a "
                    "container), root with no capability; with a warning.  "
                    "[default: nobody when started as root]",
                ),
                click.option(
                    "--splice/--no-splice", default=True, show_default=True,
                    help="Relay with zero-copy splice(2), or copy through a buffer.",
                ),
                click.option(
                    "--engine", metavar="epoll", default=None, envvar=ENGINE_ENV,
                    hidden=True, expose_value=False, callback=_engine_gone,
                    help="Deprecated, ignored: epoll is the only engine.",
                ),
                click.option(
                    "--log-level", type=click.Choice(LOG_LEVELS), default="info",
                    show_default=True,
                    help="'debug' logs one line per connection.",
                ),
                click.option(
                    "--log-format", type=click.Choice(["text", "json"]), default="text",
                    show_default=True,
                    help="'json': one object a line, for log pipelines.",
                ),
                *fleet_options(),
                version_option(prog),
            ]
        ):  # fmt: skip
            func = option(func)
        return func

    return decorate


def version_option(prog: str) -> Callable[[F], F]:
    """--version: the version and which build runs ("compiled (mypyc X.Y)", "interpreted")."""
    message = f"%(prog)s, version %(version)s, {build_info.describe()}"
    return click.version_option(__version__, prog_name=prog, message=message)


def _engine_gone(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """--engine (or TCPPROXY_ENGINE): the trio engine is gone, and the option with it.

    `epoll`, what an old unit file may still pass, is accepted with one warning, so
    a proxy upgraded in place still starts; anything else is our error (exit 2).
    The variable is taken out of the environment, so the workers and an upgrade's
    new process do not warn again.
    """
    if value is None:
        return
    from_env = ctx.get_parameter_source("engine") is click.core.ParameterSource.ENVIRONMENT
    where = f"{ENGINE_ENV}={value}" if from_env else f"--engine {value}"
    os.environ.pop(ENGINE_ENV, None)
    if value == "epoll":
        click.echo(f"{ctx.info_name}: warning: {where} is deprecated and ignored: "
                   f"epoll is the only engine; remove it", err=True)  # fmt: skip
        return
    if value == "trio":
        raise StartupError(f"{where}: the trio engine was removed (the epoll engine serves "
                           "every connection); remove it")  # fmt: skip
    raise StartupError(f"{where}: unknown engine (the option is deprecated: remove it)")


FDS_PER_CONNECTION = 6  # two sockets and two pipes (two descriptors each)
# for listeners, the BPF maps, logs, probes; and the --metrics server's clients at most
# (httpserver.MAX_CLIENTS), so scrapes never take a descriptor the data plane counts on
FDS_RESERVED = 64 + MAX_CLIENTS + 1


def fit_connection_limit(wanted: int | None) -> int:
    """Raise the soft descriptor limit to the hard one; return the connection limit.

    The usual soft limit of 1024 would cap a proxy at ~160 connections; as
    HAProxy does, take what the administrator allows. With no `wanted`
    limit, use DEFAULT_MAX_CONNECTIONS or what the descriptors allow if
    fewer. An explicit limit the descriptors cannot back is kept (running out
    of descriptors is survived: accepting pauses) but warned about.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    fits = max(1, (soft - FDS_RESERVED) // FDS_PER_CONNECTION)
    if wanted is None:
        return min(DEFAULT_MAX_CONNECTIONS, fits)
    if wanted > fits:
        logging.getLogger("tcpproxy").warning(
            "max-connections %d needs more descriptors than the limit of %d allows (%d per "
            "connection, so about %d connections); raise it with ulimit -n or LimitNOFILE=",
            wanted, soft, FDS_PER_CONNECTION, fits,
        )  # fmt: skip
    return wanted


def setup_logging(level: str, prefix: str = "", log_format: str = "text") -> None:
    """Log lines to stderr; `prefix` names a worker process ("[w1] ").

    `json`: one JSON object a line (python-json-logger) with time, level,
    message, and the structured fields a line carries (`conn`, `worker`).
    Then, in a process that is not a worker, the line about the build, if
    there is one to say (interpreted, stale: `build_info.announce`).
    """
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        static = {"worker": prefix.strip(" []")} if prefix else {}
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level"},
                static_fields=static,
            )
        )
    else:
        fmt = LOG_FORMAT.replace("%(message)s", prefix.replace("%", "%%") + "%(message)s")
        handler.setFormatter(logging.Formatter(fmt))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # its debug lines are per poll
    for chatty in ("httpx", "httpcore"):  # a line per etcd request (fleet mode)
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if not prefix:  # a worker runs the build its supervisor announced
        build_info.announce(logging.getLogger("tcpproxy"))


def ignore_sigusr2() -> None:
    """SIGUSR2's default action ends the process, and the pid file names it before it
    serves: ignored until run_service's signal receiver takes it over (an upgrade
    asked for that early is lost, not the process)."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def open_notifier(handover: Handover | None) -> Notifier:
    """The sd_notify channel, connected now: call it before dropping privileges (a
    notify socket only root may write still hears from the process after the drop).
    A process started by an upgrade uses the socket the old one handed over."""
    from tcpproxy.notify import Notifier

    notifier = Notifier(handed=handover.notify if handover is not None else None)
    notifier.connect()
    return notifier


def low_port_capability(ports: Collection[int], metrics_address: str | None) -> tuple[int, ...]:
    """CAP_NET_BIND_SERVICE if one of ``ports`` at start (or the metrics port) is
    below the unprivileged ones: kept after the drop, so that reloads, workers (a
    restarted worker's listener) and an upgrade's new process can bind such ports
    too; else nothing. A config that adds the first low port later cannot bind it
    (the reload is rejected and says so)."""
    from tcpproxy.metrics import parse_address

    low = set(ports)
    if metrics_address is not None:
        low.add(parse_address(metrics_address)[1])
    needed = min(low, default=65536) < unprivileged_port_start()
    return (CAP_NET_BIND_SERVICE,) if needed else ()


def fail(prog: str, message: str) -> int:
    """Print an error of ours (no traceback) and return the exit code for it."""
    click.echo(f"{prog}: error: {message}", err=True)
    return EXIT_USAGE


def read_config(
    path: Path,
    listen_ports: Collection[int] = (),
    bind: str | None = None,
    max_connections: int | None = None,
) -> tuple[bytes, Config]:
    """Read and validate the config file once: its bytes (to compare on reload) and model.

    `listen_ports`: ports served besides the apps' (bpfproxy's -p), which no
    target may loop back to (as every reload checks: `reload_check`).
    `bind`: the --bind address (None: every address), where those ports listen.
    `max_connections`: the whole proxy's limit, which apps' limits are judged
    by (None: not judged).
    """
    data = read_config_bytes(path)
    config = parse_config(data, str(path))
    validate_config(
        config, source=str(path), listen_ports=listen_ports, bind=bind,
        max_connections=max_connections,
    )  # fmt: skip
    return data, config


def open_config(
    location: Path | str,
    fleet: FleetOptions,
    listen_ports: Collection[int] = (),
    bind: str | None = None,
    max_connections: int | None = None,
    handover: Handover | None = None,
) -> tuple[Path | ConfigSource, bytes, Config]:
    """The config to start with, and where it goes on coming from: `read_config` for a
    file; for an etcd URL, the prefix read once (or the --etcd-cache file when etcd
    is unreachable) and the `EtcdSource` that follows it (tcpproxy.fleet.source).

    A file is judged whole (a bad app, a self-loop: exit 2). etcd's apps are judged
    one by one: an app that loops into another app's port or claims a port of
    `listen_ports` (bpfproxy's -p) is rejected and the rest served. `handover`: a
    process an upgrade started: the config the old one served (CONFIG_FD) keeps
    the apps' last good versions, and etcd is waited for UPGRADE_LOAD_TIMEOUT at most.

    Raises ConfigError (exit 2) for a bad URL or option, or no config to start from.
    """
    if isinstance(location, Path):
        if fleet.etcd_cache is not None:
            raise ConfigError(str(location), ["--etcd-cache is for --config etcd://... only"])
        data, config = read_config(location, listen_ports, bind, max_connections)
        return location, data, config
    import trio

    from tcpproxy.fleet.publish import Publisher
    from tcpproxy.fleet.source import EtcdSource
    from tcpproxy.fleet.url import parse_etcd_url
    from tcpproxy.upgrade import CONFIG_FD, UPGRADE_LOAD_TIMEOUT, read_config_fd

    try:
        target = parse_etcd_url(
            location, cacert=fleet.etcd_cacert, cert=fleet.etcd_cert, key=fleet.etcd_key,
            user=fleet.etcd_user, password_env=fleet.etcd_password_env,
        )  # fmt: skip
    except ValueError as exc:
        raise ConfigError("--config", [str(exc)]) from None
    node = fleet.node_id or socket.gethostname()
    if not node or "/" in node:
        raise ConfigError("--node-id", [f"must be a non-empty name without '/', got {node!r}"])
    handed, timeout = None, None
    if handover is not None:
        timeout = UPGRADE_LOAD_TIMEOUT
        fd = handover.fds.pop(CONFIG_FD, None)
        if fd is not None:
            handed = read_config_fd(fd)
    source = EtcdSource(
        target, cache=fleet.etcd_cache, publish=Publisher(target, node),
        check=partial(_check_app, location, listen_ports, bind),
        cross=partial(_check_against, location, listen_ports, bind),
        handed=handed, load_timeout=timeout,
    )  # fmt: skip
    contents = trio.run(source.load)
    assert contents.config is not None
    if max_connections is not None:  # the warnings of `validate_config`; its checks ran
        for problem in no_isolation(contents.config, max_connections):
            logging.getLogger("tcpproxy").warning("%s: %s", source.name, problem)
    return source, contents.data, contents.config


def _check_app(
    location: str, listen_ports: Collection[int], bind: str | None, config: Config
) -> None:
    """A fleet app alone (a one-app Config): no self-loop, and none of `listen_ports`
    (bpfproxy's -p, served by the proxy itself) among its ports."""
    validate_config(config, source=location, listen_ports=listen_ports, bind=bind)
    problems = [
        f"Ports[{app.ports.index(port)}]: port {port} is this proxy's own listening port "
        "(-p): choose another port for the app, or another -p for the node"
        for app in config.apps
        for port in sorted(set(app.ports) & set(listen_ports))
    ]
    if problems:
        raise ConfigError(location, problems)


def _check_against(
    location: str,
    listen_ports: Collection[int],
    bind: str | None,
    config: Config,
    others: Mapping[int, str],
) -> None:
    """A fleet app (a one-app Config) against the ports of the other apps served here."""
    reject_self_loops(config, listen_ports, location, bind, others)


def start_listening(
    frontend: PortListeners,
    source: Path | ConfigSource,
    data: bytes,
    config: Config,
    inherited: dict[int, socket.socket] | None,
) -> tuple[bytes, Config]:
    """Bind the ports of `config` (tcpproxy, one process). A file: all or none (a
    StartupError: exit 2). etcd: app by app; the apps that cannot be bound are set
    aside as a reload would (tcpproxy.fleet.source rule 6) and the node starts with
    the rest. Returns the config started with."""
    from tcpproxy.fleet.source import EtcdSource

    if not isinstance(source, EtcdSource):
        frontend.open(config, inherited)
        return data, config
    for _ in range(len(config.apps) + 1):  # each round sets one app aside at least
        failed = frontend.open_each(config, inherited)
        inherited = None
        if not failed:
            return data, config
        contents = source.set_aside(failed)
        assert contents.config is not None
        data, config = contents.data, contents.config
        frontend.keep_only(config.ports)
    raise StartupError(
        "the ports of the apps cannot be bound: " + "; ".join(map(str, failed.values()))
    )


def access_path(location: Path | str, fleet: FleetOptions) -> Path:
    """What `check_access` checks a serving user can read: the config file; with etcd,
    the TLS file read at each connect, the most private first (none: /dev/null)."""
    if isinstance(location, Path):
        return location
    for path in (fleet.etcd_key, fleet.etcd_cert, fleet.etcd_cacert):
        if path is not None:
            return Path(path)
    return Path(os.devnull)


def reload_check(
    path: Path | str,
    listen_ports: Collection[int] = (),
    bind: str | None = None,
    *,
    max_connections: int | None,
) -> Callable[[Config], None]:
    """The reload-time twin of `read_config`'s checks, for a Reloader."""
    return partial(
        validate_config, source=str(path), listen_ports=listen_ports, bind=bind,
        max_connections=max_connections,
    )  # fmt: skip


def serving_code() -> list[Path]:
    """The package directories a serving process still imports from (after a drop of
    privileges, their user must be able to read them)."""
    import trio

    import tcpproxy

    return [Path(tcpproxy.__file__).parent, Path(trio.__file__).parent]


def worker_options(ctx_params: dict[str, Any], skip: set[str]) -> list[str]:
    """The command-line options a worker gets: the supervisor's own, minus `skip`."""
    flags = {
        "config_path": "--config",
        "drain_timeout": "--drain-timeout",
        "max_connections": "--max-connections",
        "log_level": "--log-level",
        "log_format": "--log-format",
        "bind": "--bind",
    }
    options: list[str] = []
    for key, flag in flags.items():
        value = ctx_params.get(key)
        if key in skip or value is None:
            continue
        options += [flag, str(value)]
    options.append("--splice" if ctx_params.get("splice", True) else "--no-splice")
    return options


def metrics_for(address: str | None, *, worker: bool = False) -> tuple[Any, Any]:
    """(metrics, (host, port) or None) for a single process or a worker.

    A worker counts only when its supervisor set PROMETHEUS_MULTIPROC_DIR
    (it serves the sum); a single process counts when it serves.
    """
    import os

    from tcpproxy.metrics import Metrics, parse_address

    if worker:
        return (Metrics() if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else None), None
    if address is None:
        return None, None
    return Metrics(), parse_address(address)


def run_cli(prog: str, command: click.Command, argv: Sequence[str] | None) -> int:
    """Run a click command in-process and return its exit code (tests call this)."""
    return_large_blocks()  # a config's copies go back to the system once freed
    try:
        result = command.main(args=argv, prog_name=prog, standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt):
        return 130
    except (ConfigError, ProxyError) as exc:
        return fail(prog, str(exc))
    except BaseExceptionGroup as group:  # trio's: a StartupError raised inside the service
        ours, rest = group.split((ConfigError, ProxyError))
        if ours is None or rest is not None:
            raise
        return fail(prog, "; ".join(str(exc) for exc in _leaves(ours)))
    return result if isinstance(result, int) else 0


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    """The exceptions a (nested) exception group holds."""
    return [
        leaf
        for exc in group.exceptions
        for leaf in (_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    ]
