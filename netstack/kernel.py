"""The one seam between netstack and the host: namespaces, nftables transactions, links,
addresses, routes, sysctls, files and processes. Bring-up, teardown and live changes talk
only to a Kernel; `RealKernel` does it with pyroute2 and the nftables binding, and unit
tests use a recording fake (tests/fakekernel.py) to check the order of what was done.

Everything is addressed by namespace name (None: the namespace netstack runs in).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from netstack import netns
from netstack.codec import atomic_write  # noqa: F401  (re-exported: callers use it here)
from netstack.errors import ApplyError, StateError
from netstack.rtnl import iproute_class  # noqa: F401  (pyroute2, cheaply; hook.py uses it)

if TYPE_CHECKING:  # model's ~50 dataclasses cost ~13 ms to import: `down` never needs them
    from netstack.model import Route


@dataclass
class LinkState:
    name: str
    index: int
    state: str  # UP / DOWN / UNKNOWN (operstate)
    addresses: list[str] = field(default_factory=list)
    rx_bytes: int | None = None
    tx_bytes: int | None = None
    mac: str | None = None
    flags: int = 0  # IFF_*: admin up 0x1, carrier (lower up) 0x10000
    rx_packets: int | None = None
    tx_packets: int | None = None



def slow_factor() -> float:
    """How many times slower than a usual host this one starts and runs processes
    (NETSTACK_SLOW_FACTOR, default 1): an emulated VM, a loaded board. The deadlines netstack
    gives its own daemons to start (the lab's servers' readiness, `up`'s default waits for
    tunnels and Tor) are multiplied by it; a deadline a user gives on the command line is
    kept as given. Under TCG on a loaded 2-core host the lab's servers took over 60 s and a
    kernel WireGuard tunnel over 30 s (docs/field-notes.md, "qemu and Debian's kernel")."""
    from netstack.errors import UsageError

    raw = os.environ.get("NETSTACK_SLOW_FACTOR", "").strip()
    if not raw:
        return 1.0
    try:
        f = float(raw)
    except ValueError:
        f = 0.0
    if not 1.0 <= f <= 100.0:
        raise UsageError(f"NETSTACK_SLOW_FACTOR={raw!r}: a number from 1 to 100")
    return f


def _descends_from(pid: int, ancestor: int) -> bool:
    """Whether `ancestor` is among pid's parents (read from /proc; False once it is gone)."""
    seen = 0
    while pid > 1 and seen < 64:
        rest = proc_fields(pid)
        if rest is None:
            return False
        pid = int(rest[1])
        if pid == ancestor:
            return True
        seen += 1
    return False


class Kernel:
    """The interface. Every method either does what it says or raises (ApplyError for a
    refusal by the system); removals return False when there was nothing to remove."""

    real = False  # the host's own kernel (root needed), not a recording fake

    # namespaces and sysctls
    def netns_create(self, name: str) -> None: raise NotImplementedError
    def netns_delete(self, name: str) -> bool: raise NotImplementedError
    def netns_exists(self, name: str) -> bool: raise NotImplementedError
    def sysctl(self, ns: str | None, key: str, value: str) -> None: raise NotImplementedError
    def sysctl_get(self, ns: str | None, key: str) -> str: raise NotImplementedError
    def home_ns(self) -> str | None: raise NotImplementedError

    # nftables: one transaction per call
    def nft(self, ns: str | None, commands: dict[str, Any]) -> None:
        raise NotImplementedError

    def nft_list(self, ns: str | None) -> dict[str, Any]: raise NotImplementedError

    def nft_script(self, ns: str, text: str) -> str:
        """Run an nft script (text syntax); returns nft's error text, "" when it loaded."""
        raise NotImplementedError

    def nft_text(self, ns: str | None, command: str) -> tuple[int, str]:
        """(rc, output) of one nft command with text output (what the JSON leaves out,
        such as a device chain's devices in nft 1.0.6)."""
        raise NotImplementedError

    def netlink(self, ns: str | None) -> Any:
        """The namespace's netlink handle, for reads the seam does not wrap one by one (tc,
        XDP, ip rules: netstack.pathfacts): RealKernel's is a netstack.rtnl.Rtnl, which
        answers get_links/get_qdiscs/get_filters/get_rules as pyroute2's IPRoute does."""
        raise NotImplementedError

    # links, addresses, routes
    def veth(self, ns_a: str | None, if_a: str, ns_b: str, if_b: str) -> None:
        raise NotImplementedError

    def link_move(self, dev: str, ns: str, new_name: str) -> None: raise NotImplementedError

    def link_return(self, ns: str, names: list[str], dev: str, home: str | None) -> bool:
        raise NotImplementedError

    # a Wi-Fi uplink: its phy moves, with its netdev (docs/field-notes.md, "Wi-Fi")
    def wiphy(self, ns: str | None, dev: str) -> int | None:
        """The wiphy index of `dev` (None: not a wireless netdev, or no such device)."""
        return None

    def wifi_ssid(self, ns: str | None, dev: str) -> str | None:
        """The SSID `dev` is associated with (None: not associated)."""
        return None

    def phy_move(self, dev: str, phy: int, ns: str, new_name: str) -> None:
        raise NotImplementedError

    def phy_return(self, ns: str, phy: int, names: list[str], dev: str,
                   home: str | None) -> bool:
        """The phy back into `home` (None: the namespace netstack runs in) with its netdev
        named `dev` again; False when it was not in `ns`."""
        raise NotImplementedError

    def link_del(self, ns: str | None, ifname: str) -> bool: raise NotImplementedError
    def link_up(self, ns: str | None, ifname: str) -> None: raise NotImplementedError
    def link_down(self, ns: str | None, ifname: str) -> None: raise NotImplementedError

    def links(self, ns: str | None) -> list[LinkState]: raise NotImplementedError
    def addr_add(self, ns: str | None, ifname: str, cidr: str) -> None:
        raise NotImplementedError

    def addrs(self, ns: str | None) -> list[tuple[str, str]]: raise NotImplementedError
    def route_add(self, r: Route) -> None: raise NotImplementedError
    def route_del(self, r: Route) -> bool: raise NotImplementedError
    def routes(self, ns: str | None) -> list[Route]: raise NotImplementedError

    # files
    def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        raise NotImplementedError

    def make_dir(self, path: str, mode: int = 0o755, owner: str | None = None) -> None:
        raise NotImplementedError

    def read_file(self, path: str) -> str: raise NotImplementedError
    def remove_file(self, path: str) -> bool: raise NotImplementedError
    def remove_dir(self, path: str) -> bool: raise NotImplementedError
    def is_dir(self, path: str) -> bool: raise NotImplementedError

    # processes and sockets
    def spawn(self, argv: list[str], log_path: str, pass_fds: tuple[int, ...] = ()
              ) -> tuple[int, int | None]:
        """A detached process (own session); returns (pid, start time)."""
        raise NotImplementedError

    def kill(self, pid: int, start: int | None, deadline: float = 3.0) -> None:
        raise NotImplementedError

    def kill_start(self, pid: int, start: int | None) -> None:
        """Ask a process we started to end (SIGTERM) without waiting: `kill` later waits
        for it, so the caller can do other work while it exits (teardown)."""

    def inside(self, ns: str | None) -> contextlib.AbstractContextManager[None]:
        """This thread inside the namespace for the block (a listing's interface names are
        the namespace's then: docs/field-notes.md, nftables binding)."""
        return contextlib.nullcontext()

    def x_tables(self, ns: str) -> list[str]:
        """The x_tables (iptables-legacy, ip6tables, arptables) tables the namespace has."""
        return []

    def netns_list(self) -> list[str]:
        """Every named namespace (`down` finds those named for a stack its log lost)."""
        return []

    def etc_netns_dirs(self) -> list[str]:
        """The directories under /etc/netns (a namespace's resolv.conf and hosts)."""
        return []

    def remove_tree(self, path: str) -> None:
        """A directory and everything in it (one of a stack's /etc/netns directories)."""

    def netns_inode(self, name: str) -> int | None:
        """The namespace's identity (the inode of /run/netns/NAME), None when it is gone:
        it outlives the name, so what still runs inside can be found after the delete."""
        return None

    def end_inside(self, inodes: set[int]) -> list[int]:
        """SIGKILL every process whose network namespace is one of `inodes` (namespaces
        the stack made: whatever runs there is the stack's own, a sandbox that outlived
        its `run` or `exec`, see docs/field-notes.md, bubblewrap). The pids ended."""
        return []

    def wait_ready(self, state_dir: str, ready: dict[str, str], timeout: float,
                   waiting: Callable[[], list[str]]) -> None:
        """Until the supervisor's named daemons answer: `waiting()` names those that do
        not yet (processes.daemons_waiting); NotReady naming them after `timeout`."""
        raise NotImplementedError

    def bind(self, ns: str, kind: int, addr: str, port: int) -> socket.socket:
        raise NotImplementedError

    def resolve(self, ns: str, server: str, name: str) -> list[str]: raise NotImplementedError
    def lookup(self, ns: str, server: str, port: int, name: str) -> tuple[list[str], int]:
        raise NotImplementedError
    def conntrack_flush(self, ns: str) -> None: raise NotImplementedError
    def conntrack_list(self, ns: str, src: str) -> list[Flow]: raise NotImplementedError
    def conntrack_delete(self, ns: str, flow: Flow) -> None: raise NotImplementedError

    # batches: what bring-up makes in one go. RealKernel sends each namespace's share as
    # one netlink write; the defaults here (and the recording fake) do them one by one, in
    # the order given. A failure raises after the kernel saw the whole batch.
    def veth_many(self, veths: list[tuple[str | None, str, str, str]]) -> None:
        for v in veths:
            self.veth(*v)

    def addr_add_many(self, addrs: list[tuple[str | None, str, str]]) -> None:
        for a in addrs:
            self.addr_add(*a)

    def link_up_many(self, links: list[tuple[str | None, str]]) -> None:
        for ns, ifname in links:
            self.link_up(ns, ifname)

    def route_add_many(self, routes: list[Route]) -> None:
        for r in routes:
            self.route_add(r)

    def link_exists(self, ns: str | None, ifname: str) -> bool:
        return any(x.name == ifname for x in self.links(ns))

    def close(self) -> None:
        pass

    def fork(self) -> Kernel:
        """A kernel of the same kind with handles of its own, for another thread (netlink
        and libnftables handles are not shared between threads). The command entry makes
        the first kernel; everything below derives others from it, so a fake stays a fake."""
        return self


@dataclass(frozen=True)
class Flow:
    """A connection as conntrack lists it, in its original direction."""

    proto: str  # tcp | udp | icmp | ...
    src: str
    dst: str
    sport: int | None = None
    dport: int | None = None
    icmp_type: int | None = None
    icmp_id: int | None = None
    icmp_code: int | None = None

    @classmethod
    def from_entry(cls, e: Any) -> Flow:
        """From a pyroute2 ConntrackEntry (its original tuple)."""
        t = e.tuple_orig
        name = (t.proto_name() or str(t.proto)).lower()
        return cls("icmp" if name in ("icmp", "ipv6-icmp", "icmpv6") else name, t.saddr,
                   t.daddr, t.sport, t.dport, t.icmp_type, t.icmp_id, t.icmp_code)

    def tuple(self) -> Any:
        """The pyroute2 tuple that names this connection to the kernel (for a delete)."""
        import socket

        from pyroute2.conntrack import NFCTAttrTuple

        six = ":" in self.src
        num = {"tcp": 6, "udp": 17, "icmp": 58 if six else 1}.get(self.proto)
        if num is None:  # a raw protocol: named in /etc/protocols, or by its number
            try:
                num = int(self.proto) if self.proto.isdigit() else \
                    socket.getprotobyname(self.proto)
            except OSError:
                num = None  # a name this host does not know: the entry is listed, not named
        return NFCTAttrTuple(family=socket.AF_INET6 if six else socket.AF_INET,
                             saddr=self.src, daddr=self.dst, proto=num, sport=self.sport,
                             dport=self.dport, icmp_id=self.icmp_id,
                             icmp_type=self.icmp_type, icmp_code=self.icmp_code)


def proc_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on: [0] state, [1] ppid, [3] session, [19]
    start time; None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(")") + 2:].split()


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: with the pid it identifies a process across pid reuse."""
    rest = proc_fields(pid)
    return None if rest is None else int(rest[19])


def proc_alive(pid: int, start: int | None) -> bool:
    """True if `pid` is still the process we started (and not a zombie)."""
    rest = proc_fields(pid)
    if rest is None:
        return False
    if start is not None and int(rest[19]) != start:
        return False
    return rest[0] != "Z"


def die_with_parent() -> Callable[[], None]:
    """A `preexec_fn` for a short-lived child (key making at `up`): SIGKILL when the
    thread that started it dies (PR_SET_PDEATHSIG), so a `kill -9` of netstack leaves no
    child writing into a directory the next `up` makes again. libc is looked up here, in
    the parent: the child only makes the call, and ends itself when its parent was already
    gone before the call took effect."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def child() -> None:
        prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return child


class RealKernel(Kernel):
    """rtnetlink (netstack.rtnl: one socket per namespace, opened inside it), the nftables
    binding (one handle per namespace, bound at creation: docs/field-notes.md), /proc/sys,
    subprocess; pyroute2 only for moving devices and conntrack."""

    real = True

    def __init__(self) -> None:
        self._rtnl: dict[str | None, Any] = {}
        self._held: dict[int, int] = {}  # namespace inode -> an fd keeping it (netns_inode)
        self._ipr: dict[str | None, Any] = {}
        self._nft: dict[str | None, Any] = {}
        self._index: dict[tuple[str | None, str], int] = {}

    # --- namespaces ---------------------------------------------------------------------
    def netns_create(self, name: str) -> None:
        netns.create(name)

    def netns_delete(self, name: str) -> bool:
        for cache in (self._rtnl, self._ipr, self._nft):
            h = cache.pop(name, None)
            if h is not None and hasattr(h, "close"):
                with contextlib.suppress(Exception):
                    h.close()
        self._index.clear()  # its veths' peers in other namespaces go with it
        return netns.delete(name)

    def netns_exists(self, name: str) -> bool:
        return netns.exists(name)

    def sysctl(self, ns: str | None, key: str, value: str) -> None:
        with netns.entered(ns), open(f"/proc/sys/{key}", "w") as f:
            f.write(value)

    def sysctl_get(self, ns: str | None, key: str) -> str:
        with netns.entered(ns), open(f"/proc/sys/{key}") as f:
            return f.read().strip()

    def home_ns(self) -> str | None:
        me = os.stat("/proc/thread-self/ns/net").st_ino
        for name in netns.list_names():
            with contextlib.suppress(OSError):
                if netns.inode(name) == me:
                    return name
        return None

    # --- nftables -----------------------------------------------------------------------
    def _nft_handle(self, ns: str | None) -> Any:
        h = self._nft.get(ns)
        if h is None:
            import nftables

            with netns.entered(ns):
                h = nftables.Nftables()
            h.set_json_output(True)
            h.set_handle_output(True)
            self._nft[ns] = h
        return h

    def nft(self, ns: str | None, commands: dict[str, Any]) -> None:
        # entered: nft resolves `iif`/`oif` names to indexes in the caller's namespace
        h = self._nft_handle(ns)
        with netns.entered(ns):
            rc, _out, err = h.json_cmd(commands)
        if rc != 0:
            raise ApplyError(f"nftables refused a change in {ns or 'the host namespace'}: "
                             f"{err.strip()}")

    def nft_list(self, ns: str | None) -> dict[str, Any]:
        if ns is not None and not netns.exists(ns):
            raise StateError(f"namespace {ns} is gone; run `netstack down` and `up`")
        rc, out, err = self._nft_handle(ns).cmd("list ruleset")
        if rc != 0:
            raise ApplyError(f"cannot list the ruleset of {ns}: {err.strip()}")
        return json.loads(out) if out else {"nftables": []}

    def nft_text(self, ns: str | None, command: str) -> tuple[int, str]:
        h = self._nft_handle(ns)
        h.set_json_output(False)
        try:
            rc, out, _err = h.cmd(command)
        finally:
            h.set_json_output(True)
        return rc, out

    def netlink(self, ns: str | None) -> Any:
        return self._nl(ns)

    def nft_script(self, ns: str, text: str) -> str:
        h = self._nft_handle(ns)
        h.set_json_output(False)
        try:
            with netns.entered(ns):
                rc, _out, err = h.cmd(text)
        finally:
            h.set_json_output(True)
        return err.strip() if rc != 0 else ""

    # --- links --------------------------------------------------------------------------
    # Our own rtnetlink client (netstack/rtnl.py): pyroute2's IPRoute costs ~60 ms to import
    # and an asyncio round per call (docs/field-notes.md, "pyroute2 0.9"). pyroute2 stays
    # for moving a physical device (link_move/link_return), imported only there.
    def _nl(self, ns: str | None) -> Any:
        h = self._rtnl.get(ns)
        if h is None:
            from netstack.rtnl import Rtnl

            with netns.entered(ns):
                h = Rtnl(ns)
            self._rtnl[ns] = h
        return h

    def _ip(self, ns: str | None) -> Any:
        """pyroute2's IPRoute in `ns` (the rare paths only)."""
        h = self._ipr.get(ns)
        if h is None:
            cls = iproute_class()
            with netns.entered(ns):
                h = cls()
            self._ipr[ns] = h
        return h

    def _forget(self, ns: str | None) -> None:
        """Indexes of `ns` are read again at next use (its links changed)."""
        self._index = {k: v for k, v in self._index.items() if k[0] != ns}

    def _idx(self, ns: str | None, ifname: str) -> int:
        key = (ns, ifname)
        if key not in self._index:  # one dump names every link of the namespace
            for link in self._nl(ns).get_links():
                self._index[(ns, link.get_attr("IFLA_IFNAME"))] = link["index"]
            if key not in self._index:
                raise ApplyError(f"interface {ifname} not found in {ns or 'the host namespace'}")
        return self._index[key]

    def _send(self, per_ns: dict[str | None, tuple[list[Any], list[str]]]) -> None:
        from netstack.rtnl import NetlinkError

        for ns, (reqs, what) in per_ns.items():
            try:
                self._nl(ns).batch(reqs, what)
            except NetlinkError as e:
                raise ApplyError(f"{e.strerror} in {ns or 'the host namespace'}") from e

    def veth(self, ns_a: str | None, if_a: str, ns_b: str, if_b: str) -> None:
        self.veth_many([(ns_a, if_a, ns_b, if_b)])

    def veth_many(self, veths: list[tuple[str | None, str, str, str]]) -> None:
        from netstack import rtnl

        fds: dict[str, int] = {}
        per_ns: dict[str | None, tuple[list[Any], list[str]]] = {}
        try:
            for ns_a, if_a, ns_b, if_b in veths:
                if ns_b not in fds:
                    fds[ns_b] = os.open(netns.path(ns_b), os.O_RDONLY)
                reqs, what = per_ns.setdefault(ns_a, ([], []))
                # an end in the host namespace keeps the kernel's choice (the host's
                # own devices hold indexes we cannot know)
                ia = rtnl.fixed_index(if_a) if ns_a is not None else 0
                reqs.append(rtnl.veth(if_a, if_b, fds[ns_b], ia,
                                      rtnl.fixed_index(if_b) if ia else 0))
                what.append(f"veth {if_a} (peer {if_b} in {ns_b})")
                self._forget(ns_a)  # a name may come back with another index (a moved qube)
                self._forget(ns_b)
            self._send(per_ns)
        finally:
            for fd in fds.values():
                os.close(fd)

    def link_move(self, dev: str, ns: str, new_name: str) -> None:
        self._forget(None)
        ipr = self._ip(None)
        found = ipr.link_lookup(ifname=dev)
        if not found:
            raise ApplyError(f"interface {dev} not found in the host namespace")
        idx = found[0]
        ipr.link("set", index=idx, state="down")
        fd = os.open(netns.path(ns), os.O_RDONLY)
        try:
            ipr.link("set", index=idx, net_ns_fd=fd)
        finally:
            os.close(fd)
        inside = self._ip(ns)
        inside.link("set", index=inside.link_lookup(ifname=dev)[0], ifname=new_name)
        self._forget(ns)

    def link_return(self, ns: str, names: list[str], dev: str, home: str | None) -> bool:
        if not netns.exists(ns) or (home and not netns.exists(home)):
            return False  # a physical device returns to the host when its namespace goes
        # home None: the namespace this netstack runs in, the one `up` moved the device
        # from when it ran there too; never PID 1's, which may be another namespace or not
        # readable at all (a container, hardened /proc)
        target = netns.path(home) if home else "/proc/self/ns/net"
        ipr = self._ip(ns)
        for name in names:
            found = ipr.link_lookup(ifname=name)
            if found:
                ipr.link("set", index=found[0], state="down")
                ipr.link("set", index=found[0], ifname=dev)
                fd = os.open(target, os.O_RDONLY)
                try:
                    ipr.link("set", index=found[0], net_ns_fd=fd)
                finally:
                    os.close(fd)
                self._forget(ns)
                self._forget(home)
                return True
        return False

    def _wifi(self, ns: str | None, dev: str, ask: Callable[[Any, int], Any]) -> Any:
        from netstack.nl80211 import Nl80211
        from netstack.rtnl import NetlinkError

        idx = self._nl(ns).link_index(dev)
        if idx is None:
            return None
        try:
            with netns.entered(ns), Nl80211() as nl:
                return ask(nl, idx)
        except NetlinkError:  # no cfg80211 in this kernel: no wireless device at all
            return None

    def wiphy(self, ns: str | None, dev: str) -> int | None:
        return self._wifi(ns, dev, lambda nl, idx: nl.wiphy(idx))

    def wifi_ssid(self, ns: str | None, dev: str) -> str | None:
        return self._wifi(ns, dev, lambda nl, idx: nl.associated_ssid(idx))

    def _set_phy_ns(self, where: str | None, phy: int, target: str) -> None:
        """nl80211 is asked from the namespace the phy is in (only there is it seen)."""
        from netstack.nl80211 import Nl80211

        fd = os.open(target, os.O_RDONLY)
        try:
            with netns.entered(where), Nl80211() as nl:
                nl.set_netns(phy, fd)
        finally:
            os.close(fd)

    def phy_move(self, dev: str, phy: int, ns: str, new_name: str) -> None:
        from netstack.rtnl import NetlinkError

        self._forget(None)
        ipr = self._ip(None)
        found = ipr.link_lookup(ifname=dev)
        if not found:
            raise ApplyError(f"interface {dev} not found in the host namespace")
        ipr.link("set", index=found[0], state="down")
        try:
            self._set_phy_ns(None, phy, netns.path(ns))
        except NetlinkError as e:
            raise ApplyError(f"cannot move {dev}'s radio (phy index {phy}) into {ns}: "
                             f"{e.strerror}") from e
        inside = self._ip(ns)
        moved = inside.link_lookup(ifname=dev)
        if not moved:
            raise ApplyError(f"{dev} did not come with its radio into {ns}")
        inside.link("set", index=moved[0], ifname=new_name)
        self._forget(ns)

    def phy_return(self, ns: str, phy: int, names: list[str], dev: str,
                   home: str | None) -> bool:
        from netstack.rtnl import NetlinkError

        if home and not netns.exists(home):
            return False
        if not netns.exists(ns):
            # the kernel gave the phy to the initial namespace when ns went, its netdev
            # still under our name: only the name is put back (where it is ours)
            for name in names[:1]:
                if home is None and self.wiphy(None, name) == phy:
                    self._forget(None)
                    ipr = self._ip(None)
                    idx = ipr.link_lookup(ifname=name)[0]
                    ipr.link("set", index=idx, state="down")
                    ipr.link("set", index=idx, ifname=dev)
                    self._forget(None)
            return False
        ipr = self._ip(ns)
        for name in names:  # the netdev's own name first, while it is still here
            found = ipr.link_lookup(ifname=name)
            if found:
                ipr.link("set", index=found[0], state="down")
                if name != dev:
                    ipr.link("set", index=found[0], ifname=dev)
                break
        # the same target as link_return: never PID 1's namespace
        target = netns.path(home) if home else "/proc/self/ns/net"
        try:
            self._set_phy_ns(ns, phy, target)
        except NetlinkError as e:
            if e.errno in (errno.ENODEV, errno.ENOENT):
                return False  # not in ns (any more): nothing to give back
            raise
        finally:
            self._forget(ns)
            self._forget(home)
        return True

    def link_del(self, ns: str | None, ifname: str) -> bool:
        from netstack import rtnl

        if ns is not None and not netns.exists(ns):
            return False
        self._index.clear()  # a veth's peer, in another namespace, goes with it
        h = self._nl(ns)
        idx = h.link_index(ifname)
        if idx is None:
            return False
        try:
            h.request(*rtnl.link_del(idx), f"delete {ifname}")
        except rtnl.NetlinkError as e:
            if rtnl.is_missing(e):  # gone with its peer meanwhile
                return False
            raise
        return True

    def link_up(self, ns: str | None, ifname: str) -> None:
        self.link_up_many([(ns, ifname)])

    def link_down(self, ns: str | None, ifname: str) -> None:
        """Admin down at once (the uplink watch's cut): one netlink request."""
        from netstack import rtnl

        self._index.clear()
        self._send({ns: ([rtnl.link_down(self._idx(ns, ifname))], [f"set {ifname} down"])})

    def link_up_many(self, links: list[tuple[str | None, str]]) -> None:
        self._index.clear()  # indexes of one call only: a long-lived kernel sees links remade
        from netstack import rtnl

        per_ns: dict[str | None, tuple[list[Any], list[str]]] = {}
        for ns, ifname in links:
            reqs, what = per_ns.setdefault(ns, ([], []))
            reqs.append(rtnl.link_up(self._idx(ns, ifname)))
            what.append(f"set {ifname} up")
        self._send(per_ns)

    def links(self, ns: str | None) -> list[LinkState]:
        if ns is not None and not netns.exists(ns):
            return []
        nl = self._nl(ns)
        addrs: dict[int, list[str]] = {}
        for a in nl.get_addr():
            addrs.setdefault(a["index"], []).append(
                f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
        out = []
        for link in nl.get_links():
            stats = link.get_attr("IFLA_STATS64") or {}
            out.append(LinkState(link.get_attr("IFLA_IFNAME"), link["index"],
                                 link.get_attr("IFLA_OPERSTATE") or "UNKNOWN",
                                 addrs.get(link["index"], []), stats.get("rx_bytes"),
                                 stats.get("tx_bytes"), link.get_attr("IFLA_ADDRESS"),
                                 link["flags"], stats.get("rx_packets"),
                                 stats.get("tx_packets")))
        return out

    def addr_add(self, ns: str | None, ifname: str, cidr: str) -> None:
        self.addr_add_many([(ns, ifname, cidr)])

    def addr_add_many(self, addrs: list[tuple[str | None, str, str]]) -> None:
        self._index.clear()  # indexes of one call only: a long-lived kernel sees links remade
        from netstack import rtnl

        per_ns: dict[str | None, tuple[list[Any], list[str]]] = {}
        for ns, ifname, cidr in addrs:
            reqs, what = per_ns.setdefault(ns, ([], []))
            reqs.append(rtnl.addr_add(self._idx(ns, ifname), cidr))
            what.append(f"address {cidr} on {ifname}")
        self._send(per_ns)

    def addrs(self, ns: str | None) -> list[tuple[str, str]]:
        return [(x.name, a) for x in self.links(ns) for a in x.addresses]

    def route_add(self, r: Route) -> None:
        self.route_add_many([r])

    def route_add_many(self, routes: list[Route]) -> None:
        self._index.clear()  # indexes of one call only: a long-lived kernel sees links remade
        from netstack import rtnl

        per_ns: dict[str | None, tuple[list[Any], list[str]]] = {}
        for r in routes:
            reqs, what = per_ns.setdefault(r.ns, ([], []))
            reqs.append(rtnl.route(True, self._idx(r.ns, r.dev), r.dst, r.via, r.metric))
            what.append(f"route {r.dst} dev {r.dev} in {r.ns}")
        self._send(per_ns)

    def route_del(self, r: Route) -> bool:
        self._index.clear()  # indexes of one call only: a long-lived kernel sees links remade
        from netstack import rtnl

        try:
            self._nl(r.ns).request(*rtnl.route(False, self._idx(r.ns, r.dev), r.dst, r.via,
                                               r.metric), f"route {r.dst}")
            return True
        except Exception:  # noqa: BLE001 - not there (or its link is gone): nothing removed
            return False

    def routes(self, ns: str | None) -> list[Route]:
        from netstack.model import Route

        nl = self._nl(ns)
        names = {x["index"]: x.get_attr("IFLA_IFNAME") for x in nl.get_links()}
        out = []
        for fam in (socket.AF_INET, socket.AF_INET6):
            for r in nl.get_routes(family=fam, table=254):
                dst = r.get_attr("RTA_DST")
                if dst is None:
                    dst = "default" if fam == socket.AF_INET else "default6"
                else:
                    dst = f"{dst}/{r['dst_len']}"
                oif = r.get_attr("RTA_OIF")
                if oif in names:
                    out.append(Route(ns, dst, names[oif], r.get_attr("RTA_GATEWAY")))
        return out

    # --- files --------------------------------------------------------------------------
    def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        atomic_write(path, text, mode)

    def make_dir(self, path: str, mode: int = 0o755, owner: str | None = None) -> None:
        os.mkdir(path, mode)
        os.chmod(path, mode)
        if owner:
            pw = pwd.getpwnam(owner)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def read_file(self, path: str) -> str:
        with open(path) as f:
            return f.read()

    def remove_file(self, path: str) -> bool:
        try:
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False

    def remove_dir(self, path: str) -> bool:
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return False

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path)

    # --- processes ----------------------------------------------------------------------
    def spawn(self, argv: list[str], log_path: str, pass_fds: tuple[int, ...] = ()
              ) -> tuple[int, int | None]:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            p = subprocess.Popen(argv, pass_fds=pass_fds, stdin=subprocess.DEVNULL, stdout=fd,
                                 stderr=fd, start_new_session=True, close_fds=True)
        finally:
            os.close(fd)
        p.returncode = 0  # detached on purpose: keep Popen.__del__ quiet
        return p.pid, proc_start_time(p.pid)

    def inside(self, ns: str | None) -> contextlib.AbstractContextManager[None]:
        return netns.entered(ns)

    def x_tables(self, ns: str) -> list[str]:
        from netstack.pathfacts import legacy_tables

        return legacy_tables(ns)

    def netns_list(self) -> list[str]:
        return netns.list_names()

    def etc_netns_dirs(self) -> list[str]:
        try:
            return [os.path.join("/etc/netns", d) for d in sorted(os.listdir("/etc/netns"))]
        except OSError:
            return []

    def remove_tree(self, path: str) -> None:
        import shutil

        if os.path.islink(path):
            raise StateError(f"{path} is a symlink; left alone")
        shutil.rmtree(path)

    def netns_inode(self, name: str) -> int | None:
        """Held open until end_inside: a namespace's inode number is reused once it is
        gone, and another stack's new namespace must never be taken for ours."""
        try:
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        ino = os.fstat(fd).st_ino
        if ino in self._held:
            os.close(fd)
        else:
            self._held[ino] = fd
        return ino

    def end_inside(self, inodes: set[int]) -> list[int]:
        out = []
        me = os.getpid()
        try:
            for d in os.listdir("/proc") if inodes else ():
                if not d.isdigit() or int(d) == me:
                    continue
                try:
                    if os.stat(f"/proc/{d}/ns/net").st_ino not in inodes \
                            or _descends_from(int(d), me):
                        continue  # our own children are their owner's to end (leaktest's)
                    os.kill(int(d), signal.SIGKILL)
                    out.append(int(d))
                except OSError:  # gone meanwhile, or a kernel thread's
                    continue
        finally:
            for ino in inodes:
                fd = self._held.pop(ino, None)
                if fd is not None:
                    os.close(fd)
        return out

    def wait_ready(self, state_dir: str, ready: dict[str, str], timeout: float,
                   waiting: Callable[[], list[str]]) -> None:
        from netstack.errors import NotReady

        end = time.monotonic() + timeout
        delay = 0.005
        while True:
            left = waiting()
            if not left:
                return
            if time.monotonic() > end:
                raise NotReady(f"{', '.join(left)} not ready after {timeout:.0f} s; see "
                               + ", ".join(os.path.join(state_dir, f"{w}.log") for w in left))
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def kill(self, pid: int, start: int | None, deadline: float = 3.0) -> None:
        """End a process we started, by PID (checked against its start time): SIGTERM,
        then SIGKILL after `deadline`. Waits on a pidfd, which the kernel makes readable
        the moment the process exits (polling with sleeps overslept: 14-18 ms for a
        supervisor that exits in about 12 ms, docs/field-notes.md "Processes")."""
        if not proc_alive(pid, start):
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return  # gone between the check and here
        try:
            if not proc_alive(pid, start):
                return  # the pid was reused meanwhile: not ours
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGTERM)
            import select

            p = select.poll()
            p.register(fd, select.POLLIN)
            if not p.poll(max(0, int(deadline * 1000))):
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                p.poll(1000)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # our own child (a rolled-back `up`): reap it
        finally:
            os.close(fd)

    def kill_start(self, pid: int, start: int | None) -> None:
        if proc_alive(pid, start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def bind(self, ns: str, kind: int, addr: str, port: int) -> socket.socket:
        with netns.entered(ns):
            s = socket.socket(socket.AF_INET, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        if kind == socket.SOCK_STREAM:
            s.listen(64)
        return s

    def resolve(self, ns: str, server: str, name: str) -> list[str]:
        from netstack.dnswire import resolve_in

        return resolve_in(ns, server, name)

    def lookup(self, ns: str, server: str, port: int, name: str) -> tuple[list[str], int]:
        from netstack.dnswire import lookup_in

        return lookup_in(ns, server, name, port)

    def _conntrack(self, ns: str, use: Any, family: int = 0) -> Any:
        """use(Conntrack) with a ctnetlink socket of namespace `ns` (pyroute2's conntrack;
        its socket is made at first use, not at construction, so every call of it happens
        inside the namespace: docs/field-notes.md, pyroute2). `family` is the nfgen family
        its requests carry: the kernel reads a filter's or a tuple's addresses in that
        family (an IPv6 source under pyroute2's default AF_INET is EINVAL), and a flush
        with a family flushes only that family (0, AF_UNSPEC: both)."""
        from pyroute2.conntrack import Conntrack

        with netns.entered(ns):
            ct = Conntrack(nfgen_family=family)
            try:
                return use(ct)
            finally:
                ct.close()

    def conntrack_flush(self, ns: str) -> None:
        self._conntrack(ns, lambda ct: ct.flush())  # AF_UNSPEC: IPv4 and IPv6

    def conntrack_list(self, ns: str, src: str) -> list[Flow]:
        """The entries of `src`'s family whose original source is `src`. Filtered here,
        not by the kernel: pyroute2's dump filter for an IPv6 source matched nothing
        (kernel 6.x, pyroute2 0.9) where `conntrack -L -f ipv6 -s` listed the entry."""
        import ipaddress

        want = ipaddress.ip_address(src)
        fam = socket.AF_INET6 if want.version == 6 else socket.AF_INET
        return self._conntrack(ns, lambda ct: [
            Flow.from_entry(e) for e in ct.dump_entries()
            if e.tuple_orig.family == fam
            and ipaddress.ip_address(e.tuple_orig.saddr) == want], fam)

    def conntrack_delete(self, ns: str, flow: Flow) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        def delete(ct: Any) -> None:
            try:
                ct.entry("del", tuple_orig=flow.tuple())
            except NetlinkError as e:
                if e.code != errno.ENOENT:  # gone already (it timed out): nothing to do
                    raise
        self._conntrack(ns, delete, socket.AF_INET6 if ":" in flow.src else socket.AF_INET)

    def fork(self) -> Kernel:
        return RealKernel()

    def close(self) -> None:
        for fd in self._held.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._held.clear()
        for h in [*self._rtnl.values(), *self._ipr.values()]:
            with contextlib.suppress(Exception):
                h.close()
        self._rtnl.clear()
        self._ipr.clear()
        self._nft.clear()
        self._index.clear()
