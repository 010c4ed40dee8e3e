"""The Whonix-way gateway (issue 15): time from `up --lab` of configs/tor.toml to the first
byte through the lab's obfs4 bridge (target < 30 s median), and the first byte through a
fresh SOCKS isolation, a new username on 9050 each time (target < 2 s). Root; brings its
own stack up and down.

    sudo .venv/bin/python bench/tor_extras.py [--runs 3] [--socks 10] [--out FILE.json]
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
from common import machine, reap, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WEB = "198.51.100.80"


def fetch(ns: str, extra: list[str]) -> bool:
    p = subprocess.run(["ip", "netns", "exec", ns, "curl", "-sS", "--max-time", "10", *extra,
                        f"http://{WEB}/"], capture_output=True)
    return p.returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--socks", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "tor_extras.json"))
    a = ap.parse_args()
    cli = [sys.executable, "-m", "netstack.cli"]
    firsts, socks = [], []
    for i in range(a.runs):
        s = "bt" + secrets.token_hex(2)
        t0 = time.monotonic()
        subprocess.run([*cli, "--stack", s, "up", str(ROOT / "configs" / "tor.toml"), "--lab",
                        "--no-wait"], check=True, capture_output=True)
        ns = f"nst-{s}-anon-whonix"
        try:
            while not fetch(ns, []):
                if time.monotonic() - t0 > 120:
                    raise SystemExit("no first byte through the bridge in 120 s")
            firsts.append(time.monotonic() - t0)
            if i == 0:
                gw = "10.137.0.3"  # sys-whonix in configs/tor.toml
                for _ in range(a.socks):
                    user = secrets.token_hex(4)
                    t = time.monotonic()
                    ok = fetch(ns, ["--socks5-hostname", f"{gw}:9050", "--proxy-user",
                                    f"{user}:x"])
                    socks.append(time.monotonic() - t if ok else float("inf"))
        finally:
            subprocess.run([*cli, "--stack", s, "down", "--purge"], capture_output=True)
            reap()
    res = {"runs": a.runs, "bridge_first_byte_median_s": round(statistics.median(firsts), 2),
           "bridge_first_byte_max_s": round(max(firsts), 2),
           "socks_fresh_isolation_median_s": round(statistics.median(socks), 3),
           "socks_fresh_isolation_max_s": round(max(socks), 3), "socks_samples": len(socks),
           **machine()}
    for k, v in res.items():
        print(f"{k:<32} {v}")
    write(a.out, res)


if __name__ == "__main__":
    main()
