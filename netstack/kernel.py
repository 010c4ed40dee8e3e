"""The one seam between netstack and the host: namespaces, nftables transactions, links,
addresses, routes, sysctls, files and processes. Bring-up, teardown and live changes talk
only to a Kernel; `RealKernel` does it with pyroute2 and the nftables binding, and unit
tests use a recording fake (tests/fakekernel.py) to check the order of what was done.

Everything is addressed by namespace name (None: the namespace netstack runs in).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from netstack import netns
from netstack.codec import atomic_write  # noqa: F401  (re-exported: callers use it here)
from netstack.errors import ApplyError, StateError
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
        """The namespace's netlink handle (pyroute2 IPRoute), for reads the seam does not
        wrap one by one (tc, XDP, ip rules: netstack.pathfacts)."""
        raise NotImplementedError

    # links, addresses, routes
    def veth(self, ns_a: str | None, if_a: str, ns_b: str, if_b: str) -> None:
        raise NotImplementedError

    def link_move(self, dev: str, ns: str, new_name: str) -> None: raise NotImplementedError

    def link_return(self, ns: str, names: list[str], dev: str, home: str | None) -> bool:
        raise NotImplementedError

    def link_del(self, ns: str | None, ifname: str) -> bool: raise NotImplementedError
    def link_up(self, ns: str | None, ifname: str) -> None: raise NotImplementedError

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

    def link_exists(self, ns: str | None, ifname: str) -> bool:
        return any(x.name == ifname for x in self.links(ns))

    def close(self) -> None:
        pass

    def fork(self) -> Kernel:
        """A kernel of the same kind with handles of its own, for another thread (netlink
        and libnftables handles are not shared between threads). The command entry makes
        the first kernel; everything below derives others from it, so a fake stays a fake."""
        return self


def iproute_class() -> Any:
    """pyroute2's IPRoute without running pyroute2/__init__ (it imports ipdb, ndb and
    conntrack: ~35 ms more per command). A later `from pyroute2 import X` still works: the
    package stub runs the real __init__ on first attribute access."""
    import importlib.util
    import sys
    import types

    if "pyroute2" not in sys.modules:
        spec = importlib.util.find_spec("pyroute2")
        assert spec and spec.loader and spec.submodule_search_locations is not None
        stub = types.ModuleType("pyroute2")
        stub.__path__ = list(spec.submodule_search_locations)
        stub.__spec__ = spec
        stub.__file__ = spec.origin

        def full(name: str) -> Any:
            if name.startswith("__"):
                raise AttributeError(name)
            if importlib.util.find_spec(f"pyroute2.{name}") is not None:
                return importlib.import_module(f"pyroute2.{name}")  # a submodule: no more
            del stub.__dict__["__getattr__"]
            spec.loader.exec_module(stub)  # type: ignore[union-attr]
            return getattr(stub, name)

        stub.__getattr__ = full  # type: ignore[attr-defined]
        sys.modules["pyroute2"] = stub
    from pyroute2.iproute.linux import IPRoute

    return IPRoute


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


class RealKernel(Kernel):
    """pyroute2 (one IPRoute per namespace, opened inside it), the nftables binding (one
    handle per namespace, bound at creation: docs/field-notes.md), /proc/sys, subprocess."""

    real = True

    def __init__(self) -> None:
        self._ipr: dict[str | None, Any] = {}
        self._nft: dict[str | None, Any] = {}
        self._index: dict[tuple[str | None, str], int] = {}

    # --- namespaces ---------------------------------------------------------------------
    def netns_create(self, name: str) -> None:
        netns.create(name)

    def netns_delete(self, name: str) -> bool:
        for cache in (self._ipr, self._nft):
            h = cache.pop(name, None)
            if h is not None and hasattr(h, "close"):
                with contextlib.suppress(Exception):
                    h.close()
        self._index = {k: v for k, v in self._index.items() if k[0] != name}
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
        return self._ip(ns)

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
    def _ip(self, ns: str | None) -> Any:
        h = self._ipr.get(ns)
        if h is None:
            cls = iproute_class()
            with netns.entered(ns):
                h = cls()
            self._ipr[ns] = h
        return h

    def _idx(self, ns: str | None, ifname: str) -> int:
        key = (ns, ifname)
        if key not in self._index:
            found = self._ip(ns).link_lookup(ifname=ifname)
            if not found:
                raise ApplyError(f"interface {ifname} not found in {ns or 'the host namespace'}")
            self._index[key] = found[0]
        return self._index[key]

    def veth(self, ns_a: str | None, if_a: str, ns_b: str, if_b: str) -> None:
        fd = os.open(netns.path(ns_b), os.O_RDONLY)
        try:
            self._ip(ns_a).link("add", ifname=if_a, kind="veth",
                                peer={"ifname": if_b, "net_ns_fd": fd})
        finally:
            os.close(fd)

    def link_move(self, dev: str, ns: str, new_name: str) -> None:
        idx = self._idx(None, dev)
        self._index.pop((None, dev), None)
        ipr = self._ip(None)
        ipr.link("set", index=idx, state="down")
        fd = os.open(netns.path(ns), os.O_RDONLY)
        try:
            ipr.link("set", index=idx, net_ns_fd=fd)
        finally:
            os.close(fd)
        self._ip(ns).link("set", index=self._idx(ns, dev), ifname=new_name)
        self._index.pop((ns, dev), None)

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
                self._index = {k: v for k, v in self._index.items() if k[0] != ns}
                return True
        return False

    def link_del(self, ns: str | None, ifname: str) -> bool:
        if ns is not None and not netns.exists(ns):
            return False
        found = self._ip(ns).link_lookup(ifname=ifname)
        self._index.pop((ns, ifname), None)
        if not found:
            return False
        self._ip(ns).link("del", index=found[0])
        return True

    def link_up(self, ns: str | None, ifname: str) -> None:
        self._ip(ns).link("set", index=self._idx(ns, ifname), state="up")

    def links(self, ns: str | None) -> list[LinkState]:
        if ns is not None and not netns.exists(ns):
            return []
        ipr = self._ip(ns)
        addrs: dict[int, list[str]] = {}
        for a in ipr.get_addr():
            addrs.setdefault(a["index"], []).append(
                f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
        out = []
        for link in ipr.get_links():
            stats = link.get_attr("IFLA_STATS64") or {}
            out.append(LinkState(link.get_attr("IFLA_IFNAME"), link["index"],
                                 link.get_attr("IFLA_OPERSTATE") or "UNKNOWN",
                                 addrs.get(link["index"], []), stats.get("rx_bytes"),
                                 stats.get("tx_bytes"), link.get_attr("IFLA_ADDRESS"),
                                 link["flags"]))
        return out

    def addr_add(self, ns: str | None, ifname: str, cidr: str) -> None:
        ip, plen = cidr.split("/")
        kw: dict[str, Any] = {}
        if ":" in ip:
            kw["flags"] = 0x02  # IFA_F_NODAD: our fixed addresses are unique by design
        self._ip(ns).addr("add", index=self._idx(ns, ifname), address=ip, prefixlen=int(plen),
                          **kw)

    def addrs(self, ns: str | None) -> list[tuple[str, str]]:
        return [(x.name, a) for x in self.links(ns) for a in x.addresses]

    def _route_kw(self, r: Route) -> dict[str, Any]:
        kw: dict[str, Any] = {"oif": self._idx(r.ns, r.dev)}
        if r.dst in ("default", "default6"):
            kw["dst"] = "::/0" if r.dst == "default6" else "0.0.0.0/0"
        else:
            kw["dst"] = r.dst
        if r.via:
            kw["gateway"] = r.via
        else:
            kw["scope"] = 253  # link: a /32 peer reached directly on a point-to-point link
        if r.metric is not None:
            kw["priority"] = r.metric
        return kw

    def route_add(self, r: Route) -> None:
        try:
            self._ip(r.ns).route("replace", **self._route_kw(r))
        except Exception as e:
            raise ApplyError(f"route {r.dst} dev {r.dev} in {r.ns}: {e}") from e

    def route_del(self, r: Route) -> bool:
        try:
            self._ip(r.ns).route("del", **self._route_kw(r))
            return True
        except Exception:
            return False

    def routes(self, ns: str | None) -> list[Route]:
        ipr = self._ip(ns)
        names = {x["index"]: x.get_attr("IFLA_IFNAME") for x in ipr.get_links()}
        out = []
        for fam in (socket.AF_INET, socket.AF_INET6):
            for r in ipr.get_routes(family=fam, table=254):
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
        """End a process we started, by PID (checked against its start time)."""
        if not proc_alive(pid, start):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + deadline
        delay = 0.002
        while time.monotonic() < end:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if not proc_alive(pid, start):
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

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

    def _conntrack(self, ns: str, use: Any) -> Any:
        """use(Conntrack) with a ctnetlink socket of namespace `ns` (pyroute2's conntrack;
        its socket is made at first use, not at construction, so every call of it happens
        inside the namespace: docs/field-notes.md, pyroute2)."""
        from pyroute2.conntrack import Conntrack

        with netns.entered(ns):
            ct = Conntrack()
            try:
                return use(ct)
            finally:
                ct.close()

    def conntrack_flush(self, ns: str) -> None:
        self._conntrack(ns, lambda ct: ct.flush())

    def conntrack_list(self, ns: str, src: str) -> list[Flow]:
        import socket

        from pyroute2.conntrack import NFCTAttrTuple

        fam = socket.AF_INET6 if ":" in src else socket.AF_INET
        return self._conntrack(ns, lambda ct: [
            Flow.from_entry(e) for e in ct.dump_entries(
                tuple_orig=NFCTAttrTuple(family=fam, saddr=src))
            if e.tuple_orig.saddr == src])

    def conntrack_delete(self, ns: str, flow: Flow) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        def delete(ct: Any) -> None:
            with contextlib.suppress(NetlinkError):  # gone already (it timed out)
                ct.entry("del", tuple_orig=flow.tuple())
        self._conntrack(ns, delete)

    def fork(self) -> Kernel:
        return RealKernel()

    def close(self) -> None:
        for h in self._ipr.values():
            with contextlib.suppress(Exception):
                h.close()
        self._ipr.clear()
        self._nft.clear()
        self._index.clear()
