"""Config validation: each error names the qube and field, and valid tables parse."""

from pathlib import Path

import pytest

from netstack import config
from netstack.errors import ConfigError
from netstack.kinds.registry import SPECS

ROOT = Path(__file__).resolve().parents[2]

BASE = """
[qubes.sys-net]
kind = "net"
[qubes.sys-firewall]
kind = "firewall"
netvm = "sys-net"
[qubes.work]
kind = "app"
netvm = "sys-firewall"
"""


def err(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        config.parse(text, SPECS)
    return str(e.value)


def test_basic_config_parses():
    t = config.load(ROOT / "configs" / "basic.toml", SPECS)
    assert [q.name for q in t.tree_order()] == ["sys-net", "sys-firewall", "personal", "work"]
    assert t["work"].label == "blue" and t["work"].netvm == "sys-firewall"
    assert [q.name for q in t.children("sys-firewall")] == ["personal", "work"]


def test_several_qubes_may_share_a_netvm():
    t = config.parse(BASE + '[qubes.home]\nkind = "app"\nnetvm = "sys-firewall"\n', SPECS)
    assert len(t.children("sys-firewall")) == 2


def test_unknown_netvm():
    m = err(BASE.replace('netvm = "sys-firewall"', 'netvm = "sys-fw"'))
    assert "qube 'work' field 'netvm'" in m and "unknown qube 'sys-fw'" in m


def test_cycle():
    text = BASE + """
[qubes.a]
kind = "firewall"
netvm = "b"
[qubes.b]
kind = "firewall"
netvm = "a"
"""
    m = err(text)
    assert "cycle" in m and "field 'netvm'" in m


def test_self_netvm():
    m = err(BASE + '[qubes.a]\nkind = "firewall"\nnetvm = "a"\n')
    assert "own netvm" in m


def test_app_used_as_netvm():
    m = err(BASE + '[qubes.x]\nkind = "app"\nnetvm = "work"\n')
    assert "qube 'x' field 'netvm'" in m and "app qube" in m


def test_two_net_qubes():
    m = err(BASE + '[qubes.sys-net2]\nkind = "net"\n')
    assert "two net qubes" in m and "sys-net2" in m


def test_no_net_qube():
    m = err('[qubes.work]\nkind = "app"\nnetvm = "x"\n')
    assert "no qube of kind 'net'" in m


def test_duplicate_names():
    m = err(BASE + '[qubes.work]\nkind = "app"\nnetvm = "sys-net"\n')
    assert "qube work" in m and "duplicate" in m


def test_unknown_key_in_qube():
    m = err(BASE.replace('kind = "app"', 'kind = "app"\ncolour = "red"'))
    assert "qube 'work'" in m and "unknown key 'colour'" in m


def test_unknown_top_level_key():
    assert "unknown key 'qube'" in err(BASE + "[qube]\n")


def test_kind_specific_key_on_wrong_kind():
    m = err(BASE.replace('kind = "app"', 'kind = "app"\ndns = ["192.0.2.1"]'))
    assert "unknown key 'dns'" in m


@pytest.mark.parametrize("name", ["Work", "1work", "w_rk", "a" * 32, "work-", "wörk", "a/b"])
def test_names_that_cannot_become_namespace_names(name):
    m = err(BASE + f'[qubes."{name}"]\nkind = "app"\nnetvm = "sys-net"\n')
    assert "invalid name" in m


def test_bad_kind_and_label():
    assert "field 'kind'" in err(BASE.replace('kind = "app"', 'kind = "vm"'))
    assert "field 'label'" in err(BASE.replace('kind = "app"', 'kind = "app"\nlabel = "pink"'))


def test_missing_netvm():
    assert "field 'netvm'" in err('[qubes.sys-net]\nkind = "net"\n[qubes.w]\nkind = "app"\n')


def test_net_with_netvm():
    m = err('[qubes.sys-net]\nkind = "net"\nnetvm = "x"\n')
    assert "field 'netvm'" in m


def test_not_toml():
    assert "not valid TOML" in err("[qubes\n")


def test_bad_net_addresses():
    m = err('[qubes.sys-net]\nkind = "net"\ndns = ["not-an-ip"]\n')
    assert "sys-net" in m and "bad address" in m


@pytest.mark.parametrize("addr,gw,needle", [
    (None, "192.0.2.1", "a gateway without an address"),
    ("192.0.2.2/24", "198.51.100.1", "not a router on 192.0.2.0/24"),
    ("192.0.2.2/24", "192.0.2.2", "not a router on 192.0.2.0/24"),
    ("192.0.2.2/24", "2001:db8::1", "not a router"),
    ("192.0.2.2/32", "192.0.2.1", "not a router on 192.0.2.2/32"),
    ("192.0.2.2/24", "192.0.2.0", "not a router on 192.0.2.0/24"),  # the network's own
    ("192.0.2.2/24", "192.0.2.255", "not a router on 192.0.2.0/24"),  # broadcast
])
def test_net_gateway_outside_its_subnet(addr, gw, needle):
    extra = (f'address = "{addr}"\n' if addr else "") + f'gateway = "{gw}"\n'
    m = err(f'[qubes.sys-net]\nkind = "net"\n{extra}')
    assert "field 'gateway'" in m and needle in m


@pytest.mark.parametrize("addr,gw", [("192.0.2.2/24", "192.0.2.1"),
                                     ("198.51.100.9/30", "198.51.100.10")])
def test_net_gateway_on_its_subnet(addr, gw):
    config.parse(f'[qubes.sys-net]\nkind = "net"\naddress = "{addr}"\ngateway = "{gw}"\n', SPECS)


def test_vpn_needs_type_and_config():
    m = err(BASE + '[qubes.vpn]\nkind = "vpn"\nnetvm = "sys-firewall"\ntype = "ipsec"\n')
    assert "field 'type'" in m


def test_missing_file():
    with pytest.raises(ConfigError) as e:
        config.load("/nonexistent/x.toml", SPECS)
    assert "cannot read" in str(e.value)


def test_app_home_is_persistent_or_ephemeral(tmp_path):
    from netstack.config import load
    from netstack.errors import ConfigError

    base = (ROOT / "configs" / "basic.toml").read_text()
    c = tmp_path / "c.toml"
    c.write_text(base.replace('[qubes.work]\n', '[qubes.work]\nhome = "ephemeral"\n'))
    t = load(str(c), SPECS)
    assert t.qubes[[q.name for q in t.qubes].index("work")].settings["home"] == "ephemeral"
    c.write_text(base.replace('[qubes.work]\n', '[qubes.work]\nhome = "tmp"\n'))
    with pytest.raises(ConfigError, match="qube 'work' field 'home'.*ephemeral"):
        load(str(c), SPECS)


@pytest.mark.parametrize("edit,says", [
    (('netvm = "sys-firewall"', "netvm = 5"), "field 'netvm': 5 must be a qube name"),
    (('netvm = "sys-firewall"', ""), "field 'netvm': missing"),
    (('kind = "app"', ""), "field 'kind': missing (fix: add kind = one of "),
    (('kind = "app"', 'kind = "vm"'), "field 'kind': 'vm' is not a kind"),
    (('kind = "app"', "kind = 5"), "field 'kind': 5 is not a kind"),
])
def test_a_wrong_or_missing_field_says_which(edit, says):
    """`netvm = 5` is not "missing", a missing kind is not "None is not a kind"."""
    m = err(BASE.replace(*edit))
    assert says in m and "None" not in m, m


def test_a_vpn_qube_missing_its_type_or_config_says_so():
    vpn = BASE + '[qubes.vpn]\nkind = "vpn"\nnetvm = "sys-firewall"\n'
    assert "field 'type': missing" in err(vpn)
    assert "field 'config': missing" in err(vpn + 'type = "wireguard"\n')
    assert "field 'config': 5 must be a path" in err(vpn + 'type = "wireguard"\nconfig = 5\n')


def test_a_bare_name_is_a_config_of_the_host_then_a_shipped_one(tmp_path, monkeypatch):
    etc, shipped = tmp_path / "etc", tmp_path / "shipped"
    etc.mkdir()
    shipped.mkdir()
    (shipped / "basic.toml").write_text("x")
    monkeypatch.setenv("NETSTACK_CONFIG_DIR", str(etc))
    monkeypatch.chdir(tmp_path)
    assert config.resolve("basic", shipped) == str(shipped / "basic.toml")
    (etc / "basic.toml").write_text("y")  # the host's own wins over the shipped one
    assert config.resolve("basic", shipped) == str(etc / "basic.toml")
    (tmp_path / "basic").write_text("z")  # a file of that name here is that file
    assert config.resolve("basic", shipped) == "basic"
    for given in ("./x.toml", "x.toml", "a/b", "Bad Name"):  # paths stay paths
        assert config.resolve(given, shipped) == given
    with pytest.raises(ConfigError) as e:
        config.resolve("nosuch", shipped)
    assert f"put it at {etc}/nosuch.toml" in str(e.value) and "\n" not in str(e.value)
