"""`netstack check` (issue 14): `check -- true` wall time on configs/vpn.toml (target < 3 s)
and on configs/tor-over-vpn.toml (target < 25 s median), each bringing its own lab stack
up and down; and the cost of one more check on a chain already up (what the pytest plugin
pays per test after the first; target < 1 s). Root.

    sudo .venv/bin/python bench/check.py [--runs 5] [--out bench/results/check.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, reap, timed, write  # noqa: E402

from netstack.kernel import RealKernel  # noqa: E402

KERNEL = RealKernel()  # this program's one kernel

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "check.json"))
    a = ap.parse_args()
    cli = [sys.executable, "-m", "netstack.cli"]
    res: dict = {"runs": a.runs}
    for name in ("vpn", "tor-over-vpn"):
        walls = [timed([*cli, "check", str(ROOT / "configs" / f"{name}.toml"), "--pcaps",
                        "/tmp/netstack-bench-check", "--", "true"])[0] for _ in range(a.runs)]
        res[f"check_true_{name}_median_s"] = round(statistics.median(walls), 2)
        res[f"check_true_{name}_max_s"] = round(max(walls), 2)
        reap()
    from netstack import check, stack
    from netstack.model import UplinkSpec

    s = "bc" + str(int(time.time()) % 100000)
    stack.up(str(ROOT / "configs" / "tor-over-vpn.toml"), s, UplinkSpec("lab", sink=True), KERNEL)
    try:
        check.wait_ready(s)
        again = []
        for _ in range(a.runs):
            t = time.perf_counter()
            r = check.run(["true"], stack=s, pcaps="/tmp/netstack-bench-check")
            again.append(time.perf_counter() - t)
            assert r.verdict == 0, check.table(r)
        res["check_on_running_chain_median_s"] = round(statistics.median(again), 3)
    finally:
        stack.down(s, KERNEL)
        import shutil

        from netstack.rules.qubefw import overlay_path

        shutil.rmtree(Path(overlay_path(s)).parent, ignore_errors=True)  # its qubes' homes
        reap()
    res.update(machine())
    for k, v in res.items():
        print(f"{k:<36} {v}")
    write(a.out, res)


if __name__ == "__main__":
    main()
