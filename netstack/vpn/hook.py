"""Post-start hook of a tunnel daemon, run by the supervisor inside the qube's namespace
after each (re)start: wait for the tunnel device, configure it, set netstack's routes.

    python -m netstack.vpn.hook SPEC.json     (env NETSTACK_DAEMON_PID: the daemon's pid)

Spec: {"type": "wireguard"|"openvpn", "dev", "setconf"?, "addresses": [...], "mtu"?,
"routes": [{"dst", "dev", "via"?}]}. For OpenVPN the daemon configures the address itself
once connected; the hook waits for it. Prints "configured" when done, then watches the
device until the daemon exits; non-zero exit (daemon gone first, device vanished) makes
the supervisor end the daemon so it restarts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from netstack.state import proc_alive


def _alive(pid: int | None) -> bool:
    return True if pid is None else proc_alive(pid, None)


def _has_ipv4(dev: str) -> bool:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", dev], capture_output=True,
                         text=True).stdout
    return " inet " in out


def wait_for(pred, pid: int | None, timeout: float | None) -> bool:
    end = None if timeout is None else time.monotonic() + timeout
    delay = 0.005
    while not pred():
        if not _alive(pid) or (end is not None and time.monotonic() > end):
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    return True


def run(spec: dict, pid: int | None) -> int:
    dev = spec["dev"]
    if not wait_for(lambda: os.path.exists(f"/sys/class/net/{dev}"), pid, 30):
        print(f"hook: {dev} never appeared", file=sys.stderr)
        return 1
    if spec["type"] == "wireguard":
        subprocess.run(["wg", "setconf", dev, spec["setconf"]], check=True)
        for a in spec.get("addresses", []):
            subprocess.run(["ip", "addr", "replace", a, "dev", dev], check=True)
        if spec.get("mtu"):
            subprocess.run(["ip", "link", "set", dev, "mtu", str(spec["mtu"])], check=True)
        subprocess.run(["ip", "link", "set", dev, "up"], check=True)
    # OpenVPN sets the pushed address when the connection is up: until then nothing is
    # routed into the tunnel, and the kill switch drops everything else.
    elif spec["type"] == "openvpn" and not wait_for(lambda: _has_ipv4(dev), pid, None):
        print(f"hook: openvpn exited before {dev} got an address", file=sys.stderr)
        return 1
    for r in spec.get("routes", []):
        argv = ["ip", "route", "replace", r["dst"]]
        if r.get("via"):
            argv += ["via", r["via"]]
        argv += ["dev", r["dev"]]
        subprocess.run(argv, check=True)
    print(f"hook: {dev} configured", file=sys.stderr)
    print("configured", flush=True)
    # Watch: a daemon that lives on without its device (OpenVPN keeps running when its tun
    # is deleted) carries nothing; end it so the supervisor restarts it cleanly.
    gone_since = None
    while _alive(pid):
        if os.path.exists(f"/sys/class/net/{dev}"):
            gone_since = None
        elif gone_since is None:
            gone_since = time.monotonic()
        elif time.monotonic() - gone_since > 0.5:
            print(f"hook: {dev} vanished under a live daemon", file=sys.stderr)
            return 3
        time.sleep(0.1)
    return 0


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    pid_s = os.environ.get("NETSTACK_DAEMON_PID")
    sys.exit(run(spec, int(pid_s) if pid_s else None))


if __name__ == "__main__":
    main()
