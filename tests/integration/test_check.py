"""`netstack check -- CMD` with real programs on the shared Tor lab (its offline internet
on): curl by name through Tor is clean; a STUN request over UDP and `dig` at a resolver of
its own are stopped and reported with sys-whonix's rule (exit 2, or 0 with --bypass warn);
with the gateway broken on purpose the STUN packet leaks and the report names the link, the
pcap and the frame (exit 1); a failing command is exit 3. Reports: JSON, JUnit, HTML (root).

On a VPN stack of their own (cheap to bring up): the README's example verbatim is CLEAN;
an address without a name, ICMP echo, TCP and UDP through the sink are all attributed to
the way they left; IPv6 is stopped with the VPN qube's rule; `--timeout` ends a program
that never exits; SIGTERM to `check` writes the report, takes its stack down and ends
every capture; after a SIGKILL of `check`, `down` ends the captures it recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from netstack import check
from netstack.kernel import proc_alive
from tests.integration.faults import fault as named
from tests.integration.util import ROOT, cli, new_stack_name, reap_zombies, stack_leftovers
from tests.realkernel import KERNEL

pytestmark = pytest.mark.root

STUN = ("import os, socket, struct\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)\n"
        "s.sendto(struct.pack('!HHI12s', 1, 0, 0x2112A442, os.urandom(12)), "
        "('stun.example.net', 3478))\n"
        "try:\n    s.recv(100)\nexcept OSError:\n    pass\n")


def by(r, proto, dport):
    return [f for f in r.flows if f.proto == proto and f.dport == dport]


def test_curl_through_tor_is_clean(tor_lab, tmp_path):
    r = check.run(["curl", "-sS", "-m", "20", "https://www.example.org/"],
                  stack=tor_lab.stack, qube="anon-whonix", pcaps=str(tmp_path), kernel=KERNEL)
    assert r.verdict == 0, check.table(r)
    (web,) = by(r, "tcp", 443)
    assert web.outcome == "left" and web.via == "tor" and "www.example.org" in web.names
    assert "www.example.org" in r.names_asked and not r.leaks
    assert r.expect == "tor" and r.exit_status == 0


def test_stun_and_its_own_resolver_are_stopped_with_the_gateways_rule(tor_lab, tmp_path):
    cmd = ["sh", "-c", f"python3 -c \"{STUN}\"; dig +time=2 +tries=1 @198.51.100.53 "
           "example.com; true"]
    r = check.run(cmd, stack=tor_lab.stack, qube="anon-whonix", pcaps=str(tmp_path), kernel=KERNEL)
    assert r.verdict == 2, check.table(r)
    (stun,) = by(r, "udp", 3478)
    (dns,) = [f for f in by(r, "udp", 53) if f.dst == "198.51.100.53"]
    assert (stun.klass, dns.klass) == ("udp", "dns")
    for f in (stun, dns):
        assert f.outcome == "stopped" and f.stopped_by["qube"] == "sys-whonix", f
    junit = ET.fromstring(check.junit(r))
    failed = {c.get("name") for c in junit if c.find("failure") is not None}
    assert any(n.startswith("udp:") for n in failed) and any(n.startswith("dns:")
                                                              for n in failed)
    page = check.html(r)
    assert "sys-whonix" in page and "#212121" in page and "stopped by sys-whonix" in page
    warn = check.run(cmd, stack=tor_lab.stack, qube="anon-whonix", bypass="warn",
                     pcaps=str(tmp_path / "w"), kernel=KERNEL)
    assert warn.verdict == 0


def test_a_broken_gateway_leaks_and_the_report_proves_it(tor_lab, tmp_path):
    cmd = ["python3", "-c", STUN]
    r = check.run(cmd, stack=tor_lab.stack, qube="anon-whonix", pcaps=str(tmp_path),
                  fault=named("gateway-redirect-only"), kernel=KERNEL)
    assert r.verdict == 1, check.table(r)
    assert r.leaks and any(x.link.startswith("sys-whonix") for x in r.leaks), r.leaks
    x = r.leaks[0]
    assert x.frame >= 1 and x.pcap.endswith(".pcap") and "UDP" in x.summary
    assert "LEAK on" in check.table(r)
    # the chain is whole again: the same program is stopped, not leaked
    again = check.run(cmd, stack=tor_lab.stack, qube="anon-whonix", pcaps=str(tmp_path / "b"),
                      kernel=KERNEL)
    assert again.verdict == 2, check.table(again)


def test_the_command_line_writes_every_report_and_exit_3_for_a_failing_command(tor_lab,
                                                                              tmp_path):
    out = cli("--stack", tor_lab.stack, "check", "--qube", "anon-whonix", "--json",
              "--junit", str(tmp_path / "r.xml"), "--html", str(tmp_path / "r.html"),
              "--pcaps", str(tmp_path / "p"), "--", "sh", "-c", "exit 7", check=False)
    assert out.returncode == 3, out.stderr
    r = json.loads(out.stdout)
    assert r["exit_status"] == 7 and r["verdict"] == 3
    assert ET.parse(tmp_path / "r.xml").getroot().get("name") == "netstack check"
    assert (tmp_path / "r.html").read_text().startswith("<!doctype html>")
    assert list((tmp_path / "p").glob("*.pcap"))


def resolve(name: str) -> str:
    """Runs inside the qube's namespace (chain.call): its resolver is the chain's."""
    import socket

    return socket.gethostbyname(name)


def test_the_pytest_plugin_adopts_the_shared_lab(netstack_chain, tor_lab):
    chain = netstack_chain(stack=tor_lab.stack, qube="anon-whonix")
    assert not chain.own
    mark = chain.mark()
    p = chain.run(["curl", "-sS", "-m", "20", "https://api.example.com/v1"], check=True)
    assert "api.example.com/v1" in p.stdout
    chain.flows(since=mark).only_via("tor")
    assert chain.call(resolve, "x.example.net") == "198.51.100.99"


def test_the_pytest_plugin_brings_up_its_own_chain_and_names_the_offending_flow(
        netstack_chain):
    from netstack.pytest_plugin import FlowError
    from tests.integration.util import ROOT

    chain = netstack_chain(config=str(ROOT / "configs" / "vpn.toml"))
    assert chain.own and chain.stack.startswith("pt")
    mark = chain.mark()
    chain.run(["python3", "-c", STUN])
    flows = chain.flows(since=mark)
    flows.only_via("vpn")  # behind a VPN qube, UDP goes through the tunnel
    with pytest.raises(FlowError, match=r"(?s)expected every flow via tor.*udp 198\.51\.100"
                       r"\.99:3478.*left via vpn"):
        flows.only_via("tor")


def test_curl_through_the_gateways_socks_port_is_clean(tor_lab, tmp_path):
    cmd = ["sh", "-c", 'curl -sS -m 20 --socks5-hostname "$TOR_SOCKS_HOST:$TOR_SOCKS_PORT" '
           "https://socks.example.org/"]
    r = check.run(cmd, stack=tor_lab.stack, qube="anon-whonix", pcaps=str(tmp_path), kernel=KERNEL)
    assert r.verdict == 0, check.table(r)
    (socks,) = by(r, "tcp", 9050)
    assert socks.klass == "proxy" and socks.outcome == "left" and socks.via == "tor"
    assert not r.names_asked  # the name went to Tor inside SOCKS, never to a resolver


# --- on a VPN stack of their own ----------------------------------------------------------------

VPN = str(ROOT / "configs" / "vpn.toml")


@pytest.fixture(scope="module")
def vpn_lab():
    s = new_stack_name("hc")
    cli("--stack", s, "up", VPN, "--lab", "--sink")
    try:
        yield s
    finally:
        cli("--stack", s, "down", "--purge", check=False)
        reap_zombies()
    assert not stack_leftovers(s)


def test_the_readmes_example_verbatim_is_clean_on_vpn():
    """README: `sudo .venv/bin/netstack check configs/vpn.toml --expect vpn -- curl -s -m 8
    http://web.lab.test/` (as root already, so without sudo)."""
    p = subprocess.run([".venv/bin/netstack", "check", "configs/vpn.toml", "--expect", "vpn",
                        "--", "curl", "-s", "-m", "8", "http://web.lab.test/"],
                       cwd=ROOT, capture_output=True, text=True, timeout=180)
    pcaps = p.stdout.rsplit("pcaps in ", 1)[-1].strip()
    try:
        assert p.returncode == 0, p.stdout + p.stderr
        assert p.stdout.startswith("203.0.113.10\n")  # the page, through the VPN server
        assert "tcp 198.51.100.80:80 (web.lab.test)" in p.stdout
        row = next(x for x in p.stdout.splitlines() if "198.51.100.80:80" in x)
        assert row.split()[:2] == ["allowed", "left"] and row.endswith("left via vpn"), row
        assert "\nCLEAN: " in p.stdout and "0 unknown" in p.stdout
    finally:
        if pcaps.startswith(str(ROOT / "pcaps")):
            import shutil

            shutil.rmtree(pcaps, ignore_errors=True)


def test_an_address_without_a_name_is_attributed(vpn_lab, tmp_path):
    r = check.run(["curl", "-sS", "-m", "8", "http://198.51.100.80/"], stack=vpn_lab,
                  qube="work", pcaps=str(tmp_path), kernel=KERNEL)
    assert r.verdict == 0, check.table(r)
    (web,) = by(r, "tcp", 80)
    assert (web.dst, web.outcome, web.via, web.names) == ("198.51.100.80", "left", "vpn", [])
    assert not r.names_asked
    assert any(e.kind == "lab-log" and e.link == "lab-http" for e in web.evidence)


def test_tcp_and_udp_through_the_sink_are_attributed(vpn_lab, tmp_path):
    cmd = ["sh", "-c", f"curl -sS -m 8 https://www.example.org/ && python3 -c \"{STUN}\""]
    r = check.run(cmd, stack=vpn_lab, qube="work", pcaps=str(tmp_path), kernel=KERNEL)
    assert r.verdict == 0, check.table(r)
    (tls,) = by(r, "tcp", 443)
    (stun,) = by(r, "udp", 3478)
    for f in (tls, stun):
        assert f.dst == "198.51.100.99" and (f.outcome, f.via) == ("left", "vpn"), f
        assert any(e.link == "lab-sink" for e in f.evidence), f.evidence
    assert "www.example.org" in tls.names and stun.klass == "udp"


def test_icmp_echo_is_attributed_by_the_lab_hosts_capture(vpn_lab, tmp_path):
    """The sandbox may not ping (no raw sockets): root pings from the qube's namespace,
    watched the way the pytest plugin watches."""
    w = check.Watch(vpn_lab, "work", KERNEL, pcaps=str(tmp_path)).start()
    p = subprocess.run(["ip", "netns", "exec", f"nst-{vpn_lab}-work", "ping", "-c", "2",
                        "-i", "0.2", "-W", "2", "198.51.100.80"], capture_output=True)
    r = w.report(["ping"], p.returncode)
    assert r.verdict == 0, check.table(r)
    (f,) = [f for f in r.flows if f.proto == "icmp"]
    assert (f.klass, f.outcome, f.via, f.dst) == ("icmp", "left", "vpn", "198.51.100.80")
    ev = f.evidence[-1]
    assert ev.link == "lab:web" and ev.frame >= 1 and ev.pcap.endswith("lab_web.pcap")


def test_ipv6_is_stopped_with_the_vpn_qubes_rule(tmp_path):
    cfg = tmp_path / "vpn6.toml"
    cfg.write_text(Path(VPN).read_text() + "\n[stack]\nipv6 = true\n")
    s = new_stack_name("hc")
    cli("--stack", s, "up", str(cfg), "--lab", "--sink")
    try:
        r = check.run(["sh", "-c", "curl -s -m 3 'http://[2001:db8::80]/'; true"], stack=s,
                      qube="work", pcaps=str(tmp_path / "p"), kernel=KERNEL)
    finally:
        cli("--stack", s, "down", "--purge", check=False)
        reap_zombies()
    assert r.verdict == 2, check.table(r)
    (f,) = [f for f in r.flows if f.family == "ipv6" and f.dport == 80]
    assert (f.klass, f.outcome) == ("ipv6", "stopped")
    assert f.stopped_by["qube"] == "sys-proxyvm" and f.stopped_by["hook"] == "forward"
    assert [e.kind for e in f.evidence] == ["capture", "rule"]
    assert not stack_leftovers(s)


def test_timeout_ends_a_program_that_never_exits(vpn_lab, tmp_path):
    t0 = time.monotonic()
    r = check.run(["sleep", "60"], stack=vpn_lab, qube="work", pcaps=str(tmp_path),
                  timeout=1.0, kernel=KERNEL)
    assert time.monotonic() - t0 < 20
    assert r.ended_by == "timeout" and r.verdict == 3, check.table(r)
    assert "ran past --timeout" in check.table(r)
    junit = ET.fromstring(check.junit(r))
    (cmd,) = [c for c in junit if c.get("name") == "the command"]
    assert cmd.find("failure") is not None
    assert all(not proc_alive(c["pid"], None) for c in r.captures)


def _captures(stack: str, prefix: str = "capture ") -> list:
    """The tcpdump processes (or with prefix "check program", the program) recorded in
    the stack's state (leaktest/capture.py register_process)."""
    from netstack.state import ProcessRec, State

    st = State.load(stack)
    return [o for o in (st.objects if st else []) if isinstance(o, ProcessRec)
            and o.name.startswith(prefix)]


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return int(data[data.rindex(")") + 2:].split()[1])


def _program_started(check_pid: int) -> bool:
    """check has started the program (its sandbox is a child of check): every capture
    was started before it."""
    for d in os.listdir("/proc"):
        if d.isdigit() and _ppid(int(d)) == check_pid:
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if b"bwrap" in f.read():
                        return True
            except OSError:
                continue
    return False


def _wait(pred, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigterm_writes_the_report_takes_the_stack_down_and_ends_every_capture(tmp_path):
    from netstack.state import State

    before = set(State.stacks())
    p = subprocess.Popen([sys.executable, "-m", "netstack.cli", "check", VPN, "--json",
                          "--junit", str(tmp_path / "r.xml"), "--pcaps", str(tmp_path / "p"),
                          "--", "sleep", "120"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        def mine() -> tuple[str, list] | None:
            for s in set(State.stacks()) - before:
                try:  # other engineers' stacks come and go meanwhile
                    caps = _captures(s)
                except Exception:  # noqa: BLE001
                    continue
                if caps and all(_ppid(c.pid) == p.pid for c in caps):
                    return s, caps
            return None
        _wait(lambda: _program_started(p.pid), 120, "check to start the program")
        stack, caps = _wait(mine, 10, "the captures in the stack's state")
        assert len(caps) >= 6  # every link of the VPN chain and the lab hosts
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 3, err
    r = json.loads(out)
    assert r["ended_by"] == "SIGTERM" and r["verdict"] == 3
    assert "the command was ended by check's SIGTERM" in r["reasons"]
    assert {c["pid"] for c in r["captures"]} == {c.pid for c in caps}
    junit = ET.parse(tmp_path / "r.xml").getroot()
    assert int(junit.get("failures")) >= 1
    assert all(not proc_alive(c.pid, c.start) for c in caps)
    assert not os.path.exists(f"/run/netstack/{stack}")
    # the sandbox's own init follows its ended parent (--die-with-parent) a moment later
    _wait(lambda: not stack_leftovers(stack), 10, f"nothing of {stack} left")


def test_down_ends_the_captures_and_program_of_a_check_killed_with_sigkill(tmp_path):
    s = new_stack_name("hc")
    cli("--stack", s, "up", VPN, "--lab", "--sink")
    p = subprocess.Popen([sys.executable, "-m", "netstack.cli", "--stack", s, "check",
                          "--qube", "work", "--pcaps", str(tmp_path), "--", "sleep", "120"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: _program_started(p.pid), 60, "check to start the program")
        caps = _captures(s)
        assert len(caps) >= 6 and all(_ppid(c.pid) == p.pid for c in caps)
        (prog,) = _wait(lambda: _captures(s, "check program in work"), 10,
                        "the program in the stack's state")
        assert _ppid(prog.pid) == p.pid
        caps.append(prog)
        p.kill()
        p.wait()
        assert any(proc_alive(c.pid, c.start) for c in caps)  # orphans, still capturing
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        cli("--stack", s, "down", "--purge", check=False)
        reap_zombies()
    assert all(not proc_alive(c.pid, c.start) for c in caps)
    # the program died with check (its parent-death signal); its sandbox may take a moment
    _wait(lambda: not stack_leftovers(s), 10, f"nothing of {s} left: {stack_leftovers(s)}")


def test_sigterm_while_the_lab_stack_comes_up_exits_143_and_leaves_nothing():
    p = subprocess.Popen([sys.executable, "-m", "netstack.cli", "check", VPN, "--", "true"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stderr is not None
        line = p.stderr.readline()  # "bringing up lab stack NAME": up is under way
        stack = line.split("lab stack ", 1)[1].split()[0]
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 143, err
    assert "SIGTERM before the program started" in err and out == ""
    assert not os.path.exists(f"/run/netstack/{stack}") and not stack_leftovers(stack)


def _check_stack_of(pid: int) -> str | None:
    """The lab stack check `pid` made for itself (its state names its owner)."""
    from netstack.state import State

    for s in State.stacks():
        if s.startswith("ck"):
            try:  # other engineers' stacks come and go meanwhile
                st = State.load(s)
            except Exception:  # noqa: BLE001
                continue
            if st is not None and st.data.owner == pid:
                return s
    return None


def test_the_lab_stack_of_a_check_killed_with_sigkill_is_named_and_the_next_check_removes_it():
    """kill -9 of `check` left its own lab stack up for good. Its state names the owning
    check (pid, start time): `status` calls it orphaned once that check is gone, and the
    next `check` takes it down. Anti-test: while its check runs, the stack is no orphan and
    another check leaves it alone."""
    from tests.integration.util import BASIC

    p = subprocess.Popen([sys.executable, "-m", "netstack.cli", "check", BASIC, "--",
                          "sleep", "600"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    s = None
    try:
        _wait(lambda: _program_started(p.pid), 120, "check to start the program")
        s = _wait(lambda: _check_stack_of(p.pid), 10, "check's stack naming its owner")
        st = json.loads(cli("--stack", s, "status", "--json", check=False).stdout)
        assert st["owner"] == {"pid": p.pid, "alive": True}
        assert not any("orphaned" in x for x in st["health"]["problems"])
        other = cli("check", BASIC, "--", "true", check=False)
        assert f"taking down lab stack {s}" not in other.stderr
        assert os.path.exists(f"/run/netstack/{s}/state.json")  # a live check's: kept
        p.kill()
        p.wait()
        st = json.loads(cli("--stack", s, "status", "--json", check=False).stdout)
        assert st["owner"] == {"pid": p.pid, "alive": False}
        assert any(f"orphaned: made for `netstack check` pid {p.pid}" in x
                   for x in st["health"]["problems"]), st["health"]["problems"]
        r = cli("check", BASIC, "--", "true", check=False)
        assert f"taking down lab stack {s}: its check (pid {p.pid}) is gone" in r.stderr
        assert "Traceback" not in r.stderr
        _wait(lambda: not stack_leftovers(s), 10, f"nothing of {s} left")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if s is not None and os.path.exists(f"/run/netstack/{s}"):
            cli("--stack", s, "down", check=False)
        reap_zombies()
