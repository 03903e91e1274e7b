"""The key layout and a push's diff, pure."""

from __future__ import annotations

from tcpproxy.fleet.keys import canonical, file_document, plan_push


def test_values_compare_as_canonical_json() -> None:
    wanted = {"/p/apps/a": canonical({"Ports": [1], "AcceptProxyProtocol": True})}
    # the same object spelled differently by hand: not rewritten
    same = {"/p/apps/a": b'{ "AcceptProxyProtocol": true,\n "Ports": [1] }'}
    assert plan_push("/p", same, wanted).empty
    # 1 is not true (the validator is strict): rewritten
    loose = {"/p/apps/a": b'{"AcceptProxyProtocol": 1, "Ports": [1]}'}
    assert plan_push("/p", loose, wanted).changed == ["a"]
    broken = {"/p/apps/a": b"{"}
    assert plan_push("/p", broken, wanted).describe() == ["changed app a"]


def test_file_document_leaves_out_what_is_not_an_object() -> None:
    kvs = {"/p/apps/b": b"[1]", "/p/apps/a": b'{"Ports": [1]}', "/p/nodes/x": b"{}"}
    document, problems = file_document("/p", kvs)
    assert document == {"Apps": [{"Name": "a", "Ports": [1]}]}
    assert problems == ["/p/apps/b: not a JSON object; left out"]
