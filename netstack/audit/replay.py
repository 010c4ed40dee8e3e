"""Ground truth for the audit: a counterexample packet sent into the kernel with the
ruleset loaded (audit/oracle.py), incoming, forwarded or locally generated (as the
counterexample's uid and gid, with its mark), new or mid-connection; the kernel's verdict
at the predicted hook confirms the evaluator's or not."""

from __future__ import annotations

from typing import Any

from netstack.audit.evaluator import Packet
from netstack.kernel import Kernel

NOT_REPLAYABLE = {"related": "a related packet needs the connection it relates to",
                  "untracked": "an untracked packet needs a notrack rule"}


def packet_from(ce: dict[str, Any]) -> Packet:
    kw = dict(ce)
    for k in ("tcp_flags", "ct_status"):
        if k in kw:
            kw[k] = frozenset(kw[k])
    return Packet(**kw)


def replay(ruleset: dict[str, Any], hook: str, ce: dict[str, Any], k: Kernel
           ) -> dict[str, Any]:
    """{'replayable', 'kernel_verdict', 'fate'} for one counterexample at `hook`."""
    from netstack.audit.oracle import KernelLab

    p = packet_from(ce)
    if p.ct_state in NOT_REPLAYABLE:
        return {"replayable": False, "why": NOT_REPLAYABLE[p.ct_state]}
    if hook == "egress":
        return {"replayable": False, "why": "the oracle traces the ingress hook, not egress"}
    if hook in ("output", "postrouting") and not p.iifname and p.skuid is None:
        return {"replayable": False, "why": "a packet without a socket (made by the kernel)"}
    ifaces = [x for x in (p.iifname, p.oifname) if x]
    if "lo" in ifaces:
        return {"replayable": False, "why": "a packet on lo: the replay sends packets on "
                "links of its own, and a namespace's lo is not one"}
    lab = KernelLab(ifaces or ["eth9"], k)
    try:
        lab.load(ruleset)
        if hook == "input":
            lab.make_local(p.daddr, p.iifname or "")
        elif p.oifname:
            lab.route(p.daddr, p.oifname)
        if not p.iifname:  # locally made: sent from the counterexample's own source
            lab.make_local(p.saddr, "")
        fate = lab.fate(p)
        lines = list(lab.lines)
    finally:
        lab.close()
    verdict = next((v for h, v in fate if h == hook), None)
    moved = [v.split(" ", 1)[1] for h, v in fate if h == "ingress" and
             v.startswith(("fwd ", "dup "))]
    if verdict is None and hook == "forward" and p.oifname in moved:
        verdict = "accept"  # an ingress chain sent it out of oifname past forward
    return {"replayable": True, "kernel_verdict": verdict or f"not reached ({fate})",
            "fate": fate, "lines": lines[:40]}
