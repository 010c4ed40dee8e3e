"""The evaluator's index of long chains (Ruleset.candidates) changes no verdict: random
long chains of exact, ranged and wild rules, with jumps and a return, give every packet and
every class the same verdict and trace with the index as without it (no root)."""

from __future__ import annotations

import random

import pytest

from netstack.audit.evaluator import Evaluator, Packet, Ruleset


def chain(seed: int, n: int = 120) -> dict:
    rnd = random.Random(seed)
    items = [{"table": {"family": "inet", "name": "t"}},
             {"chain": {"family": "inet", "table": "t", "name": "forward", "type": "filter",
                        "hook": "forward", "prio": 0, "policy": rnd.choice(["accept",
                                                                            "drop"])}},
             {"chain": {"family": "inet", "table": "t", "name": "sub"}}]

    def rule(chain_name: str, expr: list) -> None:
        items.append({"rule": {"family": "inet", "table": "t", "chain": chain_name,
                               "expr": expr, "comment": f"r{len(items)}"}})

    def m(left, right, op="=="):
        return {"match": {"op": op, "left": left, "right": right}}
    daddr = {"payload": {"protocol": "ip", "field": "daddr"}}
    dport = {"payload": {"protocol": "tcp", "field": "dport"}}
    for _i in range(n):
        exprs = []
        kind = rnd.random()
        if kind < 0.6:  # pinned on daddr (one or a few addresses)
            addrs = [f"203.0.113.{rnd.randrange(1, 20)}" for _ in range(rnd.choice([1, 1, 3]))]
            exprs.append(m(daddr, addrs[0] if len(addrs) == 1 else {"set": addrs}))
        elif kind < 0.75:  # a prefix: not pinned
            exprs.append(m(daddr, {"prefix": {"addr": "203.0.113.0", "len": 28}}))
        if rnd.random() < 0.7:
            exprs.append(m({"meta": {"key": "l4proto"}}, "tcp"))
            exprs.append(m(dport, rnd.choice([80, 443, {"range": [1000, 2000]}])))
        verdict = rnd.choice([{"accept": None}, {"drop": None}, {"jump": {"target": "sub"}}])
        rule("forward", exprs + [verdict])
    for _i in range(60):
        rule("sub", [m(daddr, f"203.0.113.{rnd.randrange(1, 20)}"),
                     rnd.choice([{"accept": None}, {"drop": None}, {"return": None}])])
    return {"nftables": items}


@pytest.mark.parametrize("seed", range(6))
def test_the_index_changes_no_verdict(seed, monkeypatch):
    doc = chain(seed)
    rnd = random.Random(100 + seed)
    pkts = [Packet(iifname="a", oifname="b", saddr="10.0.0.1",
                   daddr=f"203.0.113.{rnd.randrange(0, 24)}", l4proto=rnd.choice(["tcp",
                                                                                  "udp"]),
                   dport=rnd.choice([80, 443, 1500, 22])) for _ in range(80)]

    def run(index_from: int) -> tuple[list, list]:
        monkeypatch.setattr(Ruleset, "INDEX_FROM", index_from)
        ev = Evaluator(Ruleset(doc))
        one = [(o.verdict, [str(s) for s in o.trace]) for o in
               (ev.run_hook("forward", p) for p in pkts)]
        classes: list = []
        ev2 = Evaluator(Ruleset(doc))
        ev2.explore("forward", {}, lambda e, v, tr, nat, tn: classes.append(
            (v, tuple(str(s) for s in tr))))
        return one, sorted(classes)
    with_index, without = run(8), run(10**9)
    assert with_index[0] == without[0]
    assert with_index[1] == without[1]
