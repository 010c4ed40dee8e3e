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
from typing import Any

FLOWTABLE = "fastpath"
PROBE = ("table inet netstack_probe {\n"
         " flowtable ft { hook ingress priority 0; devices = { lo }; }\n}\n")


_probe: dict[str, Any] = {}


def start_probe() -> None:
    """Start the probe in a thread of its own now; `supported()` takes its answer. The
    kernel takes ~15 ms to abort the probe's transaction (docs/field-notes.md, "nftables
    binding"): `up` starts it first and reads the config meanwhile."""
    if "thread" in _probe or os.geteuid() != 0:
        return
    import threading

    t = threading.Thread(target=_probe_thread, name="flowtable-probe", daemon=True)
    _probe["thread"] = t
    t.start()


def _probe_thread() -> None:
    _probe["answer"] = _probe_now()


def _probe_now() -> bool:
    """`nft --check` of a flowtable in a network namespace of this thread's own (unshare
    switches only the calling thread, and the thread ends after): no ruleset of the host is
    touched, and the handle is made only once the thread is in the new namespace."""
    try:
        from netstack import netns

        netns.unshare_thread()  # raises when it fails: never a handle of the host's
        import nftables

        h = nftables.Nftables()
        h.set_dry_run(True)  # nft -c: the kernel validates the batch and aborts it
        rc, _out, _err = h.cmd(PROBE)
        return rc == 0
    except Exception:  # noqa: BLE001 - no binding, no namespace: the slow path is correct
        return False


def supported() -> bool:
    """Whether the kernel accepts a flowtable (the probe above, in-process: forking
    `unshare --net nft -c` cost ~20 ms). Needs root; without it the answer is no (the
    slow path is always correct)."""
    if os.geteuid() != 0:
        return False
    start_probe()
    _probe["thread"].join(10)
    return bool(_probe.get("answer"))


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
