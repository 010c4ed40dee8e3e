"""`tor` at run time: the gateway's DataDirectory, torrc and control-port filter spec before
the supervisor starts tor; tor's bootstrap and circuits and the onion services' addresses
in `status`; the wait for 100 % bootstrap."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from netstack.codec import encode
from netstack.errors import count
from netstack.kernel import Kernel
from netstack.kinds.runtime import KindRuntime, LiveFacts
from netstack.model import QubeInfo
from netstack.tor.filter import FilterSpec
from netstack.tor.gateway import CONTROL_PORT, SOCKS_PORT, TorInfo, onion_addresses, torrc

if TYPE_CHECKING:
    from netstack.reconcile import Runtime
    from netstack.state import State


def keep(keep_dir: str, inside: list[str], user: str) -> None:
    """The gateway's kept directory beside the stack's homes (HOME_ROOT/STACK/QUBE/tor, made
    like sandbox.make_home, outside the intent log: `down` keeps it, `down --purge` removes
    it with the homes): its parent root's and passable (0711), itself and `inside` the tor
    user's, 0700, as tor insists."""
    import pwd

    parent = os.path.dirname(keep_dir)
    os.makedirs(os.path.dirname(parent), mode=0o755, exist_ok=True)
    if not os.path.isdir(parent):
        os.mkdir(parent, 0o711)
    os.chmod(parent, 0o711)
    pw = pwd.getpwnam(user)
    for d in (keep_dir, *inside):
        if not os.path.isdir(d):
            os.mkdir(d, 0o700)
        os.chmod(d, 0o700)
        os.chown(d, pw.pw_uid, pw.pw_gid)


class TorRuntime(KindRuntime):
    def prepare(self, q: QubeInfo, rt: Runtime) -> None:
        """The DataDirectory belongs to the tor user (tor drops root after binding its
        ports); the torrc goes last: the supervisor starts tor when it appears."""
        info = q.info
        assert isinstance(info, TorInfo)
        kept = bool(info.keep_dir) and info.datadir.startswith(info.keep_dir + os.sep)
        if info.keep_dir and (kept or info.onions):  # kept across down, as app qubes' homes
            # are (never recorded); a lab gateway without onion services keeps nothing
            keep(info.keep_dir, [info.datadir] if kept else [], info.user)
        if not kept:
            rt.make_dir(info.datadir, 0o700, owner=info.user)
        if info.lab_network and rt.plan.lab is not None:  # the lab's network only, never
            from netstack.tor.network import seed_client  # the public one's: a warm lab

            seed_client(rt.plan.lab.tor_nodes.values(), info.datadir, info.user)
        from netstack.tor.obfs4 import LAB_REF

        if LAB_REF in info.bridges:  # the lab's obfs4 bridge, made with the lab
            from netstack.tor.network import bridge_line_path

            assert rt.plan.lab is not None
            line = rt.kernel.read_file(bridge_line_path(rt.plan.lab.tor_dir)).strip()
            info = dataclasses.replace(info, bridges=[line if b == LAB_REF else b
                                                      for b in info.bridges])
        rt.write(info.torrc_path, torrc(info, rt.lab_dirauths if info.lab_network else ()))
        rt.write(info.filter_spec, encode(FilterSpec(  # the control-port filter's go signal
            info.address, CONTROL_PORT, info.control_socket, f"{info.address}:{SOCKS_PORT}",
            {c.ipv4: c.name for c in q.clients}, info.onions_per_workstation)))

    def status(self, q: QubeInfo, live: LiveFacts, k: Kernel) -> dict[str, Any]:
        """From the supervisor's monitor of tor's control port (see tor.control.watch), and
        the .onion addresses of its workstations' services."""
        info = q.info
        assert isinstance(info, TorInfo)
        onions = onion_addresses(info)
        child = live.children.get(info.daemon_name) or {}
        t = dict(child.get("health") or {"error": "no report from the supervisor yet",
                                         "bootstrap": None})
        if child and not child.get("alive"):
            t = {"error": "tor is not running", "bootstrap": None}
        t["restarts"] = child.get("restarts")
        return {"tor": t, "onions": onions}

    def wait_ready(self, q: QubeInfo, st: State, k: Kernel, timeout: float,
                   progress: Callable[[int, str], None]) -> float:
        from netstack.tor.control import wait_bootstrap

        info = q.info
        assert isinstance(info, TorInfo)
        return wait_bootstrap(info.control_socket, timeout, progress)

    def health(self, entry: dict[str, Any]) -> list[str]:
        t = entry["tor"]
        if t.get("error"):
            return [f"tor: {t['error']}"]
        if t.get("bootstrap") != 100:
            return [f"tor bootstrapped {t.get('bootstrap')}% only"]
        return []

    def status_lines(self, entry: dict[str, Any]) -> list[str]:
        t = entry["tor"]
        onions = [f"onion service of {c}: {a or 'not made yet'}"
                  for c, a in sorted((entry.get("onions") or {}).items())]
        if t.get("error"):
            return [f"tor: {t['error']}", *onions]
        fb = t.get("bridges_fallback")
        bridges = [] if not fb else [
            f"bridges: in use since {time.strftime('%H:%M:%S', time.localtime(fb['since']))} "
            f"(no bootstrap within {fb['after']:g} s straight to the relays)" if fb["since"]
            else f"bridges: unused; turned on if tor has not bootstrapped within "
                 f"{fb['after']:g} s"]
        return [f"tor {t['version']}: bootstrap {t['bootstrap']}%, "
                f"{count(t['circuits_built'], 'circuit')} built, restarts {t['restarts']}",
                *bridges, *onions]
