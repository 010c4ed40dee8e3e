"""Post-start hook of a tunnel daemon, run by the supervisor inside the qube's namespace
after each (re)start: wait for the tunnel device, configure it, set netstack's routes, then
watch it. Driven by netlink events (pyroute2) and the daemon's pidfd, never by polling.

    python -m netstack.vpn.hook SPEC.json     (env NETSTACK_DAEMON_PID: the daemon's pid)

SPEC is a runtime.TunnelSpec. For OpenVPN the daemon sets the address itself once
connected; the hook waits for it until `connect_timeout` and then reports the daemon's own
last words. A kernel WireGuard keeper's device is configured only once it bears that
keeper's mark, and deleted when the keeper exits (netstack/vpn/kernelwg.py).
Prints "configured" when done; a non-zero exit (device never came, vanished, or no
connection in time) makes the supervisor end the daemon so it restarts.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from netstack import codec
from netstack.kernel import iproute_class
from netstack.vpn import kernelwg
from netstack.vpn.runtime import HookRoute, TunnelSpec

DEVICE_TIMEOUT = 30.0
EXITED = "daemon-exited"


class Events:
    """Link and address events of this namespace, plus the daemon's exit, in one queue."""

    def __init__(self, pid: int | None) -> None:
        self.q: queue.Queue[Any] = queue.Queue()
        subscribed = threading.Event()
        threading.Thread(target=self._pump, args=(subscribed,), daemon=True).start()
        subscribed.wait()  # subscribe first, then read the current state: nothing is missed
        if pid is not None:
            threading.Thread(target=self._wait_pid, args=(pid,), daemon=True).start()

    def _pump(self, subscribed: threading.Event) -> None:
        """pyroute2 0.9's socket lives in the event loop of the thread that made it: the
        subscription is made and read in this thread only."""
        try:
            sub = iproute_class()()
            sub.bind()
        finally:
            subscribed.set()
        with contextlib.suppress(Exception):
            while True:
                for m in sub.get():
                    self.q.put(m)

    def _wait_pid(self, pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.q.put(EXITED)
            return
        select.select([fd], [], [])
        self.q.put(EXITED)

    def wait(self, done: Callable[[], bool], timeout: float | None) -> str:
        """'ok' once done() holds (checked now and after each event), 'exited' when the
        daemon is gone first, 'timeout' at the deadline."""
        end = None if timeout is None else time.monotonic() + timeout
        while not done():
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return "timeout"
            try:
                m = self.q.get(timeout=left)
            except queue.Empty:
                return "timeout"
            if m == EXITED:
                return "exited"
        return "ok"

    def next_event(self) -> Any:
        return self.q.get()


def _index(ipr: Any, dev: str) -> int | None:
    found = ipr.link_lookup(ifname=dev)
    return found[0] if found else None


def _has_ipv4(ipr: Any, idx: int) -> bool:
    return bool(ipr.get_addr(index=idx, family=socket.AF_INET))


def _last_words(log: str | None, n: int = 3) -> str:
    if not log:
        return ""
    with contextlib.suppress(OSError), open(log, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4096))
        lines = [x.strip() for x in f.read().decode(errors="replace").splitlines() if x.strip()]
        return " | ".join(lines[-n:])
    return ""


def _routes(ipr: Any, routes: list[HookRoute]) -> None:
    for rt in routes:
        kw: dict[str, Any] = {"dst": rt.dst, "oif": _index(ipr, rt.dev)}
        if rt.via:
            kw["gateway"] = rt.via
        ipr.route("replace", **kw)


def _alias(ipr: Any, idx: int) -> str | None:
    with contextlib.suppress(Exception):  # gone since: no alias
        return ipr.link("get", index=idx)[0].get_attr("IFLA_IFALIAS")
    return None


def run(spec: TunnelSpec, pid: int | None) -> int:
    """Configure and watch the daemon's device. A keeper's device (kernel WireGuard) is
    the one with its keeper's mark, and it goes when the hook ends: the keeper exited
    (a kill -9 leaves the kernel's device behind, configured and carrying traffic with
    nobody supervising it), or the hook failed and the supervisor ends the keeper."""
    ev = Events(pid)
    ipr = iproute_class()()
    want = kernelwg.mark(pid) if spec.keeper and pid is not None else None

    def ours() -> int | None:
        """The device's index once it is this daemon's: a device a dead keeper left under
        the same name is not (its successor deletes it first and makes its own)."""
        idx = _index(ipr, spec.dev)
        if idx is None or (want is not None and _alias(ipr, idx) != want):
            return None
        return idx

    r = ev.wait(lambda: ours() is not None, DEVICE_TIMEOUT)
    if r != "ok":
        print(f"hook: {spec.dev} never appeared ({r})", file=sys.stderr)
        _delete(ipr, ours(), want)
        return 1
    idx = ours()
    assert idx is not None
    try:
        return _configure_and_watch(spec, ev, ipr, idx)
    finally:
        # the keeper is gone or about to be ended: its device goes with it, as
        # wireguard-go's TUN device goes with its process; the kill switch holds meanwhile
        _delete(ipr, idx, want)


def _delete(ipr: Any, idx: int | None, want: str | None) -> None:
    """Delete the keeper's device, only if it still bears that keeper's mark."""
    if want is None or idx is None or _alias(ipr, idx) != want:
        return
    with contextlib.suppress(Exception):  # gone meanwhile (its keeper's SIGTERM path)
        ipr.link("del", index=idx)
        print(f"hook: deleted the device of keeper {want.rsplit(' ', 1)[-1]} "
              "(it exited)", file=sys.stderr)


def _configure_and_watch(spec: TunnelSpec, ev: Events, ipr: Any, idx: int) -> int:
    dev = spec.dev
    # Routes to the servers first: WireGuard sends its first handshake the moment the
    # device is up (PersistentKeepalive), and a send with no route is lost until its 5 s
    # retry. Routes into the tunnel need the device up and come after.
    outside = [r for r in spec.routes if r.dev != dev]
    _routes(ipr, outside)
    if spec.type == "wireguard":
        subprocess.run(["wg", "setconf", dev, spec.setconf], check=True)
        for a in spec.addresses:
            ip, plen = a.split("/")
            ipr.addr("replace", index=idx, address=ip, prefixlen=int(plen))
        if spec.mtu:
            ipr.link("set", index=idx, mtu=spec.mtu)
        ipr.link("set", index=idx, state="up")
    else:
        # OpenVPN sets the pushed address when the connection is up: until then nothing is
        # routed into the tunnel, and the kill switch drops everything else.
        r = ev.wait(lambda: _has_ipv4(ipr, idx), spec.connect_timeout)
        if r != "ok":
            why = "openvpn exited" if r == "exited" else \
                f"no connection within {spec.connect_timeout:.0f} s"
            print(f"hook: {dev} got no address: {why}; openvpn said: "
                  f"{_last_words(spec.log) or '-'}", file=sys.stderr)
            return 1
    _routes(ipr, [r for r in spec.routes if r.dev == dev])
    print(f"hook: {dev} configured", file=sys.stderr)
    print("configured", flush=True)
    # Watch: a daemon that lives on without its device (OpenVPN keeps running when its tun
    # is deleted) carries nothing; end it so the supervisor restarts it cleanly.
    while True:
        m = ev.next_event()
        if m == EXITED:
            return 0
        if m.get("event") == "RTM_DELLINK" and m.get("index") == idx:
            print(f"hook: {dev} vanished under a live daemon", file=sys.stderr)
            return 3


def main() -> None:
    spec = codec.read(sys.argv[1], TunnelSpec)
    pid_s = os.environ.get("NETSTACK_DAEMON_PID")
    sys.exit(run(spec, int(pid_s) if pid_s else None))


if __name__ == "__main__":
    main()
