"""The /status snapshot: one layout, whether a process counts or a supervisor sums."""

from __future__ import annotations

from types import SimpleNamespace

from tcpproxy.config import parse_config
from tcpproxy.status import Counts, Loaded, as_text, counts_from_samples, snapshot

CONFIG = parse_config(
    b'{"Apps": [{"Name": "A", "Ports": [7001, 7002], "Targets": ["127.0.0.1:9", "127.0.0.1:10"]},'
    b' {"Name": "B", "Ports": [7003], "Targets": ["127.0.0.1:10"]}]}',
    "test",
)
LOADED = Loaded("c.json", "abc123", 0.0, "none")


def sample(name: str, value: float, **labels: str) -> SimpleNamespace:
    return SimpleNamespace(name=name, value=value, labels=labels)


def test_workers_metrics_are_summed() -> None:
    counts = counts_from_samples([
        sample("tcpproxy_connections_active", 2.0, app="A", target="127.0.0.1:9"),
        sample("tcpproxy_connections_active", 1.0, app="A", target="127.0.0.1:9"),
        sample("tcpproxy_connections_active", 4.0, app="B", target="127.0.0.1:10"),
        sample("tcpproxy_target_up", 1.0, target="127.0.0.1:9"),
        sample("tcpproxy_target_up", 0.0, target="127.0.0.1:10"),  # one worker marked it down
        sample("tcpproxy_target_up", 1.0, target="127.0.0.1:10"),
        sample("tcpproxy_connections_accepted_total", 9.0, app="A"),
    ])  # fmt: skip
    assert counts == Counts(
        total=7,
        by_app={"A": 3, "B": 4},
        by_target={("A", "127.0.0.1:9"): 3, ("B", "127.0.0.1:10"): 4},
        down={"127.0.0.1:10": ""},
    )


def test_one_layout_for_a_process_and_a_supervisor() -> None:
    counts = Counts(
        total=3,
        by_app={"A": 3},
        by_target={("A", "127.0.0.1:9"): 2, ("A", "127.0.0.1:10"): 1},
        down={"127.0.0.1:10": "connection refused"},
    )
    single = snapshot("tcpproxy", 42, LOADED, CONFIG, counts, build="interpreted")
    summed = snapshot("tcpproxy", 42, LOADED, CONFIG, counts, workers=2, build="interpreted")
    assert "workers" not in single and summed.pop("workers") == 2
    assert single == summed
    assert single["build"] == "interpreted"
    assert single["active_connections"] == 3
    assert single["config"]["hash"] == "abc123"
    a, b = single["apps"]
    assert (a["name"], a["ports"], a["active"]) == ("A", "7001-7002", 3)
    assert a["targets"] == [
        {"address": "127.0.0.1:9", "state": "up", "reason": "", "active": 2},
        {"address": "127.0.0.1:10", "state": "down", "reason": "connection refused", "active": 1},
    ]
    assert b["targets"] == [
        {"address": "127.0.0.1:10", "state": "down", "reason": "connection refused", "active": 0}
    ]


def test_the_text_says_the_same() -> None:
    counts = Counts(total=1, by_app={"A": 1}, by_target={("A", "127.0.0.1:9"): 1})
    build = "compiled (mypyc 2.4.1)"
    text = as_text(snapshot("tcpproxy", 42, LOADED, CONFIG, counts, workers=2, build=build))
    assert text.splitlines() == [
        "tcpproxy: 2 process(es), 1 active connections, compiled (mypyc 2.4.1) build",
        "config abc123 loaded "
        + snapshot("x", 1, LOADED, CONFIG, counts)["config"]["loaded"]
        + ", last reload: none",
        "app A: ports 7001-7002, 1 active",
        "  127.0.0.1:9: up, 1 active",
        "  127.0.0.1:10: up, 0 active",
        "app B: ports 7003, 0 active",
        "  127.0.0.1:10: up, 0 active",
    ]


def test_apps_a_fleet_refused_are_listed_with_key_revision_and_reason() -> None:
    config = parse_config(b'{"Apps": [{"Name": "A", "Ports": [1], "Targets": ["a:1"]}]}')
    loaded = Loaded("etcd://127.0.0.1:2379/fleet", "abc", 0.0, "none")
    why = {"key": "/fleet/apps/B", "revision": 7, "reason": "Ports[0]: must be ..."}
    status = snapshot("tcpproxy", 1, loaded, config, Counts(), rejected={"B": why})
    assert status["rejected"] == {"B": why}
    assert "rejected B: /fleet/apps/B at revision 7: Ports[0]: must be ..." in as_text(status)
    assert "rejected" not in snapshot("tcpproxy", 1, loaded, config, Counts())


def test_history_gives_rates_ends_since_and_connect_times_and_forgets_removed_apps() -> None:
    from tcpproxy.status import RING_SLOTS, History, Totals

    history = History(now=0.0, wall=1000.0)
    inf = float("inf")
    for step in range(RING_SLOTS + 5):  # more than the ring holds: it wraps
        now = step * 5.0
        totals = Totals(
            accepted={"A": 10.0 * step, "B": 1.0},
            up={"A": 100.0 * step},
            down={"A": 300.0 * step},
            ended={"A": {"done": 10.0 * step}},
            by_target={("A", "127.0.0.1:9"): 10.0 * step},
            buckets={"127.0.0.1:9": {0.001: 9.0 * step, 0.1: 10.0 * step, inf: 10.0 * step}},
        )  # fmt: skip
        history.record(totals, now, CONFIG)
    counts = Counts(total=1, by_app={"A": 1}, by_target={("A", "127.0.0.1:9"): 1},
                    down={"127.0.0.1:10": "connection refused"})  # fmt: skip
    status = snapshot("tcpproxy", 1, LOADED, CONFIG, counts, history=history,
                      with_history=True, wall=2000.0)  # fmt: skip
    a, b = status["apps"]
    assert a["rates"] == {"conn": 2.0, "up": 20.0, "down": 60.0}  # per second over 10 s
    assert a["ended"] == {"done": 650}
    assert len(a["history"]["conn"]) == RING_SLOTS - 1 and set(a["history"]["conn"]) == {2.0}
    assert set(a["history"]["bytes"]) == {80.0}
    first = a["targets"][0]
    assert first["total"] == 651 and first["connect"]["median"] == 0.001
    assert first["connect"]["p99"] == 0.1
    down = b["targets"][0]
    assert down["state"] == "down" and down["last_error"] == "connection refused"
    assert down["since"] == status_time(2000.0)
    assert b["rates"]["conn"] == 0.0
    # the charts of the apps asked only (the page's open apps); the rest as before
    only_b = snapshot("tcpproxy", 1, LOADED, CONFIG, counts, history=history,
                      with_history=frozenset({"B"}), wall=2001.0)  # fmt: skip
    assert "history" not in only_b["apps"][0] and "history" in only_b["apps"][1]
    assert only_b["apps"][0]["rates"] == a["rates"] and only_b["apps"][0]["ended"] == a["ended"]
    # a new sample moves the rates worked out once per sample
    history.record(Totals(accepted={"A": 10.0 * (RING_SLOTS + 5) + 100.0}), 5.0 * (RING_SLOTS + 5),
                   CONFIG)  # fmt: skip
    later = snapshot("tcpproxy", 1, LOADED, CONFIG, counts, history=history, wall=2002.0)
    assert later["apps"][0]["rates"]["conn"] > a["rates"]["conn"]
    smaller = parse_config(
        b'{"Apps": [{"Name": "A", "Ports": [7001], "Targets": ["127.0.0.1:9"]}]}'
    )
    history.record(Totals(), 400.0, smaller)
    assert "B" not in history._apps and "127.0.0.1:10" not in history._targets


def status_time(wall: float) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(wall))


def test_an_entry_is_the_same_object_until_its_inputs_move() -> None:
    """What lets the page's render write only the apps that changed (statusserver.py)."""
    from tcpproxy.status import STILL_SAMPLES, History, Totals

    history = History(now=0.0, wall=1000.0)
    history.record(Totals(accepted={"A": 1.0}), 0.0, CONFIG)
    quiet = Counts(total=0, by_app={}, by_target={}, down={})

    def apps(counts: Counts, charts: object = False) -> list[dict]:
        return snapshot("tcpproxy", 1, LOADED, CONFIG, counts, history=history,
                        with_history=charts, wall=1001.0)["apps"]  # fmt: skip

    a, b = apps(quiet)
    assert [x is y for x, y in zip(apps(quiet), (a, b), strict=True)] == [True, True]
    busy = Counts(total=1, by_app={"B": 1}, by_target={("B", "127.0.0.1:10"): 1}, down={})
    a2, b2 = apps(busy)
    assert a2 is a and b2 is not b and b2["active"] == 1 and b2["targets"][0]["total"] == 1
    a3, b3 = apps(busy, frozenset({"A"}))  # A's charts asked: A written again, with them
    assert "history" in a3 and a3 is not a and b3 is b2
    down = Counts(total=1, by_app={"B": 1}, by_target={("B", "127.0.0.1:10"): 1},
                  down={"127.0.0.1:10": "refused"})  # fmt: skip
    a4, b4 = apps(down)  # a target's state moved: every entry anew (A shares 127.0.0.1:10)
    assert a4 is not a and a4["targets"][1]["state"] == "down" and b4["targets"][0]["reason"]
    assert apps(down)[1] is b4
    history.record(Totals(accepted={"A": 11.0}), 5.0, CONFIG)  # a new sample: anew
    a5, _ = apps(down)
    assert a5 is not a4 and a5["rates"]["conn"] == 2.0
    assert apps(down, True)[0]["history"]["conn"] == [2.0]
    # totals that stay put: the entry stays across samples (its rates cannot move) ...
    for step in range(2, 2 + STILL_SAMPLES):
        history.record(Totals(accepted={"A": 11.0}), 5.0 * step, CONFIG)
    still = apps(down)[0]
    assert still["rates"]["conn"] == 0.0
    history.record(Totals(accepted={"A": 11.0}), 5.0 * (2 + STILL_SAMPLES), CONFIG)
    assert apps(down)[0] is still
    # ... but its charts, once asked, follow each sample; and a connection moves it
    assert apps(down, True)[0] is not still
    history.record(Totals(accepted={"A": 12.0}), 5.0 * (3 + STILL_SAMPLES), CONFIG)
    assert apps(down)[0]["rates"]["conn"] > 0.0


async def test_a_target_down_is_seen_at_each_sample_not_only_at_a_poll(autojump_clock) -> None:
    """ "Down since" is when the sampler first saw it (within RING_STEP), even if
    nobody polled /status for a while."""
    import time

    import trio

    from tcpproxy.status import RING_STEP, History
    from tcpproxy.statusserver import keep_history

    history = History(now=0.0, wall=time.time())
    down: dict[str, str] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(keep_history, history, list, lambda: CONFIG, lambda: dict(down))
        await trio.sleep(RING_STEP * 1.5)
        down["127.0.0.1:10"] = "connection refused"
        went_down = time.time()
        await trio.sleep(RING_STEP)  # one sample sees it; no poll in between
        nursery.cancel_scope.cancel()
    counts = Counts(total=0, by_app={}, by_target={}, down=dict(down))
    status = snapshot("tcpproxy", 1, LOADED, CONFIG, counts, history=history,
                      with_history=False, wall=went_down + 3600)  # fmt: skip
    target = status["apps"][1]["targets"][0]
    assert target["state"] == "down" and target["last_error"] == "connection refused"
    assert target["since"] in {status_time(went_down + d) for d in (-1, 0, 1)}
