"""Keeper of a kernel WireGuard device, the supervised process in place of wireguard-go:
it makes the device in its namespace, holds it while it lives and deletes it when ended,
so a stopped or restarting tunnel behaves as wireguard-go's does (the device goes, the kill
switch holds) and the same post-start hook configures it.

    python -m netstack.vpn.kernelwg DEV      (inside the qube's namespace)
"""

from __future__ import annotations

import signal
import subprocess
import sys


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "link", *args], capture_output=True, text=True)


def main() -> int:
    dev = sys.argv[1]
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    _ip("del", dev)  # a keeper ended with -9 left it: start from a clean device
    p = _ip("add", dev, "type", "wireguard")
    if p.returncode != 0:
        print(f"kernelwg: ip link add {dev} type wireguard: {p.stderr.strip()}",
              file=sys.stderr)
        return 1
    print(f"kernelwg: {dev} made (kernel WireGuard)", file=sys.stderr, flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    _ip("del", dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
