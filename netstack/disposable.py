"""Disposable qubes (Qubes' DispVMs, oniux's and vopono's one-command habit):
`netstack run [--netvm Q] -- CMD` adds an app qube to a running stack, runs CMD in its
sandbox with an empty home, and removes the qube when CMD ends.

A disposable is a qube of the plan like any other (kind `app`, settings `disposable`), so
the one live-change path (netstack.live, a transaction) makes and removes it: the new plan
is derived from the config plus the disposables in force, the netvm's ruleset with anti-
spoofing for the new client is loaded before the link exists, and everything is in the
intent log before it is made. The qube records the `run` process that owns it (pid and
start time): when that process is gone (kill -9), the next `run` removes the orphan,
`status` names it, and `down` removes it with the rest of the stack."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from netstack.errors import StateError, UsageError
from netstack.kernel import Kernel, proc_start_time
from netstack.kinds.app_runtime import orphaned
from netstack.kinds.registry import SPECS
from netstack.live import commit, live
from netstack.model import FwRule, Plan, QubeInfo

if TYPE_CHECKING:  # status reads a disposable's template without parsing a config
    from netstack.config import Qube, Topology

PREFIX = "disp"


def disposables(plan: Plan) -> list[QubeInfo]:
    return [q for q in plan.qubes if q.settings.get("disposable")]


@dataclass(frozen=True)
class Template:
    """What a new disposable is made like: its netvm, its label, and why (for `status`)."""

    netvm: str
    label: str
    why: str
    firewall: tuple[FwRule, ...] | None = None  # its template's list (Qubes copies it too)
    # its template's tags: the invariants that hold for the qube hold for its disposables
    tags: tuple[str, ...] = ()
    root: str | None = None  # its template's `template = NAME`: the same root file system


def template(plan: Plan, like: str | None = None) -> Template:
    """Where a disposable gets network unless told, as Qubes does: like `like` (`run
    --like QUBE`), else like the config's `[stack] default_dispvm` (that qube's netvm as it
    is now, its label), else the most private path the stack has (a Tor gateway, else a
    VPN, else the firewall furthest from the uplink), label red. Never the netvm of
    whichever app qube happens to come first: `attach` of an unrelated qube changes nothing
    here."""
    name = like or plan.default_dispvm
    if name is not None:
        if not plan.has_qube(name) or not plan.qube(name).traits.sandboxed:
            apps = sorted(q.name for q in plan.qubes if q.traits.sandboxed
                          and not q.settings.get("disposable"))
            raise UsageError(f"--like {name!r}: not an app qube of stack {plan.stack!r}; use "
                             f"one of {', '.join(apps) or '(none)'}")
        q = plan.qube(name)
        if q.netvm is None:
            raise UsageError(f"{name} is cut off (attach {name} none): give --netvm, or "
                             f"attach it to a netvm first")
        why = "run --like" if like else "[stack] default_dispvm"
        return Template(q.netvm, q.label, f"like {name} ({why})", q.firewall, q.tags,
                        q.settings.get("template"))
    providers = [q for q in plan.qubes if q.traits.provides_network]
    best = max(providers, key=lambda q: (q.traits.privacy,
                                         len(plan.chain(q.name))))
    return Template(best.name, "red", "the most private path (no default_dispvm)")


def default_netvm(plan: Plan) -> str:
    """The netvm a disposable gets unless told (see `template`)."""
    return template(plan).netvm


def new_name(plan: Plan) -> str:
    """dispN with the lowest free N (names are chosen under the stack's lock)."""
    used = {q.name for q in plan.qubes}
    return next(f"{PREFIX}{n}" for n in range(1, 1000) if f"{PREFIX}{n}" not in used)


def as_qube(q: QubeInfo) -> Qube:
    from netstack.config import Qube

    return Qube(q.name, q.kind, q.netvm, q.label, dict(q.settings), q.firewall, q.tags)


def topology(base: Topology, keep: list[QubeInfo], add: tuple[Qube, ...] | list[Qube] = (),
             netvms: dict[str, str | None] | None = None) -> Topology:
    """The config's qubes and the disposables to keep, each moved to the netvm `netvms`
    gives it (`netstack attach`), plus the disposables to add with the netvm they were
    asked for (pure). A move belongs to the qube that was moved: a new disposable that
    takes the name of a gone one never inherits its move."""
    moved = netvms or {}
    qubes = base.qubes + tuple(as_qube(q) for q in keep)
    return replace(base, qubes=tuple(replace(q, netvm=moved[q.name]) if q.name in moved
                                     else q for q in qubes) + tuple(add))


def live_moves(netvms: dict[str, str | None], cur: Plan, keep: list[QubeInfo]
               ) -> dict[str, str | None]:
    """The `attach` moves still in force: of the config's qubes and the disposables kept;
    a disposable's move goes with it."""
    disp = {q.name for q in disposables(cur)} - {q.name for q in keep}
    return {n: v for n, v in netvms.items() if cur.has_qube(n) and n not in disp}


def check_request(plan: Plan, netvm: str, label: str) -> None:
    from netstack.config import LABELS

    if label not in LABELS:
        raise UsageError(f"--label {label!r}: use one of {', '.join(LABELS)}")
    if not plan.has_qube(netvm):
        raise UsageError(f"--netvm {netvm!r}: no such qube in stack {plan.stack!r}; qubes: "
                         + ", ".join(q.name for q in plan.qubes))
    if not plan.qube(netvm).traits.provides_network:
        raise UsageError(f"--netvm {netvm!r} is an app qube and provides no network; use "
                         "one of " + ", ".join(q.name for q in plan.qubes
                                               if q.traits.provides_network))


def rebuild(stack: str, cur: Plan, config: str | None, keep: list[QubeInfo],
            add: list[Qube] | tuple[Qube, ...] = (),
            overlay: dict[str, list[Any]] | None = None,
            netvms: dict[str, str | None] | None = None,
            moved: dict[str, str | None] | None = None) -> Plan:
    """The plan of a live change: the config (with `netstack firewall`'s overlay, or
    `overlay` in its place) plus exactly the disposables `keep` and `add`. The plan in force
    must be what the config and overlay still give (else the change would carry edits of
    the config that `up` never applied)."""
    from netstack.plan import build, load_inputs, with_overlay

    inputs = load_inputs(config, stack, cur.uplink, SPECS, live=True)
    now = build(replace(inputs, topo=topology(inputs.topo, disposables(cur), (), netvms)),
                stack, cur.uplink, previous=cur)
    if now != cur:
        raise StateError(f"the config {config} (or netstack itself, after an upgrade) gives "
                         f"another plan than the one `up` of stack {stack!r} made: run "
                         "`netstack down` and `up` before changing the stack live")
    if overlay is not None:
        inputs = with_overlay(inputs, overlay, live=True)
    topo = topology(inputs.topo, keep, add, {**(netvms or {}), **(moved or {})})
    from netstack.config import validate_live

    validate_live(topo)  # each list against the netvm it will really have
    return build(replace(inputs, topo=topo), stack, cur.uplink, previous=cur)


def add(stack: str, netvm: str | None, label: str | None, gui: bool = False,
        *, kernel: Kernel, runner: int | None = None,
        like: str | None = None) -> QubeInfo:
    """Make a disposable qube in a running stack; orphans of killed `run`s go first. netvm
    and label None: from its template (`like`, the config's default_dispvm, or the most
    private path)."""
    from netstack import config

    pid = runner or os.getpid()
    with live(stack, "run", kernel) as (st, cur, k):
        if st.data.status != "up":
            raise StateError(f"stack {stack!r} is half made; run `netstack down` first")
        t = template(cur, like)
        netvm, label = netvm or t.netvm, label or t.label
        check_request(cur, netvm, label)
        name = new_name(cur)
        settings: dict[str, Any] = {"home": "ephemeral", "disposable": True,
                                    "runner": pid, "runner_start": proc_start_time(pid)}
        if gui:
            settings["gui"] = True
        if t.root:  # made like a templated qube: on the same template
            settings["template"] = t.root
        # made like a qube with rules: the same rules, enforced in its netvm (Qubes copies
        # them too)
        keep = [q for q in disposables(cur) if not orphaned(q)]
        moves = live_moves(st.data.netvms, cur, keep)
        desired = rebuild(stack, cur, st.data.config, keep,
                          [config.Qube(name, "app", netvm, label, settings, t.firewall,
                                       t.tags)],
                          netvms=st.data.netvms)
        commit(st, cur, desired, k, f"run ({name})", netvms=moves)  # all or nothing
        _forget_dead_commands(st, [q.name for q in disposables(cur) if orphaned(q)])
        return desired.qube(name)


def remove(stack: str, names: list[str] | None, kernel: Kernel) -> list[str]:
    """Remove the named disposables (None: every orphan). Returns the names removed."""
    with live(stack, "run", kernel) as (st, cur, k):
        gone = [q.name for q in disposables(cur)
                if (q.name in names if names is not None else orphaned(q))]
        if not gone:
            return []
        keep = [q for q in disposables(cur) if q.name not in gone]
        desired = rebuild(stack, cur, st.data.config, keep, [], netvms=st.data.netvms)
        commit(st, cur, desired, k, f"removal of {', '.join(gone)}",
               netvms=live_moves(st.data.netvms, cur, keep))
        _forget_dead_commands(st, gone)
        if st.removed > 200:
            st.compact()
        return gone


def _forget_dead_commands(st: Any, gone: list[str]) -> None:
    """The records of commands that ran in the removed disposables and are gone (a `run`
    killed with -9 could not retire its own): nothing is left for `down` to end there."""
    from netstack.kernel import proc_alive
    from netstack.state import ProcessRec

    for o in list(st.objects):
        if isinstance(o, ProcessRec) and o.pid is not None and \
                any(o.name.endswith(f" in {n}") for n in gone) and not proc_alive(o.pid, o.start):
            st.forget(o)


class _Ended(Exception):
    """SIGTERM or SIGHUP to `run` while the qube is being made: remove it, exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def run(stack: str, netvm: str | None, label: str | None, gui: bool, user: str | None,
        cmd: list[str], started: Callable[[QubeInfo], None] | None = None,
        like: str | None = None, *, kernel: Kernel) -> int:
    """`netstack run`: the qube exists only while CMD runs (netstack.executor runs it and
    hands signals on). Returns CMD's exit code (128+N when it died of signal N; 128+N too
    for a signal before it started)."""
    from netstack import executor
    from netstack.state import State

    if not cmd:
        raise UsageError("run: give a command after --, e.g. netstack run -- curl ...")

    def ended(signum: int, _frame: Any) -> None:
        raise _Ended(signum)

    if kernel.real:
        from netstack.state import require_root

        require_root("run")
    old = {s: signal.signal(s, ended) for s in (signal.SIGTERM, signal.SIGHUP)}
    q: QubeInfo | None = None
    k = kernel
    try:
        q = add(stack, netvm, label, gui, like=like, kernel=kernel)
        if started:
            started(q)
        st = State.load(stack)
        if st is None:
            raise StateError(f"stack {stack!r} went down while {q.name} was made")
        return executor.run(k, st, q, cmd, user=user, name=f"run in {q.name}").code
    except _Ended as e:
        return 128 + e.signum
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    finally:
        if q is not None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the clean-up is not interrupted
            try:
                remove(stack, [q.name], kernel)
            finally:
                signal.signal(signal.SIGINT, signal.default_int_handler)
        for s, h in old.items():
            signal.signal(s, h)
