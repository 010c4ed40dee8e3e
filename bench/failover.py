"""Server failover benchmark: a VPN qube with two lab WireGuard servers
(`failover_after = 3`); the first is blocked and the time until a page comes back through
the second is measured (the bound, plus noticing, swapping and the new handshake).
Prints a table and writes JSON.

    sudo .venv/bin/python bench/failover.py [--runs 5] [--out bench/results/failover.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, reap, write  # noqa: E402

from netstack import plan, stack  # noqa: E402
from netstack.kernel import RealKernel  # noqa: E402

KERNEL = RealKernel()  # this program's one kernel

AFTER = 3
WEB = "198.51.100.80"


def fetch(ns: str) -> bool:
    return subprocess.run(["ip", "netns", "exec", ns, "curl", "-s", "-o", "/dev/null",
                           "--max-time", "1", f"http://{WEB}/"]).returncode == 0


def one(cfg: str, name: str) -> float:
    stack.up(cfg, name, plan.UplinkSpec("lab"), KERNEL)
    try:
        work = f"nst-{name}-work"
        end = time.monotonic() + 20
        while not fetch(work):
            if time.monotonic() > end:
                raise RuntimeError("no first page")
        subprocess.run(["ip", "netns", "exec", f"nsl-{name}-vpn", "nft",
                        "add table inet blk; add chain inet blk in { type filter hook "
                        "prerouting priority -300; }; add rule inet blk in udp dport 51820 "
                        "drop"], check=True)
        t0 = time.monotonic()
        while not fetch(work):
            if time.monotonic() - t0 > 60:
                raise RuntimeError("no failover within 60 s")
        return time.monotonic() - t0
    finally:
        stack.down(name, KERNEL)
        reap()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "failover.json"))
    a = ap.parse_args()
    text = (ROOT / "configs" / "vpn.toml").read_text().replace(
        'config = "lab:wireguard"',
        f'config = ["lab:wireguard", "lab:wireguard2"]\nfailover_after = {AFTER}')
    fd, cfg = tempfile.mkstemp(suffix=".toml")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    try:
        took = [one(cfg, f"bf{i}") for i in range(a.runs)]
    finally:
        os.unlink(cfg)
    res = {"machine": machine(), "failover_after_s": AFTER,
           "dead_to_page_s_median": round(statistics.median(took), 2),
           "dead_to_page_s_max": round(max(took), 2), "runs": [round(x, 2) for x in took]}
    for k, v in res.items():
        print(f"{k:<28} {v}")
    write(a.out, res)


if __name__ == "__main__":
    main()
