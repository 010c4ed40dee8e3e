"""The hostile ISP's pure parts (netstack/lab/isp.py, netstack/connectivity.py): the
scenario list, the ISP router's rules as the audit's evaluator reads them (what each
scenario forwards and what it drops), the plan (rules and daemons only in the ISP's
namespace, nothing for a plain lab), the forger's answers and the check's verdicts."""

from __future__ import annotations

from pathlib import Path

import pytest

from netstack.audit.evaluator import Evaluator, Packet, Ruleset
from netstack.connectivity import classify
from netstack.errors import UsageError
from netstack.lab import isp
from netstack.model import UplinkSpec
from netstack.stack import plan_only


def test_scenarios_parse_comma_separated_and_repeated_in_one_order():
    assert isp.parse(["flapping,udp-blocked", "dns-hijack", "udp-blocked"]) == (
        "udp-blocked", "dns-hijack", "flapping")
    assert isp.parse(None) == () and isp.parse([" , "]) == ()
    with pytest.raises(UsageError, match="no such scenario.*udp-blocked, dns-hijack"):
        isp.parse(["udp-block"])


def fwd(ev: Evaluator, **kw) -> str:
    return ev.run_hook("forward", Packet(**kw)).verdict


def test_udp_blocked_forwards_dns_and_tcp_but_no_other_udp():
    ev = Evaluator(Ruleset(isp.ruleset(("udp-blocked",), "cust0")))
    out = {"iifname": "cust0", "oifname": "h1-dns", "saddr": "192.0.2.2"}
    assert fwd(ev, **out, daddr="203.0.113.10", l4proto="udp", dport=51820) == "drop"
    assert fwd(ev, **out, daddr="203.0.113.10", l4proto="udp", dport=1194) == "drop"
    assert fwd(ev, **out, daddr="198.51.100.53", l4proto="udp", dport=53) == "accept"
    assert fwd(ev, **out, daddr="203.0.113.10", l4proto="tcp", dport=443) == "accept"
    back = {"iifname": "h2-vpn", "oifname": "cust0", "daddr": "192.0.2.2"}
    assert fwd(ev, **back, saddr="198.51.100.53", l4proto="udp", sport=53,
               ct_state="established") == "accept"
    assert fwd(ev, **back, saddr="203.0.113.10", l4proto="udp", sport=51820,
               ct_state="established") == "drop"


def test_captive_portal_forwards_only_dns_before_a_login():
    ev = Evaluator(Ruleset(isp.ruleset(("captive-portal",), "cust0")))
    out = {"iifname": "cust0", "oifname": "h0-web", "saddr": "192.0.2.2"}
    assert fwd(ev, **out, daddr="198.51.100.53", l4proto="udp", dport=53) == "accept"
    assert fwd(ev, **out, daddr="198.51.100.80", l4proto="tcp", dport=443) == "drop"
    assert fwd(ev, **out, daddr="203.0.113.10", l4proto="udp", dport=51820) == "drop"
    nat = ev.run_hook("prerouting", Packet(iifname="cust0", saddr="192.0.2.2",
                                           daddr="198.51.100.80", l4proto="tcp", dport=80))
    assert any("captive-portal: HTTP to the portal" in str(s) for s in nat.trace)


def test_the_plan_puts_the_isp_only_in_its_namespace_and_a_plain_lab_has_none():
    p = plan_only("configs/vpn.toml", "t1",
                  UplinkSpec("lab", isp=("udp-blocked", "dns-hijack", "captive-portal",
                                         "tls-intercept", "flapping")))
    ns = {n.name: n for n in p.namespaces}
    assert ns["nsl-t1-isp"].ruleset is not None
    isp_daemons = {d.name: d.netns for d in p.daemons if d.name.startswith("isp-")}
    assert isp_daemons == dict.fromkeys(("isp-dns-forger", "isp-portal", "isp-tls-box",
                                         "isp-ovpn-impostor", "isp-flap"), "nsl-t1-isp")
    assert p.lab.isp == ("udp-blocked", "dns-hijack", "captive-portal", "tls-intercept",
                         "flapping")
    assert p.net.settings["connectivity_check"] == "http://web.lab.test" + isp.CHECK_PATH
    plain = plan_only("configs/vpn.toml", "t1", UplinkSpec("lab"))
    assert {n.name: n for n in plain.namespaces}["nsl-t1-isp"].ruleset is None
    assert not [d for d in plain.daemons if d.name.startswith("isp-")]
    assert "connectivity_check" not in plain.net.settings


def test_the_forger_answers_every_name_with_its_address():
    import dns.message
    import dns.rdatatype

    q = dns.message.make_query("vpn.lab.test.", dns.rdatatype.A)
    r = dns.message.from_wire(isp.forged_answer(q.to_wire()))
    assert [rd.address for rs in r.answer for rd in rs] == [isp.FORGED]
    q6 = dns.message.make_query("vpn.lab.test.", dns.rdatatype.AAAA)
    assert dns.message.from_wire(isp.forged_answer(q6.to_wire())).answer == []
    with pytest.raises(Exception):  # noqa: B017 - garbage: no answer at all
        isp.forged_answer(b"\x00\x01garbage")


def test_the_check_tells_full_portal_and_limited_apart():
    assert classify(200, {}, isp.CHECK_BODY.encode())[0] == "full"
    state, why = classify(302, {"location": "http://192.0.2.1:8081/login"}, b"")
    assert state == "portal" and "192.0.2.1:8081/login" in why
    assert classify(200, {}, b"<html>hotel wifi</html>")[0] == "portal"
    assert classify(None, {}, b"")[0] == "limited"


def tor_plan(tmp_path, extra: str):
    cfg = tmp_path / "tor.toml"
    cfg.write_text(Path("configs/tor.toml").read_text().replace(
        'bridges = ["lab:obfs4"]', 'bridges = ["lab:obfs4"]\n' + extra))
    return plan_only(str(cfg), "t1", UplinkSpec("lab"))


def test_a_gateway_falls_back_to_its_bridges_only_when_told(tmp_path):
    from netstack.tor.gateway import torrc

    p = tor_plan(tmp_path, "bridges_fallback_after = 30")
    info = p.qube("sys-whonix").info
    assert info.bridges_fallback_after == 30
    assert "UseBridges 0" in torrc(info) and "Bridge lab:obfs4" in torrc(info)
    tor = next(d for d in p.daemons if d.name == "tor-sys-whonix")
    assert tor.monitor == ("netstack.tor.control:watch", info.control_socket, "30.0")
    plain = tor_plan(tmp_path, "").qube("sys-whonix").info
    assert "UseBridges 1" in torrc(plain)
    assert next(d for d in tor_plan(tmp_path, "").daemons
                if d.name == "tor-sys-whonix").monitor[2:] == ()


@pytest.mark.parametrize("extra,err", [
    ("bridges_fallback_after = 2", "is not seconds"),
    ("bridges_fallback_after = true", "is not seconds"),
])
def test_bad_fallbacks_are_refused_in_one_line(tmp_path, extra, err):
    from netstack.errors import ConfigError

    with pytest.raises(ConfigError, match=err):
        tor_plan(tmp_path, extra)


def test_a_fallback_without_bridges_is_refused(tmp_path):
    from netstack.errors import ConfigError

    cfg = tmp_path / "tor.toml"
    cfg.write_text(Path("configs/tor.toml").read_text().replace(
        'bridges = ["lab:obfs4"]', "bridges_fallback_after = 30"))
    with pytest.raises(ConfigError, match="no bridges to fall back to"):
        plan_only(str(cfg), "t1", UplinkSpec("lab"))


def test_status_skips_the_check_while_the_uplink_watch_runs():
    """The check's GET leaves sys-net in clear: with the uplink watch on, `status` says it
    skipped the check instead of making the watch raise an alarm of its own making."""
    from netstack.kinds.net_runtime import NetRuntime
    from netstack.kinds.runtime import LiveFacts
    from tests.fakekernel import FakeKernel

    p = plan_only("configs/vpn.toml", "t1", UplinkSpec("lab", isp=("captive-portal",)))
    rt = NetRuntime()
    got = rt.status(p.net, LiveFacts([object()], {}, {}, watching=True), FakeKernel())
    assert got["connectivity"]["state"] == "skipped"
    assert "the uplink watch is on" in rt.status_lines(got)[0]
