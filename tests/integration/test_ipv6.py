"""Every shipped config with IPv6 on (root): it audits clean in the kernel, the leak battery
finds nothing, and its IPv6 cases are controls both ways: the gateway answers neighbour
discovery (so IPv6 really is on and the negative cases mean something), IPv6 is forwarded
where the chain forwards (a plain chain) and never beyond a VPN or Tor gateway."""

from __future__ import annotations

import pytest

from netstack import audit
from netstack.leaktest import battery
from tests.integration.util import ROOT, cli, running_stack
from tests.realkernel import KERNEL

pytestmark = pytest.mark.root


@pytest.mark.parametrize("cfg", ["basic.toml", "vpn.toml", "tor-over-vpn.toml"])
def test_shipped_config_with_ipv6_on(tmp_path, cfg):
    v6 = tmp_path / cfg
    v6.write_text("[stack]\nipv6 = true\n\n" + (ROOT / "configs" / cfg).read_text())
    with running_stack(str(v6), "six") as s:
        r = audit.run(s, KERNEL, drift=True)
        assert r["ok"], [x for x in r["results"] if x["status"] != "PASS"]
        props = {(x["qube"], x["property"]): x for x in r["results"]}
        assert not [k for k in props if k[1] == "no IPv6 egress"]
        spoof = [x for k, x in props.items() if k[1].startswith("anti-spoofing")]
        assert spoof and all("fe80::a89:" in x["reason"] for x in spoof)
        rep = battery.run(s, pcaps_dir=str(tmp_path), kernel=KERNEL)
        assert rep.leaks == 0 and rep.errors == [], (
            [c for c in rep.cases if c["leaked_on"]],
            [(lk["link"], lk["violations"][:5]) for lk in rep.links if lk["violations"]])
        case = {c["case"]: c for c in rep.cases}
        assert case["ipv6-nd-gateway"]["verdict"] == "ok"
        own = case["ipv6-own-global"]["seen_on"]
        if rep.chain_kind == "plain":  # forwarded (masqueraded) one hop up at least
            assert len(own) >= 2, own
        else:  # never beyond the VPN or the Tor gateway
            gw = "sys-proxyvm" if rep.chain_kind == "vpn" else "sys-whonix"
            assert not [x for x in own if x.startswith(("isp", f"{gw}:eth0", "lab:"))], own


def test_with_ipv6_off_the_gateway_does_not_answer(basic_stack, tmp_path):
    """The same control with IPv6 off is a negative one: no answer, no error."""
    rep = battery.run(basic_stack, pcaps_dir=str(tmp_path), kernel=KERNEL)
    case = {c["case"]: c for c in rep.cases}
    assert case["ipv6-nd-gateway"]["verdict"] == "ok" and rep.errors == []
    p = cli("--stack", basic_stack, "leaktest", "--json", "--pcaps", str(tmp_path),
            check=False)
    assert p.returncode == 0
