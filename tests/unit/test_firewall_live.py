"""`netstack firewall` on the recording fake kernel: add/del/reset change only the netvm's
ruleset, in one transaction, keep the change in the overlay that the next `up` (and the
disposables' rebuild) reads, refuse bad rules with one line before anything changes (no
root)."""

from __future__ import annotations

import time

import pytest

from netstack import disposable, firewall_live, sandbox, state
from netstack.errors import ConfigError, UsageError
from netstack.kinds.registry import SPECS
from netstack.plan import build, load_inputs
from netstack.rules import qubefw
from tests.unit.test_disposable import plan_of, up
from tests.unit.test_reconcile import LAB


@pytest.fixture(autouse=True)
def dirs(tmp_path, monkeypatch):
    monkeypatch.setattr("netstack.names.RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(sandbox, "HOME_ROOT", str(tmp_path / "lib"))


def fw_loads(fk, start):
    fw = plan_of().qube("sys-firewall").netns
    return [e for e in fk.events[start:] if e[0] == "nft"], fw


def test_add_del_reset_touch_only_the_netvm_in_one_transaction():
    fk, _ = up("configs/basic.toml")
    n = len(fk.events)
    count, took = firewall_live.change("main", "work", "add",
                                       ["action=accept", "dsthost=198.51.100.80",
                                        "proto=tcp", "dstports=80"], kernel=fk)
    loads, fw = fw_loads(fk, n)
    assert count == 1 and took < 1 and [e[1] for e in loads] == [fw]
    assert "fw-work" in str(loads[0][2]) and not [e for e in fk.events[n:] if e[0] in (
        "veth", "netns_create", "link_del")]
    assert qubefw.load_overlay("main") == {"work": [{"action": "accept",
                                                     "dsthost": "198.51.100.80",
                                                     "proto": "tcp", "dstports": 80}]}
    firewall_live.change("main", "work", "add", ["action=drop", "dsthost=198.51.100.0/24"],
                         number=1, kernel=fk)
    rules = firewall_live.rules_of(plan_of(), "work")
    assert [r.action for r in rules] == ["drop", "accept"]
    assert firewall_live.change("main", "work", "del", number=1, kernel=fk)[0] == 1
    listing = firewall_live.listing("main", "work")
    assert listing["source"] == "netstack firewall" and listing["rules"][0]["number"] == 1
    assert listing["rules"][0]["rule"] == \
        "action=accept dsthost=198.51.100.80 proto=tcp dstports=80"
    firewall_live.change("main", "work", "reset", kernel=fk)
    assert firewall_live.rules_of(plan_of(), "work") is None
    assert qubefw.load_overlay("main") == {}
    assert "fw-work" not in str(plan_of().ns(fw).ruleset)


def test_the_overlay_is_what_the_next_up_and_a_disposable_see():
    fk, st = up("configs/basic.toml")
    firewall_live.change("main", "work", "add", ["action=accept", "specialtarget=dns"],
                         kernel=fk)
    again = build(load_inputs(st.data.config, "main", LAB, SPECS), "main", LAB)
    assert "fw-work" in str(again.ns(plan_of().qube("sys-firewall").netns).ruleset)
    q = disposable.add("main", None, "red", kernel=fk)  # the rebuild agrees with the plan
    assert "fw-work" in str(plan_of().ns(plan_of().qube("sys-firewall").netns).ruleset)
    disposable.remove("main", [q.name], kernel=fk)


@pytest.mark.parametrize(("action", "words", "number", "err", "text"), [
    ("add", ["action=allow"], None, ConfigError, "'allow' is not an action"),
    ("add", ["dsthost"], None, ConfigError, "is not key=value"),
    ("del", [], 3, UsageError, "the list is empty"),
    ("add", ["action=accept"], 5, UsageError, "give one of 1-1"),
])
def test_bad_changes_are_one_line_and_change_nothing(action, words, number, err, text):
    fk, _ = up("configs/basic.toml")
    before, n = plan_of(), len(fk.events)
    if action == "del":
        firewall_live.change("main", "work", "add", ["action=accept"], kernel=fk)
        firewall_live.change("main", "work", "del", number=1, kernel=fk)
        before, n = plan_of(), len(fk.events)
    with pytest.raises(err) as e:
        firewall_live.change("main", "work", action, words, number, kernel=fk)
    assert text in str(e.value) and "\n" not in str(e.value)
    assert fk.events[n:] == [] and plan_of() == before


def test_a_rule_tor_cannot_carry_is_refused_and_changes_nothing():
    fk, _ = up("configs/tor-over-vpn.toml")
    before = len(fk.events)
    with pytest.raises(ConfigError, match="cannot be enforced by 'sys-whonix'"):
        firewall_live.change("main", "anon-whonix", "add", ["action=accept", "proto=udp"],
                             kernel=fk)
    assert qubefw.load_overlay("main") == {}
    assert not [e for e in fk.events[before:] if e[0] == "nft"]
    n, _ = firewall_live.change("main", "anon-whonix", "add",
                                ["action=accept", "proto=tcp", "dstports=443"], kernel=fk)
    assert n == 1
    ns = "nst-main-sys-whonix"
    loaded = [e for e in fk.events[before:] if e[0] == "nft" and e[1] == ns]
    assert loaded and "fw-anon-whonix" in str(loaded[0])


def test_allows_is_first_match_and_drops_the_rest():
    rules = qubefw.parse("w", [
        {"action": "accept", "specialtarget": "dns"},
        {"action": "drop", "dsthost": "198.51.100.80", "proto": "tcp", "dstports": 8080},
        {"action": "accept", "dsthost": "198.51.100.0/24", "proto": "tcp",
         "dstports": "80-443"},
        {"action": "accept", "dsthost": "web.lab.test"},
        {"action": "accept", "proto": "icmp", "icmptype": 8}])
    dns = ("10.139.1.1", "10.139.1.2")
    a = lambda *x: qubefw.allows(rules, *x, dns)  # noqa: E731
    assert a("10.139.1.1", "udp", 53, None) and not a("10.139.1.1", "udp", 54, None)
    assert a("198.51.100.80", "tcp", 80, None) and a("198.51.100.9", "tcp", 443, None)
    assert not a("198.51.100.80", "tcp", 8080, None)  # the drop comes first
    assert not a("198.51.100.80", "udp", 80, None) and not a("203.0.113.10", "tcp", 80, None)
    assert a("203.0.113.10", "icmp", None, 8) and not a("203.0.113.10", "icmp", None, 0)
    assert not a("2001:db8::1", "tcp", 80, None)  # a name matches nothing, nothing else does
    assert qubefw.allows(None, "203.0.113.10", "tcp", 1, None, dns)  # no list: everything


def test_conntrack_entries_are_read_in_their_original_direction():
    """pyroute2's entry (original and reply tuples) becomes a Flow of the original
    direction, and the Flow names the same tuple back to the kernel for a delete."""
    import socket

    from pyroute2.conntrack import NFCTAttrTuple

    from netstack.kernel import Flow

    class Entry:
        def __init__(self, orig, reply):
            self.tuple_orig, self.tuple_reply = orig, reply

    tcp = NFCTAttrTuple(saddr="10.137.0.4", daddr="198.51.100.80", proto=6, sport=41234,
                        dport=80)
    f = Flow.from_entry(Entry(tcp, tcp.reverse()))
    assert f == Flow("tcp", "10.137.0.4", "198.51.100.80", 41234, 80)
    t = f.tuple()
    assert (t.saddr, t.daddr, t.proto, t.sport, t.dport, t.family) == \
        ("10.137.0.4", "198.51.100.80", 6, 41234, 80, socket.AF_INET)
    icmp = NFCTAttrTuple(saddr="10.137.0.4", daddr="203.0.113.10", proto=1, icmp_id=7,
                         icmp_type=8, icmp_code=0)
    g = Flow.from_entry(Entry(icmp, icmp))
    assert g == Flow("icmp", "10.137.0.4", "203.0.113.10", None, None, 8, 7, 0)
    assert (g.tuple().icmp_id, g.tuple().proto) == (7, 1)
    raw = NFCTAttrTuple(saddr="10.137.0.4", daddr="203.0.113.10", proto=253)
    r = Flow.from_entry(Entry(raw, raw.reverse()))  # leaktest's raw-IP probe leaves these
    assert r.proto in ("253", "ip-proto-253") or r.proto.isalpha()
    assert Flow("253", "10.137.0.4", "203.0.113.10").tuple().proto == 253
    assert Flow("no-such-proto", "10.137.0.4", "203.0.113.10").tuple().proto is None
    six = Flow("icmp", "fd09:24ef:4179::a89:4", "2001:db8::1", icmp_type=128, icmp_id=3)
    assert (six.tuple().family, six.tuple().proto) == (socket.AF_INET6, 58)


def test_a_change_cuts_exactly_the_connections_it_forbids():
    from netstack.kernel import Flow

    fk, _ = up("configs/basic.toml")
    p = plan_of()
    work, fw = p.qube("work"), p.qube("sys-firewall").netns
    web = Flow("tcp", work.ipv4, "198.51.100.80", 40000, 80)
    vpn = Flow("tcp", work.ipv4, "203.0.113.10", 40001, 22)
    other = Flow("tcp", p.qube("personal").ipv4, "198.51.100.80", 40002, 80)
    fk.flows[fw] = [web, vpn, other]
    firewall_live.change("main", "work", "add", ["action=accept", "dsthost=198.51.100.80",
                                                 "proto=tcp", "dstports=80"], kernel=fk)
    assert fk.flows[fw] == [web, other]  # ssh to the vpn host is no longer allowed
    assert [e[2] for e in fk.events if e[0] == "conntrack_delete"] == [vpn]


def test_a_reload_fills_the_sets_of_the_new_list():
    """Inserting a rule renumbers the sets after it: the names refilled in the reload's
    transaction are those of the new ruleset, with the resolved addresses."""
    fk, _ = up("tests/configs/firewall-rules.toml")
    fw = plan_of().qube("sys-firewall").netns
    n = len(fk.events)
    firewall_live.change("main", "work", "add", ["action=drop", "dsthost=192.0.2.99"],
                         number=1, kernel=fk)
    (load,) = [e for e in fk.events[n:] if e[0] == "nft" and e[1] == fw][:1]
    cmds = load[2]["nftables"]
    declared = {c["add"]["set"]["name"] for c in cmds if "set" in c.get("add", {})}
    filled = {c["flush"]["set"]["name"] for c in cmds if "flush" in c}
    assert filled and filled <= declared
    elems = [c["add"]["element"] for c in cmds if "element" in c.get("add", {})]
    from tests.unit.test_rule_names import short

    assert {"name": "fw4_5", "elem": ["203.0.113.10"]}.items() <= {
        k: (short(v) if k == "name" else v) for e in elems if short(e["name"]) == "fw4_5"
        for k, v in e.items()}.items()


def test_a_changed_config_is_refused_before_the_rules_change(tmp_path):
    """The same guard as a disposable's: a firewall change never carries edits of the
    config that `up` did not apply."""
    import shutil

    from tests.unit.test_reconcile import ROOT

    cfg = tmp_path / "basic.toml"
    shutil.copy(ROOT / "configs/basic.toml", cfg)
    fk, st = up("configs/basic.toml")
    st.data.config = str(cfg)
    st.save()
    cfg.write_text(cfg.read_text().replace('label = "blue"', 'label = "purple"'))
    n, before = len(fk.events), plan_of()
    with pytest.raises(state.StateError, match="another plan than the one `up`"):
        firewall_live.change("main", "work", "add", ["action=accept"], kernel=fk)
    assert fk.events[n:] == [] and plan_of() == before
    assert qubefw.load_overlay("main") == {}


def test_one_change_reads_the_config_and_probes_the_host_once(monkeypatch):
    """`firewall add` once read the config twice, built the plan twice and ran the host
    probe (a subprocess) twice: now one read, one probe, the text parsed again."""
    from netstack import config, hostcaps

    fk, _ = up("configs/basic.toml")
    reads, probes = [], []
    real_read, real_probe = config.read_text, hostcaps.probe
    monkeypatch.setattr(config, "read_text", lambda *a: reads.append(a[0]) or real_read(*a))
    monkeypatch.setattr(hostcaps, "probe", lambda **kw: probes.append(kw) or real_probe(**kw))
    firewall_live.change("main", "work", "add", ["action=drop", "dsthost=192.0.2.9"],
                         kernel=fk)
    assert len(reads) == 1 and len(probes) == 1, (reads, probes)


@pytest.mark.parametrize("action,words,number", [("add", ["action=accept"], None),
                                                 ("del", [], 1), ("reset", [], None)])
def test_a_disposable_cannot_be_given_rules_live_and_is_told_why(action, words, number):
    """A disposable takes its template's rules (`run --like`); a live change of its list
    says so in one line (it used to blame a qube the config no longer has) and changes
    nothing."""
    fk, _ = up("configs/basic.toml")
    firewall_live.change("main", "work", "add", ["action=accept", "specialtarget=dns"],
                         kernel=fk)
    q = disposable.add("main", None, "red", like="work", kernel=fk)
    before, n = plan_of(), len(fk.events)
    with pytest.raises(UsageError, match=f"^{q.name} is a disposable: it takes its "
                       "template's rules .*run --like QUBE"):
        firewall_live.change("main", q.name, action, words, number, kernel=fk)
    assert plan_of() == before and fk.events[n:] == []
    assert firewall_live.listing("main", q.name)["rules"][0]["rule"] == \
        "action=accept specialtarget=dns"
    disposable.remove("main", [q.name], kernel=fk)


@pytest.mark.parametrize("words", [[], ["dsthost=192.0.2.7"]])
def test_firewall_add_without_an_action_asks_for_one(words):
    fk, _ = up("configs/basic.toml")
    with pytest.raises(UsageError, match="^firewall add: give action=accept or action=drop"):
        firewall_live.change("main", "work", "add", words, kernel=fk)


def test_counts_in_output_agree_with_their_number():
    from netstack.errors import count

    assert [count(n, "rule") for n in (0, 1, 2)] == ["0 rules", "1 rule", "2 rules"]
    assert count(1, "property", "properties") == "1 property"
    assert count(3, "property", "properties") == "3 properties"


def test_the_cli_says_1_rule_and_1_connection(capsys):
    import argparse

    from netstack import cli

    fk, _ = up("configs/basic.toml")
    ns = argparse.Namespace(stack="main", qube="work", action="add", before=None, json=False,
                            words=["action=accept", 'comment="web only"'], kernel=fk)
    assert cli.cmd_firewall(ns) == 0
    assert "work: added; 1 rule in force" in capsys.readouterr().out
    ns = argparse.Namespace(stack="main", qube="work", action="list", json=False, kernel=fk)
    assert cli.cmd_firewall(ns) == 0
    assert '1  action=accept comment="web only"' in capsys.readouterr().out
    from netstack.kernel import Flow

    p = plan_of()
    fk.flows[p.qube("sys-firewall").netns] = [
        Flow("tcp", p.qube("work").ipv4, "198.51.100.80", 40000, 80)]
    ns = argparse.Namespace(stack="main", qube="work", netvm="none", json=False, kernel=fk)
    assert cli.cmd_attach(ns) == 0
    assert "; 1 connection cut)" in capsys.readouterr().out


def _leaktest_rule(fk, qube="work", expire="+3"):
    """What `leaktest --rules` adds in front of the list (then it is killed)."""
    firewall_live.change("main", qube, "add", [
        "action=accept", "dsthost=203.0.113.10", "proto=tcp", "dstports=22",
        f"expire={expire}", f"comment={firewall_live.LEAKTEST_MARK}"], number=1, kernel=fk)


def test_killed_leaktest_rules_are_removed_once_expired_and_the_list_is_as_before():
    fk, _ = up("configs/basic.toml")
    firewall_live.change("main", "work", "add", ["action=accept", "specialtarget=dns"],
                         kernel=fk)
    before = firewall_live.rules_of(plan_of(), "work")
    for _ in range(3):  # three killed runs piled up
        _leaktest_rule(fk)
    assert len(qubefw.load_overlay("main")["work"]) == 4
    # not expired yet: a running leaktest's own rule stays
    assert firewall_live.drop_leaktest_rules("main", kernel=fk, now=0) == {}
    later = time.time() + 10
    assert firewall_live.drop_leaktest_rules("main", kernel=fk, now=later) == {"work": 3}
    assert firewall_live.rules_of(plan_of(), "work") == before
    assert len(qubefw.load_overlay("main")["work"]) == 1
    n = len(fk.events)
    assert firewall_live.drop_leaktest_rules("main", kernel=fk, now=later) == {}
    assert fk.events[n:] == []  # nothing to do: no transaction


def test_leaktest_rule_dropped_from_a_config_list_gives_it_back_to_the_config(tmp_path):
    """The list was the config's: without the leaktest rule it is the config's again (as
    `reset`); a user's rule with the same comment but no expiry is never touched."""
    fk, _ = up("tests/configs/firewall-rules.toml")
    before = firewall_live.rules_of(plan_of(), "work")
    _leaktest_rule(fk)
    firewall_live.change("main", "personal", "add", [
        "action=drop", f"comment={firewall_live.LEAKTEST_MARK}"], kernel=fk)
    assert firewall_live.drop_leaktest_rules("main", kernel=fk,
                                             now=time.time() + 100) == {"work": 1}
    assert "work" not in qubefw.load_overlay("main")
    assert firewall_live.listing("main", "work")["source"] == "config"
    assert firewall_live.rules_of(plan_of(), "work") == before
    assert len(qubefw.load_overlay("main")["personal"]) == 1


def test_firewall_list_drops_an_expired_leaktest_rule(capsys, monkeypatch):
    import argparse

    from netstack import cli

    fk, _ = up("configs/basic.toml")
    firewall_live.change("main", "work", "add", ["action=accept", "specialtarget=dns"],
                         kernel=fk)
    _leaktest_rule(fk)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 10)
    ns = argparse.Namespace(stack="main", qube="work", action="list", json=False, kernel=fk)
    assert cli.cmd_firewall(ns) == 0
    out = capsys.readouterr()
    assert "removed 1 expired rule an interrupted `leaktest --rules` left" in out.err
    assert "leaktest expiry" not in out.out
    assert "  1  action=accept specialtarget=dns" in out.out and "  2  " not in out.out
