"""stem control of a gateway's tor, through its root-only ControlSocket: bootstrap progress
(from BOOTSTRAP status events), status, circuits, NEWNYM."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import Any

from netstack.errors import NetstackError


class TorError(NetstackError):
    exit_code = 5


def connect(socket_path: str, timeout: float = 5.0):
    """An authenticated stem Controller; retried until tor has made its socket."""
    from stem import SocketError
    from stem.control import Controller

    end = time.monotonic() + timeout
    while True:
        try:
            c = Controller.from_socket_file(socket_path)
            c.authenticate()
            return c
        except (SocketError, OSError) as e:
            if time.monotonic() > end:
                raise TorError(f"cannot reach tor's control socket {socket_path}: {e}") from None
            time.sleep(0.05)


_PHASE = re.compile(r'PROGRESS=(\d+).*?TAG=(\S+).*?SUMMARY="([^"]*)"')


def bootstrap_phase(c) -> tuple[int, str, str]:
    m = _PHASE.search(c.get_info("status/bootstrap-phase"))
    return (int(m.group(1)), m.group(2), m.group(3)) if m else (0, "unknown", "")


def wait_bootstrap(socket_path: str, deadline_s: float,
                   progress: Callable[[int, str], None] | None = None) -> float:
    """Block until 100 % or the deadline; driven by BOOTSTRAP events, not polling."""
    from stem.control import EventType

    t0 = time.monotonic()
    c = connect(socket_path, timeout=min(deadline_s, 30))
    done = threading.Event()
    last = {"pct": 0, "tag": "starting", "summary": ""}

    def update(pct: int, tag: str, summary: str) -> None:
        last.update(pct=pct, tag=tag, summary=summary)
        if progress:
            progress(pct, summary)
        if pct >= 100:
            done.set()

    def on_status(ev) -> None:
        if getattr(ev, "action", None) == "BOOTSTRAP":
            a = ev.keyword_args
            update(int(a.get("PROGRESS", 0)), a.get("TAG", ""), a.get("SUMMARY", ""))

    try:
        c.add_event_listener(on_status, EventType.STATUS_CLIENT)
        update(*bootstrap_phase(c))  # events only report changes from now on
        left = deadline_s - (time.monotonic() - t0)
        if not done.wait(max(0.0, left)):
            raise TorError(f"tor did not bootstrap within {deadline_s:.0f} s; last phase: "
                           f"{last['pct']}% {last['tag']} ({last['summary']})")
        return time.monotonic() - t0
    finally:
        c.close()


def _status(c) -> dict[str, Any]:
    pct, tag, summary = bootstrap_phase(c)
    circs = [x for x in c.get_circuits() if x.status == "BUILT"]
    return {"version": str(c.get_version()).split()[0], "bootstrap": pct,
            "phase": tag, "summary": summary, "circuits_built": len(circs),
            "circuit_established": c.get_info("status/circuit-established") == "1"}


def status(socket_path: str) -> dict[str, Any]:
    c = connect(socket_path, timeout=1)
    try:
        return _status(c)
    finally:
        c.close()


def watch(socket_path: str, fallback_after: str = "", *,
          report: Callable[[dict[str, Any]], None], stopping: threading.Event,
          refresh: float = 10.0, **_: Any) -> None:
    """The supervisor's health monitor of a gateway's tor: a fresh status on every
    bootstrap or circuit event (and every `refresh` seconds), reconnecting when tor
    restarts. `netstack status` reads what this reports instead of importing stem.
    `fallback_after` (seconds, the gateway's `bridges_fallback_after`): when tor has not
    bootstrapped that long after the monitor met it, its bridges are turned on
    (`SETCONF UseBridges=1`: the torrc has them, unused), as Tor Browser's connection
    assist does on a network that blocks the relays; a restarted tor starts direct again."""
    import time

    from stem.control import EventType

    after = float(fallback_after) if fallback_after else 0.0
    while not stopping.is_set():
        try:
            c = connect(socket_path, timeout=1)
        except TorError as e:
            report({"error": str(e), "bootstrap": None})
            stopping.wait(0.5)
            continue
        changed = threading.Event()
        met, fell_back = time.monotonic(), None
        try:
            c.add_event_listener(lambda ev, ch=changed: ch.set(), EventType.STATUS_CLIENT,
                                 EventType.CIRC)
            while not stopping.is_set() and c.is_alive():
                st = _status(c)
                if after and fell_back is None and c.get_conf("UseBridges") == "1":
                    fell_back = time.time()  # this tor was told before (a monitor restart)
                if after and fell_back is None and st["bootstrap"] != 100 \
                        and time.monotonic() - met >= after:
                    c.set_conf("UseBridges", "1")
                    fell_back = time.time()
                if after:
                    st["bridges_fallback"] = {"after": after, "since": fell_back}
                report(st)
                left = after - (time.monotonic() - met) if after and fell_back is None \
                    else refresh
                changed.wait(max(0.05, min(refresh, left)))
                changed.clear()
        except Exception as e:  # noqa: BLE001 - tor went away mid-query: reconnect
            report({"error": f"tor control: {e}", "bootstrap": None})
        finally:
            c.close()


def circuits(socket_path: str) -> list[dict[str, Any]]:
    c = connect(socket_path, timeout=1)
    try:
        out = []
        for circ in c.get_circuits():
            relays = []
            for fp, nick in circ.path:
                addr = None
                try:
                    ns = c.get_network_status(fp)
                    addr = f"{ns.address}:{ns.or_port}"
                except Exception:  # not in our consensus copy (yet)
                    pass
                relays.append({"fingerprint": fp, "nickname": nick, "address": addr})
            out.append({"id": circ.id, "status": circ.status, "purpose": circ.purpose,
                        "flags": list(circ.build_flags), "relays": relays})
        return out
    finally:
        c.close()


def newnym(socket_path: str) -> None:
    from stem import Signal

    c = connect(socket_path, timeout=1)
    try:
        c.signal(Signal.NEWNYM)
    finally:
        c.close()
