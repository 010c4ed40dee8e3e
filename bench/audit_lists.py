"""The audit of a chain whose qubes each carry N per-qube rules (issue 13), in process on
the generated rulesets (no root, no stack): seconds per run, and per qube view. The same
chain as bench/firewall.py (lists on work, personal and sys-firewall).

    .venv/bin/python bench/audit_lists.py [--rules 1000] [--runs 5] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from netstack.kinds.registry import SPECS

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine, write  # noqa: E402
from firewall import with_rules  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from netstack.audit import audit
    from netstack.model import UplinkSpec
    from netstack.plan import build, load_inputs

    ap = argparse.ArgumentParser()
    ap.add_argument("--rules", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "audit_lists.json"))
    a = ap.parse_args()
    d = Path(tempfile.mkdtemp())
    (d / "c.toml").write_text(with_rules(a.rules))
    lab = UplinkSpec("lab")
    plan = build(load_inputs(str(d / "c.toml"), "bench", lab, SPECS, overlay={}), "bench", lab)
    rulesets = {n.name: n.ruleset for n in plan.namespaces if n.ruleset}
    secs = []
    for _ in range(a.runs):
        t = time.perf_counter()
        res, _ = audit(plan, rulesets, None)
        secs.append(time.perf_counter() - t)
        bad = [r for r in res if r.status != "PASS"]
        assert not bad, bad[:2]
    out = {"rules_per_qube": a.rules, "listed_qubes": 3, "properties": len(res),
           "runs": a.runs, "audit_median_s": round(statistics.median(secs), 3),
           "audit_max_s": round(max(secs), 3), **machine()}
    for k, v in out.items():
        print(f"{k:<16} {v}")
    write(a.out, out)


if __name__ == "__main__":
    main()
