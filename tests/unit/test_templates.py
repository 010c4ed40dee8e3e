"""Templates' pure parts (no root): the config's `template` and `[stack] updatevm` fields
with one-line errors naming the field and the fix; the sandbox's command line with a
template (the overlay mounted first, as root in the command's own mount namespace, then
the template as `/` with the qube's own names bound over its /etc; no host /usr); the
skeleton of a template's directories; the update's way out; package names checked."""

from __future__ import annotations

import os

import pytest

from netstack import sandbox, template_cmd, templates
from netstack.config import parse
from netstack.errors import ConfigError, UsageError
from netstack.kinds.registry import SPECS
from netstack.plan import build
from tests.unit.test_reconcile import LAB, ROOT

TOR = (ROOT / "configs/tor.toml").read_text().replace('bridges = ["lab:obfs4"]\n', "")


def test_a_template_name_is_checked_in_one_line():
    t = TOR.replace('[qubes.anon-whonix]\n', '[qubes.anon-whonix]\ntemplate = "Deb 12"\n')
    with pytest.raises(ConfigError) as e:
        parse(t, SPECS)
    assert e.value.where == "qube 'anon-whonix' field 'template'" and "a-z" in e.value.fix
    t = TOR.replace('[qubes.anon-whonix]\n', '[qubes.anon-whonix]\ntemplate = "deb"\n')
    assert parse(t, SPECS)["anon-whonix"].settings["template"] == "deb"
    t = TOR.replace('[qubes.sys-whonix]\n', '[qubes.sys-whonix]\ntemplate = "deb"\n')
    with pytest.raises(ConfigError, match="unknown key 'template'"):
        parse(t, SPECS)  # service qubes are netstack's own: no template


def test_updatevm_must_provide_network():
    assert build(parse('[stack]\nupdatevm = "sys-firewall"\n' + TOR, SPECS), "main",
                 LAB).updatevm == "sys-firewall"
    with pytest.raises(ConfigError) as e:
        parse('[stack]\nupdatevm = "anon-whonix"\n' + TOR, SPECS)
    assert e.value.where == "[stack] field 'updatevm'" and "sys-whonix" in e.value.fix


def test_the_update_goes_through_the_most_private_path_unless_told():
    p = build(parse(TOR, SPECS), "main", LAB)
    assert template_cmd.update_via(p, None) == ("sys-whonix", "the most private path (no "
                                                "[stack] updatevm)")
    assert template_cmd.update_via(p, "sys-firewall") == ("sys-firewall", "--via")
    p.updatevm = "sys-net"
    assert template_cmd.update_via(p, None) == ("sys-net", "[stack] updatevm")
    with pytest.raises(UsageError, match="--via 'anon-whonix': not a qube"):
        template_cmd.update_via(p, "anon-whonix")


@pytest.mark.parametrize("bad", ["curl;rm", "Curl", "a b", "-o"])
def test_package_names_are_checked(bad):
    with pytest.raises(UsageError, match="not a Debian package name"):
        template_cmd.packages(f"ca-certificates,{bad}")
    assert template_cmd.packages("curl,ca-certificates,libc6-dev") == [
        "curl", "ca-certificates", "libc6-dev"]


def test_the_sandbox_mounts_the_overlay_first_and_takes_it_as_root():
    who = sandbox.Account("u", 1000, 1000)
    argv = sandbox.argv("nst-main-work", "work", who, "/h", ["true"], template="/t/root")
    i = argv.index("sh")
    assert argv[:4] == ["ip", "netns", "exec", "nst-main-work"] and i == 4
    assert argv[i + 3:i + 6] == ["netstack-root", "/t/root", templates.MOUNT_POINT]
    assert argv[i + 6] == "setpriv"  # the account only after the mounts
    bw = argv[argv.index("bwrap"):]
    assert bw[bw.index("--bind") + 1:bw.index("--bind") + 3] == [
        f"{templates.MOUNT_POINT}/root", "/"]
    home = bw.index("/h")
    assert "/usr" not in bw and "--tmpfs" in bw
    assert bw[home - 1:home + 2] == ["--bind", "/h", "/home/user"]
    plain = sandbox.argv("nst-main-work", "work", who, "/h", ["true"])
    usr = plain.index("/usr")
    assert "sh" not in plain[:6] and plain[usr - 1:usr + 2] == ["--ro-bind", "/usr", "/usr"]


def test_the_skeleton_has_every_directory_owned_by_the_account(tmp_path, monkeypatch):
    monkeypatch.setattr(templates, "TEMPLATE_ROOT", str(tmp_path))
    r = tmp_path / "deb" / "root"
    (r / "usr/bin").mkdir(parents=True)
    (r / "root").mkdir(mode=0o700)
    (r / "usr/bin/ls").write_text("x")
    (r / "lib").symlink_to("usr/lib")
    templates.prepare(str(r))
    (tmp_path / "deb" / templates.META).write_text("{}")
    uid, gid = os.getuid(), os.getgid()
    sk = templates.lowers("deb", uid, gid, root_inside=True).split(":")[0]
    got = sorted(os.path.relpath(d, sk) for d, _s, _f in os.walk(sk))
    assert "usr/bin" in got and "home/user" in got and "lib" not in got
    assert not any(f for _d, _s, f in os.walk(sk))  # directories only
    assert oct(os.stat(os.path.join(sk, "root")).st_mode & 0o777) == "0o700"
    assert templates.lowers("deb", uid, gid, root_inside=False) == str(r)
    for f in templates.NEEDED_FILES:
        assert (r / f).is_file()
    templates.drop_skeletons("deb")
    assert not os.path.exists(sk)
    with pytest.raises(UsageError, match="template 'nope' does not exist .*template create "
                       "nope"):
        templates.lowers("nope", uid, gid, False)


def test_a_disposable_like_a_templated_qube_runs_on_its_template(tmp_path, monkeypatch):
    from netstack import disposable
    from tests.unit.test_disposable import up

    monkeypatch.setattr("netstack.names.RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(sandbox, "HOME_ROOT", str(tmp_path / "lib"))
    cfg = tmp_path / "c.toml"
    cfg.write_text(TOR.replace('[qubes.anon-whonix]\n',
                               '[qubes.anon-whonix]\ntemplate = "deb"\n'))
    fk, _ = up(str(cfg))
    d = disposable.add("main", None, None, kernel=fk, like="anon-whonix")
    assert d.settings["template"] == "deb" and d.netvm == "sys-whonix"
    assert "template" not in disposable.add("main", "sys-firewall", "red", kernel=fk).settings


def test_the_workstation_profile_is_tor_browsers_needs_and_whonix_defaults(tmp_path):
    """`--profile whonix-workstation`: every package a valid Debian name (what reaches
    mmdebstrap's --include or the update's apt), the root's clock zone UTC (a symlink
    replacing whatever the root had, never written through), and an unknown profile one
    line naming the choices."""
    prof = template_cmd.profile("whonix-workstation")
    assert prof is not None and template_cmd.profile(None) is None
    assert template_cmd.packages(",".join(prof.packages)) == list(prof.packages)
    assert {"libgtk-3-0", "libdbus-glib-1-2", "torsocks", "xz-utils"} <= set(prof.packages)
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.write_text("host's\n")
    (root / "etc/timezone").symlink_to(outside)  # a root's link must not be followed
    template_cmd.apply_profile(str(root), prof)
    assert (root / "etc/timezone").read_text() == "Etc/UTC\n" and \
        outside.read_text() == "host's\n"
    assert os.readlink(root / "etc/localtime") == "/usr/share/zoneinfo/Etc/UTC"
    with pytest.raises(UsageError, match="--profile 'tails': use one of whonix-workstation"):
        template_cmd.profile("tails")


def test_an_update_installs_what_was_asked_and_what_the_profile_still_wants():
    assert template_cmd.update_steps([]).endswith("dist-upgrade && apt-get clean")
    steps = template_cmd.update_steps(["curl", "torsocks"])
    assert "apt-get -y install curl torsocks && apt-get clean" in steps
    assert steps.startswith("apt-get update && ")
