"""Keeper of a kernel WireGuard device, the supervised process in place of wireguard-go:
it makes the device in its namespace, holds it while it lives and deletes it when ended,
so a stopped or restarting tunnel behaves as wireguard-go's does (the device goes, the kill
switch holds) and the same post-start hook configures it.

A kernel device outlives a keeper killed with -9 (wireguard-go's TUN dies with its process):
the device carries the keeper's mark (its alias, `mark(pid)`), the post-start hook configures
only the device with its own keeper's mark (never one a dead keeper left) and deletes it the
moment that keeper exits, however it ended (docs/field-notes.md, "qemu and Debian's kernel").

    python -m netstack.vpn.kernelwg DEV      (inside the qube's namespace)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def mark(pid: int) -> str:
    """The alias the keeper of pid gives its device (`ip link` shows it)."""
    return f"netstack kernelwg keeper {pid}"


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "link", *args], capture_output=True, text=True)


def main() -> int:
    dev = sys.argv[1]
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    _ip("del", "dev", dev)  # a keeper ended with -9 may have left it: start from a clean one
    for args in (("add", "name", dev, "type", "wireguard"),
                 ("set", "dev", dev, "alias", mark(os.getpid()))):
        p = _ip(*args)
        if p.returncode != 0:
            print(f"kernelwg: ip link {' '.join(args)}: {p.stderr.strip()}", file=sys.stderr)
            _ip("del", "dev", dev)
            return 1
    print(f"kernelwg: {dev} made (kernel WireGuard)", file=sys.stderr, flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    _ip("del", "dev", dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
