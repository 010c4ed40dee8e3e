"""Port forwarding through a VPN qube, as data (no root): the NAT-PMP codec against RFC
6886's layouts, the `forward` key refused with one line naming the field and the fix, the
rules (DNAT from the tunnel only; the client admits its port only), the audit's "inbound
only on the forwarded port, only from the tunnel" (PASS on the generated rulesets, FAIL on
each broken one), the renewer's schedule and fail-closed expiry with a recording fake
gateway, and the lab gateway's answers."""

from __future__ import annotations

import copy
import random
import struct

import pytest

from netstack.config import parse as parse_config
from netstack.errors import ConfigError
from netstack.kinds.registry import SPECS
from netstack.lab.natpmpd import Gateway, forward_commands
from netstack.vpn import natpmp, portfwd
from netstack.vpn.portfwd_run import Refused, Renewer, ask_timeout
from tests.unit.test_audit import make_plan, results, rulesets
from tests.unit.test_config import ROOT

PROP = "inbound only on the forwarded port, only from the tunnel"
VPN = (ROOT / "configs/vpn.toml").read_text()


def with_forward(entry: str) -> str:
    return VPN.replace('config = "lab:wireguard"',
                       f'config = "lab:wireguard"\nforward = [{entry}]')


NATPMP = '{port = "natpmp", gateway = "10.66.0.1", to = "work:51413", lifetime = 4}'
STATIC = '{port = 41234, to = "work:8080", proto = "tcp"}'


# --- the codec ----------------------------------------------------------------------------

def test_requests_have_rfc_6886_layouts():
    assert natpmp.address_request() == b"\x00\x00"
    r = natpmp.map_request(natpmp.MapRequest("tcp", 51413, 0, 60))
    assert r == struct.pack("!BBHHHI", 0, 2, 0, 51413, 0, 60) and len(r) == 12
    assert natpmp.map_request(natpmp.MapRequest("udp", 1, 0, 60))[1] == 1
    assert natpmp.parse_request(r) == natpmp.MapRequest("tcp", 51413, 0, 60)
    assert natpmp.parse_request(b"\x00\x00") is None


def test_answers_round_trip_and_errors_say_why():
    a = natpmp.map_response(natpmp.MapResponse("udp", 0, 7, 1, 40123, 60))
    assert len(a) == 16 and a[1] == 129
    assert natpmp.parse_map_response(a, "udp") == natpmp.MapResponse("udp", 0, 7, 1, 40123, 60)
    addr = natpmp.address_response(9, "203.0.113.10")
    assert len(addr) == 12 and natpmp.parse_address_response(addr).address == "203.0.113.10"
    err = natpmp.error_response(2, natpmp.REFUSED, 3)
    got = natpmp.parse_map_response(err, "tcp")
    assert not got.ok and natpmp.result_text(got.result) == "not authorized or refused"
    with pytest.raises(natpmp.NatPmpError, match="not the answer to a tcp"):
        natpmp.parse_map_response(a, "tcp")
    with pytest.raises(natpmp.NatPmpError, match="version 1"):
        natpmp.parse_map_response(b"\x01" + a[1:], "udp")
    with pytest.raises(natpmp.NatPmpError, match="16 expected"):
        natpmp.parse_map_response(a[:12], "udp")
    with pytest.raises(natpmp.NatPmpError, match="shorter"):
        natpmp.parse_request(b"\x00")


# --- the config -----------------------------------------------------------------------------

@pytest.mark.parametrize("entry,err", [
    ('{to = "work:1"}', r"entry 1 'port': missing \(fix: give the port"),
    ('{port = 0, to = "work:1"}', r"'port': 0 is neither a port"),
    ('{port = 5, to = "work"}', r"'to': 'work' is not QUBE:PORT \(fix: name the client"),
    ('{port = 5, to = "work:1", proto = "sctp"}', r"'proto': 'sctp' is not a protocol"),
    ('{port = "natpmp", to = "work:1"}', r"'gateway': missing \(fix: give the provider's "),
    ('{port = "natpmp", gateway = "x", to = "work:1"}', r"'gateway': 'x' is not an IPv4"),
    ('{port = "natpmp", gateway = "10.2.0.1", to = "work:1", lifetime = 1}',
     r"'lifetime': 1 is not seconds \(2-3600\)"),
    ('{port = 5, to = "work:1", gateway = "10.2.0.1"}', r"'gateway': only means something"),
    ('{port = 5, to = "work:1", color = 1}', r"unknown key 'color'"),
    ('{port = 5, to = "work:1"}, {port = 5, to = "work:2"}', r"entry 2 'port': 5 is "
     "forwarded twice"),
    (f'{NATPMP}, {NATPMP.replace("51413", "1")}', r"a second port = \"natpmp\""),
])
def test_bad_forward_entries_are_one_line(entry, err):
    with pytest.raises(ConfigError, match=err) as e:
        parse_config(with_forward(entry), SPECS)
    assert "\n" not in str(e.value) and "qube 'sys-proxyvm' field 'forward'" in str(e.value)


def test_a_target_that_is_not_a_client_is_refused(tmp_path):
    bad = with_forward('{port = 5, to = "sys-firewall:1"}')
    src = tmp_path / "c.toml"
    src.write_text(bad)
    with pytest.raises(ConfigError, match="'sys-firewall' is not a client of 'sys-proxyvm'"):
        make_plan(tmp_path, str(src))


def test_forward_must_be_a_list():
    with pytest.raises(ConfigError, match="must be a list of tables"):
        parse_config(VPN.replace('config = "lab:wireguard"',
                                 'config = "lab:wireguard"\nforward = 5'), SPECS)


# --- rules and the audit ----------------------------------------------------------------------

def plan_with(tmp_path, entry):
    src = tmp_path / "c.toml"
    src.write_text(with_forward(entry))
    return make_plan(tmp_path, str(src))


def comments(p, q):
    return [i["rule"].get("comment") for i in p.ns(p.qube(q).netns).ruleset["nftables"]
            if "rule" in i]


def test_rules_dnat_from_the_tunnel_and_the_client_admits_its_port(tmp_path):
    p = plan_with(tmp_path, f"{NATPMP}, {STATIC}")
    vpn = comments(p, "sys-proxyvm")
    assert "forward NAT-PMP/tcp+udp -> work:51413" in vpn
    assert "forward 41234/tcp -> work:8080" in vpn
    assert "forwarded NAT-PMP/tcp+udp -> work:51413" in vpn
    work = comments(p, "work")
    assert "forwarded port 51413 (through the VPN)" in work
    assert "forwarded port 8080 (through the VPN)" in work
    sets = [i["set"] for i in p.ns(p.qube("sys-proxyvm").netns).ruleset["nftables"]
            if "set" in i and i["set"]["name"].startswith("vpn_forward")]
    assert [s["name"] for s in sets] == ["vpn_forward0"] and not sets[0].get("elem")
    assert "vpn-sys-proxyvm-forward" in [d.name for d in p.daemons]


def test_the_lab_vpn_server_answers_nat_pmp_only_when_asked(tmp_path):
    from netstack import stack
    from netstack.model import UplinkSpec

    for text, want in ((with_forward(NATPMP), True), (with_forward(STATIC), False),
                       (VPN, False)):
        src = tmp_path / "c.toml"
        src.write_text(text)
        p = stack.plan_only(str(src), "main", UplinkSpec("lab"))
        d = [d for d in p.daemons if d.name == "lab-natpmp"]
        assert bool(d) == want
        if want:
            argv = " ".join(d[0].argv)
            assert "--public 203.0.113.10" in argv and "--listen 10.66.0.1" in argv
            assert d[0].netns == p.lab.vpn_server.netns


def grant(rs, ns, port):
    """The ruleset as the renewer leaves it: the gateway's port in the set."""
    for i in rs[ns]["nftables"]:
        if "set" in i and i["set"]["name"] == "vpn_forward0":
            i["set"]["elem"] = [{"concat": ["tcp", port]}, {"concat": ["udp", port]}]
    return rs


def test_generated_rulesets_prove_inbound_only_on_the_forwarded_port(tmp_path):
    p = plan_with(tmp_path, f"{NATPMP}, {STATIC}")
    vns = p.qube("sys-proxyvm").netns
    res = results(p, rulesets(p))
    assert not {k: (r.status, r.counterexample) for k, r in res.items() if r.status != "PASS"}
    r = res[("sys-proxyvm", PROP)]
    assert "port (none granted) -> work:51413" in r.reason and "port 41234 -> work:8080" \
        in r.reason
    res = results(p, grant(rulesets(p), vns, 40123))
    r = res[("sys-proxyvm", PROP)]
    assert r.status == "PASS" and "tcp+udp port 40123 -> work:51413" in r.reason


def test_without_forwards_nothing_new_comes_in_from_the_tunnel(tmp_path):
    p = make_plan(tmp_path, "configs/vpn.toml")
    r = results(p, rulesets(p))[("sys-proxyvm", PROP)]
    assert r.status == "PASS" and "no new connection comes in from" in r.reason


def _rule(rs, ns, comment):
    return next(i["rule"] for i in rs[ns]["nftables"]
                if "rule" in i and i["rule"].get("comment") == comment)


def break_forward_any_port(rs, ns):
    """The forward rule without its port and NAT status: anything from the tunnel."""
    r = _rule(rs, ns, "forwarded NAT-PMP/tcp+udp -> work:51413")
    r["expr"] = [e for e in r["expr"] if "match" not in e or
                 e["match"]["left"] == {"meta": {"key": "iifname"}} or
                 e["match"]["left"] == {"meta": {"key": "oifname"}}]


def break_dnat_any_port(rs, ns):
    """The DNAT without the granted set: every port of the tunnel goes to the client."""
    r = _rule(rs, ns, "forward NAT-PMP/tcp+udp -> work:51413")
    r["expr"] = [e for e in r["expr"] if "match" not in e or "@" not in str(e["match"])]


def break_from_uplink(rs, ns):
    r = _rule(rs, ns, "forwarded NAT-PMP/tcp+udp -> work:51413")
    r["expr"] = [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}},
                            "right": "eth0"}} if "iifname" in str(e) else e for e in r["expr"]]


def break_input(rs, ns):
    rs[ns]["nftables"].append({"rule": {"family": "inet", "table": "netstack",
                                        "chain": "input", "expr": [{"accept": None}]}})


@pytest.mark.parametrize("breaker", [break_forward_any_port, break_dnat_any_port,
                                     break_from_uplink, break_input])
def test_each_broken_ruleset_fails_the_property(tmp_path, breaker):
    p = plan_with(tmp_path, NATPMP)
    vns = p.qube("sys-proxyvm").netns
    rs = grant(copy.deepcopy(rulesets(p)), vns, 40123)
    breaker(rs, vns)
    r = results(p, rs)[("sys-proxyvm", PROP)]
    assert r.status == "FAIL" and r.counterexample, (r.status, r.reason)


# --- the renewer ----------------------------------------------------------------------------

class FakeGateway:
    """Records asks; grants port 40123 for `granted` seconds, or fails when told."""

    def __init__(self, granted: int = 4) -> None:
        self.asks: list[tuple[str, int, int]] = []
        self.granted = granted
        self.fail: Exception | None = None

    def map(self, gateway, f, proto, lifetime, suggested, timeout):
        self.asks.append((proto, lifetime, suggested))
        if self.fail:
            raise self.fail
        return natpmp.MapResponse(proto, 0, 1, f.port, 40123, min(lifetime, self.granted))

    def address(self, gateway, timeout):
        if self.fail:
            raise self.fail
        return "203.0.113.10"


def make_renewer(tmp_path, gw, lifetime=4):
    f = portfwd.parse("vpn", [{"port": "natpmp", "gateway": "10.66.0.1", "to": "work:51413",
                               "lifetime": lifetime}])
    spec = portfwd.RenewerSpec("vpn", "ns", str(tmp_path / "st"), str(tmp_path / "pub"), f)
    nft: list = []
    published: list = []
    r = Renewer(spec, portfwd.ForwardState(), nft.append, published.append, gw.map, gw.address)
    return r, nft, published


def test_renewer_asks_both_protocols_renews_at_half_and_fills_the_set(tmp_path):
    gw = FakeGateway()
    r, nft, pub = make_renewer(tmp_path, gw)
    nxt = r.step(1000.0)
    assert gw.asks == [("tcp", 4, 0), ("udp", 4, 0)] and nxt == 1002.0
    assert nft == [{"nftables": [
        {"flush": {"set": {"family": "inet", "table": "netstack", "name": "vpn_forward0"}}},
        {"add": {"element": {"family": "inet", "table": "netstack", "name": "vpn_forward0",
                             "elem": [{"concat": ["tcp", 40123]},
                                      {"concat": ["udp", 40123]}]}}}]}]
    g = pub[-1].grants[0]
    assert (g.public_port, g.public_address, g.renewals, g.expires_at) == \
        (40123, "203.0.113.10", 1, 1004.0)
    assert r.step(1001.0) == 1002.0 and len(gw.asks) == 2  # not due yet
    r.step(1002.0)  # due: asks again, suggesting the port it holds; the set stays
    assert gw.asks[2:] == [("tcp", 4, 40123), ("udp", 4, 40123)] and len(nft) == 1
    assert pub[-1].grants[0].renewals == 2


def test_a_grant_not_renewed_in_time_empties_the_set(tmp_path):
    gw = FakeGateway()
    r, nft, pub = make_renewer(tmp_path, gw)
    r.step(1000.0)
    gw.fail = TimeoutError("no NAT-PMP answer from 10.66.0.1:5351")
    assert r.step(1002.0) == 1003.0  # retried each second
    assert len(nft) == 1 and pub[-1].grants[0].public_port == 40123
    r.step(1003.0)
    r.step(1004.0)  # expired
    assert nft[-1] == {"nftables": [{"flush": {"set": {
        "family": "inet", "table": "netstack", "name": "vpn_forward0"}}}]}
    g = pub[-1].grants[0]
    assert g.public_port is None and "expired, nothing is forwarded" in g.error
    gw.fail = None
    r.step(1005.0)  # the gateway answers again: the port goes back in
    assert nft[-1]["nftables"][1]["add"]["element"]["elem"][0] == {"concat": ["tcp", 40123]}


def test_a_refusal_is_an_error_in_status_not_a_crash(tmp_path):
    gw = FakeGateway()
    gw.fail = Refused("tcp mapping refused: not authorized or refused")
    r, nft, pub = make_renewer(tmp_path, gw)
    r.step(1.0)
    assert not nft and "refused" in pub[-1].grants[0].error


def test_ask_timeout_stays_inside_half_the_lifetime():
    f = portfwd.parse("v", [{"port": "natpmp", "gateway": "10.2.0.1", "to": "w:1"}])[0]
    assert ask_timeout(f) == 4.0
    assert ask_timeout(portfwd.Forward(0, None, "w", 1, lifetime=4)) == 1.0


def test_client_files_and_env():
    g = [portfwd.Grant(0, "work", 51413, ["tcp", "udp"], 40123, "203.0.113.10"),
         portfwd.Grant(1, "work", 8080, ["tcp"], 41234, None, static=True)]
    files = portfwd.client_files(g)
    assert files["port-51413"] == "40123\n" and files["port-8080"] == "41234\n"
    assert files["address"] == "203.0.113.10\n"
    env = portfwd.read_env(files["env"])
    assert env == {"NETSTACK_FORWARD_PORT": "41234", "NETSTACK_FORWARD_ADDRESS": "203.0.113.10",
                   "NETSTACK_FORWARD_PORT_8080": "41234", "NETSTACK_FORWARD_PORT_51413": "40123"}
    assert portfwd.read_env("PATH=/evil\nNETSTACK_FORWARD_PORT=1\n") == \
        {"NETSTACK_FORWARD_PORT": "1"}
    assert portfwd.client_files([]) == {"env": ""}


# --- the lab's gateway --------------------------------------------------------------------------

def test_lab_gateway_answers_as_protonvpn():
    gw = Gateway("203.0.113.10", ["10.66.0.0/24"], rng=random.Random(1))
    a, cmds = gw.answer(natpmp.map_request(natpmp.MapRequest("udp", 1, 0, 60)), "10.66.0.2")
    udp = natpmp.parse_map_response(a, "udp")
    assert udp.ok and udp.lifetime == 60 and 40000 <= udp.external <= 59999
    assert f"udp . {udp.external} timeout 60s : 10.66.0.2" in cmds
    a, _ = gw.answer(natpmp.map_request(natpmp.MapRequest("tcp", 1, 0, 3600)), "10.66.0.2")
    tcp = natpmp.parse_map_response(a, "tcp")
    assert tcp.external == udp.external and tcp.lifetime == 60  # one port; at most 60 s
    a, cmds = gw.answer(natpmp.map_request(natpmp.MapRequest("tcp", 1, 0, 0)), "10.66.0.2")
    assert natpmp.parse_map_response(a, "tcp").lifetime == 0 and "timeout 60s" not in cmds
    a, _ = gw.answer(natpmp.address_request(), "10.66.0.2")
    assert natpmp.parse_address_response(a).address == "203.0.113.10"
    assert gw.answer(natpmp.address_request(), "198.51.100.80") == (None, None)
    a, _ = gw.answer(b"\x01\x00", "10.66.0.2")
    assert struct.unpack("!BBH", a[:4])[2] == natpmp.UNSUPPORTED_VERSION
    a, _ = gw.answer(b"\x00\x07", "10.66.0.2")
    assert struct.unpack("!BBH", a[:4]) == (0, 135, natpmp.UNSUPPORTED_OP)


def test_lab_forward_commands_refresh_the_timeout():
    text = forward_commands("tcp", 40001, "10.66.0.2", 4)
    assert text.splitlines()[-1] == \
        "add element ip natpmp ports { tcp . 40001 timeout 4s : 10.66.0.2 }"
    assert "delete element" in text.splitlines()[1]


def test_held_sets_follow_the_grant_and_lapse_with_it():
    """What a reload puts back and status compares: the grant in force, else empty."""
    f = portfwd.parse("v", [{"port": "natpmp", "gateway": "10.2.0.1", "to": "w:1",
                             "proto": "tcp"}])
    st = portfwd.ForwardState([portfwd.Grant(0, "w", 1, ["tcp"], 40123, expires_at=100.0)])
    add = portfwd.held_set_commands(f, st, 99.0)
    assert add[1]["add"]["element"]["elem"] == [{"concat": ["tcp", 40123]}]
    assert len(portfwd.held_set_commands(f, st, 100.0)) == 1  # expired: flush only
    assert len(portfwd.held_set_commands(f, st, 101.0, grace=2.0)) == 2
    assert len(portfwd.held_set_commands(f, None, 0.0)) == 1
    static = portfwd.parse("v", [{"port": 5, "to": "w:1"}])
    assert portfwd.held_set_commands(static, st, 0.0) == []


def test_client_directory_is_readable_inside_and_follows_the_grant(tmp_path):
    """The renewer's files for a client: world-readable (the sandbox's account reads them
    through a read-only bind), the directories above not listable; a port no longer held
    leaves no stale file behind; `exec` binds the directory and sets its variables."""
    import os
    import stat

    from netstack.executor import forwarded
    from netstack.vpn.portfwd_run import publish_files

    pub = tmp_path / "public"
    f = portfwd.parse("vpn", [{"port": "natpmp", "gateway": "10.66.0.1", "to": "work:51413"}])
    spec = portfwd.RenewerSpec("vpn", "ns", str(tmp_path / "st"), str(pub), f)
    g = portfwd.Grant(0, "work", 51413, ["tcp", "udp"], 40123, "203.0.113.10")
    publish_files(spec, portfwd.ForwardState([g]))
    d = pub / "forward" / "work"
    assert (d / "port-51413").read_text() == "40123\n"
    assert stat.S_IMODE(os.stat(d / "port-51413").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(pub / "forward").st_mode) == 0o711
    assert portfwd.read_state(spec.state_path).grants == [g]
    grants, env = forwarded(str(pub), "work", (), {"TOR": "x"})
    assert [(x.path, x.inside, x.readonly) for x in grants] == \
        [(str(d), "/run/netstack-forward", True)]
    assert env == {"TOR": "x", "NETSTACK_FORWARD_PORT": "40123",
                   "NETSTACK_FORWARD_ADDRESS": "203.0.113.10",
                   "NETSTACK_FORWARD_PORT_51413": "40123"}
    publish_files(spec, portfwd.ForwardState([portfwd.Grant(0, "work", 51413, ["tcp"])]))
    assert sorted(os.listdir(d)) == ["env"] and (d / "env").read_text() == ""
    assert forwarded(str(pub), "personal", (), {}) == ((), {})


def test_renewer_starts_from_the_state_file(tmp_path):
    """A restarted renewer keeps the port it held (it asks for it again) and its count."""
    gw = FakeGateway()
    f = portfwd.parse("vpn", [{"port": "natpmp", "gateway": "10.66.0.1", "to": "work:51413"}])
    spec = portfwd.RenewerSpec("vpn", "ns", str(tmp_path / "st"), str(tmp_path / "pub"), f)
    old = portfwd.ForwardState([portfwd.Grant(0, "work", 51413, ["tcp", "udp"], 40123,
                                              "203.0.113.10", renewals=7,
                                              expires_at=2000.0)])
    published: list = []
    r = Renewer(spec, old, lambda c: None, published.append, gw.map, gw.address)
    r.step(1000.0)
    assert gw.asks[0] == ("tcp", 60, 40123) and published[-1].grants[0].renewals == 8
