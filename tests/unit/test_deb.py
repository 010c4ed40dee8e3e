"""The Debian package (scripts/build-deb), built once here, unprivileged as far as
dpkg-deb goes: it holds what a system tool needs (the command, its own Python environment
with the two vendored libraries, a man page per command, bash and zsh completion, the
template unit, /etc/netstack, /var/lib/netstack, the shipped configs), declares Debian's
packages for the rest, and runs from its files: extracted (`dpkg-deb -x`) into a temporary
directory its environment's python imports netstack and the vendored pyroute2 from there,
`--help` works, every page renders with man without a warning, and the installed
completion hook completes through it. Installed with dpkg and run under systemd:
tests/host/test_deb.py in scripts/test-host's VM."""

from __future__ import annotations

import gzip
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from importlib.machinery import SourceFileLoader
from pathlib import Path

import pytest

from netstack import cli, completion, service

ROOT = Path(__file__).resolve().parents[2]
BUILD_DEB = ROOT / "scripts" / "build-deb"

pytestmark = pytest.mark.skipif(not shutil.which("dpkg-deb"), reason="dpkg-deb not installed")


def load_build_deb():
    loader = SourceFileLoader("build_deb", str(BUILD_DEB))
    spec = importlib.util.spec_from_loader("build_deb", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    p = subprocess.run([sys.executable, str(BUILD_DEB), "--out", str(out),
                        "--python", sys.executable], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    return Path(p.stdout.strip())


@pytest.fixture(scope="module")
def extracted(deb, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True,
                          text=True, check=True).stdout.strip()


def test_the_files_of_a_system_tool(deb):
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                             check=True).stdout
    files = {line.split()[5].removeprefix(".") for line in listing.splitlines()}
    modes = {line.split()[5].removeprefix("."): line.split()[0] for line in listing.splitlines()}
    owners = {line.split()[1] for line in listing.splitlines()}
    assert owners == {"root/root"}
    py = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    site = f"/usr/lib/netstack/lib/{py}/site-packages"
    must = {"/usr/bin/netstack", "/usr/lib/netstack/pyvenv.cfg", "/usr/lib/netstack/bin/python3",
            f"{site}/netstack/cli.py", f"{site}/netstack/tor/control_allowlist.json",
            f"{site}/pyroute2/__init__.py", f"{site}/argcomplete/__init__.py",
            "/lib/systemd/system/netstack@.service", "/etc/netstack/", "/var/lib/netstack/",
            "/usr/share/bash-completion/completions/netstack",
            "/usr/share/zsh/vendor-completions/_netstack",
            "/usr/share/netstack/configs/tor-over-vpn.toml",
            "/usr/share/netstack/configs/policy.d/90-default.policy",
            "/usr/share/doc/netstack/copyright", "/usr/share/doc/netstack/README.md"}
    pages = {f"/usr/share/man/man1/{n}.gz"
             for n in completion.man_pages(cli.parser(), "0", "2026-01-01")}
    assert len(pages) > 10
    assert must | pages <= files, sorted((must | pages) - files)
    assert modes["/usr/bin/netstack"] == "-rwxr-xr-x"
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]  # postinst makes
    # every module of the checkout's package is in it
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "netstack"],
                             capture_output=True, text=True).stdout.split()
    if tracked:
        missing = [t for t in tracked if f"{site}/{t}" not in files]
        assert not missing, missing


def test_dependencies_declared(deb):
    dep = field(deb, "Depends")
    names = {re.sub(r"\s*\(.*", "", d.strip()) for d in dep.split(",")}
    for n in ("python3-stem", "python3-scapy", "python3-prometheus-client",
              "python3-nftables", "python3-seccomp", "nftables", "iproute2", "bubblewrap",
              "tor", "wireguard-tools", "openvpn"):
        assert n in names, dep
    # vendored, not Debian 12's older ones
    assert "python3-pyroute2" not in names and "python3-argcomplete" not in names
    assert "python3-stem (>= 1.8)" in dep and "python3 (>= 3.11)" in dep
    assert field(deb, "Architecture") == "all"
    for script in ("postinst", "prerm", "postrm"):
        assert subprocess.run(["dpkg-deb", "-I", str(deb), script],
                              capture_output=True).returncode == 0


def test_every_python_dependency_is_mapped_and_the_vm_gets_the_missing():
    """A new dependency in pyproject.toml fails here until build-deb says where it comes
    from; the Debian packages build-deb depends on that scripts/setup.sh does not install
    (so the VM image lacks them) are the ones tests/host/stage-deb.sh fetches."""
    bd = load_build_deb()
    import tomllib

    reqs = bd.requirements(tomllib.loads((ROOT / "pyproject.toml").read_text()))
    assert set(reqs) == set(bd.DEBIAN_PYTHON)
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    pkgs = set(re.search(r"PKGS=\((.*?)\)", setup, re.S).group(1).split())
    declared = {d for d in bd.DEBIAN_PYTHON.values() if d} | set(bd.DEPENDS)
    staged = set(re.search(r"DEPS=\((.*?)\)", (ROOT / "tests/host/stage-deb.sh").read_text(),
                           re.S).group(1).split())
    assert declared - pkgs <= staged, declared - pkgs - staged


def test_satisfies():
    bd = load_build_deb()
    assert bd.satisfies("0.9.7", ">=0.9,<0.10") and not bd.satisfies("0.7.2", ">=0.9,<0.10")
    assert not bd.satisfies("0.10.1", ">=0.9,<0.10") and bd.satisfies("3.7.2", ">=3")


def test_runs_from_its_own_files(extracted):
    """The package's python (a venv laid out by hand) finds netstack and the vendored
    pyroute2 in the package: the checkout is nowhere on its path."""
    py = extracted / "usr/lib/netstack/bin/python3"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    p = subprocess.run([str(py), "-c", "import sys, netstack, pyroute2; "
                        "from importlib.metadata import version; "
                        "print(sys.prefix); print(netstack.__file__); print(pyroute2.__file__);"
                        "print(version('argcomplete'))"],
                       capture_output=True, text=True, env=env, cwd="/", check=True)
    prefix, ns, pr, ac = p.stdout.split()
    lib = str(extracted / "usr/lib/netstack")
    assert prefix == lib and ns.startswith(lib) and pr.startswith(lib) and ac.startswith("3.")
    h = subprocess.run([str(py), str(extracted / "usr/bin/netstack"), "--help"],
                       capture_output=True, text=True, env=env, cwd="/")
    assert h.returncode == 0 and h.stdout.startswith("usage: netstack"), h.stderr
    assert (extracted / "usr/bin/netstack").read_text().startswith(
        "#!/usr/lib/netstack/bin/python3\n")


def test_man_pages_render_without_warnings(extracted):
    if not shutil.which("man"):
        pytest.skip("man-db not installed")
    pages = sorted((extracted / "usr/share/man/man1").glob("*.1.gz"))
    for page in pages:
        assert gzip.decompress(page.read_bytes()).startswith(b".TH NETSTACK")
        p = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True,
                           text=True, env={"MANPAGER": "cat", "PATH": "/usr/bin:/bin",
                                           "MANWIDTH": "80"})
        assert p.returncode == 0 and "netstack" in p.stdout, (page, p.stderr)
        assert not p.stderr.strip(), (page.name, p.stderr)
    fw = subprocess.run(["man", "-l", str(extracted / "usr/share/man/man1/netstack-firewall.1.gz")],
                        capture_output=True, text=True,
                        env={"MANPAGER": "cat", "PATH": "/usr/bin:/bin", "MANWIDTH": "80"})
    assert "netstack-firewall - a qube's firewall rules" in fw.stdout


def test_installed_completion_hook_completes_through_the_command(extracted, tmp_path):
    """bash sources the installed hook; TAB runs `netstack` (here a stand-in for
    /usr/bin/netstack that runs the extracted one): a subcommand completes."""
    shim = tmp_path / "bin" / "netstack"
    shim.parent.mkdir()
    shim.write_text(f"#!/bin/sh\nexec {extracted}/usr/lib/netstack/bin/python3 "
                    f"{extracted}/usr/bin/netstack \"$@\"\n")
    shim.chmod(0o755)
    hook = extracted / "usr/share/bash-completion/completions/netstack"
    assert hook.read_text() == (extracted / "usr/share/zsh/vendor-completions/_netstack"
                                ).read_text()
    assert hook.read_text().startswith("#compdef netstack")  # zsh's fpath wants this line
    script = (f"source {hook}\nCOMP_LINE='netstack firew'\nCOMP_POINT=${{#COMP_LINE}}\n"
              "COMP_WORDS=(netstack firew) COMP_CWORD=1 COMP_TYPE=9\n"
              "_python_argcomplete netstack\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{shim.parent}:/usr/bin:/bin"
    p = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], capture_output=True,
                       text=True, env=env, timeout=60)
    assert [w.strip() for w in p.stdout.split()] == ["firewall"], (p.stdout, p.stderr)


def test_template_unit(extracted, tmp_path):
    text = (extracted / "lib/systemd/system/netstack@.service").read_text()
    assert text == service.template_text()
    assert "ExecStart=/usr/bin/netstack --stack %i up %i $NETSTACK_UP_OPTIONS" in text
    assert "EnvironmentFile=/etc/netstack/%i.env" in text  # required: no uplink, no chain
    assert "RestartPreventExitStatus=2" in text
    if shutil.which("systemd-analyze"):
        exe = tmp_path / "netstack"
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
        unit = tmp_path / "netstack@work.service"
        unit.write_text(service.template_text(str(exe), str(tmp_path)))
        (tmp_path / "work.env").write_text("NETSTACK_UP_OPTIONS=--lab\n")
        # --man=no: the pages it names are the package's, not on this host
        p = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                           capture_output=True, text=True)
        assert p.returncode == 0 and not (p.stdout + p.stderr).strip(), p.stdout + p.stderr
        unit.write_text(service.template_text(str(exe), str(tmp_path)).replace(
            "Type=notify", "Type=nosuch"))  # and it does catch a broken one
        p = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                           capture_output=True, text=True)
        assert "nosuch" in p.stdout + p.stderr
