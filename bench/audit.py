"""Audit benchmark: time to audit the generated Tor-over-VPN chain (all role properties),
and one firewall ruleset grown to 10,000 rules (per-client destination rules, the shape a
Qubes user's per-qube firewall takes). Pure evaluation: no root needed.

    .venv/bin/python bench/audit.py [--rules 10000] [--out bench/results/audit.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import write  # noqa: E402

from netstack import plan  # noqa: E402
from netstack.audit import audit  # noqa: E402
from netstack.audit.properties import AuditContext, QubeView, for_qube  # noqa: E402
from netstack.kinds.registry import SPECS  # noqa: E402
from netstack.model import Plan  # noqa: E402

WG = """[Interface]
PrivateKey = AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=
Address = 10.66.0.2/32
DNS = 198.51.100.53
[Peer]
PublicKey = AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=
Endpoint = 203.0.113.10:51820
AllowedIPs = 0.0.0.0/0
"""


def chain_plan(d: str) -> Plan:
    """configs/tor-over-vpn.toml over the lab, with a provider file whose endpoint is an
    address (so the kill switch's set is in the ruleset, as it is live)."""
    Path(d, "client-wireguard.conf").write_text(WG)
    cfg = Path(d, "chain.toml")
    cfg.write_text((ROOT / "configs" / "tor-over-vpn.toml").read_text().replace(
        '"lab:wireguard"', f'"{d}/client-wireguard.conf"'))
    return plan.build(plan.load_inputs(str(cfg), "main", plan.UplinkSpec("lab"), SPECS), "main",
                      plan.UplinkSpec("lab"))


def big_firewall(p: Plan, n: int) -> QubeView:
    rs = json.loads(json.dumps(p.ns("nst-main-sys-firewall").ruleset))
    items = rs["nftables"]
    at = next(i for i, x in enumerate(items) if "rule" in x and x["rule"]["chain"] == "forward"
              and x["rule"].get("comment") == "clients -> upstream only")
    extra = []
    for k in range(n):
        extra.append({"rule": {"family": "inet", "table": "netstack", "chain": "forward",
                               "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "vif3"}},
            {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "eth0"}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                       "right": f"198.18.{k // 250}.{k % 250 + 1}"}},
            {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                       "right": 1024 + k % 60000}}, {"drop": None}],
            "comment": f"qube firewall rule {k}"}})
    items[at:at] = extra
    q = p.qube("sys-firewall")
    return QubeView(q, rs, list(q.interfaces))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rules", type=int, default=10000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "audit.json"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        p = chain_plan(d)
    rs = {n.name: n.ruleset for n in p.namespaces if n.ruleset}
    times = []
    for _ in range(5):
        res, secs = audit(p, rs, None)
        times.append(secs)
    out = {"chain_properties": len(res), "chain_all_pass": all(r.status == "PASS" for r in res),
           "chain_seconds_median": round(sorted(times)[2], 4)}
    q = big_firewall(p, a.rules)
    n_rules = sum(1 for x in q.ruleset["nftables"] if "rule" in x)
    t0 = time.perf_counter()
    big = for_qube(q, AuditContext(p, rs, {}, set()))
    out.update(big_rules=n_rules, big_seconds=round(time.perf_counter() - t0, 3),
               big_properties=len(big), big_all_pass=all(r.status == "PASS" for r in big),
               big_classes=sum(r.classes for r in big))
    for k, v in out.items():
        print(f"{k:<24} {v}")
    write(a.out, out)


if __name__ == "__main__":
    main()
