"""The pure part of leaktest's VPN verdict (issue 23 item 6): which transport the kill
switch admitted at time t, from each server's transport, the failover history and the
live set read at the start of the run."""

from __future__ import annotations

import json

import pytest

from netstack.codec import dump
from netstack.errors import CannotCheck
from netstack.leaktest.endpoints import live_set, read_server_state, timeline
from netstack.vpn.failover import Switch

A = ("203.0.113.10", "udp", 51820)
B = ("203.0.113.10", "udp", 51821)
SERVERS = [{A}, {B}]


def swap(f: int, t: int, start: float) -> Switch:
    return Switch(f, t, "silent", start, start + 0.001)


def test_without_history_the_current_server_at_every_time():
    tl = timeline(SERVERS, 1, [])
    assert tl.at(0) == tl.at(1e12) == {B}
    assert timeline([{A}], 0, []).at(5) == {A}


def test_after_a_failover_before_the_run_only_the_second_server():
    tl = timeline(SERVERS, 1, [swap(0, 1, 100)], live={B}, live_at=200)
    assert tl.at(50) == {A}
    assert tl.at(150) == tl.at(300) == {B}
    assert A not in tl.at(300)


def test_a_failover_mid_run_moves_the_allowed_transport_at_its_time():
    tl = timeline(SERVERS, 0, [swap(0, 1, 100), swap(1, 0, 250)], live={B}, live_at=200)
    assert tl.at(200) == {B}
    assert tl.at(249.9) == {B}
    assert tl.at(250.0005) == {A, B}  # inside the one transaction: either
    assert tl.at(251) == {A}
    assert tl.at(1e9) == {A}


def test_the_live_set_narrows_what_the_history_says_never_widens():
    # a set emptied by hand admits nothing: a handshake then is a leak
    assert timeline(SERVERS, 1, [swap(0, 1, 100)], live=set(), live_at=200).at(300) == set()
    # an element added by hand is not the current server's transport
    assert timeline(SERVERS, 1, [swap(0, 1, 100)], live={A, B}, live_at=200).at(300) == {B}
    # the live set applies to its own span only, not to the spans before it
    assert timeline(SERVERS, 1, [swap(0, 1, 100)], live={B}, live_at=200).at(50) == {A}


def test_an_inconsistent_history_is_read_fail_closed():
    # the last swap went to 1 but the file says 0 is current: neither is trusted alone
    assert timeline(SERVERS, 0, [swap(0, 1, 100)]).at(200) == set()
    # an index the plan does not know admits nothing
    assert timeline(SERVERS, 7, []).at(1) == set()


def test_server_state_file(tmp_path):
    p = tmp_path / "vpn-q.server"
    assert read_server_state(str(p), "q") is None  # not written yet: the first server
    p.write_text(json.dumps({"current": 1, "since": 1.0, "history": [dump(swap(0, 1, 1))]}))
    assert read_server_state(str(p), "q") == (1, [swap(0, 1, 1)])
    p.write_text("{not json")
    with pytest.raises(CannotCheck, match="cannot read which server VPN qube q uses"):
        read_server_state(str(p), "q")


def test_live_set_elements():
    rs = {"nftables": [{"metainfo": {}},
                       {"set": {"family": "inet", "name": "vpn_endpoints", "table": "netstack",
                                "elem": [{"concat": ["203.0.113.10", "udp", 51821]}]}},
                       {"set": {"family": "inet", "name": "vpn_endpoints6",
                                "table": "netstack"}}]}
    assert live_set(rs) == (True, {B})
    assert live_set({"nftables": []}) == (False, set())
