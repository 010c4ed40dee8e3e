"""Issue 30 items 4 and 6 with root: the README's commands on examples/audit/ exactly as a
user runs them (nft scripts loaded in a scratch namespace), and each counterexample and
witness replayed in the kernel (scratch namespaces with nftrace), which must confirm the
evaluator. The listings the unit tests read (tests/audit_expect/) are what these scripts
load to."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from netstack.audit import rulesetfile
from tests.integration.util import cli
from tests.realkernel import KERNEL

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]
EX = ROOT / "examples" / "audit"


def namespaces() -> set[str]:
    """The scratch namespaces of a ruleset's loading (nsr...) and of the replay (nso...);
    other helpers' stacks come and go beside them on a shared machine."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {w.split()[0] for w in out.splitlines() if w.startswith(("nsr", "nso"))}


def rules(doc: dict) -> list:
    return [i for i in doc["nftables"] if "metainfo" not in i]


@pytest.mark.parametrize("name", ["server", "router"])
def test_listings_are_the_examples(name: str) -> None:
    got = rulesetfile.read(str(EX / f"{name}.nft"), KERNEL)
    kept = json.loads((ROOT / "tests" / "audit_expect" / f"{name}.json").read_text())
    assert rules(got) == rules(kept), f"regenerate tests/audit_expect/{name}.json"


def test_server_counterexamples_replayed_in_the_kernel() -> None:
    before = namespaces()
    p = cli("audit", "--ruleset", str(EX / "server.nft"), "--expect",
            str(EX / "server.expect.toml"), "--replay", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    out = p.stdout
    refuted = [ln for ln in out.splitlines() if ln.startswith("REFUTED")]
    replays = [ln.strip() for ln in out.splitlines() if "replay in the kernel" in ln]
    assert len(refuted) == 2 and replays == ["replay in the kernel: accept (confirmed)"] * 2, out
    assert "NOT PROVEN: 4 statements, 2 refuted, 0 not proven" in out
    r = json.loads(cli("audit", "--ruleset", str(EX / "server.nft"), "--expect",
                       str(EX / "server.expect.toml"), "--replay", "--json",
                       check=False).stdout)
    for s in r["statements"]:
        if s["status"] == "REFUTED":
            assert s["replay"]["confirmed"] and s["replay"]["kernel_verdict"] == "accept"
            assert ["input", "accept"] in [list(x) for x in s["replay"]["fate"]]
    # the scratch namespaces are gone: ours are removed before the command exits; others'
    # (helpers testing side by side make nsr/nso namespaces too) come and go, so what is
    # new must be gone within a deadline
    deadline = time.monotonic() + 60
    while (left := namespaces() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, left


def test_router_proven_and_its_witness_replayed() -> None:
    p = cli("audit", "--ruleset", str(EX / "router.nft"), "--expect",
            str(EX / "router.expect.toml"), "--replay", check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "PROVEN: 5 statements, 0 refuted, 0 not proven" in p.stdout
    assert "replay in the kernel: accept (confirmed)" in p.stdout, p.stdout


def test_a_broken_promise_is_confirmed_by_the_kernel(tmp_path: Path) -> None:
    """Anti-test of the router's: the guests' web rule widened to every port; the `only`
    of the guests' reach is refuted, and the kernel forwards the counterexample too."""
    text = (EX / "router.nft").read_text().replace(
        'iifname "guest0" oifname "wan0" tcp dport { 80, 443 } accept',
        'iifname "guest0" oifname "wan0" meta l4proto tcp accept')
    assert "meta l4proto tcp accept" in text
    f = tmp_path / "router.nft"
    f.write_text(text)
    r = json.loads(cli("audit", "--ruleset", str(f), "--expect",
                       str(EX / "router.expect.toml"), "--replay", "--json",
                       check=False).stdout)
    guests = r["statements"][0]
    assert guests["status"] == "REFUTED" and "outside `to`" in guests["reason"], guests
    ce = guests["packet"]
    assert guests["role"] == "counterexample"
    assert ce["iifname"] == "guest0" and ce["oifname"] == "wan0"
    assert ce["dport"] not in (80, 443)
    assert guests["replay"]["confirmed"], guests["replay"]
