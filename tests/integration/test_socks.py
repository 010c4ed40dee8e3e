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

    closed: set[str] = set()  # circuits tor closed (expired, failed) or dirtied (NEWNYM)
    newnym: list[bool] = []

    conflux: dict[str, str] = {}  # circuit -> its conflux set (tor >= 0.4.8 links two legs)

    def on_circ(ev) -> None:
        if ev.status in ("CLOSED", "FAILED"):
            closed.add(conflux.get(ev.id, ev.id))
            closed.add(ev.id)
        if ev.keyword_args.get("CONFLUX_ID"):
            conflux[ev.id] = ev.keyword_args["CONFLUX_ID"]

    def on_signal(ev) -> None:
        if ev.signal == "NEWNYM":
            newnym.append(True)

    c.add_event_listener(on_stream, EventType.STREAM)
    c.add_event_listener(on_circ, EventType.CIRC)
    c.add_event_listener(on_signal, EventType.SIGNAL)
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
        for circ in c.get_circuits():  # legs linked before the listener was added
            if circ.keyword_args.get("CONFLUX_ID"):
                conflux.setdefault(circ.id, circ.keyword_args["CONFLUX_ID"])
    finally:
        c.close()
    # a conflux set carries one isolation's streams over either of its legs: a set is
    # the unit of isolation, so circuits are compared by the set they belong to
    a1, b, a2, apt, git = (conflux.get(circ, circ) for circ in circs)
    assert a1 != b, "two SOCKS usernames shared a circuit"
    # the same username keeps its circuit while tor keeps it (a circuit tor closed, or a
    # NEWNYM some earlier test asked for and tor applied late, is a new one legitimately)
    assert a1 == a2 or a1 in closed or newnym, "the same SOCKS username got a new circuit"
    assert apt != git and {apt, git}.isdisjoint({a1, b}), "named ports shared a circuit"
    # the transparent path works beside them
    assert tor_lab.get("anon-whonix", WEB) in tor_lab.exits


TALK = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], 9051), timeout=10)
f = s.makefile("rwb")
def ask(line):
    f.write(line.encode() + b"\r\n"); f.flush()
    out = []
    while True:
        r = f.readline().decode().rstrip()
        out.append(r)
        if len(r) < 4 or r[3] == " ":
            return " | ".join(out)
for line in sys.argv[2:]:
    if line == "WAIT":  # hold the session open until told to end it
        print("waiting", flush=True)
        sys.stdin.readline()
        continue
    print(line, "=>", ask(line), flush=True)
"""


def test_the_workstation_is_told_where_socks_is_and_talks_to_the_filter_only(tor_lab):
    gw = tor_lab.tor.address
    out = cli("--stack", tor_lab.stack, "exec", "anon-whonix", "--", "env").stdout
    assert f"TOR_SOCKS_HOST={gw}" in out and "TOR_SOCKS_PORT=9050" in out
    assert "TOR_SOCKS_PORT_APT=9104" in out
    import sys

    p = in_ns(tor_lab.ns["anon-whonix"], sys.executable, "-c", TALK, gw, "GETINFO address",
              "AUTHENTICATE", "GETINFO status/bootstrap-phase", "GETINFO net/listeners/socks",
              "GETINFO circuit-status", "GETCONF SocksPort", "SIGNAL HALT", "SIGNAL NEWNYM")
    said = dict(line.split(" => ") for line in p.stdout.splitlines())
    assert said["GETINFO address"].startswith("514")  # not authenticated yet
    assert said["AUTHENTICATE"] == "250 OK"
    assert "PROGRESS=100" in said["GETINFO status/bootstrap-phase"]
    assert f'"{gw}:9050"' in said["GETINFO net/listeners/socks"]
    for refused in ("GETINFO circuit-status", "GETCONF SocksPort", "SIGNAL HALT"):
        assert said[refused] == "510 Command filtered", said
    assert said["SIGNAL NEWNYM"] == "250 OK"
    # SIGNAL HALT never reached tor: the transparent path still works
    assert tor_lab.get("anon-whonix", WEB) in tor_lab.exits
    audit = cli("--stack", tor_lab.stack, "audit", check=False)
    assert audit.returncode == 0, audit.stdout[-1500:]
    assert "only TransPort, DNSPort and the SOCKS ports from clients" in audit.stdout
    assert "control port only through the filter" in audit.stdout


def test_a_workstations_onions_end_with_its_session_and_are_capped(tor_lab):
    """Regression (issue 26): onions a workstation made through the filter lived on the
    filter's one shared tor connection, outlived the session and could not be removed after
    a reconnect; and a workstation could make any number. Now at most 4 at a time (the
    default cap), each on the session's own control connection: tor removes them when the
    session ends, and a new session may make new ones."""
    import subprocess
    import sys

    from stem.control import Controller

    gw, ws = tor_lab.tor.address, tor_lab.plan.qube("anon-whonix").ipv4
    adds = [f"ADD_ONION NEW:ED25519-V3 Port={80 + i},{ws}:8080" for i in range(5)]
    p = subprocess.Popen(["ip", "netns", "exec", tor_lab.ns["anon-whonix"], sys.executable,
                          "-c", TALK, gw, "AUTHENTICATE", *adds, "WAIT"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    said = []
    try:
        while (line := p.stdout.readline().strip()) != "waiting":
            assert line, "the session ended early"
            said.append(line)
        ids = [x.split("ServiceID=")[1].split(" ")[0] for x in said if "ServiceID=" in x]
        assert len(ids) == 4 and "451 Resource exhausted: at most 4" in said[-1], said

        def alive(i: str) -> bool:
            with Controller.from_socket_file(tor_lab.tor.control_socket) as c:
                c.authenticate()
                return c.msg(f"GETINFO hs/service/desc/id/{i}").is_ok()
        # tor builds each service's descriptor a moment after ADD_ONION
        wait_for(lambda: all(alive(i) for i in ids), 20, 0.2, "tor serving the onions")
        p.stdin.write("\n")
        p.stdin.flush()
        p.wait(10)
        wait_for(lambda: not any(alive(i) for i in ids), 15, 0.2, "tor removed the onions")
    finally:
        p.kill()
        p.wait()
    again = in_ns(tor_lab.ns["anon-whonix"], sys.executable, "-c", TALK, gw, "AUTHENTICATE",
                  adds[0])
    assert "ServiceID=" in again.stdout, again.stdout
