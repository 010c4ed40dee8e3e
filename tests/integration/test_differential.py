"""Differential testing (root): random rulesets made of exactly the constructs the evaluator
claims to model (tests/nftgen.py), random packets, each pair judged by the evaluator and by
the kernel (scratch namespaces, the packet sent for real, its fate read from nftrace; a
local packet is sent by a process of its uid and gid with its mark; a mid-connection one
finds its connection made with `conntrack -I`). Any disagreement fails the run and is
printed as a case ready for tests/differential_cases/, where the cases found so far are
replayed on every run (and by tests/unit/test_differential_cases.py without root)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from netstack.audit.evaluator import Packet, Ruleset, fate, fates
from tests import nftgen
from tests.realkernel import KERNEL

pytestmark = pytest.mark.root

PACKETS = 8  # per ruleset: loading a ruleset costs more than judging a packet
RULESETS = int(os.environ.get("NETSTACK_DIFF_RULESETS", "260"))  # 2,080 pairs
CASES = Path(__file__).parent.parent / "differential_cases"


@pytest.fixture(scope="module")
def dut():
    from netstack.audit.oracle import KernelLab

    lab = KernelLab(list(nftgen.IFACES), KERNEL)
    try:
        for table in (nftgen.FAR4, nftgen.FAR6):
            for addr, oif in table.items():
                lab.route(addr, oif)
        yield lab
    finally:
        lab.close()


FLOWS = {"checked": 0, "fastpath": 0}  # later packets judged (flowtables on)
CHOICES = {"taken": 0}  # packets whose fate the evaluator gave as one of several ways


def fastpath_expected(ruleset: dict, p: Packet, offloads: list) -> bool:
    """Whether the kernel carries this packet's flow on a flowtable after it, given the
    `flow add`s the evaluator says it reached: the model (a flow reaching one has its
    later packets accepted) and what nft_flow_offload_eval asks besides: a TCP or UDP
    connection already established, no FIN or RST, and the packet's input device on
    the flowtable (its ingress hook sees only those)."""
    if not offloads or p.l4proto not in ("tcp", "udp") or p.ct_state != "established" \
            or p.tcp_flags & {"fin", "rst"}:
        return False
    devs: set[str] = set()
    for _hook, table, name in offloads:
        for i in ruleset["nftables"]:
            f = i.get("flowtable")
            if f and (f["table"], f["name"]) == (table, name):
                devs |= {f["dev"]} if isinstance(f["dev"], str) else set(f["dev"])
    return p.iifname in devs


def judge(lab, ruleset: dict, packets: list[Packet]) -> list[dict]:
    """The disagreements of the evaluator with the kernel on these packets (with
    flowtables, also on the later packets of each packet's flow)."""
    lab.load(ruleset)
    rs = Ruleset(ruleset)
    out = []
    for p in packets:
        kernel = [list(x) for x in lab.fate(p)]
        offloads: list = []
        ours = [list(x) for x in fate(rs, p, nftgen.route, nftgen.LOCAL, nftgen.primary,
                                      offloads=offloads)]
        if kernel != ours and kernel in [[list(x) for x in f] for f in fates(
                rs, p, nftgen.route, nftgen.LOCAL, nftgen.primary)]:
            CHOICES["taken"] += 1  # one way of the choices the evaluator explores both
            continue  # ways (a limit, a dynamic set, a fib lookup): the kernel took it
        if kernel != ours:
            out.append({"why": "found by test_differential", "ruleset": ruleset,
                        "packet": p.describe(), "kernel": kernel, "evaluator": ours,
                        "trace": lab.lines})
            continue
        if lab.flowtables and p.iifname and not lab.ingress and \
                p.l4proto in ("tcp", "udp") and p.ct_state == "established":
            want = "fastpath" if fastpath_expected(ruleset, p, offloads) else "hooks"
            got = lab.later(p)
            FLOWS["checked"] += 1
            FLOWS["fastpath"] += got == "fastpath"
            if got != want:
                out.append({"why": "found by test_differential (a later packet of the "
                            "flow)", "ruleset": ruleset, "packet": p.describe(),
                            "kernel_later": got, "evaluator_later": want,
                            "offloads": offloads, "trace": lab.lines})
    return out


def test_evaluator_agrees_with_the_kernel(dut, record_property):
    stats = {"pairs": 0, "rulesets": 0}
    found: list[dict] = []

    @settings(max_examples=RULESETS, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate],  # no shrinking: each try is a load
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(ruleset=nftgen.rulesets(),
           packets=st.lists(nftgen.packets(), min_size=PACKETS, max_size=PACKETS))
    def one(ruleset, packets):
        found.extend(judge(dut, ruleset, packets))
        stats["pairs"] += len(packets)
        stats["rulesets"] += 1

    t = time.monotonic()
    one()
    took = time.monotonic() - t
    record_property("differential_pairs", stats["pairs"])
    record_property("differential_seconds", round(took, 1))
    print(f"\ndifferential: {stats['pairs']} pairs on {stats['rulesets']} rulesets in "
          f"{took:.1f} s, {len(found)} disagreements, monitor restarts {dut.restarts}, "
          f"{CHOICES['taken']} fates one of several ways"
          + (f"; flowtables: {FLOWS['checked']} later packets judged, "
             f"{FLOWS['fastpath']} carried by a flowtable" if nftgen.FLOWTABLES else ""))
    record_property("differential_later_packets", FLOWS["checked"])
    record_property("differential_either_way", CHOICES["taken"])
    where = os.environ.get("NETSTACK_DIFF_FOUND")  # a folder to keep what was found in
    for i, case in enumerate(found if where else []):
        Path(where, f"found-{os.getpid()}-{i}.json").write_text(json.dumps(case, indent=1))
    assert not found, "the evaluator and the kernel disagree; add to " \
        f"tests/differential_cases/:\n{json.dumps(found[0], indent=1)}"
    assert stats["pairs"] >= 2000 or RULESETS * PACKETS < 2000
    if nftgen.FLOWTABLES:  # the run with flowtables judged flows that took one
        assert FLOWS["fastpath"] > 0, FLOWS


@pytest.mark.parametrize("name", sorted(p.stem for p in CASES.glob("*.json")))
def test_found_cases_still_hold_in_the_kernel(dut, name):
    """Each case once found (or written down) still has the kernel's recorded fate."""
    case = json.loads((CASES / f"{name}.json").read_text())
    if case.get("needs") == "flowtables":
        from netstack import fastpath

        if not fastpath.supported():  # scripts/test-host's VM has them
            pytest.skip("this kernel has no flowtables")
    dut.load(case["ruleset"])
    got = [list(x) for x in dut.fate(nftgen.packet_from(case["packet"]))]
    assert got == case["kernel"], dut.lines
