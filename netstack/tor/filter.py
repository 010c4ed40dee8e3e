"""The gateway's filtered control port for its workstations (Whonix's onion-grater idea,
written here): a workstation connects to the gateway's address, port 9051, and may run only
what the allowlist (control_allowlist.json, per client) names, which is what Tor Browser
needs: authentication without a secret, bootstrap status, the SOCKS listener (answered with
the gateway's workstation-facing port, not tor's own), NEWNYM, an onion service with a key
tor makes (and removing only its own). Everything else (GETINFO address, circuit-status,
GETCONF, SETCONF, ADD_ONION with a key, SIGNAL HALT, ...) gets `510 Command filtered` and
never reaches tor.

Requests are read as control-protocol lines (CRLF, at most MAX_LINE bytes, ASCII only) and
judged one by one (pipelining is fine); an allowed command is sent to tor through stem's
Controller over tor's unix control socket and its reply, parsed by stem, written back. Each
client has its own thread and an idle deadline; tor is asked under a lock with a timeout,
so a slow or hostile client stalls nobody but itself."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

from netstack.tor.gateway import ONION_CAP  # config: onions_per_workstation

MAX_LINE = 4096
IDLE = 60.0  # seconds a client may stay silent
FILTERED = "510 Command filtered"
ALLOWLIST = os.path.join(os.path.dirname(__file__), "control_allowlist.json")
KEYWORD = re.compile(r"[A-Z_+]{1,32}")




class Asker(Protocol):
    def ask(self, line: str) -> str: ...


class Conversation(Asker, Protocol):
    def close(self) -> None: ...


class Upstream(Asker, Protocol):
    def session(self) -> Conversation:
        """A control connection of one workstation's session: the onion services it makes
        are tied to it, and tor removes them when it closes (no Flags=Detach)."""
        ...


class Ledger:
    """How many onion services each workstation holds now, across its sessions: at most
    `cap` (ADD_ONION beyond it is refused before tor sees it)."""

    def __init__(self, cap: int = ONION_CAP) -> None:
        self.cap = cap
        self.held: dict[str, int] = {}
        self.lock = threading.Lock()

    def take(self, client: str) -> bool:
        with self.lock:
            if self.held.get(client, 0) >= self.cap:
                return False
            self.held[client] = self.held.get(client, 0) + 1
            return True

    def give(self, client: str, n: int = 1) -> None:
        with self.lock:
            self.held[client] = max(0, self.held.get(client, 0) - n)


@dataclass
class Allowlist:
    answer: set[str] = field(default_factory=set)
    getinfo: set[str] = field(default_factory=set)
    signal: set[str] = field(default_factory=set)
    add_onion: set[str] = field(default_factory=set)
    del_onion: bool = False

    @classmethod
    def load(cls, client: str | None, path: str = ALLOWLIST) -> Allowlist:
        with open(path) as f:  # not codec: a policy file shipped beside this module
            data = json.load(f)  # (tor's command names as keys), never written by us
        merged: dict[str, set[str]] = {}
        for part in (data.get("default", {}), data.get("clients", {}).get(client or "", {})):
            for k, v in part.items():
                merged.setdefault(k, set()).update(v)
        return cls(merged.get("answer", set()), merged.get("GETINFO", set()),
                   merged.get("SIGNAL", set()), merged.get("ADD_ONION", set()),
                   "own" in merged.get("DEL_ONION", set()))


@dataclass
class Session:
    """One workstation's connection: what it may do, and the onions it made."""

    allow: Allowlist
    socks: str  # the gateway's workstation-facing SOCKS listener, "addr:port"
    client: str = ""  # the workstation's address: its onions may point only at it
    onions: set[str] = field(default_factory=set)
    authenticated: bool = False
    conversation: Any = None  # its own control connection to tor, for its onion services


def decide(line: str, s: Session) -> tuple[str, str | None]:
    """('answer', reply) the filter answers itself, ('ask', line) goes to tor, or
    ('refuse', reply). Pure: the fuzz tests drive it directly."""
    words = line.split(" ")
    kw = words[0].upper()
    args = words[1:]
    if not KEYWORD.fullmatch(kw):
        return "refuse", "510 Unrecognized command"
    if kw in s.allow.answer:
        return "answer", _answer(kw, s)
    if not s.authenticated:
        return "refuse", "514 Authentication required."
    if kw == "GETINFO" and args and all(a in s.allow.getinfo for a in args):
        if args == ["net/listeners/socks"]:
            return "answer", f'250-net/listeners/socks="{s.socks}"\r\n250 OK'
        if "net/listeners/socks" in args:
            return "refuse", FILTERED  # ask it alone: the filter answers it
        return "ask", f"GETINFO {' '.join(args)}"
    if kw == "SIGNAL" and len(args) == 1 and args[0].upper() in s.allow.signal:
        return "ask", f"SIGNAL {args[0].upper()}"
    if kw == "ADD_ONION" and args and args[0] in s.allow.add_onion and args[1:] and all(
            _own_target(a, s.client) or a == "Flags=DiscardPK" for a in args[1:]):
        # the key tor makes stays in the gateway: never handed to the workstation
        return "ask", " ".join(["ADD_ONION", args[0],
                                *(a for a in args[1:] if a.startswith("Port=")),
                                "Flags=DiscardPK"])
    if kw == "DEL_ONION" and s.allow.del_onion and len(args) == 1 and args[0] in s.onions:
        return "ask", f"DEL_ONION {args[0]}"
    return "refuse", FILTERED


def _own_target(arg: str, client: str) -> bool:
    """Port=VIRT,ADDR:PORT with ADDR the workstation itself (never the gateway's own
    loopback, another qube or the internet)."""
    m = re.fullmatch(r"Port=(\d{1,5}),(\d{1,3}(?:\.\d{1,3}){3}):(\d{1,5})", arg)
    return bool(m) and m.group(2) == client and 0 < int(m.group(1)) < 65536 and \
        0 < int(m.group(3)) < 65536


def _answer(kw: str, s: Session) -> str:
    if kw == "PROTOCOLINFO":
        return '250-PROTOCOLINFO 1\r\n250-AUTH METHODS=NULL\r\n250-VERSION Tor="0.4"\r\n250 OK'
    if kw in ("AUTHENTICATE", "AUTHCHALLENGE"):
        s.authenticated = True
        return "250 OK"
    if kw == "QUIT":
        return "250 closing connection"
    return FILTERED


class TorConversation:
    """One workstation session's own control connection to tor (made at its first onion
    command): what it makes lives as long as the session."""

    def __init__(self, control_socket: str) -> None:
        self.path = control_socket
        self.c: Any = None

    def ask(self, line: str) -> str:
        from netstack.tor.control import connect

        if self.c is None:
            self.c = connect(self.path)
        return "\r\n".join(_lines(self.c.msg(line)))

    def close(self) -> None:
        if self.c is not None:
            with contextlib.suppress(Exception):
                self.c.close()
            self.c = None


class TorUpstream:
    """tor's real control socket, through stem (one Controller, asked under a lock)."""

    def session(self) -> TorConversation:
        return TorConversation(self.path)

    def __init__(self, control_socket: str, timeout: float = 10.0) -> None:
        from netstack.tor.control import connect

        self.path, self.timeout = control_socket, timeout
        self.lock = threading.Lock()
        self.c = connect(control_socket)

    def ask(self, line: str) -> str:
        if not self.lock.acquire(timeout=self.timeout):
            return "451 Resource exhausted"
        try:
            try:
                reply = self.c.msg(line)
            except Exception:  # noqa: BLE001 - tor restarted: reconnect once
                from netstack.tor.control import connect

                self.c = connect(self.path)
                reply = self.c.msg(line)
            return "\r\n".join(_lines(reply))
        finally:
            self.lock.release()


def _lines(reply: Any) -> list[str]:
    """A stem ControlMessage back in control-protocol lines."""
    out = []
    for code, div, content in reply.content():
        if div == "+":
            out.append(f"{code}+{content.splitlines()[0] if content else ''}")
            out += content.splitlines()[1:] + ["."]
        else:
            out.append(f"{code}{div}{content}")
    return out


def serve_client(conn: socket.socket, s: Session, up: Upstream,
                 ledger: Ledger | None = None) -> None:
    """One workstation's connection, until it quits, misbehaves or idles out. Its onion
    services are made on a control connection of its own, closed when it ends (tor then
    removes them), and count against its workstation's cap."""
    ledger = ledger or Ledger()
    try:
        _serve(conn, s, up, ledger)
    finally:
        if s.onions:
            ledger.give(s.client, len(s.onions))
        if s.conversation is not None:
            s.conversation.close()


def _serve(conn: socket.socket, s: Session, up: Upstream, ledger: Ledger) -> None:
    conn.settimeout(IDLE)
    buf = b""
    with contextlib.suppress(OSError):
        while True:
            while b"\n" not in buf:
                if len(buf) > MAX_LINE:
                    _refuse_and_close(conn, b"500 Line too long\r\n")
                    return
                chunk = conn.recv(4096)
                if not chunk:
                    return
                buf += chunk
            raw, buf = buf.split(b"\n", 1)
            raw = raw.rstrip(b"\r")
            if len(raw) > MAX_LINE:
                _refuse_and_close(conn, b"500 Line too long\r\n")
                return
            try:
                line = raw.decode("ascii")
            except UnicodeDecodeError:
                conn.sendall(f"{FILTERED}\r\n".encode())
                continue
            if not line.strip() or any(ord(c) < 32 for c in line):
                conn.sendall(f"{FILTERED}\r\n".encode())
                continue
            what, text = decide(line.strip(), s)
            if what == "ask":
                assert text is not None
                text = _ask(text, s, up, ledger)
            conn.sendall(((text or FILTERED) + "\r\n").encode())
            if line.strip().upper() == "QUIT":
                return


def _ask(line: str, s: Session, up: Upstream, ledger: Ledger) -> str:
    """Tor's reply to an allowed line: onion commands on the session's own connection,
    within the workstation's cap; the rest on the shared one."""
    if line.startswith(("ADD_ONION", "DEL_ONION")):
        if s.conversation is None:
            s.conversation = up.session()
        if line.startswith("ADD_ONION"):
            if not ledger.take(s.client):
                return (f"451 Resource exhausted: at most {ledger.cap} onion services per "
                        "workstation")
            try:
                text = s.conversation.ask(line)
            except Exception:  # noqa: BLE001 - tor gone: nothing was made
                ledger.give(s.client)
                return "451 Resource exhausted"
            if text.startswith("250-ServiceID="):
                s.onions.add(text.split("=", 1)[1].split("\r\n")[0])
            else:
                ledger.give(s.client)
            return text
        text = s.conversation.ask(line)
        if text.startswith("250"):
            gone = line.split(" ", 1)[1]
            if gone in s.onions:
                s.onions.discard(gone)
                ledger.give(s.client)
        return text
    return up.ask(line)


def _refuse_and_close(conn: socket.socket, reply: bytes) -> None:
    """Say why, then close gently: what the client still sends is read and dropped for a
    moment, so the reply is not lost to a reset."""
    conn.sendall(reply)
    conn.shutdown(socket.SHUT_WR)
    conn.settimeout(1.0)
    with contextlib.suppress(OSError):
        for _ in range(256):
            if not conn.recv(65536):
                break


def serve(listener: socket.socket, up: Upstream, socks: str,
          client_of: Any = lambda addr: None, path: str = ALLOWLIST,
          stopping: threading.Event | None = None, cap: int = ONION_CAP) -> None:
    """Accept workstations until `stopping`; each is judged by its own allowlist, and
    holds at most `cap` onion services at a time."""
    ledger = Ledger(cap)
    listener.settimeout(0.5)
    while stopping is None or not stopping.is_set():
        try:
            conn, peer = listener.accept()
        except TimeoutError:
            continue
        s = Session(Allowlist.load(client_of(peer[0]), path), socks, peer[0])

        def run(c: socket.socket = conn, sess: Session = s) -> None:
            with c:
                serve_client(c, sess, up, ledger)
        threading.Thread(target=run, daemon=True).start()


@dataclass
class FilterSpec:
    """The filter's spec file, written by `up` (its go signal)."""

    address: str  # listened on, with `port`
    port: int
    control_socket: str  # tor's
    socks: str  # address:port the workstations' SOCKS goes to
    clients: dict[str, str] = field(default_factory=dict)  # workstation address -> qube
    onions_per_workstation: int = ONION_CAP


def main() -> None:
    """`python -m netstack.tor.filter SPEC.json`, run by the supervisor in the gateway's
    namespace: listen on the gateway's address, port 9051, ask tor's unix socket."""
    from netstack import codec

    spec = codec.read(sys.argv[1], FilterSpec)
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind((spec.address, spec.port))
    lst.listen(16)
    clients = spec.clients
    up = TorUpstream(spec.control_socket, timeout=10.0)
    print("control filter listening", flush=True)
    serve(lst, up, spec.socks, lambda a: clients.get(a), cap=spec.onions_per_workstation)


if __name__ == "__main__":
    main()
