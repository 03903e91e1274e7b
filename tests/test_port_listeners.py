"""tcpproxy's frontend in-process: which listeners it hands the engine, and when it
takes each back and closes it (a reload, a stop), with no task per port."""

from __future__ import annotations

import socket

import trio

from tcpproxy.config import AppConfig, Config, Target
from tcpproxy.port_listeners import PortListeners
from tests.helpers import free_ports


class Host:
    """Stands for the engine: what it was handed, in order; open sockets only."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int | None]] = []
        self.accepting: dict[int, socket.socket] = {}

    def add_listener(self, sock: socket.socket, port: int | None) -> None:
        assert sock.fileno() >= 0, "handed a closed socket"
        assert port is not None
        self.events.append(("add", port))
        self.accepting[port] = sock

    def remove_listener(self, sock: socket.socket) -> None:
        assert sock.fileno() >= 0, "closed before the engine let go of it"
        (port,) = [p for p, s in self.accepting.items() if s is sock]
        self.events.append(("remove", port))
        del self.accepting[port]


def config(*ports: int) -> Config:
    return Config(apps=tuple(AppConfig(f"a{p}", (p,), (Target("127.0.0.1", 9),)) for p in ports))


async def test_a_reload_hands_new_ports_over_and_takes_removed_ones_back_at_once() -> None:
    p1, p2, p3 = free_ports(3)
    frontend, host = PortListeners("127.0.0.1"), Host()
    frontend.open(config(p1, p2))
    async with trio.open_nursery() as nursery:
        await nursery.start(frontend.serve, host)
        assert host.events == [("add", p1), ("add", p2)]
        kept, dropped = host.accepting[p1], host.accepting[p2]
        frontend.update(config(p1, p2), config(p1, p3))  # no checkpoint needed: done now
        assert host.events[2:] == [("add", p3), ("remove", p2)]
        assert dropped.fileno() == -1  # closed once the engine let go of it
        assert host.accepting[p1] is kept  # a port that stays keeps its socket: no gap
        assert frontend.sockets() == host.accepting
        nursery.cancel_scope.cancel()
    assert sorted(host.events[4:]) == [("remove", p1), ("remove", p3)]
    assert host.accepting == {} and frontend.sockets() == {}
    assert kept.fileno() == -1


async def test_a_stop_as_serving_starts_still_takes_back_and_closes_every_listener() -> None:
    (p1,) = free_ports(1)
    frontend, host = PortListeners("127.0.0.1"), Host()
    frontend.open(config(p1))
    (sock,) = frontend.sockets().values()
    with trio.CancelScope() as scope:
        scope.cancel()
        await frontend.serve(host)
    assert host.events == [("add", p1), ("remove", p1)]
    assert sock.fileno() == -1
