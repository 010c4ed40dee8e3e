"""Ground truth for the audit: replay a counterexample packet in the kernel. The ruleset is
loaded into a scratch namespace whose links carry the counterexample's interface names,
the packet is sent in from a neighbour namespace with scapy, and `nft monitor trace`
(with `meta nftrace set 1` in a chain of our own) reports the verdict the kernel gave at
the predicted hook. Locally generated packets (output hook) and mid-connection states are
not replayable this way and say so."""

from __future__ import annotations

import contextlib
import os
import re
import select
import subprocess
import time
from typing import Any

from netstack.kernel import RealKernel
from netstack.leaktest.prober import Prober
from netstack.model import Route
from netstack.rules.nft import commands

TRACE_TABLE = {"nftables": [
    {"add": {"table": {"family": "inet", "name": "nstrace"}}},
    {"add": {"chain": {"family": "inet", "table": "nstrace", "name": "pre", "type": "filter",
                       "hook": "prerouting", "prio": -500, "policy": "accept"}}},
    {"add": {"rule": {"family": "inet", "table": "nstrace", "chain": "pre",
                      "expr": [{"mangle": {"key": {"meta": {"key": "nftrace"}},
                                           "value": 1}}]}}},
]}


def replay(ruleset: dict[str, Any], hook: str, ce: dict[str, Any],
           timeout: float = 5.0) -> dict[str, Any]:
    """{'replayable', 'kernel_verdict', 'lines'} for one counterexample at `hook`."""
    if hook == "output" or hook == "postrouting":
        return {"replayable": False, "why": "locally generated packets are not replayed"}
    state = ce.get("ct_state", "new")
    flags = ce.get("tcp_flags", [])
    if state not in ("new", "invalid"):
        return {"replayable": False, "why": f"ct state {state} needs a connection first"}
    tag = f"{os.getpid() % 100000}"
    dut, src, dst = f"nsrp{tag}d", f"nsrp{tag}s", f"nsrp{tag}o"
    iif = ce.get("iifname") or "eth9"
    oif = ce.get("oifname") or "eth8"
    fam = ce.get("family", "ipv4")
    k = RealKernel()
    made: list[str] = []
    mon = None
    try:
        for n in (dut, src, dst):
            k.netns_create(n)
            made.append(n)
            for key in ("net/ipv6/conf/all/disable_ipv6", "net/ipv6/conf/default/disable_ipv6"):
                k.sysctl(n, key, "0" if fam == "ipv6" else "1")
        k.sysctl(dut, "net/ipv4/ip_forward", "1")
        if fam == "ipv6":
            k.sysctl(dut, "net/ipv6/conf/all/forwarding", "1")
        k.veth(dut, iif, src, "x0")
        if oif != iif:
            k.veth(dut, oif, dst, "y0")
        k.nft(dut, commands(_loadable(ruleset)))
        k.nft(dut, TRACE_TABLE)
        for n, ifs in ((dut, [iif, oif, "lo"]), (src, ["x0", "lo"]), (dst, ["y0", "lo"])):
            for i in ifs:
                with contextlib.suppress(Exception):  # y0 when oif == iif
                    k.link_up(n, i)
        daddr = ce.get("daddr", "198.51.100.80")
        if fam == "ipv4":
            k.addr_add(dut, iif, "192.0.2.254/32")
            k.addr_add(dut, oif, "192.0.2.253/32")
            if hook == "input":
                k.addr_add(dut, iif, f"{daddr}/32")
            else:
                k.route_add(Route(dut, f"{daddr}/32", oif))
        else:
            k.route_add(Route(dut, f"{daddr}/128", oif))
        mac = next(x.mac for x in k.links(dut) if x.name == iif)
        mon = subprocess.Popen(["ip", "netns", "exec", dut, "nft", "monitor", "trace"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        spec = {"dst": daddr, "src": ce.get("saddr", "192.0.2.1"), "mac": mac,
                "iface": "x0", "payload": "nstkreplay"}
        l4 = ce.get("l4proto", "tcp")
        if fam == "ipv6":
            spec["proto"] = {"tcp": "tcp6", "udp": "udp6"}.get(l4, "icmp6")
        elif l4 in ("tcp", "udp", "icmp"):
            spec["proto"] = l4
        else:
            spec.update(proto="ip", ipproto={"gre": 47, "esp": 50, "sctp": 132}.get(l4, 253))
        if l4 in ("tcp", "udp"):
            spec.update(dport=ce.get("dport", 80), sport=ce.get("sport", 40000))
        if l4 == "tcp":
            fl = "".join({"syn": "S", "ack": "A", "fin": "F", "rst": "R", "psh": "P",
                          "urg": "U"}[f] for f in flags) if flags else ""
            spec["flags"] = "F" if state == "invalid" else (fl or "S")  # a bare FIN: INVALID
        lines: list[str] = []
        with Prober(src) as pr:
            end = time.monotonic() + timeout
            while time.monotonic() < end and not _final(lines, hook):
                pr.send([spec])
                _read(mon, lines, 0.2)
        return {"replayable": True, "kernel_verdict": _final(lines, hook), "lines": lines[:40]}
    finally:
        if mon:
            mon.kill()
            mon.wait()
        for n in made:
            k.netns_delete(n)
        k.close()


def _loadable(doc: dict[str, Any]) -> dict[str, Any]:
    """A listed ruleset as something `add` takes: no metainfo, no handles."""
    items = []
    for item in doc.get("nftables", []):
        if "metainfo" in item:
            continue
        (kind, body), = item.items()
        items.append({kind: {k: v for k, v in body.items() if k != "handle"}})
    return {"nftables": items}


def _read(mon: subprocess.Popen, lines: list[str], wait: float) -> None:
    assert mon.stdout is not None
    end = time.monotonic() + wait
    while time.monotonic() < end:
        r, _, _ = select.select([mon.stdout], [], [], max(0.0, end - time.monotonic()))
        if not r:
            return
        line = mon.stdout.readline()
        if not line:
            return
        lines.append(line.rstrip())


_VERDICT = re.compile(r"trace id \S+ (\S+) (\S+) (\S+) (?:rule .*\(verdict (\w+)|policy (\w+))")


def _final(lines: list[str], hook: str) -> str | None:
    """The kernel's last verdict in the netstack table's chain for `hook`."""
    chain = {"prerouting": "prerouting", "input": "input", "forward": "forward"}[hook]
    base = {"prerouting", "nat_prerouting", "input", "forward", "output", "nat_output",
            "nat_postrouting"}
    verdict = None
    for line in lines:
        m = _VERDICT.search(line)
        if m and m.group(2) != "nstrace" and (m.group(3) == chain or m.group(3) not in base):
            v = m.group(4) or m.group(5)
            if v in ("accept", "drop"):
                verdict = v
    return verdict
