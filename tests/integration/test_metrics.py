"""`netstack metrics` on a real stack (root): a client rule's counter in its netvm moves
when the qube's traffic meets it, a link's counters are the kernel's, the last audit is
shown, the text file is written whole, and `--listen` serves the same on loopback: inside a
scratch namespace of the test's own, so nothing listens on the host's loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.util import ROOT, cli, in_ns, stack_leftovers, wait_for

pytestmark = pytest.mark.root
CFG = str(ROOT / "tests" / "configs" / "firewall-rules.toml")


def scrape(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples: list, **labels) -> float:
    hit = [s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hit) == 1, (labels, samples)
    return hit[0]


def test_metrics_follow_the_kernel(own_stack, tmp_path):
    s = own_stack("mx")
    cli("--stack", s, "up", CFG, "--lab")
    before = scrape(cli("--stack", s, "metrics").stdout)
    assert value(before["netstack_up"], stack=s) == 1
    assert before["netstack_audit_ok"] == []  # not audited yet
    web = value(before["netstack_firewall_rule_packets"], qube="work", rule="3",
                action="accept")
    tx = value(before["netstack_link_transmit_packets"], qube="work", link="eth0")
    cli("--stack", s, "exec", "work", "--", "curl", "-sS", "-m", "5", "http://198.51.100.80/",
        env={"SUDO_USER": ""})
    bad = cli("--stack", s, "exec", "work", "--", "curl", "-sS", "-m", "1",
              "http://198.51.100.80:8080/", check=False, env={"SUDO_USER": ""})
    assert bad.returncode != 0
    cli("--stack", s, "audit")
    after = scrape(cli("--stack", s, "metrics").stdout)
    assert value(after["netstack_firewall_rule_packets"], qube="work", rule="3",
                 action="accept") == web + 1  # the SYN: later packets are established
    assert value(after["netstack_firewall_rule_packets"], qube="work", rule="2",
                 action="drop") >= 1  # 8080: dropped by rule 2 (and its retries)
    assert value(after["netstack_link_transmit_packets"], qube="work", link="eth0") > tx + 2
    assert value(after["netstack_audit_ok"], stack=s) == 1
    assert time.time() - value(after["netstack_audit_timestamp_seconds"], stack=s) < 120

    out = tmp_path / "textfile" / "netstack.prom"
    bad = cli("--stack", s, "metrics", "--textfile", str(out), check=False)
    assert bad.returncode == 2 and not out.parent.exists()  # a typo makes no new tree
    out.parent.mkdir()
    cli("--stack", s, "metrics", "--textfile", str(out))
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    assert value(scrape(out.read_text())["netstack_up"], stack=s) == 1

    bad = cli("--stack", s, "metrics", "--listen", "0.0.0.0:9853", check=False)
    assert bad.returncode == 2 and "loopback" in bad.stderr

    scratch = f"nsx-{s}"
    subprocess.run(["ip", "netns", "add", scratch], check=True)
    srv = None
    try:
        in_ns(scratch, "ip", "link", "set", "lo", "up")
        srv = subprocess.Popen(["ip", "netns", "exec", scratch, sys.executable, "-m",
                                "netstack.cli", "--stack", s, "metrics", "--listen",
                                "127.0.0.1:9853"], stderr=subprocess.PIPE, text=True,
                               cwd=str(ROOT), env=dict(os.environ))
        assert "serving metrics of" in srv.stderr.readline()
        got = wait_for(lambda: in_ns(scratch, "curl", "-sS", "-m", "5",
                                     "http://127.0.0.1:9853/metrics", check=False).stdout,
                       timeout=20, what="metrics over HTTP")
        assert value(scrape(got)["netstack_up"], stack=s) == 1, \
            cli("--stack", s, "status").stdout
        srv.terminate()
        assert srv.wait(20) == 0
    finally:
        if srv is not None and srv.poll() is None:
            srv.kill()
            srv.wait()
        subprocess.run(["ip", "netns", "del", scratch], check=False)
    cli("--stack", s, "down", "--purge")  # (the app qubes' homes too)
    assert not stack_leftovers(s)
