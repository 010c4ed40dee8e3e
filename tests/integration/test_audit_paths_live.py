"""Tampering by a root in a qube (issue 24 items 1 and 2), on a live VPN stack of its own
(root): each way around the kill switch or beside the rules is made for real in the
kernel (nft in the qube's namespace, tc mirred between two of its links, a bridge, an ip
rule, an element added to the endpoint set), and `audit` must say FAIL or UNPROVEN naming
it, `status` DEGRADED (exit 1) naming it; after each is undone both are clean again."""

from __future__ import annotations

import contextlib
import json
import subprocess

import pytest

from netstack import audit
from tests.integration.util import VPN_CFG, children, cli, running_stack, wait_for
from tests.realkernel import KERNEL

pytestmark = pytest.mark.root
PATHS = "every path through the qube is modelled"
E2E = "end to end: only VPN transport on the ISP link"


@pytest.fixture(scope="module")
def vpn_stack():
    with running_stack(VPN_CFG, "hp") as s:
        wait_for(lambda: (c := children(s).get("vpn-sys-proxyvm")) and c.configured, 20, 0.05,
                 "the tunnel configured")
        yield s


def sh(ns: str, *argv: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, *argv], check=True, capture_output=True)


def nft(ns: str, script: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script.encode(),
                   check=True, capture_output=True)


def status(s: str) -> tuple[int, list[str]]:
    p = cli("--stack", s, "status", "--json", check=False)
    return p.returncode, json.loads(p.stdout)["health"]["problems"]


def results(s: str) -> dict[tuple[str, str], dict]:
    return {(r["qube"], r["property"]): r for r in audit.run(s, KERNEL)["results"]}


@contextlib.contextmanager
def clean_after(s: str):
    """The tampering is undone by the block's own finally; then both must be clean."""
    yield
    rc, problems = status(s)
    assert rc == 0 and problems == [], problems
    r = audit.run(s, KERNEL)
    assert r["ok"], [x for x in r["results"] if x["status"] != "PASS"]


def test_the_stack_is_clean_first(vpn_stack):
    with clean_after(vpn_stack):
        pass


def test_a_widened_endpoint_set_is_degraded_and_fails(vpn_stack):
    ns = f"nst-{vpn_stack}-sys-proxyvm"
    with clean_after(vpn_stack):
        sh(ns, "nft", "add", "element", "inet", "netstack", "vpn_endpoints",
           "{ 198.51.100.53 . udp . 53 }")
        try:
            rc, problems = status(vpn_stack)
            assert rc == 1
            assert problems == ["sys-proxyvm: set vpn_endpoints holds 198.51.100.53 . udp . "
                                "53, which netstack did not set"]
            r = results(vpn_stack)[("sys-proxyvm", "VPN endpoints exactly as resolved")]
            assert r["status"] == "FAIL"
            d = {x["qube"]: x for x in audit.run(vpn_stack, KERNEL, drift=True)["drift"]}
            assert d["sys-proxyvm"]["named"] == [
                "set vpn_endpoints holds 198.51.100.53 . udp . 53, which netstack did not set"]
        finally:
            sh(ns, "nft", "delete", "element", "inet", "netstack", "vpn_endpoints",
               "{ 198.51.100.53 . udp . 53 }")


def test_fwd_around_the_kill_switch_fails_the_kill_switch_and_end_to_end(vpn_stack):
    ns = f"nst-{vpn_stack}-sys-proxyvm"
    with clean_after(vpn_stack):
        nft(ns, 'table netdev evil { chain ing { type filter hook ingress device "vif4" '
                'priority 0; policy accept; fwd to "eth0"; }\n}\n')
        try:
            res = results(vpn_stack)
            ks = res[("sys-proxyvm", "kill switch (forward)")]
            assert ks["status"] == "FAIL" and ks["counterexample"]["oifname"] == "eth0"
            assert any("fwd to eth0" in t for t in ks["trace"])
            e2e = res[("work", E2E)]
            assert e2e["status"] == "FAIL" and any("ingress fwd eth0" in t
                                                   for t in e2e["trace"])
            p = res[("sys-proxyvm", PATHS)]
            assert p["status"] == "FAIL" and p["counterexample"]["iifname"] == "vif4"
            rc, problems = status(vpn_stack)
            assert rc == 1 and "sys-proxyvm: table netdev evil not made by netstack: chains " \
                "ing (ingress on vif4)" in problems
        finally:
            sh(ns, "nft", "delete", "table", "netdev", "evil")


def test_dup_of_the_tunnel_to_the_uplink_fails_end_to_end(vpn_stack):
    ns = f"nst-{vpn_stack}-sys-proxyvm"
    with clean_after(vpn_stack):
        nft(ns, f'table netdev evil {{ chain egr {{ type filter hook egress device '
                f'"wg3-{vpn_stack}" priority 0; policy accept; dup to "eth0"; }}\n}}\n')
        try:
            res = results(vpn_stack)
            assert res[("work", E2E)]["status"] == "FAIL"
            p = res[("sys-proxyvm", PATHS)]
            assert p["status"] == "FAIL" and p["reason"] == "egress: dup eth0"
        finally:
            sh(ns, "nft", "delete", "table", "netdev", "evil")


def test_an_arp_table_makes_the_qube_unproven(vpn_stack):
    ns = f"nst-{vpn_stack}-sys-firewall"
    with clean_after(vpn_stack):
        nft(ns, "table arp x { chain c { type filter hook input priority 0; }\n}\n")
        try:
            res = results(vpn_stack)
            mine = [r for (q, _), r in res.items() if q == "sys-firewall"]
            assert mine and all(r["status"] == "UNPROVEN" and "table arp x" in r["reason"]
                                for r in mine)
            assert res[("work", E2E)]["status"] == "UNPROVEN"
            rc, problems = status(vpn_stack)
            assert rc == 1 and any("table arp x not made by netstack" in p for p in problems)
        finally:
            sh(ns, "nft", "delete", "table", "arp", "x")


@pytest.mark.parametrize("what", ["tc-mirred", "bridge", "ip-rule"])
def test_a_path_beside_nftables_is_named(vpn_stack, what):
    ns = f"nst-{vpn_stack}-sys-firewall"
    make, undo, named = {
        "tc-mirred": ([["tc", "qdisc", "add", "dev", "vif3", "ingress"],
                       ["tc", "filter", "add", "dev", "vif3", "parent", "ffff:", "protocol",
                        "ip", "u32", "match", "u32", "0", "0", "action", "mirred", "egress",
                        "redirect", "dev", "eth0"]],
                      [["tc", "qdisc", "del", "dev", "vif3", "ingress"]],
                      "tc filter u32 with action mirred on ingress of link vif3"),
        "bridge": ([["ip", "link", "add", "name", "br9", "type", "bridge"],
                    ["ip", "link", "add", "name", "xa", "type", "veth", "peer", "name", "xb"],
                    ["ip", "link", "set", "xa", "master", "br9"]],
                   [["ip", "link", "del", "xa"], ["ip", "link", "del", "br9"]],
                   "link xa enslaved to br9"),
        "ip-rule": ([["ip", "rule", "add", "from", "10.137.0.3", "table", "100", "pref",
                      "100"]], [["ip", "rule", "del", "pref", "100"]],
                    "ip rule (IPv4) priority 100 to table 100"),
    }[what]
    with clean_after(vpn_stack):
        try:
            for argv in make:
                sh(ns, *argv)
            res = results(vpn_stack)
            p = res[("sys-firewall", PATHS)]
            assert p["status"] == "UNPROVEN" and named in p["reason"], p["reason"]
            mine = [r for (q, _), r in res.items() if q == "sys-firewall"]
            assert all(r["status"] != "PASS" for r in mine)
            rc, problems = status(vpn_stack)
            assert rc == 1 and any(named in x for x in problems), problems
            d = {x["qube"]: x for x in audit.run(vpn_stack, KERNEL, drift=True)["drift"]}
            assert any(named in x for x in d["sys-firewall"]["named"])
            assert any(named in x for x in d["sys-firewall"]["text"])
        finally:
            for argv in undo:
                subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True)


def test_a_rule_changed_in_place_is_named(vpn_stack):
    ns = f"nst-{vpn_stack}-sys-proxyvm"
    with clean_after(vpn_stack):
        sh(ns, "nft", "insert", "rule", "inet", "netstack", "forward", "iifname", "vif4",
           "accept", "comment", '"oops"')
        try:
            rc, problems = status(vpn_stack)
            assert rc == 1 and any('chain forward: rule #' in p and '"oops" not made by '
                                   'netstack' in p for p in problems), problems
        finally:
            out = subprocess.run(["ip", "netns", "exec", ns, "nft", "-a", "list", "chain",
                                  "inet", "netstack", "forward"], capture_output=True,
                                 text=True).stdout
            h = next(ln.rsplit("handle ", 1)[1] for ln in out.splitlines() if "oops" in ln)
            sh(ns, "nft", "delete", "rule", "inet", "netstack", "forward", "handle", h)


def test_a_script_with_the_issues_fwd_fails(tmp_path):
    """`audit --ruleset` on a script with a device chain on two links and the issue's
    `fwd ip to ADDR device DEV`: loaded with its devices, read back with them, FAIL."""
    f = tmp_path / "nd.nft"
    f.write_text('table netdev evil {\n chain ing {\n  type filter hook ingress devices = '
                 '{ "lan0", wan0 } priority 0; policy accept;\n  ip daddr 10.137.0.4 fwd ip '
                 'to 10.137.0.4 device "vif4"\n }\n}\n')
    p = cli("audit", "--ruleset", str(f), "--json", check=False)
    assert p.returncode == 1, p.stderr
    r = {x["property"]: x for x in json.loads(p.stdout)["results"]}
    assert r[PATHS]["status"] == "FAIL" and r[PATHS]["reason"] == "ingress: fwd vif4"
    assert r[PATHS]["counterexample"]["iifname"] in ("lan0", "wan0")
