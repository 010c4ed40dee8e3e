"""One mechanism for every change: the difference between the plan in force and the desired
plan, as ordered steps applied through the kernel seam. `up` is diff(None, plan); a live
change (a disposable qube, new firewall rules, a qube moved to another netvm) is
diff(plan, plan'); `down` undoes the intent log, newest first.

The ordering rules live here and only here:
  * a namespace gets its sysctls, files and its whole ruleset (one transaction) before any
    link of it exists; links are made DOWN and set up only after every ruleset is in place;
  * a changed ruleset is replaced (one transaction) after the links it no longer admits are
    gone and before the links it now admits are made;
  * every object that outlives its namespace is recorded in the intent log before it is made;
  * run time: the lab's keys and each role's files, then the supervisor (recorded before it
    exists), then each role's activation (e.g. the VPN's endpoint set, then its go signal).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from netstack.errors import ApplyError, NetstackError, StateError, UsageError
from netstack.fastpath import has_offload, without_offload
from netstack.kernel import Kernel, slow_factor
from netstack.rules.nft import commands
from netstack.state import (
    DirRec,
    FileRec,
    HostLinkRec,
    HostSysctlRec,
    HostTableRec,
    MovedPhyRec,
    MovedRec,
    NetnsRec,
    ProcessRec,
    Record,
    State,
    crash_point,
)

if TYPE_CHECKING:  # annotations only: `down` does not import the model's dataclasses
    from netstack.model import Addr, MoveDev, NsPlan, Plan, Route, Veth

# --- steps (pure data) -----------------------------------------------------------------

@dataclass(frozen=True)
class MakeNs:
    ns: NsPlan


@dataclass(frozen=True)
class LoadRules:
    ns: str
    ruleset: dict[str, Any] = field(hash=False)
    fresh: bool = False  # a namespace just made: plain adds (no replace)
    extra: tuple[dict[str, Any], ...] = field(default=(), hash=False)  # run-time sets


@dataclass(frozen=True)
class WriteFiles:
    ns: NsPlan


@dataclass(frozen=True)
class AddVeth:
    veth: Veth


@dataclass(frozen=True)
class MoveIn:
    move: MoveDev


@dataclass(frozen=True)
class HostNatUp:
    table: str
    ruleset: dict[str, Any] = field(hash=False)


@dataclass(frozen=True)
class AddAddr:
    addr: Addr


@dataclass(frozen=True)
class LinkUp:
    ns: str | None
    ifname: str


@dataclass(frozen=True)
class AddRoute:
    route: Route


@dataclass(frozen=True)
class DelRoute:
    route: Route


@dataclass(frozen=True)
class DelLink:
    ns: str | None
    ifname: str


@dataclass(frozen=True)
class DelNs:
    ns: str


Step = (MakeNs | LoadRules | WriteFiles | AddVeth | MoveIn | HostNatUp | AddAddr | LinkUp
        | AddRoute | DelRoute | DelLink | DelNs)
LAB_READY_S = 60.0  # seconds the lab's VPN servers get to answer before `up` gives up
_BATCHED = (AddVeth, AddAddr, LinkUp, AddRoute)  # apply() hands runs of these over whole


def diff(current: Plan | None, desired: Plan) -> list[Step]:
    """The ordered steps that turn `current` (None: nothing) into `desired`."""
    cur_ns = {n.name: n for n in current.namespaces} if current else {}
    want_ns = {n.name: n for n in desired.namespaces}
    if current is not None:
        _check_live(current, desired)
    gone_ns = [n for n in cur_ns if n not in want_ns]
    new_ns = [want_ns[n] for n in want_ns if n not in cur_ns]
    cur_veths = set(current.veths) if current else set()
    new_veths = [v for v in desired.veths if v not in cur_veths]
    old_veths = [v for v in (current.veths if current else []) if v not in set(desired.veths)]
    steps: list[Step] = []
    # removals: what the new rules no longer admit goes first
    if current:
        keep = set(desired.routes)
        steps += [DelRoute(r) for r in current.routes if r not in keep and r.ns not in gone_ns
                  and not any(_on_veth(r, v) for v in old_veths)]
        for v in old_veths:
            if v.ns_b not in gone_ns:
                steps.append(DelLink(v.ns_b, v.if_b))
            elif v.ns_a is not None and v.ns_a not in gone_ns:
                steps.append(DelLink(v.ns_a, v.if_a))
        steps += [DelNs(n) for n in gone_ns]
    # namespaces, then every ruleset, before any link
    for n in new_ns:
        steps.append(MakeNs(n))
    offload_later: list[str] = []  # a flowtable names its devices: loaded once they exist
    for n in new_ns:
        if n.ruleset is not None:
            steps.append(LoadRules(n.name, without_offload(n.ruleset), fresh=True))
            if has_offload(n.ruleset):
                offload_later.append(n.name)
    for name, n in want_ns.items():
        old = cur_ns.get(name)
        if old is None:
            continue
        if n.ruleset != old.ruleset and n.ruleset is not None:
            steps.append(LoadRules(name, without_offload(n.ruleset)))
            if has_offload(n.ruleset):
                offload_later.append(name)
        if n.files != old.files or n.sysctls != old.sysctls:
            steps.append(WriteFiles(n))
    # links, made down; moved devices; the host's NAT table
    steps += [AddVeth(v) for v in new_veths]
    if current is None:
        steps += [MoveIn(m) for m in desired.moves]
        if desired.host_nat:
            from netstack.rules.host import host_nat_ruleset

            hn = desired.host_nat
            steps.append(HostNatUp(hn.table, host_nat_ruleset(hn.table, hn.veth, hn.dev,
                                                               hn.subnet)))
    steps += [LoadRules(name, want_ns[name].ruleset) for name in offload_later]
    # a link made anew (a qube moved to another netvm) carries its addresses and routes
    # again, even those equal to the old link's
    new_ends = {e for v in new_veths for e in ((v.ns_a, v.if_a), (v.ns_b, v.if_b))}
    cur_addrs = set(current.addrs) if current else set()
    steps += [AddAddr(a) for a in desired.addrs if a not in cur_addrs
              or (a.ns, a.ifname) in new_ends]
    # links up only now: every ruleset is already in place
    ups: list[LinkUp] = [LinkUp(n.name, "lo") for n in new_ns]
    for v in new_veths:
        ups += [LinkUp(v.ns_a, v.if_a), LinkUp(v.ns_b, v.if_b)]
    if current is None:
        ups += [LinkUp(m.ns, m.new_name) for m in desired.moves]
    steps += ups
    cur_routes = set(current.routes) if current else set()
    steps += [AddRoute(r) for r in desired.routes if r not in cur_routes
              or (r.ns, r.dev) in new_ends]
    return steps


def _on_veth(r: Route, v: Veth) -> bool:
    return (r.ns, r.dev) in ((v.ns_a, v.if_a), (v.ns_b, v.if_b))


def _check_live(current: Plan, desired: Plan) -> None:
    """What a live change cannot do (yet): say so instead of half-doing it."""
    for what, a, b in (("daemons", current.daemons, desired.daemons),
                       ("lab services", current.services, desired.services),
                       ("uplink", [current.uplink, current.moves, current.host_nat],
                        [desired.uplink, desired.moves, desired.host_nat])):
        if a != b:
            raise UsageError(f"this change alters the stack's {what}; that needs "
                             "`netstack down` and `up`")


# --- run time ------------------------------------------------------------------------

@dataclass
class Runtime:
    """What the run-time steps use: the kernel, the intent log, the plan, and the provider
    files parsed once (secrets stay here, in memory)."""

    kernel: Kernel
    state: State
    plan: Plan
    runtimes: Mapping[str, Any]  # kind -> its runtime (kinds/runtime.py), from the caller
    providers: dict[str, list[tuple[str, Any]]] = field(default_factory=dict)
    lab_maker: Callable[..., tuple[str, ...]] | None = None
    lab_dirauths: tuple[str, ...] = ()
    _parsed: dict[str, Any] = field(default_factory=dict)

    def write(self, path: str, text: str, mode: int = 0o600) -> None:
        """A file the stack owns; recorded first unless it lives in the state directory
        (removed whole by `down`)."""
        if not _in(path, self.state.dir):
            self.state.record(FileRec(path))
        self.kernel.write_file(path, text, mode)

    def make_dir(self, path: str, mode: int = 0o700, owner: str | None = None) -> None:
        if not _in(path, self.state.dir):
            self.state.record(DirRec(path))
        self.kernel.make_dir(path, mode, owner)

    def provider(self, qube: str, server: int = 0) -> Any:
        """A VPN qube's parsed provider file (of its server i). A lab file is parsed from
        what `up` wrote (the plan parsed its placeholder template)."""
        key = f"{qube}#{server}"
        if key not in self._parsed:
            path, cfg = self.providers[qube][server]
            lab = self.plan.lab
            if lab and path in lab.vpn_server.files.values():
                from netstack.vpn import runtime

                q = self.plan.qube(qube)
                cfg = runtime.parse_provider(q.settings["type"], self.kernel.read_file(path),
                                             path, f"qube {qube!r} field 'config'")
            self._parsed[key] = cfg
        return self._parsed[key]


def _in(path: str, d: str) -> bool:
    return os.path.abspath(path).startswith(os.path.abspath(d) + os.sep)


def apply(steps: list[Step], k: Kernel, st: State) -> None:
    """Carry out steps in order, each object recorded before it is made. A run of
    consecutive link, address, link-up or route steps goes to the kernel as one batch
    (one netlink write per namespace): the order between runs is kept, and inside a run
    nothing depends on another of its steps but a namespace's routes, which keep their
    order within it."""
    i = 0
    while i < len(steps):
        kind = type(steps[i])
        j = i + 1
        if kind in _BATCHED:
            while j < len(steps) and type(steps[j]) is kind:
                j += 1
        if j - i > 1:
            _do_many(steps[i:j], k, st)
        else:
            _do(steps[i], k, st)
        i = j


def _do_many(run: list[Any], k: Kernel, st: State) -> None:
    """Steps of one kind, as one batch of the kernel seam."""
    s0 = run[0]
    if isinstance(s0, AddVeth):
        for s in run:  # recorded before made: a host end outlives the namespaces
            if s.veth.ns_a is None:
                st.record(HostLinkRec(s.veth.if_a, k.home_ns()))
        k.veth_many([(s.veth.ns_a, s.veth.if_a, s.veth.ns_b, s.veth.if_b) for s in run])
    elif isinstance(s0, AddAddr):
        k.addr_add_many([(s.addr.ns, s.addr.ifname, s.addr.cidr) for s in run])
    elif isinstance(s0, LinkUp):
        k.link_up_many([(s.ns, s.ifname) for s in run])
    elif isinstance(s0, AddRoute):
        k.route_add_many([s.route for s in run])
    else:  # pragma: no cover - _BATCHED lists the kinds above
        raise TypeError(s0)


def _do(s: Step, k: Kernel, st: State) -> None:
    if isinstance(s, MakeNs):
        st.record(NetnsRec(s.ns.name))
        k.netns_create(s.ns.name)
        for key, value in s.ns.sysctls.items():
            k.sysctl(s.ns.name, key, value)
        _write_ns_files(s.ns, k, st)
    elif isinstance(s, LoadRules):
        cmds = commands(s.ruleset, s.fresh)
        k.nft(s.ns, {"nftables": cmds["nftables"] + list(s.extra)})
    elif isinstance(s, WriteFiles):
        for key, value in s.ns.sysctls.items():
            k.sysctl(s.ns.name, key, value)
        _write_ns_files(s.ns, k, st)
    elif isinstance(s, AddVeth):
        if s.veth.ns_a is None:
            st.record(HostLinkRec(s.veth.if_a, k.home_ns()))
        k.veth(s.veth.ns_a, s.veth.if_a, s.veth.ns_b, s.veth.if_b)
    elif isinstance(s, MoveIn) and s.move.wireless:
        phy = k.wiphy(None, s.move.dev)
        if phy is None:
            raise ApplyError(f"--uplink {s.move.dev} is not a Wi-Fi interface (no radio)")
        st.record(MovedPhyRec(s.move.dev, s.move.ns, s.move.new_name, phy, k.home_ns()))
        k.phy_move(s.move.dev, phy, s.move.ns, s.move.new_name)
    elif isinstance(s, MoveIn):
        st.record(MovedRec(s.move.dev, s.move.ns, s.move.new_name, k.home_ns()))
        k.link_move(s.move.dev, s.move.ns, s.move.new_name)
    elif isinstance(s, HostNatUp):
        home = k.home_ns()
        old = k.sysctl_get(None, "net/ipv4/ip_forward")
        st.record(HostSysctlRec("net/ipv4/ip_forward", old, home))
        k.sysctl(None, "net/ipv4/ip_forward", "1")
        st.record(HostTableRec(s.table, home))
        from netstack.rules.host import host_table_commands

        k.nft(None, host_table_commands(s.table, s.ruleset))
    elif isinstance(s, AddAddr):
        k.addr_add(s.addr.ns, s.addr.ifname, s.addr.cidr)
    elif isinstance(s, LinkUp):
        k.link_up(s.ns, s.ifname)
    elif isinstance(s, AddRoute):
        k.route_add(s.route)
    elif isinstance(s, DelRoute):
        k.route_del(s.route)
    elif isinstance(s, DelLink):
        k.link_del(s.ns, s.ifname)
    elif isinstance(s, DelNs):
        ino = k.netns_inode(s.ns)
        k.netns_delete(s.ns)
        if ino is not None:  # a sandbox that outlived its killed `run` (bubblewrap's start)
            k.end_inside({ino})
        for rec in reversed(st.objects):  # newest first: files before their directory
            if (isinstance(rec, NetnsRec) and rec.name == s.ns) or (
                    isinstance(rec, FileRec | DirRec) and f"/etc/netns/{s.ns}" in rec.path):
                if isinstance(rec, FileRec | DirRec):
                    _undo(rec, k, st)
                st.forget(rec)
    else:  # pragma: no cover - the Step union is closed
        raise TypeError(s)


def _write_ns_files(n: NsPlan, k: Kernel, st: State) -> None:
    for path, content in n.files.items():
        d = os.path.dirname(path)
        missing = []
        while d and not _dir_known(d, k, st):
            missing.append(d)
            d = os.path.dirname(d)
        for m in reversed(missing):
            st.record(DirRec(m))
            k.make_dir(m, 0o755)
        if FileRec(path) not in st.objects:
            st.record(FileRec(path))
        k.write_file(path, content, 0o644)


def _dir_known(d: str, k: Kernel, st: State) -> bool:
    return DirRec(d) in st.objects or k.is_dir(d)


def up(plan: Plan, st: State, k: Kernel, runtimes: Mapping[str, Any],
       providers: dict[str, list[tuple[str, Any]]] | None = None,
       lab_maker: Callable[..., tuple[str, ...]] | None = None) -> None:
    """Bring the plan up; on any failure undo what was made and raise, naming what could
    not be undone."""
    for n in plan.namespaces:
        if k.netns_exists(n.name):
            st.remove()  # nothing was made: no state left behind either
            raise StateError(f"namespace {n.name} already exists but is not part of a recorded "
                             f"stack; fix: `netstack --stack {plan.stack} down` removes what "
                             f"is left of the stack (or `ip netns del {n.name}`)")
    for m in plan.moves:
        if not k.link_exists(None, m.dev):
            st.remove()
            raise StateError(f"--uplink {m.dev}: no such interface in this namespace")
        wireless = k.wiphy(None, m.dev) is not None
        if wireless != m.wireless:
            st.remove()
            raise StateError(
                f"--uplink {m.dev} is a Wi-Fi interface: its radio must move and "
                f"wpa_supplicant run in {plan.net.name}; fix: set wifi = \"{m.dev}\" and "
                f"wifi_config = \"/etc/netstack/wifi.conf\" in [qubes.{plan.net.name}]"
                if wireless else
                f"--uplink {m.dev} is not a Wi-Fi interface (no radio); fix: remove wifi "
                f"and wifi_config from [qubes.{plan.net.name}]")
    if not st.data.started:  # "+SECONDS" rule expiry counts from here
        import time

        st.data.started = time.time()
    st.set_plan(plan)
    rt = Runtime(k, st, plan, runtimes, providers or {}, lab_maker)
    try:
        apply(diff(None, plan), k, st)
        run_time(rt)
    except BaseException as e:
        problems = teardown(st, k)
        if isinstance(e, NetstackError):
            if problems:
                e.args = (f"{e}; could not undo: {'; '.join(problems)}",)
            raise
        if isinstance(e, OSError) or type(e).__name__ == "NetlinkError":
            msg = f"bring-up failed and was rolled back: {e}"
            if problems:
                msg += f"; could not undo: {'; '.join(problems)}"
            raise ApplyError(msg) from e
        raise
    record_digests(plan, st, k)
    st.set_status("up")


def record_digests(plan: Plan, st: State, k: Kernel) -> None:
    """What each qube's ruleset is, as the kernel lists it once loaded: `status` compares."""
    from netstack.health import rule_digests, ruleset_digest

    docs = {q.netns: k.nft_list(q.netns) for q in plan.qubes}
    st.data.digests = {ns: ruleset_digest(d) for ns, d in docs.items()}
    st.data.rule_digests = {ns: rule_digests(d) for ns, d in docs.items()}
    st.save()


def run_time(rt: Runtime) -> None:
    from netstack import processes

    plan, k = rt.plan, rt.kernel
    if plan.lab and (plan.lab.vpn_keys or plan.lab.tor):
        k.make_dir(plan.lab.dir, 0o700)
        maker = rt.lab_maker or _make_lab
        rt.lab_dirauths = tuple(maker(plan.lab, lambda p, t: k.write_file(p, t, 0o600)))
        rt.state.data.dirauths = list(rt.lab_dirauths)
        rt.state.save()
        crash_point("lab-made")
    for q in plan.qubes:
        rt.runtimes[q.kind].prepare(q, rt)
    from netstack.rules import qubefw

    if plan.services or plan.daemons or qubefw.plan_has_runtime_sets(plan):
        processes.start_supervisor(plan, rt.state, k)  # also keeps rule names fresh
    ready = {d.name: d.ready for d in plan.daemons if d.ready}
    if ready:
        # Daemons others need (the lab's VPN servers) answer before any qube's go signal,
        # or a client's first handshake meets a closed port and waits WireGuard's 5 s retry.
        # The wait ends the moment they answer; its deadline only says when to give up: in
        # scripts/test-host's VM under TCG on a loaded host they took more than 10 s
        # (docs/field-notes.md, "qemu and Debian's kernel"): NETSTACK_SLOW_FACTOR there.
        k.wait_ready(rt.state.dir, ready, LAB_READY_S * slow_factor(),
                     lambda: processes.daemons_waiting(rt.state.dir, ready))
    for q in plan.qubes:
        rt.runtimes[q.kind].activate(q, rt)
    from netstack.rules import names

    names.refresh(rt.state.dir, plan, rt.state.data.started, k)


def _make_lab(lab: Any, write: Callable[[str, str], None]) -> tuple[str, ...]:
    from netstack.lab import vpnserver

    return vpnserver.generate(lab, write)


def change(current: Plan, desired: Plan, st: State, k: Kernel, runtimes: Mapping[str, Any],
           tolerant: bool = False) -> list[Step]:
    """The kernel steps of a live change from `current` to `desired` (netstack.live writes
    the intent before and the plan after; every object made is recorded as it is made, so
    `down` after a crash knows it). tolerant: from a state between the two (a crashed
    change rolled back): what exists already is not made again, what is gone already is not
    removed, and rules are loaded whatever failed before them."""
    import time

    from netstack.rules import names

    qube_of = {q.netns: q for q in desired.qubes}
    steps = diff(current, desired)
    store, now = names.load(st.dir), time.time()
    steps = [replace(s, extra=tuple(([] if s.fresh else runtimes[qube_of[s.ns].kind]
                                     .reload_commands(qube_of[s.ns], st))
                                    + names.fill(desired, qube_of[s.ns].name, store,
                                                 st.data.started, now)))
             if isinstance(s, LoadRules) and s.ns in qube_of else s
             for s in steps]  # a reload keeps what `up` filled in
    if tolerant:
        _apply_tolerant(steps, k, st)
    else:
        apply(steps, k, st)
    return steps


def _apply_tolerant(steps: list[Step], k: Kernel, st: State) -> None:
    """Every step, skipping what the kernel already has (a namespace, a veth end) and
    going on past what fails; a ruleset that did not load is raised at the end (the
    namespace would keep rules the plan does not say)."""
    failed: list[str] = []
    for s in steps:
        if isinstance(s, MakeNs) and k.netns_exists(s.ns.name):
            continue
        if isinstance(s, AddVeth) and s.veth.ns_a is not None and \
                k.netns_exists(s.veth.ns_a) and \
                any(x.name == s.veth.if_a for x in k.links(s.veth.ns_a)):
            continue
        try:
            _do(s, k, st)
        except Exception as e:  # noqa: BLE001 - half-made state: go on, judge rules below
            if isinstance(s, LoadRules):
                failed.append(f"rules of {s.ns}: {e}")
    if failed:
        raise ApplyError("; ".join(failed))


# --- teardown --------------------------------------------------------------------------

def teardown(st: State, k: Kernel) -> list[str]:
    """Remove every recorded object, newest first; tolerate objects that never got made.
    Returns what could not be removed (the state is kept then, for another try)."""
    from netstack import processes

    problems: list[str] = []
    objs = st.objects
    procs = [o for o in objs if isinstance(o, ProcessRec)]
    # the supervisor as its pidfile names it, when the intent log lost its record (a
    # damaged log): ended by pid and start time like a recorded one
    pf = processes.pidfile_supervisor(st)
    if pf is not None and not any(p.token == pf.token for p in procs):
        procs.append(pf)
    # the namespaces' identities, which outlive their names: what still runs inside one
    # once the recorded processes ended is a leftover of the stack (ended last, below);
    # the stack's own names count too (a namespace the damaged log no longer names)
    named = stack_namespaces(st.stack, k)
    inodes = {i for n in {o.name for o in objs if isinstance(o, NetnsRec)} | set(named)
              if (i := k.netns_inode(n)) is not None}
    # The processes are asked to end first and waited for last: they exit while the
    # namespaces and files go (nothing below needs them gone; the state directory, which
    # they write, is removed only after the wait).
    try:
        processes.ask_to_end(procs, k)
    except Exception as e:  # noqa: BLE001 - keep removing the rest
        problems.append(f"processes: {e}")
    else:
        _keep_lab_tor(st)
    for o in reversed(objs):
        if isinstance(o, ProcessRec):
            continue
        try:
            _undo(o, k, st)
        except Exception as e:  # noqa: BLE001 - netlink and OS errors alike
            problems.append(f"{type(o).__name__} {_name(o)}: {e}")
    problems += sweep(st, k)
    try:
        processes.end_all(procs, st, k)
    except Exception as e:  # noqa: BLE001 - report with the rest
        problems.append(f"processes: {e}")
    k.end_inside(inodes)
    if k.real:  # (a recording fake's pids are no processes of this host)
        problems += [f"process {p.name} pid {p.pid}: still running" for p in procs
                     if processes.alive(p)]
    if not problems:
        st.remove()
    return problems


def stack_namespaces(stack: str, k: Kernel) -> list[str]:
    """The namespaces named for the stack (names.qube_netns, names.lab_netns): a stack
    name has no '-', so the prefix is the stack's alone."""
    own = (f"nst-{stack}-", f"nsl-{stack}-")
    return [n for n in k.netns_list() if n.startswith(own)]


def sweep(st: State, k: Kernel) -> list[str]:
    """The last resort after the recorded objects are gone: the namespaces still named for
    the stack and their /etc/netns directories (what a damaged or lost intent log no
    longer names). Returns what could not be removed."""
    problems: list[str] = []
    for n in stack_namespaces(st.stack, k):
        try:
            k.netns_delete(n)
        except Exception as e:  # noqa: BLE001 - report, go on
            problems.append(f"namespace {n}: {e}")
    for path in k.etc_netns_dirs():
        if os.path.basename(path).startswith((f"nst-{st.stack}-", f"nsl-{st.stack}-")) \
                and st.owns_path(path):
            try:
                k.remove_tree(path)
            except (OSError, StateError) as e:
                problems.append(f"{path}: {e}")
    if st.lost and not any(isinstance(o, HostTableRec) for o in st.objects):
        problems += _sweep_host_table(st, k)
        problems += _sweep_host_veth(st, k)
    return problems


def _sweep_host_veth(st: State, k: Kernel) -> list[str]:
    """--uplink-mode nat's veth end in the namespace netstack runs in (names.root_uplink_
    veth), when the records that named it are lost: deleted by its name at once (the
    kernel removes a pair whose other end's namespace is gone only later, and an `up` right
    after would meet it)."""
    from netstack.names import root_uplink_veth

    veth = root_uplink_veth(st.stack)
    try:
        if k.link_exists(None, veth):
            k.link_del(None, veth)
    except Exception as e:  # noqa: BLE001 - report with the rest
        return [f"host link {veth}: {e}"]
    return []


def _sweep_host_table(st: State, k: Kernel) -> list[str]:
    """--uplink-mode nat's table in the namespace netstack runs in (plan.py names it
    netstack_STACK), when the records that named it are lost: removed by its name. The
    host's ip_forward it set cannot be put back (its old value was in the lost record):
    said, not guessed."""
    table = f"netstack_{st.stack}"
    try:
        doc = k.nft_list(None)
    except Exception:  # noqa: BLE001 - nothing listed: nothing known to remove
        return []
    if not any((i.get("table") or {}).get("name") == table and i["table"].get("family") == "ip"
               for i in doc.get("nftables", [])):
        return []
    from netstack.rules.host import host_table_commands

    try:
        k.nft(None, host_table_commands(table, None))
    except Exception as e:  # noqa: BLE001 - report with the rest
        return [f"host table ip {table}: {e}"]
    st.notes.append(f"removed the host's table ip {table} by its name; the host's "
                    "net.ipv4.ip_forward it set to 1 is left as it is (its old value was in "
                    "the lost record)")
    return []


def _keep_lab_tor(st: State) -> None:
    """The lab's private Tor network is kept for the next `up --lab` of its shape (its
    nodes have ended: their files are whole). A cache that cannot be written costs only
    the next up's speed, never the teardown."""
    if not os.path.isdir(os.path.join(st.dir, "lab", "tor")):  # (lab.plan.lab_dir): no
        return  # Tor network was made, and the plan (the model: ~20 ms) need not be read
    try:
        lab = st.plan.lab if st.plan is not None else None
    except StateError:  # a damaged plan.json: nothing to keep, the rest goes all the same
        return
    if lab is None or not lab.tor:
        return
    from netstack.tor import network

    try:
        network.save(list(lab.tor_nodes.values()), lab.tor_dir, stack=st.stack)
    except OSError as e:
        print(f"netstack: lab Tor network not kept for the next up: {e}", file=sys.stderr)


def _name(o: Record) -> str:
    for attr in ("name", "path", "ifname", "dev", "table", "key"):
        if hasattr(o, attr):
            return str(getattr(o, attr))
    return "?"


def _undo(o: Record, k: Kernel, st: State) -> None:
    if isinstance(o, NetnsRec):
        k.netns_delete(o.name)
    elif isinstance(o, FileRec):
        if not st.owns_path(o.path):
            raise StateError(f"{o.path} is outside the stack's own directories; left alone")
        k.remove_file(o.path)
    elif isinstance(o, DirRec):
        if not st.owns_path(o.path):
            raise StateError(f"{o.path} is outside the stack's own directories; left alone")
        with contextlib.suppress(OSError):  # not empty: something of the user's is inside
            k.remove_dir(o.path)
    elif isinstance(o, HostLinkRec):
        if o.home is None or k.netns_exists(o.home):
            k.link_del(o.home, o.ifname)
    elif isinstance(o, MovedRec):
        k.link_return(o.ns, [o.new_name, o.dev], o.dev, o.home)
    elif isinstance(o, MovedPhyRec):
        k.phy_return(o.ns, o.phy, [o.new_name, o.dev], o.dev, o.home)
    elif isinstance(o, HostSysctlRec):
        if o.home is None or k.netns_exists(o.home):
            k.sysctl(o.home, o.key, o.old)
    elif isinstance(o, HostTableRec) and (o.home is None or k.netns_exists(o.home)):
        from netstack.rules.host import host_table_commands

        try:
            k.nft(o.home, host_table_commands(o.table, None))
        except ApplyError as e:
            if "No such file" not in str(e):
                raise
