"""A recording fake of the kernel seam for unit tests (no root): it keeps a model of what
exists (namespaces, links and whether they are up, rulesets, files, routes, processes),
logs every call in order, and can be told to fail a call, so bring-up order, teardown and
rollback are checked without touching the host."""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Callable
from typing import Any

from netstack.errors import ApplyError
from netstack.kernel import Kernel, LinkState
from netstack.model import Route

Event = tuple[Any, ...]


class FakeSocket:
    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        pass


class _NoPaths:
    """A namespace's netlink reads as the fake knows them: no qdisc, no rule beyond the
    defaults, links as the fake made them are listed by FakeKernel.links."""

    def get_links(self) -> list[Any]:
        return []

    def get_qdiscs(self) -> list[Any]:
        return []

    def get_rules(self, family: int = 0) -> list[Any]:
        return []


class FakeKernel(Kernel):
    def __init__(self, fail: Callable[[Event], bool] | None = None,
                 resolve: dict[str, list[str]] | None = None) -> None:
        self.events: list[Event] = []
        self.fail = fail or (lambda e: False)
        self.namespaces: set[str] = set()
        self.ifaces: dict[tuple[str | None, str], bool] = {(None, "lo"): True}  # -> up
        self.peers: dict[tuple[str | None, str], tuple[str | None, str]] = {}
        self.tables: dict[str | None, list[dict[str, Any]]] = {}  # ns -> transactions
        self.files: dict[str, str] = {}
        self.dirs: set[str] = set()
        self.routes: set[Route] = set()
        self.addresses: set[tuple[str | None, str, str]] = set()
        self.procs: set[int] = set()
        self.sysctls: dict[tuple[str | None, str], str] = {}
        self.answers = resolve or {}
        self.flows: dict[str, list] = {}  # ns -> conntrack entries (kernel.Flow)
        self._pids = itertools.count(4_000_000)
        self.phys: dict[tuple[str | None, str], int] = {}  # a wireless netdev -> its wiphy

    def _ev(self, *e: Any) -> None:
        self.events.append(e)
        if self.fail(e):
            raise ApplyError(f"injected failure at {e[0]} {e[1:3]}")

    # namespaces
    def netns_create(self, name: str) -> None:
        self._ev("netns_create", name)
        assert name not in self.namespaces
        self.namespaces.add(name)
        self.ifaces[(name, "lo")] = False

    def netns_list(self) -> list[str]:
        return sorted(self.namespaces)

    def etc_netns_dirs(self) -> list[str]:
        return sorted(d for d in self.dirs if os.path.dirname(d) == "/etc/netns")

    def remove_tree(self, path: str) -> None:
        self._ev("remove_tree", path)
        self.dirs = {d for d in self.dirs if d != path and not d.startswith(path + "/")}
        self.files = {f: t for f, t in self.files.items() if not f.startswith(path + "/")}

    def netns_delete(self, name: str) -> bool:
        self._ev("netns_delete", name)
        if name not in self.namespaces:
            return False
        self.namespaces.discard(name)
        gone = {k for k in self.ifaces if k[0] == name}
        gone |= {self.peers[k] for k in gone if k in self.peers}  # veth peers go too
        self.ifaces = {k: v for k, v in self.ifaces.items() if k not in gone}
        self.peers = {k: v for k, v in self.peers.items() if k not in gone}
        self.tables.pop(name, None)
        self.routes = {r for r in self.routes if r.ns != name}
        self.addresses = {a for a in self.addresses if a[0] != name}
        return True

    def netns_exists(self, name: str) -> bool:
        return name in self.namespaces

    def sysctl(self, ns: str | None, key: str, value: str) -> None:
        self._ev("sysctl", ns, key, value)
        self.sysctls[(ns, key)] = value

    def sysctl_get(self, ns: str | None, key: str) -> str:
        return self.sysctls.get((ns, key), "0")

    def home_ns(self) -> str | None:
        return None

    # nftables
    def nft(self, ns: str | None, commands: dict[str, Any]) -> None:
        self._ev("nft", ns, commands)
        assert ns is None or ns in self.namespaces, ns
        self.tables.setdefault(ns, []).append(commands)

    def nft_list(self, ns: str | None) -> dict[str, Any]:
        return {"nftables": []}

    def nft_text(self, ns: str | None, command: str) -> tuple[int, str]:
        return 1, ""

    def netlink(self, ns: str | None) -> Any:
        return _NoPaths()

    # links
    def _has_ns(self, ns: str | None) -> None:
        assert ns is None or ns in self.namespaces, f"namespace {ns} does not exist"

    def veth(self, ns_a: str | None, if_a: str, ns_b: str, if_b: str) -> None:
        self._ev("veth", ns_a, if_a, ns_b, if_b)
        self._has_ns(ns_a)
        self._has_ns(ns_b)
        assert (ns_a, if_a) not in self.ifaces and (ns_b, if_b) not in self.ifaces
        self.ifaces[(ns_a, if_a)] = False
        self.ifaces[(ns_b, if_b)] = False
        self.peers[(ns_a, if_a)] = (ns_b, if_b)
        self.peers[(ns_b, if_b)] = (ns_a, if_a)

    def link_move(self, dev: str, ns: str, new_name: str) -> None:
        self._ev("link_move", dev, ns, new_name)
        del self.ifaces[(None, dev)]
        self.ifaces[(ns, new_name)] = False

    def link_return(self, ns: str, names: list[str], dev: str, home: str | None) -> bool:
        self._ev("link_return", ns, dev)
        for n in names:
            if (ns, n) in self.ifaces:
                del self.ifaces[(ns, n)]
                self.ifaces[(home, dev)] = False
                return True
        return False

    def wiphy(self, ns: str | None, dev: str) -> int | None:
        return self.phys.get((ns, dev)) if (ns, dev) in self.ifaces else None

    def phy_move(self, dev: str, phy: int, ns: str, new_name: str) -> None:
        self._ev("phy_move", dev, phy, ns, new_name)
        assert self.phys.get((None, dev)) == phy, (dev, phy)
        del self.ifaces[(None, dev)], self.phys[(None, dev)]
        self.ifaces[(ns, new_name)] = False
        self.phys[(ns, new_name)] = phy

    def phy_return(self, ns: str, phy: int, names: list[str], dev: str,
                   home: str | None) -> bool:
        self._ev("phy_return", ns, phy, dev)
        for n in names:
            if self.phys.get((ns, n)) == phy:
                del self.ifaces[(ns, n)], self.phys[(ns, n)]
                self.ifaces[(home, dev)] = False
                self.phys[(home, dev)] = phy
                return True
        return False

    def link_del(self, ns: str | None, ifname: str) -> bool:
        self._ev("link_del", ns, ifname)
        peer = self.peers.pop((ns, ifname), None)
        if peer is not None:  # as the kernel does: a veth goes with its peer
            self.peers.pop(peer, None)
            self.ifaces.pop(peer, None)
        return self.ifaces.pop((ns, ifname), None) is not None

    def link_up(self, ns: str | None, ifname: str) -> None:
        self._ev("link_up", ns, ifname)
        assert (ns, ifname) in self.ifaces, (ns, ifname)
        self.ifaces[(ns, ifname)] = True

    def link_down(self, ns: str | None, ifname: str) -> None:
        self._ev("link_down", ns, ifname)
        assert (ns, ifname) in self.ifaces, (ns, ifname)
        self.ifaces[(ns, ifname)] = False

    def links_of(self, ns: str | None) -> list[str]:
        return [n for (s, n) in self.ifaces if s == ns]

    def links(self, ns: str | None) -> list[LinkState]:  # type: ignore[override]
        return [LinkState(n, i, "UP" if self.ifaces[(ns, n)] else "DOWN")
                for i, n in enumerate(self.links_of(ns), start=1)]

    def link_exists(self, ns: str | None, ifname: str) -> bool:
        return (ns, ifname) in self.ifaces

    def addr_add(self, ns: str | None, ifname: str, cidr: str) -> None:
        self._ev("addr_add", ns, ifname, cidr)
        assert (ns, ifname) in self.ifaces
        self.addresses.add((ns, ifname, cidr))

    def addrs(self, ns: str | None) -> list[tuple[str, str]]:
        return [(i, c) for s, i, c in self.addresses if s == ns]

    def route_add(self, r: Route) -> None:
        self._ev("route_add", r.ns, r.dst, r.dev)
        assert (r.ns, r.dev) in self.ifaces
        self.routes.add(r)

    def route_del(self, r: Route) -> bool:
        self._ev("route_del", r.ns, r.dst, r.dev)
        present = r in self.routes
        self.routes.discard(r)
        return present

    def routes(self, ns: str | None) -> list[Route]:  # type: ignore[override]
        return [r for r in self.routes if r.ns == ns]

    # files
    def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        self._ev("write_file", path)
        self.files[path] = text

    def read_file(self, path: str) -> str:
        return self.files[path]

    def make_dir(self, path: str, mode: int = 0o755, owner: str | None = None) -> None:
        self._ev("make_dir", path)
        self.dirs.add(path)

    def remove_file(self, path: str) -> bool:
        self._ev("remove_file", path)
        return self.files.pop(path, None) is not None

    def remove_dir(self, path: str) -> bool:
        self._ev("remove_dir", path)
        if path not in self.dirs:
            return False
        self.dirs.discard(path)
        return True

    def is_dir(self, path: str) -> bool:
        return path in self.dirs or path in ("/", "/etc", "/run", "/var", "/var/lib")

    # processes
    def spawn(self, argv: list[str], log_path: str, pass_fds: tuple[int, ...] = ()
              ) -> tuple[int, int | None]:
        self._ev("spawn", tuple(argv))
        pid = next(self._pids)
        self.procs.add(pid)
        return pid, 1

    def wait_ready(self, state_dir: str, ready: dict[str, str], timeout: float,
                   waiting: Any = None) -> None:
        self._ev("wait_ready", tuple(sorted(ready)))

    def kill(self, pid: int, start: int | None, deadline: float = 3.0) -> None:
        self._ev("kill", pid)
        self.procs.discard(pid)

    def kill_start(self, pid: int, start: int | None) -> None:
        self._ev("kill_start", pid)  # asked to end; `kill` ends it

    # batches: the seam's defaults (one by one, in order: each call is logged as before)

    def bind(self, ns: str, kind: int, addr: str, port: int) -> socket.socket:
        self._ev("bind", ns, addr, port)
        return FakeSocket()  # type: ignore[return-value]

    def resolve(self, ns: str, server: str, name: str) -> list[str]:
        self._ev("resolve", ns, name)
        return list(self.answers.get(name, []))

    def lookup(self, ns: str, server: str, port: int, name: str) -> tuple[list[str], int]:
        self._ev("lookup", ns, server, port, name)
        return list(self.answers.get(name, [])), 60

    def conntrack_flush(self, ns: str) -> None:
        self._ev("conntrack_flush", ns)

    def conntrack_list(self, ns: str, src: str) -> list:
        return [f for f in self.flows.get(ns, []) if f.src == src]

    def conntrack_delete(self, ns: str, flow) -> None:
        self._ev("conntrack_delete", ns, flow)
        self.flows[ns] = [f for f in self.flows.get(ns, []) if f != flow]

    # what is left
    def leftovers(self) -> dict[str, Any]:
        """Everything that exists now besides what the fake started with."""
        return {k: v for k, v in {
            "namespaces": sorted(self.namespaces),
            "links": sorted((str(s), n) for (s, n) in self.ifaces if (s, n) != (None, "lo")),
            "files": sorted(f for f in self.files if not f.startswith(self.state_root)),
            "dirs": sorted(d for d in self.dirs if not d.startswith(self.state_root)),
            "procs": sorted(self.procs),
            "host_tables": self.tables.get(None, []) and self._host_tables(),
        }.items() if v}

    state_root = "/nonexistent"

    def _host_tables(self) -> list[str]:
        live: set[str] = set()
        for cmds in self.tables.get(None, []):
            for c in cmds["nftables"]:
                for verb in ("add", "delete"):
                    t = c.get(verb, {}).get("table")
                    if t:
                        (live.add if verb == "add" else live.discard)(t["name"])
        return sorted(live)
