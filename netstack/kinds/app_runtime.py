"""`app` at run time: what the qube is given (its sandbox, its home, a display), shown by
`status`."""

from __future__ import annotations

from typing import Any

from netstack.kernel import Kernel, proc_alive
from netstack.kinds.runtime import KindRuntime, LiveFacts
from netstack.model import QubeInfo


def orphaned(q: QubeInfo) -> bool:
    """A disposable whose `run` process is gone: nothing will remove it but the next `run`
    or `down`."""
    pid = q.settings.get("runner")
    return not (isinstance(pid, int) and proc_alive(pid, q.settings.get("runner_start")))


class AppRuntime(KindRuntime):
    def status(self, q: QubeInfo, live: LiveFacts, k: Kernel) -> dict[str, Any]:
        """What the qube is given: its sandbox, its home, and a display if `gui = true`
        (the only grant there is); for a disposable, the `run` that owns it."""
        from netstack.sandbox import home_dir

        home = q.settings.get("home", "persistent")
        stack = q.netns.split("-", 2)[1]  # nst-STACK-QUBE
        grants, warnings = gui_status(q)
        out: dict[str, Any] = {"sandbox": {"kind": "bubblewrap", "home": home,
                                           "home_path": home_dir(stack, q.name)
                                           if home == "persistent" else None,
                                           "grants": grants, "warnings": warnings}}
        if q.settings.get("disposable"):
            out["disposable"] = {"runner": q.settings.get("runner"), "orphaned": orphaned(q)}
        return out

    def status_lines(self, entry: dict[str, Any]) -> list[str]:
        sb = entry.get("sandbox") or {}
        where = f" ({sb['home_path']})" if sb.get("home_path") else ""
        lines = [f"sandbox: {sb.get('kind')}, {sb.get('home')} home{where}, grants: "
                 + (", ".join(sb.get("grants") or []) or "none")]
        lines += [f"WARNING: {w}" for w in sb.get("warnings") or []]
        d = entry.get("disposable")
        if d:
            lines.append(f"disposable of `netstack run` pid {d['runner']}" if not d["orphaned"]
                         else f"disposable, its `netstack run` (pid {d['runner']}) is gone: "
                         "the next `run` or `down` removes it")
        return lines


def gui_status(q: Any) -> tuple[list[str], list[str]]:
    """What `gui = true` grants here and now (the invoking user's display), and warnings."""
    import os

    from netstack import sandbox
    from netstack.errors import UsageError

    if not q.settings.get("gui"):
        return [], []
    try:
        who = sandbox.account(None, os.environ.get("SUDO_USER"))
    except UsageError:
        return ["gui: no account to run as"], []
    g = sandbox.gui_grant(os.environ, who)
    if g is None:
        return [f"gui: none ({who.name} has no Wayland or X11 display here)"], []
    return [g.describe()], [g.warning] if g.warning else []
