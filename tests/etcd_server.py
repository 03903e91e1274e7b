"""Real etcd processes for tests: one member or a cluster on 127.0.0.1, always cleaned up.

Never a mock: each member is Debian's ``etcd`` binary with its own temporary data
directory and free loopback ports. `EtcdCluster.close` kills every member and removes
the directories, and each member dies with the test process (PR_SET_PDEATHSIG) if
pytest itself is killed. Synchronous on purpose: fixtures and subprocess-driven tests
use it outside trio.
"""

from __future__ import annotations

import base64
import ctypes
import json
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import free_ports

__all__ = ["EtcdCluster", "EtcdMember", "EtcdTLS", "etcd_unavailable_reason", "make_tls"]

START_ATTEMPTS = 3  # fresh ports each time: another test may take a free port first
START_TIMEOUT = 20.0  # seconds for a member (or a cluster's quorum) to report healthy
STOP_TIMEOUT = 10.0  # seconds for SIGTERM before SIGKILL
# Faster elections than etcd's 100 ms / 1 s defaults: a stopped leader is replaced in
# well under a second, so failover tests stay short; fine on loopback.
HEARTBEAT_MS, ELECTION_MS = 50, 500
_PR_SET_PDEATHSIG = 1


def etcd_unavailable_reason() -> str | None:
    """Why real-etcd tests cannot run here, or None when they can."""
    missing = [tool for tool in ("etcd", "etcdctl") if shutil.which(tool) is None]
    if missing:
        return (
            f"{' and '.join(missing)} not installed "
            "(make setup installs Debian's etcd-server and etcd-client)"
        )
    return None


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _child_setup() -> Callable[[], None] | None:
    """PR_SET_PDEATHSIG for a member started from the main thread, else nothing: the
    signal fires when the forking *thread* exits, and a worker thread (trio.to_thread)
    ends long before the test, which would kill a member it restarted."""
    return _die_with_parent if threading.current_thread() is threading.main_thread() else None


@dataclass(frozen=True)
class EtcdTLS:
    """Files of a throwaway CA, the members' certificate for 127.0.0.1, and a client's.

    The client certificate has no CommonName: with client-cert-auth and RBAC auth on,
    etcd's JSON gateway refuses one that has a CN (the CN would be an identity it
    cannot pass on), and the user comes from the password login instead.
    """

    cacert: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path


def make_tls(directory: Path, hosts: tuple[str, ...] = ()) -> EtcdTLS:
    """A CA, a member certificate (server and client use: the gateway connects to its
    own member with it; IP 127.0.0.1 and ``hosts``) and a client certificate (openssl)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = directory / "ca.key", directory / "ca.pem"
    extra_ips = "".join(f",IP:{host}" for host in hosts)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    run = [["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "1",
            "-subj", "/CN=test etcd CA"]]  # fmt: skip
    files = []
    for name, subject, extensions in (
        ("node", "/CN=127.0.0.1", f"subjectAltName=IP:127.0.0.1,DNS:localhost{extra_ips}\n"
         "extendedKeyUsage=serverAuth,clientAuth\n"),
        ("client", "/O=tcpproxy test client", "extendedKeyUsage=clientAuth\n"),
    ):  # fmt: skip
        key, csr, cert = (directory / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
        ext = directory / f"{name}.cnf"
        ext.write_text(extensions + "basicConstraints=CA:FALSE\n")
        run += [
            ["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", subject],
            ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key,
             "-CAcreateserial", "-out", cert, "-days", "1", "-extfile", ext],
        ]  # fmt: skip
        files += [cert, key]
    for argv in run:
        subprocess.run([str(a) for a in argv], check=True, capture_output=True, timeout=30)
    return EtcdTLS(ca, *files)


@dataclass
class EtcdMember:
    """One etcd process; `stop` and `start` keep its data directory (a restart, not a new one)."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    initial_cluster: str
    tls: EtcdTLS | None = None
    extra_args: tuple[str, ...] = ()
    extra_hosts: tuple[str, ...] = ()  # more addresses to serve clients on (same port)
    process: subprocess.Popen[bytes] | None = None
    paused: bool = False  # SIGSTOPped: its sockets accept and then nothing answers
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self) -> None:
        """Start the process (no wait; see `EtcdCluster.wait_healthy`)."""
        assert self.process is None, f"{self.name} already running"
        extra_urls = [f"{self.scheme}://{host}:{self.client_port}" for host in self.extra_hosts]
        argv = [
            "etcd", "--name", self.name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", ",".join([self.client_url, *extra_urls]),
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-cluster", self.initial_cluster, "--initial-cluster-state", "new",
            "--initial-cluster-token", f"tcpproxy-test-{self.data_dir.parent.name}",
            "--heartbeat-interval", str(HEARTBEAT_MS), "--election-timeout", str(ELECTION_MS),
            "--logger", "zap", "--log-level", "warn", "--log-outputs", "stderr",
            *self.extra_args,
        ]  # fmt: skip
        if self.tls:
            argv += ["--cert-file", str(self.tls.cert), "--key-file", str(self.tls.key)]
            argv += ["--trusted-ca-file", str(self.tls.cacert), "--client-cert-auth"]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, preexec_fn=_child_setup()
            )

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the process (SIGKILL if it does not exit in time); the data stays."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        if self.paused:  # a stopped process handles no SIGTERM
            sig, self.paused = signal.SIGKILL, False
        process.send_signal(sig)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)

    def pause(self) -> None:
        """SIGSTOP: a hung member, whose connections stay open and silent (no FIN, no
        RST) as with a wedged process or a partition. `stop` and `close` still kill it."""
        assert self.process is not None, f"{self.name} not running"
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT a paused member."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
        self.paused = False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def answering(self) -> bool:
        """Running and not paused: a test's own requests go to such a member."""
        return self.running and not self.paused


class EtcdCluster:
    """One etcd cluster of ``size`` members on loopback. Use as a context manager."""

    def __init__(
        self,
        size: int = 1,
        *,
        tls: bool = False,
        extra_args: tuple[str, ...] = (),
        extra_hosts: tuple[str, ...] = (),
    ) -> None:
        """``extra_hosts``: addresses besides 127.0.0.1 to serve clients on (each member
        on its own port), such as a veth address a test gave the host; they must exist
        before the cluster starts. ``extra_args`` go to every etcd command line."""
        self.size, self.extra_args, self.extra_hosts = size, extra_args, extra_hosts
        self.root = Path(tempfile.mkdtemp(prefix="tcpproxy-etcd-"))
        self.tls = make_tls(self.root / "tls", extra_hosts) if tls else None
        self.members: list[EtcdMember] = []
        self._layout(0)

    def _layout(self, attempt: int) -> None:
        """Members on fresh free ports, with fresh data directories."""
        ports = free_ports(2 * self.size)
        names = [f"m{i}" for i in range(self.size)]
        initial = ",".join(f"{n}=http://127.0.0.1:{ports[2 * i + 1]}" for i, n in enumerate(names))
        self.members = [
            EtcdMember(
                n, ports[2 * i], ports[2 * i + 1], self.root / f"{n}.{attempt}", initial,
                self.tls, self.extra_args, self.extra_hosts,
            )
            for i, n in enumerate(names)
        ]  # fmt: skip

    def __enter__(self) -> EtcdCluster:
        try:
            for attempt in range(START_ATTEMPTS):
                if attempt:
                    self._layout(attempt)
                for member in self.members:
                    member.start()
                try:
                    self.wait_healthy()
                    return self
                except RuntimeError:
                    logs = " ".join(self._tail(m) for m in self.members)
                    for member in self.members:
                        member.stop(signal.SIGKILL)
                    if "address already in use" not in logs or attempt == START_ATTEMPTS - 1:
                        raise
        except BaseException:
            self.close()
            raise
        raise AssertionError("unreachable")

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill every member and remove every directory (idempotent)."""
        for member in self.members:
            member.stop(signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    # -- addresses -----------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def url(self, prefix: str = "/tcpproxy", host: str = "127.0.0.1") -> str:
        """The ``etcd://`` (or ``etcds://``) URL of every member with ``prefix``, reached
        at ``host`` (127.0.0.1 or one of ``extra_hosts``)."""
        scheme = "etcds" if self.tls else "etcd"
        endpoints = ",".join(f"{host}:{m.client_port}" for m in self.members)
        return f"{scheme}://{endpoints}{prefix}"

    # -- control -------------------------------------------------------------------

    def stop(self, index: int) -> None:
        self.members[index].stop()

    def pause(self, index: int) -> None:
        """Hang a member (SIGSTOP); the test's own requests then go to the others.

        Waits until the others answer a linearizable read: if the paused member led,
        they elect another (no graceful hand-over as with SIGTERM), and a write made
        before that would be forwarded to the paused leader and time out.
        """
        self.members[index].pause()
        self.wait_healthy([m for m in self.members if m.answering])

    def resume(self, index: int) -> None:
        """SIGCONT a paused member and wait until it answers again: a leader that hung
        still thinks it leads until the others' higher term reaches it, and a write
        sent to it before then times out. (`close` kills a paused member either way.)"""
        self.members[index].resume()
        self.wait_healthy([self.members[index]])

    def start(self, index: int) -> None:
        """Restart a stopped member with its data; waits until it is healthy."""
        self.members[index].start()
        self.wait_healthy([self.members[index]])

    def wait_healthy(self, members: list[EtcdMember] | None = None) -> None:
        """Wait until each member answers a linearizable read (it has a leader and quorum)."""
        deadline = time.monotonic() + START_TIMEOUT
        for member in members or [m for m in self.members if m.process is not None]:
            while True:
                if not member.running:
                    raise RuntimeError(f"etcd {member.name} exited; log: {self._tail(member)}")
                try:
                    self.request("/v3/kv/range", {"key": _b64(b"health")}, member, timeout=1)
                    break
                except (OSError, RuntimeError):
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"etcd {member.name} not healthy in {START_TIMEOUT} s; "
                            f"log: {self._tail(member)}"
                        ) from None
                    time.sleep(0.05)

    def request(
        self, path: str, body: dict, member: EtcdMember | None = None, timeout: float = 5
    ) -> dict:
        """One gateway request (for test set-up), to ``member`` or the first answering one.

        Without ``member``, a request that times out is sent to the next answering
        member: a member just resumed from SIGSTOP answers reads before a write through
        it gets through (its stale term can start an election first). Set-up writes
        are idempotent (the same value again), so sending one twice is harmless.
        """
        members = [member] if member else [m for m in self.members if m.answering]
        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=str(self.tls.cacert))
            context.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        for i, candidate in enumerate(members):
            req = urllib.request.Request(
                candidate.client_url + path,
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(req, timeout=timeout, context=context) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                raise RuntimeError(f"etcd {path}: HTTP {exc.code}: {exc.read()[:300]!r}") from None
            except (TimeoutError, urllib.error.URLError):
                if i == len(members) - 1:
                    raise
        raise AssertionError("no etcd member to ask")  # members is never empty

    def put(self, key: str, value: bytes | str) -> int:
        """Set a key; returns the revision."""
        data = value.encode() if isinstance(value, str) else value
        reply = self.request("/v3/kv/put", {"key": _b64(key.encode()), "value": _b64(data)})
        return int(reply["header"]["revision"])

    def delete(self, key: str) -> int:
        reply = self.request("/v3/kv/deleterange", {"key": _b64(key.encode())})
        return int(reply["header"]["revision"])

    def revision(self) -> int:
        """The cluster's current revision."""
        reply = self.request("/v3/kv/range", {"key": _b64(b"\0")})
        return int(reply["header"]["revision"])

    def compact(self, revision: int | None = None) -> int:
        """Compact history up to ``revision`` (default: the current one); returns it."""
        revision = revision or self.revision()
        self.request("/v3/kv/compaction", {"revision": revision, "physical": True})
        return revision

    def etcdctl(self, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        """Run Debian's etcdctl (API v3) against the cluster (its members not paused)."""
        urls = [m.client_url for m in self.members if not m.paused]
        argv = ["etcdctl", f"--endpoints={','.join(urls)}"]
        if self.tls:
            argv += [f"--cacert={self.tls.cacert}", f"--cert={self.tls.client_cert}"]
            argv += [f"--key={self.tls.client_key}"]
        return subprocess.run(
            [*argv, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
            env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"},
        )

    def _tail(self, member: EtcdMember) -> str:
        try:
            return member.log.read_text(errors="replace")[-1500:]
        except OSError:
            return "(no log)"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
