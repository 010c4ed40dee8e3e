"""The README's two commands on a fresh Debian (issue 27 item 2), inside scripts/test-host's
VM: the image is Debian 12 made by mmdebstrap with the project installed by the README's own
set-up step, so this is what a new user gets. `scripts/netstack up --lab` brings up Tor over
VPN (the default config), a page comes back through the chain from the workstation, and
`down` leaves the host as it was; `scripts/test` passes its unit suite and the integration
tests marked `fresh_host` (tests/conftest.py: a small representative set). The VM has no
network, as the README's set-up step needs none once it ran (the image built it).

Everything runs under TCG here (software emulation): the times printed are the VM's,
several times the development machine's (docs/benchmarks.md, docs/field-notes.md)."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import time

import pytest

from tests.host.test_host import NETSTACK, ROOT, diagnose, host_view, sh
from tests.integration.util import load_state, reap_zombies, stack_leftovers, wait_for

pytestmark = pytest.mark.root

STACK = "main"  # the README's commands name no stack
VPN_SERVER = "203.0.113.10"


def _tor_unit() -> tuple[str, str]:
    en = sh("systemctl", "is-enabled", "tor.service", check=False).stdout.strip()
    act = sh("systemctl", "is-active", "tor@default.service", check=False).stdout.strip()
    return en, act


def test_setup_switched_off_the_tor_service_it_installed_and_leaves_a_users_tor_alone():
    """Debian's tor package enables tor.service, whose tor@default is a system Tor in the
    root namespace, started at every boot (docs/field-notes.md, seen in an earlier image).
    The image's setup.sh installed tor, so it disabled that service: this boot has none.
    Then a user's own tor (enabled and running before setup.sh runs, tor already
    installed): setup.sh, run again as `scripts/test` runs it (offline), leaves it as it
    is. The set-up's time offline is printed."""
    assert _tor_unit() == ("disabled", "inactive")
    sh("systemctl", "enable", "--now", "tor.service", timeout=120)
    try:
        # the anti-test: the user's tor runs (tor.service pulls tor@default in)
        wait_for(lambda: _tor_unit() == ("enabled", "active"), 120, 0.5, "tor@default active")
        t0 = time.monotonic()
        p = sh(str(ROOT / "scripts" / "setup.sh"), check=False, timeout=600)
        took = time.monotonic() - t0
        print(f"scripts/setup.sh offline, nothing changed: {took:.1f} s -> {p.returncode}")
        assert p.returncode == 0 and "setup: ok" in p.stdout, p.stdout + p.stderr
        assert _tor_unit() == ("enabled", "active")
    finally:
        sh("systemctl", "disable", "--now", "tor.service", check=False, timeout=120)
    assert _tor_unit() == ("disabled", "inactive")


def test_readme_up_lab_fetches_a_page_through_tor_over_vpn_and_down_leaves_nothing():
    """The README's first command, word for word (`sudo` aside: the VM's runner is root),
    then its `exec anon-whonix -- curl http://web.lab.test/`, which prints a Tor exit's
    address, and `down`."""
    before = host_view()
    t0 = time.monotonic()
    try:
        # the README's command; only the readiness deadlines are longer (defaults: VPN 30 s,
        # Tor 120 s), as Python and tor under TCG on a loaded 2-core host are many times
        # slower than on a laptop: the time it took is printed
        p = sh(NETSTACK, "up", "--lab", "--vpn-timeout", "300", "--tor-timeout", "900",
               check=False, timeout=1500)
        up_s = time.monotonic() - t0
        if p.returncode != 0:
            diagnose(STACK, "readme-up")
        assert p.returncode == 0, f"up --lab -> {p.returncode}\n{p.stdout}\n{p.stderr}"
        cfg = load_state(STACK).plan
        assert {q.name for q in cfg.qubes} >= {"sys-net", "sys-firewall", "sys-proxyvm",
                                              "sys-whonix", "anon-whonix"}
        exits = set(cfg.lab.exits)
        st = sh(NETSTACK, "status", check=False)
        assert st.returncode == 0, st.stdout + st.stderr  # up, not degraded
        # Streams can fail for a few seconds after 100 % (docs/field-notes.md, Tor): retry
        # the README's fetch with a deadline.
        t1 = time.monotonic()
        got, tries = "", 0
        while time.monotonic() - t1 < 300:  # (TCG beside other VMs: one try took > 60 s)
            tries += 1
            try:
                f = sh(NETSTACK, "exec", "anon-whonix", "--", "curl", "-sS", "--max-time",
                       "30", "http://web.lab.test/", check=False, timeout=180)
            except subprocess.TimeoutExpired:
                continue
            got = f.stdout.strip()
            if f.returncode == 0:
                break
            time.sleep(1)
        fetch_s = time.monotonic() - t1
        ipaddress.ip_address(got)  # the lab web server answers with the address it saw
        assert got in exits, f"{got!r} is not one of the lab's Tor exits {sorted(exits)}"
        assert got != VPN_SERVER
        print(f"README up --lab {up_s:.1f} s; first page through Tor {fetch_s:.1f} s "
              f"({tries} tries): {got}")
    finally:
        t2 = time.monotonic()
        d = sh(NETSTACK, "down", check=False, timeout=300)
        print(f"down {time.monotonic() - t2:.1f} s -> {d.returncode} {d.stderr.strip()}")
        reap_zombies()
    assert d.returncode == 0, d.stderr
    # plain `down` keeps what outlives a stack (README): the Tor gateway's kept directory
    # (its onion keys, tor's state) under /var/lib/netstack/STACK; `--purge` below takes it
    assert [x for x in stack_leftovers(STACK) if x != f"/var/lib/netstack/{STACK}"] == []
    assert host_view() == before
    # `down` keeps the lab's private Tor network for the next `up --lab` (README); --purge
    # removes it and must leave nothing more either
    assert os.path.isdir("/var/lib/netstack/lab-tor")
    sh(NETSTACK, "down", "--purge", check=False, timeout=300)
    assert not os.path.exists("/var/lib/netstack/lab-tor") or not os.listdir(
        "/var/lib/netstack/lab-tor")
    assert not stack_leftovers(STACK)


SUITE = ["-q", "-m", "not root or fresh_host", "--durations=15", "tests/unit",
         "tests/integration"]


def _run_suite(argv: list[str], name: str, timeout: float) -> tuple[int, str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NETSTACK_")}
    env["NETSTACK_TEST_STACK_PREFIX"] = "fh"
    t0 = time.monotonic()
    p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    took = time.monotonic() - t0
    out = p.stdout + p.stderr
    print(out[-6000:])
    print(f"{name} took {took:.1f} s -> {p.returncode}")
    out_dir = os.environ.get("NETSTACK_TEST_HOST_OUT")
    if out_dir:
        with open(os.path.join(out_dir, f"{name}.log"), "w") as f:
            f.write(out)
    return p.returncode, out, took


def _passed(rc: int, out: str) -> None:
    assert rc == 0, out[-4000:]
    last = [x for x in out.splitlines() if re.search(r"\d+ passed", x)]
    assert last and "failed" not in last[-1] and "error" not in last[-1], last
    # root tests were collected and ran (NETSTACK_REQUIRE_ROOT=1): none skipped
    assert "skipped" not in last[-1], last[-1]


def test_readme_scripts_test_passes_unit_and_fresh_host_tests():
    """The README's second command as it is: `scripts/test` (scripts/setup.sh, then ruff,
    then pytest with root tests required), given the unit suite and the integration tests
    marked `fresh_host`. Offline, as the VM is: setup.sh goes to PyPI only when the venv's
    stamp says pyproject.toml or setup.sh changed since it was made (the image made it).
    Bounded: the whole suite under TCG would take hours."""
    rc, out, _ = _run_suite([str(ROOT / "scripts" / "test"), *SUITE],
                            "scripts-test", 3600)
    _passed(rc, out)
    assert "setup: ok" in out, out[:2000]
