"""The gateway's control-port filter (netstack/tor/filter.py) with a recording stand-in for
tor (no root): what Tor Browser needs passes, everything else gets 510 and never reaches
tor; fuzzed with hypothesis (random, truncated, huge, pipelined and non-UTF-8 input): the
upstream never sees a refused command, the filter never crashes, and a silent client does
not stall another one."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netstack.tor.filter import FILTERED, Allowlist, Session, decide, serve, serve_client

GW = "10.137.0.4"
WS = "10.137.0.5"


def session() -> Session:
    return Session(Allowlist.load(None), f"{GW}:9050", WS)


class Recorder:
    """tor as the filter sees it: every line it was asked, answered 250 OK."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.lock = threading.Lock()

    def ask(self, line: str) -> str:
        with self.lock:
            self.asked.append(line)
            n = len(self.asked)
        if line.startswith("ADD_ONION"):
            return f"250-ServiceID=onion{n:03d}\r\n250 OK"
        return "250 OK"

    def session(self) -> Conversation:
        return Conversation(self)


class Conversation:
    """One session's own control connection: tor drops what it made when it closes."""

    def __init__(self, rec: Recorder) -> None:
        self.rec, self.closed = rec, False

    def ask(self, line: str) -> str:
        assert not self.closed
        return self.rec.ask(line)

    def close(self) -> None:
        self.closed = True
        with self.rec.lock:
            self.rec.asked.append("(session closed)")


def allowed_upstream(line: str) -> bool:
    """What tor may ever be asked through the filter (independent of decide)."""
    kw, *args = line.split(" ")
    if kw == "GETINFO":
        return bool(args) and set(args) <= Allowlist.load(None).getinfo - {"net/listeners/socks"}
    if kw == "SIGNAL":
        return args == ["NEWNYM"]
    if kw == "ADD_ONION":
        return args[0] in ("NEW:ED25519-V3", "NEW:BEST") and args[-1] == "Flags=DiscardPK" \
            and all(a.startswith("Port=") and a.split(",")[1].startswith(WS + ":")
                    for a in args[1:-1])
    return kw == "DEL_ONION"


def test_what_tor_browser_needs_passes():
    s = session()
    assert decide("PROTOCOLINFO 1", s)[0] == "answer"
    assert decide("GETINFO status/bootstrap-phase", s) == ("refuse",
                                                            "514 Authentication required.")
    assert decide('AUTHENTICATE ""', s) == ("answer", "250 OK")
    assert decide("GETINFO status/bootstrap-phase", s) == ("ask",
                                                            "GETINFO status/bootstrap-phase")
    kind, text = decide("GETINFO net/listeners/socks", s)
    assert kind == "answer" and f'"{GW}:9050"' in text  # the gateway's, not tor's own
    assert decide("SIGNAL NEWNYM", s) == ("ask", "SIGNAL NEWNYM")
    kind, line = decide(f"ADD_ONION NEW:ED25519-V3 Port=80,{WS}:8080", s)
    assert kind == "ask" and line.endswith("Flags=DiscardPK")  # the key stays in the gateway


@pytest.mark.parametrize("line", [
    "GETINFO address", "GETINFO circuit-status", "GETCONF SocksPort", "SETCONF SocksPort=0",
    "SIGNAL HALT", "SIGNAL SHUTDOWN", "ADD_ONION ED25519-V3:AAAA Port=80", "TAKEOWNERSHIP",
    f"ADD_ONION NEW:ED25519-V3 Port=80,{GW}:9051", "ADD_ONION NEW:ED25519-V3 Port=80",
    "ADD_ONION NEW:ED25519-V3 Port=80,127.0.0.1:9051", "DEL_ONION someoneelses",
    "GETINFO net/listeners/socks address", "SETEVENTS STREAM", "LOADCONF x", "MAPADDRESS a=b",
])
def test_everything_else_is_filtered(line):
    s = session()
    decide("AUTHENTICATE", s)
    assert decide(line, s)[0] == "refuse"


def run_client(payload: bytes, up: Recorder) -> bytes:
    a, b = socket.socketpair()

    def serve_then_close() -> None:
        with b:  # as serve() does for each client
            serve_client(b, session(), up)
    t = threading.Thread(target=serve_then_close)
    t.start()
    a.sendall(payload)
    a.shutdown(socket.SHUT_WR)
    out = b""
    a.settimeout(5)
    while chunk := a.recv(65536):
        out += chunk
    t.join(5)
    assert not t.is_alive()
    a.close()
    return out


WORDS = ["GETINFO", "SIGNAL", "ADD_ONION", "DEL_ONION", "SETCONF", "GETCONF", "AUTHENTICATE",
         "PROTOCOLINFO", "QUIT", "NEWNYM", "HALT", "address", "status/bootstrap-phase",
         "net/listeners/socks", "circuit-status", "NEW:ED25519-V3", f"Port=80,{WS}:8080",
         f"Port=80,{GW}:9051", "Flags=DiscardPK", "\x00", "\xff", "abcdefghijklmnop"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=5).map(" ".join).map(
        lambda s: s.encode("utf-8", "surrogatepass")),
    st.binary(max_size=200)), max_size=8), st.booleans(), st.integers(0, 40))
def test_fuzzed_clients_never_reach_tor_with_a_refused_command(lines, auth, cut):
    up = Recorder()
    body = b"\r\n".join(lines)
    if auth:
        body = b"AUTHENTICATE\r\n" + body
    payload = body[:len(body) - cut] if cut < len(body) else body
    out = run_client(payload + b"\r\n", up)
    assert all(allowed_upstream(x) for x in up.asked), up.asked
    assert out.count(b"\r\n") >= 1 or not payload.strip()


def test_a_huge_line_is_refused_and_closed_without_reaching_tor():
    up = Recorder()
    out = run_client(b"AUTHENTICATE\r\nGETINFO " + b"a" * 100_000 + b"\r\nSIGNAL NEWNYM\r\n",
                     up)
    assert b"500 Line too long" in out and up.asked == []


def test_pipelined_commands_are_each_judged():
    up = Recorder()
    out = run_client(b"AUTHENTICATE\r\nGETINFO address\r\nSIGNAL NEWNYM\r\nSIGNAL HALT\r\n"
                     b"GETINFO status/bootstrap-phase\r\nQUIT\r\n", up)
    assert up.asked == ["SIGNAL NEWNYM", "GETINFO status/bootstrap-phase"]
    assert out.count(FILTERED.encode()) == 2


def test_a_silent_client_does_not_stall_another():
    up = Recorder()
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(8)
    stop = threading.Event()
    t = threading.Thread(target=serve, args=(lst, up, f"{GW}:9050"),
                         kwargs={"stopping": stop}, daemon=True)
    t.start()
    try:
        silent = socket.create_connection(lst.getsockname())  # sends nothing, ever
        silent.sendall(b"GETINFO stat")  # half a line, then silence
        t0 = time.monotonic()
        c = socket.create_connection(lst.getsockname(), timeout=5)
        c.sendall(b"AUTHENTICATE\r\nSIGNAL NEWNYM\r\nQUIT\r\n")
        got = b""
        while b"closing" not in got:
            got += c.recv(1000)
        assert time.monotonic() - t0 < 2 and up.asked == ["SIGNAL NEWNYM"]
        c.close()
        silent.close()
    finally:
        stop.set()
        t.join(3)
        lst.close()


def talk(lines: list[str], up, ledger, client: str = WS) -> list[str]:
    """One workstation session over a socket pair: the filter's replies, in order."""
    from netstack.tor.filter import serve_client

    a, b = socket.socketpair()
    s = Session(Allowlist.load(None), f"{GW}:9050", client)

    def run() -> None:
        with b:  # as `serve` does: the connection closes when the session ends
            serve_client(b, s, up, ledger)
    t = threading.Thread(target=run)
    t.start()
    a.sendall(("".join(f"{x}\r\n" for x in lines)).encode())
    a.shutdown(socket.SHUT_WR)
    out = b""
    while chunk := a.recv(65536):
        out += chunk
    t.join(5)
    a.close()
    return out.decode().split("\r\n")


ADD = f"ADD_ONION NEW:ED25519-V3 Port=80,{WS}:8080"


def test_onions_live_as_long_as_the_session_that_made_them():
    """Regression (issue 26): onions were made on the filter's one shared tor connection,
    outlived the workstation's session, and DEL_ONION could not remove them after a
    reconnect. Now each session's onions are made on its own connection, closed (so tor
    removes them) when the session ends."""
    from netstack.tor.filter import Ledger

    rec, ledger = Recorder(), Ledger(4)
    got = talk(["AUTHENTICATE", ADD, ADD], rec, ledger)
    assert sum(x.startswith("250-ServiceID=") for x in got) == 2
    assert rec.asked[-1] == "(session closed)" and ledger.held[WS] == 0
    # a reconnect starts from nothing: the old onions are gone, and the cap is free again
    got = talk(["AUTHENTICATE", ADD], rec, ledger)
    assert any(x.startswith("250-ServiceID=") for x in got)


def test_a_workstation_holds_at_most_its_cap_of_onions():
    from netstack.tor.filter import Ledger

    rec, ledger = Recorder(), Ledger(2)
    a, b = socket.socketpair()  # a first session that stays open, holding two
    from netstack.tor.filter import serve_client

    s = Session(Allowlist.load(None), f"{GW}:9050", WS)
    t = threading.Thread(target=serve_client, args=(b, s, rec, ledger))
    t.start()
    a.sendall(f"AUTHENTICATE\r\n{ADD}\r\n{ADD}\r\n{ADD}\r\n".encode())
    replies = b""
    while replies.count(b"\r\n250 OK") + replies.count(b"451") < 3:
        replies += a.recv(4096)
    assert b"451 Resource exhausted: at most 2 onion services" in replies
    asked = sum(x.startswith("ADD_ONION") for x in rec.asked)
    assert asked == 2  # the third never reached tor
    # another session of the same workstation: still at the cap; another workstation: not
    assert any(x.startswith("451") for x in talk(["AUTHENTICATE", ADD], rec, ledger))
    other = "10.137.0.9"
    assert any(x.startswith("250-ServiceID=") for x in talk(
        ["AUTHENTICATE", f"ADD_ONION NEW:ED25519-V3 Port=80,{other}:8080"], rec, ledger,
        client=other))
    a.close()  # the first session ends
    t.join(5)
    b.close()
    assert ledger.held[WS] == 0  # the session ended: its onions are gone
    got = talk(["AUTHENTICATE", ADD, "DEL_ONION onion999"], rec, ledger)
    assert any(x.startswith("250-ServiceID=") for x in got)
