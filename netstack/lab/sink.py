"""The lab's offline internet (`up --lab --sink`, and every `netstack check`): the lab DNS
answers every name outside the lab's own domain with the sink host, whose namespace sends
every TCP connection and UDP datagram, whatever its port, to this one service
(INetSim-style). TCP: HTTP answered with 200; TLS (a first byte 0x16) terminated with a
certificate for the name the client asked (SNI), signed by a lab CA made at the first start
(`check` hands it to the program under test through the usual environment variables);
anything else gets a short banner. UDP: answered with a short datagram. Every connection
and datagram is logged in the lab's common record (services.conn_record): who came (a Tor
exit, the VPN server, sys-net's ISP address) from which port, the address and port the
client asked for (SO_ORIGINAL_DST, before the redirect), the payload mark, the name (Host
or SNI) and the bytes, which is what `check` reports."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import threading
from typing import Any

from netstack.lab.services import EventLog, conn_record, peek_first

PORT = 9  # every TCP and UDP port of the sink is redirected here
SO_ORIGINAL_DST = 80
CA_CERT, CA_KEY = "sink-ca.pem", "sink-ca.key"
BANNER = b"netstack lab sink\r\n"


def ca_path(lab_dir: str) -> str:
    return os.path.join(lab_dir, CA_CERT)


def make_ca(lab_dir: str) -> None:
    """The lab CA (EC P-256, ten days; netstack.lab.pki): made once per lab; only `check`
    hands it out."""
    from netstack.lab import pki

    cert, key = ca_path(lab_dir), os.path.join(lab_dir, CA_KEY)
    if os.path.exists(cert) and os.path.exists(key):
        return
    os.makedirs(lab_dir, mode=0o700, exist_ok=True)  # in the stack's directory: gone at down
    ca = pki.make_ca("netstack lab CA", days=10)
    pki.write_private(key, ca.key_pem)
    with open(cert, "wb") as f:
        f.write(ca.cert_pem)
    os.chmod(cert, 0o644)


class Certs:
    """A certificate per name asked (SNI), signed by the lab CA, made on first use."""

    def __init__(self, lab_dir: str) -> None:
        self.dir = os.path.join(lab_dir, "sink-certs")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.lab_dir = lab_dir
        self.lock = threading.Lock()
        self.contexts: dict[str, ssl.SSLContext] = {}
        self.ca: Any = None

    def context(self, name: str) -> ssl.SSLContext:
        from netstack.lab import pki

        name = name if name and all(c.isalnum() or c in ".-" for c in name) and \
            len(name) < 254 else "sink.lab.test"
        with self.lock:
            ctx = self.contexts.get(name)
            if ctx is not None:
                return ctx
            if self.ca is None:
                with open(ca_path(self.lab_dir), "rb") as c, \
                        open(os.path.join(self.lab_dir, CA_KEY), "rb") as k:
                    self.ca = pki.Issued(k.read(), c.read())
            leaf = pki.issue(self.ca, name, days=10, usage="server", dns_names=(name,))
            key, crt = (os.path.join(self.dir, f"{name}.{x}") for x in ("key", "pem"))
            pki.write_private(key, leaf.key_pem)
            with open(crt, "wb") as f:
                f.write(leaf.cert_pem)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(crt, key)
            self.contexts[name] = ctx
            return ctx


def original_dst(s: socket.socket) -> tuple[str, int]:
    """Where the client was going before the sink's redirect (conntrack's record)."""
    raw = s.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack("!2xH4s8x", raw)
    return socket.inet_ntoa(addr), port


def _http(data: bytes) -> tuple[str | None, str | None]:
    """(Host, path) of an HTTP request, or (None, None)."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1", "replace").split("\r\n")
    parts = head[0].split(" ") if head else []
    if len(parts) < 3 or not parts[2].startswith("HTTP/"):
        return None, None
    host = next((h.split(":", 1)[1].strip() for h in head[1:]
                 if h.lower().startswith("host:")), None)
    return host, parts[1]


def _serve_tcp(c: socket.socket, peer: tuple[str, int], log: EventLog, certs: Certs) -> None:
    try:
        local: tuple[str, int] | None = original_dst(c)
    except OSError:
        local = None
    rec = conn_record("tcp", peer, local, peek_first(c), tls=False, bytes_in=0, bytes_out=0)
    conn: Any = c
    logged = False
    try:
        c.settimeout(5)
        first = c.recv(1, socket.MSG_PEEK)
        if first == b"\x16":
            sni: list[str] = []
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.sni_callback = lambda so, name, _c: (  # noqa: E731
                sni.append(name or ""), setattr(so, "context", certs.context(name or "")))[-1]
            ctx.load_cert_chain(*_default_pair(certs))
            conn = ctx.wrap_socket(c, server_side=True)
            rec.update(tls=True, sni=sni[0] if sni else None)
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 65536:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
            if not data[:1].isalpha():
                break  # not HTTP: one read is enough
        rec["bytes_in"] = len(data)
        host, path = _http(data)
        if path is not None:
            body = f"netstack lab sink: {host or rec.get('sni') or '-'}{path}\n".encode()
            reply = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            rec.update(host=host, path=path)
        else:
            reply = BANNER
        rec["bytes_out"] = len(reply)
        log.write(**rec)  # before the reply: the client may exit (and check read) at once
        logged = True
        conn.sendall(reply)
    except (OSError, ssl.SSLError, ValueError) as e:
        rec["error"] = str(e)[:120]
    finally:
        if not logged:
            log.write(**rec)
        with contextlib.suppress(OSError):
            conn.close()


def _default_pair(certs: Certs) -> tuple[str, str]:
    certs.context("sink.lab.test")
    return (os.path.join(certs.dir, "sink.lab.test.pem"),
            os.path.join(certs.dir, "sink.lab.test.key"))


def serve(tcp_fd: int, udp_fd: int, lab_dir: str, log_path: str) -> None:
    """Run the sink (a supervisor service thread; never returns)."""
    log = EventLog(log_path)
    make_ca(lab_dir)
    certs = Certs(lab_dir)
    tcp = socket.socket(fileno=tcp_fd)
    udp = socket.socket(fileno=udp_fd)

    def udp_loop() -> None:
        while True:
            msg, peer = udp.recvfrom(65535)
            # the redirect rewrote the destination and the kernel keeps the original only
            # in conntrack (SO_ORIGINAL_DST is TCP's): datagrams match by their mark
            log.write(**conn_record("udp", peer, None, msg, bytes_in=len(msg)))
            with contextlib.suppress(OSError):
                udp.sendto(BANNER, peer)

    threading.Thread(target=udp_loop, daemon=True).start()
    while True:
        c, peer = tcp.accept()
        threading.Thread(target=_serve_tcp, args=(c, peer, log, certs), daemon=True).start()
