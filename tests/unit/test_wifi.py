"""A Wi-Fi uplink's pure parts (issue 27 item 6): the config keys and their one-line
errors, the rule for the credentials file, the plan (the radio moves, wpa_supplicant and
the DHCP client run in sys-net), and the order on the recording fake: the radio is
recorded before it moves and `down` gives it back, also from the intent log alone (a
crash). No root: nothing touches the host. The real radio is tests/host/test_wifi.py's."""

from __future__ import annotations

import os

import pytest

from netstack import reconcile
from netstack.config import check_private_file, private_file_problem
from netstack.errors import ConfigError, StateError
from netstack.kinds.net_runtime import NetRuntime
from netstack.kinds.registry import RUNTIMES, SPECS
from netstack.model import UplinkSpec
from netstack.plan import build, load_inputs
from netstack.state import MovedPhyRec, State
from tests.fakekernel import FakeKernel

WIFI = UplinkSpec("move", "wlan0")


@pytest.fixture(autouse=True)
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setattr("netstack.names.RUN_DIR", str(tmp_path / "run"))


@pytest.fixture
def creds(tmp_path, monkeypatch):
    """A credentials file; the owner check is the pure rule's (tested below), so the file
    counts as root's here whoever runs the suite."""
    p = tmp_path / "wifi.conf"
    p.write_text('network={\n  ssid="lab"\n  psk="correct horse"\n}\n')
    p.chmod(0o600)
    real_stat = os.stat

    def as_root(path, *a, **kw):
        st = real_stat(path, *a, **kw)
        if str(path) != str(p):
            return st
        return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, 0, 0,
                               *tuple(st)[6:10]))

    monkeypatch.setattr(os, "stat", as_root)
    return p


def config(tmp_path, net: str) -> str:
    p = tmp_path / "wifi.toml"
    p.write_text(f"""
[qubes.sys-net]
kind = "net"
{net}

[qubes.sys-firewall]
kind = "firewall"
netvm = "sys-net"

[qubes.work]
kind = "app"
netvm = "sys-firewall"
""")
    return str(p)


def plan_of(tmp_path, net: str, uplink: UplinkSpec = WIFI):
    inputs = load_inputs(config(tmp_path, net), "main", uplink, SPECS, probe=False)
    # a fresh host may have no resolver but a loopback stub (the VM had none): never read
    # this machine's /etc/resolv.conf into a test (README run in scripts/test-host's VM)
    inputs.host_resolv = "nameserver 192.0.2.53\n"
    return inputs, build(inputs, "main", uplink)


def test_the_radio_moves_and_its_daemons_run_in_sys_net(tmp_path, creds):
    _, p = plan_of(tmp_path, f'wifi = "wlan0"\nwifi_config = "{creds}"')
    (m,) = p.moves
    assert (m.dev, m.ns, m.new_name, m.wireless) == ("wlan0", p.net.netns, "uplink", True)
    by_name = {d.name: d for d in p.daemons}
    wpa, dhcp = by_name["wifi-sys-net"], by_name["dhcp-sys-net"]
    assert wpa.netns == dhcp.netns == p.net.netns
    i = wpa.argv.index("wpa_supplicant")
    assert wpa.argv[i:] == ("wpa_supplicant", "-i", "uplink", "-D", "nl80211", "-c",
                            str(creds))
    assert "--tmpfs" in wpa.argv and wpa.argv[wpa.argv.index("--tmpfs") + 1] == "/run"
    assert dhcp.argv[-1] == "uplink"
    # a wired uplink stays a plain move, with no wpa_supplicant
    _, wired = plan_of(tmp_path, "", UplinkSpec("move", "eth0"))
    assert not wired.moves[0].wireless
    assert "wifi-sys-net" not in {d.name for d in wired.daemons}


def test_static_wifi_still_runs_wpa_supplicant(tmp_path, creds):
    _, p = plan_of(tmp_path, f'wifi = "wlan0"\nwifi_config = "{creds}"\n'
                   'address = "192.0.2.50/24"\ngateway = "192.0.2.1"')
    assert [d.name for d in p.daemons if d.netns == p.net.netns] == ["wifi-sys-net"]


@pytest.mark.parametrize("net, field, words", [
    ('wifi = "wlan0"', "wifi_config", "missing"),
    ('wifi_config = "/etc/netstack/wifi.conf"', "wifi", "missing"),
    ('wifi = "wlan0"\nwifi_config = "wifi.conf"', "wifi_config", "absolute path"),
    ('wifi = "a/b"\nwifi_config = "/etc/netstack/wifi.conf"', "wifi", "interface"),
    ('wifi = "sixteen-chars-xx"\nwifi_config = "/x"', "wifi", "15 characters"),
    ("wifi = 1\nwifi_config = \"/x\"", "wifi", "interface"),
])
def test_bad_keys_are_one_line_errors(tmp_path, net, field, words):
    with pytest.raises(ConfigError) as e:
        plan_of(tmp_path, net)
    msg = str(e.value)
    assert f"field '{field}'" in msg and words in msg and "\n" not in msg


def test_wifi_is_for_move_mode_and_names_the_uplink(tmp_path, creds):
    net = f'wifi = "wlan0"\nwifi_config = "{creds}"'
    for uplink in (UplinkSpec("lab"), UplinkSpec("nat", "wlan0")):
        with pytest.raises(ConfigError, match="field 'wifi'.*move mode only"):
            plan_of(tmp_path, net, uplink)
    with pytest.raises(ConfigError, match=r"names 'wlan0' but the uplink is --uplink eth0 "
                       r"\(fix: give --uplink wlan0"):
        plan_of(tmp_path, net, UplinkSpec("move", "eth0"))


def test_credentials_must_be_roots_alone():
    assert private_file_problem("/c", 0o100600, 0, True) is None
    assert private_file_problem("/c", 0o100400, 0, True) is None
    for mode in (0o100640, 0o100604, 0o100620, 0o100644, 0o100666):
        problem, fix = private_file_problem("/c", mode, 0, True)
        assert "group or others" in problem and f"{mode & 0o777:04o}" in problem
        assert fix == "chmod 600 /c"
    problem, fix = private_file_problem("/c", 0o100600, 1000, True)
    assert "uid 1000" in problem and fix.startswith("chown root:root /c")
    assert "not a regular file" in private_file_problem("/c", 0o40700, 0, False)[0]


def test_a_readable_credentials_file_is_refused_before_anything(tmp_path, creds):
    creds.chmod(0o644)
    with pytest.raises(ConfigError) as e:
        plan_of(tmp_path, f'wifi = "wlan0"\nwifi_config = "{creds}"')
    msg = str(e.value)
    assert msg == (f"config: qube 'sys-net' field 'wifi_config': {creds} can be read or "
                   f"written by group or others (mode 0644) (fix: chmod 600 {creds})")
    with pytest.raises(ConfigError, match="field 'x'.*cannot read .*No such file"):
        check_private_file("field 'x'", str(tmp_path / "missing.conf"))


def fake_wlan(fk: FakeKernel, dev: str = "wlan0", phy: int = 7) -> None:
    fk.ifaces[(None, dev)] = False
    fk.phys[(None, dev)] = phy


def up(tmp_path, fk: FakeKernel, net: str, uplink: UplinkSpec = WIFI):
    inputs, p = plan_of(tmp_path, net, uplink)
    st = State("main")
    st.create()
    fk.state_root = st.dir
    reconcile.up(p, st, fk, RUNTIMES, inputs.providers)
    return p, st


def test_the_radio_is_recorded_before_it_moves_and_given_back(tmp_path, creds):
    fk = FakeKernel()
    fake_wlan(fk)
    p, st = up(tmp_path, fk, f'wifi = "wlan0"\nwifi_config = "{creds}"')
    ns = p.net.netns
    assert fk.phys == {(ns, "uplink"): 7} and (None, "wlan0") not in fk.ifaces
    # every ruleset of sys-net is in place before the radio comes in
    moved = next(i for i, e in enumerate(fk.events) if e[0] == "phy_move")
    assert any(e[0] == "nft" and e[1] == ns for e in fk.events[:moved])
    assert fk.events[moved] == ("phy_move", "wlan0", 7, ns, "uplink")
    assert MovedPhyRec("wlan0", ns, "uplink", 7, None) in st.objects
    # `down` from the intent log alone (what a crash leaves): the radio comes back
    again = State.from_log("main")
    assert MovedPhyRec("wlan0", ns, "uplink", 7, None) in again.objects
    assert reconcile.teardown(again, fk) == []
    assert fk.phys == {(None, "wlan0"): 7}
    gave = [e for e in fk.events if e[0] == "phy_return"]
    assert gave == [("phy_return", ns, 7, "wlan0")]
    # the radio goes back before sys-net's namespace is deleted
    i = fk.events.index(gave[0])
    assert not any(e[0] == "netns_delete" and e[1] == ns for e in fk.events[:i])


def test_a_wifi_device_without_the_keys_is_refused(tmp_path, creds):
    fk = FakeKernel()
    fake_wlan(fk)
    with pytest.raises(StateError, match=r'--uplink wlan0 is a Wi-Fi interface.*fix: set '
                       r'wifi = "wlan0" and wifi_config'):
        up(tmp_path, fk, "")
    assert not [e for e in fk.events if e[0] in ("netns_create", "phy_move", "link_move")]
    fk2 = FakeKernel()
    fk2.ifaces[(None, "eth0")] = False  # wired, but the config says Wi-Fi
    with pytest.raises(StateError, match="--uplink eth0 is not a Wi-Fi interface"):
        up(tmp_path, fk2, f'wifi = "eth0"\nwifi_config = "{creds}"', UplinkSpec("move", "eth0"))


def test_status_and_health_say_whether_it_is_associated():
    role = NetRuntime()
    on = {"wifi": {"dev": "uplink", "was": "wlan0", "radio": True, "ssid": "lab"}}
    off = {"wifi": {"dev": "uplink", "was": "wlan0", "radio": True, "ssid": None}}
    assert role.status_lines(on) == ["wifi uplink (was wlan0): associated with 'lab'"]
    assert role.status_lines(off) == ["wifi uplink (was wlan0): NOT ASSOCIATED: the chain is "
                                      "closed, nothing leaves"]
    assert role.health(on) == []
    assert role.health(off) == ["Wi-Fi uplink is not associated: nothing leaves until it is"]


def test_ssid_from_information_elements():
    from netstack.nl80211 import ssid_of

    ies = bytes([1, 2, 0x82, 0x84]) + bytes([0, 12]) + b"netstack-lab" + bytes([3, 1, 1])
    assert ssid_of(ies) == "netstack-lab"
    assert ssid_of(bytes([0, 0])) == ""  # a hidden network's empty SSID
    assert ssid_of(bytes([1, 2, 0x82])) is None  # cut short: no SSID, no overrun


def test_the_kernel_seam_finds_what_it_calls_on_nl80211():
    """RealKernel's Wi-Fi paths run only where a radio is (the VM): what they call must
    at least exist here."""
    import inspect

    from netstack.kernel import RealKernel
    from netstack.nl80211 import Nl80211

    src = inspect.getsource(RealKernel)
    for name in ("wiphy", "associated_ssid", "set_netns"):
        assert f"nl.{name}(" in src
        assert callable(getattr(Nl80211, name, None)), name
