"""Make a Plan real, and remove it again.

Order matters for fail-closed: namespaces and sysctls first, then each namespace's whole
nftables ruleset in one atomic transaction, and only then links, which start DOWN and are
set up last. Every object is recorded in the state file before it is made.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from netstack import netns
from netstack.errors import ApplyError, NetstackError, StateError
from netstack.plan import Plan
from netstack.rules.nft import commands
from netstack.state import State, proc_alive, proc_start_time


def _nft(ns: str):
    """A libnftables handle bound to namespace `ns` (bound at creation: see FIELD-NOTES)."""
    import nftables

    with netns.entered(ns):
        nft = nftables.Nftables()
    nft.set_json_output(True)
    nft.set_handle_output(True)
    return nft


def load_ruleset(ns: str, ruleset: dict[str, Any], fresh: bool = False) -> None:
    rc, _out, err = _nft(ns).json_cmd(commands(ruleset, fresh))
    if rc != 0:
        raise ApplyError(f"nftables refused the ruleset of {ns}: {err.strip()}")


def list_ruleset(ns: str) -> dict[str, Any]:
    rc, out, err = _nft(ns).cmd("list ruleset")
    if rc != 0:
        raise ApplyError(f"cannot list the ruleset of {ns}: {err.strip()}")
    import json

    return json.loads(out) if out else {"nftables": []}


class _Links:
    """One pyroute2 IPRoute per namespace, opened inside it."""

    def __init__(self) -> None:
        self._ipr: dict[str | None, Any] = {}
        self._index: dict[tuple[str | None, str], int] = {}

    def __call__(self, ns: str | None):
        if ns not in self._ipr:
            from pyroute2 import IPRoute

            with netns.entered(ns):
                self._ipr[ns] = IPRoute()
        return self._ipr[ns]

    def index(self, ns: str | None, ifname: str) -> int:
        """Interface index, looked up once per name (every address and route needs one)."""
        key = (ns, ifname)
        if key not in self._index:
            found = self(ns).link_lookup(ifname=ifname)
            if not found:
                raise ApplyError(f"interface {ifname} not found in "
                                 f"{ns or 'the host namespace'}")
            self._index[key] = found[0]
        return self._index[key]

    def forget(self, ns: str | None, ifname: str) -> None:
        """A device renamed or moved: its cached index no longer applies."""
        self._index.pop((ns, ifname), None)

    def close(self) -> None:
        for ipr in self._ipr.values():
            with contextlib.suppress(Exception):
                ipr.close()
        self._ipr.clear()


def up(plan: Plan, state: State, config_path: str | None) -> None:
    """Bring the plan up; on any failure remove what was made and re-raise."""
    for n in plan.namespaces:
        if netns.exists(n.name):
            raise StateError(f"namespace {n.name} already exists but is not part of a recorded "
                             f"stack; remove it with `ip netns del {n.name}`")
    links = _Links()
    for m in plan.moves:
        if not links(None).link_lookup(ifname=m.dev):
            links.close()
            raise StateError(f"--uplink {m.dev}: no such interface in this namespace")
    state.set(plan=plan.to_json(), config=config_path, status="partial", started=time.time())
    try:
        _up(plan, state, links)
    except BaseException as e:
        links.close()
        with contextlib.suppress(Exception):
            down(state)
        if isinstance(e, NetstackError):
            raise
        if isinstance(e, OSError) or type(e).__name__ == "NetlinkError":
            raise ApplyError(f"bring-up failed and was rolled back: {e}") from e
        raise
    links.close()
    state.set(status="up")


def _up(plan: Plan, state: State, links: _Links) -> None:
    for n in plan.namespaces:
        state.record(type="netns", name=n.name)
        netns.create(n.name)
        for key, value in n.sysctls.items():
            netns.write_sysctl(n.name, key, value)
        for path, content in n.files.items():
            _make_dirs(os.path.dirname(path), state)
            state.record(type="file", path=path)
            with open(path, "w") as f:
                f.write(content)
        if n.ruleset is not None:
            load_ruleset(n.name, n.ruleset, fresh=True)  # before any link exists
    for v in plan.veths:
        if v.ns_a is None:
            state.record(type="host_link", ifname=v.if_a)
        fd = os.open(netns.path(v.ns_b), os.O_RDONLY)
        try:
            links(v.ns_a).link("add", ifname=v.if_a, kind="veth",
                               peer={"ifname": v.if_b, "net_ns_fd": fd})
        finally:
            os.close(fd)
    for m in plan.moves:
        state.record(type="moved", dev=m.dev, ns=m.ns, new_name=m.new_name, home=_home_ns())
        idx = links.index(None, m.dev)
        links.forget(None, m.dev)
        links(None).link("set", index=idx, state="down")
        fd = os.open(netns.path(m.ns), os.O_RDONLY)
        try:
            links(None).link("set", index=idx, net_ns_fd=fd)
        finally:
            os.close(fd)
        links(m.ns).link("set", index=links.index(m.ns, m.dev), ifname=m.new_name)
        links.forget(m.ns, m.dev)
    if plan.host_nat:
        _host_nat_up(plan, state)
    for a in plan.addrs:
        ip, plen = a.cidr.split("/")
        links(a.ns).addr("add", index=links.index(a.ns, a.ifname), address=ip,
                         prefixlen=int(plen))
    for n in plan.namespaces:  # links up only now: every ruleset is already in place
        ipr = links(n.name)
        for link in ipr.get_links():
            ipr.link("set", index=link["index"], state="up")
    for v in plan.veths:
        if v.ns_a is None:
            links(None).link("set", index=links.index(None, v.if_a), state="up")
    for r in plan.routes:
        kw: dict[str, Any] = {"oif": links.index(r.ns, r.dev)}
        if r.dst in ("default", "default6"):
            kw["dst"] = "::/0" if r.dst == "default6" else "0.0.0.0/0"
        else:
            kw["dst"] = r.dst
        if r.via:
            kw["gateway"] = r.via
        else:
            kw["scope"] = 253  # link: a /32 peer reached directly on a point-to-point link
        try:
            links(r.ns).route("add", **kw)
        except Exception as e:
            raise ApplyError(f"route {r.dst} dev {r.dev} in {r.ns}: {e}") from e
    for t in plan.tors:
        _prepare_tor(t)
    if plan.services or plan.daemons:
        start_supervisor(plan, state)  # VPN clients wait for _prepare_vpns' files
    if plan.vpns:
        _prepare_vpns(plan, state)


def _prepare_tor(t: dict[str, Any]) -> None:
    """The gateway's DataDirectory belongs to its tor user (tor drops root after binding its
    ports); the torrc is written last: the supervisor starts tor when it appears."""
    import pwd

    pw = pwd.getpwnam(t["user"])
    os.makedirs(t["datadir"], mode=0o700, exist_ok=True)
    os.chown(t["datadir"], pw.pw_uid, pw.pw_gid)
    with open(t["torrc_path"] + ".tmp", "w") as f:
        f.write(t["torrc"])
    os.replace(t["torrc_path"] + ".tmp", t["torrc_path"])


def _prepare_vpns(plan: Plan, state: State) -> None:
    """Resolve VPN endpoints through sys-net's resolver (never the host's), write the
    daemons' configs, and fill each kill switch's endpoint set: only those addresses."""
    from netstack.dnswire import resolve_in
    from netstack.rules.nft import set_elements_commands
    from netstack.vpn import runtime

    net_ns = next(q.netns for q in plan.qubes if q.kind == "net")
    resolved_all = {}
    for d in plan.vpns:
        info = runtime.VpnInfo(**d)
        resolved = runtime.prepare(info, lambda h: resolve_in(net_ns, plan.upstream_dns[0], h))
        elems = runtime.endpoint_elements(info, resolved)
        rc, _o, err = _nft(info.netns).json_cmd(set_elements_commands(runtime.ENDPOINT_SET,
                                                                      elems))
        if rc != 0:
            raise ApplyError(f"cannot set the VPN endpoints of {info.qube}: {err.strip()}")
        resolved_all[info.qube] = resolved
    state.set(vpn_resolved=resolved_all)


def _host_nat_up(plan: Plan, state: State) -> None:
    """--uplink-mode nat: forwarding on and our own masquerade table, in the host."""
    import nftables

    from netstack.rules.host import host_nat_ruleset, host_table_commands

    hn = plan.host_nat
    assert hn is not None
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        old = f.read().strip()
    state.record(type="host_sysctl", key="net/ipv4/ip_forward", old=old, home=_home_ns())
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write("1")
    state.record(type="host_table", table=hn.table, home=_home_ns())
    rs = host_nat_ruleset(hn.table, hn.veth, hn.dev, hn.subnet)
    rc, _o, err = nftables.Nftables().json_cmd(host_table_commands(hn.table, rs))
    if rc != 0:
        raise ApplyError(f"nftables refused the host NAT table: {err.strip()}")


def _home_ns() -> str | None:
    """The named namespace netstack runs in, or None for the host's initial namespace."""
    me = os.stat("/proc/thread-self/ns/net").st_ino
    for name in netns.list_names():
        with contextlib.suppress(OSError):
            if netns.inode(name) == me:
                return name
    return None


def _make_dirs(d: str, state: State) -> None:
    """Create missing directory levels, each recorded so `down` removes what it made."""
    missing = []
    while d and not os.path.isdir(d):
        missing.append(d)
        d = os.path.dirname(d)
    for m in reversed(missing):
        state.record(type="dir", path=m)
        os.mkdir(m)


def _bind_in(ns: str, kind: int, addr: str, port: int) -> socket.socket:
    with netns.entered(ns):
        s = socket.socket(socket.AF_INET, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    if kind == socket.SOCK_STREAM:
        s.listen(64)
    return s


def start_supervisor(plan: Plan, state: State) -> None:
    """Open the lab services' sockets in their namespaces (so they accept from now on) and
    hand them to a detached supervisor process that serves them and runs the daemons."""
    import json

    socks: list[socket.socket] = []
    spec: dict[str, Any] = {"stack": plan.stack, "services": [], "daemons": []}
    for s in plan.services:
        fds = {}
        if s.type in ("http", "dns"):
            t = _bind_in(s.netns, socket.SOCK_STREAM, s.bind, s.port)
            socks.append(t)
            fds["tcp"] = t.fileno()
        if s.type == "dns":
            u = _bind_in(s.netns, socket.SOCK_DGRAM, s.bind, s.port)
            socks.append(u)
            fds["udp"] = u.fileno()
        spec["services"].append({"name": s.name, "type": s.type, "netns": s.netns,
                                 "fds": fds, "zone": s.zone,
                                 "log": os.path.join(state.dir, f"{s.name}.log")})
    for d in plan.daemons:
        spec["daemons"].append({"name": d.name, "netns": d.netns, "argv": list(d.argv),
                                "restart": d.restart, "post_start": list(d.post_start),
                                "requires": d.requires})
    spec_path = os.path.join(state.dir, "supervisor-spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    try:
        with open(os.path.join(state.dir, "supervisor.log"), "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "netstack.supervisor", state.dir],
                pass_fds=[s.fileno() for s in socks], stdin=subprocess.DEVNULL, stdout=log,
                stderr=log, start_new_session=True, close_fds=True,
            )
    finally:
        for s in socks:
            s.close()
    state.record(type="process", name="supervisor", pid=proc.pid,
                 start=proc_start_time(proc.pid))
    proc.returncode = 0  # detached on purpose: keep Popen.__del__ quiet


def _kill(pid: int, start: int | None, deadline: float = 3.0) -> None:
    """End a process we started, by PID (checked against its start time)."""
    if not proc_alive(pid, start):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if not proc_alive(pid, start):
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def supervisor_children(state: State) -> dict[str, dict[str, Any]]:
    """Processes the supervisor started, by daemon name, from its own status file."""
    import json

    try:
        with open(os.path.join(state.dir, "supervisor.json")) as f:
            return dict(json.load(f).get("children", {}))
    except (FileNotFoundError, ValueError):
        return {}


def recorded_children(state: State) -> list[dict[str, Any]]:
    return list(supervisor_children(state).values())


def down(state: State) -> list[str]:
    """Remove every recorded object, newest first; tolerate objects that never got made."""
    problems: list[str] = []
    objs = state.objects
    for o in reversed([o for o in objs if o["type"] == "process"]):
        _kill(o["pid"], o.get("start"))
    for c in recorded_children(state):  # the supervisor may have died without its children
        _kill(c["pid"], c.get("start"))
    links = _Links()
    try:
        for o in reversed(objs):
            try:
                _remove(o, links)
            except OSError as e:
                problems.append(f"{o['type']} {o.get('name') or o.get('path')}: {e}")
            except Exception as e:  # pyroute2 netlink errors
                problems.append(f"{o['type']}: {e}")
    finally:
        links.close()
    if not problems:
        state.remove()
    return problems


def _remove(o: dict[str, Any], links: _Links) -> None:
    t = o["type"]
    if t == "netns":
        netns.delete(o["name"])
    elif t == "file":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(o["path"])
    elif t == "dir":
        with contextlib.suppress(FileNotFoundError, OSError):
            os.rmdir(o["path"])
    elif t == "host_link":
        found = links(None).link_lookup(ifname=o["ifname"])
        if found:
            links(None).link("del", index=found[0])
    elif t in ("host_table", "host_sysctl"):
        home = o.get("home")
        if home and not netns.exists(home):
            return
        with netns.entered(home):
            if t == "host_sysctl":
                with open(f"/proc/sys/{o['key']}", "w") as f:
                    f.write(o["old"])
                return
            import nftables

            from netstack.rules.host import host_table_commands

            nft = nftables.Nftables()
        rc, _o, err = nft.json_cmd(host_table_commands(o["table"], None))
        if rc != 0 and "No such file" not in err:
            raise OSError(f"host table {o['table']}: {err.strip()}")
    elif t == "moved":
        # Give the device back where it came from, under its own name, before its namespace
        # goes. If that place is gone, leave it: a physical device returns to the host by
        # itself when sys-net's namespace is deleted, a veth is destroyed.
        home = o.get("home")
        if not netns.exists(o["ns"]) or (home and not netns.exists(home)):
            return
        target = netns.path(home) if home else "/proc/1/ns/net"
        for name in (o["new_name"], o["dev"]):
            found = links(o["ns"]).link_lookup(ifname=name)
            if found:
                ipr = links(o["ns"])
                ipr.link("set", index=found[0], state="down")
                ipr.link("set", index=found[0], ifname=o["dev"])
                fd = os.open(target, os.O_RDONLY)
                try:
                    ipr.link("set", index=found[0], net_ns_fd=fd)
                finally:
                    os.close(fd)
                return
