"""Leak battery benchmark: the steady-state battery on configs/tor-over-vpn.toml and
configs/vpn.toml over the lab; case count, packets sent, links captured and wall time.

    sudo .venv/bin/python bench/leaktest.py [--runs 3] [--out bench/results/leaktest.json]
"""

from __future__ import annotations

import argparse
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
from netstack.leaktest import battery  # noqa: E402
from netstack.tor.control import wait_bootstrap  # noqa: E402
from netstack.tor.gateway import TorInfo  # noqa: E402

KERNEL = RealKernel()  # this program's one kernel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "leaktest.json"))
    a = ap.parse_args()
    res: dict = {"machine": machine()}
    for cfg in ("tor-over-vpn", "vpn"):
        name = "bl" + cfg[:3].replace("-", "")
        p, _ = stack.up(str(ROOT / "configs" / f"{cfg}.toml"), name, plan.UplinkSpec("lab"), KERNEL)
        try:
            for t in p.infos(TorInfo):
                wait_bootstrap(t.control_socket, 120)
            # first streams after 100 % can fail: wait (deadline 30 s) for a page through the
            # chain before timing the battery
            ws = next(q.netns for q in p.qubes if not q.traits.provides_network)
            end = time.monotonic() + 30
            while subprocess.run(["ip", "netns", "exec", ws, "curl", "-sf", "--max-time", "3",
                                  "-o", "/dev/null", "http://198.51.100.80/"]).returncode:
                if time.monotonic() > end:
                    raise SystemExit("no page through the chain within 30 s")
                time.sleep(0.1)
            times, reports = [], []
            with tempfile.TemporaryDirectory() as d:
                for _ in range(a.runs):
                    r = battery.run(name, pcaps_dir=d, kernel=KERNEL)
                    times.append(r.seconds)
                    reports.append(r)
            r = reports[-1]
            res[cfg] = {"cases": len(r.cases), "packets_sent": r.packets_sent,
                        "links_captured": len(r.links), "leaks": [x.leaks for x in reports],
                        "seconds_median": round(statistics.median(times), 2),
                        "seconds_max": round(max(times), 2), "runs": a.runs}
        finally:
            stack.down(name, KERNEL)
            reap()
    for k, v in res.items():
        print(f"{k:<14} {v}")
    write(a.out, res)


if __name__ == "__main__":
    main()
