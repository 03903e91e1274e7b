"""Connecting to targets: which failures are the target's, and per-address attempts."""

from __future__ import annotations

import trio

from tcpproxy.config import Target
from tcpproxy.connect import open_target
from tcpproxy.resolve import Resolver
from tests.netns import NetNS


def _disable_ipv6() -> None:
    # /proc/sys/net is per namespace, picked by the opening thread's namespace.
    with open("/proc/sys/net/ipv6/conf/all/disable_ipv6", "w") as knob:
        knob.write("1")


def test_address_not_available_fails_over_and_blames_the_target() -> None:
    """IPv6 disabled: connecting to [::1] gives EADDRNOTAVAIL, a failure of that
    target (fail over, mark down), not a shortage of ours that resets the client."""
    with NetNS("tcpproxy-test") as ns:
        ns.call(_disable_ipv6)
        listener = ns.socket()
        with listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            port = listener.getsockname()[1]
            v6, v4 = Target("::1", port), Target("127.0.0.1", port)
            failed: list[tuple[Target, str]] = []

            async def main() -> tuple[Target, object]:
                sock, target, failures = await open_target(
                    "app", [v6, v4], Resolver(), 2.0,
                    on_failure=lambda t, why: failed.append((t, why)),
                )  # fmt: skip
                sock.close()
                return target, failures

            # sockets are made by the thread running trio: inside the namespace
            target, failures = ns.call(trio.run, main)
    assert target == v4
    assert failures == [(v6, "cannot assign requested address")]
    assert failed == [(v6, "cannot assign requested address")]
