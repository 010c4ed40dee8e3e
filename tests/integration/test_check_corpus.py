"""A corpus of real programs under `netstack check`, with the verdict, the program's exit
code and every flow's outcome expected per chain (issue 23 item 4):

- tor:   the shared Tor-over-VPN lab (`tor_lab`, up with --sink), workstation anon-whonix;
- vpn:   configs/vpn.toml, up once for this module with --lab --sink, workstation work;
- basic: configs/basic.toml, likewise, workstation work.

Programs: curl (plain HTTP to the lab's web host, HTTPS to a real-looking name the sink
answers with the lab CA, `--socks5-hostname` through the Tor gateway's SOCKS port), a
`git clone` over dumb HTTP and a `pip download` from the lab's files host (lab/content.py),
`dig` through the qube's resolver and straight at a lab resolver, and headless Chromium
opening a lab page whose WebRTC offer sends STUN to the lab's STUN server (lab/stun.py):
behind Tor the STUN flow is stopped by sys-whonix, behind the VPN it leaves through it.
The README's and docs/ci.md's `netstack check` examples are run verbatim at the end.

Why a table: each row is a program a user would really check, and the expected outcome
of every flow it makes, so a change in the chain or in check's flow model that moves one
flow shows up as that row failing with check's own table in the message."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from netstack import check
from netstack.addressing import VIRTUAL_DNS
from netstack.lab import content
from tests.integration.util import ROOT, cli, new_stack_name, reap_zombies, stack_leftovers
from tests.realkernel import KERNEL

pytestmark = pytest.mark.root

WEB, FILES, SINK, LAB_DNS = "198.51.100.80", content.FILES.address, "198.51.100.99", \
    "198.51.100.53"
STUN, QUBE_DNS = content.STUN.address, "10.139.1.1"
CHROMIUM = ("timeout", "30", "chromium", "--headless", "--no-sandbox", "--disable-gpu",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-dev-shm-usage", "--user-data-dir=/tmp/chromium",
            # Chromium's own background requests (network time, component updates,
            # accounts) resolve nowhere: behind Tor the ones it drops at exit before the
            # exit's stream was open reached no lab host and check called them unknown
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE www.lab.test")
# Without this Chromium hides host candidates behind mDNS names: it joins 224.0.0.251
# (IGMP) and announces on 5353, multicast every chain stops (row chromium-mdns).
NO_MDNS = "--disable-features=WebRtcHideLocalIpsWithMdns"
PAGE = f"http://www.lab.test/{content.PAGE}"


@dataclass(frozen=True)
class F:
    """One expected flow: what it is and what check must say became of it. via: the way
    it left (outcome left) or the qube that stopped it (outcome stopped)."""

    proto: str
    dport: int
    dst: str
    outcome: str
    via: str


@dataclass(frozen=True)
class Row:
    id: str
    chain: str  # tor | vpn | basic
    argv: tuple[str, ...]
    verdict: int
    status: int  # the program's own exit code
    flows: tuple[F, ...]
    klass_stopped: dict[str, str] = field(default_factory=dict)  # class -> stopping qube


def left(proto: str, dport: int, dst: str, via: str) -> F:
    return F(proto, dport, dst, "left", via)


def stopped(proto: str, dport: int, dst: str, qube: str) -> F:
    return F(proto, dport, dst, "stopped", qube)


VIA = {"tor": "tor", "vpn": "vpn", "basic": "direct"}
GATE = {"tor": "sys-whonix", "vpn": "sys-proxyvm", "basic": "sys-firewall"}

CURL_HTTP = ("curl", "-sS", "-m", "20", "http://web.lab.test/")
CURL_HTTPS = ("curl", "-sS", "-m", "20", "https://www.example.org/")
CURL_SOCKS = ("sh", "-c", 'exec curl -sS -m 20 --socks5-hostname '
              '"$TOR_SOCKS_HOST:$TOR_SOCKS_PORT" https://www.example.com/')
GIT = ("git", "clone", "-q", f"http://git.lab.test/{content.REPO}", "/tmp/hello")
PIP = ("python3", "-m", "pip", "download", "-q", "--disable-pip-version-check",
       "--no-cache-dir", "--index-url", "http://pypi.lab.test/simple/", "--trusted-host",
       "pypi.lab.test", "--no-deps", "-d", "/tmp/dl", content.PKG)
DIG_QUBE = ("dig", "+time=5", "+tries=2", f"@{QUBE_DNS}", "git.lab.test")
DIG_OWN = ("dig", "+time=2", "+tries=1", f"@{LAB_DNS}", "git.lab.test")
BROWSER = (*CHROMIUM, NO_MDNS, "--virtual-time-budget=5000", "--dump-dom", PAGE)
BROWSER_MDNS = (*CHROMIUM, "--virtual-time-budget=5000", "--dump-dom", PAGE)


def rows() -> list[Row]:
    out: list[Row] = []
    for chain, via in VIA.items():
        dns = left("udp", 53, QUBE_DNS, via)
        out += [
            Row("curl-http", chain, CURL_HTTP, 0, 0, (left("tcp", 80, WEB, via), dns)),
            Row("curl-https", chain, CURL_HTTPS, 0, 0, (left("tcp", 443, SINK, via), dns)),
            Row("git-clone", chain, GIT, 0, 0, (left("tcp", 80, FILES, via), dns)),
            Row("pip-download", chain, PIP, 0, 0, (left("tcp", 80, FILES, via), dns)),
            Row("dig-qube-resolver", chain, DIG_QUBE, 0, 0, (dns,)),
        ]
        if chain == "tor":
            out += [
                Row("curl-socks5-hostname", chain, CURL_SOCKS, 0, 0, ()),  # proxy: below
                # dig gets no answer (exit 9): check says the command failed (3), and
                # still names the flow sys-whonix stopped
                Row("dig-own-resolver", chain, DIG_OWN, 3, 9,
                    (stopped("udp", 53, LAB_DNS, "sys-whonix"),)),
                Row("chromium-stun", chain, BROWSER, 2, 0,
                    (left("tcp", 80, FILES, via), stopped("udp", 3478, STUN, "sys-whonix"))),
                Row("chromium-mdns", chain, BROWSER_MDNS, 2, 0,
                    (left("tcp", 80, FILES, via), stopped("udp", 3478, STUN, "sys-whonix")),
                    {"multicast": "sys-whonix"}),
            ]
        else:
            out += [
                Row("dig-own-resolver", chain, DIG_OWN, 0, 0, (left("udp", 53, LAB_DNS, via),)),
                Row("chromium-stun", chain, BROWSER, 0, 0,
                    (left("tcp", 80, FILES, via), left("udp", 3478, STUN, via))),
                Row("chromium-mdns", chain, BROWSER_MDNS, 2, 0,
                    (left("tcp", 80, FILES, via), left("udp", 3478, STUN, via)),
                    {"multicast": GATE[chain]}),
            ]
    return out


CORPUS = rows()


# --- the chains -----------------------------------------------------------------------------

@dataclass
class Chain:
    stack: str
    qube: str


@pytest.fixture(scope="module")
def vpn_chain() -> Iterator[Chain]:
    yield from _lab_chain("configs/vpn.toml", "cv")


@pytest.fixture(scope="module")
def basic_chain() -> Iterator[Chain]:
    yield from _lab_chain("configs/basic.toml", "cb")


def _lab_chain(config: str, prefix: str) -> Iterator[Chain]:
    """One stack per chain for the whole module, with the offline internet and the lab
    content (--sink), removed after: leaving nothing behind is part of the test."""
    s = new_stack_name(prefix)
    cli("--stack", s, "up", str(ROOT / config), "--lab", "--sink", timeout=180)
    try:
        yield Chain(s, "work")
    finally:
        cli("--stack", s, "down", "--purge", check=False)
        reap_zombies()
    assert not stack_leftovers(s)


@pytest.fixture
def chain(request: pytest.FixtureRequest) -> Chain:
    name = request.param
    if name == "tor":
        return Chain(request.getfixturevalue("tor_lab").stack, "anon-whonix")
    return request.getfixturevalue(f"{name}_chain")


def _flows(r: check.Report, want: F) -> list[check.Flow]:
    """Every flow to the expected address and port: check reports one per 5-tuple (a git
    clone makes one TCP connection per object, a resolver one flow per query)."""
    got = [f for f in r.flows if (f.proto, f.dport, f.dst) == (want.proto, want.dport,
                                                                  want.dst)]
    assert got, f"expected a flow {want}\n{check.table(r)}"
    return got


def _answered_by_chain(f: check.Flow) -> bool:
    """A query to the qube's resolver that the chain answered itself: never left, nothing
    stopped. Measured 2026-12-06 behind Tor: sys-whonix's DNSPort answers a name it has
    cached (pip asks twice; rows share the Tor lab, so also a name an earlier row asked)
    and types Tor does not resolve (Chromium's HTTPS records, type 65: NotImp); no lab
    host sees those queries. Check says "answered" (before d71b941: stopped by routing)."""
    return (f.proto, f.dport) == ("udp", 53) and f.dst in VIRTUAL_DNS and \
        f.outcome == "answered"


def assert_row(r: check.Report, row: Row) -> None:
    """The verdict, the program's exit code, every listed flow's outcome, and nothing
    else: every other flow left the expected way or (klass_stopped) was stopped by the
    expected qube."""
    t = check.table(r)
    assert r.exit_status == row.status, t
    assert r.verdict == row.verdict, t
    assert not r.leaks, t
    for want in row.flows:
        for f in _flows(r, want):
            if _answered_by_chain(f):
                continue
            assert f.outcome == want.outcome, f"{want}: {f}\n{t}"
            if want.outcome == "left":
                assert f.via == want.via, f"{want}: {f}\n{t}"
            else:
                assert f.stopped_by and f.stopped_by["qube"] == want.via, f"{want}\n{t}"
    listed = {(w.proto, w.dport, w.dst) for w in row.flows}
    for f in r.flows:
        if (f.proto, f.dport, f.dst) in listed or _answered_by_chain(f):
            continue
        if f.klass in row.klass_stopped:
            assert f.outcome == "stopped", f"{f}\n{t}"
            assert f.stopped_by and f.stopped_by["qube"] == row.klass_stopped[f.klass], t
        else:
            assert (f.outcome, f.via) == ("left", r.expect), f"unexpected flow {f}\n{t}"
    assert set(row.klass_stopped) <= {f.klass for f in r.stopped}, t


@pytest.mark.parametrize(("chain", "row"), [
    pytest.param(r.chain, r, id=f"{r.chain}-{r.id}") for r in CORPUS], indirect=["chain"])
def test_corpus(chain: Chain, row: Row, tmp_path: Path) -> None:
    for attempt in range(3):
        r = check.run(list(row.argv), stack=chain.stack, qube=chain.qube,
                      pcaps=str(tmp_path / str(attempt)), kernel=KERNEL)
        # Tor gave up a stream on a fresh isolated circuit (FIRST_STREAM): check calls it
        # held (never left, exit 3 for the command's failure), and the row is run again
        if not (row.chain == "tor" and r.exit_status != row.status and any(
                f.outcome == "held" and f.dport != 53 for f in r.flows)):
            break
    assert r.expect == VIA[row.chain]
    assert_row(r, row)
    if row.id == "curl-socks5-hostname":  # through the gateway's SOCKS port: class proxy
        (p,) = [f for f in r.flows if f.klass == "proxy"]
        assert p.outcome == "left" and p.via == "tor", check.table(r)
    if row.id.startswith("chromium"):
        _stun_arrived(chain, row)


def _stun_arrived(chain: Chain, row: Row) -> None:
    """The lab STUN server's own log: behind Tor nothing came from this run's chain; behind
    the VPN the binding request came from the VPN server, behind basic from the ISP
    address. (The log is the stack's; the Tor lab is shared, so only the last entry.)"""
    from tests.integration.util import load_state

    plan = load_state(chain.stack).plan
    log = Path(f"/run/netstack/{chain.stack}") / content.LOG["stun"]
    recs = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    if row.chain == "tor":
        exits = set(plan.lab.exits) if plan.lab else set()
        assert not [x for x in recs if x["client"] not in exits], recs
        return
    assert recs and recs[-1]["stun"] == "binding", recs
    if row.chain == "vpn":
        assert recs[-1]["client"] == plan.lab.hosts["vpn"].address, recs
    else:
        assert recs[-1]["client"] == "192.0.2.2", recs


# --- the documentation's examples, verbatim -------------------------------------------------

# Measured 2026-12-06 (1 run in 4): on a Tor stack check just brought up, curl's TLS
# stream right after bootstrap 100% was taken by sys-whonix's TransPort and never reached
# the sink (curl exit 35; the flow is "held": it never left; check exits 3, the command
# failed). check waits for bootstrap only; the
# field notes say streams can fail for a few seconds after 100% (wait for a BUILT
# circuit). The readiness belongs to check/roles.tor, not to this corpus.
FIRST_STREAM = ("check on a fresh Tor stack: the first stream after bootstrap can fail "
                "(curl exit 35, the flow held, check exits 3): Tor gave up the stream")


def test_readme_first_example_own_tor_stack(tmp_path: Path) -> None:
    """README: `sudo .venv/bin/netstack check -- curl -sS https://example.org/` (behind Tor,
    the default chain, a lab stack of its own)."""
    out = _cli_in(tmp_path, "check", "--", "curl", "-sS", "https://example.org/", timeout=300)
    if out.returncode == 3 and "the command exited 35" in out.stdout and \
            "held by the chain itself" in out.stdout:
        pytest.xfail(FIRST_STREAM)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "left via tor" in out.stdout and "CLEAN" in out.stdout, out.stdout


def test_ci_example_verbatim(tmp_path: Path) -> None:
    """docs/ci.md ("Known to work"): the VPN chain, every report written, exit 0."""
    out = _cli_in(tmp_path, "check", "configs/vpn.toml", "--expect", "vpn",
                  "--junit", "OUT/netstack-check.xml", "--html", "OUT/netstack-check.html",
                  "--pcaps", "OUT/pcaps", "--", "curl", "-sS", "--max-time", "20",
                  "https://example.org/", timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "OUT/netstack-check.xml").read_text().startswith("<?xml")
    assert (tmp_path / "OUT/netstack-check.html").read_text().startswith("<!doctype html>")
    assert list((tmp_path / "OUT/pcaps").glob("*.pcap"))


MY_CLIENT = "#!/bin/sh\nexec curl -sS --max-time 20 https://api.example.com/v1/sync\n"


@pytest.mark.parametrize("chain", ["vpn", "tor"], indirect=True)
def test_readme_my_client_examples(chain: Chain, tmp_path: Path) -> None:
    """README: `check configs/vpn.toml --expect vpn --junit r.xml --html r.html -- ./my-client`
    and `--stack main check --qube anon-whonix -- ./my-client`, on this module's running
    chains (a CONFIG and --stack exclude each other, and ./my-client lives in the qube's
    home, the sandbox's working directory)."""
    from netstack.sandbox import home_dir

    cli("--stack", chain.stack, "exec", chain.qube, "--", "true")  # the home exists
    home = Path(home_dir(chain.stack, chain.qube))
    me = home / "my-client"
    me.write_text(MY_CLIENT)
    st = home.stat()
    os.chown(me, st.st_uid, st.st_gid)
    me.chmod(0o755)
    try:
        if chain.qube == "work":
            out = _cli_in(tmp_path, "--stack", chain.stack, "check", "--qube", "work",
                          "--expect", "vpn", "--junit", "r.xml", "--html", "r.html", "--",
                          "./my-client")
            assert (tmp_path / "r.xml").exists() and (tmp_path / "r.html").exists()
        else:
            out = _cli_in(tmp_path, "--stack", chain.stack, "check", "--qube", "anon-whonix",
                          "--", "./my-client")
    finally:
        me.unlink()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "api.example.com" in out.stdout and "CLEAN" in out.stdout, out.stdout


def _cli_in(cwd: Path, *args: str, timeout: float = 120):
    """The CLI as the docs run it: from a directory holding configs/ (a link to the
    project's), so relative paths in the examples work unchanged."""
    import subprocess
    import sys

    link = cwd / "configs"
    if not link.exists():
        link.symlink_to(ROOT / "configs")
    return subprocess.run([sys.executable, "-m", "netstack.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
