"""`audit --ruleset FILE [--packet SPEC]` without root: the packet language, the verdict per
hook with the rule that decided, a file that is not a ruleset, and a ruleset the evaluator
cannot read (UNPROVEN, never a traceback)."""

from __future__ import annotations

import json

import pytest

from netstack import cli
from netstack.audit import onefile, rulesetfile, whatif
from netstack.errors import UsageError
from tests.fakekernel import FakeKernel


def chain(name: str, hook: str, policy: str, prio: int = 0) -> dict:
    return {"chain": {"family": "inet", "table": "t", "name": name, "type": "filter",
                      "hook": hook, "prio": prio, "policy": policy}}


def rule(chain_: str, handle: int, *expr: dict, comment: str | None = None) -> dict:
    r = {"family": "inet", "table": "t", "chain": chain_, "handle": handle,
         "expr": list(expr)}
    if comment:
        r["comment"] = comment
    return {"rule": r}


def m(left: dict, right, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


IIF = {"meta": {"key": "iifname"}}
DPORT = {"payload": {"protocol": "tcp", "field": "dport"}}
SADDR = {"payload": {"protocol": "ip", "field": "saddr"}}
DOC = {"nftables": [
    {"table": {"family": "inet", "name": "t"}},
    chain("input", "input", "drop"), chain("forward", "forward", "drop"),
    chain("output", "output", "accept"),
    rule("input", 4, m({"ct": {"key": "state"}}, ["established", "related"], "in"),
         {"accept": None}),
    rule("input", 5, m(IIF, "lan0"), m(SADDR, "192.0.2.7"), m(DPORT, 22), {"accept": None},
         comment="ssh from the admin box"),
    rule("forward", 6, m(IIF, "lan0"), m({"meta": {"key": "cgroup"}}, 5),
         {"accept": None}),
    rule("output", 7, m({"meta": {"key": "skuid"}}, 1000), {"drop": None}),
]}


def test_parse_reads_nft_words_and_infers_the_path():
    p, path = whatif.parse("iifname=lan0 ip saddr=192.0.2.7 tcp dport=22")
    assert path == "input" and p.iifname == "lan0" and p.saddr == "192.0.2.7"
    assert p.l4proto == "tcp" and p.dport == 22 and p.tcp_flags == {"syn"}
    p, path = whatif.parse("iif=lan0 oif=wan0 ip6 daddr=2001:db8::1 udp dport=53")
    assert path == "forward" and p.family == "ipv6" and p.l4proto == "udp"
    p, path = whatif.parse("oifname=wan0 meta skuid=1000 icmp type=echo-request")
    assert path == "output" and p.skuid == 1000 and p.skgid == 0 and p.icmp_type == 8
    p, _ = whatif.parse("iifname=a ct state=established tcp flags=ack meta mark=0x10")
    assert p.ct_state == "established" and p.tcp_flags == {"ack"} and p.mark == 16


@pytest.mark.parametrize("spec, says", [
    ("iifname=lan0 tcp dport=70000", "out of range"),
    ("iifname=lan0 ip saddr=2001:db8::1", "use ip6 saddr"),
    ("iifname=lan0 bogus=1", "unknown key 'bogus'"),
    ("iifname=lan0 tcp", "qualifies nothing"),
    ("iifname=lan0 meta skuid=0", "socket owner"),
    ("ip daddr=192.0.2.1", "needs oifname"),
    ("iifname=lan0 tcp dport=22 udp sport=1", "one transport protocol"),
    ("iifname=lan0 ct state=sleepy", "ct state=sleepy"),
    ("iifname=lan0 tcp flags=syn,nope", "tcp flags=nope"),
])
def test_bad_packets_are_one_line_errors(spec, says):
    with pytest.raises(UsageError, match=says):
        whatif.parse(spec)


def test_verdict_per_hook_with_the_deciding_rule():
    p, path = whatif.parse("iifname=lan0 ip saddr=192.0.2.7 tcp dport=22")
    w = whatif.judge(DOC, p, path)
    assert [(h.hook, h.verdict) for h in w.hooks] == [("prerouting", "accept"),
                                                      ("input", "accept")]
    assert w.hooks[1].trace == ['input #5 "ssh from the admin box" -> accept']
    p, path = whatif.parse("iifname=lan0 ip saddr=192.0.2.8 tcp dport=22")
    w = whatif.judge(DOC, p, path)
    assert w.verdict == "drop" and w.hooks[1].trace == ["input -> policy drop"]
    p, path = whatif.parse("oifname=wan0 ip daddr=203.0.113.10 meta skuid=1000")
    assert whatif.judge(DOC, p, path).verdict == "drop"
    p, path = whatif.parse("oifname=wan0 ip daddr=203.0.113.10 meta skuid=1001")
    assert whatif.judge(DOC, p, path).verdict == "accept"


def test_what_it_cannot_decide_is_unknown_and_named():
    p, path = whatif.parse("iifname=lan0 oifname=wan0 ip daddr=203.0.113.10")
    w = whatif.judge(DOC, p, path)
    assert w.verdict == "unknown" and any("cgroup" in u for u in w.hooks[1].unknown)
    # outside the unknown rule's other matches the rule cannot match: decided
    p, path = whatif.parse("iifname=wan0 oifname=lan0 ip daddr=192.0.2.7")
    assert whatif.judge(DOC, p, path).verdict == "drop"


def test_file_audit_names_the_unmodelled_and_never_raises(tmp_path):
    a = onefile.audit(DOC, "t.json")
    assert [r.status for r in a.results] == ["FAIL", "FAIL", "FAIL", "PASS"]  # output accepts
    assert [u["construct"] for u in a.unmodelled] == ["meta cgroup"]
    assert a.unmodelled[0]["where"] == ["t forward #6"]
    broken = {"nftables": [{"chain": {"family": "inet", "table": "t"}}]}  # no name
    b = onefile.audit(broken, "b.json")
    assert [r.status for r in b.results] == ["UNPROVEN"] * 4
    assert "cannot read" in b.results[0].reason


def test_cli_on_a_json_file(tmp_path, capsys):
    f = tmp_path / "r.json"
    f.write_text(json.dumps(DOC))
    assert cli.main(["audit", "--ruleset", str(f)]) == 1
    out = capsys.readouterr().out
    assert "UNPROVEN meta cgroup: not modelled, in t forward #6" in out
    assert cli.main(["audit", "--ruleset", str(f), "--packet",
                     "iifname=lan0 ip saddr=192.0.2.7 tcp dport=22"]) == 0
    out = capsys.readouterr().out
    assert "ssh from the admin box" in out and "verdict: ACCEPT" in out
    assert cli.main(["audit", "--ruleset", str(f), "--packet", "iifname=lan0 x=1"]) == 2
    assert cli.main(["audit", "--packet", "iifname=lan0"]) == 2


@pytest.mark.parametrize("text, says", [
    ("{not json", "not valid JSON"), ('{"x": 1}', 'no "nftables" list'),
])
def test_files_that_are_not_rulesets(tmp_path, text, says):
    f = tmp_path / "r.json"
    f.write_text(text)
    with pytest.raises(UsageError, match=says):
        rulesetfile.read(str(f), FakeKernel())
    with pytest.raises(UsageError, match="cannot read"):
        rulesetfile.read(str(tmp_path / "missing.json"), FakeKernel())


def test_interfaces_an_nft_script_matches_by_index():
    text = 'iif lo accept\niif != "wg0" drop\noif { "a", b } accept\niifname "x" accept\n' \
           "meta iif $dev accept\n"
    assert rulesetfile.interfaces(text) == {"lo", "wg0", "a", "b"}


def test_ruleset_replay_without_root_is_one_line(tmp_path, capsys, monkeypatch):
    f = tmp_path / "r.json"
    f.write_text(json.dumps(DOC))
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert cli.main(["audit", "--ruleset", str(f), "--replay"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["netstack: --replay needs root: it loads the ruleset in scratch namespaces "
                   "and sends the packets there (run it with sudo)"]


def test_help_says_replay_works_with_a_ruleset_file(capsys):
    with pytest.raises(SystemExit):
        cli.main(["audit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "of --ruleset FILE" in out and "is named, not replayed" in out
