"""Onion services from a workstation, as plan data (no root): the config's `onion` table,
refused with one line unless the netvm is a Tor gateway; the gateway's torrc keeps the keys
in its own DataDirectory and points at the workstation; tor alone may open the connection,
and the workstation admits it only from its gateway."""

from __future__ import annotations

import pytest

from netstack.config import parse
from netstack.errors import ConfigError
from netstack.kinds.registry import SPECS
from netstack.model import UplinkSpec
from netstack.plan import build
from netstack.tor.gateway import torrc
from tests.unit.test_reconcile import ROOT

TOR = (ROOT / "tests/configs/tor-two-workstations.toml").read_text()


def test_the_gateway_serves_it_and_only_tor_reaches_the_workstation():
    from netstack.plan import load_inputs

    lab = UplinkSpec("lab")
    p = build(load_inputs(str(ROOT / "tests/configs/tor-two-workstations.toml"), "main", lab, SPECS,
                          overlay={}), "main", lab)
    gw = p.qube("sys-whonix")
    rc = torrc(gw.info).splitlines()
    # the keys are kept beside the stack's homes (the same address after down/up), not in
    # the run-time directory the lab's tor uses
    assert f"HiddenServiceDir {gw.info.keep_dir}/onion-anon-whonix" in rc
    assert gw.info.keep_dir.endswith("/main/sys-whonix/tor") and not \
        gw.info.keep_dir.startswith("/run/")
    assert "HiddenServicePort 80 10.137.0.5:8080" in rc
    out = [i["rule"] for i in p.ns(gw.netns).ruleset["nftables"] if "rule" in i
           and i["rule"].get("comment") == "onion service of anon-whonix"]
    assert out and "skuid" in str(out[0]) and "8080" in str(out[0])
    ws_in = [i["rule"] for i in p.ns(p.qube("anon-whonix").netns).ruleset["nftables"]
             if "rule" in i and i["rule"].get("comment") == "onion service port 80"]
    assert ws_in and gw.ipv4 in str(ws_in[0])
    assert not [i for i in p.ns(p.qube("anon-whonix2").netns).ruleset["nftables"]
                if "rule" in i and "onion" in str(i["rule"].get("comment"))]


@pytest.mark.parametrize("cfg,err", [
    ((ROOT / "configs/basic.toml").read_text().replace(
        'label = "blue"', 'label = "blue"\nonion = [{port = 80, target = 8080}]', 1),
     "needs a Tor gateway"),
    (TOR.replace("target = 8080", "target = 0"), "each 1-65535"),
    (TOR.replace("onion = [{port = 80, target = 8080}]", "onion = 80"), "must be a list"),
])
def test_bad_onion_tables_are_one_line(cfg, err):
    with pytest.raises(ConfigError, match=err):
        parse(cfg, SPECS)


def test_an_onion_port_given_twice_is_refused():
    base = (ROOT / "tests/configs/tor-two-workstations.toml").read_text()
    bad = base.replace("onion = [{port = 80, target = 8080}]",
                       "onion = [{port = 80, target = 8080}, {port = 80, target = 8081}]")
    assert bad != base
    with pytest.raises(ConfigError, match="port 80 is given twice"):
        parse(bad, SPECS)
