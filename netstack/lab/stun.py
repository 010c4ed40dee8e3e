"""The lab's STUN server (RFC 5389 binding responder on UDP 3478): a browser's WebRTC ICE
gathering asks it for the address it is seen from. Behind Tor that request must never leave
(UDP cannot go through Tor: the gateway stops it); behind a VPN it leaves through the
tunnel and the answer names the VPN server's address. Every request is logged in the lab
services' JSON-lines form (EventLog) with the address it came from, so a test can tell
which way it arrived."""

from __future__ import annotations

import argparse
import binascii
import socket
import struct

MAGIC = 0x2112A442
BINDING_REQUEST, BINDING_SUCCESS = 0x0001, 0x0101
MAPPED_ADDRESS, XOR_MAPPED_ADDRESS, SOFTWARE, FINGERPRINT = 0x0001, 0x0020, 0x8022, 0x8028
FINGERPRINT_XOR = 0x5354554E
PORT = 3478


def _attr(kind: int, value: bytes) -> bytes:
    pad = b"\0" * (-len(value) % 4)
    return struct.pack("!HH", kind, len(value)) + value + pad


def parse_request(msg: bytes) -> bytes | None:
    """The transaction id of a well-formed binding request (RFC 5389 header with the magic
    cookie), else None: anything else gets no answer, as a real server would do."""
    if len(msg) < 20:
        return None
    kind, length, cookie = struct.unpack("!HHI", msg[:8])
    if kind != BINDING_REQUEST or cookie != MAGIC or length % 4 or 20 + length > len(msg):
        return None
    return msg[8:20]


def binding_response(txid: bytes, addr: str, port: int) -> bytes:
    """A success response with XOR-MAPPED-ADDRESS (and MAPPED-ADDRESS for old clients),
    SOFTWARE and FINGERPRINT (CRC-32 of the message so far, XORed with 'STUN')."""
    raw = socket.inet_aton(addr)
    xport = port ^ (MAGIC >> 16)
    xaddr = bytes(a ^ b for a, b in zip(raw, struct.pack("!I", MAGIC), strict=True))
    attrs = (_attr(XOR_MAPPED_ADDRESS, struct.pack("!BBH", 0, 1, xport) + xaddr)
             + _attr(MAPPED_ADDRESS, struct.pack("!BBH", 0, 1, port) + raw)
             + _attr(SOFTWARE, b"netstack-lab"))
    head = struct.pack("!HHI", BINDING_SUCCESS, len(attrs) + 8, MAGIC) + txid
    crc = binascii.crc32(head + attrs) ^ FINGERPRINT_XOR
    return head + attrs + _attr(FINGERPRINT, struct.pack("!I", crc & 0xFFFFFFFF))


def mapped_address(resp: bytes) -> tuple[str, int] | None:
    """The XOR-MAPPED-ADDRESS of a binding response (for tests and probes)."""
    i = 20
    while i + 4 <= len(resp):
        kind, n = struct.unpack("!HH", resp[i:i + 4])
        v = resp[i + 4:i + 4 + n]
        if kind == XOR_MAPPED_ADDRESS and len(v) == 8:
            port = struct.unpack("!H", v[2:4])[0] ^ (MAGIC >> 16)
            addr = bytes(a ^ b for a, b in zip(v[4:], struct.pack("!I", MAGIC), strict=True))
            return socket.inet_ntoa(addr), port
        i += 4 + n + (-n % 4)
    return None


def serve(bind: str, log_path: str, port: int = PORT) -> None:
    from netstack.lab.services import EventLog, conn_record

    log = EventLog(log_path)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((bind, port))
    while True:
        msg, peer = s.recvfrom(2048)
        txid = parse_request(msg)
        log.write(**conn_record("udp", peer, (bind, port), msg, bytes_in=len(msg),
                                stun="binding" if txid else None))
        if txid is not None:
            s.sendto(binding_response(txid, peer[0], peer[1]), peer)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="the lab's STUN binding responder")
    ap.add_argument("--bind", required=True)
    ap.add_argument("--log", required=True)
    a = ap.parse_args(argv)
    serve(a.bind, a.log)


if __name__ == "__main__":
    main()
