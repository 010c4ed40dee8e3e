"""Templates (issue 28 item 3) with a real Debian root, real overlays and real packets
(root): a qube with `template = NAME` sees the template as its root; a file root inside it
writes in /usr is there for that command and gone for the next (the qube's "restart":
every command gets a fresh throw-away overlay), the template unchanged; its home persists;
a qube without `template` keeps the host's view. `template update` runs apt in the template
with its only way out through the named qube: the lab's apt repository (a lab host)
sees only Tor exits and the ISP link carries none of its requests in clear; the anti-test
sends the update through sys-firewall instead and sees both, so the capture is not blind.

The template is copied from a cached minbase root (`template create --from`), made once
with `netstack template create` (mmdebstrap, about 2 minutes) and kept in
NETSTACK_TEMPLATE_CACHE (default /var/cache/netstack-templates/bookworm-minbase; delete it
to build it again). Every template and stack a test makes is removed."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netstack.leaktest.capture import Capture
from tests.integration.util import (
    cli,
    load_state,
    new_stack_name,
    reap_zombies,
    stack_leftovers,
    wait_for,
)

pytestmark = pytest.mark.root

CACHE = os.environ.get("NETSTACK_TEMPLATE_CACHE",
                       "/var/cache/netstack-templates/bookworm-minbase")
TEMPLATES = "/var/lib/netstack/templates"
REPO_PORT = 8080


@pytest.fixture(scope="module")
def cached_root() -> str:
    """A Debian minbase root, built by `netstack template create` the first time."""
    if not os.path.isfile(os.path.join(CACHE, "usr/bin/apt-get")):
        name = "tpbuild" + secrets.token_hex(2)
        try:
            cli("template", "create", name, "--variant", "minbase", timeout=1200)
            os.makedirs(os.path.dirname(CACHE), exist_ok=True)
            shutil.rmtree(CACHE, ignore_errors=True)
            os.rename(f"{TEMPLATES}/{name}/root", CACHE)
        finally:
            shutil.rmtree(f"{TEMPLATES}/{name}", ignore_errors=True)
    return CACHE


@pytest.fixture(scope="module")
def template(cached_root):
    name = "tp" + secrets.token_hex(3)
    cli("template", "create", name, "--from", cached_root, timeout=300)
    try:
        yield name
    finally:
        cli("template", "remove", name, check=False)
        assert not os.path.exists(f"{TEMPLATES}/{name}")
        assert not os.path.exists(f"{TEMPLATES}/.skel/{name}")


CONFIG = """
[qubes.sys-net]
kind = "net"

[qubes.sys-firewall]
kind = "firewall"
netvm = "sys-net"

[qubes.sys-whonix]
kind = "tor"
netvm = "sys-firewall"

[qubes.anon-whonix]
kind = "app"
netvm = "sys-whonix"
template = "{template}"

[qubes.personal]
kind = "app"
netvm = "sys-firewall"
"""


@pytest.fixture(scope="module")
def stack(template, tmp_path_factory):
    cfg = tmp_path_factory.mktemp("tmpl") / "tor-templated.toml"
    cfg.write_text(CONFIG.format(template=template))
    s = new_stack_name("tm")
    cli("--stack", s, "up", str(cfg), "--lab", timeout=300)
    try:
        yield s
    finally:
        cli("--stack", s, "down", "--purge", check=False)
        reap_zombies()
        assert not stack_leftovers(s)


def run(stack: str, qube: str, script: str, root: bool = False) -> subprocess.CompletedProcess:
    return cli("--stack", stack, "exec", qube, *(["--root"] if root else []), "--", "sh",
               "-c", script, check=False)


def test_root_changes_vanish_with_the_command_and_the_template_stays(stack, template):
    troot = Path(f"{TEMPLATES}/{template}/root")
    before = sorted(os.listdir(troot / "usr"))
    mark = secrets.token_hex(4)
    p = run(stack, "anon-whonix", f"echo {mark} > /usr/probe && cat /usr/probe && "
            f"echo {mark} > /usr/bin/probe2 && rm /usr/bin/apt-get && echo removed", root=True)
    assert p.returncode == 0 and p.stdout.split() == [mark, "removed"], p.stderr
    assert not (troot / "usr/probe").exists() and (troot / "usr/bin/apt-get").exists()
    assert not Path("/usr/probe").exists()
    p = run(stack, "anon-whonix", "ls /usr/probe /usr/bin/probe2; test -x /usr/bin/apt-get "
            "&& echo apt-get back", root=True)
    assert "No such file" in p.stderr and p.stdout.strip() == "apt-get back", p.stdout
    assert sorted(os.listdir(troot / "usr")) == before
    # without --root the template is read-only, as a Qubes user without sudo finds it
    p = run(stack, "anon-whonix", "echo x > /usr/probe")
    assert p.returncode != 0 and "Permission denied" in p.stderr
    # the home persists across commands; the qube's own names and resolvers are bound in
    assert run(stack, "anon-whonix", f"echo {mark} > ~/kept").returncode == 0
    p = run(stack, "anon-whonix", "cat ~/kept; cat /etc/resolv.conf; hostname")
    assert p.stdout.splitlines()[0] == mark and "nameserver 10.139.1.1" in p.stdout
    assert p.stdout.splitlines()[-1] == "anon-whonix"
    # the template's root, not the host's: python3 is the host's only (minbase has none)
    assert Path("/usr/bin/python3").exists()
    assert run(stack, "anon-whonix", "test -e /usr/bin/python3").returncode == 1
    assert run(stack, "personal", "test -e /usr/bin/python3").returncode == 0
    # nothing of a command's overlay is left mounted on the host
    assert "netstack-root" not in Path("/proc/self/mountinfo").read_text()


def test_a_missing_template_is_one_line_naming_the_field(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG.format(template="tp-none"))
    s = new_stack_name("tm")
    p = cli("--stack", s, "up", str(cfg), "--lab", check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "qube 'anon-whonix' field 'template': no template 'tp-none'" in p.stderr
    assert "netstack template create tp-none" in p.stderr and not stack_leftovers(s)


def _repo(d: Path) -> None:
    """A flat apt repository with one package, netstack-lab-hello (a lab host serves it)."""
    pkg = d / "build"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "usr/share/netstack-lab-hello").mkdir(parents=True)
    (pkg / "usr/share/netstack-lab-hello/stamp").write_text("from the lab repository\n")
    (pkg / "DEBIAN/control").write_text(
        "Package: netstack-lab-hello\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: netstack tests <tests@lab.test>\nDescription: a lab package\n")
    repo = d / "repo"
    repo.mkdir()
    deb = repo / "netstack-lab-hello_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(pkg), str(deb)],
                   check=True, capture_output=True)
    packages = subprocess.run(["dpkg-scanpackages", "--multiversion", "."], cwd=repo,
                              check=True, capture_output=True, text=True).stdout
    (repo / "Packages").write_text(packages)
    body = (repo / "Packages").read_bytes()
    (repo / "Release").write_text(
        "Origin: netstack-lab\nLabel: netstack-lab\nSuite: lab\nCodename: lab\n"
        f"SHA256:\n {hashlib.sha256(body).hexdigest()} {len(body)} Packages\n")


def _serve(ns: str, addr: str, repo: Path, log: Path) -> subprocess.Popen:
    p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "http.server",
                          str(REPO_PORT), "--bind", addr, "--directory", str(repo)],
                         stdout=subprocess.DEVNULL, stderr=open(log, "w"))  # noqa: SIM115
    wait_for(lambda: subprocess.run(["ip", "netns", "exec", ns, "ss", "-ltn"],
                                    capture_output=True, text=True).stdout.count(
        f"{addr}:{REPO_PORT}"), 10, 0.05, "the lab repository to listen")
    return p


def _clients(log: Path) -> set[str]:
    return {line.split(" ", 1)[0] for line in log.read_text().splitlines()
            if '"GET ' in line}


def _to_repo(cap: Capture, addr: str) -> int:
    from scapy.layers.inet import IP, TCP

    return sum(1 for p in cap.packets() if IP in p and TCP in p and p[IP].dst == addr
               and p[TCP].dport == REPO_PORT)


def test_an_update_leaves_only_through_the_named_qube(stack, template, tmp_path):
    plan = load_state(stack).plan
    lab, troot = plan.lab, Path(f"{TEMPLATES}/{template}/root")
    web = lab.hosts["web"]
    _repo(tmp_path)
    (troot / "etc/apt/sources.list").write_text(
        f"deb [trusted=yes] http://{web.address}:{REPO_PORT}/ ./\n")
    for f in (troot / "etc/apt/sources.list.d").glob("*"):
        f.unlink()
    log = tmp_path / "repo.log"
    server = _serve(web.netns, web.address, tmp_path / "repo", log)
    try:
        isp = Capture(lab.isp_link.netns, lab.isp_link.interface, str(tmp_path / "isp.pcap"))
        isp.start()
        t0 = time.monotonic()
        # through the stack's most private path (its Tor gateway): no --via, no updatevm
        p = cli("--stack", stack, "template", "update", template, "--install",
                "netstack-lab-hello", "--json", check=False, timeout=600)
        took = time.monotonic() - t0
        assert p.returncode == 0, p.stderr[-3000:]
        assert '"via": "sys-whonix"' in p.stdout, p.stdout
        assert (troot / "usr/share/netstack-lab-hello/stamp").exists()
        clients = _clients(log)
        assert clients and clients <= lab.exits, (clients, lab.exits)
        assert _to_repo(isp, web.address) == 0  # nothing for the repository in clear
        print(f"update through Tor: {took:.1f} s, repository clients {sorted(clients)}")
        # the update's disposable is gone again
        assert [q.name for q in load_state(stack).plan.qubes if q.settings.get("disposable")
                ] == []

        # anti-test: through sys-firewall the repository sees sys-net's ISP address and
        # the same capture sees the requests in clear
        log.write_text("")
        isp2 = Capture(lab.isp_link.netns, lab.isp_link.interface,
                       str(tmp_path / "isp2.pcap"))
        isp2.start()
        p = cli("--stack", stack, "template", "update", template, "--via", "sys-firewall",
                check=False, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        assert _clients(log) == {lab.isp_link.address}, _clients(log)
        assert _to_repo(isp2, web.address) > 0
    finally:
        server.terminate()
        server.wait(5)


def test_a_template_in_use_is_not_removed_and_status_names_it(stack, template):
    import json

    p = cli("template", "remove", template, check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert f"template {template!r} is in use by qube 'anon-whonix' of stack {stack!r}" \
        in p.stderr and os.path.isdir(f"{TEMPLATES}/{template}/root")
    doc = json.loads(cli("--stack", stack, "status", "--json", check=False).stdout)
    q = {x["name"]: x for x in doc["qubes"]}
    assert q["anon-whonix"]["template"] == template and "template" not in q["personal"]


def test_a_workstation_template_and_its_workstation_environment(stack, cached_root):
    """`--profile whonix-workstation` from a copied root: Whonix's UTC in the root a qube
    sees, the profile's packages left for the next update (through the stack, never the
    host), named by `template list`; and the workstation behind the Tor gateway gets Tor
    Browser's environment (no tor of its own, the gateway's SOCKS and filtered control
    port)."""
    import json

    name = "tw" + secrets.token_hex(3)
    p = cli("template", "create", name, "--from", cached_root, "--profile",
            "whonix-workstation", timeout=300)
    try:
        assert "installed by the next `netstack template update" in p.stdout
        root = Path(f"{TEMPLATES}/{name}/root")
        assert (root / "etc/timezone").read_text() == "Etc/UTC\n"
        listed = {t["name"]: t for t in json.loads(cli("template", "list", "--json").stdout)}
        assert listed[name]["profile"] == "whonix-workstation"
        assert "libgtk-3-0" in listed[name]["wanted"] and listed[name]["include"] == []
    finally:
        cli("template", "remove", name, check=False)
    env = dict(line.split("=", 1) for line in run(stack, "anon-whonix", "env").stdout
               .splitlines() if "=" in line)
    gw = load_state(stack).plan.qube("sys-whonix").ipv4
    assert env["TOR_SKIP_LAUNCH"] == "1" and env["TOR_SOCKS_HOST"] == gw
    assert (env["TOR_CONTROL_HOST"], env["TOR_CONTROL_PORT"]) == (gw, "9051")
    assert env["TORSOCKS_TOR_ADDRESS"] == gw
    assert "TOR_SKIP_LAUNCH" not in run(stack, "personal", "env").stdout
