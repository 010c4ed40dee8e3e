"""Issue 30 item 4: `audit --ruleset FILE --expect EXPECT.toml`, pure (no root): the file's
validation (one line naming the statement, the field and the fix), and each kind of
statement proven and refuted on small rulesets, with the counterexample (or witness) the
answer rests on. The examples the README runs are checked here on their `nft -j` listing
(tests/audit_expect/, kept equal to examples/audit/*.nft by the root test in
tests/integration/test_audit_expect.py)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from netstack import cli
from netstack.audit import expect
from netstack.audit.expect import ExpectError

ROOT = Path(__file__).resolve().parents[2]
LISTINGS = ROOT / "tests" / "audit_expect"


def doc(input_rules: list[list[dict]], forward: list[list[dict]] | None = None,
        policy: str = "drop") -> dict:
    items: list[dict] = [{"table": {"family": "inet", "name": "t"}}]
    for name, rules in (("input", input_rules), ("forward", forward)):
        if rules is None:
            continue
        items.append({"chain": {"family": "inet", "table": "t", "name": name,
                                "type": "filter", "hook": name, "prio": 0,
                                "policy": policy}})
        for i, expr in enumerate(rules):
            items.append({"rule": {"family": "inet", "table": "t", "chain": name,
                                   "handle": 100 * (name == "forward") + i + 1,
                                   "expr": expr}})
    return {"nftables": items}


def m(left: dict, right, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def meta(k: str) -> dict:
    return {"meta": {"key": k}}


def pl(proto: str, f: str) -> dict:
    return {"payload": {"protocol": proto, "field": f}}


ACCEPT = {"accept": None}
CT_EST = m({"ct": {"key": "state"}}, ["established", "related"], "in")
SSH_OFFICE = [m(pl("ip", "saddr"), {"prefix": {"addr": "192.0.2.0", "len": 24}}),
              m(pl("tcp", "dport"), 22), ACCEPT]
DB_BACKEND = [m(meta("iifname"), "eth1"), m(pl("tcp", "dport"), 5432), ACCEPT]
DB_ANY = [m(pl("tcp", "dport"), 5432), ACCEPT]
LIMIT_DB = [m(pl("tcp", "dport"), 5432),
            {"limit": {"rate": 5, "per": "second"}}, ACCEPT]


def run(d: dict, text: str) -> list[expect.Verdict]:
    ex = expect.parse(tomllib.loads(text), "t.toml")
    return expect.run(d, "t.json", ex)[0]


ROLES = '[interfaces]\nwan = "eth0"\nbackend = "eth1"\n'


# --- the file -------------------------------------------------------------------------------

@pytest.mark.parametrize("text,needle", [
    ('[[allow]]\nto = "tcp/99999"\n', "[[allow]] #1 to: 'tcp/99999': not a port"),
    ('[[allow]]\nfrom = "192.0.2.1"\n', "[[allow]] #1 to: missing"),
    ('[[deny]]\nto = "tcp/22"\nonly = true\n', "[[deny]] #1 only: a deny has no `only`"),
    ('[[deny]]\nfrom = "wna"\nto = "tcp/22"\n' + ROLES,
     "[[deny]] #1 from: 'wna' is not a role ([interfaces] has backend, wan)"),
    ('[[deny]]\nfrom = "wan"\nto = "tcp/22"\nform = "x"\n' + ROLES,
     "[[deny]] #1 form: unknown key"),
    ('[[deny]]\nfrom = "tcp/22"\n', "a service in `from`"),
    ('[[deny]]\nto = "oif"\n', "'oif' without a name"),
    ('[[deny]]\nfrom = "oif eth0"\n', "'oif' in from"),
    ('[[deny]]\nfrom = "192.0.2.0/24"\nto = "2001:db8::/32"\n', "different families"),
    ('[[deny]]\nto = "icmp/nope"\n', "unknown icmp type"),
    ('[[deny]]\nto = "tcp/22 tcp/23"\n', "a second proto in one item"),
    ('[[deny]]\nto = []\n', "an empty list"),
    ('[allow]\nto = "tcp/22"\n', "allow: written as a table"),
    ('[interfaces]\nwan = 5\n[[deny]]\nto="tcp/1"\n', "[interfaces] wan: 5 is not"),
    ('[host]\nforwarding = "yes"\n[[deny]]\nto="tcp/1"\n', "[host] forwarding"),
    ('[[deny]]\nto = "tcp/1"\nfamily = "ip4"\n', "[[deny]] #1 family"),
    ('[rules]\n', "rules: unknown table"),
    ('', "statements: none"),
])
def test_bad_files_are_one_line_naming_the_field_and_the_fix(text: str, needle: str) -> None:
    with pytest.raises(ExpectError) as e:
        expect.parse(tomllib.loads(text), "t.toml")
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and "(fix: " in msg, msg
    assert msg.startswith("t.toml: ")
    assert e.value.exit_code == 2


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "e.toml"
    bad.write_text("[[allow]\nto=")
    with pytest.raises(ExpectError, match="not TOML"):
        expect.load(str(bad))
    with pytest.raises(ExpectError, match="cannot read it"):
        expect.load(str(tmp_path / "none.toml"))


def test_parse_words_roles_and_file_order(tmp_path: Path) -> None:
    f = tmp_path / "e.toml"
    f.write_text(ROLES + '[[deny]]\nfrom = "wan"\nto = "tcp/5432"\n'
                 '[[allow]]\nto = ["tcp/80", "tcp/1000-2000 10.0.0.0/8 oif backend"]\n'
                 '[[reach]]\nfrom = "iif eth*"\nto = "icmp/echo-request"\n')
    ex = expect.load(str(f))
    assert [s.kind for s in ex.statements] == ["deny", "allow", "reach"]  # as written
    deny, allow, reach = ex.statements
    assert deny.froms[0].ifaces == ("eth0",) and deny.tos[0].ports == (5432, 5432)
    t = allow.tos[1]
    assert (t.proto, t.ports, t.ifaces) == (6, (1000, 2000), ("eth1",))
    assert t.addr == (4, 0x0A000000, 0x0AFFFFFF)
    assert reach.froms[0].ifaces == ("eth*",) and reach.tos[0].ports == (8, 8)
    assert reach.tos[0].family == "ipv4"


# --- proofs ---------------------------------------------------------------------------------

def test_allow_only_proven_and_refuted() -> None:
    toml = '[[allow]]\nto = "tcp/22"\nfrom = "192.0.2.0/24"\nonly = true\n'
    v, = run(doc([[CT_EST, ACCEPT], SSH_OFFICE]), toml)
    assert v.status == "PROVEN" and v.packet is None, v
    # anti-test: ssh open to all: the `only` part is refuted by an outside source
    v, = run(doc([SSH_OFFICE, [m(pl("tcp", "dport"), 22), ACCEPT]]), toml)
    assert v.status == "REFUTED" and "outside `from`" in v.reason
    assert v.hook == "input" and v.verdict == "accept"
    assert v.packet["dport"] == 22 and not v.packet["saddr"].startswith("192.0.2.")
    assert any("#2 -> accept" in t for t in v.trace)
    # anti-test: ssh closed to the office: the allow part is refuted by a dropped SYN
    v, = run(doc([[m(pl("tcp", "dport"), 23), ACCEPT]]), toml)
    assert v.status == "REFUTED" and v.verdict == "drop" and "not accepted" in v.reason
    assert v.packet["saddr"].startswith("192.0.2.") and v.packet["tcp_flags"] == ["syn"]


def test_allow_sees_both_families() -> None:
    """`tcp dport 80` in an `ip` rule leaves IPv6 dropped: refuted with an IPv6 SYN,
    proven once `family = "ipv4"` says that is meant."""
    rule = [m(pl("ip", "saddr"), {"prefix": {"addr": "0.0.0.0", "len": 0}}),
            m(pl("tcp", "dport"), 80), ACCEPT]
    v, = run(doc([rule]), '[[allow]]\nto = "tcp/80"\n')
    assert v.status == "REFUTED" and v.packet["family"] == "ipv6"
    v, = run(doc([rule]), '[[allow]]\nto = "tcp/80"\nfamily = "ipv4"\n')
    assert v.status == "PROVEN"


def test_deny_with_roles() -> None:
    toml = ROLES + '[[deny]]\nfrom = "wan"\nto = "tcp/5432"\n'
    v, = run(doc([DB_BACKEND]), toml)
    assert v.status == "PROVEN" and "input" in v.reason
    v, = run(doc([DB_ANY]), toml)  # anti-test: the interface forgotten
    assert v.status == "REFUTED" and v.packet["iifname"] == "eth0"
    assert v.packet["dport"] == 5432 and v.verdict == "accept"


def test_deny_covers_forward_only_where_the_host_forwards() -> None:
    """No forward chain: the kernel's forward hook accepts everything, which matters only
    if the host routes. By default a ruleset without a forward chain is a host's that does
    not; [host] forwarding = true says otherwise, and then the forward path refutes it."""
    toml = '[[deny]]\nto = "tcp/5432"\n'
    v, = run(doc([DB_BACKEND]), toml)
    assert v.status == "REFUTED"  # input from eth1
    d = doc([[m(pl("tcp", "dport"), 1), ACCEPT]])
    v, = run(d, toml)
    assert v.status == "PROVEN" and "does not forward" in v.reason
    v, = run(d, "[host]\nforwarding = true\n" + toml)
    assert v.status == "REFUTED" and v.hook == "forward"


def test_limits_make_it_unproven_never_proven() -> None:
    v, = run(doc([LIMIT_DB]), '[[deny]]\nto = "tcp/5432"\n')
    assert v.status in ("UNPROVEN", "REFUTED") and v.status != "PROVEN"
    v, = run(doc([LIMIT_DB]), '[[allow]]\nto = "tcp/5432"\n')
    assert v.status != "PROVEN"


def test_reach_witness_refutation_and_only() -> None:
    d = doc([[m(meta("iifname"), "guest0"), m(pl("udp", "dport"), 53), ACCEPT]],
            [[m(meta("iifname"), "guest0"), m(meta("oifname"), "wan0"),
              m(pl("tcp", "dport"), 443), ACCEPT]])
    roles = '[interfaces]\nguest = "guest0"\nwan = "wan0"\nlan = "lan0"\n'
    v, = run(d, roles + '[[reach]]\nfrom = "guest"\nto = ["udp/53", "tcp/443 wan"]\n'
             'only = true\n')
    assert v.status == "PROVEN" and v.packet and v.packet["iifname"] == "guest0", v
    assert v.verdict == "accept" and v.trace
    # a `to` it cannot reach: refuted, with a dropped packet to show it
    v, = run(d, roles + '[[reach]]\nfrom = "guest"\nto = ["udp/53", "tcp/22 lan"]\n')
    assert v.status == "REFUTED" and "tcp/22 lan" in v.reason and v.verdict == "drop"
    # only: it reaches tcp/443 on wan, which the list leaves out
    v, = run(d, roles + '[[reach]]\nfrom = "guest"\nto = ["udp/53"]\nonly = true\n')
    assert v.status == "REFUTED" and "outside `to`" in v.reason
    assert v.packet["dport"] == 443 and v.packet["oifname"] == "wan0"


def test_a_prefix_the_ruleset_never_names_is_its_own_class() -> None:
    """The statements' constants join the evaluator's classes: a deny of a /30 inside a
    /24 the ruleset accepts is refuted (without it the /30 had no class of its own)."""
    v, = run(doc([SSH_OFFICE]), '[[deny]]\nfrom = "192.0.2.100/30"\nto = "tcp/22"\n')
    assert v.status == "REFUTED" and v.packet["saddr"].startswith("192.0.2.10"), v
    # (without expect.domains this was PROVEN: no representative fell in the /30)


# --- the examples the README runs -----------------------------------------------------------

def example(name: str) -> list[expect.Verdict]:
    d = json.loads((LISTINGS / f"{name}.json").read_text())
    ex = expect.load(str(ROOT / "examples" / "audit" / f"{name}.expect.toml"))
    return expect.run(d, f"{name}.nft", ex)[0]


def test_server_example() -> None:
    got = {v.statement.name: v for v in example("server")}
    assert {k: v.status for k, v in got.items()} == {
        "ssh from the office only": "PROVEN", "the web site, for everyone": "PROVEN",
        "the database is closed from the WAN": "REFUTED",
        "the database from the backend only": "REFUTED"}
    ce = got["the database is closed from the WAN"].packet
    assert ce["iifname"] == "eth0" and ce["dport"] == 5432
    assert ce["saddr"].startswith("198.51.100.")  # the rule meant for one network


def test_router_example() -> None:
    got = example("router")
    assert [v.status for v in got] == ["PROVEN"] * 5, [(v.statement.name, v.reason)
                                                       for v in got]


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ex = ROOT / "examples" / "audit"
    rc = cli.main(["audit", "--ruleset", str(LISTINGS / "router.json"), "--expect",
                   str(ex / "router.expect.toml")])
    assert rc == 0 and "PROVEN: 5 statements, 0 refuted" in capsys.readouterr().out
    rc = cli.main(["audit", "--ruleset", str(LISTINGS / "server.json"), "--expect",
                   str(ex / "server.expect.toml"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1 and not out["ok"]
    refuted = [s for s in out["statements"] if s["status"] == "REFUTED"]
    assert len(refuted) == 2 and all(s["packet"]["dport"] == 5432 and s["role"] == "counterexample"
                                 for s in refuted)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[deny]]\nto = "tcp/70000"\n')
    rc = cli.main(["audit", "--ruleset", str(LISTINGS / "server.json"), "--expect",
                   str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "to: 'tcp/70000'" in err, err
    rc = cli.main(["audit", "--expect", str(bad)])
    assert rc == 2 and "--expect needs --ruleset" in capsys.readouterr().err
