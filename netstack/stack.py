"""Stack-level operations the CLI calls: plan, up, down, status, exec. Each changing
command holds the stack's lock; each reads its inputs once."""

from __future__ import annotations

import contextlib
import os
import time
from typing import TYPE_CHECKING, Any

from netstack import names
from netstack.errors import NetstackError, NotUp, StateError, UsageError
from netstack.kernel import Kernel, proc_alive

if TYPE_CHECKING:
    from collections.abc import Callable

    from netstack.model import Plan, UplinkSpec
from netstack.state import StackLock, State, require, require_root, stack_dir


def plan_only(config_path: str | None, stack: str, uplink: UplinkSpec) -> Plan:
    """What `up` would make (pure: lab keys are placeholders)."""
    from netstack.invariants import enforce
    from netstack.kinds.registry import SPECS
    from netstack.plan import build, load_inputs

    names.check_stack(stack)
    p = build(load_inputs(config_path, stack, uplink, SPECS), stack, uplink)
    enforce(p, f"the plan of {config_path or 'the default config'}",
            "change the qubes' netvm or the invariant")
    from netstack.calls import enforce_policy

    enforce_policy(p, f"the plan of {config_path or 'the default config'}")
    return p


def up(config_path: str | None, stack: str, uplink: UplinkSpec,
       kernel: Kernel, owner: int | None = None) -> tuple[Plan, str]:
    """Validate everything first (an invalid config changes nothing), then apply. A stack
    left half-made by a crash is removed first (repair); a running one is reported.
    `owner`: the pid of the process the stack lives for (check's lab stack), recorded
    with its start time in the state from the start."""
    from netstack import fastpath, reconcile

    fastpath.start_probe()  # (cli started it already) answered while the config is read
    from netstack.kinds.registry import RUNTIMES, SPECS
    from netstack.plan import build, load_inputs

    names.check_stack(stack)
    inputs = load_inputs(config_path, stack, uplink, SPECS)  # bad input: host untouched
    p = build(inputs, stack, uplink)
    from netstack.invariants import enforce

    enforce(p, f"up of {inputs.config_path}", "change the qubes' netvm or the invariant")
    from netstack.calls import enforce_policy

    enforce_policy(p, f"up of {inputs.config_path}")
    for q in p.qubes:  # a template a qube names must be there before anything is made
        if q.settings.get("template") and kernel.real:
            from netstack import templates

            if not templates.exists(q.settings["template"]):
                from netstack.errors import ConfigError

                raise ConfigError(f"qube {q.name!r} field 'template'", f"no template "
                                  f"{q.settings['template']!r} in {templates.TEMPLATE_ROOT}",
                                  f"`netstack template create {q.settings['template']}`, or "
                                  "remove the field (the qube then sees the host's system)")
    if kernel.real:
        require_root("up")
    k = kernel
    check_uplink(uplink, k)  # before anything is made: a missing device changes nothing
    note = ""
    with StackLock(stack):
        st = State.load(stack)
        if st is None and _any_left(State.from_log(stack), k):
            raise StateError(f"stack {stack!r} has no {stack_dir(stack)}/state.json but "
                             "something of it is left (namespaces, files); fix: `netstack "
                             f"--stack {stack} down` removes what it finds")
        if st is not None:
            if st.data.status == "up":
                raise StateError(f"stack {stack!r} is already up; run `netstack --stack "
                                 f"{stack} down` first, or pick another --stack")
            problems = reconcile.teardown(st, k)
            if problems:
                raise StateError(f"stack {stack!r} was half made and could not be cleaned: "
                                 + "; ".join(problems))
            note = f"repaired: removed what an interrupted `up` of stack {stack!r} had left"
        st = State(stack)
        # absolute: `audit --drift` compares with this file from any directory
        st.data.config = os.path.abspath(inputs.config_path)  # a NAME's file, resolved
        st.data.started = time.time()
        if owner is not None:
            from netstack.kernel import proc_start_time

            st.data.owner, st.data.owner_start = owner, proc_start_time(owner)
        st.create()  # from here on `down` knows the stack
        reconcile.up(p, st, k, RUNTIMES, inputs.providers)
    return p, note


def check_uplink(uplink: UplinkSpec, k: Kernel) -> None:
    """--uplink names a device of the namespace netstack runs in (moved into sys-net, or
    NATed from there): one that does not exist is refused before the stack is made, so
    nothing of the host (forwarding, a veth, a table) changes for it."""
    if uplink.mode in ("move", "nat") and uplink.dev and not k.link_exists(None, uplink.dev):
        raise UsageError(f"--uplink {uplink.dev}: no such network device in the namespace "
                         "netstack runs in; fix: name an existing one (`ip -o link` lists "
                         "them)")


def down(stack: str, kernel: Kernel, notes: list[str] | None = None, wait: float = 0.0,
         on_wait: Callable[[int | None], None] | None = None,
         on_locked: Callable[[], None] | None = None) -> list[str]:
    """Remove everything of the stack; returns what could not be removed. A damaged or
    lost state.json, or a damaged intent log, does not stop it: it removes what the log's
    readable lines name, the supervisor its pidfile names, and the namespaces named for
    the stack with what runs inside them (reconcile.teardown). `notes` gets what it had to
    do without (a damaged file, skipped lines). `wait`: seconds to wait for another
    netstack changing the stack (a live change, a disposable being made: `systemctl stop`
    may come at any time), `on_wait` told its pid when it has to."""
    from netstack import reconcile
    from netstack.errors import DamagedFile, OtherSchema

    names.check_stack(stack)
    if kernel.real:
        require_root("down")
    said = notes if notes is not None else []
    with StackLock(stack, wait=wait, on_wait=on_wait):
        if on_locked is not None:  # (the command line holds its signals from here)
            on_locked()
        try:
            st = State.load(stack)
        except DamagedFile as e:
            if isinstance(e, OtherSchema):
                raise
            said.append(f"{e.path} is damaged ({e.problem}): removing what the intent log "
                        "and the stack's names still show")
            st = State.from_log(stack)
            st.lost = True
        if st is None:
            st = State.from_log(stack)
            if not _any_left(st, kernel):
                raise NotUp(f"stack {stack!r} is not up (no state in {stack_dir(stack)})")
            said.append(f"{st.path} is missing: removing what the intent log and the "
                        "stack's names still show")
            st.lost = True
        st.lost = st.lost or bool(st.bad_lines)
        if st.bad_lines:
            said.append(f"{st.log_path}: skipped {len(st.bad_lines)} unreadable line(s) "
                        f"({', '.join(map(str, st.bad_lines[:5]))}"
                        f"{', ...' if len(st.bad_lines) > 5 else ''}); what they named is "
                        "found by the stack's names only (its namespaces, /etc/netns)")
        problems = reconcile.teardown(st, kernel)
        said += st.notes
        return problems


def _any_left(st: State, k: Kernel) -> bool:
    """Anything of a stack without state.json: its directory's files, a namespace or
    /etc/netns directory named for it."""
    from netstack import reconcile

    with contextlib.suppress(OSError):
        if os.listdir(st.dir):
            return True
    own = (f"nst-{st.stack}-", f"nsl-{st.stack}-")
    return bool(reconcile.stack_namespaces(st.stack, k)) or any(
        os.path.basename(d).startswith(own) for d in k.etc_netns_dirs())


def interrupted(st: Any) -> str | None:
    """A live change a crash left half done (netstack.live), as a status problem."""
    from netstack.live import pending

    intent = pending(st)
    if intent is None:
        return None
    return (f"a live change ({intent.command}) was interrupted "
            f"({'kernel changed, files not' if intent.phase == 'applied' else 'midway'}): "
            "the next firewall, attach or run finishes or undoes it")


def status(stack: str, k: Kernel) -> dict[str, Any]:
    """Recorded plan plus live facts read from each namespace, and the verdict on them."""
    from netstack import health, pathfacts
    from netstack.codec import dump
    from netstack.kinds.registry import RUNTIMES
    from netstack.kinds.runtime import LiveFacts
    from netstack.processes import children, pidfile_supervisor, supervisor_pid
    from netstack.state import ProcessRec

    require_root("status")
    from netstack.state import check_stack

    check_stack(stack)
    if State.load(stack) is None:  # state.json gone: not up, unless something is left
        left = State.from_log(stack)
        if _any_left(left, k):
            raise StateError(f"stack {stack!r} has no {left.path} but something of it is "
                             f"left (namespaces, files); fix: `netstack --stack {stack} "
                             "down` removes what it finds")
    st = require(stack)
    p = st.plan
    assert p is not None
    sup = [o for o in st.objects if isinstance(o, ProcessRec) and o.pid is not None
           and o.name == "supervisor"]  # (captures of check and leaktest are recorded too)
    pf = pidfile_supervisor(st)  # its own word, when the intent log lost the record
    if pf is not None and not any(o.token == pf.token for o in sup):
        sup.append(pf)
    sup_alive = any(proc_alive(o.pid, o.start) for o in sup)
    kids = {n: {**dump(c), "alive": proc_alive(c.pid, c.start)}
            for n, c in children(st).items()}
    if not sup_alive:  # nobody keeps the monitors' reports fresh
        for c in kids.values():
            c["health"] = {}
    out: dict[str, Any] = {"stack": stack, "status": st.data.status,
                           "config": st.data.config, "uplink": dump(p.uplink), "qubes": []}
    verdicts: dict[str, health.Verdict] = {}
    from netstack.rules import names

    names_store = names.load(st.dir)
    want_sets = health.expected_sets(p, st.data.resolved, names_store, st.data.started,
                                     time.time())
    for q in p.qubes:
        running = k.netns_exists(q.netns)
        links = k.links(q.netns) if running else []
        entry: dict[str, Any] = {
            "name": q.name, "kind": q.kind, "netvm": q.netvm, "label": q.label,
            "netns": q.netns, "addresses": [a for a in (q.ipv4, q.ipv6) if a],
            "gateway": q.gateway, "running": running,
            "interfaces": [{"name": x.name, "state": x.state, "flags": x.flags,
                            "addresses": x.addresses, "rx_bytes": x.rx_bytes,
                            "tx_bytes": x.tx_bytes, "rx_packets": x.rx_packets,
                            "tx_packets": x.tx_packets} for x in links if x.name != "lo"]}
        if q.tags:
            entry["tags"] = list(q.tags)
        if q.settings.get("template"):  # its root file system (netstack/templates.py)
            entry["template"] = q.settings["template"]
        role = RUNTIMES[q.kind]
        entry.update(role.status(q, LiveFacts(links, kids,
                                              st.data.resolved.get(q.name, {}),
                                              _watching(st)), k))
        if q.name in names_store:
            entry["client_rules"] = {"names": {h: a.to_json() for h, a in
                                               names_store[q.name].items()}}
        problems = [f"daemon {d.name} not running" for d in p.daemons
                    if d.netns == q.netns and not (kids.get(d.name) or {}).get("alive")]
        if st.data.status == "up" and q.netns not in st.data.digests:
            # nothing to compare its live ruleset with: unknown is not healthy
            problems.append(f"no ruleset recorded in {st.path} to compare with; fix: "
                            f"`netstack --stack {stack} down` and `up` again")
        doc = pathfacts.list_ruleset(k, q.netns) if running else None
        live = health.ruleset_digest(doc) if doc is not None else None
        if doc is not None:
            problems += _what_moved(st, q, doc, k, want_sets)
        v = health.qube_verdict(entry, q.interfaces, st.data.digests.get(q.netns), live,
                                problems + (role.health(entry) if running else []))
        entry["health"] = v.to_json()
        verdicts[q.name] = v
        out["qubes"].append(entry)
    extra = []
    if st.data.status != "up":
        extra.append("half made: an interrupted `up` (run `netstack down`, or `up` to "
                     "repair)")
    if (why := interrupted(st)) is not None:
        extra.append(why)
    if st.data.owner is not None:
        from netstack.state import owner_gone

        gone = owner_gone(st.data)
        out["owner"] = {"pid": st.data.owner, "alive": not gone}
        if gone:
            extra.append(f"orphaned: made for `netstack check` pid {st.data.owner}, which is "
                         f"gone; fix: the next `netstack check` removes it, or `netstack "
                         f"--stack {stack} down`")
    if st.bad_lines:
        extra.append(f"intent log {st.log_path} damaged: {len(st.bad_lines)} unreadable "
                     f"line(s) (line {st.bad_lines[0]} first); fix: `netstack --stack "
                     f"{stack} down` removes the stack by its names too")
    if (p.services or p.daemons) and not sup_alive:
        extra.append("supervisor not running: nothing restarts the daemons")
    for n in p.namespaces:
        if n.qube is None and not k.netns_exists(n.name):
            extra.append(f"lab namespace {n.name} missing")
    extra += [f"daemon {d.name} not running" for d in p.daemons
              if not any(d.netns == q.netns for q in p.qubes)
              and not (kids.get(d.name) or {}).get("alive")]
    extra += _watch_status(st, p, out)
    out["health"] = health.stack_verdict(verdicts, extra).to_json()
    from netstack.disposable import template

    with contextlib.suppress(NetstackError):  # a default_dispvm that was cut off: none
        t = template(p)
        out["dispvm"] = {"netvm": t.netvm, "label": t.label, "why": t.why}
    if p.lab:
        lab = dump(p.lab)
        lab["capture"] = {"isp_link": dump(p.lab.isp_link)}
        out["lab"] = lab
    out["processes"] = [{"name": o.name, "pid": o.pid, "alive": proc_alive(o.pid, o.start)}
                        for o in sup if o.pid == supervisor_pid(st)]
    out["processes"] += [{"name": c["name"], "pid": c["pid"], "alive": c["alive"],
                          "restarts": c["restarts"]} for c in kids.values()]
    return out


def _watching(st: State) -> bool:
    """Whether the uplink watch runs now (its file names a live process)."""
    from netstack import codec
    from netstack.errors import DamagedFile
    from netstack.watchfilter import WatchFile

    with contextlib.suppress(OSError, DamagedFile):
        w = codec.read(os.path.join(st.dir, "watch.json"), WatchFile)
        return not w.stopped and proc_alive(w.pid, w.start)
    return False


def _watch_status(st: State, p: Any, out: dict[str, Any]) -> list[str]:
    """The uplink watch's alarms (DEGRADED until `watch --clear`) and, when the config
    asks for it, whether it runs (netstack/watch.py writes the file, read here)."""
    from netstack import codec
    from netstack.errors import DamagedFile
    from netstack.watchfilter import WatchFile, problems

    w = None
    with contextlib.suppress(OSError, DamagedFile):
        w = codec.read(os.path.join(st.dir, "watch.json"), WatchFile)
    live = w is not None and not w.stopped and proc_alive(w.pid, w.start)
    if w is not None or p.watch:
        out["watch"] = {"wanted": p.watch, "on_leak": p.on_leak, "running": live and w is not
                        None and time.time() - w.heartbeat < 5,
                        "alarms": w.count if w else 0, "cut": bool(w and w.cut),
                        "pcap": w.pcap if w else None}
    return problems(w, wanted=p.watch, alive=live, now=time.time())


def _what_moved(st: Any, q: Any, doc: dict[str, Any], k: Any,
                want_sets: dict[str, dict[str, set[str]]]) -> list[str]:
    """What status cannot afford to miss in a qube, each named: a rule or chain of our
    table that is not what netstack loaded, a set element it did not set (a widened kill
    switch), a table it did not make, and a packet path beside nftables (tc filters, XDP,
    links it did not make, policy routing rules)."""
    from netstack import health, pathfacts

    out = []
    want = st.data.rule_digests.get(q.netns)
    if want is not None and health.ruleset_digest(doc) != st.data.digests.get(q.netns):
        out += health.rule_problems(want, doc)
    out += health.set_problems(want_sets.get(q.netns, {}), doc)
    out += pathfacts.foreign_objects(doc)
    tun = q.tunnel
    planned = list(q.interfaces) + ([tun.dev] if tun else [])
    facts = {**pathfacts.kernel_facts(k.netlink(q.netns)),
             "legacy": k.x_tables(q.netns)}
    out += [str(f) for f in pathfacts.kernel_findings(facts, planned)]
    return out


def tor_of(stack: str, qube: str | None) -> Any:
    from netstack.tor.gateway import TorInfo

    st = require(stack)
    assert st.plan is not None
    tors: list[TorInfo] = st.plan.infos(TorInfo)
    if not tors:
        raise UsageError(f"stack {stack!r} has no tor qube")
    if qube is None:
        if len(tors) > 1:
            raise UsageError("several tor qubes: name one with --qube "
                             + ", ".join(t.qube for t in tors))
        return tors[0]
    for t in tors:
        if t.qube == qube:
            return t
    raise UsageError(f"--qube {qube!r} is not a tor qube of stack {stack!r}")


def exec_argv(k: Kernel, stack: str, qube: str, user: str | None, cmd: list[str],
              root_inside: bool = False, extra: tuple[Any, ...] = ()) -> list[str]:
    """The command line of `cmd` in a qube of a running stack, by name, for callers that
    join processes themselves (copy's pipe, the leak test's local checks); running a
    user's command is netstack.executor's."""
    from netstack import executor

    st = require(stack)
    q = executor.qube(st, qube)
    return executor.argv(k, st, q, cmd, user, root_inside, extra)


def run_in(k: Kernel, stack: str, qube: str, cmd: list[str], **how: Any) -> Any:
    """`netstack exec`: `cmd` in a qube of a running stack, by name (netstack.executor.run
    with the stack's state and a kernel of its own); its Outcome."""
    from netstack import executor

    st = require(stack)
    q = executor.qube(st, qube)
    return executor.run(k, st, q, cmd, **how)
