"""Bring-up and tear-down time of a stack over the lab: configs/basic.toml and generated
configs with 10 and 50 app qubes. Prints a table and writes JSON.

    sudo .venv/bin/python bench/bringup.py [--runs 7] [--out bench/results/bringup.json]

Times are measured in-process around netstack.stack.up/down (what the CLI calls), and
separately as wall time of the whole `netstack up`/`down` CLI (python start included).
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


def gen_config(apps: int) -> str:
    out = ['[qubes.sys-net]\nkind = "net"\n',
           '[qubes.sys-firewall]\nkind = "firewall"\nnetvm = "sys-net"\n']
    out += [f'[qubes.app{i}]\nkind = "app"\nnetvm = "sys-firewall"\n' for i in range(apps)]
    return "\n".join(out)




def measure(cfg: str, runs: int) -> dict:
    ups, downs = [], []
    for i in range(runs):
        s = f"bn{i}"
        t0 = time.perf_counter()
        stack.up(cfg, s, plan.UplinkSpec("lab"), KERNEL)
        t1 = time.perf_counter()
        problems = stack.down(s, KERNEL)
        t2 = time.perf_counter()
        assert not problems, problems
        reap()
        ups.append(t1 - t0)
        downs.append(t2 - t1)
    return {"up_median_s": round(statistics.median(ups), 4),
            "down_median_s": round(statistics.median(downs), 4),
            "up_min_s": round(min(ups), 4), "down_min_s": round(min(downs), 4), "runs": runs}


def measure_cli(cfg: str, runs: int) -> dict:
    ups, downs = [], []
    cmd = [sys.executable, "-m", "netstack.cli", "--stack", "bncli"]
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd + ["up", cfg, "--lab"], check=True, capture_output=True)
        t1 = time.perf_counter()
        subprocess.run(cmd + ["down"], check=True, capture_output=True)
        t2 = time.perf_counter()
        reap()
        ups.append(t1 - t0)
        downs.append(t2 - t1)
    return {"up_median_s": round(statistics.median(ups), 4),
            "down_median_s": round(statistics.median(downs), 4), "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bringup.json"))
    a = ap.parse_args()
    os.chdir(ROOT)
    results: dict = {"machine": machine()}
    with tempfile.TemporaryDirectory() as d:
        cfgs = {"basic (4 qubes)": str(ROOT / "configs" / "basic.toml")}
        for n in (10, 50):
            p = Path(d) / f"apps{n}.toml"
            p.write_text(gen_config(n))
            cfgs[f"{n} app qubes ({n + 2} qubes)"] = str(p)
        for name, cfg in cfgs.items():
            results[name] = measure(cfg, a.runs)
        results["basic via CLI (wall, python start included)"] = measure_cli(
            cfgs["basic (4 qubes)"], a.runs)
    print(f"{'case':<46} {'up median':>10} {'down median':>12}")
    for k, v in results.items():
        if k != "machine":
            print(f"{k:<46} {v['up_median_s']:>9.3f}s {v['down_median_s']:>11.3f}s")
    write(a.out, results)


if __name__ == "__main__":
    main()
