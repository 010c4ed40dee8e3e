"""Qubes' per-qube firewall rules (qvm-firewall), enforced in sys-firewall, with real
packets: first match wins, nothing matched is dropped, a hostname not resolved matches
nothing, an `expire=` ends in the kernel on time; a qube without rules keeps the plain
behaviour (the control that shows each drop is the rules' doing), and the stack audits
clean (root)."""

from __future__ import annotations

import re
import time

import pytest

from tests.integration.util import ROOT, cli, in_ns, wait_for

pytestmark = pytest.mark.root

CFG = str(ROOT / "tests" / "configs" / "firewall-rules.toml")


def rule_set(ns: str, base: str) -> str:
    """The live listing of a rule's set (its name: base, then a digest of the rule, as
    qubefw.set_name makes it; the IPv4 one)."""
    names = re.findall(r"set (" + base + r"_[0-9a-f]{6})\s", in_ns(ns, "nft", "list", "sets",
                                                                   "inet").stdout)
    assert len(names) == 1, (base, names)
    return in_ns(ns, "nft", "list", "set", "inet", "netstack", names[0]).stdout

def curl(stack: str, qube: str, url: str) -> str:
    """'ok' (an answer), 'refused' (the host was reached and said no) or 'dropped'."""
    p = cli("--stack", stack, "exec", qube, "--", "curl", "-sS", "-m", "2", url,
            check=False, env={"SUDO_USER": ""})
    if p.returncode == 0:
        return "ok"
    return "refused" if "Couldn't connect" in p.stderr or "refused" in p.stderr \
        else "dropped"


def test_rules_first_match_wins_and_expire_in_the_kernel(own_stack):
    s = own_stack("fw")
    t0 = time.monotonic()
    cli("--stack", s, "up", CFG, "--lab")
    try:
        # rule 5 (ssh to the vpn host, expire=+10): open now, closed by the kernel later
        fw = f"nst-{s}-sys-firewall"
        listed = rule_set(fw, "fw4_5")
        assert "203.0.113.10" in listed and "expires" in listed
        assert curl(s, "work", "http://203.0.113.10:22/") == "refused"
        assert curl(s, "work", "http://web.lab.test/") == "ok"  # rules 1 (dns) and 3
        assert curl(s, "work", "http://198.51.100.80:8080/") == "dropped"  # rule 2 first
        assert curl(s, "work", "http://203.0.113.10/") == "dropped"  # nothing matched
        for url in ("http://198.51.100.80:8080/", "http://203.0.113.10/"):
            assert curl(s, "personal", url) == "refused"  # no rules: the plain behaviour
        wait_for(lambda: "203.0.113.10" not in rule_set(fw, "fw4_5"), 20, 0.2,
            "the kernel to expire rule 5")
        assert time.monotonic() - t0 >= 10
        assert curl(s, "work", "http://203.0.113.10:22/") == "dropped"
        # rule 4 names the vpn host: resolved through sys-net at the lab DNS into its set;
        # rule 7's name does not resolve: its set is empty, it matches nothing
        assert "203.0.113.10" in rule_set(fw, "fw4_4")
        assert curl(s, "work", "http://203.0.113.10:8443/") == "refused"
        assert "elements" not in rule_set(fw, "fw4_7")
        status = cli("--stack", s, "status").stdout
        assert "rule hostname nosuch.lab.test does not resolve" in status
        assert "vpn.lab.test -> 203.0.113.10" in status
        audit = cli("--stack", s, "audit", check=False)
        assert audit.returncode == 0, audit.stdout[-1500:]
    finally:
        cli("--stack", s, "down", check=False)


def test_firewall_command_changes_rules_live_and_keeps_them_across_down_up(own_stack):
    import json

    s = own_stack("fl")
    cli("--stack", s, "up", CFG, "--lab")
    try:
        assert curl(s, "work", "http://web.lab.test/") == "ok"
        out = json.loads(cli("--stack", s, "firewall", "work", "add", "action=drop",
                             "dsthost=198.51.100.80", "proto=tcp", "dstports=80",
                             "--before", "1", "--json").stdout)
        assert out["rules"] == 8 and out["applied_s"] < 1
        assert curl(s, "work", "http://web.lab.test/") == "dropped"
        assert curl(s, "personal", "http://web.lab.test/") == "ok"
        listed = json.loads(cli("--stack", s, "firewall", "work", "list", "--json").stdout)
        assert listed["source"] == "netstack firewall"
        assert listed["rules"][0]["rule"] == \
            "action=drop dsthost=198.51.100.80 proto=tcp dstports=80"
        bad = cli("--stack", s, "firewall", "work", "add", "action=maybe", check=False)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1
        # a rule put behind one that matches all it would: added, and said at once
        dead = cli("--stack", s, "firewall", "work", "add", "action=accept",
                   "dsthost=198.51.100.80", "proto=tcp", "dstports=80")
        assert "rule 9 (action=accept dsthost=198.51.100.80 proto=tcp dstports=80) can never " \
               "match: rule 1 " in dead.stderr, dead.stderr
        listed = json.loads(cli("--stack", s, "firewall", "work", "list", "--json").stdout)
        assert [r["shadowed_by"] for r in listed["rules"]][8] == 1
        assert "(never matches: rule 1 comes first)" in \
            cli("--stack", s, "firewall", "work", "list").stdout
        assert curl(s, "work", "http://web.lab.test/") == "dropped"
        cli("--stack", s, "firewall", "work", "del", "9")
        cli("--stack", s, "down")
        cli("--stack", s, "up", CFG, "--lab")  # the overlay outlives the stack
        assert curl(s, "work", "http://web.lab.test/") == "dropped"
        cli("--stack", s, "firewall", "work", "del", "1")
        assert curl(s, "work", "http://web.lab.test/") == "ok"
        cli("--stack", s, "firewall", "work", "reset")
        listed = json.loads(cli("--stack", s, "firewall", "work", "list", "--json").stdout)
        assert listed["source"] == "config" and len(listed["rules"]) == 7
        assert cli("--stack", s, "audit", check=False).returncode == 0
    finally:
        cli("--stack", s, "down", "--purge", check=False)


HOLD = r"""
import socket, sys
s = socket.create_connection(("198.51.100.80", 80), timeout=5)
print("connected", flush=True)
sys.stdin.readline()
s.settimeout(3)
try:
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    print("answered" if s.recv(100) else "closed", flush=True)
except OSError:
    print("cut", flush=True)
"""


def test_a_change_cuts_the_connections_it_forbids(own_stack):
    """A connection work holds open to the web server is cut when a rule forbidding it is
    added (its conntrack entry in sys-firewall goes, its next packet is new and dropped);
    personal's, held the same way, goes on (the control)."""
    import subprocess
    import sys

    s = own_stack("fc")
    cli("--stack", s, "up", CFG, "--lab")
    holders = {}
    try:
        for q in ("work", "personal"):
            holders[q] = subprocess.Popen(
                [sys.executable, "-m", "netstack.cli", "--stack", s, "exec", q, "--",
                 "/usr/bin/python3", "-c", HOLD], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin",
                                                        "SUDO_USER": ""})
            assert holders[q].stdout.readline().strip() == "connected"
        fw = f"nst-{s}-sys-firewall"

        def entries(src):
            return in_ns(fw, "conntrack", "-L", "-s", src, "-d", "198.51.100.80",
                         check=False).stdout
        assert "dport=80" in entries("10.137.0.4") and "dport=80" in entries("10.137.0.3")
        cli("--stack", s, "firewall", "work", "add", "action=drop", "dsthost=198.51.100.80",
            "--before", "1")
        assert "dport=80" not in entries("10.137.0.4")
        assert "dport=80" in entries("10.137.0.3")
        out = {}
        for q, p in holders.items():
            out[q] = p.communicate("go\n", timeout=30)[0].strip()
        assert out == {"work": "cut", "personal": "answered"}, out
    finally:
        for p in holders.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        cli("--stack", s, "down", "--purge", check=False)


def test_hostnames_follow_their_ttl_and_unresolved_ones_are_retried(own_stack):
    """The supervisor asks a rule's name again when its TTL runs out: the lab DNS moves
    moving.lab.test from the web server to the VPN host (TTL 2 s) and the rule follows;
    nosuch.lab.test starts to resolve and its set fills within the retry interval."""
    import json
    from pathlib import Path

    from netstack.lab.services import ZONE_FILE
    from netstack.rules.names import RETRY

    s = own_stack("fn")
    cli("--stack", s, "up", CFG, "--lab")
    zone = Path(f"/run/netstack/{s}") / ZONE_FILE
    fw = f"nst-{s}-sys-firewall"

    def move(**names):
        zone.write_text(json.dumps({n.replace("_", ".") + ".lab.test": {"a": [a], "ttl": 2}
                                    for n, a in names.items()}))

    def set_of(n):
        return rule_set(fw, f"fw4_{n}")
    try:
        move(moving="198.51.100.80")
        cli("--stack", s, "firewall", "work", "add", "action=accept",
            "dsthost=moving.lab.test", "proto=tcp", "dstports=8080", "--before", "1")
        assert curl(s, "work", "http://198.51.100.80:8080/") == "refused"  # rule 1 now
        assert curl(s, "work", "http://203.0.113.10:8080/") == "dropped"
        t0 = time.monotonic()
        move(moving="203.0.113.10", nosuch="192.0.2.77")
        wait_for(lambda: "203.0.113.10" in set_of(1), 15, 0.1, "moving.lab.test re-asked")
        assert time.monotonic() - t0 < 2 + 5 + 1  # TTL + the watcher's idle bound + margin
        assert curl(s, "work", "http://203.0.113.10:8080/") == "refused"
        assert curl(s, "work", "http://198.51.100.80:8080/") == "dropped"  # rule 3 again
        wait_for(lambda: "192.0.2.77" in set_of(8), RETRY + 5, 0.1, "nosuch.lab.test retried")
        status = cli("--stack", s, "status").stdout
        assert "rule hostname nosuch.lab.test -> 192.0.2.77 (TTL 2 s" in status
        # the audit checks the live sets against the names as resolved: clean now, and a
        # set emptied behind netstack's back is a destination its rules accept but the
        # chain drops (the anti-test of the property)
        assert cli("--stack", s, "audit", check=False).returncode == 0
        (first,) = re.findall(r"set (fw4_1_[0-9a-f]{6})\s",
                              in_ns(fw, "nft", "list", "sets", "inet").stdout)
        in_ns(fw, "nft", "flush", "set", "inet", "netstack", first)
        out = json.loads(cli("--stack", s, "audit", "--json", check=False).stdout)
        (bad,) = [r for r in out["results"] if r["status"] != "PASS"]
        assert bad["property"] == "work reaches exactly what its rules allow"
        assert "its rules accept it (rule 1" in bad["reason"]
        assert bad["counterexample"]["daddr"] == "203.0.113.10"
    finally:
        cli("--stack", s, "down", "--purge", check=False)


def test_rules_behind_a_vpn_qube_are_enforced_there(own_stack):
    """work sits behind sys-proxyvm: its list lives in the VPN qube, before the DNS DNAT,
    so specialtarget=dns means the virtual DNS it asks, and a dropped host is dropped
    before the tunnel."""
    s = own_stack("fv")
    cli("--stack", s, "up", str(ROOT / "configs" / "vpn.toml"), "--lab")
    try:
        assert curl(s, "work", "http://198.51.100.80:8080/") == "refused"  # via the VPN
        cli("--stack", s, "firewall", "work", "add", "action=accept", "specialtarget=dns")
        cli("--stack", s, "firewall", "work", "add", "action=accept",
            "dsthost=198.51.100.0/24", "proto=tcp", "dstports=80")
        assert curl(s, "work", "http://web.lab.test/") == "ok"
        assert curl(s, "work", "http://198.51.100.80:8080/") == "dropped"
        vpn = f"nst-{s}-sys-proxyvm"
        chain = in_ns(vpn, "nft", "list", "chain", "inet", "netstack", "fw-work").stdout
        assert "nothing matched" in chain
        assert cli("--stack", s, "audit", check=False).returncode == 0
    finally:
        cli("--stack", s, "down", "--purge", check=False)


def test_rules_behind_the_tor_gateway_judge_the_asked_destination(tor_lab):
    """Behind sys-whonix the list meets the SYN before its redirect to TransPort: a host the
    rules drop is a timeout (the SYN never reaches Tor), not Tor's answer; the other
    workstation (no list) is untouched; a rule Tor cannot carry is refused."""
    from tests.integration.labs import WEB

    s = tor_lab.stack
    try:
        cli("--stack", s, "firewall", "anon-whonix", "add", "action=accept",
            "dsthost=198.51.100.80", "proto=tcp", "dstports=80")
        assert tor_lab.get("anon-whonix", WEB) in tor_lab.exits
        p = in_ns(tor_lab.ns["anon-whonix"], "curl", "-sS", "-m", "3", "http://203.0.113.10/",
                  check=False)
        assert p.returncode == 28, p.stderr  # dropped: no answer at all
        p = in_ns(tor_lab.ns["anon-whonix2"], "curl", "-sS", "-m", "3",
                  "http://203.0.113.10/", check=False)
        assert p.returncode != 28, p.stderr  # Tor took it (and its exit found no server)
        bad = cli("--stack", s, "firewall", "anon-whonix", "add", "action=accept",
                  "proto=udp", check=False)
        assert bad.returncode == 2 and "Tor carries only TCP" in bad.stderr
        assert bad.stderr.count("\n") == 1
    finally:
        cli("--stack", s, "firewall", "anon-whonix", "reset")
    assert tor_lab.get("anon-whonix", WEB) in tor_lab.exits


def test_audit_drift_covers_the_overlay(own_stack):
    """--drift says where each list in force comes from, and fails when the kept overlay
    (firewall.json) no longer says what is enforced."""
    import json

    from netstack.rules.qubefw import load_overlay, overlay_path, save_overlay

    s = own_stack("fd")
    cli("--stack", s, "up", CFG, "--lab")
    try:
        out = json.loads(cli("--stack", s, "audit", "--drift", "--json").stdout)
        assert {f["qube"]: f["source"] for f in out["firewall_drift"]} == {"work": "config"}
        cli("--stack", s, "firewall", "work", "add", "action=drop", "dsthost=192.0.2.9")
        out = json.loads(cli("--stack", s, "audit", "--drift", "--json").stdout)
        (f,) = out["firewall_drift"]
        assert f["source"] == "netstack firewall" and not f["drift"] and out["ok"]
        kept = load_overlay(s)
        kept["work"] = kept["work"][:-1]  # edited behind netstack's back
        save_overlay(s, kept)
        p = cli("--stack", s, "audit", "--drift", check=False)
        assert p.returncode == 1
        assert re.search(r"DRIFT    work +firewall\.json keeps 7 rules but 8 rules are "
                         r"enforced", p.stdout), p.stdout
    finally:
        cli("--stack", s, "down", "--purge", check=False)
        import os
        assert not os.path.exists(overlay_path(s))


def test_leaktest_rules_probes_each_rule_and_catches_a_chain_bypassed(own_stack):
    """leaktest --rules: each rule's target reachable exactly when the list accepts it,
    unlisted ones not, expire=+3 open then closed by the kernel. Anti-test: with the jump
    to work's chain deleted from the live ruleset, unlisted targets get through and the
    run fails naming them."""
    import json

    s = own_stack("fr")
    cli("--stack", s, "up", CFG, "--lab")
    try:
        (rep,) = json.loads(cli("--stack", s, "leaktest", "--rules", "--json").stdout)
        assert rep["ok"] and rep["qube"] == "work"
        by = {c["name"]: c for c in rep["cases"]}
        assert by["rule 3-tcp-198.51.100.80"]["reached"] is True
        assert by["rule 2-tcp-198.51.100.80"]["reached"] is False
        assert any(n.startswith("unlisted-") for n in by)
        e = rep["expiry"]
        assert e["open_at_once"] and 2 <= e["closed_after_s"] <= 6, e
        listed = json.loads(cli("--stack", s, "firewall", "work", "list", "--json").stdout)
        assert listed["source"] == "config" and len(listed["rules"]) == 7  # put back
        fw = f"nst-{s}-sys-firewall"
        rules = json.loads(in_ns(fw, "nft", "-j", "-a", "list", "chain", "inet", "netstack",
                                 "prerouting").stdout)["nftables"]
        (jump,) = [r["rule"]["handle"] for r in rules if "rule" in r
                   and r["rule"].get("comment") == "work's firewall rules"]
        in_ns(fw, "nft", "delete", "rule", "inet", "netstack", "prerouting", "handle",
              str(jump))
        p = cli("--stack", s, "leaktest", "--rules", "--no-expiry", check=False)
        assert p.returncode == 1, p.stdout
        assert "FAIL unlisted-tcp-" in p.stdout and "FAIL rule 2-tcp-198.51.100.80" in p.stdout
    finally:
        cli("--stack", s, "down", "--purge", check=False)


def test_a_leaktest_rules_run_killed_midway_leaves_nothing_that_lasts(own_stack):
    """`leaktest --rules` killed (-9) while its temporary expire=+3 rule is in the list: the
    rule stays in firewall.json only until the next `firewall work list` (or leaktest
    --rules) after it expired; then the list is the config's again, and two killed runs do
    not pile up."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from netstack.rules.qubefw import load_overlay

    s = own_stack("fk")
    cli("--stack", s, "up", CFG, "--lab")
    try:
        def marked() -> int:
            return sum(1 for r in load_overlay(s).get("work", [])
                       if r.get("comment") == "leaktest expiry")
        for _ in range(2):
            p = subprocess.Popen([sys.executable, "-m", "netstack.cli", "--stack", s,
                                  "leaktest", "--rules"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
            try:
                wait_for(lambda: marked() > 0, 60, 0.05, "leaktest's temporary rule")
            finally:
                os.kill(p.pid, signal.SIGKILL)  # our own child, by its pid
                p.wait()
        assert 1 <= marked() <= 2, load_overlay(s)
        time.sleep(4)  # its expire=+3 has passed
        listed = json.loads(cli("--stack", s, "firewall", "work", "list", "--json").stdout)
        assert listed["source"] == "config" and len(listed["rules"]) == 7
        assert marked() == 0 and "work" not in load_overlay(s)
    finally:
        cli("--stack", s, "down", "--purge", check=False)
