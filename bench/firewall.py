"""Per-qube firewall rules (issue 13): `netstack firewall work add` applied (lock to
digests, as the command reports it) and its whole CLI wall time; the cost of 1,000 rules
on every qube that can have a list (work, personal, sys-firewall) at `up`, against the
same chain without rules in the same run; the audit of that chain (its `seconds`, and
the CLI's wall time); and `netstack attach` moving personal between sys-firewall and
sys-net. Targets: add applied < 100 ms; a qube with 1,000 rules applied < 1 s; audit of
a chain with 1,000 rules per qube < 2 s. Root; brings its own stacks up and down.

    sudo .venv/bin/python bench/firewall.py [--runs 11] [--out bench/results/firewall.json]
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, reap, timed, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASIC = (ROOT / "configs" / "basic.toml").read_text()


LISTED = ('label = "green"', 'label = "blue"', 'label = "yellow"')  # sys-firewall, work, personal


def with_rules(n: int) -> str:
    """n rules (a third of them drops) on every qube with a netvm."""
    text = BASIC
    for seed, label in enumerate(LISTED):
        rules = ",\n".join(
            f'  {{action = "{"drop" if i % 3 == 0 else "accept"}", dsthost = '
            f'"203.0.{113 if i % 2 else 112}.{(7 * i + seed) % 250 + 1}", proto = "tcp", '
            f'dstports = {1000 + i}}}' for i in range(n))
        text = text.replace(label, f'{label}\nfirewall = [\n{rules}\n]', 1)
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("--rules", type=int, default=1000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "firewall.json"))
    a = ap.parse_args()
    d = Path(tempfile.mkdtemp())
    (d / "plain.toml").write_text(BASIC)
    (d / "many.toml").write_text(with_rules(a.rules))
    res: dict = {"runs": a.runs, "rules": a.rules}
    ups: dict[str, list[float]] = {"plain": [], "many": []}
    stack = "bf" + secrets.token_hex(2)
    cli = [sys.executable, "-m", "netstack.cli", "--stack", stack]
    try:
        for _ in range(3):  # alternating: the machine is noisy
            for kind in ("plain", "many"):
                ups[kind].append(timed([*cli, "up", str(d / f"{kind}.toml"), "--lab"])[0])
                if kind == "many":
                    t, out = timed([*cli, "audit", "--json"])
                    r = json.loads(out)
                    assert r["ok"], [x for x in r["results"] if x["status"] != "PASS"][:2]
                    res.setdefault("audit_s", []).append(r["seconds"])
                    res.setdefault("audit_wall", []).append(t)
                subprocess.run([*cli, "down", "--purge"], capture_output=True)
        subprocess.run([*cli, "up", str(d / "plain.toml"), "--lab"], check=True,
                       capture_output=True)
        applied, wall = [], []
        for i in range(a.runs):
            t, out = timed([*cli, "firewall", "work", "add", "action=accept",
                            f"dsthost=203.0.113.{i + 1}", "proto=tcp", "dstports=443",
                            "--json"])
            wall.append(t)
            applied.append(json.loads(out)["applied_s"])
        moved = []
        for i in range(a.runs):
            _t, out = timed([*cli, "attach", "personal",
                             "sys-net" if i % 2 == 0 else "sys-firewall", "--json"])
            moved.append(json.loads(out)["applied_s"])
    finally:
        subprocess.run([*cli, "down", "--purge"], capture_output=True)
        reap()
    res.update({
        "add_applied_median_s": round(statistics.median(applied), 4),
        "add_cli_wall_median_s": round(statistics.median(wall), 4),
        "up_plain_median_s": round(statistics.median(ups["plain"]), 3),
        "up_3x1000_rules_median_s": round(statistics.median(ups["many"]), 3),
        "rules_cost_per_qube_s": round((statistics.median(ups["many"]) -
                                        statistics.median(ups["plain"])) / len(LISTED), 3),
        "audit_1000_rules_per_qube_median_s": round(statistics.median(res.pop("audit_s")), 3),
        "audit_cli_wall_median_s": round(statistics.median(res.pop("audit_wall")), 3),
        "attach_applied_median_s": round(statistics.median(moved), 4),
        **machine()})
    for k, v in res.items():
        print(f"{k:<28} {v}")
    write(a.out, res)


if __name__ == "__main__":
    main()
