"""How quick the command line is, as a user meets it: `netstack status` on the basic and the
Tor-over-VPN chains, and `netstack up configs/basic.toml --lab` followed by `down` (two CLI
processes) against bench/handwritten-basic.sh, a hand-written `ip` + `nft` script that makes
the same namespaces, links, addresses, routes, sysctls, files and rulesets. Runs alternate
between the two so the machine's noise hits both alike.

    sudo .venv/bin/python bench/cli.py [--runs 15] [--out bench/results/cli.json]
    sudo .venv/bin/python bench/cli.py --root /path/to/other/checkout   # e.g. an old commit
    sudo .venv/bin/python bench/cli.py --compare /path/to/old/checkout  # both, one loop

--prefix pf names the stacks pfbc, pfhw, ... instead of bc, hw, ... (a shared machine).
--compare runs the other checkout's netstack (as --root does: `python -m netstack.cli` in
it) in the same loop as this one and the script, in turn, so the machine's load hits all
three alike; its figures are printed with the prefix `other_`.
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


def wall(argv: list[str], cwd: str | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, cwd=cwd or (
        CWD if argv == NETSTACK or argv[:len(NETSTACK)] == NETSTACK else None))
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


def status_runs(cfg: str, stack: str, runs: int, ns: list[str] | None = None,
                cwd: str | None = None) -> list[float]:
    ns, cwd = ns or NETSTACK, cwd or CWD
    subprocess.run(ns + ["--stack", stack, "up", cfg, "--lab"], check=True,
                   capture_output=True, cwd=cwd)
    try:
        wall(ns + ["--stack", stack, "status"], cwd)  # warm the page cache
        return [wall(ns + ["--stack", stack, "status"], cwd) for _ in range(runs)]
    finally:
        subprocess.run(ns + ["--stack", stack, "down"], check=True, capture_output=True,
                       cwd=cwd)
        reap()


def medians(pairs: list[tuple[float, float]]) -> dict[str, float]:
    return {"up_median": round(statistics.median(u for u, _ in pairs), 3),
            "down_median": round(statistics.median(x for _, x in pairs), 3),
            "total_median": round(statistics.median(u + x for u, x in pairs), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cli.json"))
    ap.add_argument("--root", help="measure the netstack of another checkout (python -m)")
    ap.add_argument("--compare", help="also measure another checkout's netstack (python -m "
                    "in it) in the same loop")
    ap.add_argument("--prefix", default="", help="put this before every stack name the run "
                    "makes (bc, bs, bo, bp and the script's hw), e.g. to keep clear of other "
                    "users' stacks on a shared machine")
    a = ap.parse_args()
    P = a.prefix
    global CWD
    if a.root:
        NETSTACK[:] = [sys.executable, "-m", "netstack.cli"]
        CWD = a.root
    res_root = a.root or str(ROOT)
    res: dict = {"machine": machine(), "runs": a.runs, "checkout": res_root}
    other = [sys.executable, "-m", "netstack.cli"]
    if a.compare:
        res["other_checkout"] = a.compare
    ours, script, theirs = [], [], []
    with tempfile.TemporaryDirectory() as d:
        rules_dir(d, P + "hw")
        for _ in range(a.runs):
            up = wall(NETSTACK + ["--stack", P + "bc", "up", BASIC, "--lab"])
            down = wall(NETSTACK + ["--stack", P + "bc", "down"])
            reap()
            ours.append((up, down))
            up = wall([SCRIPT, "up", P + "hw", d])
            down = wall([SCRIPT, "down", P + "hw"])
            script.append((up, down))
            if a.compare:
                up = wall(other + ["--stack", P + "bo", "up", BASIC, "--lab"], a.compare)
                down = wall(other + ["--stack", P + "bo", "down"], a.compare)
                reap()
                theirs.append((up, down))
    tot_script = statistics.median(u + d for u, d in script)
    res["up_down_netstack_s"] = medians(ours)
    res["up_down_script_s"] = medians(script)
    res["ratio_netstack_to_script"] = round(medians(ours)["total_median"] / tot_script, 2)
    if a.compare:
        res["other_up_down_netstack_s"] = medians(theirs)
        res["other_ratio_netstack_to_script"] = round(medians(theirs)["total_median"]
                                                      / tot_script, 2)
    for name, cfg in (("basic", BASIC), ("tor-over-vpn", str(ROOT / "configs" /
                                                             "tor-over-vpn.toml"))):
        t = status_runs(cfg, P + "bs", a.runs)
        res[f"status_{name}_s"] = {"median": round(statistics.median(t), 3),
                                   "max": round(max(t), 3)}
        if a.compare:
            t = status_runs(cfg, P + "bp", a.runs, other, a.compare)
            res[f"other_status_{name}_s"] = {"median": round(statistics.median(t), 3),
                                             "max": round(max(t), 3)}
    for k, v in res.items():
        print(f"{k:<28} {v}")
    write(a.out, res)


if __name__ == "__main__":
    main()
