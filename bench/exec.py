"""What the app-qube sandbox costs: `netstack exec work -- true` (bubblewrap in the qube's
namespace, as an unprivileged account) against the same command run the old way
(`ip netns exec NS setpriv ... true`, a bare namespace), alternating in one loop on the
basic lab chain. Root; brings its own stack up and down.

    sudo .venv/bin/python bench/exec.py [--runs 21] [--out bench/results/exec.json]
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, reap, timed, write  # noqa: E402

from netstack.kernel import RealKernel  # noqa: E402

KERNEL = RealKernel()  # this program's one kernel

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "exec.json"))
    a = ap.parse_args()
    stack = "bx" + secrets.token_hex(2)
    cli = [sys.executable, "-m", "netstack.cli", "--stack", stack]
    subprocess.run([*cli, "up", str(ROOT / "configs" / "basic.toml"), "--lab"], check=True,
                   capture_output=True)
    try:
        ns = f"nst-{stack}-work"
        from netstack.stack import exec_argv

        # the command lines `netstack exec` runs (the CLI's own start is the same for both)
        sandboxed = exec_argv(KERNEL, stack, "work", "nobody", ["true"])
        bare = ["ip", "netns", "exec", ns, "setpriv", "--reuid=65534", "--regid=65534",
                "--init-groups", "--", "true"]  # what exec ran before the sandbox
        whole = [*cli, "exec", "work", "--user", "nobody", "--", "true"]
        s, b, w = [], [], []
        for _ in range(a.runs):
            s.append(timed(sandboxed)[0])
            b.append(timed(bare)[0])
        for _ in range(5):
            w.append(timed(whole)[0])
    finally:
        subprocess.run([*cli, "down", "--purge"], capture_output=True)
        reap()
    res = {"runs": a.runs, "sandboxed_median_s": round(statistics.median(s), 4),
           "bare_namespace_median_s": round(statistics.median(b), 4),
           "added_s": round(statistics.median(s) - statistics.median(b), 4),
           "whole_exec_cli_median_s": round(statistics.median(w), 4), **machine()}
    for k, v in res.items():
        print(f"{k:<28} {v}")
    write(a.out, res)


if __name__ == "__main__":
    main()
