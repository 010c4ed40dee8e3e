"""Every audit result in full (status, reason, counterexample, trace, number of classes),
kept as golden files: the generated chains of every shipped config with IPv6 off and on,
each broken ruleset of the corpus, and the generic properties of the real rulesets (their
JSON as the kernel listed it, kept beside the scripts by the root test). A change in what
the audit says, or in how much it explores, shows here. Regenerate with
NETSTACK_UPDATE_GOLDEN=1 after a deliberate change, and review the diff. No root."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from netstack.audit import onefile
from tests.unit.test_audit import CASES, make_plan, mutate, results, rulesets
from tests.unit.test_config import ROOT

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "audit"
REAL = Path(__file__).resolve().parents[1] / "real_rulesets" / "json"
CONFIGS = ["configs/basic.toml", "configs/vpn.toml", "configs/tor-over-vpn.toml",
           "tests/configs/tor-two-workstations.toml"]


def rows(res) -> list[dict]:
    return [{k: v for k, v in r.to_json().items()} for r in
            sorted(res, key=lambda r: (r.qube, r.property))]


def same_as_golden(name: str, data) -> None:
    path = GOLDEN / f"{name}.json"
    text = json.dumps(data, indent=1, sort_keys=True, default=sorted) + "\n"
    if os.environ.get("NETSTACK_UPDATE_GOLDEN"):
        GOLDEN.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.read_text() == text, f"{path} differs (NETSTACK_UPDATE_GOLDEN=1 to accept)"


@pytest.mark.parametrize("ipv6", [False, True])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_generated_chains(tmp_path, cfg, ipv6):
    src = tmp_path / "c.toml"
    src.write_text(("[stack]\nipv6 = true\n\n" if ipv6 else "") + (ROOT / cfg).read_text())
    p = make_plan(tmp_path, str(src))
    res = results(p, rulesets(p)).values()
    same_as_golden(f"{Path(cfg).stem}{'-ipv6' if ipv6 else ''}", rows(res))


@pytest.mark.parametrize("name", CASES)
def test_corpus(tmp_path, name):
    p = make_plan(tmp_path)
    rs = copy.deepcopy(rulesets(p))
    mutate(name, rs)
    same_as_golden(f"corpus-{name}", rows(results(p, rs).values()))


@pytest.mark.parametrize("name", sorted(p.stem for p in REAL.glob("*.json")))
def test_real_rulesets(name):
    doc = json.loads((REAL / f"{name}.json").read_text())
    a = onefile.audit(doc, f"{name}.nft")
    same_as_golden(f"real-{name}", a.to_json())


def test_every_real_ruleset_has_its_json():
    assert {p.stem for p in REAL.glob("*.json")} == \
        {p.stem for p in REAL.parent.glob("*.nft")}
