"""The uplink watch (`netstack watch`, or a supervisor thread with `[stack] watch = true`):
a packet socket on sys-net's uplink whose kernel filter (netstack/watchfilter.py) drops
everything the chain allows out, so any packet that reaches it is an alarm.

The socket is made inside sys-net's namespace, of type SOCK_DGRAM (the filter's offsets
count from the network header on any kind of uplink), with no protocol until the filter
is attached and only then bound to the uplink: no packet reaches it unfiltered. The
allowed set is re-read about once a second (the plan in force, each VPN qube's failover
state, the uplink's addresses, the DHCP lease, a public-network Tor gateway's guards) and
the filter re-attached when it changes; a packet the filter passed is judged again with
facts read at that moment before it counts (a filter one failover or one new guard
behind never raises a false alarm: same program, fresher facts).

An alarm: with `on_leak = "cut"` the uplink is set down first (one netlink request), then
the packet goes to the pcap (`STACKDIR/watch.pcap`, Linux cooked capture), the alarm to
`STACKDIR/watch.json` (which `status` reads: DEGRADED, exit 1), to the log (stderr: the
supervisor's log) and to syslog, hence the journal. `netstack watch --clear` forgets the
alarms and sets a cut uplink up again."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from netstack import codec
from netstack.errors import NetstackError, StateError, UsageError
from netstack.kernel import Kernel, proc_alive, proc_start_time
from netstack.state import State, require
from netstack.watchfilter import (
    ALARM,
    Alarm,
    Allowed,
    Cleared,
    WatchFile,
    allowed,
    decode,
    pack,
    program,
    run,
)

FILE, PCAP, CLEARED = "watch.json", "watch.pcap", "watch-cleared.json"
ETH_P_ALL = 0x0003
SO_ATTACH_FILTER, SO_TIMESTAMPNS = 26, 35
SOL_PACKET, PACKET_AUXDATA, TP_STATUS_VLAN_VALID = 263, 8, 0x10
KEEP_ALARMS = 100  # alarms kept in watch.json (all are counted)
KEEP_PACKETS = 10000  # packets kept in the pcap
REFRESH_S = 1.0  # how often the allowed set is re-read while nothing happens
LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL = 1, 113


def paths(stack_dir: str) -> tuple[str, str, str]:
    return (os.path.join(stack_dir, FILE), os.path.join(stack_dir, PCAP),
            os.path.join(stack_dir, CLEARED))


def read(stack_dir: str) -> WatchFile | None:
    """The watch's file; None when no watch ever ran on this stack (or it is damaged)."""
    from netstack.errors import DamagedFile

    try:
        return codec.read(paths(stack_dir)[0], WatchFile)
    except (OSError, DamagedFile):
        return None


def alive(w: WatchFile | None) -> bool:
    return w is not None and not w.stopped and proc_alive(w.pid, w.start)


# --- the live facts -------------------------------------------------------------------

def facts(st: State, k: Kernel, tor: Callable[[str], set[tuple[str, int]]] | None = None
          ) -> Allowed:
    """The allowed set from the plan in force and what is live now."""
    from netstack.dhcp import DhcpInfo, read_lease
    from netstack.tor.gateway import TorInfo
    from netstack.vpn.info import VpnInfo, transport

    plan = st.plan
    assert plan is not None
    net = plan.net
    own = [a.split("/")[0] for x in k.links(net.netns) if x.name == net.upstream_if
           for a in x.addresses]
    trans = {i.qube: transport(i.current(), st.data.resolved.get(i.qube))
             for i in plan.infos(VpnInfo)}
    resolvers = list(plan.upstream_dns)
    if isinstance(net.info, DhcpInfo):
        lease = read_lease(net.info.lease_file)
        resolvers += lease.dns if lease and lease.bound else []
    peers: dict[str, set[tuple[str, int]]] = {}
    for t in plan.infos(TorInfo):
        if not t.lab_network and not t.bridges:
            peers[t.qube] = (tor or tor_peers)(t.control_socket)
    return allowed(plan, own=own, transport=trans, resolvers=resolvers, tor_peers=peers)


def tor_peers(control_socket: str) -> set[tuple[str, int]]:
    """A public-network gateway's guards and the relays it has OR connections to, with
    their addresses from its consensus (tor's control port). Nothing when tor does not
    answer: its connections are then alarms until it does (fail closed)."""
    from netstack.tor.control import TorError, connect

    try:
        c = connect(control_socket, timeout=0.5)
    except TorError:
        return set()
    try:
        fps = set()
        for line in (c.get_info("entry-guards", "") or "").splitlines():
            w = line.split()
            if w and w[0].startswith("$"):
                fps.add(w[0][1:].split("~")[0].split("=")[0])
        for line in (c.get_info("orconn-status", "") or "").splitlines():
            w = line.split()
            if w and w[0].startswith("$"):
                fps.add(w[0][1:].split("~")[0].split("=")[0])
        out = set()
        for fp in fps:
            with contextlib.suppress(Exception):
                ns = c.get_network_status(fp)
                out.add((ns.address, ns.or_port))
        return out
    finally:
        c.close()


# --- the socket -----------------------------------------------------------------------

def attach(s: socket.socket, prog: list[tuple[int, int, int, int]]) -> None:
    """SO_ATTACH_FILTER: replaces the socket's filter in one step (the kernel copies it)."""
    raw = pack(prog)
    buf = ctypes.create_string_buffer(raw, len(raw))
    fprog = struct.pack("HL", len(prog), ctypes.addressof(buf))
    s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def link_header(k: Kernel, netns: str, dev: str) -> int:
    """ETH_HLEN for an Ethernet-like uplink (a 6-byte hardware address: Ethernet, Wi-Fi,
    veth), read whole; 0 for one without a link header (tun, PPP, WWAN)."""
    from netstack.watchfilter import ETH_HLEN

    for x in k.links(netns):
        if x.name == dev:
            return ETH_HLEN if x.mac and len(x.mac.split(":")) == 6 else 0
    raise StateError(f"sys-net has no uplink {dev} in {netns}; fix: `netstack status`")


def open_socket(k: Kernel, netns: str, dev: str, prog: list[tuple[int, int, int, int]],
                l2: int) -> socket.socket:
    """The packet socket in `netns`, its filter attached before it is bound to `dev`:
    SOCK_RAW (the whole frame) on an Ethernet-like uplink, else SOCK_DGRAM."""
    with k.inside(netns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW if l2 else socket.SOCK_DGRAM, 0)
    try:
        attach(s, prog)
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)  # a VLAN tag kept out of band
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((dev, ETH_P_ALL))
    except OSError as e:
        s.close()
        raise StateError(f"cannot watch {dev} in {netns}: {e.strerror or e}") from None
    return s


class Pcap:
    """An append-only pcap of the alarms' packets: Ethernet frames, or Linux cooked
    capture for an uplink without link header (what a SOCK_DGRAM socket gives)."""

    def __init__(self, path: str, l2: int) -> None:
        self.l2 = l2
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.f = os.fdopen(fd, "ab")
        self.n = 0
        if self.f.tell() == 0:
            self.f.write(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 1 << 18,
                                     LINKTYPE_ETHERNET if l2 else LINKTYPE_LINUX_SLL))
            # (magic 0xa1b23c4d: nanosecond timestamps)
            self.f.flush()
        else:
            self.n = _count(path)

    def add(self, ts: float, data: bytes, addr: tuple[Any, ...]) -> int | None:
        if self.n >= KEEP_PACKETS:
            return None
        if self.l2:
            frame = data
        else:
            _ifname, proto, pkttype, hatype, mac = (list(addr) + [0, 0, 0, b""])[:5]
            mac = bytes(mac)[:8]
            frame = struct.pack("!HHH8sH", pkttype, hatype, len(mac), mac.ljust(8, b"\0"),
                                proto) + data
        sec = int(ts)
        self.f.write(struct.pack("<IIII", sec, int((ts - sec) * 1e9), len(frame), len(frame))
                     + frame)
        self.f.flush()
        self.n += 1
        return self.n - 1

    def close(self) -> None:
        self.f.close()


def _count(path: str) -> int:
    n, off = 0, 24
    with open(path, "rb") as f:
        data = f.read()
    while off + 16 <= len(data):
        incl = struct.unpack("<I", data[off + 8:off + 12])[0]
        off += 16 + incl
        n += 1
    return n


# --- the watch ------------------------------------------------------------------------

class Watch:
    """One watch of one stack's uplink, until `stopping` is set."""

    def __init__(self, stack: str, k: Kernel, *, on_leak: str, by: str,
                 stopping: threading.Event, report: Callable[[Alarm], None] | None = None,
                 tor: Callable[[str], set[tuple[str, int]]] | None = None) -> None:
        if on_leak not in ("log", "cut"):
            raise UsageError(f"on_leak {on_leak!r}: give log or cut")
        self.stack, self.k, self.on_leak, self.by = stack, k, on_leak, by
        self.stopping, self.report, self.tor = stopping, report, tor
        self.st = require(stack)
        self.file_path, self.pcap_path, self.cleared_path = paths(self.st.dir)
        self._mtimes: tuple[float, ...] = ()
        plan = self.st.plan
        assert plan is not None
        self.netns, self.dev = plan.net.netns, plan.net.upstream_if
        self.l2 = link_header(k, self.netns, self.dev)
        self.allowed = facts(self.st, k, tor)
        self.prog = program(self.allowed, self.l2)
        self.sock: socket.socket | None = None
        self.pcap: Pcap | None = None
        self.cleared_seen = self._cleared_at()
        self.wf = WatchFile(os.getpid(), proc_start_time(os.getpid()), by, on_leak,
                            time.time(), time.time(), self.dev, self.netns,
                            self.allowed.to_json(), len(self.prog), pcap=self.pcap_path)
        self._last_write = 0.0
        self._last_refresh = time.monotonic()
        self._last_error = ""

    # the facts' sources: a change in any of them recomputes the allowed set
    def _sources(self) -> list[str]:
        from netstack.dhcp import DhcpInfo
        from netstack.vpn.info import VpnInfo

        plan = self.st.plan
        assert plan is not None
        out = [self.st.path, self.st.plan_path]
        out += [i.server_file for i in plan.infos(VpnInfo)]
        if isinstance(plan.net.info, DhcpInfo):
            out.append(plan.net.info.lease_file)
        return out

    def _stat(self) -> tuple[float, ...]:
        out = []
        for p in self._sources():
            try:
                out.append(os.stat(p).st_mtime_ns)
            except OSError:
                out.append(0)
        return tuple(out)

    def refresh(self) -> bool:
        """Re-read the facts; re-attach the filter when the allowed set changed. True when
        it changed."""
        m = self._stat()
        if m != self._mtimes:
            st = State.load(self.stack)
            if st is not None and st.plan is not None:
                self.st = st
            self._mtimes = self._stat()
        self._last_refresh = time.monotonic()
        new = facts(self.st, self.k, self.tor)
        if new.digest() == self.allowed.digest():
            return False
        self.allowed, self.prog = new, program(new, self.l2)
        if self.sock is not None:
            attach(self.sock, self.prog)
        self.wf.allowed, self.wf.instructions = new.to_json(), len(self.prog)
        self.wf.reattached += 1
        return True

    def _cleared_at(self) -> float:
        try:
            return codec.read(self.cleared_path, Cleared).at
        except (OSError, ValueError, NetstackError):
            return 0.0

    def write(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_write < 0.2:
            return
        self.wf.heartbeat = now
        codec.write(self.file_path, self.wf)
        self._last_write = now

    def run(self) -> None:
        self._mtimes = self._stat()
        self.sock = open_socket(self.k, self.netns, self.dev, self.prog, self.l2)
        self.pcap = Pcap(self.pcap_path, self.l2)
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        self.write(force=True)
        _log(f"watching {self.dev} in {self.netns} ({self.by}, on_leak={self.on_leak}): "
             f"{len(self.prog)} filter instructions; allowed: "
             + "; ".join(self.allowed.why))
        try:
            while not self.stopping.is_set():
                if sel.select(0.25):
                    self._drain()
                if time.monotonic() - self._last_refresh >= REFRESH_S:
                    try:
                        if self.refresh():
                            _log("allowed set changed: filter re-attached ("
                                 + "; ".join(self.allowed.why) + ")")
                    except Exception as e:  # noqa: BLE001 - keep watching with the last set
                        self._last_refresh = time.monotonic()
                        if str(e) != self._last_error:
                            self._last_error = str(e)
                            _log(f"cannot re-read the facts ({e}); the last allowed set "
                                 "stays in force")
                    c = self._cleared_at()
                    if c > self.cleared_seen:
                        self.cleared_seen = c
                        self.wf.alarms, self.wf.count, self.wf.cut = [], 0, False
                    self.write()
        finally:
            sel.close()
            self.sock.close()
            self.pcap.close()
            self.wf.stopped = True
            with contextlib.suppress(OSError):
                self.write(force=True)

    def _drain(self) -> None:
        assert self.sock is not None
        while True:
            try:
                data, anc, _flags, addr = self.sock.recvmsg(
                    ALARM, socket.CMSG_SPACE(16) + socket.CMSG_SPACE(20), socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as e:
                # ENETDOWN once when the uplink goes down (our own cut, or anyone's): the
                # kernel unhooks the socket then, and hooks it again when the link is up
                if e.errno == errno.ENETDOWN:
                    return
                raise
            ts, vlan = time.time(), False
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(raw) >= 16:
                    sec, nsec = struct.unpack("qq", raw[:16])
                    ts = sec + nsec / 1e9
                elif level == SOL_PACKET and kind == PACKET_AUXDATA and len(raw) >= 4:
                    vlan = bool(struct.unpack("I", raw[:4])[0] & TP_STATUS_VLAN_VALID)
            how = {"proto": addr[1], "pkttype": addr[2], "vlan": vlan}
            if run(self.prog, data, **how) != ALARM or (
                    self._stale() and run(self.prog, data, **how) != ALARM):
                continue  # allowed by the facts as they are now (a failover, a guard)
            self.alarm(ts, data, addr, vlan)

    def _stale(self) -> bool:
        """Re-read the facts before an alarm counts (at most every 50 ms in a storm)."""
        if time.monotonic() - self._last_refresh < 0.05:
            return False
        try:
            return self.refresh()
        except Exception:  # noqa: BLE001 - facts that cannot be read: judge with the old
            return False

    def alarm(self, ts: float, data: bytes, addr: tuple[Any, ...], vlan: bool = False
              ) -> None:
        cut_at = None
        if self.on_leak == "cut" and not self.wf.cut:
            try:
                self.k.link_down(self.netns, self.dev)
                cut_at = time.time()
                self.wf.cut = True
            except Exception as e:  # noqa: BLE001 - the alarm must still be raised
                _log(f"could not set {self.dev} down: {e}")
        assert self.pcap is not None
        idx = self.pcap.add(ts, data, addr)
        if self.l2 and len(data) >= self.l2:
            headers = decode(data[self.l2:], int.from_bytes(data[12:14], "big"))
        else:
            headers = decode(data, addr[1])
        if vlan:
            headers["vlan_offloaded"] = True
        a = Alarm(time.time(), ts, headers, idx, cut_at)
        self.wf.count += 1
        if len(self.wf.alarms) < KEEP_ALARMS:
            self.wf.alarms.append(a)
        else:
            self.wf.alarms[-1] = a  # the first ones and the last one
        self.write(force=self.wf.count <= KEEP_ALARMS or cut_at is not None)
        msg = (f"LEAK on {self.dev} of stack {self.stack}: {a.headers['summary']}"
               + (f"; uplink set down {1000 * (cut_at - ts):.1f} ms after the packet"
                  if cut_at else "") + f"; pcap {self.pcap_path} #{idx}")
        _log(msg, alert=self.wf.count <= KEEP_ALARMS)
        if self.report is not None:
            self.report(a)


def _log(msg: str, alert: bool = False) -> None:
    """To stderr (the supervisor's log, or the terminal) and, for alarms, syslog: the
    journal where systemd runs."""
    print(f"netstack watch: {msg}", file=sys.stderr, flush=True)
    if alert:
        import syslog

        syslog.openlog("netstack-watch", 0, syslog.LOG_DAEMON)
        syslog.syslog(syslog.LOG_ALERT, msg)


def serve(stack: str, stopping: threading.Event, k: Kernel) -> None:
    """The supervisor's thread (SupervisorSpec.watch): watch until the stack stops; a
    crash is logged and the watch made again after a pause (status says it is not
    running meanwhile)."""
    import traceback

    while not stopping.is_set():
        try:
            st = require(stack)
            assert st.plan is not None
            Watch(stack, k, on_leak=st.plan.on_leak, by="supervisor",
                  stopping=stopping).run()
        except Exception:  # noqa: BLE001 - the daemons must run on
            traceback.print_exc()
            stopping.wait(1.0)


def foreground(stack: str, k: Kernel, on_leak: str, seconds: float | None,
               report: Callable[[Alarm], None]) -> Watch:
    """`netstack watch`: until Ctrl-C or `seconds`; refused while another watch runs."""
    st = require(stack)
    w = read(st.dir)
    if alive(w) and w is not None and w.pid != os.getpid():
        raise StateError(f"stack {stack!r} is already watched by the {w.by} (pid {w.pid}); "
                         f"fix: `netstack --stack {stack} watch --status` shows its alarms")
    stopping = threading.Event()
    watch = Watch(stack, k, on_leak=on_leak, by="command", stopping=stopping, report=report)
    if seconds is not None:
        t = threading.Timer(seconds, stopping.set)
        t.daemon = True  # Ctrl-C before it fires: nothing to wait for
        t.start()
    try:
        watch.run()
    except KeyboardInterrupt:
        stopping.set()
    except OSError:
        if os.path.isdir(st.dir):
            raise
        # `down` removed the stack (and the files the watch writes) under it
        raise StateError(f"stack {stack!r} went down while it was watched ("
                         f"{watch.wf.count} alarm(s) before)") from None
    return watch


def clear(stack: str, k: Kernel) -> dict[str, Any]:
    """Forget the alarms (the running watch does within a second) and set an uplink the
    watch cut up again."""
    st = require(stack)
    fpath, _pcap, cpath = paths(st.dir)
    w = read(st.dir)
    now = time.time()
    codec.write(cpath, Cleared(now))
    out = {"cleared": w.count if w else 0, "uplink_up_again": False}
    if w is not None and w.cut:
        plan = st.plan
        assert plan is not None
        net = plan.net
        k.link_up(net.netns, net.upstream_if)
        # a link set down loses its routes: put back the plan's (a DHCP client puts back
        # its own when it sees the carrier again)
        have = {(r.dst, r.dev) for r in k.routes(net.netns)}
        for r in plan.routes:
            if r.ns == net.netns and r.dev == net.upstream_if and (r.dst, r.dev) not in have:
                k.route_add(r)
        out["uplink_up_again"] = True
    if w is not None and alive(w):
        end = time.monotonic() + 3
        while time.monotonic() < end:
            got = read(st.dir)
            if got is None or got.count == 0:
                break
            time.sleep(0.05)
        else:
            raise StateError(f"the watch (pid {w.pid}) did not take the clearing in 3 s; "
                             "fix: `netstack status` tells whether it still runs")
    elif w is not None:
        w.alarms, w.count, w.cut = [], 0, False
        codec.write(fpath, w)
    return out


def show(stack: str, k: Kernel) -> dict[str, Any]:
    """The read form: who watches, what it allows (computed now, as a new watch would),
    the alarms since the last clearing."""
    st = require(stack)
    w = read(st.dir)
    now = facts(st, k)
    plan = st.plan
    assert plan is not None
    l2 = link_header(k, plan.net.netns, plan.net.upstream_if)
    out: dict[str, Any] = {"stack": stack, "running": alive(w) and w is not None and
                           time.time() - w.heartbeat < 5,
                           "allowed_now": now.to_json(), "instructions": len(program(now, l2))}
    if w is not None:
        out.update(codec.dump(w))
        out["running"] = bool(out["running"])
    return out
