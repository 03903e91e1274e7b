"""Apps sharing a port by name, as real clients see them: curl and openssl to nginx.

Each site is its own nginx (Debian's, one process, its files in the test's tmp
dir) with a throwaway self-signed certificate for its name, answering every
request with that name, over HTTPS on one port and plain HTTP on another. The
proxy puts the sites' HTTPS ports behind one front port and their HTTP ports
behind another. A curl that verifies the certificate against the name it asked
for proves the TLS bytes went through intact to the right site; `openssl
s_client` shows the certificate's subject. Both binaries, through the
`deployment` fixture (bpfproxy and every client inside a network namespace).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests import deploy
from tests.conftest import REQUIRE_BPF
from tests.deploy import Deployment
from tests.helpers import TIMEOUT, app, wait_until

pytestmark = pytest.mark.slow
deployment = deploy.deployment  # the fixture: each test using it runs on both binaries

TOOLS = ("nginx", "curl", "openssl")
CLIENT_TIMEOUT = 10.0  # seconds a curl or openssl run may take, connect to exit
INSPECT = 2.0  # seconds: the ports' InspectTimeout (a silent client's wait for the default)


@pytest.fixture(autouse=True)
def _tools() -> None:
    """Skip where a tool is missing; fail instead under TCPPROXY_REQUIRE_BPF=1 (CI as
    root), where `make setup` installs them."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not missing:
        return
    reason = f"needs {', '.join(missing)} (make setup installs them)"
    if REQUIRE_BPF:
        pytest.fail(f"{reason}, and TCPPROXY_REQUIRE_BPF=1", pytrace=False)
    pytest.skip(reason)


def _run(d: Deployment, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run a client where the proxy's clients live (the test's namespace for bpfproxy)."""
    return subprocess.run(
        d.popen_argv(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=CLIENT_TIMEOUT + 5,
    )  # fmt: skip


class Site:
    """One nginx answering `name` over HTTPS (its own certificate) and plain HTTP."""

    def __init__(self, d: Deployment, name: str, home: Path) -> None:
        self.name = name
        self.tls_port, self.plain_port = d.ports(2)
        home.mkdir()
        self.cert, key = home / "cert.pem", home / "key.pem"
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        subprocess.run(
            ["openssl", "req", "-x509", *ec, "-days", "1", "-subj", f"/CN={name}",
             "-addext", f"subjectAltName=DNS:{name}", "-keyout", str(key), "-out", str(self.cert)],
            check=True, capture_output=True, timeout=CLIENT_TIMEOUT,
        )  # fmt: skip
        temp = " ".join(
            f"{kind}_temp_path {home / kind};" for kind in ("client_body", "proxy", "fastcgi")
        )
        conf = home / "nginx.conf"
        conf.write_text(
            # One process, no master: killing it leaves nothing behind. As root it would
            # switch to nobody, who cannot read pytest's mode-700 tmp dirs.
            f"""daemon off; master_process off; pid {home / "nginx.pid"};
            {"user root;" if os.geteuid() == 0 else ""}
            error_log {home / "error.log"} warn;
            events {{ worker_connections 64; }}
            http {{
                access_log off; {temp} default_type text/plain;
                server {{
                    listen 127.0.0.1:{self.tls_port} ssl; server_name {name};
                    ssl_certificate {self.cert}; ssl_certificate_key {key};
                    return 200 "{name}\\n";
                }}
                server {{ listen 127.0.0.1:{self.plain_port}; return 200 "{name}\\n"; }}
            }}
            """
        )
        self.log = home / "error.log"
        self.proc = subprocess.Popen(
            d.popen_argv(["nginx", "-p", str(home), "-e", str(self.log), "-c", str(conf)]),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        if not wait_until(lambda: self._up(d)):
            self.close()
            raise AssertionError(f"nginx for {name} did not start: {self.log.read_text()}")

    def _up(self, d: Deployment) -> bool:
        if self.proc.poll() is not None:
            return True  # exited: reported by the caller's check below
        try:
            for port in (self.tls_port, self.plain_port):
                d.connect(port).close()
        except OSError:
            return False
        return True

    def target(self, tls: bool) -> str:
        return f"127.0.0.1:{self.tls_port if tls else self.plain_port}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)


@pytest.fixture
def sites(deployment: Deployment, tmp_path: Path) -> Iterator[dict[str, Site]]:
    """a.test, b.test and fallback.test, each its own nginx; stopped after the test."""
    made: dict[str, Site] = {}
    try:
        for name in ("a.test", "b.test", "fallback.test"):
            made[name] = Site(deployment, name, tmp_path / name)
        for site in made.values():
            assert site.proc.poll() is None, site.log.read_text()
        yield made
    finally:
        for site in made.values():
            site.close()


def _start(d: Deployment, sites: dict[str, Site], *, default: bool) -> tuple[int, int]:
    """a.test and b.test by name, and (if `default`) fallback.test for the rest, on one
    HTTPS front port and one HTTP front port; those ports."""
    https, http = d.ports(2)
    apps = []
    for name, site in sites.items():
        names = {"Hostnames": [name]} if name != "fallback.test" else {}
        if names or default:
            apps.append(app(f"{name}/tls", [https], [site.target(True)], **names))
            apps.append(app(f"{name}/plain", [http], [site.target(False)], **names))
    d.start(apps, Defaults={"InspectTimeout": INSPECT})
    return https, http


def _curl(d: Deployment, url: str, *options: str) -> subprocess.CompletedProcess[str]:
    limit = ["--max-time", str(CLIENT_TIMEOUT)]
    return _run(d, ["curl", "--silent", "--show-error", *limit, *options, url])


def _https(d: Deployment, name: str, port: int, cert: Path, *options: str) -> str:
    """curl to https://NAME:PORT/ checking the certificate against `cert` and NAME."""
    resolve = f"{name}:{port}:127.0.0.1"
    done = _curl(
        d, f"https://{name}:{port}/", "--resolve", resolve, "--cacert", str(cert), *options
    )
    assert done.returncode == 0, (name, done.stderr)
    return done.stdout


def _subjects(d: Deployment, port: int, *servername: str) -> list[str]:
    """The subject lines of the certificates `openssl s_client` is shown."""
    done = _run(d, ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *servername])
    return [line for line in done.stdout.splitlines() if line.startswith("subject=")]


def _subject(d: Deployment, port: int, *servername: str) -> str:
    (line,) = _subjects(d, port, *servername)
    return line


def test_each_name_reaches_its_site_over_https_and_http(
    deployment: Deployment, sites: dict[str, Site]
) -> None:
    https, http = _start(deployment, sites, default=False)
    for name in ("a.test", "b.test"):
        cert = sites[name].cert
        assert _https(deployment, name, https, cert) == f"{name}\n"
        assert _https(deployment, name, https, cert, "--tlsv1.2", "--tls-max", "1.2") == f"{name}\n"
        assert _subject(deployment, https, "-servername", name) == f"subject=CN = {name}"
        done = _curl(deployment, f"http://127.0.0.1:{http}/", "-H", f"Host: {name.upper()}")
        assert (done.returncode, done.stdout) == (0, f"{name}\n"), done.stderr
        url = f"http://{name}:{http}/"
        done = _curl(deployment, url, "--resolve", f"{name}:{http}:127.0.0.1")
        assert (done.returncode, done.stdout) == (0, f"{name}\n"), done.stderr
    # No default: an unknown name, or none, is reset; no site answers.
    resolve = f"other.test:{https}:127.0.0.1"
    done = _curl(deployment, f"https://other.test:{https}/", "--resolve", resolve, "-k")
    assert done.returncode != 0 and done.stdout == ""
    assert _subjects(deployment, https, "-servername", "other.test") == []
    assert _subjects(deployment, https, "-noservername") == []
    done = _curl(deployment, f"http://127.0.0.1:{http}/", "-H", "Host: other.test")
    assert done.returncode != 0 and done.stdout == ""


def test_a_default_takes_other_names_and_no_name(
    deployment: Deployment, sites: dict[str, Site]
) -> None:
    https, http = _start(deployment, sites, default=True)
    fallback = sites["fallback.test"]
    assert _https(deployment, "a.test", https, sites["a.test"].cert) == "a.test\n"
    assert _subject(deployment, https, "-servername", "b.test") == "subject=CN = b.test"
    assert _subject(deployment, https, "-servername", "other.test") == "subject=CN = fallback.test"
    assert _subject(deployment, https, "-noservername") == "subject=CN = fallback.test"
    # curl checks the certificate against the name it asked for: fallback.test's own
    # name, unknown to the proxy, reaches the default and verifies.
    assert _https(deployment, "fallback.test", https, fallback.cert) == "fallback.test\n"
    done = _curl(deployment, f"http://127.0.0.1:{http}/", "-H", "Host: other.test:8080")
    assert (done.returncode, done.stdout) == (0, "fallback.test\n"), done.stderr
    done = _curl(deployment, f"http://127.0.0.1:{http}/", "-H", "Host: b.test", "--http1.0")
    assert (done.returncode, done.stdout) == (0, "b.test\n"), done.stderr
