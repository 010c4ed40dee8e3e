"""Live changes as transactions: `firewall`, `attach`, `run` and its disposables change a
running stack all or nothing, and a crash at any point (kill -9, libnftables aborting the
process, a power cut) is repaired by the next command that takes the stack's lock.

One change, in order:
1. the intent is written (`txn.json` in the stack's directory: the plan in force and the
   plan wanted, with the firewall overlay and the netvm moves of each), phase "started";
2. the kernel is changed (reconcile.change: rules before links, one transaction per
   namespace);
3. the intent's phase becomes "applied": the kernel holds the new state;
4. the files follow: firewall.json, the moves in state.json, plan.json, the rule digests
   `status` compares with;
5. the intent is removed.

A failure in 2 rolls the kernel back to the plan in force and changes no file. A crash
leaves the intent behind; `repair` (run under the lock before any other change, and by
`down`) rolls forward when its phase says the kernel already holds the new state (only
the files are missing), else back, tolerating objects the kernel has or lacks already.
`status` names an interrupted change until then. Nothing here is ever refused as "config
changed": the files that define the plan in force are written only together."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from netstack.errors import ApplyError
from netstack.kernel import Kernel
from netstack.kinds.registry import RUNTIMES
from netstack.model import Plan

LOCK_WAIT = 60.0  # seconds a live change waits for others (20 `run`s started at once queue up)
INTENT = "txn.json"


@dataclass
class Intent:
    """A live change under way: what was in force, what is wanted, how far it got."""

    command: str
    old: Plan
    new: Plan
    old_overlay: dict[str, list[Any]] = field(default_factory=dict)
    new_overlay: dict[str, list[Any]] = field(default_factory=dict)
    old_netvms: dict[str, str | None] = field(default_factory=dict)
    new_netvms: dict[str, str | None] = field(default_factory=dict)
    phase: str = "started"  # started | applied
    pid: int = 0


def intent_path(st: Any) -> str:
    return os.path.join(st.dir, INTENT)


def pending(st: Any) -> Intent | None:
    """The intent a crashed change left behind, or None."""
    from netstack import codec

    try:
        return codec.read(intent_path(st), Intent)
    except FileNotFoundError:
        return None


def _write(st: Any, intent: Intent) -> None:
    from netstack import codec

    codec.write(intent_path(st), intent)


@contextlib.contextmanager
def live(stack: str, command: str, kernel: Kernel) -> Iterator[tuple[Any, Plan, Kernel]]:
    """The one way into a live change (`run`, `firewall`, `attach`): root for the host's
    kernel, the stack's lock (waiting, so several changes queue up), a crashed change
    repaired, then the state and the plan in force."""
    from netstack.state import StackLock, require, require_root

    if kernel.real:
        require_root(command)
    with StackLock(stack, wait=LOCK_WAIT):
        st = require(stack)
        repair(st, kernel)
        assert st.plan is not None
        yield st, st.plan, kernel


def commit(st: Any, cur: Plan, desired: Plan, k: Kernel, command: str,
           overlay: dict[str, list[Any]] | None = None,
           netvms: dict[str, str | None] | None = None) -> None:
    """Make `desired` the plan in force, all or nothing (see the module's docstring).
    overlay / netvms None: unchanged."""
    from netstack import reconcile
    from netstack.invariants import enforce
    from netstack.rules.qubefw import load_overlay

    # the config's [[invariant]]s hold for every plan a live change makes: refused here,
    # before the intent is written, so nothing changes (netstack/invariants.py)
    enforce(desired, command, "change the command, or the invariant in the config (then "
            "`netstack down` and `up`)")
    old_overlay = load_overlay(st.stack)
    intent = Intent(command, cur, desired, old_overlay,
                    old_overlay if overlay is None else overlay, dict(st.data.netvms),
                    dict(st.data.netvms) if netvms is None else dict(netvms),
                    pid=os.getpid())
    _write(st, intent)
    try:
        reconcile.change(cur, desired, st, k, RUNTIMES)
    except BaseException:
        _abort(st, intent, k)
        raise
    intent.phase = "applied"
    _write(st, intent)
    try:
        _finish(st, intent, k, forward=True)
    except Exception as e:  # noqa: BLE001 - the kernel holds it; the intent finishes it later
        raise ApplyError(f"the change is in force, but writing its files failed: "
                         f"{str(e) or type(e).__name__}; the next live change (or `down`) "
                         "finishes it, and `status` names it meanwhile") from None


def after_applied(what: str, step: Callable[[], Any], default: Any = None) -> Any:
    """A step after a change is in force (cutting its connections, asking its names): its
    failure does not undo the change, so it is one warning line on stderr naming what was
    left undone, never a traceback; `default` is the step's result then."""
    try:
        return step()
    except Exception as e:  # noqa: BLE001 - the change holds whatever this step does
        reason = str(e) or type(e).__name__
        print(f"netstack: warning: the change is in force, but {what} failed: {reason}",
              file=sys.stderr)
        return default


def _abort(st: Any, intent: Intent, k: Kernel) -> None:
    """The kernel refused (or the user interrupted): back to the plan in force. The first
    error is the one reported; a rollback that cannot finish leaves the intent for the next
    command (and `status` names it)."""
    try:
        _back(st, intent, k)
    except Exception:  # noqa: BLE001 - the intent stays: repair tries again
        return
    _finish(st, intent, k, forward=False)


def _back(st: Any, intent: Intent, k: Kernel) -> None:
    from netstack import reconcile

    reconcile.change(intent.new, intent.old, st, k, RUNTIMES, tolerant=True)


def _finish(st: Any, intent: Intent, k: Kernel, forward: bool) -> None:
    """Files follow the kernel: overlay, moves, plan, digests; then the intent goes."""
    from netstack import reconcile
    from netstack.rules.qubefw import save_overlay

    plan = intent.new if forward else intent.old
    save_overlay(st.stack, intent.new_overlay if forward else intent.old_overlay)
    st.data.netvms = dict(intent.new_netvms if forward else intent.old_netvms)
    st.set_plan(plan)
    reconcile.record_digests(plan, st, k)  # saves the state
    with contextlib.suppress(FileNotFoundError):
        os.unlink(intent_path(st))


def repair(st: Any, k: Kernel) -> str | None:
    """Finish what a crashed change left (under the stack's lock): forward when the kernel
    held the new state already, else back. Returns what was done, or None."""
    intent = pending(st)
    if intent is None:
        return None  # (the lock is ours: whoever wrote an intent is gone)
    if intent.phase == "applied":
        _finish(st, intent, k, forward=True)
        return f"finished the interrupted {intent.command}"
    try:
        _back(st, intent, k)
    except Exception as e:  # noqa: BLE001 - named in one line; the intent stays
        raise ApplyError(f"the interrupted {intent.command} could not be rolled back: {e}; "
                         "`netstack down` removes everything of the stack") from None
    _finish(st, intent, k, forward=False)
    return f"rolled back the interrupted {intent.command}"
