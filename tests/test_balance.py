"""Target choice without sockets."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from tcpproxy.balance import Balancer
from tcpproxy.config import Strategy, Target

pytestmark = pytest.mark.engine  # the connection engine's: CI runs them interpreted too

T = [Target("10.0.0.1", 80), Target("10.0.0.2", 80), Target("10.0.0.3", 80)]


def test_round_robin_rotates_and_fails_over_in_config_order() -> None:
    b = Balancer(T)
    assert b.order() == [T[0], T[1], T[2]]
    assert b.order() == [T[1], T[2], T[0]]
    assert b.order() == [T[2], T[0], T[1]]
    assert b.order() == [T[0], T[1], T[2]]


def test_random_is_uniform_and_tries_every_target() -> None:
    b = Balancer(T, Strategy.RANDOM, rng=random.Random(7))
    firsts = Counter()
    for _ in range(3000):
        order = b.order()
        assert sorted(order, key=T.index) == T
        firsts[order[0]] += 1
    assert all(900 < n < 1100 for n in firsts.values()), firsts


def test_least_connections_prefers_fewest_and_breaks_ties_by_rotation() -> None:
    active = Counter({T[0]: 5, T[1]: 1, T[2]: 1})
    b = Balancer(T, Strategy.LEAST_CONNECTIONS, active=active)
    assert b.order() == [T[1], T[2], T[0]]
    assert b.order() == [T[1], T[2], T[0]]  # start 1: T1, T2 tie, then T0
    assert b.order() == [T[2], T[1], T[0]]  # start 2: rotation puts T2 first among ties
    active[T[0]] = 0
    assert b.order()[0] == T[0]


@pytest.mark.parametrize("strategy", list(Strategy))
def test_down_targets_go_last_but_stay_in_the_order(strategy: Strategy) -> None:
    b = Balancer(T, strategy, rng=random.Random(1))
    for _ in range(10):
        order = b.order(is_down=lambda t: t == T[0])
        assert order[-1] == T[0]
        assert sorted(order, key=T.index) == T
    everything_down = b.order(is_down=lambda t: True)
    assert sorted(everything_down, key=T.index) == T  # fail open: still tried


def test_needs_targets() -> None:
    with pytest.raises(ValueError):
        Balancer([])
