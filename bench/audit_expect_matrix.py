"""`audit --ruleset FILE --expect` and `--matrix` on real-world shapes (issue 30 items 4
and 5), in process, no root: the fixtures under tests/realworld/ with the statements of
tests/realworld/*.expect.toml, and the examples the README runs (examples/audit/, their
listings in tests/audit_expect/). Prints CPU and wall seconds (median of --runs) of
--expect, --matrix --port tcp/22 and --matrix (each service the ruleset names, the first
24) per ruleset, and writes JSON. The bound asked: under 2 s each.

    .venv/bin/python bench/audit_expect_matrix.py [--runs 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = [(ROOT / "tests" / "realworld" / f"{n}.json",
          ROOT / "tests" / "realworld" / f"{n}.expect.toml") for n in ("router", "server")] + \
    [(ROOT / "tests" / "audit_expect" / f"{n}.json",
      ROOT / "examples" / "audit" / f"{n}.expect.toml") for n in ("router", "server")]


def one(listing: str, exp: str, what: str) -> dict[str, Any]:
    """One measurement in this (fresh) process: the CLI runs one audit per process, and
    audits repeated in one process get slower (docs/benchmarks.md)."""
    from netstack.audit import expect, matrix

    doc = json.loads(Path(listing).read_text())
    name = f"{Path(listing).parent.name}/{Path(listing).name}"
    ex = expect.load(exp)
    c0, w0 = time.process_time(), time.perf_counter()
    if what == "expect":
        out: Any = [v.status for v in expect.run(doc, name, ex)[0]]
    else:
        ms = matrix.matrices(doc, name, matrix.parse_port("tcp/22") if what != "matrix"
                             else None)
        out = f"{len(ms)} matrices, {sum(len(m.nodes) for m in ms)} classes"
    return {"ruleset": name, "what": what, "cpu_s": time.process_time() - c0,
            "wall_s": time.perf_counter() - w0, "result": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" /
                                         "audit_expect_matrix.json"))
    ap.add_argument("--one", nargs=3, metavar=("LISTING", "EXPECT", "WHAT"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(*a.one)))
        return
    rows = []
    for listing, exp in CASES:
        for what in ("expect", "matrix tcp/22", "matrix"):
            got = [json.loads(subprocess.run(
                [sys.executable, __file__, "--one", str(listing), str(exp), what],
                capture_output=True, text=True, check=True).stdout) for _ in range(a.runs)]
            row = {**got[0], "cpu_s": round(statistics.median(g["cpu_s"] for g in got), 3),
                   "wall_s": round(statistics.median(g["wall_s"] for g in got), 3)}
            rows.append(row)
            print(f"{row['ruleset']:28} {what:14} cpu {row['cpu_s']:.3f} s  "
                  f"wall {row['wall_s']:.3f} s  {row['result']}")
    write(a.out, {"machine": machine(), "runs": a.runs, "rows": rows})


if __name__ == "__main__":
    main()
