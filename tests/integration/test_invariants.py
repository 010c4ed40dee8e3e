"""Invariants the user declares (issue 28 item 4) on a live Tor-over-VPN stack (root):
configs/invariants.toml says anon-whonix leaves only through Tor and is attached only to
a Tor gateway, and work never in clear. `audit` proves both on the live rulesets; `attach`
and `run` that would break one are refused in one line and change nothing (plan, links
and rulesets as before); a rule added by hand in the kernel that opens another way out
makes `audit` FAIL the invariant with a counterexample (anti-tests), and the audit passes
again once the rule is gone."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.integration.util import ROOT, cli, load_state, wait_for

pytestmark = pytest.mark.root

CFG = str(ROOT / "configs" / "invariants.toml")
ANON = "invariant 1 (anon only through Tor): reach only tor; netvm in @kind:tor"
WORK = "invariant 2 (work never in clear): never clearnet"


@pytest.fixture(scope="module")
def stack():
    from tests.integration.util import new_stack_name, purge_homes, reap_zombies, stack_leftovers

    s = new_stack_name("iv")
    cli("--stack", s, "up", CFG, "--lab", timeout=300)
    try:
        yield s
    finally:
        cli("--stack", s, "down", check=False)  # its lab Tor network kept (conftest)
        purge_homes(s)
        reap_zombies()
        assert not stack_leftovers(s)


def audit(stack: str) -> tuple[int, dict[tuple[str, str], dict]]:
    p = cli("--stack", stack, "audit", "--json", check=False, timeout=300)
    doc = json.loads(p.stdout)
    return p.returncode, {(r["qube"], r["property"]): r for r in doc["results"]}


def nft(ns: str, *words: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "nft", *words], check=True)


MARK = "hand-added by test_invariants"


def add_by_hand(ns: str, chain: str, *rule: str) -> None:
    nft(ns, "insert", "rule", "inet", "netstack", chain, *rule, "comment", f'"{MARK}"')


def drop_by_hand(ns: str) -> None:
    """The rules this test added, deleted by handle (the rest, run-time sets included,
    stays as the stack made it)."""
    chain = None
    for line in subprocess.run(["ip", "netns", "exec", ns, "nft", "-a", "list", "table",
                                "inet", "netstack"], capture_output=True, text=True,
                               check=True).stdout.splitlines():
        if line.strip().startswith("chain "):
            chain = line.split()[1]
        elif MARK in line:
            nft(ns, "delete", "rule", "inet", "netstack", chain or "?", "handle",
                line.rsplit("# handle ", 1)[1].strip())
    assert MARK not in listing(ns)


def listing(ns: str) -> str:
    """The namespace's ruleset, without what runs on by itself (counters, timeouts)."""
    import re

    text = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "ruleset"],
                          capture_output=True, text=True, check=True).stdout
    return re.sub(r"(packets|bytes|expires) \S+", r"\1 -", text)


def test_audit_proves_each_invariant_on_the_live_rulesets(stack):
    code, res = audit(stack)
    anon, work = res[("anon-whonix", ANON)], res[("work", WORK)]
    assert anon["status"] == "PASS" and "into sys-whonix (tor)" in anon["reason"]
    assert work["status"] == "PASS" and "vpn" in work["reason"]
    assert code == 0, [r for r in res.values() if r["status"] != "PASS"]


def test_attach_and_run_that_break_one_are_refused_and_change_nothing(stack):
    plan = load_state(stack).plan
    nss = [q.netns for q in plan.qubes]
    before = {ns: listing(ns) for ns in nss}
    links = subprocess.run(["ip", "-n", plan.qube("sys-firewall").netns, "-o", "link"],
                           capture_output=True, text=True).stdout
    p = cli("--stack", stack, "attach", "anon-whonix", "sys-firewall", check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("netstack: attach anon-whonix sys-firewall refused: "
                               "invariant 1 (anon only through Tor)"), p.stderr
    p = cli("--stack", stack, "attach", "work", "sys-firewall", check=False)
    assert p.returncode == 2 and "invariant 2 (work never in clear)" in p.stderr
    assert "work reaches the outside by clearnet" in p.stderr
    p = cli("--stack", stack, "run", "--like", "anon-whonix", "--netvm", "sys-proxyvm",
            "--", "true", check=False)
    assert p.returncode == 2 and "invariant 1" in p.stderr and "refused" in p.stderr
    after = load_state(stack).plan
    assert after == plan
    assert {ns: listing(ns) for ns in nss} == before
    assert subprocess.run(["ip", "-n", plan.qube("sys-firewall").netns, "-o", "link"],
                          capture_output=True, text=True).stdout == links
    # what keeps them is done: a disposable like anon-whonix, behind its Tor gateway
    assert cli("--stack", stack, "run", "--like", "anon-whonix", "--", "true").returncode == 0


def test_a_gateway_output_opened_by_hand_fails_reach_tor(stack):
    plan = load_state(stack).plan
    gw = plan.qube("sys-whonix").netns
    add_by_hand(gw, "output", "accept")
    try:
        code, res = audit(stack)
        r = res[("anon-whonix", ANON)]
        assert code == 1 and r["status"] == "FAIL", r
        assert "end in sys-whonix, whose own properties do not hold" in r["reason"]
        assert "'gateway output only from tor' FAIL" in r["reason"]
        assert r["counterexample"]
    finally:
        drop_by_hand(gw)
    wait_for(lambda: audit(stack)[1][("anon-whonix", ANON)]["status"] == "PASS", 60, 1,
             "the invariant proven again")


def test_a_vpn_bypass_added_by_hand_fails_never_clearnet_with_a_packet(stack):
    plan = load_state(stack).plan
    vpn = plan.qube("sys-proxyvm").netns
    vif = f"vif{plan.qube('work').qid}"
    live = listing(vpn)
    assert "nat_postrouting" in live, live
    add_by_hand(vpn, "forward", "iifname", vif, "oifname", "eth0", "accept")
    add_by_hand(vpn, "nat_postrouting", "oifname", "eth0", "masquerade")
    try:
        code, res = audit(stack)
        r = res[("work", WORK)]
        assert code == 1 and r["status"] == "FAIL", r
        assert "way out: clearnet" in r["reason"] and r["counterexample"]
        assert any("ISP link CLEAR" in t for t in r["trace"]), r["trace"]
        assert res[("anon-whonix", ANON)]["status"] in ("PASS", "FAIL")
    finally:
        drop_by_hand(vpn)
    code, res = audit(stack)
    assert res[("work", WORK)]["status"] == "PASS"
