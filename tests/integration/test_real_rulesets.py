"""`audit --ruleset` on rulesets people really run (tests/real_rulesets/, sources in its
README): each nft script is loaded into a scratch namespace and read back as JSON; the audit
never crashes, names every construct it does not model, and gives the generic properties
worked out by hand in expect.json. The what-if of single packets on them agrees with the
kernel, replayed for real (root)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from netstack.audit import onefile, rulesetfile, whatif
from tests.integration.util import cli
from tests.realkernel import KERNEL

pytestmark = pytest.mark.root

DIR = Path(__file__).resolve().parents[1] / "real_rulesets"
EXPECT = json.loads((DIR / "expect.json").read_text())
FILES = sorted(p.name for p in DIR.glob("*.nft"))


@pytest.fixture(scope="module")
def docs() -> dict[str, dict]:
    return {f: rulesetfile.read(str(DIR / f), KERNEL) for f in FILES}


def by_name(x):
    """`meta skuid "debian-tor"` comes back from the kernel as this host's number; the
    kept listing names the account again, so it holds no fact of this machine (a fresh
    Debian gives debian-tor another uid: docs/field-notes.md). The audit resolves the name
    on whatever host it runs."""
    import grp
    import pwd

    if isinstance(x, list):
        return [by_name(i) for i in x]
    if not isinstance(x, dict):
        return x
    m = x.get("match")
    if isinstance(m, dict) and isinstance(m.get("right"), int) and m["right"] > 0:
        key = (m.get("left") or {}).get("meta", {}).get("key") \
            if isinstance(m.get("left"), dict) else None
        look = {"skuid": lambda n: pwd.getpwuid(n).pw_name,
                "skgid": lambda n: grp.getgrgid(n).gr_name}.get(key)
        if look:
            try:
                return {"match": {**m, "right": look(m["right"])}}
            except KeyError:
                pass
    return {k: by_name(v) for k, v in x.items()}


def listed(doc: dict) -> str:
    """A listing as kept beside the script: no metainfo (nft's version), no handles' churn,
    accounts by name."""
    return json.dumps({"nftables": [by_name(i) for i in doc["nftables"]
                                    if "metainfo" not in i]},
                      indent=1, sort_keys=True) + "\n"


@pytest.mark.parametrize("name", FILES)
def test_the_kept_json_is_what_the_kernel_lists(docs, name):
    """tests/real_rulesets/json/ (what the unit tests audit without root) is exactly the
    kernel's listing of each script; NETSTACK_UPDATE_GOLDEN=1 rewrites it."""
    import os

    path = DIR / "json" / name.replace(".nft", ".json")
    if os.environ.get("NETSTACK_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(listed(docs[name]))
    assert path.read_text() == listed(docs[name])


def test_the_corpus_is_what_the_readme_lists():
    assert len(FILES) >= 10 and set(FILES) == set(EXPECT)
    readme = (DIR / "README.md").read_text()
    assert all(f in readme for f in FILES)
    for f in FILES:  # each names where it comes from
        assert "after:" in (DIR / f).read_text().splitlines()[0]


@pytest.mark.parametrize("name", FILES)
def test_generic_properties_come_out_right(docs, name):
    a = onefile.audit(docs[name], name)
    got = {r.property: r.status + (" " + r.reason.split(":")[0] if r.status == "FAIL"
                                   else "") for r in a.results}
    assert got == EXPECT[name]["results"], EXPECT[name]["why"]
    assert sorted({u["construct"] for u in a.unmodelled}) == EXPECT[name]["unmodelled"]
    for r in a.results:
        assert "evaluator failed" not in r.reason and "cannot read" not in r.reason
        if r.status == "UNPROVEN":  # named, and one of the constructs listed
            assert any(u["construct"] in r.reason for u in a.unmodelled), r.reason
        if r.status == "FAIL":
            assert r.counterexample and r.trace is not None


def test_cli_names_every_unmodelled_construct_in_an_unproven_line():
    p = cli("audit", "--ruleset", str(DIR / "mullvad-app.nft"), check=False)
    assert p.returncode == 1, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("UNPROVEN")]
    for c in EXPECT["mullvad-app.nft"]["unmodelled"]:
        assert any(c in ln for ln in lines), c
    p = cli("audit", "--ruleset", str(DIR / "whonix-gateway.nft"), "--json")
    r = json.loads(p.stdout)
    assert r["ok"] and [x["status"] for x in r["results"]] == ["PASS"] * 4


WHAT_IF = [
    ("nftables-wiki-home-router.nft", "iifname=wan0 ip saddr=198.51.100.9 tcp dport=22",
     "drop"),
    ("nftables-wiki-home-router.nft", "iifname=wan0 ip saddr=198.51.100.7 tcp dport=22",
     "accept"),
    ("nftables-wiki-home-router.nft", "iifname=lan0 oifname=wan0 ip saddr=192.0.2.7 ip "
     "daddr=203.0.113.10 udp dport=53", "accept"),
    ("nftables-wiki-home-router.nft", "iifname=wan0 oifname=lan0 ip saddr=203.0.113.10 "
     "ip daddr=192.0.2.7 tcp dport=22", "drop"),
    ("nftables-wiki-workstation.nft", "iifname=eth0 ip saddr=198.51.100.9 tcp dport=22",
     "drop"),
    ("nftables-wiki-workstation.nft", "iifname=eth0 ip saddr=198.51.100.9 tcp dport=22 "
     "ct state=established tcp flags=ack", "accept"),
    ("nftables-wiki-workstation.nft", "iifname=eth0 ip6 saddr=2001:db8:99::7 icmpv6 "
     "type=nd-neighbor-solicit", "accept"),
    ("whonix-gateway.nft", "iifname=int0 ip saddr=10.152.152.11 ip daddr=203.0.113.10 "
     "tcp dport=443", "accept"),
    ("whonix-gateway.nft", "iifname=int0 oifname=eth0 ip saddr=10.152.152.11 ip "
     "daddr=203.0.113.10 udp dport=443", "drop"),
    ("whonix-gateway.nft", "oifname=eth0 ip daddr=203.0.113.10 tcp dport=443 "
     "meta skuid=1000", "drop"),
    ("whonix-gateway.nft", "oifname=eth0 ip6 daddr=2001:db8:99::10 tcp dport=443", "drop"),
    ("firewalld-public.nft", "iifname=eth0 ip saddr=198.51.100.9 tcp dport=22", "accept"),
    ("firewalld-public.nft", "iifname=eth0 ip saddr=198.51.100.9 tcp dport=23", "drop"),
    ("debian-default.nft", "iifname=eth0 oifname=eth1 ip saddr=198.51.100.9 ip "
     "daddr=203.0.113.10 udp dport=9", "accept"),
    ("openwrt-fw4.nft", "iifname=wan ip saddr=198.51.100.9 tcp dport=22", "drop"),
    ("openwrt-fw4.nft", "iifname=br-lan oifname=wan ip saddr=192.0.2.7 ip "
     "daddr=203.0.113.10 tcp dport=443", "accept"),
    ("mullvad-app.nft", "oifname=eth0 ip daddr=203.0.113.10 tcp dport=443", "drop"),
    ("mullvad-app.nft", "oifname=wg0-mullvad ip daddr=203.0.113.10 tcp dport=443",
     "accept"),
]


# where the evaluator cannot decide, it says so and names why; never a wrong verdict
UNDECIDED = {("mullvad-app.nft", "ct mark"), ("openwrt-fw4.nft", "limit/quota")}


@pytest.mark.parametrize("name, spec, verdict", WHAT_IF)
def test_what_if_agrees_with_the_kernel(docs, name, spec, verdict):
    p, path = whatif.parse(spec)
    w = whatif.replay(docs[name], whatif.judge(docs[name], p, path), p, KERNEL)
    assert w.kernel and w.kernel[-1][1] == verdict, (w.kernel, w.hooks)
    if w.verdict == "unknown":
        named = {u for h in w.hooks for u in h.unknown}
        assert any(n == name and any(c in u for u in named) for n, c in UNDECIDED), named
        assert w.confirmed is None
    else:
        assert w.verdict == verdict and w.confirmed, (w.hooks, w.kernel)


def test_what_if_cli_prints_the_trace_and_replays():
    p = cli("audit", "--ruleset", str(DIR / "nftables-wiki-home-router.nft"), "--packet",
            "iifname=wan0 ip saddr=198.51.100.7 tcp dport=22", "--replay")
    assert "inbound_world" in p.stdout and "verdict: ACCEPT" in p.stdout
    assert "(confirmed)" in p.stdout


def test_a_script_nft_cannot_load_is_one_line_and_leaves_nothing(tmp_path):
    import subprocess

    bad = tmp_path / "bad.nft"
    bad.write_text("table inet t {\n chain c { type filter hook input priority 0;\n"
                   "  tcp dport 22 acept\n }\n}\n")
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    p = cli("audit", "--ruleset", str(bad), check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "nft cannot load it" in p.stderr and "Traceback" not in p.stderr
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert before == after


def test_ruleset_file_replay_sends_each_counterexample_into_the_kernel(tmp_path):
    """`audit --ruleset FILE --replay` (it used to ignore --replay without --packet): every
    FAIL's counterexample is replayed as the live audit's are, confirmed by the kernel, or
    named as not replayable (a packet on lo); the same in --json."""
    f = tmp_path / "leaky.nft"
    f.write_text("table inet filter {\n"
                 " chain input { type filter hook input priority 0; policy drop;\n"
                 "  iifname \"lo\" accept\n  tcp dport 22 accept\n }\n"
                 " chain forward { type filter hook forward priority 0; policy accept; }\n"
                 " chain output { type filter hook output priority 0; policy accept; }\n}\n")
    p = cli("audit", "--ruleset", str(f), "--replay", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    lines = [ln.strip() for ln in p.stdout.splitlines() if "replay in the kernel" in ln]
    fails = [ln for ln in p.stdout.splitlines() if ln.startswith("FAIL ")]
    assert len(lines) == len(fails) == 3, p.stdout
    assert lines.count("replay in the kernel: accept (confirmed)") == 2, p.stdout
    assert any("not replayed (a packet on lo" in ln for ln in lines), p.stdout
    r = json.loads(cli("audit", "--ruleset", str(f), "--replay", "--json",
                       check=False).stdout)
    rp = {x["property"]: x["replay"] for x in r["results"] if x["status"] == "FAIL"}
    assert rp["default drop"]["confirmed"] and rp["no IPv6 egress"]["confirmed"]
    assert rp["INVALID dropped"]["replayable"] is False
    p = cli("audit", "--ruleset", str(f), check=False)  # without it: no replay
    assert "replay in the kernel" not in p.stdout
