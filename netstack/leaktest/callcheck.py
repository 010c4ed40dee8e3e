"""The call socket as a local channel (docs/calls.md): from the workstation's sandbox, a
file sent with `netstack-call TARGET qubes.Filecopy` to each other app qube (at most two)
whose policy verdict is not `allow` must never arrive. A call the policy says to `ask`
about is answered `deny` here, on the host, as a user would. The marker is a file the
target would keep in ~/Incoming/WORKSTATION/: its absence after the call is the proof
(targets with an ephemeral home cannot show it and are not tried).

FORCE (tests only, the anti-test): the call is also sent where the policy allows it, and
an `ask` is answered `allow`, so the row must see the marker arrive."""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from netstack.kernel import Kernel

FORCE = False
SERVICE = "qubes.Filecopy"
ANSWER_WAIT = 10.0  # seconds for an `ask` call to show up in the pending list
SEND = r'''
printf '%s\n%s\n' "$1" 5 | { cat; printf 'probe'; } | netstack-call "$2" qubes.Filecopy
'''


@dataclass(frozen=True)
class CallResult:
    target: str
    leak: str | None  # what arrived
    note: str  # the verdict the policy gave, or why the target was not tried
    error: str | None = None


def run(k: Kernel, stack: str, ws: str) -> list[CallResult]:
    from netstack import calls, executor, sandbox
    from netstack.state import require

    st = require(stack)
    plan = st.plan
    out: list[CallResult] = []
    targets = [q for q in plan.qubes if q.traits.sandboxed and q.name != ws][:2]
    for t in targets:
        v = calls.verdict(plan, ws, t.name, SERVICE, "")
        note = f"{v.action} ({v.rule or 'no line: default deny'})"
        if t.settings.get("home", "persistent") != "persistent":
            out.append(CallResult(t.name, None, f"{note}; not tried: its home is ephemeral"))
            continue
        if v.action == "allow" and not FORCE:
            out.append(CallResult(t.name, None, f"{note}; allowed, not tried"))
            continue
        marker = f"leaktest-call-{secrets.token_hex(4)}"
        box: dict[str, Any] = {}

        def send(target: str = t.name, name: str = marker, box: dict[str, Any] = box
                 ) -> None:
            try:
                box["o"] = executor.run(k, st, plan.qube(ws), ["sh", "-c", SEND, "send", name,
                                                               target],
                                        capture=True, forward=(), name=f"leaktest call {ws}")
            except Exception as e:  # noqa: BLE001 - reported as the row's error
                box["e"] = e

        th = threading.Thread(target=send, daemon=True)
        th.start()
        if v.action == "ask":
            _answer(st.dir, ws, t.name, "allow" if FORCE else "deny", th)
        th.join(120)
        arrived = os.path.join(sandbox.home_dir(stack, t.name), "Incoming", ws, marker)
        leak = None
        if os.path.exists(arrived):
            leak = f"{ws} -> {t.name} {SERVICE}: the file arrived ({note})"
            with contextlib.suppress(OSError):
                os.unlink(arrived)
        err = None
        if "e" in box:
            err = f"the call could not be made: {box['e']}"
        elif "o" not in box:
            err = "the call did not end"
        elif leak is None and box["o"].code != calls.REFUSED_EXIT:
            err = f"netstack-call exited {box['o'].code}, not 126 (refused)"
        out.append(CallResult(t.name, leak, note, err))
    return out


def _answer(stack_dir: str, ws: str, target: str, what: str, th: threading.Thread) -> None:
    """Answer the workstation's waiting call to `target` as the host's user would."""
    from netstack import calls

    end = time.monotonic() + ANSWER_WAIT
    while time.monotonic() < end and th.is_alive():
        for p in calls.pending(stack_dir):
            if (p.source, p.target, p.service) == (ws, target, SERVICE):
                with contextlib.suppress(Exception):
                    calls.answer(stack_dir, p.id, what)
                return
        time.sleep(0.05)
