"""The status page in a real browser: Debian's headless chromium, driven by selenium.

chromedriver is named explicitly (CHROMEDRIVER), so Selenium Manager never
downloads anything; tests skip where Debian's chromium-driver is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.deploy import Deployment
from tests.helpers import TIMEOUT, Backend, app, free_ports, write_config

CHROMEDRIVER = "/usr/bin/chromedriver"  # Debian's chromium-driver
CHROMIUM = "/usr/bin/chromium"
PAGE_WAIT = 15.0  # seconds for the page to show a change (polls every 2 s; probes ~1 s)
HOSTILE = "<img src=x onerror=alert(1)>"
FAST_CHECKS = {"Interval": 0.5, "Timeout": 0.5, "Rise": 1, "Fall": 1}  # down within ~1 s

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (os.path.exists(CHROMEDRIVER) and os.path.exists(CHROMIUM)),
        reason="needs Debian's chromium and chromium-driver",
    ),
]


@pytest.fixture
def browser(tmp_path) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,900", f"--user-data-dir={tmp_path / 'chromium'}"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(check: Callable[[], object], what: str, timeout: float = PAGE_WAIT) -> object:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if result := check():
                return result
        if time.monotonic() > deadline:
            raise AssertionError(f"the page did not show {what} within {timeout}s")
        time.sleep(0.2)


def app_names(driver) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('tbody.app')].map(b => b.dataset.app)"
    )


def target_state(driver, address: str) -> str:
    return driver.execute_script(
        "const r = [...document.querySelectorAll('tr.target')]"
        ".find(r => r.dataset.target === arguments[0]);"
        "return r ? r.querySelector('.state').textContent : null",
        address,
    )


def severe(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def check_page(driver, url: str, d: Deployment, apps: list[dict], stop: Backend) -> None:
    """The page shows apps, ports and targets, no console error; a target's state follows
    its backend down and up with no reload; the hostile name is text and runs nothing."""
    driver.get(url)
    wait_for(lambda: set(app_names(driver)) == {a["Name"] for a in apps}, "every app")
    assert severe(driver) == []
    assert driver.execute_script("return window.__xss === undefined")
    # the hostile name is the text of its cell, not an element
    assert driver.find_elements("css selector", "tbody.app img") == []
    names = driver.execute_script(
        "return [...document.querySelectorAll('tbody.app .name')].map(n => n.textContent)"
    )
    assert HOSTILE in names
    ports = driver.execute_script(
        "return [...document.querySelectorAll('tr.app td:nth-child(2)')].map(n => n.textContent)"
    )
    assert str(apps[0]["Ports"][0]) in ports
    assert wait_for(lambda: target_state(driver, stop.address) == "up", "the target up")
    navigations = "return performance.getEntriesByType('navigation').length"
    loads = driver.execute_script(navigations)
    port = stop.port
    stop.stop_accepting()
    wait_for(lambda: target_state(driver, stop.address) == "down", "the target down")
    d.backends.append(Backend(stop.name, port=port, make_socket=d.make_socket))
    wait_for(lambda: target_state(driver, stop.address) == "up", "the target up again")
    assert (
        driver.execute_script("return performance.getEntriesByType('navigation').length") == loads
    )
    assert driver.execute_script("return document.getElementById('contact').className") == (
        "contact ok"
    )
    assert severe(driver) == []


def demo_apps(d: Deployment, ports: list[int]) -> tuple[list[dict], Backend]:
    a, b, c = d.backend("a"), d.backend("b"), d.backend("c")
    apps = [
        app("web", [ports[0]], [a.address, b.address], HealthCheck=FAST_CHECKS),
        app(HOSTILE, [ports[1]], [c.address], HealthCheck=FAST_CHECKS),
    ]
    return apps, b


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_page_follows_targets_and_reloads(tmp_path, browser, workers) -> None:
    d = Deployment("tcpproxy", tmp_path / "c.json", None)
    try:
        *ports, extra, metrics = free_ports(4)
        apps, stop = demo_apps(d, ports)
        proxy = d.start(apps, "--metrics", f"127.0.0.1:{metrics}", "--workers", workers)
        check_page(browser, f"http://127.0.0.1:{metrics}/", d, apps, stop)
        # a reload that adds an app shows it; a rejected one shows its message
        mark = proxy.mark()
        added = [*apps, app("added", [extra], [stop.address])]
        write_config(d.config_path, added)
        proxy.wait_for(r"reload.*applied", start=mark)
        wait_for(lambda: "added" in app_names(browser), "the added app")
        mark = proxy.mark()
        d.config_path.write_text('{"Apps": [}')
        proxy.wait_for(r"rejected", start=mark)
        reload = wait_for(
            lambda: (t := browser.find_element("id", "reload").text) and "rejected" in t and t,
            "the rejected reload",
        )
        assert "line 1" in str(reload) or "rejected" in str(reload)
        assert "added" in app_names(browser)  # the config in force is still shown
        assert severe(browser) == []
    finally:
        d.close()


@pytest.mark.slow
def test_the_page_says_when_it_lost_contact(tmp_path, browser) -> None:
    d = Deployment("tcpproxy", tmp_path / "c.json", None)
    try:
        ports, metrics = free_ports(2), free_ports(1)[0]
        apps, _ = demo_apps(d, ports)
        proxy = d.start(apps, "--metrics", f"127.0.0.1:{metrics}")
        browser.get(f"http://127.0.0.1:{metrics}/")
        wait_for(lambda: app_names(browser), "the apps")
        proxy.stop()
        wait_for(
            lambda: "lost contact" in browser.find_element("id", "contact").text, "lost contact"
        )
    finally:
        d.close()


class Forwarder:
    """Loopback here to an address inside a network namespace, for the browser."""

    def __init__(self, make_socket: Callable[[int], socket.socket], port: int) -> None:
        self._make, self._port = make_socket, port
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            inside = self._make(socket.AF_INET)
            try:
                inside.settimeout(TIMEOUT)
                inside.connect(("127.0.0.1", self._port))
                inside.settimeout(None)
            except OSError:
                client.close()
                inside.close()
                continue
            for a, b in ((client, inside), (inside, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                b.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop = True
        self._sock.close()


@pytest.mark.slow
@pytest.mark.bpf
def test_the_page_of_bpfproxy_in_a_namespace(tmp_path, browser, netns) -> None:
    d = Deployment("bpfproxy", tmp_path / "c.json", netns)
    forwarder = None
    try:
        apps, stop = demo_apps(d, [7001, 7002])
        d.start(apps, "--metrics", "127.0.0.1:9100")
        forwarder = Forwarder(netns.socket, 9100)
        check_page(browser, f"http://127.0.0.1:{forwarder.port}/", d, apps, stop)
        steered = browser.execute_script(
            "return [...document.querySelectorAll('#facts div')].map(x => x.textContent)"
        )
        assert any(x.startswith("steered ports") for x in steered), steered
    finally:
        if forwarder is not None:
            forwarder.close()
        d.close()


def test_status_json_is_what_the_page_reads(tmp_path) -> None:
    """The fields the page shows are in /status (a check without a browser)."""
    import urllib.request

    d = Deployment("tcpproxy", tmp_path / "c.json", None)
    try:
        ports, metrics = free_ports(2), free_ports(1)[0]
        apps, _ = demo_apps(d, ports)
        d.start(apps, "--metrics", f"127.0.0.1:{metrics}")
        url = f"http://127.0.0.1:{metrics}/status?history=1"
        with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
            status = json.load(r)
        assert {"version", "uptime", "build", "config", "last_reload"} <= status.keys()
        entry = status["apps"][0]
        assert {"rates", "ended", "history", "ports", "active"} <= entry.keys()
        assert {"since", "last_error", "total", "connect", "state"} <= entry["targets"][0].keys()
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/", timeout=TIMEOUT) as r:
            csp = r.headers["Content-Security-Policy"]
            page = r.read().decode()
        assert "default-src 'self'" in csp and "unsafe-inline" not in csp
        assert "<script>" not in page and "style=" not in page and "http" not in page.lower()
    finally:
        d.close()


MANY_APPS = 1000  # the scale: 1,000 apps x 20 ports, on bpfproxy's one socket
MANY_WAIT = 60.0  # seconds for the first 1,000-app render (every chart, on a busy 2-core box)


@pytest.mark.slow
@pytest.mark.bpf
def test_a_thousand_apps_start_folded_and_filter_and_unfold(tmp_path, browser, netns) -> None:
    """1,000 apps x 20 ports (bpfproxy in a namespace: one listening socket for them all):
    the apps start folded, the filter box narrows them to one, which unfolds with its
    targets and charts, asked for that app alone; no console error."""
    d = Deployment("bpfproxy", tmp_path / "c.json", netns)
    forwarder = None
    try:
        apps = [
            app(f"app-{i:04d}", list(range(10000 + 20 * i, 10020 + 20 * i)),
                [f"127.0.0.1:{5000 + i % 50}", f"127.0.0.2:{5000 + i % 50}"])
            for i in range(MANY_APPS)
        ]  # fmt: skip
        d.start(apps, "--metrics", "127.0.0.1:9100")
        forwarder = Forwarder(netns.socket, 9100)
        browser.get(f"http://127.0.0.1:{forwarder.port}/")
        shown = lambda: browser.find_element("id", "shown").text  # noqa: E731
        wait_for(lambda: shown() == f"{MANY_APPS} of {MANY_APPS} apps", "every app", MANY_WAIT)
        folded = "return document.querySelectorAll('tbody.app.collapsed').length"
        assert browser.execute_script(folded) == MANY_APPS
        one = "app-0777"
        browser.find_element("id", "filter").send_keys(one)
        wait_for(lambda: shown() == f"1 of {MANY_APPS} apps", "one app left by the filter")
        visible = browser.execute_script(
            "return [...document.querySelectorAll('tbody.app:not(.hidden)')]"
            ".map(b => b.dataset.app)"
        )
        assert visible == [one]
        body = browser.find_element("css selector", f"tbody.app[data-app='{one}']")
        assert not any(r.is_displayed() for r in body.find_elements("css selector", "tr.target"))
        body.find_element("css selector", "tr.app").click()
        targets = body.find_elements("css selector", "tr.target")
        assert [r.is_displayed() for r in targets] == [True, True]
        asked = (
            "return performance.getEntriesByType('resource').map(e => e.name)"
            ".filter(n => n.includes('history_of='))"
        )
        wait_for(
            lambda: any(u.endswith(f"history_of={one}") for u in browser.execute_script(asked)),
            "the charts asked for the open app alone",
        )
        assert severe(browser) == []
    finally:
        if forwarder is not None:
            forwarder.close()
        d.close()
