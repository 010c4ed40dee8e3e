"""Send crafted packets from inside a namespace the way a hostile root user would: scapy's
AF_PACKET sockets, which bypass the sending namespace's own output rules. Run through
`ip netns exec NS python -m netstack.leaktest.send SPEC_JSON`; prints one JSON line.

A spec is a list of packets: {"dst", "src"?, "proto": tcp|udp|icmp, "dport"?, "sport"?,
"flags"? (TCP), "payload"?, "ttl"? (IPv6: the hop limit), "tos"? (IPv6: the traffic class),
"count"?}.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def build6(p: dict[str, Any]) -> Any:
    """IPv6 goes out at layer 2 (the workstation has IPv6 disabled, a hostile root does not
    care): Ethernet broadcast on the given interface."""
    from scapy.layers.inet import TCP, UDP
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    if p.get("mac"):
        mac = p["mac"]
    elif p.get("via"):
        from scapy.layers.l2 import getmacbyip

        mac = getmacbyip(p["via"]) or "ff:ff:ff:ff:ff:ff"
    else:
        mac = "ff:ff:ff:ff:ff:ff"
    proto = p.get("proto", "udp6")
    # neighbour discovery is only taken with hop limit 255
    nd = proto in ("ns6", "ra6") or 133 <= p.get("icmp_type", 0) <= 137
    pkt = Ether(dst=mac) / IPv6(src=p.get("src", "fe80::1"), dst=p["dst"],
                                hlim=255 if nd else p.get("ttl", 64), tc=p.get("tos", 0))
    if proto == "ns6":
        from scapy.arch import get_if_hwaddr
        from scapy.layers.inet6 import ICMPv6ND_NS, ICMPv6NDOptSrcLLAddr

        pkt /= ICMPv6ND_NS(tgt=p.get("tgt", p["dst"]))
        pkt /= ICMPv6NDOptSrcLLAddr(lladdr=get_if_hwaddr(p.get("iface", "eth0")))
    elif proto == "ra6":
        from scapy.layers.inet6 import ICMPv6ND_RA

        pkt /= ICMPv6ND_RA()
    elif proto == "tcp6":
        pkt /= TCP(sport=p.get("sport", 40000), dport=p.get("dport", 80),
                   flags=p.get("flags", "S"), seq=p.get("seq", 1000))
    elif proto == "icmp6" and p.get("icmp_type", 128) != 128:  # any other type, 8 bytes
        from scapy.layers.inet6 import ICMPv6Unknown

        pkt /= ICMPv6Unknown(type=p["icmp_type"], code=p.get("icmp_code", 0),
                             msgbody=b"\0\0\0\0")
    elif proto == "icmp6":
        pkt /= ICMPv6EchoRequest()
    else:
        pkt /= UDP(sport=p.get("sport", 40000), dport=p.get("dport", 9))
    if p.get("payload") and not p.get("bare"):  # bare: a well-formed message, no marker
        pkt /= Raw(load=p["payload"].encode())
    return pkt


def build_l2(p: dict[str, Any]) -> Any:
    """ARP and other frames that never pass through IP routing."""
    from scapy.layers.l2 import ARP, Ether
    from scapy.packet import Raw

    if p["proto"] == "arp":
        pkt = Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, pdst=p["dst"], psrc=p.get("src",
                                                                              "0.0.0.0"))
    else:
        raise ValueError(f"unknown l2 proto {p['proto']}")
    if p.get("payload"):
        pkt /= Raw(load=p["payload"].encode())
    return pkt


def build(p: dict[str, Any]) -> Any:
    from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR, fragment
    from scapy.packet import Raw

    proto = p.get("proto", "udp")
    if proto.endswith("6"):
        return build6(p)
    if proto == "arp":
        return build_l2(p)

    ip_kw: dict[str, Any] = {"dst": p["dst"]}
    for k in ("src", "ttl", "id", "tos"):
        if k in p:
            ip_kw[k] = p[k]
    if "src" not in ip_kw:  # /32 links: scapy cannot infer the source from the subnet
        from scapy.config import conf
        from scapy.interfaces import resolve_iface

        iface = conf.route.route(p["dst"])[0]
        from scapy.arch import get_if_addr

        ip_kw["src"] = get_if_addr(resolve_iface(iface).name)
    if p.get("options") == "rr":
        ip_kw["options"] = [IPOption_RR()]
    if p.get("df"):
        ip_kw["flags"] = "DF"
    pkt = IP(**ip_kw)
    if (p.get("via") or p.get("mac")) and proto != "arp":  # force the frame to a next hop
        from scapy.layers.l2 import Ether, getmacbyip

        pkt = Ether(dst=p.get("mac") or getmacbyip(p["via"])) / pkt
    if proto == "tcp":
        pkt /= TCP(sport=p.get("sport", 40000), dport=p.get("dport", 80),
                   flags=p.get("flags", "S"), seq=p.get("seq", 1000))
    elif proto == "udp":
        pkt /= UDP(sport=p.get("sport", 40000), dport=p.get("dport", 9))
    elif proto == "icmp":
        pkt /= ICMP(type=p.get("icmp_type", 8), code=p.get("icmp_code", 0))
    elif proto == "ip":  # another IP protocol: GRE 47, ESP 50, SCTP 132, or any number
        pkt.proto = p["ipproto"]
    else:
        raise ValueError(f"unknown proto {proto}")
    load = (p.get("payload") or "").encode()
    if p.get("size"):
        load = (load * (p["size"] // max(1, len(load)) + 1))[: p["size"]]
    if load:
        pkt /= Raw(load=load)
    if p.get("frag"):
        frags = fragment(pkt, fragsize=p["frag"])
        if p.get("overlap") and len(frags) > 1:  # a second copy of fragment 1, shifted back
            dup = frags[1].copy()
            dup.frag = max(0, dup.frag - 1)
            frags.append(dup)
        return frags
    return pkt


def send_specs(specs: list[dict[str, Any]]) -> dict[str, Any]:
    """Send each spec; count only what the socket took. A spec that cannot be built or sent
    is reported with its index and the reason, never swallowed: a probe that did not leave
    proves nothing."""
    from scapy.config import conf
    from scapy.sendrecv import send

    conf.ifaces.reload()  # routes and links change (a tunnel comes and goes): re-read
    conf.route.resync()
    sent = 0
    failed: list[dict[str, Any]] = []
    for i, p in enumerate(specs):
        try:
            pkt = build(p)
            if p.get("proto", "").endswith("6") or p.get("proto") in ("arp",) \
                    or p.get("via") or p.get("mac"):
                from scapy.sendrecv import sendp

                sendp(pkt, iface=p.get("iface", "eth0"), count=p.get("count", 1),
                      verbose=False)
            else:
                send(pkt, count=p.get("count", 1), verbose=False)
            sent += p.get("count", 1)
        except (OSError, ValueError, KeyError) as e:  # e.g. no route, no such device
            failed.append({"index": i, "error": f"{type(e).__name__}: {e}"})
    return {"sent": sent, "failed": failed}


def main() -> None:
    from scapy.config import conf

    conf.verb = 0
    if sys.argv[1] == "--serve":  # one JSON list per line on stdin, one result line each
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            specs = json.loads(line)
            try:
                print(json.dumps(send_specs(specs)), flush=True)
            except Exception as e:  # the namespace around us may be going away (`down`)
                print(json.dumps({"sent": 0, "failed": [
                    {"index": i, "error": f"{type(e).__name__}: {e}"}
                    for i in range(len(specs))]}), flush=True)
        return
    print(json.dumps(send_specs(json.loads(sys.argv[1]))))


if __name__ == "__main__":
    main()
