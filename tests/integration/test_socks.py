"""The gateway's SOCKS ports, Whonix's way (root, shared Tor lab): 9050 isolates by SOCKS
username (two usernames, two circuits; the same username, the same circuit), two named
per-application ports never share a circuit, the transparent path keeps working beside
them, the workstation's environment names the port (TOR_SOCKS_HOST/PORT), and the control
port stays unreachable. Circuits are read from tor's STREAM events (stem)."""

from __future__ import annotations

import pytest

from tests.integration.labs import WEB
from tests.integration.util import cli, in_ns, wait_for

pytestmark = pytest.mark.root


def socks_get(lab, port: int, user: str) -> str | None:
    gw = lab.tor.address
    p = in_ns(lab.ns["anon-whonix"], "curl", "-sS", "--max-time", "20", "--socks5-hostname",
              f"{gw}:{port}", "--proxy-user", f"{user}:x", f"http://{WEB}/", check=False,
              timeout=30)
    return p.stdout.strip() if p.returncode == 0 else None


def test_socks_isolation_by_username_and_by_port(tor_lab):
    from stem.control import EventType

    from netstack.tor.control import connect

    c = connect(tor_lab.tor.control_socket)
    circ_of: dict[str, str] = {}  # stream id -> circuit
    events = []

    def on_stream(ev) -> None:
        events.append(ev)
        if ev.status == "SUCCEEDED" and ev.circ_id:
            circ_of[ev.id] = ev.circ_id

    c.add_event_listener(on_stream, EventType.STREAM)
    runs = [("a", 9050), ("b", 9050), ("a", 9050), ("x", 9104), ("x", 9105)]
    circs = []
    try:
        for user, port in runs:
            before = set(circ_of)
            got = wait_for(lambda u=user, p=port: socks_get(tor_lab, p, u), 40, 0.2,
                           f"a page through SOCKS {port} as {user}")
            assert got in tor_lab.exits
            new = wait_for(lambda b=before: set(circ_of) - b, 5, 0.05, "its stream event")
            circs.append(circ_of[sorted(new)[-1]])
    finally:
        c.close()
    a1, b, a2, apt, git = circs
    assert a1 != b, "two SOCKS usernames shared a circuit"
    assert a1 == a2, "the same SOCKS username got a new circuit"
    assert apt != git and {apt, git}.isdisjoint({a1, b}), "named ports shared a circuit"
    # the transparent path works beside them
    assert tor_lab.get("anon-whonix", WEB) in tor_lab.exits


def test_the_workstation_is_told_where_socks_is_and_9051_stays_closed(tor_lab):
    gw = tor_lab.tor.address
    out = cli("--stack", tor_lab.stack, "exec", "anon-whonix", "--", "env").stdout
    assert f"TOR_SOCKS_HOST={gw}" in out and "TOR_SOCKS_PORT=9050" in out
    assert "TOR_SOCKS_PORT_APT=9104" in out
    p = in_ns(tor_lab.ns["anon-whonix"], "curl", "-sS", "--max-time", "3",
              f"http://{gw}:9051/", check=False)
    assert p.returncode == 28, p.stderr  # dropped, not refused: nothing listens, nothing answers
    audit = cli("--stack", tor_lab.stack, "audit", check=False)
    assert audit.returncode == 0, audit.stdout[-1500:]
    assert "only TransPort, DNSPort and the SOCKS ports from clients" in audit.stdout
