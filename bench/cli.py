"""How quick the command line is, as a user meets it: `netstack status` on the basic and the
Tor-over-VPN chains, and `netstack up configs/basic.toml --lab` followed by `down` (two CLI
processes) against bench/handwritten-basic.sh, a hand-written `ip` + `nft` script that makes
the same namespaces, links, addresses, routes, sysctls, files and rulesets. Runs alternate
between the two so the machine's noise hits both alike.

    sudo .venv/bin/python bench/cli.py [--runs 15] [--out bench/results/cli.json]
    sudo .venv/bin/python bench/cli.py --root /path/to/other/checkout   # e.g. an old commit
"""

from __future__ import annotations

import argparse
import json
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

NETSTACK = [str(ROOT / ".venv" / "bin" / "netstack")]
SCRIPT = str(ROOT / "bench" / "handwritten-basic.sh")
BASIC = str(ROOT / "configs" / "basic.toml")


CWD: str | None = None


def wall(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, cwd=CWD if argv == NETSTACK or
                   argv[:len(NETSTACK)] == NETSTACK else None)
    return time.perf_counter() - t0


def rules_dir(d: str, stack: str) -> None:
    """The plan's rulesets as `nft -j -f` files, made before anything is timed."""
    from netstack import stack as st
    from netstack.model import UplinkSpec
    from netstack.rules.nft import commands

    p = st.plan_only(BASIC, stack, UplinkSpec("lab"))
    for n in p.namespaces:
        if n.ruleset:
            Path(d, f"{n.name}.json").write_text(json.dumps(commands(n.ruleset, fresh=True)))


def status_runs(cfg: str, stack: str, runs: int) -> list[float]:
    subprocess.run(NETSTACK + ["--stack", stack, "up", cfg, "--lab"], check=True,
                   capture_output=True, cwd=CWD)
    try:
        wall(NETSTACK + ["--stack", stack, "status"])  # warm the page cache
        return [wall(NETSTACK + ["--stack", stack, "status"]) for _ in range(runs)]
    finally:
        subprocess.run(NETSTACK + ["--stack", stack, "down"], check=True, capture_output=True,
                       cwd=CWD)
        reap()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cli.json"))
    ap.add_argument("--root", help="measure the netstack of another checkout (python -m)")
    a = ap.parse_args()
    global CWD
    if a.root:
        NETSTACK[:] = [sys.executable, "-m", "netstack.cli"]
        CWD = a.root
    res_root = a.root or str(ROOT)
    res: dict = {"machine": machine(), "runs": a.runs, "checkout": res_root}
    ours, script = [], []
    with tempfile.TemporaryDirectory() as d:
        rules_dir(d, "hw")
        for _ in range(a.runs):
            up = wall(NETSTACK + ["--stack", "bc", "up", BASIC, "--lab"])
            down = wall(NETSTACK + ["--stack", "bc", "down"])
            reap()
            ours.append((up, down))
            up = wall([SCRIPT, "up", "hw", d])
            down = wall([SCRIPT, "down", "hw"])
            script.append((up, down))
    tot_ours = [u + d for u, d in ours]
    tot_script = [u + d for u, d in script]
    res["up_down_netstack_s"] = {"up_median": round(statistics.median(u for u, _ in ours), 3),
                                 "down_median": round(statistics.median(x for _, x in ours), 3),
                                 "total_median": round(statistics.median(tot_ours), 3)}
    res["up_down_script_s"] = {"up_median": round(statistics.median(u for u, _ in script), 3),
                               "down_median": round(statistics.median(x for _, x in script), 3),
                               "total_median": round(statistics.median(tot_script), 3)}
    res["ratio_netstack_to_script"] = round(statistics.median(tot_ours)
                                            / statistics.median(tot_script), 2)
    for name, cfg in (("basic", BASIC), ("tor-over-vpn", str(ROOT / "configs" /
                                                             "tor-over-vpn.toml"))):
        t = status_runs(cfg, "bs", a.runs)
        res[f"status_{name}_s"] = {"median": round(statistics.median(t), 3),
                                   "max": round(max(t), 3)}
    for k, v in res.items():
        print(f"{k:<28} {v}")
    write(a.out, res)


if __name__ == "__main__":
    main()
