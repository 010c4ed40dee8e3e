"""What a disposable qube costs: `netstack run -- true` on the basic lab chain (CLI start,
hot-plug of the qube into sys-firewall, the sandboxed command, removal), against
`netstack exec work -- true` (CLI start and the sandboxed command only) alternating in
one loop. Target: `run -- true` under 0.5 s wall. Root; brings its own stack up and down.

    sudo .venv/bin/python bench/run.py [--runs 21] [--out bench/results/run.json]
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, reap, timed, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "run.json"))
    a = ap.parse_args()
    stack = "br" + secrets.token_hex(2)
    cli = [sys.executable, "-m", "netstack.cli", "--stack", stack]
    subprocess.run([*cli, "up", str(ROOT / "configs" / "basic.toml"), "--lab"], check=True,
                   capture_output=True)
    try:
        run, exe = [], []
        for _ in range(a.runs):
            run.append(timed([*cli, "run", "-q", "--user", "nobody", "--", "true"])[0])
            exe.append(timed([*cli, "exec", "work", "--user", "nobody", "--", "true"])[0])
        t0 = time.perf_counter()
        procs = [subprocess.Popen([*cli, "run", "-q", "--user", "nobody", "--", "true"])
                 for _ in range(20)]
        assert all(p.wait() == 0 for p in procs)
        twenty = time.perf_counter() - t0
    finally:
        subprocess.run([*cli, "down", "--purge"], capture_output=True)
        reap()
    res = {"runs": a.runs, "run_true_median_s": round(statistics.median(run), 4),
           "run_true_max_s": round(max(run), 4),
           "exec_true_median_s": round(statistics.median(exe), 4),
           "hot_plug_and_removal_s": round(statistics.median(run) - statistics.median(exe), 4),
           "twenty_at_once_wall_s": round(twenty, 3), "target_s": 0.5,
           "met": statistics.median(run) < 0.5, **machine()}
    for k, v in res.items():
        print(f"{k:<28} {v}")
    write(a.out, res)


if __name__ == "__main__":
    main()
