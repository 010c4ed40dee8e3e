"""`audit --ruleset FILE` on real-world shapes (issue 30 item 2), in process, no root: the
fixtures under tests/realworld/ (a router with WAN/LAN/guest zones, 38 named sets, 36 dscp
matches and mangles, 12 limits, a 30-entry verdict map; a server with 24 sets, 20 service
ports, dscp/mark rules, limits and a 60-entry verdict map), each as `nft -j list ruleset`
JSON. Before the fix the router did not finish in 50 s (docs/field-notes.md).
Prints CPU and wall seconds per ruleset (median of --runs) and writes JSON.

    .venv/bin/python bench/audit_realworld.py [--runs 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = sorted((ROOT / "tests" / "realworld").glob("*.json"))


def main() -> None:
    from netstack.audit import onefile

    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "audit_realworld.json"))
    a = ap.parse_args()
    rows = []
    for path in FIXTURES:
        doc = json.loads(path.read_text())
        cpu, wall, statuses = [], [], []
        for _ in range(a.runs):
            c0, w0 = time.process_time(), time.perf_counter()
            fa = onefile.audit(doc, str(path))
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
            statuses = [r.status for r in fa.results]
        row = {"ruleset": path.name, "cpu_s": round(statistics.median(cpu), 3),
               "wall_s": round(statistics.median(wall), 3), "results": statuses}
        rows.append(row)
        print(f"{path.name:20} cpu {row['cpu_s']:.3f} s  wall {row['wall_s']:.3f} s  "
              f"{' '.join(statuses)}")
    write(a.out, {"machine": machine(), "runs": a.runs, "rows": rows})


if __name__ == "__main__":
    main()
