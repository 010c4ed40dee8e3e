"""Every veth end of ours asks for an interface index (rtnl.fixed_index) that differs from
its peer's and from every other end in its namespace: the kernel gives a device its queue
at once only when its index differs from its peer's, and two fresh namespaces would both
give index 2 (docs/field-notes.md, "veth links and the kernel's linkwatch"). Checked over
every shipped config's plan, with the lab (Tor, sink, bridges) and a nat uplink."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from netstack.kinds.registry import SPECS
from netstack.model import UplinkSpec
from netstack.plan import build, load_inputs
from netstack.rtnl import fixed_index

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(str(p) for p in ROOT.glob("configs/*.toml"))


@pytest.fixture(autouse=True)
def no_overlay(tmp_path, monkeypatch):
    monkeypatch.setattr("netstack.names.RUN_DIR", str(tmp_path / "run"))


CASES = [(c, u) for c in CONFIGS for u in (UplinkSpec("lab"), UplinkSpec("lab", sink=True))]
CASES.append((str(ROOT / "configs" / "basic.toml"), UplinkSpec("nat", "eth9")))  # no lab: files


@pytest.mark.parametrize("cfg,uplink", CASES)
def test_no_two_ends_share_an_index(cfg, uplink):
    inputs = load_inputs(cfg, "u1", uplink, SPECS, overlay={})
    inputs.host_resolv = "nameserver 192.0.2.53\n"  # never this machine's resolv.conf
    p = build(inputs, "u1", uplink)
    per_ns: dict[str | None, list[int]] = defaultdict(list)
    for v in p.veths:
        ia = fixed_index(v.if_a) if v.ns_a is not None else 0
        ib = fixed_index(v.if_b) if ia else 0
        if v.ns_a is None:
            assert ia == 0  # the host's namespace: the kernel's choice, never ours
            continue
        assert ia and ib and ia != ib, (v, ia, ib)
        per_ns[v.ns_a].append(ia)
        per_ns[v.ns_b].append(ib)
    assert per_ns
    for ns, idx in per_ns.items():
        assert len(idx) == len(set(idx)), (ns, idx)


def test_names_outside_the_scheme_keep_the_kernels_choice():
    assert fixed_index("wg3-main") == 0 and fixed_index("h-x") == 0
    assert fixed_index("vifx") == 0 and fixed_index("hx-web") == 0
    assert fixed_index("vif3") != fixed_index("vif4") != fixed_index("eth0")
