"""The kernel as the judge of the audit (root): scratch namespaces where a ruleset is loaded
into a "device under test" and a packet meets it for real; its fate at each hook is read
from `nft monitor trace`. Incoming packets are sent from a neighbour namespace on the
interface the packet names; locally generated ones are sent from inside by a helper running
as the packet's uid and gid, with its mark; a mid-connection packet finds its connection
made beforehand with `conntrack -I`. Everything lives in namespaces made here and linked
only to each other (documentation addresses), and is removed by close().

Fate: a list of (hook, verdict) in the order the kernel reported them, ending at the first
drop, at delivery (input accepted) or after postrouting; ("route", "lost") when the packet
vanished without a verdict (no route, a martian).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import select
import subprocess
import sys
import time
from typing import Any

from netstack.audit.evaluator import Packet
from netstack.kernel import Kernel
from netstack.model import Route
from netstack.rules.nft import commands

OBS_PRIO = 2_000_000_000  # after every chain a ruleset can have
HOOKS = ("prerouting", "input", "forward", "output", "postrouting")
TRACE = "nsttrace"
TIMEOUT = float(os.environ.get("NETSTACK_ORACLE_TIMEOUT", "0.5"))  # s for a packet's trace


def trace_table() -> dict[str, Any]:
    """nftrace on at entry (prerouting, output), and an observer base chain last at every
    hook: a packet that reaches it passed the hook."""
    t = {"family": "inet", "name": TRACE}
    cmds: list[dict[str, Any]] = [{"add": {"table": t}}]
    for hook in HOOKS:
        cmds.append({"add": {"chain": {"family": "inet", "table": TRACE, "name": f"obs_{hook}",
                                       "type": "filter", "hook": hook, "prio": OBS_PRIO,
                                       "policy": "accept"}}})
    for hook in ("prerouting", "output"):
        cmds.append({"add": {"chain": {"family": "inet", "table": TRACE, "name": f"on_{hook}",
                                       "type": "filter", "hook": hook, "prio": -2_000_000_000,
                                       "policy": "accept"}}})
        cmds.append({"add": {"rule": {"family": "inet", "table": TRACE, "chain": f"on_{hook}",
                                      "expr": [{"mangle": {"key": {"meta": {"key": "nftrace"}},
                                                           "value": 1}}]}}})
    return {"nftables": cmds}


def netdev_trace(dev: str) -> dict[str, Any]:
    """nftrace on at the device's ingress (before any chain a ruleset can have there) and
    an observer last, as trace_table does for the inet hooks."""
    t = {"family": "netdev", "name": TRACE}
    cmds: list[dict[str, Any]] = [{"add": {"table": t}}]
    for name, prio in ((f"on_ingress_{dev}", -2_000_000_000), (f"obs_ingress_{dev}", OBS_PRIO)):
        cmds.append({"add": {"chain": {"family": "netdev", "table": TRACE, "name": name,
                                       "type": "filter", "hook": "ingress", "dev": dev,
                                       "prio": prio, "policy": "accept"}}})
    cmds.append({"add": {"rule": {"family": "netdev", "table": TRACE,
                                  "chain": f"on_ingress_{dev}",
                                  "expr": [{"mangle": {"key": {"meta": {"key": "nftrace"}},
                                                       "value": 1}}]}}})
    return {"nftables": cmds}


_LINE = re.compile(r"trace id (\S+) (\S+) (\S+) (\S+) (?:(?:unknown )?rule .*\(verdict (\w+)|"
                   r"verdict (\w+)|policy (\w+))")


class Lines:
    """Lines of a pipe with a deadline: select() on the descriptor and our own buffer (a
    buffered reader would keep lines select() cannot see)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def next(self, timeout: float) -> str | None:
        """The next line, or None when none came within timeout (or the pipe closed)."""
        end = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left < 0 or not select.select([self.fd], [], [], left)[0]:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode(errors="replace")

    def drain(self) -> None:
        while self.next(0) is not None:
            pass

SENDER = r"""
import json, socket, sys
SO_MARK = 36
for line in sys.stdin:
    p = json.loads(line)
    fam = socket.AF_INET6 if ":" in p["daddr"] else socket.AF_INET
    try:
        if p["proto"] == "tcp":
            s = socket.socket(fam, socket.SOCK_STREAM)
        elif p["proto"] == "udp":
            s = socket.socket(fam, socket.SOCK_DGRAM)
        else:
            s = socket.socket(fam, socket.SOCK_RAW, p["ipproto"])
        s.setsockopt(socket.SOL_SOCKET, SO_MARK, p["mark"])
        six = fam == socket.AF_INET6
        if p.get("ttl"):  # IP_TTL, IPV6_UNICAST_HOPS
            s.setsockopt(socket.IPPROTO_IPV6 if six else socket.IPPROTO_IP, 16 if six else 2,
                         p["ttl"])
        if not six:  # IP_MTU_DISCOVER: DF (0x4000 in frag-off) as the packet says
            s.setsockopt(socket.IPPROTO_IP, 10, 2 if p.get("frag", 0) & 0x4000 else 0)
        if p.get("tos"):  # IP_TOS, IPV6_TCLASS
            s.setsockopt(socket.IPPROTO_IPV6 if six else socket.IPPROTO_IP, 67 if six else 1,
                         p["tos"])
        if p.get("sport"):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((p["saddr"], p["sport"]))
        elif p.get("saddr"):
            s.bind((p["saddr"], 0))
        s.setblocking(False)
        if p["proto"] == "tcp":
            try:
                s.connect((p["daddr"], p["dport"]))
            except BlockingIOError:
                pass
        elif p["proto"] == "udp":
            s.sendto(b"nstkoracle", (p["daddr"], p["dport"]))
        else:
            echo = [128, 0, 0, 0, 0, 0, 0, 0] if fam == socket.AF_INET6 else \
                [8, 0, 0xF7, 0xFF, 0, 0, 0, 0]  # the kernel sums ICMPv6 itself
            s.sendto(bytes(echo), (p["daddr"], 0))
        print(json.dumps({"ok": True}), flush=True)
        s.close()
    except PermissionError:  # EPERM: netfilter dropped it on the way out (the trace says)
        print(json.dumps({"ok": True}), flush=True)
    except OSError as e:
        print(json.dumps({"ok": False, "error": str(e)}), flush=True)
"""


class KernelLab:
    """A device under test with one link per interface name it is asked for, each to a
    neighbour namespace; one ruleset at a time."""

    def __init__(self, ifaces: list[str], k: Kernel, tag: str | None = None) -> None:
        self.tag = tag or f"{os.getpid() % 100000}"
        self.k = k.fork()  # handles of its own (closed with the lab)
        self.dut = f"nso{self.tag}d"
        self.made: list[str] = []
        self.ifaces: dict[str, dict[str, Any]] = {}
        self.mon: subprocess.Popen | None = None
        self.restarts = 0
        self.probers: dict[str, Any] = {}
        self.senders: dict[tuple[int, int], subprocess.Popen] = {}
        self.local: set[str] = set()
        self.ingress = False  # the ruleset under test has ingress chains
        self._hooks: dict[tuple[str, str, str], str] | None = None
        try:
            self._make(ifaces)
        except BaseException:
            self.close()
            raise

    # --- the lab ----------------------------------------------------------------------
    def _ns(self, name: str) -> str:
        self.k.netns_create(name)
        self.made.append(name)
        return name

    def _make(self, ifaces: list[str]) -> None:
        k = self.k
        self._ns(self.dut)
        for key, v in (("net/ipv4/ip_forward", "1"), ("net/ipv6/conf/all/forwarding", "1"),
                       ("net/ipv4/conf/all/rp_filter", "0"),
                       ("net/ipv4/conf/default/rp_filter", "0")):
            k.sysctl(self.dut, key, v)
        for i, name in enumerate(ifaces):
            self.add_iface(name, i)
        k.link_up(self.dut, "lo")
        k.nft(self.dut, trace_table())
        self._monitor()

    def _monitor(self) -> None:
        """(Re)start `nft monitor`; line-buffered, as a pipe would otherwise hold the last
        events of a packet back. It can die of a netlink overrun: fate() restarts it."""
        if self.mon is not None:
            self.mon.kill()
            self.mon.wait()
            self.restarts += 1
        self.mon = subprocess.Popen(["ip", "netns", "exec", self.dut, "stdbuf", "-oL", "nft",
                                     "monitor", "trace"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.mon.stdout is not None
        self.out = Lines(self.mon.stdout.fileno())
        self._ready()

    def _ready(self, timeout: float = 5.0) -> None:
        """The monitor is listening once it reports the trace of a packet we send (an
        event, no sleep): a datagram to 127.0.0.1:9 from inside, until one is seen."""
        end = time.monotonic() + timeout
        probe = {"daddr": "127.0.0.1", "saddr": None, "proto": "udp", "ipproto": 17,
                 "dport": 9, "sport": 0, "mark": 0}
        while time.monotonic() < end:
            self._send(0, 0, probe)
            while (line := self.out.next(0.1)) is not None:
                if "daddr 127.0.0.1 " in line and "udp dport 9 " in line:
                    self.out.drain()
                    return
        raise RuntimeError("nft monitor did not start")

    def add_iface(self, name: str, i: int | None = None) -> None:
        """A link `name` of the DUT to a neighbour (192.0.2.0/24 cut into /28s; 2001:db8
        for IPv6), routes to nothing else."""
        if name in self.ifaces or name in ("", "lo"):
            return
        k = self.k
        i = len(self.ifaces) if i is None else i
        nbr = self._ns(f"nso{self.tag}n{i}")
        k.veth(self.dut, name, nbr, "p0")
        base = int(ipaddress.ip_address("192.0.2.0")) + 16 * i
        dut4, nbr4 = str(ipaddress.ip_address(base + 1)), str(ipaddress.ip_address(base + 2))
        dut6, nbr6 = f"2001:db8:{i + 1}::1", f"2001:db8:{i + 1}::2"
        k.sysctl(nbr, "net/ipv4/conf/all/rp_filter", "0")
        k.addr_add(self.dut, name, f"{dut4}/28")
        k.addr_add(nbr, "p0", f"{nbr4}/28")
        k.addr_add(self.dut, name, f"{dut6}/64")
        k.addr_add(nbr, "p0", f"{nbr6}/64")
        for ns, dev in ((self.dut, name), (nbr, "p0"), (nbr, "lo")):
            k.link_up(ns, dev)
        mac = next(x.mac for x in k.links(self.dut) if x.name == name)
        self.ifaces[name] = {"nbr": nbr, "dut4": dut4, "nbr4": nbr4, "dut6": dut6,
                             "nbr6": nbr6, "mac": mac}
        self.local |= {dut4, dut6}
        k.nft(self.dut, netdev_trace(name))
        # the neighbour counts the frames the DUT did not make itself that carry the
        # oracle's payload: a `fwd to` or `dup to` this link keeps the sender's Ethernet
        # source (what the DUT's stack sends carries its own); the payload keeps the
        # neighbours' own ARP and ND, moved by a rule without matches, out of the count
        mark = int.from_bytes(b"nstkoracle", "big")
        rules = []
        # udp and icmp carry it after 8 bytes, tcp after 20; any other IP protocol (ospf,
        # gre, a number) right after the IP header, as leaktest/send.py builds it
        known = ["udp", "icmp", "ipv6-icmp", "tcp"]
        for op, protos, offset in (("==", known[:3], 64), ("==", ["tcp"], 160),
                                   ("!=", known, 0)):
            rules.append({"add": {"rule": {"family": "netdev", "table": "nsobs",
                                           "chain": "moved", "expr": [
                {"match": {"op": "!=", "left": {"payload": {"protocol": "ether",
                                                            "field": "saddr"}}, "right": mac}},
                {"match": {"op": op, "left": {"meta": {"key": "l4proto"}},
                           "right": {"set": protos}}},
                {"match": {"op": "==", "left": {"payload": {"base": "th", "offset": offset,
                                                            "len": 80}}, "right": hex(mark)}},
                {"counter": None}]}}})
        # and every frame with the payload, whoever made it (later(): what a flowtable
        # forwarded, which no hook of the DUT saw)
        arrived = [{"add": {"rule": {**r["add"]["rule"], "chain": "arrived",
                                     "expr": r["add"]["rule"]["expr"][1:]}}} for r in rules]
        k.nft(nbr, {"nftables": [
            {"add": {"table": {"family": "netdev", "name": "nsobs"}}},
            {"add": {"chain": {"family": "netdev", "table": "nsobs", "name": "moved",
                               "type": "filter", "hook": "ingress", "dev": "p0", "prio": 0,
                               "policy": "accept"}}},
            {"add": {"chain": {"family": "netdev", "table": "nsobs", "name": "arrived",
                               "type": "filter", "hook": "ingress", "dev": "p0", "prio": 1,
                               "policy": "accept"}}}, *rules, *arrived]})

    def route(self, daddr: str, oif: str) -> None:
        """daddr reached through oif's neighbour (or, for "", not routed at all)."""
        if not oif:
            return
        self.add_iface(oif)
        v = ipaddress.ip_address(daddr).version
        via = self.ifaces[oif]["nbr4" if v == 4 else "nbr6"]
        self.k.route_add(Route(self.dut, f"{daddr}/{32 if v == 4 else 128}", oif, via))

    def make_local(self, daddr: str, iif: str) -> None:
        if daddr in self.local:
            return
        v = ipaddress.ip_address(daddr).version
        self.k.addr_add(self.dut, "lo", f"{daddr}/{32 if v == 4 else 128}")
        self.local.add(daddr)

    def load(self, ruleset: dict[str, Any]) -> None:
        """The ruleset under test (every table of it), beside the trace table."""
        doc = {"nftables": [i for i in _loadable(ruleset)["nftables"]
                            if not ("table" in i and i["table"]["name"] == TRACE)]}
        flush = [{"delete": {"table": {"family": t["family"], "name": t["name"]}}}
                 for t in self._tables() if t["name"] != TRACE]
        self._hooks = None
        # the device hook is part of the fate only where the ruleset has chains there (as
        # the evaluator's fate() reports it)
        self.ingress = any(i.get("chain", {}).get("hook") == "ingress"
                           for i in doc["nftables"])
        # the links a `fwd` of the ruleset names: where a stolen packet can have gone (the
        # other neighbours whose counters rise got copies, `dup`)
        self.fwd_devs = {str(e["fwd"].get("dev")) for i in doc["nftables"]
                         for e in i.get("rule", {}).get("expr", [])
                         if isinstance(e, dict) and isinstance(e.get("fwd"), dict)}
        self.k.nft(self.dut, {"nftables": flush + [{"add": i} for i in doc["nftables"]]})
        self.doc = doc
        self.flowtables = any("flowtable" in i for i in doc["nftables"])

    def _tables(self) -> list[dict[str, Any]]:
        return [i["table"] for i in self.k.nft_list(self.dut)["nftables"] if "table" in i]

    # --- one packet ---------------------------------------------------------------------
    def fate(self, p: Packet, timeout: float | None = None) -> list[tuple[str, str]]:
        """What the kernel does with this packet, hook by hook. `timeout`: how long to
        wait for its trace (NETSTACK_ORACLE_TIMEOUT, default 0.5 s; more under emulation,
        where a loaded VM reported packets late and they read as lost)."""
        timeout = TIMEOUT if timeout is None else timeout
        for _ in range(3):
            if self.mon is None or self.mon.poll() is not None:
                self._monitor()
            got = self._fate(p, timeout)
            if self.mon is not None and self.mon.poll() is None:
                return got
        raise RuntimeError("nft monitor keeps dying")

    def later(self, p: Packet, timeout: float | None = None) -> str:
        """Right after fate(p): the same packet again, on the connection the first one
        left. "fastpath" when a flowtable carried it (it reached a neighbour and no hook
        of the DUT saw it), else "hooks". The flows are cleared after."""
        timeout = TIMEOUT if timeout is None else timeout
        self._drain()
        before = self._moved("arrived")
        self._send_in(p)
        fate = self._read_fate(p, timeout)
        end = time.monotonic() + 0.2
        while True:
            after = self._moved("arrived")
            came = any(after[n] > before.get(n, 0) for n in after)
            if came or time.monotonic() > end:
                break
        seen = any(h in ("prerouting", "forward") for h, _ in fate)
        self._clear_flows()
        return "fastpath" if came and not seen else "hooks"

    def _offloaded(self) -> bool:
        p = subprocess.run(["ip", "netns", "exec", self.dut, "conntrack", "-L"],
                           capture_output=True, text=True)
        return "[OFFLOAD]" in p.stdout

    def _clear_flows(self, timeout: float = 5.0) -> None:
        """No flow left on a flowtable: a connection on one outlives `conntrack -F` (Linux
        6.1 refuses to delete an offloaded entry), and its flow would carry the next
        packet of the same addresses past every hook. Loading the ruleset again makes
        new flowtables; the old ones' flows are torn down when the kernel frees them
        (after the transaction), and only then can their entries go."""
        if not getattr(self, "flowtables", False) or not self._offloaded():
            return
        self.load(self.doc)
        end = time.monotonic() + timeout
        while self._offloaded():
            if time.monotonic() > end:
                raise RuntimeError("offloaded connections stayed after the flowtables went")
            time.sleep(0.02)
        self._flush_conntrack()

    def _fate(self, p: Packet, timeout: float) -> list[tuple[str, str]]:
        self._clear_flows()
        self._flush_conntrack()
        if p.ct_state == "established":
            self._connection(p)
        self._drain()
        before = self._moved() if self.ingress else {}
        if p.iifname:
            self._send_in(p)
        else:
            self._send_out(p)
        fate = self._read_fate(p, timeout)
        if not self.ingress:
            return fate
        # where the packet (fwd) or a copy (dup) arrived: a neighbour's counter rose, by
        # the number of frames (a `dup to X` and a `fwd to X` are two identical frames on X)
        got: dict[str, int] = {}
        end = time.monotonic() + (timeout if ("ingress", "stolen") in fate else 0.05)
        while True:
            now = self._moved()
            seen = {n: now[n] - before.get(n, 0) for n in now if now[n] > before.get(n, 0)}
            if seen and seen == got:  # two readings alike: every frame has arrived
                break
            got = seen
            if time.monotonic() > end:
                break
        rose = sorted(got)
        out: list[tuple[str, str]] = []
        for hook, verdict in fate:
            if (hook, verdict) == ("ingress", "stolen"):
                to = [n for n in rose if n == self._stolen_to()] or \
                    [n for n in rose if n in getattr(self, "fwd_devs", set())]
                if rose == to or len(rose) == 1:
                    to = rose
                if len(to) == 1:  # copies first (a dup goes on; fwd ends the packet)
                    out += [("ingress", f"dup {n}") for n in rose
                            for _ in range(got[n] - (n == to[0]))]
                    out.append(("ingress", f"fwd {to[0]}"))
                else:
                    out.append(("ingress", "stolen"))
                continue
            if hook == "ingress" and verdict in ("accept", "drop") and rose:
                out += [("ingress", f"dup {n}") for n in rose for _ in range(got[n])]
                rose = []
            out.append((hook, verdict))
        return out

    def _stolen_to(self) -> str | None:
        """The link the rule that stole our packet (trace: "rule handle N (verdict
        stolen)") sends it to: its `fwd` as the kernel lists the rule."""
        import re

        for line in reversed(getattr(self, "lines", [])):
            m = re.search(r"trace id \S+ (\w+) (\S+) (\S+) .*handle (\d+) \(verdict stolen\)",
                          line)
            if not m:
                continue
            fam, table, chain, handle = m.group(1), m.group(2), m.group(3), int(m.group(4))
            from netstack import netns

            with netns.entered(self.dut):  # a fwd's ifindex named by the DUT's own links
                listed = self.k.nft_list(self.dut)
            for i in listed.get("nftables", []):
                r = i.get("rule")
                if r and (r.get("family"), r.get("table"), r.get("chain"), r.get("handle")) \
                        == (fam, table, chain, handle):
                    for e in r.get("expr", []):
                        if isinstance(e, dict) and isinstance(e.get("fwd"), dict):
                            return str(e["fwd"].get("dev"))
            return None
        return None

    def _moved(self, chain: str = "moved") -> dict[str, int]:
        """Per DUT link: the frames its neighbour got that the DUT's stack did not send
        (chain "arrived": all frames with the payload)."""
        out = {}
        for name, nb in self.ifaces.items():
            doc = self.k.nft_list(nb["nbr"])
            out[name] = sum(e["counter"]["packets"] for i in doc["nftables"] if "rule" in i
                            and i["rule"].get("chain") == chain
                            for e in i["rule"]["expr"] if "counter" in e)
        return out

    def _flush_conntrack(self) -> None:
        subprocess.run(["ip", "netns", "exec", self.dut, "conntrack", "-F"],
                       capture_output=True)

    def _connection(self, p: Packet) -> None:
        """A connection this packet belongs to, seen both ways (ESTABLISHED)."""
        argv = ["ip", "netns", "exec", self.dut, "conntrack", "-I", "-s", p.saddr, "-d",
                p.daddr, "-p", p.l4proto, "-t", "60", "-u", "SEEN_REPLY,ASSURED"]
        if p.l4proto in ("tcp", "udp"):
            argv += ["--sport", str(p.sport or 0), "--dport", str(p.dport or 0)]
        if p.l4proto == "tcp":
            argv += ["--state", "ESTABLISHED"]
        if p.ctmark:
            argv += ["--mark", str(p.ctmark)]
        if p.l4proto == "icmp":
            argv += ["--icmp-type", "8", "--icmp-code", "0", "--icmp-id", "7"]
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"conntrack -I: {r.stderr.strip()}")

    def _send_in(self, p: Packet) -> None:
        from netstack.leaktest.prober import Prober

        self.add_iface(p.iifname or "")
        nb = self.ifaces[p.iifname or ""]
        pr = self.probers.get(nb["nbr"])
        if pr is None:
            pr = self.probers[nb["nbr"]] = Prober(nb["nbr"])
        six = p.family == "ipv6"
        spec: dict[str, Any] = {"dst": p.daddr, "src": p.saddr, "mac": nb["mac"],
                                "iface": "p0", "payload": "nstkoracle"}
        if six:
            spec["proto"] = {"tcp": "tcp6", "udp": "udp6"}.get(p.l4proto, "icmp6")
        elif p.l4proto in ("tcp", "udp", "icmp"):
            spec["proto"] = p.l4proto
        else:
            from netstack.audit.space import L4

            spec.update(proto="ip", ipproto=L4.get(p.l4proto, 253))
        if p.l4proto in ("tcp", "udp"):
            spec.update(dport=p.dport or 0, sport=p.sport or 0)
        if p.ttl is not None:
            spec["ttl"] = p.ttl
        if p.dscp or p.ecn:
            spec["tos"] = ((p.dscp or 0) << 2) | (p.ecn or 0)
        if p.l4proto == "tcp":
            spec["flags"] = "".join({"syn": "S", "ack": "A", "fin": "F", "rst": "R",
                                     "psh": "P", "urg": "U", "ecn": "E", "cwr": "C"}[f]
                                    for f in sorted(p.tcp_flags)) or ""
        if p.l4proto in ("icmp", "ipv6-icmp", "icmpv6") and p.icmp_type is not None:
            spec["icmp_type"] = p.icmp_type
            spec["icmp_code"] = p.icmp_code or 0
        r = pr.send([spec])
        if r.sent != 1:
            raise RuntimeError(f"could not send {spec}: {'; '.join(r.failed)}")

    def _sender(self, uid: int, gid: int) -> subprocess.Popen:
        s = self.senders.get((uid, gid))
        if s is None or s.poll() is not None:
            s = self.senders[(uid, gid)] = subprocess.Popen(
                ["ip", "netns", "exec", self.dut, "setpriv", f"--reuid={uid}", f"--regid={gid}",
                 "--clear-groups", "--inh-caps=+net_raw,+net_admin,+net_bind_service",
                 "--ambient-caps=+net_raw,+net_admin,+net_bind_service", sys.executable,
                 "-c", SENDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return s

    def _send_out(self, p: Packet) -> None:
        from netstack.audit.space import L4

        spec = {"daddr": p.daddr, "saddr": p.saddr if p.saddr in self.local else None,
                "proto": p.l4proto if p.l4proto in ("tcp", "udp") else "raw",
                "ipproto": L4.get(p.l4proto, 253), "dport": p.dport or 0,
                "sport": p.sport if p.sport and p.saddr in self.local else 0, "mark": p.mark,
                "ttl": p.ttl, "tos": ((p.dscp or 0) << 2) | (p.ecn or 0), "frag": p.frag or 0}
        self._send(p.skuid or 0, p.skgid or 0, spec)

    def _send(self, uid: int, gid: int, spec: dict[str, Any]) -> None:
        s = self._sender(uid, gid)
        assert s.stdin is not None and s.stdout is not None
        s.stdin.write(json.dumps(spec) + "\n")
        s.stdin.flush()
        r = json.loads(s.stdout.readline())
        if not r["ok"]:
            raise RuntimeError(f"could not send {spec}: {r['error']}")

    def _drain(self) -> None:
        self.out.drain()

    def _read_fate(self, p: Packet, timeout: float) -> list[tuple[str, str]]:
        assert self.mon is not None and self.mon.stdout is not None
        self.lines: list[str] = []  # our packet's trace
        self.seen: list[str] = []  # everything the monitor said meanwhile
        if self._hooks is None:
            self._hooks = self._chain_hooks()
        hooks = self._hooks
        fate: list[tuple[str, str]] = []
        dropped: set[str] = set()
        ours: str | None = None  # the trace id of our packet, from its "packet:" line
        hook: str | None = None
        # where it starts (not the looped-back tail of an earlier local packet)
        want = [f' packet: iif "{p.iifname}" ' if p.iifname else " packet: oif ",
                f"saddr {ipaddress.ip_address(p.saddr)} ",
                f"daddr {ipaddress.ip_address(p.daddr)} "]
        if p.l4proto in ("tcp", "udp") and p.dport:  # not a reply of the same two hosts
            want.append(f"{p.l4proto} dport {p.dport} ")
            if p.sport and (p.iifname or p.saddr in self.local):
                want.append(f"{p.l4proto} sport {p.sport} ")
        elif p.l4proto in ("icmp", "icmpv6", "ipv6-icmp"):  # not the kernel's echo reply
            from netstack.audit.space import ICMP6_TYPES, ICMP_TYPES

            names = {v: k for k, v in (ICMP_TYPES if p.family == "ipv4" else
                                       ICMP6_TYPES).items()}
            t = p.icmp_type if p.icmp_type is not None else (8 if p.family == "ipv4" else 128)
            want.append(f"{'icmp' if p.family == 'ipv4' else 'icmpv6'} type "
                        f"{names.get(t, t)} ")
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            line = self.out.next(end - time.monotonic())
            if line is None:
                break
            self.seen.append(line.rstrip())
            if ours is None:
                if all(w in line + " " for w in want):
                    ours = line.split()[2]
                continue
            if line.split()[2:3] != [ours]:
                continue
            self.lines.append(line.rstrip())
            words = line.split()
            if len(words) > 5:  # a regular chain runs within the hook of its base chain
                hook = hooks.get((words[3], words[4], words[5]), hook)
            m = _LINE.search(line)
            if not m or hook is None:
                continue
            table, chain = m.group(3), m.group(4)
            verdict = m.group(5) or m.group(6) or m.group(7)
            if hook == "ingress" and not self.ingress:
                continue  # the lab's own trace chains: not part of this ruleset's fate
            if verdict == "stolen":  # fwd: gone from this namespace's hooks
                fate.append((hook, "stolen"))
                return fate
            if verdict in ("drop", "reject"):
                fate.append((hook, "drop"))
                dropped.add(hook)
                return fate
            if table == TRACE and (chain == f"obs_{hook}" or chain.startswith(
                    f"obs_{hook}_")) and verdict == "accept":
                fate.append((hook, "accept"))
                if hook in ("input", "postrouting"):
                    return fate
        fate.append(("route", "lost"))
        return fate

    def _chain_hooks(self) -> dict[tuple[str, str, str], str]:
        out = {}
        for i in self.k.nft_list(self.dut)["nftables"]:
            c = i.get("chain")
            if c and c.get("hook"):
                out[(c["family"], c["table"], c["name"])] = c["hook"]
        return out

    def close(self) -> None:
        for pr in self.probers.values():
            with contextlib.suppress(Exception):
                pr.close()
        for s in self.senders.values():
            with contextlib.suppress(Exception):
                if s.stdin:
                    s.stdin.close()
                s.wait(5)
        if self.mon:
            self.mon.kill()
            self.mon.wait()
        for n in reversed(self.made):
            with contextlib.suppress(Exception):
                self.k.netns_delete(n)
        self.k.close()


ORDER = {"table": 0, "set": 1, "map": 1, "flowtable": 1, "chain": 2, "rule": 3}


def _loadable(doc: dict[str, Any]) -> dict[str, Any]:
    """A listed ruleset as something `add` takes: no metainfo, no handles; tables, then
    sets and maps, then chains, then rules (a rule may name any of them)."""
    items = []
    for item in doc.get("nftables", []):
        if "metainfo" in item:
            continue
        (kind, body), = item.items()
        items.append({kind: {k: v for k, v in body.items() if k != "handle"}})
    items.sort(key=lambda i: ORDER.get(next(iter(i)), 4))
    return {"nftables": items}


__all__ = ["KernelLab", "commands", "trace_table"]
