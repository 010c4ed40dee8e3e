"""Lab services on sockets handed over by `up`: an HTTP server that answers each request with
the client address it sees, and a small authoritative DNS server for the lab domain. Both
log who asked, so tests can tell which address reached them.

Every lab service logs one record per connection (TCP) or datagram (UDP) in the same
shape (`conn_record`): proto, the client's address and port and the local (destination)
address and port as this host saw them after NAT, bytes, and the payload mark: the first
up-to-64 bytes the server received, as their length and a short sha256. Tor exits and the
VPN server's NAT rewrite the source tuple but not the stream's bytes, so `netstack check`
finds the flow on the workstation's link by computing the same digest there."""

from __future__ import annotations

import hashlib
import json
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from netstack.dnswire import parse_question


class EventLog:
    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._f = os.fdopen(fd, "a", buffering=1)
        self._lock = threading.Lock()

    def write(self, **rec: Any) -> None:
        rec["t"] = round(time.time(), 3)
        with self._lock:
            self._f.write(json.dumps(rec) + "\n")  # a log, appended a line at a time


MARK_BYTES = 64  # the payload mark covers at most this many first bytes


def mark(data: bytes) -> dict[str, Any]:
    """The payload mark of the first bytes a server received: their length (at most
    MARK_BYTES) and the first 16 hex digits of their sha256."""
    head = data[:MARK_BYTES]
    return {"mark_len": len(head), "mark": hashlib.sha256(head).hexdigest()[:16]}


def conn_record(proto: str, client: tuple[Any, ...], local: tuple[Any, ...] | None,
                first: bytes, **extra: Any) -> dict[str, Any]:
    """The record every lab service writes for a connection or datagram (see the module
    docstring): `check` matches flows on it, so all services must agree on it."""
    rec: dict[str, Any] = {"proto": proto, "client": client[0], "cport": client[1],
                           "dst": local[0] if local else None,
                           "dport": local[1] if local else None}
    rec.update(mark(first))
    rec.update(extra)
    return rec


def peek_first(s: socket.socket, wait: float = 5.0, more: float = 0.03) -> bytes:
    """The first up-to-MARK_BYTES bytes a TCP client sent, left in the socket (MSG_PEEK):
    waits `wait` for the first byte, then up to `more` for the rest of a split first write
    (the mark carries its length, so a shorter one still matches, only less strongly)."""
    try:
        if not select.select([s], [], [], wait)[0]:
            return b""
        got = s.recv(MARK_BYTES, socket.MSG_PEEK)
        end = time.monotonic() + more
        while 0 < len(got) < MARK_BYTES and time.monotonic() < end:
            time.sleep(0.005)
            try:
                got = max(got, s.recv(MARK_BYTES, socket.MSG_PEEK | socket.MSG_DONTWAIT),
                          key=len)
            except BlockingIOError:
                continue
        return got
    except OSError:
        return b""


CHECK_PATH = "/check_network_status.txt"  # lab.isp and connectivity.py say the same
CHECK_BODY = "NetworkManager is online\n"


def serve_http(fd: int, log_path: str) -> None:
    log = EventLog(log_path)

    class Handler(BaseHTTPRequestHandler):
        server_version = "netstack-lab"

        def setup(self) -> None:
            self.first = peek_first(self.request)  # before the handler reads a byte
            super().setup()

        def do_GET(self) -> None:  # noqa: N802
            client = self.client_address[0]
            # NetworkManager's connectivity check URL answers as nmcheck.gnome.org does
            # (netstack/connectivity.py); every other path: the client's address
            body = (CHECK_BODY if self.path == CHECK_PATH else f"{client}\n").encode()
            log.write(**conn_record("tcp", self.client_address, self.request.getsockname(),
                                    self.first, path=self.path,
                                    host=self.headers.get("Host"), bytes_out=len(body)))
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("0.0.0.0", 0), Handler, bind_and_activate=False)
    srv.socket.close()
    srv.socket = socket.socket(fileno=fd)
    srv.daemon_threads = True
    srv.serve_forever()


# --- DNS --------------------------------------------------------------------------------

RCODE_FORMERR = 1  # the reply to what is not a DNS query (written by hand: no message)


ZONE_FILE = "lab-zone.json"  # next to the DNS log: names a test moves, with their TTL


@dataclass
class ZoneEntry:
    a: list[str]
    ttl: int = 60


class Overrides:
    """Names whose answer a test changes while the lab runs ({name: {"a": [addresses],
    "ttl": seconds}} in lab-zone.json beside the log), re-read when the file changes."""

    def __init__(self, path: str) -> None:
        self.path, self.mtime, self.table = path, None, {}

    def get(self) -> dict[str, tuple[list[str], int]]:
        import os

        try:
            m = os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            self.mtime, self.table = None, {}
            return self.table
        if m != self.mtime:
            from netstack import codec
            from netstack.errors import DamagedFile

            try:
                raw = codec.read(self.path, dict[str, ZoneEntry])
                self.table = {n: (list(v.a), v.ttl) for n, v in raw.items()}
                self.mtime = m
            except (OSError, DamagedFile):  # mid-write by a test: the last table holds
                pass
        return self.table


def answer(msg: bytes, zone: dict[str, str], domain_suffixes: tuple[str, ...],
           moved: dict[str, tuple[list[str], int]] | None = None) -> bytes:
    """Authoritative answers for names in `zone` (or `moved`, with their TTL); NXDOMAIN in
    our domain; REFUSED outside; FORMERR for what is not one query. Messages are read and
    written by dnspython."""
    import dns.exception
    import dns.flags
    import dns.message
    import dns.rcode
    import dns.rdataclass
    import dns.rdatatype
    import dns.rrset

    try:
        q = dns.message.from_wire(msg)
        if len(q.question) != 1 or q.flags & dns.flags.QR:
            raise ValueError("one query expected")
    except (dns.exception.DNSException, ValueError, UnicodeError):
        if len(msg) >= 2:
            return msg[:2] + struct.pack("!HHHHH", 0x8000 | RCODE_FORMERR, 0, 0, 0, 0)
        return b""
    question = q.question[0]
    qname = question.name.to_text(omit_final_dot=True).lower()
    addrs, ttl = (moved or {}).get(qname) or ([zone[qname]] if qname in zone else None, 60)
    ours = any(qname == s or qname.endswith("." + s) for s in domain_suffixes)
    if addrs is None and not ours and "*" in zone:  # the offline internet: every name
        addrs, ttl = [zone["*"]], 60
    r = dns.message.make_response(q)
    r.flags |= dns.flags.AA
    r.set_rcode(dns.rcode.NOERROR if addrs is not None else
                dns.rcode.NXDOMAIN if ours else dns.rcode.REFUSED)
    if addrs is not None and question.rdtype in (dns.rdatatype.A, dns.rdatatype.ANY):
        r.answer.append(dns.rrset.from_text_list(question.name, ttl, dns.rdataclass.IN,
                                                 dns.rdatatype.A, list(addrs)))
    return r.to_wire()


def serve_dns(udp_fd: int, tcp_fd: int, zone: dict[str, str], log_path: str) -> None:
    import os

    log = EventLog(log_path)
    moved = Overrides(os.path.join(os.path.dirname(log_path), ZONE_FILE))
    suffixes = tuple(sorted({n.split(".", 1)[1] for n in zone if "." in n and n != "*"}))
    udp = socket.socket(fileno=udp_fd)
    tcp = socket.socket(fileno=tcp_fd)
    local = udp.getsockname()  # bound to the DNS host's own address (plan.py)

    def udp_loop() -> None:
        while True:
            msg, peer = udp.recvfrom(4096)
            try:
                name = parse_question(msg)[2]
            except (ValueError, IndexError, UnicodeDecodeError):
                name = None
            log.write(**conn_record("udp", peer, local, msg, name=name, bytes_in=len(msg)))
            reply = answer(msg, zone, suffixes, moved.get())
            if reply:
                udp.sendto(reply, peer)

    def tcp_conn(c: socket.socket, peer: tuple[str, int]) -> None:
        with c:
            c.settimeout(5)
            first = True
            try:
                while True:
                    hdr = c.recv(2, socket.MSG_WAITALL)
                    if len(hdr) < 2:
                        return
                    msg = c.recv(struct.unpack("!H", hdr)[0], socket.MSG_WAITALL)
                    try:
                        name = parse_question(msg)[2]
                    except (ValueError, IndexError, UnicodeDecodeError):
                        name = None
                    if first:
                        log.write(**conn_record("tcp", peer, c.getsockname(), hdr + msg,
                                                name=name, bytes_in=len(hdr) + len(msg)))
                        first = False
                    else:  # later queries on the same connection: no mark of their own
                        log.write(proto="tcp", client=peer[0], cport=peer[1], name=name)
                    reply = answer(msg, zone, suffixes, moved.get())
                    c.sendall(struct.pack("!H", len(reply)) + reply)
            except OSError:
                return

    def tcp_loop() -> None:
        while True:
            c, peer = tcp.accept()
            threading.Thread(target=tcp_conn, args=(c, peer), daemon=True).start()

    threading.Thread(target=udp_loop, daemon=True).start()
    tcp_loop()
