"""`netstack check -- CMD` with real programs on the shared Tor lab (its offline internet
on): curl by name through Tor is clean; a STUN request over UDP and `dig` at a resolver of
its own are stopped and reported with sys-whonix's rule (exit 2, or 0 with --bypass warn);
with the gateway broken on purpose the STUN packet leaks and the report names the link, the
pcap and the frame (exit 1); a failing command is exit 3. Reports: JSON, JUnit, HTML (root)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from netstack import check
from tests.integration.faults import fault as named
from tests.integration.util import cli

pytestmark = pytest.mark.root

STUN = ("import os, socket, struct\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)\n"
        "s.sendto(struct.pack('!HHI12s', 1, 0, 0x2112A442, os.urandom(12)), "
        "('stun.example.net', 3478))\n"
        "try:\n    s.recv(100)\nexcept OSError:\n    pass\n")


def by(r, proto, dport):
    return [f for f in r.flows if f.proto == proto and f.dport == dport]


def test_curl_through_tor_is_clean(tor_lab, tmp_path):
    r = check.run(["curl", "-sS", "-m", "20", "https://www.example.org/"],
                  stack=tor_lab.stack, qube="anon-whonix", pcaps=str(tmp_path))
    assert r.verdict == 0, check.table(r)
    (web,) = by(r, "tcp", 443)
    assert web.outcome == "left" and web.via == "tor" and "www.example.org" in web.names
    assert "www.example.org" in r.names_asked and not r.leaks
    assert r.expect == "tor" and r.exit_status == 0


def test_stun_and_its_own_resolver_are_stopped_with_the_gateways_rule(tor_lab, tmp_path):
    cmd = ["sh", "-c", f"python3 -c \"{STUN}\"; dig +time=2 +tries=1 @198.51.100.53 "
           "example.com; true"]
    r = check.run(cmd, stack=tor_lab.stack, qube="anon-whonix", pcaps=str(tmp_path))
    assert r.verdict == 2, check.table(r)
    (stun,) = by(r, "udp", 3478)
    (dns,) = [f for f in by(r, "udp", 53) if f.dst == "198.51.100.53"]
    assert (stun.klass, dns.klass) == ("udp", "dns")
    for f in (stun, dns):
        assert f.outcome == "stopped" and f.stopped_by["qube"] == "sys-whonix", f
    junit = ET.fromstring(check.junit(r))
    failed = {c.get("name") for c in junit if c.find("failure") is not None}
    assert any(n.startswith("udp:") for n in failed) and any(n.startswith("dns:")
                                                              for n in failed)
    page = check.html(r)
    assert "sys-whonix" in page and "#212121" in page and "stopped by sys-whonix" in page
    warn = check.run(cmd, stack=tor_lab.stack, qube="anon-whonix", bypass="warn",
                     pcaps=str(tmp_path / "w"))
    assert warn.verdict == 0


def test_a_broken_gateway_leaks_and_the_report_proves_it(tor_lab, tmp_path):
    cmd = ["python3", "-c", STUN]
    r = check.run(cmd, stack=tor_lab.stack, qube="anon-whonix", pcaps=str(tmp_path),
                  fault=named("gateway-redirect-only"))
    assert r.verdict == 1, check.table(r)
    assert r.leaks and any(x.link.startswith("sys-whonix") for x in r.leaks), r.leaks
    x = r.leaks[0]
    assert x.frame >= 1 and x.pcap.endswith(".pcap") and "UDP" in x.summary
    assert "LEAK on" in check.table(r)
    # the chain is whole again: the same program is stopped, not leaked
    again = check.run(cmd, stack=tor_lab.stack, qube="anon-whonix", pcaps=str(tmp_path / "b"))
    assert again.verdict == 2, check.table(again)


def test_the_command_line_writes_every_report_and_exit_3_for_a_failing_command(tor_lab,
                                                                              tmp_path):
    out = cli("--stack", tor_lab.stack, "check", "--qube", "anon-whonix", "--json",
              "--junit", str(tmp_path / "r.xml"), "--html", str(tmp_path / "r.html"),
              "--pcaps", str(tmp_path / "p"), "--", "sh", "-c", "exit 7", check=False)
    assert out.returncode == 3, out.stderr
    r = json.loads(out.stdout)
    assert r["exit_status"] == 7 and r["verdict"] == 3
    assert ET.parse(tmp_path / "r.xml").getroot().get("name") == "netstack check"
    assert (tmp_path / "r.html").read_text().startswith("<!doctype html>")
    assert list((tmp_path / "p").glob("*.pcap"))


def resolve(name: str) -> str:
    """Runs inside the qube's namespace (chain.call): its resolver is the chain's."""
    import socket

    return socket.gethostbyname(name)


def test_the_pytest_plugin_adopts_the_shared_lab(netstack_chain, tor_lab):
    chain = netstack_chain(stack=tor_lab.stack, qube="anon-whonix")
    assert not chain.own
    mark = chain.mark()
    p = chain.run(["curl", "-sS", "-m", "20", "https://api.example.com/v1"], check=True)
    assert "api.example.com/v1" in p.stdout
    chain.flows(since=mark).only_via("tor")
    assert chain.call(resolve, "x.example.net") == "198.51.100.99"


def test_the_pytest_plugin_brings_up_its_own_chain_and_names_the_offending_flow(
        netstack_chain):
    from netstack.pytest_plugin import FlowError
    from tests.integration.util import ROOT

    chain = netstack_chain(config=str(ROOT / "configs" / "vpn.toml"))
    assert chain.own and chain.stack.startswith("pt")
    mark = chain.mark()
    chain.run(["python3", "-c", STUN])
    flows = chain.flows(since=mark)
    flows.only_via("vpn")  # behind a VPN qube, UDP goes through the tunnel
    with pytest.raises(FlowError, match=r"(?s)expected every flow via tor.*udp 198\.51\.100"
                       r"\.99:3478.*left via vpn"):
        flows.only_via("tor")


def test_curl_through_the_gateways_socks_port_is_clean(tor_lab, tmp_path):
    cmd = ["sh", "-c", 'curl -sS -m 20 --socks5-hostname "$TOR_SOCKS_HOST:$TOR_SOCKS_PORT" '
           "https://socks.example.org/"]
    r = check.run(cmd, stack=tor_lab.stack, qube="anon-whonix", pcaps=str(tmp_path))
    assert r.verdict == 0, check.table(r)
    (socks,) = by(r, "tcp", 9050)
    assert socks.klass == "proxy" and socks.outcome == "left" and socks.via == "tor"
    assert not r.names_asked  # the name went to Tor inside SOCKS, never to a resolver
