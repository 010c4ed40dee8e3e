"""An onion service from a workstation (root, shared Tor lab): anon-whonix's table says
`onion = [{port = 80, target = 8080}]`; its keys are made and kept by the gateway's tor;
another workstation reaches it by its .onion name through the private Tor network; the
serving workstation's link carries only packets from and to the gateway."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from netstack.leaktest.capture import Capture
from tests.integration.labs import CFG
from tests.integration.util import cli, in_ns, wait_for

pytestmark = pytest.mark.root


def test_another_workstation_reaches_the_onion_service(tor_lab, tmp_path):
    s = tor_lab.stack
    st = json.loads(cli("--stack", s, "status", "--json").stdout)
    gw = next(q for q in st["qubes"] if q["name"] == "sys-whonix")
    onion = wait_for(lambda: (json.loads(cli("--stack", s, "status", "--json").stdout)
                              ["qubes"][[q["name"] for q in st["qubes"]].index("sys-whonix")]
                              .get("onions") or {}).get("anon-whonix"), 30, 0.2,
                     "the onion address")
    assert onion.endswith(".onion") and len(onion) == 62
    assert "onion service of anon-whonix: " + onion in cli("--stack", s, "status").stdout
    assert "onion service of anon-whonix: " + onion in cli("--stack", s, "tor", "status").stdout
    (tmp_path / "index.html").write_text("hello from anon-whonix\n")
    server = subprocess.Popen(["ip", "netns", "exec", tor_lab.ns["anon-whonix"],
                               sys.executable, "-m", "http.server", "8080", "--bind",
                               "0.0.0.0", "--directory", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cap = Capture(tor_lab.ns["anon-whonix"], "eth0", str(tmp_path / "ws.pcap")).start()
    try:
        def fetch() -> str | None:
            p = in_ns(tor_lab.ns["anon-whonix2"], "curl", "-sS", "--max-time", "20",
                      "--socks5-hostname", f"{gw['addresses'][0]}:9050",
                      f"http://{onion}/", check=False, timeout=30)
            return p.stdout if p.returncode == 0 else None
        page = wait_for(fetch, 120, 1.0, "the onion service through the private network")
        assert "hello from anon-whonix" in page
    finally:
        cap.stop()
        server.terminate()
        server.wait(5)
    from scapy.layers.inet import IP

    ips = [p[IP] for p in cap.packets() if IP in p]
    from scapy.layers.inet import TCP

    ws, gw_addr = "10.137.0.5", gw["addresses"][0]
    served = [p for p in cap.packets() if TCP in p and 8080 in (p[TCP].sport, p[TCP].dport)]
    assert served and all({p[IP].src, p[IP].dst} == {ws, gw_addr} for p in served), \
        {(p[IP].src, p[IP].dst) for p in served}
    # no relay of the private network ever talks to the serving workstation (other tests of
    # the shared lab may leave TransPort's answers to their own probes on this link)
    tor_nodes = {n.address for n in tor_lab.plan.lab.tor_nodes.values()}
    assert not tor_nodes & {a for ip in ips for a in (ip.src, ip.dst)}
    keep = tor_lab.plan.qube("sys-whonix").info.keep_dir
    keys = Path(keep) / "onion-anon-whonix" / "hs_ed25519_secret_key"
    assert keys.exists()  # the key is the gateway's; the workstation never had it


def _automap_rule(ns: str) -> dict:
    """The gateway's automap redirect ("TCP SYN to Tor's automapped addresses -> TransPort")
    as its kernel lists it."""
    doc = json.loads(in_ns(ns, "nft", "-j", "list", "chain", "inet", "netstack",
                           "nat_prerouting").stdout)
    return next(i["rule"] for i in doc["nftables"]
                if "rule" in i and "automapped" in i["rule"].get("comment", ""))


def _automap_redirects(ns: str) -> int:
    return next(e["counter"]["packets"] for e in _automap_rule(ns)["expr"] if "counter" in e)


def test_workstations_open_the_onion_by_name_on_the_transparent_path(tor_lab, tmp_path):
    """Issue 24 item 5, as Whonix workstations do every day: no SOCKS, no torsocks. The name
    resolves through the virtual DNS (DNSPort) to an address of Tor's automap range; the SYN
    to it is redirected to TransPort, which maps it back to the .onion."""
    import ipaddress

    from netstack.tor.gateway import VIRTUAL_NET

    s = tor_lab.stack
    onion = wait_for(lambda: ((next(q for q in json.loads(cli(
        "--stack", s, "status", "--json").stdout)["qubes"] if q["name"] == "sys-whonix")
        .get("onions") or {}).get("anon-whonix")), 30, 0.2, "the onion address")
    (tmp_path / "index.html").write_text("hello by name from anon-whonix\n")
    server = subprocess.Popen(["ip", "netns", "exec", tor_lab.ns["anon-whonix"],
                               sys.executable, "-m", "http.server", "8080", "--bind",
                               "0.0.0.0", "--directory", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gw_ns = tor_lab.ns["sys-whonix"]
    try:
        # the lookup: an automapped address (tor's answer, not the lab resolver's); IPv4,
        # as the stack has IPv6 off (DNSPort answers AAAA from VirtualAddrNetworkIPv6's
        # default fe80::/10, which goes nowhere: docs/field-notes.md, Tor)
        looked = cli("--stack", s, "exec", "anon-whonix2", "--", "getent", "ahostsv4", onion,
                     check=False)
        assert looked.returncode == 0, looked.stderr
        addr = looked.stdout.split()[0]
        assert ipaddress.ip_address(addr) in ipaddress.ip_network(VIRTUAL_NET), looked.stdout
        before = _automap_redirects(gw_ns)

        def fetch(ws: str) -> str | None:
            p = cli("--stack", s, "exec", ws, "--", "curl", "-sS", "--max-time", "20",
                    f"http://{onion}/", check=False, timeout=40)
            return p.stdout if p.returncode == 0 else None
        # another workstation (its own circuits), then the README's line on the serving one
        page = wait_for(lambda: fetch("anon-whonix2"), 120, 1.0,
                        "anon-whonix2 to fetch the onion by name without SOCKS")
        assert page == "hello by name from anon-whonix\n"
        page = wait_for(lambda: fetch("anon-whonix"), 60, 1.0,
                        "anon-whonix to fetch its own onion by name without SOCKS")
        assert page == "hello by name from anon-whonix\n"
        assert _automap_redirects(gw_ns) >= before + 2  # each by the automap redirect
        # anti-test in the same lab: without that rule (yesterday's gateway, 10/8 excluded
        # whole) the name still resolves but the SYN is dropped, nothing is fetched
        rule = _automap_rule(gw_ns)
        in_ns(gw_ns, "nft", "delete", "rule", "inet", "netstack", "nat_prerouting",
              "handle", str(rule["handle"]))
        try:
            p = cli("--stack", s, "exec", "anon-whonix2", "--", "curl", "-sS", "--max-time",
                    "5", f"http://{onion}/", check=False, timeout=30)
            assert p.returncode == 28 and not p.stdout, (p.returncode, p.stdout, p.stderr)
        finally:  # the same rule back, at the chain's end where it was
            again = {k: v for k, v in rule.items() if k != "handle"}
            in_ns(gw_ns, "nft", "-j", "-f", "/dev/stdin",
                  input=json.dumps({"nftables": [{"add": {"rule": again}}]}))
        assert wait_for(lambda: fetch("anon-whonix2"), 60, 1.0, "the onion again") == page
        # an automapped address tor never handed out leads nowhere (tor refuses it)
        stray = in_ns(tor_lab.ns["anon-whonix2"], "curl", "-sS", "--max-time", "10",
                      "http://10.255.255.254/", check=False, timeout=20)
        assert stray.returncode != 0 and not stray.stdout
    finally:
        server.terminate()
        server.wait(5)


def _onion_of(stack: str) -> str | None:
    st = json.loads(cli("--stack", stack, "status", "--json", check=False).stdout or "{}")
    gw = next((q for q in st.get("qubes", []) if q["name"] == "sys-whonix"), {})
    return (gw.get("onions") or {}).get("anon-whonix")


def test_an_onion_address_outlives_down_and_purge_ends_it(own_stack):
    """As Whonix keeps /var/lib/tor: the service's keys are kept beside the stack's homes, so
    the address is the same after `down` and `up`; `down --purge` removes them (a hostile
    review saw a new address at every up)."""
    from netstack.kinds.tor import keep_dir

    s = own_stack("on")
    cli("--stack", s, "up", CFG, "--lab", "--no-wait")
    first = wait_for(lambda: _onion_of(s), 60, 0.2, "the onion address")
    cli("--stack", s, "down")
    kept = Path(keep_dir(s, "sys-whonix"))
    assert (kept / "onion-anon-whonix" / "hs_ed25519_secret_key").exists()
    assert oct(kept.stat().st_mode & 0o777) == "0o700"
    cli("--stack", s, "up", CFG, "--lab", "--no-wait")
    assert wait_for(lambda: _onion_of(s), 60, 0.2, "the onion address again") == first
    cli("--stack", s, "down", "--purge")
    assert not kept.exists()
