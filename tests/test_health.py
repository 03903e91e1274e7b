"""Health transitions as data: no sockets, no sleeping (callers pass the time)."""

from __future__ import annotations

import pytest

from tcpproxy.config import Target
from tcpproxy.health import BACKOFF_INITIAL, BACKOFF_MAX, HealthBook

pytestmark = pytest.mark.engine  # the connection engine's: CI runs them interpreted too

T = Target("10.0.0.1", 80)
U = Target("10.0.0.2", 80)


def test_targets_start_up() -> None:
    book = HealthBook()
    assert not book.is_down(T)
    assert book.connect_ok(T) is None  # no change, nothing to log


def test_a_failed_connect_takes_a_target_down_once() -> None:
    book = HealthBook()
    message = book.connect_failed(T, "connection refused", now=100.0)
    assert message and "down: connection refused" in message
    assert book.is_down(T) and not book.is_down(U)
    assert book.get(T).retry_at == 100.0 + BACKOFF_INITIAL
    assert book.connect_failed(T, "connection refused", now=100.5) is None  # already down


def test_failed_probes_back_off_exponentially_up_to_the_cap() -> None:
    book = HealthBook()
    book.connect_failed(T, "refused", now=0.0)
    backoffs = []
    for i in range(10):
        assert book.probe_result(T, False, now=float(i), why="refused") is None
        backoffs.append(book.get(T).backoff)
    assert backoffs[:3] == [2.0, 4.0, 8.0]
    assert max(backoffs) == BACKOFF_MAX
    assert book.get(T).retry_at == 9.0 + BACKOFF_MAX


def test_a_successful_probe_or_connect_brings_it_back_and_resets() -> None:
    book = HealthBook()
    book.connect_failed(T, "refused", now=0.0)
    book.probe_result(T, False, now=1.0)
    message = book.probe_result(T, True, now=3.0)
    assert message and "up again" in message
    assert not book.is_down(T) and book.get(T).backoff == BACKOFF_INITIAL
    book.connect_failed(T, "refused", now=4.0)
    assert book.connect_ok(T)  # a client got through: up at once
    assert not book.is_down(T)


def test_active_checks_use_rise_and_fall() -> None:
    book = HealthBook()
    for i in range(2):
        assert book.probe_result(T, False, now=i, why="timeout", rise=2, fall=3) is None
    assert not book.is_down(T)
    assert book.probe_result(T, False, now=3, why="timeout", rise=2, fall=3)
    assert book.is_down(T)
    assert book.probe_result(T, True, now=4, rise=2, fall=3) is None  # one is not enough
    assert book.probe_result(T, False, now=5, rise=2, fall=3) is None  # streak broken
    assert book.probe_result(T, True, now=6, rise=2, fall=3) is None
    assert book.probe_result(T, True, now=7, rise=2, fall=3)
    assert not book.is_down(T)


def test_forgetting_targets_that_left_the_config() -> None:
    book = HealthBook()
    book.connect_failed(T, "refused", now=0.0)
    book.connect_failed(U, "refused", now=0.0)
    book.retain({U})
    assert book.down_targets() == [U]
