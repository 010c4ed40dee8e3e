"""The forwarding fast path.

- Forward chains carry no INVALID or IPv6 drop of their own (prerouting dropped those for
  every forwarded packet): an established packet meets its accept as the first rule.
- nftables flowtables where the kernel has them (probed at `up`): the plain forwarding
  qubes (sys-net, sys-firewall) put established flows on one, so their later packets skip
  the IP stack's hooks. A flow enters it only after the ruleset accepted it: the `flow add`
  rule matches `ct state established` only (a connection is established only once its
  first packet was accepted everywhere) and sits right before the replies' accept; the
  audit models it as such (a packet reaching it makes its flow's later packets accepted).
  The flowtable names devices, which exist only once the links are made: the ruleset is
  loaded without it first and whole once every link exists (reconcile.diff).

Measured and left out (docs/benchmarks.md): GRO with UDP GRO forwarding on the veths (no
gain: this wireguard-go sends one datagram per syscall, nothing to aggregate), pinning
the two wireguard-go processes to one core each (slower)."""

from __future__ import annotations

import copy
import os
import subprocess
from typing import Any

FLOWTABLE = "fastpath"
PROBE = ("table inet netstack_probe {\n"
         " flowtable ft { hook ingress priority 0; devices = { lo }; }\n}\n")


def supported() -> bool:
    """Whether the kernel accepts a flowtable: `nft --check` (the kernel validates the
    batch and aborts it) in a network namespace of its own, so no ruleset of the host is
    touched. Needs root; without it the answer is no (the slow path is always correct)."""
    if os.geteuid() != 0:
        return False
    try:
        p = subprocess.run(["unshare", "--net", "nft", "-c", "-f", "-"], input=PROBE,
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0


def offload_rule() -> list[dict[str, Any]]:
    from netstack.rules.nft import ct_state, l4proto

    return [ct_state("established"), l4proto("tcp", "udp"),
            {"flow": {"op": "add", "flowtable": f"@{FLOWTABLE}"}}]


def _is_offload(item: dict[str, Any]) -> bool:
    if "flowtable" in item:
        return True
    r = item.get("rule")
    return bool(r) and any(isinstance(x, dict) and "flow" in x for x in r.get("expr", []))


def has_offload(ruleset: dict[str, Any] | None) -> bool:
    return bool(ruleset) and any(_is_offload(i) for i in ruleset.get("nftables", []))


def without_offload(ruleset: dict[str, Any]) -> dict[str, Any]:
    """The ruleset as it can be loaded before its devices exist (unchanged without one)."""
    if not has_offload(ruleset):
        return ruleset
    out = copy.deepcopy(ruleset)
    out["nftables"] = [i for i in out["nftables"] if not _is_offload(i)]
    return out
