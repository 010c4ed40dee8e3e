"""The netstack command line. Errors of ours print as one line (and, with --json, as a JSON
object on stdout); exit codes:
  0 ok
  1 a check failed: leaks, an unproven property, a degraded stack, or what it compares
    against cannot be loaded (the config for `audit --drift`, the kill switch's live sets
    or the failover state for `leaktest`); or a runtime error
  2 bad config, bad input or usage, or root needed
  3 stack state: not up, already up, half made, damaged state files, being changed by
    another netstack
  4 the system refused a change (rolled back)
  5 Tor's control port unreachable
  6 inconclusive: leaktest could not send a probe or saw no answer to a control case
  130 interrupted (Ctrl-C); 141 output closed (a pipe)
exec and run exit with the command's code, as a shell does (netstack.executor): 127 not
found, 126 not executable, 128+N killed by signal N."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from netstack.errors import ApplyError, NetstackError, StateError, UsageError, count

if TYPE_CHECKING:  # `down` and `status` do without the model's import (~13 ms)
    from netstack.model import UplinkSpec

EXAMPLES = """examples:
  sudo netstack up --lab                         # the chain over the built-in lab internet
  sudo netstack up configs/basic.toml --lab      # a given qube table
  sudo netstack status                           # qubes, links, addresses (--json too)
  sudo netstack exec work -- curl http://web.lab.test/
  sudo netstack --stack t1 up --lab              # a second stack side by side
  sudo netstack down                             # remove everything of the stack
  netstack plan configs/basic.toml --lab --json  # what `up` would make (no root needed)
"""

LABEL_COLOURS = {"red": "31", "orange": "38;5;208", "yellow": "33", "green": "32",
                 "gray": "90", "blue": "34", "purple": "35", "black": "30;47"}


def _seconds(text: str) -> float:
    """A --wait: seconds from 0 to a day (argparse names the option in its error)."""
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0 <= v <= 86400:  # also NaN
        raise argparse.ArgumentTypeError(f"{text!r} is not seconds from 0 to 86400")
    return v


def _uplink(args: argparse.Namespace) -> UplinkSpec:
    from netstack.model import UplinkSpec

    if args.lab and args.uplink:
        raise UsageError("--lab and --uplink exclude each other: pick one")
    if getattr(args, "sink", False) and not args.lab:
        raise UsageError("--sink is a mode of the lab: add --lab")
    isp = getattr(args, "isp", None)
    if isp and not args.lab:
        raise UsageError("--isp is a mode of the lab: add --lab")
    if args.lab:
        from netstack.lab.isp import parse

        return UplinkSpec("lab", sink=getattr(args, "sink", False), isp=parse(isp))
    if args.uplink:
        return UplinkSpec(args.uplink_mode, args.uplink)
    raise UsageError("say where sys-net's uplink is: --lab (simulated internet) or "
                     "--uplink DEV")


def colour(label: str, text: str, width: int = 0) -> str:
    """`text` in its label's colour, padded to `width` visible columns: the padding goes
    outside the escape codes, which take no column (`f"{...:<22}"` would count them, and
    black's background would paint the padding)."""
    pad = " " * max(0, width - len(text))
    if not sys.stdout.isatty() or os.environ.get("NO_COLOR"):
        return text + pad
    return f"\033[{LABEL_COLOURS.get(label, '0')}m{text}\033[0m{pad}"


def cmd_up(args: argparse.Namespace) -> int:
    from netstack import fastpath
    from netstack.kernel import slow_factor

    fastpath.start_probe()  # the kernel's answer comes while the config is read
    # the waits' deadlines, known before anything is made (a bad NETSTACK_SLOW_FACTOR is
    # refused here, not after the chain exists)
    vpn_timeout = args.vpn_timeout if args.vpn_timeout is not None else 30 * slow_factor()
    tor_timeout = args.tor_timeout if args.tor_timeout is not None else 120 * slow_factor()
    from netstack import stack
    from netstack.service import Notifier

    sd = Notifier()  # under systemd (Type=notify): progress, then the hand-over
    sd.send(status="bringing the chain up")
    p, note = stack.up(args.config, args.stack, _uplink(args), args.kernel)
    if note:
        print(note, file=sys.stderr)
    said = (f"stack {args.stack!r} up: {count(len(p.qubes), 'qube')}"
            + (f", lab with {count(len(p.lab.hosts), 'host')}" if p.lab else ""))
    from netstack import journal

    if not (journal.wanted() and journal.stderr_is_journal(fd=1)):  # else: the record says it
        print(said)
    from netstack.kinds.app_runtime import gui_status

    for q in p.qubes:  # what a display grant means, said where it is made
        for w in gui_status(q)[1]:
            print(f"netstack: {q.name}: WARNING: {w}", file=sys.stderr)
    from netstack.firewall_live import shadow_warnings

    for w in shadow_warnings(p):
        print(f"netstack: WARNING: {w}", file=sys.stderr)
    from netstack.state import State

    st = State.load(args.stack)
    assert st is not None
    journal.send(said, journal.NOTICE, stack=args.stack, event="up", config=st.data.config,
                 qubes=" ".join(q.name for q in p.qubes), uplink_mode=p.uplink.mode)
    # Under systemd the unit is ready now: the chain exists and is closed (what units
    # ordered after it, and network-pre.target in move mode, need). Connecting is
    # reported as STATUS; a tunnel that cannot connect is a state, not a failed start.
    _ready(sd, st, "chain made and closed" + ("" if args.no_wait else "; connecting"))
    if args.no_wait:
        return 0
    left_up = (f"stack {args.stack!r} is left up (`netstack --stack {args.stack} status` shows "
               f"it, `netstack --stack {args.stack} down` removes it)")
    try:  # in tree order: a VPN below a Tor gateway is ready first
        for q in p.qubes:
            timeout = tor_timeout if q.traits.protection == "tor" else vpn_timeout
            took = wait_qube_ready(args, sd, q, st, timeout)
            if took is not None:
                said = f"{q.kind} {q.name}: ready in {took:.1f} s"
                if not (journal.send(said, stack=args.stack, event="ready", qube=q.name,
                                     kind=q.kind, seconds=f"{took:.1f}")
                        and journal.stderr_is_journal()):  # said once under systemd
                    print(f"\n{said}", file=sys.stderr)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return _fail(args, f"stopped waiting; {left_up}", 130)
    except NetstackError as e:
        print(file=sys.stderr)
        sd.send(status=f"chain closed, not connected: {e}")
        sd.barrier()
        return _fail(args, f"{e}; {left_up}", e.exit_code)
    sd.send(status="chain up: tunnels connected, Tor bootstrapped")
    sd.barrier()  # systemd reads the last STATUS while `up` is still its unit's
    journal.send(f"stack {args.stack!r}: chain up, tunnels connected, Tor bootstrapped",
                 journal.NOTICE, stack=args.stack, event="connected")
    return 0


def wait_qube_ready(args: argparse.Namespace, sd: Any, q: Any, st: Any,
                timeout: float) -> float | None:
    """A qube's readiness, waited for `timeout`. Under systemd the unit is ready already
    and a tunnel that does not connect is a state, not a failed start: `up` says so as
    STATUS and waits on, `timeout` at a time, until it connects or the stack is gone (then
    the NetstackError ends it), so the unit's STATUS follows the chain (docs/host.md)."""
    from netstack.kinds.registry import RUNTIMES
    from netstack.state import State

    t0 = time.monotonic()
    progress = _progress_bar(f"{q.kind} {q.name}", sd)
    while True:
        t1 = time.monotonic()
        try:
            took = RUNTIMES[q.kind].wait_ready(q, st, args.kernel, timeout, progress)
            return None if took is None else time.monotonic() - t0
        except NetstackError as e:
            if not sd.addr or State.load(args.stack) is None:
                raise
            msg = f"{e}; still waiting ({time.monotonic() - t0:.0f} s so far)"
            print(f"\nnetstack: {msg}", file=sys.stderr)
            sd.send(status=msg)
            # a wait that fails at once (a control socket not there yet) is not retried
            # in a busy loop: at most one try a second
            time.sleep(max(0.0, 1.0 - (time.monotonic() - t1)))


def _ready(sd: Any, st: Any, status: str) -> None:
    """Hand the unit over to the supervisor (systemd watches it from now on), then say
    ready."""
    from netstack.processes import supervisor_pid

    pid = supervisor_pid(st)
    if pid is not None:
        sd.send(mainpid=pid)
    sd.send(ready=1, status=status)


def _progress_bar(label: str, sd: Any = None):
    tty = sys.stderr.isatty()
    last = [-1]

    def show(pct: int, summary: str) -> None:
        if pct == last[0]:
            return
        last[0] = pct
        if sd is not None:
            sd.send(status=f"{label}: {pct}% {summary}")
        bar = "#" * (pct // 5) + "." * (20 - pct // 5)
        end = "" if tty else "\n"
        print(f"\r{label} [{bar}] {pct:3d}% {summary[:40]:<40}", end=end, file=sys.stderr,
              flush=True)

    return show


def cmd_down(args: argparse.Namespace) -> int:
    from netstack import stack

    notes: list[str] = []
    try:
        problems = stack.down(
            args.stack, args.kernel, notes, wait=args.wait, on_locked=_hold_signals,
            on_wait=lambda pid: print(f"netstack: waiting up to {args.wait:g} s for "
                                      f"{'pid ' + str(pid) if pid else 'another netstack'}"
                                      " to finish its change of the stack", file=sys.stderr))
    except StateError:
        if not args.purge:
            raise
        from netstack import sandbox  # a stack that is down: only its homes are left

        homes, (lab, trouble) = sandbox.purge_homes(args.stack), purge_lab_tor(args.stack)
        if not (homes or lab or trouble):
            raise
        if homes or lab:
            print(f"stack {args.stack!r} was down; removed: "
                  + ", ".join(w for w, x in (("app qubes' homes", homes),
                                              ("the kept lab Tor network", lab)) if x))
        return purge_trouble(trouble)
    for n in notes:
        print(f"netstack: {n}", file=sys.stderr)
    if problems:
        for pr in problems:
            print(f"netstack: could not remove {pr}", file=sys.stderr)
        print(f"netstack: stack {args.stack!r} is not wholly down: {len(problems)} thing(s) "
              "left (above)", file=sys.stderr)
        return 1
    if args.purge:
        from netstack import sandbox

        homes = sandbox.purge_homes(args.stack)
        lab, trouble = purge_lab_tor(args.stack)
        gone = [w for w, x in (("app qubes' homes", homes), ("the kept lab Tor network", lab))
                if x]
        print(f"stack {args.stack!r} down, removed: {', '.join(gone)}" if gone else
              f"stack {args.stack!r} down (no homes or kept lab to remove)")
        return purge_trouble(trouble)
    # (netstack.sandbox.HOME_ROOT and netstack.tor.network.CACHE_ROOT, without the 36 ms
    # that importing the latter costs every `down`)
    homes = f"/var/lib/netstack/{args.stack}"
    cache = os.environ.get("NETSTACK_LAB_TOR_CACHE", "/var/lib/netstack/lab-tor")
    kept = ([f"app qubes' homes in {homes}"] if os.path.isdir(homes) else []) + \
        ([f"the lab's Tor network in {cache}"] if os.path.isdir(cache) else [])
    print(f"stack {args.stack!r} down" + (f" ({', '.join(kept)} kept; --purge removes "
                                          "them)" if kept else ""))
    return 0


def purge_lab_tor(stack: str) -> tuple[bool, str | None]:
    """The lab's private Tor network this stack kept for a warm `up --lab`
    (netstack.tor.network; other stacks' shapes stay): (removed one, why not all went).
    What the purge could not remove is said after what was done, never instead of it."""
    from netstack.tor.network import purge_cache

    try:
        return purge_cache(stack), None
    except ApplyError as e:
        return False, str(e)


def purge_trouble(trouble: str | None) -> int:
    if trouble:
        print(f"netstack: {trouble}", file=sys.stderr)
        return 1
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from netstack import stack

    p = stack.plan_only(args.config, args.stack, _uplink(args))
    if args.json:
        from netstack.codec import dump

        print(json.dumps(dump(p), indent=2))
        return 0
    wn = max((len(q.name) for q in p.qubes), default=0)  # names are up to 31 characters
    wv = max((len(q.netvm or "-") for q in p.qubes), default=0)
    for q in p.qubes:
        print(f"{colour(q.label, q.name, wn)} {q.kind:<9} netvm={q.netvm or '-':<{wv}} "
              f"{q.ipv4:<13} ns={q.netns}")
    from netstack.firewall_live import shadow_warnings

    for w in shadow_warnings(p):
        print(f"netstack: WARNING: {w}", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from netstack import stack
    from netstack.kinds.registry import RUNTIMES

    s = stack.status(args.stack, args.kernel)
    ok = s["health"]["state"] == "up"
    if args.json:
        print(json.dumps(s, indent=2))
        return 0 if ok else 1
    h = s["health"]
    print(f"stack {s['stack']}: {h['state'].upper()}  (config {s['config']})")
    for pr in h["problems"]:
        print(f"  ! {pr}")
    wn = max((len(q["name"]) for q in s["qubes"]), default=0)  # up to 31 characters
    wv = max((len(q["netvm"] or "-") for q in s["qubes"]), default=0)
    for q in s["qubes"]:
        ifs = ", ".join(f"{i['name']}[{i['state']}]" for i in q["interfaces"]) or "-"
        mark = "" if q["health"]["state"] == "up" else f"  ({q['health']['state']})"
        print(f"  {colour(q['label'], '■')} {colour(q['label'], q['name'], wn)} "
              f"{q['kind']:<9} netvm={q['netvm'] or '-':<{wv}} "
              f"{', '.join(q['addresses']):<13} {ifs}{mark}")
        from netstack.rules.names import status_lines as name_lines

        facts = [f"template {q['template']}"] if q.get("template") else []
        facts += [f"tags {', '.join(q['tags'])}"] if q.get("tags") else []
        for line in ["; ".join(facts)] * bool(facts) + RUNTIMES[q["kind"]].status_lines(q) \
                + name_lines(q):
            print(f"      {line}")
    if s.get("dispvm"):
        d = s["dispvm"]
        print(f"  disposables (`run`): behind {d['netvm']}, label "
              f"{colour(d['label'], d['label'])}: {d['why']}")
    if s.get("lab"):
        lab = s["lab"]
        hosts = ", ".join(f"{n}={h['address']}" for n, h in lab["hosts"].items())
        isp = lab["isp_link"]
        print(f"  lab: {hosts}; ISP link capture: ip netns exec {isp['netns']} "
              f"tcpdump -i {isp['interface']}")
        if lab.get("isp"):
            print(f"  lab ISP is hostile: {', '.join(lab['isp'])} (docs/isp.md)")
    for pr in s["processes"]:
        print(f"  process {pr['name']} pid {pr['pid']}: {'alive' if pr['alive'] else 'DEAD'}")
    return 0 if ok else 1


def cmd_service(args: argparse.Namespace) -> int:
    from netstack import service

    unit_dir = args.unit_dir or service.UNIT_DIR
    if args.action == "list":
        units = sorted(f for f in os.listdir(unit_dir)
                       if f.startswith("netstack-") and f.endswith(".service")) \
            if os.path.isdir(unit_dir) else []
        if args.json:
            print(json.dumps([{"unit": u, "path": os.path.join(unit_dir, u)} for u in units]))
        else:
            print("\n".join(units) or f"no netstack units in {unit_dir}")
        return 0
    if os.geteuid() != 0 and args.action != "show" and not args.unit_dir:
        raise UsageError(f"netstack service {args.action} writes {unit_dir}: run it with sudo")
    if args.action == "remove":
        for line in service.remove(args.stack, unit_dir):
            print(line)
        return 0
    from netstack import stack

    uplink = _uplink(args)
    p = stack.plan_only(args.config, args.stack, uplink)  # a bad config writes nothing
    from netstack.config import resolve
    from netstack.plan import CONFIG_DIR, DEFAULT_CONFIG

    config = resolve(args.config, CONFIG_DIR) if args.config else str(DEFAULT_CONFIG)
    spec = service.UnitSpec(args.stack, os.path.abspath(config), uplink,
                            bool(p.daemons or p.services))
    if args.action == "show":
        print(service.unit_text(spec), end="")
        return 0
    for line in service.install(spec, unit_dir, enable=not args.no_enable):
        print(line)
    import shutil

    if shutil.which("systemd-analyze"):
        complaints = service.verify(os.path.join(unit_dir, spec.name))
        print("systemd-analyze verify: " + (complaints or "clean"))
    return 0


def cmd_tor(args: argparse.Namespace) -> int:
    from netstack import stack
    from netstack.tor import control

    t = stack.tor_of(args.stack, args.qube)
    sock = t.control_socket
    if args.action == "status":
        s = control.status(sock)
        from netstack.tor.gateway import onion_addresses

        s["onions"] = onion_addresses(t)
        if args.json:
            print(json.dumps({"qube": t.qube, **s}, indent=2))
        else:
            print(f"tor {t.qube}: version {s['version']}, bootstrap {s['bootstrap']}% "
                  f"({s['summary']}), {count(s['circuits_built'], 'circuit')} built")
            for client, addr in sorted(s["onions"].items()):
                print(f"  onion service of {client}: {addr or 'not made yet'}")
        return 0 if s["bootstrap"] == 100 else 1
    if args.action == "circuits":
        cs = control.circuits(sock)
        if args.json:
            print(json.dumps(cs, indent=2))
        else:
            for c in cs:
                path = " -> ".join(f"{r['nickname']}({r['address'] or '?'})"
                                   for r in c["relays"])
                print(f"{c['id']:>4} {c['status']:<9} {c['purpose']:<16} {path}")
        return 0
    control.newnym(sock)
    print(f"tor {t.qube}: NEWNYM sent (new circuits for new connections)")
    return 0


def cmd_leaktest(args: argparse.Namespace) -> int:
    from netstack.leaktest import battery

    if args.rules:
        return _leaktest_rules(args)
    r = battery.run(args.stack, args.qube, args.scenario, pcaps_dir=args.pcaps,
                    kernel=args.kernel)
    if args.json:
        print(json.dumps(r.to_json(), indent=2))
    else:
        print(f"leaktest of stack {r.stack} from {r.workstation} ({r.chain_kind} chain), "
              f"scenario {r.scenario}" + (f", fault {r.fault}" if r.fault else ""))
        print(f"{'case':<24} {'sent':>7}  {'verdict':<7} seen on")
        for c in r.cases:
            where = ", ".join(c["seen_on"]) or "-"
            if c["leaked_on"]:
                where += "  LEAKED ON: " + ", ".join(c["leaked_on"])
            print(f"{c['case']:<24} {c['sent']:>3}/{c['planned']:<3}  {c['verdict']:<7} {where}")
        print(f"{'link':<28} {'zone':<11} {'packets':>7}  verdict")
        for lk in r.links:
            print(f"{lk['link']:<28} {lk['zone']:<11} {lk['packets']:>7}  {lk['verdict']}"
                  + (f" ({lk['violation_count']} violations)" if lk["violation_count"] else ""))
        bad = [c["case"] for c in r.cases if c["leaked_on"]]
        for e in r.errors:
            print(f"ERROR: {e}")
        word = "LEAK" if r.leaks else "ERROR" if r.errors else "PASS"
        print(f"{word}: {count(len(r.cases), 'case')}, {count(r.packets_sent, 'packet')},"
              f" {count(len(r.links), 'link')} captured, {count(r.leaks, 'leak')}"
              + (f" ({', '.join(bad)})" if bad else "") + f", {r.seconds} s; pcaps in {r.pcaps}")
    return 1 if r.leaks else 6 if r.errors else 0


def _leaktest_rules(args: argparse.Namespace) -> int:
    """--rules: cases from each qube's own rule list, probed from inside the qube."""
    from netstack.leaktest import rulecases
    from netstack.stack import require_root

    require_root("leaktest")
    reps = rulecases.run(args.stack, args.qube, expiry=not args.no_expiry, kernel=args.kernel)
    if args.json:
        print(json.dumps([r.to_json() for r in reps], indent=2))
        return 0 if all(r.ok for r in reps) else 1
    for r in reps:
        print(f"rules of {r.qube}, enforced in {r.netvm}:")
        for c in r.cases:
            want = "reach" if c.expect else "blocked"
            print(f"  {'ok  ' if c.ok else 'FAIL'} {c.name:<34} expect {want:<8} {c.got}"
                  f"   ({c.why})")
        e = r.expiry
        if e.get("skipped"):
            print(f"  --   expiry: {e['skipped']}")
        elif e:
            print(f"  {'ok  ' if e['ok'] else 'FAIL'} expire=+{e['expire_s']} on {e['target']}:"
                  f" open at once {e['open_at_once']}, closed after {e['closed_after_s']} s")
    bad = sum(1 for r in reps for c in r.cases if not c.ok) + \
        sum(1 for r in reps if r.expiry and not r.expiry.get("ok", True))
    n = sum(len(r.cases) for r in reps)
    print(f"{'PASS' if not bad else 'FAIL'}: {count(n, 'rule case')} over "
          f"{count(len(reps), 'qube')}, {bad} wrong")
    return 0 if not bad else 1


def cmd_attach(args: argparse.Namespace) -> int:
    from netstack.attach import attach

    r = attach(args.stack, args.qube, args.netvm, args.kernel)
    if args.json:
        print(json.dumps(r, indent=2))
    elif not r["changed"]:
        print(f"{args.qube}: already behind {r['netvm'] or 'nothing'}")
    else:
        print(f"{args.qube}: netvm {r['from'] or 'none'} -> {r['netvm'] or 'none'} (applied in "
              f"{r['applied_s'] * 1000:.0f} ms; {count(r['cut'], 'connection')} cut)")
    return 0


def cmd_template(args: argparse.Namespace) -> int:
    from netstack import template_cmd

    if args.action == "list":
        out: Any = template_cmd.listing()
        if args.name is not None:  # one template (review2 finding 14: it was ignored)
            out = [t for t in out if t["name"] == args.name]
            if not out:
                raise UsageError(f"template list {args.name}: no such template (`netstack "
                                 "template list` shows them all)")
        if not args.json:
            if not out:
                print("no templates (make one: `netstack template create NAME`)")
            for t in out:
                print(f"{t['name']}: {t['suite']} {t['variant']}"
                      + (f" ({t['profile']})" if t.get("profile") else "")
                      + (f" +{','.join(t['include'])}" if t["include"] else "")
                      + (f", {len(t['wanted'])} package(s) for the next update"
                         if t.get("wanted") else "")
                      + f", made {t['created']}, updated {t['updated'] or 'never'} "
                      f"({t['path']})")
            return 0
    elif not args.name:
        raise UsageError(f"template {args.action}: give the template's NAME")
    elif args.action == "create":
        out = template_cmd.create(args.name, args.include, args.variant, args.suite,
                                  args.mirror, args.source, args.profile)
        if not args.json:
            print(f"template {args.name}: made in {out['seconds']} s ({out['path']})")
            if out["wanted"]:
                print(f"template {args.name}: {len(out['wanted'])} package(s) of the "
                      "profile are installed by the next `netstack template update "
                      f"{args.name}` (through the stack, not the host)")
    elif args.action == "remove":
        out = {"removed": template_cmd.remove(args.name)}
        if not args.json:
            print(f"template {args.name}: " + ("removed" if out["removed"] else "not there"))
    else:
        out = template_cmd.update(args.stack, args.name, args.via, args.install, args.kernel)
        if not args.json:
            print(f"template {args.name}: updated through {out['via']} ({out['why']}) in "
                  f"{out['seconds']} s")
    if args.json:
        print(json.dumps(out))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """The report goes to stdout (and the files asked for); the program's own output
    too, except with --json, where it goes to stderr so stdout parses."""
    from netstack import check

    cmd = list(args.cmd)
    running = args.stack if _explicit_stack() else None
    if running and args.config:
        raise UsageError("check: a CONFIG is for the lab stack check brings up; with --stack "
                         "it uses that running stack as it is")
    _writable("--junit", args.junit)  # before the lab comes up, not after the run
    _writable("--html", args.html)
    if args.pcaps:
        try:
            os.makedirs(args.pcaps, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--pcaps {args.pcaps}: cannot make that directory "
                             f"({e.strerror}); give a directory you can write") from None
    timeout = getattr(args, "timeout", None)
    if timeout is not None and not (0 < timeout < float("inf")):
        raise UsageError(f"--timeout {timeout}: give a number of seconds above 0")
    say = None if args.json else (lambda m: print(f"netstack check: {m}", file=sys.stderr))
    sys.stdout.flush()
    try:
        r = check.run(cmd, args.config, args.qube, args.expect, running, args.pcaps,
                      args.bypass, say, timeout=getattr(args, "timeout", None),
                      stdout=sys.stderr.fileno() if args.json else None,
                      kernel=args.kernel)
    except check.Interrupted as e:  # before the program ran: nothing to report
        print(f"netstack check: {e} before the program started; its lab stack is down",
              file=sys.stderr)
        return 128 + e.signum
    if args.junit:
        with open(args.junit, "w") as f:
            f.write(check.junit(r))
    if args.html:
        with open(args.html, "w") as f:
            f.write(check.html(r))
    if args.json:
        print(json.dumps(r.to_json(), indent=2))
    else:
        print(check.table(r))
    return r.verdict


def _writable(opt: str, path: str | None, make: bool = True) -> None:
    """A report file can be written where asked (its directory exists, it is no
    directory itself), or a one-line error naming the option. make: the directory is made
    when missing (a CI job's artifacts folder); not for a system's directory (a typo in
    node_exporter's textfile directory must not make a new tree)."""
    if path is None:
        return
    d = os.path.dirname(os.path.abspath(path))
    import contextlib

    if make:
        with contextlib.suppress(OSError):
            os.makedirs(d, exist_ok=True)
    if os.path.isdir(path) or not os.path.isdir(d) or not os.access(d, os.W_OK):
        raise UsageError(f"{opt} {path}: cannot write a file there (its directory cannot be "
                         "made or written, or the path is a directory)")


def _explicit_stack() -> bool:
    """--stack given on the command line (or NETSTACK_STACK): check uses that stack."""
    return "NETSTACK_STACK" in os.environ or any(
        a == "--stack" or a.startswith("--stack=") for a in sys.argv[1:])


def cmd_completion(args: argparse.Namespace) -> int:
    from netstack import completion

    if args.what != "man":
        if args.dir:
            raise UsageError(f"completion {args.what} takes no DIR")
        sys.stdout.write(completion.shell_hook(args.what))
        return 0
    if not args.dir:
        raise UsageError("completion man: give the directory the pages go to, e.g. "
                         "/usr/local/share/man/man1")
    import time
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("netstack")
    except PackageNotFoundError:
        ver = "0"
    pages = completion.man_pages(parser(), ver, time.strftime("%Y-%m-%d"))
    _writable("completion man", os.path.join(args.dir, "netstack.1"), make=False)
    from netstack.codec import atomic_write

    for name, text in pages.items():
        atomic_write(os.path.join(args.dir, name), text, 0o644)
    print(f"{len(pages)} pages in {args.dir} (man netstack, man netstack-COMMAND)")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    """The uplink watch: in the foreground, or the read form (--status), or --clear."""
    from netstack import watch

    if (args.clear or args.status) and (args.on_leak is not None or args.seconds is not None):
        raise UsageError(f"watch --{'clear' if args.clear else 'status'}: --on-leak and --for "
                         "belong to the watch in the foreground; leave them out")
    if args.clear:
        out = watch.clear(args.stack, args.kernel)
        if args.json:
            print(json.dumps(out, indent=2))
        else:
            print(f"{out['cleared']} alarm(s) cleared"
                  + ("; the uplink is up again" if out["uplink_up_again"] else ""))
        return 0
    if args.status:
        import time

        s = watch.show(args.stack, args.kernel)
        if args.json:
            print(json.dumps(s, indent=2))
            return 1 if s.get("count") else 0
        who = f"by the {s['by']} (pid {s['pid']}, on_leak={s['on_leak']})" \
            if s["running"] else "not running"
        print(f"stack {args.stack}: uplink watch {who}; {s['instructions']} filter "
              "instructions")
        for line in s["allowed_now"]["why"]:
            print(f"  allowed: {line}")
        for a in s.get("alarms", []):
            print(f"  ! {time.strftime('%H:%M:%S', time.localtime(a['packet_at']))} "
                  f"{a['headers']['summary']}" + ("  (uplink cut)" if a.get("cut_at") else ""))
        if s.get("count"):
            print(f"  {s['count']} alarm(s); pcap {s['pcap']}; `netstack watch --clear` "
                  "when understood")
        return 1 if s.get("count") else 0
    seen: list[Any] = []

    def report(a: Any) -> None:
        seen.append(a)
        if args.json:
            from netstack.codec import dump

            print(json.dumps({"alarm": dump(a)}), flush=True)
        else:
            print(f"LEAK {a.headers['summary']}"
                  + (" (uplink set down)" if a.cut_at else ""), flush=True)

    w = watch.foreground(args.stack, args.kernel, args.on_leak or "log", args.seconds, report)
    if args.json:
        print(json.dumps({"stack": args.stack, "alarms": w.wf.count, "cut": w.wf.cut,
                          "pcap": w.pcap_path, "reattached": w.wf.reattached}))
    else:
        print(f"{w.wf.count} alarm(s)" + (f"; pcap {w.pcap_path}" if w.wf.count else ""),
              file=sys.stderr)
    return 1 if w.wf.count else 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from netstack import metrics

    addr = metrics.listen_address(args.listen) if args.listen else None
    if args.all:
        from netstack.names import RUN_DIR

        try:
            stacks = sorted(d for d in os.listdir(RUN_DIR)
                            if os.path.isfile(os.path.join(RUN_DIR, d, "state.json")))
        except FileNotFoundError:
            stacks = []
    else:
        stacks = [args.stack]
    if addr is None:
        text = metrics.render(stacks, args.kernel)
        if args.textfile:
            from netstack.codec import atomic_write

            _writable("--textfile", args.textfile, make=False)
            atomic_write(args.textfile, text, 0o644)
        else:
            sys.stdout.write(text)
        return 0
    import signal
    import threading

    from prometheus_client import start_http_server

    try:
        server, _thread = start_http_server(addr[1], addr[0],
                                            registry=metrics.registry(stacks, args.kernel))
    except OSError as e:
        raise UsageError(f"metrics --listen: cannot listen on {args.listen}: "
                         f"{e.strerror}") from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"serving metrics of {', '.join(stacks) or 'no stack'} on "
          f"http://{args.listen}/metrics", file=sys.stderr, flush=True)
    stop.wait()
    server.shutdown()
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from netstack import audit

    if args.ruleset:
        return _audit_file(args)
    for flag in ("expect", "matrix", "port", "dot", "svg"):
        if getattr(args, flag):
            raise UsageError(f"--{flag} needs --ruleset FILE (it speaks of one ruleset)")
    if args.packet:
        raise UsageError("--packet needs --ruleset FILE (the what-if of one ruleset)")
    r = audit.run(args.stack, args.kernel, args.drift, args.replay)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0 if r["ok"] else 1
    wq = max((len(x["qube"]) for x in r["results"]), default=0)
    for x in r["results"]:
        _print_result(x, f"{x['qube']:<{wq}} ")
    for d in r.get("drift", []):
        if d["text"]:
            print(f"DRIFT    {d['qube']}:")
            for line in d["text"]:
                print(f"           {line[:150]}")
            for s in d["semantic"]:
                print(f"           verdict changed at {s['hook']}: generated {s['generated']}, "
                      f"live {s['live']}, e.g. {s['example']}")
    for f in r.get("firewall_drift", []):
        print(f"{'DRIFT' if f['drift'] else 'RULES':<8} {f['qube']:<{wq}} {f['why']}")
    n_bad = sum(1 for x in r["results"] if x["status"] != "PASS")
    print(f"{'PASS' if r['ok'] else 'FAIL'}: "
          f"{count(len(r['results']), 'property', 'properties')}, {n_bad} not proven, "
          f"audited in {r['seconds']} s")
    return 0 if r["ok"] else 1


def _print_result(x: dict, where: str = "") -> None:
    print(f"{x['status']:<8} {where}{x['property']:<40} {x['reason']}")
    if x["status"] != "PASS":
        print(f"         counterexample: {x['counterexample']}")
        for t in x.get("trace", []):
            print(f"           {t}")
        rp = x.get("replay")
        if rp:
            print("         replay in the kernel: " + (
                f"{rp['kernel_verdict']} ({'confirmed' if rp['confirmed'] else 'DIFFERS'})"
                if rp.get("replayable") else f"not replayed ({rp['why']})"))


def _audit_file(args: argparse.Namespace) -> int:
    """--ruleset FILE: generic properties of one namespace's ruleset (no chain context),
    or with --packet the fate of one packet, hook by hook."""
    from netstack.audit import onefile, replay_failures, rulesetfile

    if args.expect and args.packet:
        raise UsageError("--expect and --packet: one at a time (--packet is the what-if of "
                         "one packet, --expect the statements of a file)")
    for flag in ("port", "dot", "svg"):
        if getattr(args, flag) and not args.matrix:
            raise UsageError(f"--{flag} goes with --matrix")
    if args.matrix and (args.packet or args.expect):
        raise UsageError("--matrix answers on its own: drop --packet/--expect, or run twice")
    if args.replay and args.matrix:
        raise UsageError("--replay goes with the audit, --expect or --packet, not --matrix")
    ex = None
    if args.expect:  # the statements first: a bad file is refused before any work
        from netstack.audit import expect

        ex = expect.load(args.expect)
    port = None
    if args.matrix and args.port:
        from netstack.audit import matrix

        port = matrix.parse_port(args.port)
    if args.replay and os.geteuid() != 0:
        raise UsageError("--replay needs root: it loads the ruleset in scratch namespaces "
                         "and sends the packets there (run it with sudo)")
    doc = rulesetfile.read(args.ruleset, args.kernel)
    if args.packet:
        return _what_if(args, doc)
    if ex is not None:
        return _expect(args, doc, ex)
    if args.matrix:
        return _matrix(args, doc, port)
    a = onefile.audit(doc, args.ruleset)
    out = a.to_json()
    if args.replay:  # each counterexample into the kernel, as the live audit's --replay
        replay_failures(out["results"], lambda _: doc, args.kernel)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0 if a.ok else 1
    for x in out["results"]:
        _print_result(x)
    for u in a.unmodelled:
        where = ", ".join(u["where"][:3]) + (f" (+{len(u['where']) - 3})"
                                             if len(u["where"]) > 3 else "")
        print(f"{'UNPROVEN':<8} {u['construct']}: not modelled, in {where}; a property it "
              "can change is UNPROVEN, never PASS")
    n_bad = sum(1 for x in a.results if x.status != "PASS")
    print(f"{'PASS' if a.ok else 'FAIL'}: {count(len(a.results), 'property', 'properties')} "
          f"of {a.name}, {n_bad} not proven, {count(len(a.unmodelled), 'construct')} not "
          "modelled")
    return 0 if a.ok else 1


def _expect(args: argparse.Namespace, doc: dict, ex: Any) -> int:
    """--expect FILE: each statement proven or refuted (exit 0 only when all are proven)."""
    from netstack.audit import expect, replay_one

    verdicts, notes = expect.run(doc, os.path.basename(args.ruleset), ex)
    if args.replay:  # counterexamples and witnesses, as the audit's --replay
        for v in verdicts:
            if v.packet and v.hook and v.verdict:
                v.replay = replay_one(doc, v.hook, v.verdict, v.packet, args.kernel)
    code = expect.exit_code(verdicts)
    if args.json:
        print(json.dumps({"ruleset": args.ruleset, "expect": args.expect, "ok": code == 0,
                          "assumptions": notes,
                          "statements": [v.to_json() for v in verdicts]}, indent=2))
        return code
    print(f"{args.expect} on {args.ruleset}: " + "; ".join(notes))
    label = {id(v): v.statement.name or v.statement.describe() for v in verdicts}
    w = min(48, max(len(x) for x in label.values()))
    for v in verdicts:
        print(f"{v.status:<9} {label[id(v)]:<{w}}  {v.reason}")
        if v.packet:
            print(f"          {v.role}: {v.packet}")
            for t in v.trace:
                print(f"            {t}")
        rp = v.replay
        if rp:
            print("          replay in the kernel: " + (
                f"{rp['kernel_verdict']} ({'confirmed' if rp['confirmed'] else 'DIFFERS'})"
                if rp.get("replayable") else f"not replayed ({rp['why']})"))
    bad = {s: sum(1 for v in verdicts if v.status == s) for s in ("REFUTED", "UNPROVEN")}
    print(f"{'PROVEN' if code == 0 else 'NOT PROVEN'}: "
          f"{count(len(verdicts), 'statement')}, {bad['REFUTED']} refuted, "
          f"{bad['UNPROVEN']} not proven")
    return code


def _matrix(args: argparse.Namespace, doc: dict, port: Any) -> int:
    """--matrix [--port P]: the ruleset's address classes and which reaches which."""
    from netstack.audit import matrix

    ms = matrix.matrices(doc, os.path.basename(args.ruleset), port)
    left = [] if port else [str(x) for x in matrix.named_services(
        doc, os.path.basename(args.ruleset))[matrix.MAX_SERVICES:]]
    svg = None
    if args.svg:
        svg = _dot_svg(matrix.dot(ms), args.svg)
    if args.json:
        print(json.dumps({"ruleset": args.ruleset, "matrices": [m.to_json() for m in ms],
                          "not_drawn": left, "dot": matrix.dot(ms), "svg": svg}, indent=2))
        return 0
    print(matrix.table(ms) if ms else "the ruleset names no service (no destination port "
          "or ICMP in a rule): ask for one with --port, e.g. --port tcp/22")
    if left:
        print(f"{count(len(left), 'more service')} not drawn ({', '.join(left[:8])}"
              f"{', ...' if len(left) > 8 else ''}): ask for one with --port")
    if args.dot:
        with open(args.dot, "w", encoding="utf-8") as f:
            f.write(matrix.dot(ms))
        print(f"Graphviz DOT written to {args.dot}")
    if svg:
        print(f"SVG written to {svg}")
    elif args.svg:
        print(f"no SVG: Graphviz `dot` is not installed here (the DOT text: --dot FILE, then "
              f"`dot -Tsvg FILE > {args.svg}` where it is)")
    return 0


def _dot_svg(text: str, path: str) -> str | None:
    """SVG by Graphviz when `dot` is installed (never required): the path, or None."""
    import shutil
    import subprocess

    exe = shutil.which("dot")
    if exe is None:
        return None
    p = subprocess.run([exe, "-Tsvg"], input=text, capture_output=True, text=True,
                       timeout=30, check=False)
    if p.returncode != 0:
        raise UsageError(f"--svg: Graphviz dot failed ({p.stderr.strip()[:200]})")
    with open(path, "w", encoding="utf-8") as f:
        f.write(p.stdout)
    return path


def _what_if(args: argparse.Namespace, doc: dict) -> int:
    from netstack.audit import whatif

    p, path = whatif.parse(args.packet)
    w = whatif.judge(doc, p, path)
    if args.replay:
        whatif.replay(doc, w, p, args.kernel)
    if args.json:
        print(json.dumps(w.to_json(), indent=2))
        return 1 if w.confirmed is False else 0
    d = w.packet
    ports = f":{d['sport']} -> " if "sport" in d else " -> "
    print(f"what-if ({path} path): {d['family']} {d['l4proto']} {d['saddr']}{ports}"
          f"{d['daddr']}" + (f":{d['dport']}" if "dport" in d else "")
          + (f" in {d['iifname']}" if "iifname" in d else "")
          + (f" out {d['oifname']}" if "oifname" in d else "")
          + f", ct {d['ct_state']}" + (f", uid {d['skuid']}" if "skuid" in d else "")
          + (f", mark {d['mark']:#x}" if d.get("mark") else ""))
    for h in w.hooks:
        print(f"  {h.hook:<12} {h.verdict.upper():<8}"
              + (" (no base chain: the kernel lets it through)" if h.hook != "route"
                 and not h.trace and h.verdict == "accept" else ""))
        for t in h.trace:
            print(f"      {t}")
        for u in h.unknown:
            print(f"      not modelled: {u}")
    print(f"verdict: {w.verdict.upper()}" + (" (no route)" if w.verdict == "lost" else ""))
    if w.kernel is not None:
        k = ", ".join(f"{hk} {v}" for hk, v in w.kernel)
        print(f"replay in the kernel: {k} ("
              + {True: "confirmed", False: "DIFFERS from the evaluator",
                 None: "the evaluator could not decide"}[w.confirmed] + ")")
    return 1 if w.confirmed is False else 0


def cmd_exec(args: argparse.Namespace) -> int:
    from netstack import stack

    return stack.run_in(args.kernel, args.stack, args.qube, list(args.cmd), user=args.user,
                        root_inside=args.root, name=f"exec in {args.qube}").code


def cmd_firewall(args: argparse.Namespace) -> int:
    import time

    from netstack import firewall_live

    if args.action == "list":
        # a temporary rule of a `leaktest --rules` killed midway, expired: gone first
        gone = firewall_live.drop_leaktest_rules(args.stack, kernel=args.kernel,
                                                 qubes=[args.qube], now=time.time())
        if gone and not args.json:
            print(f"{args.qube}: removed {count(gone[args.qube], 'expired rule')} an "
                  "interrupted `leaktest --rules` left", file=sys.stderr)
        out = firewall_live.listing(args.stack, args.qube)
        if args.json:
            print(json.dumps(out))
            return 0
        where = (f"(from {out['source']}, enforced in {out['netvm']})" if out["netvm"] else
                 f"(from {out['source']}; cut off: enforced once it is attached to a netvm)")
        if out["rules"] is None:
            print(f"{args.qube}: no rules: everything its netvm forwards {where}")
            return 0
        print(f"{args.qube}: first match wins, nothing matched is dropped {where}")
        for r in out["rules"]:
            print(f"  {r['number']:>3}  {r['rule']}"
                  + ("  (expired: matches nothing)" if r.get("expired") else "")
                  + (f"  (never matches: rule {r['shadowed_by']} comes first)"
                     if r.get("shadowed_by") else ""))
        return 0
    number = None
    words = list(args.words)
    if args.action == "del":
        if len(words) != 1 or not (words[0].isascii() and words[0].isdigit()):
            raise UsageError("firewall del: give the rule's number (see `firewall QUBE list`)")
        number = int(words[0])
    elif args.action == "add":
        number = args.before
    elif words:
        raise UsageError(f"firewall {args.action} takes no rule")
    if args.action == "reset" and args.kernel.real and \
            firewall_live.reset_down(args.stack, args.qube):
        if args.json:
            print(json.dumps({"ok": True, "qube": args.qube, "rules": None, "applied_s": 0}))
        else:
            print(f"{args.qube}: back to the config's list (the stack is down: the next `up` "
                  "uses it)")
        return 0
    n, took = firewall_live.change(args.stack, args.qube, args.action, words, number,
                                   kernel=args.kernel)
    msg = {"add": "added", "del": "deleted", "reset": "back to the config's list"}
    if args.json:
        print(json.dumps({"ok": True, "qube": args.qube, "rules": n,
                          "applied_s": round(took, 4)}))
    else:
        print(f"{args.qube}: {msg[args.action]}; {count(n, 'rule')} in force "
              f"(applied in {took * 1000:.0f} ms)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from netstack import disposable

    def started(q: Any) -> None:
        print(colour(q.label, f"{q.name}") + f": disposable qube {q.ipv4} behind {q.netvm}",
              file=sys.stderr)

    return disposable.run(args.stack, args.netvm, args.label, args.gui, args.user,
                          list(args.cmd), None if args.quiet else started, args.like,
                          kernel=args.kernel)


def cmd_copy(args: argparse.Namespace) -> int:
    from netstack import calls

    move = args.command == "move"
    where = calls.copy(args.kernel, args.stack, args.source, args.dest, move, args.user)
    print(f"{'moved' if move else 'copied'} {args.source} to {args.dest}:{where}")
    return 0


def cmd_calls(args: argparse.Namespace) -> int:
    import time

    from netstack import calls

    out = calls.listing(args.stack, args.last)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"policy: {out['policy']}")
    if out.get("policy_problem"):
        print(f"  ! {out['policy_problem']}")
    clip = out["clipboard"]
    print("clipboard: " + (f"{count(clip['bytes'], 'byte')} from {clip['from']}" if clip
                           else "empty"))
    if out["pending"]:
        print("waiting for an answer (`netstack call-answer ID allow|deny`):")
    for p in out["pending"]:
        left = max(0, int(p["deadline"] - time.time()))
        arg = f"+{p['argument']}" if p["argument"] else ""
        print(f"  {p['id']}  {p['source']} -> {shown(p['target'])}  {shown(p['service'])}"
              f"{shown(arg)}  ({p['rule']}; denied in {left} s)")
    for c in out["calls"]:
        arg = f"+{c['argument']}" if c["argument"] else ""
        when = time.strftime("%H:%M:%S", time.localtime(c["time"]))
        print(f"{when} {c['id']} {c['source']} -> {shown(c['target'])} "
              f"{shown(c['service'])}{shown(arg)}: {c['verdict']} ({c['rule'] or '-'}) in "
              f"{c['bytes_in']} out {c['bytes_out']} exit {c['exit']}"
              + (f"  {shown(c['reason'])}" if c["verdict"] not in ("allow", "ask->allow")
                 else "") + ("  [notify: to the host's journal]" if c.get("notify") else ""))
    return 0


def cmd_open_in_disposable(args: argparse.Namespace) -> int:
    from netstack import calls

    def prompt(question: str) -> bool:
        print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
        return sys.stdin.readline().strip().lower() in ("y", "yes")

    return calls.open_in_disposable(args.kernel, args.stack, args.source, list(args.cmd),
                                    prompt if sys.stdin.isatty() else None, args.user)


def shown(x: Any) -> str:
    """What a qube sent (a target, a service name), never a terminal's escape: only
    printable ASCII as it is, the rest as Python escapes."""
    t = str(x)
    return t if t.isascii() and t.isprintable() else ascii(t)[1:-1]


def cmd_call_answer(args: argparse.Namespace) -> int:
    from netstack import calls
    from netstack.state import require

    if args.prompt:
        if args.id or args.answer:
            raise UsageError("call-answer --prompt takes no ID or answer (it asks)")
        return _prompt_calls(require(args.stack).dir)
    if not (args.id and args.answer):
        raise UsageError("call-answer: give ID and allow|deny (see `netstack calls`), or "
                         "--prompt")
    p = calls.answer(require(args.stack).dir, args.id, args.answer)
    arg = f"+{p.argument}" if p.argument else ""
    print(f"{args.answer}: {p.source} -> {p.target} {p.service}{arg}")
    return 0


def _prompt_calls(stack_dir: str) -> int:
    """`call-answer --prompt`: each call that starts waiting is asked about at this
    terminal, once, in the order asked; the answer goes to it as `call-answer` would. As
    Qubes' dialog: only what is typed after a call is shown counts (anything typed before
    is thrown away), a terminal is required (a pipe would answer calls nobody saw), and
    dismissing a shown call (EOF, Ctrl-C, SIGTERM) denies it. A call withdrawn or timed
    out before the answer is said to be so."""
    import contextlib
    import select
    import termios
    import time

    from netstack import calls

    if not os.isatty(0):
        raise UsageError("call-answer --prompt needs a terminal on stdin (a pipe or file "
                         "would answer calls nobody saw; use `call-answer ID allow|deny`)")

    def answer_line(shown_id: str) -> str | None:
        """One line typed after the prompt (None: EOF); the call's own deadline bounds
        the wait."""
        buf = b""
        while b"\n" not in buf:
            left = next((p.deadline for p in calls.pending(stack_dir) if p.id == shown_id),
                        0.0) - time.time()
            if left <= 0:
                return ""  # timed out or withdrawn meanwhile: said by answer()
            if select.select([0], [], [], min(left, 0.5))[0]:
                chunk = os.read(0, 1024)
                if not chunk:
                    return None
                buf = (buf + chunk)[-4096:]
        return buf.split(b"\n", 1)[0].decode("utf-8", "replace")

    asked: set[str] = set()
    showing: str | None = None
    print("netstack: asking here about calls that wait (Ctrl-C ends)", file=sys.stderr)
    try:
        while True:
            for p in calls.pending(stack_dir):
                if p.id in asked:
                    continue
                asked.add(p.id)
                with contextlib.suppress(termios.error):
                    termios.tcflush(0, termios.TCIFLUSH)  # typed before: not an answer
                arg = f"+{p.argument}" if p.argument else ""
                left = max(0, int(p.deadline - time.time()))
                showing = p.id
                print(f"call {p.id}: {p.source} -> {shown(p.target)} {shown(p.service)}"
                      f"{shown(arg)} ({p.rule}; denied in {left} s). Allow? [y/N] ",
                      end="", flush=True)
                said = answer_line(p.id)
                what = "allow" if said and said.strip().lower() in ("y", "yes") else "deny"
                try:
                    calls.answer(stack_dir, p.id, what)
                    print(f"{what}: {p.source} -> {shown(p.target)} {shown(p.service)}",
                          flush=True)
                except UsageError:
                    print(f"call {p.id}: no longer waiting (withdrawn or timed out)",
                          flush=True)
                showing = None
                if said is None:
                    return 0  # EOF: the call shown was denied, nobody is left to answer
            if select.select([0], [], [], 0.2)[0] and not os.read(0, 4096):
                return 0  # EOF with nothing shown (a line typed then is thrown away)
    except KeyboardInterrupt:
        if showing is not None:  # dismissed: denied, as closing Qubes' dialog
            with contextlib.suppress(UsageError):
                calls.answer(stack_dir, showing, "deny")
                print(f"\ndeny: call {showing} (dismissed)", flush=True)
        raise


def cmd_clipboard(args: argparse.Namespace) -> int:
    from netstack import calls

    if args.action == "copy":
        n = calls.clipboard_copy(args.kernel, args.stack, args.qube, args.user)
        print(f"clipboard: {count(n, 'byte')} from {args.qube} (pasted once, then empty)")
        return 0

    def prompt(question: str) -> bool:
        print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
        return sys.stdin.readline().strip().lower() in ("y", "yes")

    origin, n = calls.clipboard_paste(args.kernel, args.stack, args.qube,
                                      prompt if sys.stdin.isatty() else None)
    print(f"clipboard: {count(n, 'byte')} from {origin} pasted into {args.qube}'s "
          "~/.clipboard; the host's buffer is empty")
    return 0


class Parser(argparse.ArgumentParser):
    """Usage errors as one line of ours (exit 2), not argparse's usage block."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def command_opts(p: argparse.ArgumentParser) -> None:
    """What `exec` and `run` share: who the command runs as, and the command."""
    p.add_argument("--user", "-u", help="run as this user (default: the invoking sudo user, "
                   "else the account netstack-qube); never host root")
    p.add_argument("cmd", nargs="*", help="the command, after --")


def stack_name(s: str) -> str:
    from netstack.names import check_stack

    return check_stack(s)


ROOT_COMMANDS = {"down", "status", "tor", "leaktest", "audit", "exec", "copy", "run",
                 "firewall", "attach", "check", "metrics", "watch", "move", "calls", "call-answer",
                 "clipboard", "open-in-disposable"}


class _Unused:
    """What parser(only=NAME) hands back for every other subcommand: its arguments are
    not made (the first ~85 add_argument calls of a process cost ~15 ms: argparse builds a
    help formatter and looks gettext catalogues up for each; docs/field-notes.md, "Python
    start-up")."""

    def __getattr__(self, _name: str) -> Any:
        return lambda *_a, **_kw: self


class _OneCommand:
    """The subcommands of parser(only=NAME): NAME is made, the others are _Unused."""

    def __init__(self, sub: Any, only: str) -> None:
        self.sub, self.only, self.found = sub, only, False

    def add_parser(self, name: str, **kw: Any) -> Any:
        if name != self.only:
            return _Unused()
        self.found = True
        return self.sub.add_parser(name, **kw)


def command_word(argv: list[str]) -> str | None:
    """The subcommand named on a command line, if it comes after global options only
    (--stack); None for anything else (help, no command), which needs the whole parser."""
    it = iter(argv)
    for tok in it:
        if tok == "--stack":
            next(it, None)
        elif not tok.startswith("--stack="):
            return None if tok.startswith("-") else tok
    return None


def parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser; only=NAME: with NAME's subcommand alone (what parsing a
    line that names it needs), or all of them when NAME is not one."""
    ap = Parser(
        prog="netstack", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A Qubes-OS-style chain of network compartments (namespaces + nftables).")
    ap.add_argument("--stack", default=os.environ.get("NETSTACK_STACK", "main"),
                    type=stack_name, help="stack name, 1-8 chars [a-z0-9] (default: main)")
    sub: Any = ap.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                 parser_class=Parser)
    if only is not None:
        sub = _OneCommand(sub, only)

    def uplink_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", nargs="?",
                       help="TOML qube table: a path, or a NAME for /etc/netstack/NAME.toml "
                       "or a shipped configs/NAME.toml (default: configs/tor-over-vpn.toml)")
        p.add_argument("--lab", action="store_true", help="uplink into the built-in lab internet")
        p.add_argument("--uplink", metavar="DEV", help="move host interface DEV into sys-net")
        p.add_argument("--isp", action="append", metavar="SCENARIO",
                       help="with --lab: a hostile ISP (repeat or comma-separate): "
                       "udp-blocked, dns-hijack, captive-portal, tls-intercept, flapping "
                       "(docs/isp.md)")
        p.add_argument("--uplink-mode", choices=["move", "nat"], default="move",
                       help="move: DEV goes into sys-net, the host keeps no network (the "
                       "Qubes way); nat: sys-net gets a veth NATed to DEV by the host")

    p = sub.add_parser("up", help="bring a stack up", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    uplink_opts(p)
    p.add_argument("--sink", action="store_true",
                   help="with --lab: the offline internet, every name answered by a lab sink "
                   "host that takes TCP and UDP on any port (HTTP, TLS with a lab CA)")
    p.add_argument("--no-wait", action="store_true",
                   help="do not wait for the tunnels to connect and Tor to bootstrap")
    p.add_argument("--vpn-timeout", type=float, default=None, metavar="S",
                   help="deadline for each VPN's first connection (default 30 s, times "
                   "NETSTACK_SLOW_FACTOR)")
    p.add_argument("--tor-timeout", type=float, default=None, metavar="S",
                   help="deadline for Tor bootstrap (default 120 s, times "
                   "NETSTACK_SLOW_FACTOR)")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser(
        "service", help="start the chain at boot: a systemd unit (install, remove, show, list)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  sudo netstack service install configs/vpn.toml --uplink wlan0   # move mode\n"
        "  sudo netstack service install configs/vpn.toml --uplink eth0 --uplink-mode nat\n"
        "  netstack service show configs/vpn.toml --uplink wlan0           # print the unit\n"
        "  sudo netstack service remove                                    # stop, disable\n"
        "The unit's main process is the stack's supervisor; it is ready once the chain is\n"
        "made and closed (tunnels and Tor are reported as they connect); move mode orders\n"
        "it before network-pre.target so no network manager touches the device first.\n"
        "See docs/host.md.")
    p.add_argument("action", choices=["install", "remove", "show", "list"])
    uplink_opts(p)
    p.add_argument("--unit-dir", metavar="DIR",
                   help="write the unit here instead of /etc/systemd/system (not enabled)")
    p.add_argument("--no-enable", action="store_true", help="write the unit only")
    p.add_argument("--json", action="store_true", help="with list")
    p.set_defaults(func=cmd_service)
    p = sub.add_parser("plan", help="print what `up` would make (pure, no root)")
    uplink_opts(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("down", help="remove everything of a stack (also after a crash)")
    p.add_argument("--purge", action="store_true",
                   help="also remove the app qubes' persistent homes and the lab's "
                        "private Tor network this stack kept (keys, consensus, under "
                        "/var/lib/netstack/lab-tor; a stack of the same lab shape shares it; "
                        "the next `up --lab` makes a new one)")
    p.add_argument("--wait", type=_seconds, default=60.0, metavar="SECONDS",
                   help="wait this long for another netstack changing the stack (a "
                        "disposable being made, a firewall change) to finish (default 60)")
    p.set_defaults(func=cmd_down)
    p = sub.add_parser("status", help="qubes, links, addresses, processes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("tor", help="the Tor gateway: status, circuits, newnym",
                       epilog="examples:\n  sudo netstack tor status\n"
                       "  sudo netstack tor circuits --json\n  sudo netstack tor newnym",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["status", "circuits", "newnym"])
    p.add_argument("--qube", help="the tor qube (default: the only one)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_tor)
    from netstack.leaktest import SCENARIOS

    p = sub.add_parser("leaktest", help="hostile-workstation packet battery with captures",
                       epilog="examples:\n  sudo netstack leaktest\n"
                       "  sudo netstack leaktest --scenario vpn-killed --json\n"
                       "  sudo netstack leaktest --rules --qube work\n"
                       "exit 0: every probe left and none leaked; 1: a leak; 6: ERROR, some\n"
                       "probe could not be sent or never showed on the workstation's link\n"
                       "(the run proves nothing)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qube", help="the workstation to probe from (default: one behind Tor)")
    p.add_argument("--scenario", default="steady", choices=SCENARIOS)
    p.add_argument("--pcaps", metavar="DIR", help="where pcaps go (default ./pcaps)")
    p.add_argument("--rules", action="store_true",
                   help="cases from each qube's own rule list (netstack firewall): accepted "
                   "targets reachable, dropped and unlisted ones not, an expire=+3 rule open "
                   "then closed")
    p.add_argument("--no-expiry", action="store_true",
                   help="with --rules: skip the expire=+3 case (it changes the list briefly)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_leaktest)
    p = sub.add_parser("audit", help="prove the chain's properties from the live rulesets",
                       epilog="examples:\n  sudo netstack audit\n  sudo netstack audit --drift "
                       "--json\n  netstack audit --ruleset saved.json\n"
                       "  sudo netstack audit --ruleset /etc/nftables.conf --packet "
                       "'iifname=lan0 ip saddr=192.0.2.7 tcp dport=22' --replay\n"
                       "  sudo netstack audit --ruleset /etc/nftables.conf --expect "
                       "expect.toml --replay\n"
                       "  sudo netstack audit --ruleset /etc/nftables.conf --matrix --port "
                       "tcp/22 --svg ssh.svg\n"
                       "exit 0 only when every property is proven",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--drift", action="store_true",
                   help="also diff the live rulesets against what the config generates")
    p.add_argument("--ruleset", metavar="FILE",
                   help="audit one ruleset: `nft -j list ruleset` JSON, or an nft script "
                   "(read in a scratch namespace, needs root)")
    p.add_argument("--packet", metavar="SPEC",
                   help="with --ruleset: the fate of one packet per hook, e.g. 'iifname=lan0 "
                   "ip saddr=192.0.2.7 tcp dport=22' (input), add oifname= to forward it, "
                   "oifname= alone for locally generated (meta skuid=)")
    p.add_argument("--expect", metavar="EXPECT.toml",
                   help="with --ruleset: prove or refute the statements of a file "
                   "([interfaces] roles, [[allow]], [[deny]], [[reach]]; README: Auditing your own "
                   "firewall); "
                   "exit 0 all proven, 1 one refuted or not proven, 2 bad input")
    p.add_argument("--matrix", action="store_true",
                   help="with --ruleset: the address classes the ruleset treats alike and "
                   "which class reaches which, per service (a table; --dot/--svg a picture)")
    p.add_argument("--port", metavar="PROTO/PORT",
                   help="with --matrix: one service (tcp/22); default: each the ruleset names")
    p.add_argument("--dot", metavar="FILE", help="with --matrix: write Graphviz DOT here")
    p.add_argument("--svg", metavar="FILE",
                   help="with --matrix: write SVG here (needs Graphviz `dot` installed)")
    p.add_argument("--replay", action="store_true",
                   help="replay each counterexample in the kernel (scratch namespaces with "
                   "nftrace, root), of the live audit or of --ruleset FILE, or the --packet; "
                   "a counterexample the kernel cannot be given (a related or untracked "
                   "packet, one at egress or without a socket) is named, not replayed")
    p.set_defaults(func=cmd_audit)
    p = sub.add_parser("metrics", help="the chain's health in Prometheus' text format",
                       epilog="examples:\n  sudo netstack metrics\n"
                       "  sudo netstack metrics --all --listen 127.0.0.1:9853   # for Prometheus\n"
                       "  sudo netstack metrics --textfile /var/lib/prometheus/node-exporter/"
                       "netstack.prom\n"
                       "links' bytes and packets, tunnels, failovers, Tor, daemons' restarts,\n"
                       "per-qube firewall rule hits, the last audit (docs/metrics.md)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--all", action="store_true", help="every stack on this host, not --stack")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--listen", metavar="ADDR:PORT",
                   help="serve /metrics on the host's loopback until stopped")
    g.add_argument("--textfile", metavar="FILE",
                   help="write the metrics to FILE (atomically), for node_exporter's "
                   "textfile collector")
    p.set_defaults(func=cmd_metrics)
    p = sub.add_parser(
        "watch", help="watch sys-net's uplink for any packet the chain does not allow",
        epilog="examples:\n  sudo netstack watch                      # until Ctrl-C; each "
        "alarm printed\n  sudo netstack watch --on-leak cut --for 3600\n"
        "  sudo netstack watch --status --json      # the supervisor's watch, its alarms\n"
        "  sudo netstack watch --clear              # forget the alarms, uplink up again\n"
        "A kernel filter (classic BPF) passes only what the chain does not allow: VPN\n"
        "transport, Tor guards or bridges, DHCP, ARP/ND are dropped in the kernel.\n"
        "`[stack] watch = true` (and on_leak = \"cut\") runs it in the supervisor.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--status", action="store_true",
                   help="the read form: who watches, what is allowed, the alarms")
    g.add_argument("--clear", action="store_true",
                   help="forget the alarms (status is up again); set a cut uplink up")
    p.add_argument("--on-leak", choices=["log", "cut"],
                   help="cut: set the uplink down at the first alarm (default: log)")
    p.add_argument("--for", dest="seconds", type=_seconds, metavar="SECONDS",
                   help="stop after SECONDS (default: until Ctrl-C)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per alarm, then a summary (or the read form)")
    p.set_defaults(func=cmd_watch)
    p = sub.add_parser("completion", help="shell completion (bash, zsh) and manual pages",
                       epilog="examples:\n"
                       "  eval \"$(netstack completion bash)\"      # in ~/.bashrc\n"
                       "  netstack completion zsh > ~/.zfunc/_netstack\n"
                       "  sudo netstack completion man /usr/local/share/man/man1\n"
                       "qube names complete from the stacks running on this host",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["bash", "zsh", "man"])
    p.add_argument("dir", nargs="?", metavar="DIR", help="man: where the pages go")
    p.set_defaults(func=cmd_completion)
    for name, verb in (("copy", "copy"), ("move", "move")):
        p = sub.add_parser(
            name, help=f"{verb} a file from one app qube's home to another's (the call "
            "layer's qubes.Filecopy, as the policy decides)",
            epilog=f"example: sudo netstack {name} work:report.pdf personal\n"
            "The file lands in the destination's ~/Incoming/SOURCE/ (like qvm-copy);\n"
            "only a regular file inside the source's home leaves: the source's sandbox\n"
            "sends it with `netstack-call DEST qubes.Filecopy`, so the policy decides\n"
            "(docs/calls.md)." + ("\nmove deletes the source's file only after the "
                                  "destination confirmed it has all of it." if name == "move"
                                  else ""),
            formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("source", metavar="SOURCE:PATH")
        p.add_argument("dest", metavar="DEST")
        p.add_argument("--user", "-u", help="the account the source's sandbox runs as")
        p.set_defaults(func=cmd_copy)
    p = sub.add_parser(
        "open-in-disposable", help="open a qube's file with a command in a new disposable "
        "(Qubes' qvm-open-in-dvm)", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: sudo netstack open-in-disposable work:report.txt -- less\n"
        "The policy's qubes.OpenInVM from the qube to @dispvm decides; the disposable is\n"
        "gone when the command ends; a changed file goes back to the qube's\n"
        "~/Incoming/DISPOSABLE/ only if the policy allows the disposable's qubes.Filecopy.")
    p.add_argument("source", metavar="QUBE:PATH")
    p.add_argument("--user", "-u", help="the account the sandboxes run as")
    p.add_argument("cmd", nargs="*", help="the command, after --; the file is its last "
                   "argument")
    p.set_defaults(func=cmd_open_in_disposable)
    p = sub.add_parser(
        "calls", help="the call layer: calls waiting for an answer, the last calls, the "
        "clipboard", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: sudo netstack calls --json\nInside an app qube: netstack-call "
        "TARGET SERVICE[+ARG] (see docs/calls.md).")
    p.add_argument("--last", type=int, default=20, metavar="N", help="calls shown (default 20)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_calls)
    p = sub.add_parser(
        "call-answer", help="answer a call the policy says to `ask` about",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  sudo netstack call-answer 3fa9c01e allow\n"
        "  sudo netstack call-answer --prompt      # ask here about every waiting call\n"
        "`netstack calls` lists the waiting calls; one not answered in [stack] ask_timeout\n"
        "seconds (default 60) is denied.")
    p.add_argument("id", metavar="ID", nargs="?")
    p.add_argument("answer", choices=["allow", "deny"], nargs="?")
    p.add_argument("--prompt", action="store_true",
                   help="stay, and ask at this terminal about each call that waits (Qubes' "
                   "confirmation dialog): y allows, anything else denies; ends at EOF or "
                   "Ctrl-C")
    p.set_defaults(func=cmd_call_answer)
    p = sub.add_parser(
        "clipboard", help="the host's one clipboard between app qubes (Qubes' global "
        "clipboard)", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  sudo netstack clipboard copy work       # work's ~/.clipboard into "
        "the buffer\n  sudo netstack clipboard paste personal  # into personal's ~/.clipboard,"
        " once\nThe paste is the policy's qubes.ClipboardPaste with the buffer's qube as "
        "source;\nat most 256000 bytes; the host never interprets them.")
    p.add_argument("action", choices=["copy", "paste"])
    p.add_argument("qube")
    p.add_argument("--user", "-u", help="the account the qube's sandbox runs as (copy)")
    p.set_defaults(func=cmd_clipboard)
    p = sub.add_parser("check", help="leak-test any program: run it in a workstation of a "
                       "lab chain, capture every link, report every flow",
                       epilog="examples:\n  sudo netstack check -- curl -sS https://example.org/"
                       "\n  sudo netstack check configs/vpn.toml --expect vpn --junit "
                       "report.xml -- ./my-client\n  sudo netstack --stack main check "
                       "--qube anon-whonix -- torsocks-free-app\n"
                       "exit 0: clean; 1: a leak (something left another way than --expect)"
                       "\nor a flow whose outcome is unknown (the report says why); 2: the "
                       "program\ntried to get around the chain and was stopped (--bypass "
                       "warn: 0); 3: the\nprogram failed, ran past --timeout, or was ended "
                       "because check got\nSIGINT/SIGTERM/SIGHUP (the report is written and "
                       "the stack taken down\nall the same)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="TOML qube table for the lab stack check brings "
                   "up (default: configs/tor-over-vpn.toml); with --stack, the running one")
    p.add_argument("--qube", help="the workstation to run in (default: one behind Tor)")
    p.add_argument("--expect", choices=["tor", "vpn", "direct"],
                   help="the way everything must leave (default: the workstation's chain)")
    p.add_argument("--bypass", choices=["fail", "warn"], default="fail",
                   help="a stopped attempt to get around the chain: exit 2 (fail) or 0 (warn)")
    p.add_argument("--pcaps", metavar="DIR", help="where the captures go (default "
                   "./pcaps/TIME-STACK-check)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="end the program after "
                   "this long (for programs that never exit; the report says so, exit 3)")
    p.add_argument("--junit", metavar="FILE", help="JUnit XML: a testcase per flow, a "
                   "failure for each that made the exit code non-zero")
    p.add_argument("--html", metavar="FILE", help="one self-contained page for CI artifacts")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check, cmd=[])  # the command: everything after --
    p = sub.add_parser("attach", help="move a running qube to another netvm (Qubes' "
                       "qvm-prefs QUBE netvm)",
                       epilog="examples:\n  sudo netstack attach work sys-whonix\n"
                       "  sudo netstack attach work none      # cut it off\n"
                       "The new netvm's rules for the qube are in place before its link is "
                       "made;\nits old connections are cut. Holds until `down` (write "
                       "netvm = ... in the\nconfig to keep it).",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("qube")
    p.add_argument("netvm", help="a qube of the stack that provides network, or none")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_attach)
    p = sub.add_parser("firewall", help="a qube's firewall rules (Qubes' qvm-firewall)",
                       epilog="examples:\n  sudo netstack firewall work list\n"
                       "  sudo netstack firewall work add action=accept dsthost=192.0.2.7 "
                       "proto=tcp dstports=443\n"
                       "  sudo netstack firewall work add action=drop "
                       "dsthost=198.51.100.9 --before 1\n"
                       "  sudo netstack firewall work del 2\n"
                       "  sudo netstack firewall work reset     # back to the config's list\n"
                       "First match wins; what no rule matches is dropped; the rules live in\n"
                       "the qube's netvm. Changes apply at once and are kept across down/up\n"
                       "until `reset` (or `down --purge`).",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("qube")
    p.add_argument("action", choices=["list", "add", "del", "reset"])
    p.add_argument("words", nargs="*", metavar="RULE",
                   help="add: key=value words (action, dsthost, proto, dstports, icmptype, "
                   "specialtarget, expire, comment); del: the rule's number")
    p.add_argument("--before", type=int, metavar="N", help="add: insert before rule N")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_firewall)
    p = sub.add_parser("run", help="run a command in a new disposable qube",
                       epilog="examples:\n  sudo netstack run -- curl http://web.lab.test/\n"
                       "  sudo netstack run --netvm sys-firewall --label orange -- firefox\n"
                       "  sudo netstack run --like work -- evince report.pdf\n"
                       "A disposable (Qubes' DispVM) is an app qube made for one command: a new\n"
                       "link to its netvm, its own address, a sandbox with an empty home. When\n"
                       "the command ends (or on Ctrl-C) the qube, its link, rules and files are\n"
                       "gone; after a kill -9 the next `run` or `down` removes it.\n"
                       "The exit code is the command's, as `exec`'s.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--netvm", help="the qube it gets network from (default: as --like, or "
                   "the config's [stack] default_dispvm, else the most private path: a Tor "
                   "gateway, else a VPN, else the firewall; `status` shows it)")
    p.add_argument("--like", metavar="QUBE", help="make it like this app qube: its netvm "
                   "and label (Qubes' disposable template)")
    p.add_argument("--label", help="its colour (default: its template's, else red)")
    p.add_argument("--gui", action="store_true",
                   help="grant the invoking user's Wayland (or X11) display")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="do not print the qube's name and address")
    command_opts(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("template", help="Debian root file systems app qubes run on "
                       "(Qubes' templates)",
                       epilog="examples:\n  sudo netstack template create deb\n"
                       "  sudo netstack template create deb --include curl,ca-certificates\n"
                       "  sudo netstack template create anon --profile whonix-workstation\n"
                       "  sudo netstack template update deb          # through the stack's "
                       "Tor gateway\n  sudo netstack template update deb --via sys-proxyvm"
                       "\n  sudo netstack template remove deb\n"
                       "A qube with template = \"deb\" sees the template as its root, under "
                       "a throw-away\noverlay (its changes are gone when the command ends); "
                       "only its home persists.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["create", "update", "remove", "list"])
    p.add_argument("name", nargs="?", help="the template's name (1-31 characters a-z0-9-)")
    p.add_argument("--include", metavar="PKG,...", help="create: extra Debian packages")
    p.add_argument("--variant", default="minbase", help="create: mmdebstrap's variant "
                   "(default minbase; essential is smaller, without apt)")
    p.add_argument("--suite", default="bookworm", help="create: the Debian release")
    p.add_argument("--mirror", help="create: the Debian mirror (default deb.debian.org)")
    p.add_argument("--from", dest="source", metavar="DIR", help="create: copy this Debian "
                   "root file system instead of building one")
    p.add_argument("--profile", metavar="NAME",
                   help="create: what the template is for (whonix-workstation: Tor "
                   "Browser's needs, torsocks, UTC; with --from, the packages come with the "
                   "next update)")
    p.add_argument("--via", metavar="QUBE", help="update: the qube its packets leave through "
                   "(default: [stack] updatevm, else the most private path)")
    p.add_argument("--install", metavar="PKG,...", help="update: also install these")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_template)
    p = sub.add_parser("exec", help="run a command inside a qube",
                       epilog="examples:\n  sudo netstack exec work -- curl http://web.lab.test/"
                       "\n  sudo netstack exec anon-whonix --root -- id\n"
                       "An app qube's command runs in its sandbox (bubblewrap: own PID, user,\n"
                       "IPC, UTS namespaces, system read-only, fresh /tmp and /run, no host\n"
                       "socket, its persistent home /var/lib/netstack/STACK/QUBE/home) as an\n"
                       "unprivileged account. SIGTERM, SIGHUP and SIGINT are handed on to\n"
                       "the command. The exit code is the command's: 127 program not found,\n"
                       "126 not executable, 128+N killed by signal N (143 SIGTERM).",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("qube")
    p.add_argument("--root", action="store_true",
                   help="root inside an app qube's sandbox (its own user namespace only)")
    command_opts(p)
    p.set_defaults(func=cmd_exec)
    if isinstance(sub, _OneCommand) and not sub.found:
        return parser()  # not a command: argparse names the valid ones
    return ap


# Commands that end with nothing left to finish but stdout and stderr: run as a program
# (not called with an argv, as tests do), they skip the interpreter's teardown of their
# ~300 modules (~8 ms each; docs/field-notes.md "Python start-up"). No thread of theirs
# outlives them and every file they write is closed (`with`) before they return.
QUICK_EXIT = ("up", "down", "status")


def _exit_now(code: int) -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # as main's: the reader went away
        code = 141
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    tail: list[str] = []
    if "--" in argv:  # everything after -- is the command of `exec`, untouched
        i = argv.index("--")
        argv, tail = argv[:i], argv[i + 1:]
    args = argparse.Namespace(json="--json" in argv)
    if program and "_ARGCOMPLETE" in os.environ:  # the shell asks for completions
        from netstack.completion import complete

        complete(parser())
    from netstack.kernel import RealKernel

    kernel = RealKernel()  # the one kernel of this command: passed down, never made below
    if program:  # SIGTERM (systemd, timeout) undoes a half-made change as Ctrl-C does
        import signal

        signal.signal(signal.SIGTERM, _terminated)
    try:
        args = parser(command_word(argv)).parse_args(argv)
        args.kernel = kernel
        if tail:
            if args.command not in ("exec", "run", "check", "open-in-disposable"):
                raise UsageError("'--' is only used with exec, run, check and "
                                 "open-in-disposable (see `netstack --help`)")
            args.cmd = list(args.cmd) + tail
        if args.command in ROOT_COMMANDS and os.geteuid() != 0 and \
                not getattr(args, "ruleset", None):
            raise UsageError(f"netstack {args.command} needs root (namespaces and nftables): "
                             "run it with sudo")
        code = args.func(args)
        if program and args.command in QUICK_EXIT:
            _exit_now(code)
        return code
    except NetstackError as e:
        from netstack.errors import NotUp

        return _fail(args, str(e), e.exit_code, 5 if isinstance(e, NotUp) else 3)
    except Terminated:
        return _fail(args, "terminated (SIGTERM): what this command had begun was undone",
                     143)
    except KeyboardInterrupt:
        return _fail(args, "interrupted", 130)
    except BrokenPipeError:  # `netstack status | head`: the reader is gone, not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    finally:
        kernel.close()


def _hold_signals() -> None:
    """Once `down` holds the stack, it finishes what it began: a half-removed stack helps
    nobody (SIGINT or SIGTERM 0.6 s into `down` left 16 namespaces); SIGKILL still ends
    it, and the next `down` goes on. Waiting for the lock, Ctrl-C still gives up."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so every `except KeyboardInterrupt` and
    `finally` of a change runs as for Ctrl-C (it exited silently and left a half-made
    stack before)."""


def _terminated(_sig: int, _frame: Any) -> None:
    raise Terminated()


def _fail(args: argparse.Namespace, message: str, code: int, priority: int = 3) -> int:
    """The one line a failed command says (and its JSON); under systemd also a journal
    record with fields, at `priority` (3, err; `down` finding nothing: 5, notice)."""
    from netstack import journal

    # the plain line too unless stderr is the journal (it would say it twice there)
    sent = journal.send(f"netstack: {message}", priority, event="error",
                        stack=getattr(args, "stack", None),
                        command=getattr(args, "command", None), exit_code=code)
    if not (sent and journal.stderr_is_journal()):
        print(f"netstack: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "error": message, "exit_code": code}))
    return code


if __name__ == "__main__":
    sys.exit(main())
