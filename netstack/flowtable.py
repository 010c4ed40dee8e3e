"""nftables flowtables: the forwarding qubes' fast path for established flows, where the
kernel has them (probed at `up`; this module says whether, the rules say how)."""

from __future__ import annotations

import os
import subprocess

PROBE = ("table inet netstack_probe {\n"
         " flowtable ft { hook ingress priority 0; devices = { lo }; }\n}\n")


def supported() -> bool:
    """Whether the kernel accepts a flowtable: `nft --check` (the kernel validates the
    batch and aborts it) in a network namespace of its own, so no ruleset of the host is
    touched. Needs root; without it the answer is no (the slow path is always correct)."""
    if os.geteuid() != 0:
        return False
    try:
        p = subprocess.run(["unshare", "--net", "nft", "-c", "-f", "-"], input=PROBE,
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0
