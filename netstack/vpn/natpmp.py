"""NAT-PMP (RFC 6886) on the wire, both ends, pure: the requests a VPN qube sends its
provider's gateway through the tunnel (ProtonVPN answers on the tunnel's gateway address,
10.2.0.1, port 5351) and the answers a gateway sends back; the lab's VPN server speaks the
server half (netstack/lab/natpmpd.py). No sockets here: bytes in, typed values out, and a
malformed datagram is a NatPmpError, never a guess.

Layouts (network byte order, RFC 6886 section 3):
  external address request   ver=0 op=0                                   2 bytes
  external address response  ver=0 op=128 result epoch address           12 bytes
  mapping request            ver=0 op=1|2 reserved internal suggested lifetime  12 bytes
  mapping response           ver=0 op=129|130 result epoch internal external lifetime  16
  any error response         ver=0 op=128+op result epoch                  8 bytes
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

PORT = 5351  # the gateway's NAT-PMP port (RFC 6886 section 3.1)
VERSION = 0
OP_ADDRESS, OP_MAP_UDP, OP_MAP_TCP = 0, 1, 2
OPS = {"udp": OP_MAP_UDP, "tcp": OP_MAP_TCP}
PROTO_OF = {v: k for k, v in OPS.items()}
RESPONSE = 128
# result codes (section 3.5)
SUCCESS, UNSUPPORTED_VERSION, REFUSED, NETWORK_FAILURE, NO_RESOURCES, UNSUPPORTED_OP = range(6)
RESULT_TEXT = {SUCCESS: "success", UNSUPPORTED_VERSION: "unsupported version",
               REFUSED: "not authorized or refused", NETWORK_FAILURE: "network failure",
               NO_RESOURCES: "out of resources", UNSUPPORTED_OP: "unsupported opcode"}
# the client's retransmission (section 3.1): 250 ms, doubled on each try
FIRST_WAIT = 0.25


class NatPmpError(ValueError):
    """A datagram that is not the NAT-PMP message expected (short, wrong version or op)."""


@dataclass(frozen=True)
class MapRequest:
    proto: str  # udp | tcp
    internal: int  # the client's port (ProtonVPN ignores it: the public port is the port)
    suggested: int  # 0: any
    lifetime: int  # seconds; 0 deletes the mapping


@dataclass(frozen=True)
class MapResponse:
    proto: str
    result: int
    epoch: int  # the gateway's seconds since its mappings were last lost
    internal: int = 0
    external: int = 0  # the public port the gateway forwards
    lifetime: int = 0  # granted, seconds

    @property
    def ok(self) -> bool:
        return self.result == SUCCESS


@dataclass(frozen=True)
class AddressResponse:
    result: int
    epoch: int
    address: str = "0.0.0.0"  # the gateway's public IPv4


def address_request() -> bytes:
    return struct.pack("!BB", VERSION, OP_ADDRESS)


def map_request(r: MapRequest) -> bytes:
    if r.proto not in OPS:
        raise NatPmpError(f"no NAT-PMP mapping for protocol {r.proto!r}")
    return struct.pack("!BBHHHI", VERSION, OPS[r.proto], 0, r.internal, r.suggested,
                       r.lifetime)


def _head(data: bytes) -> tuple[int, int]:
    if len(data) < 2:
        raise NatPmpError(f"{len(data)} bytes: shorter than a NAT-PMP header")
    ver, op = data[0], data[1]
    if ver != VERSION:
        raise NatPmpError(f"version {ver}: only NAT-PMP version 0 is spoken")
    return ver, op


def parse_request(data: bytes) -> MapRequest | None:
    """A request as the gateway reads it: a MapRequest, or None for an address request.
    Unknown ops and lengths raise NatPmpError (the server answers those with a result
    code, see error_response)."""
    _ver, op = _head(data)
    if op == OP_ADDRESS:
        if len(data) != 2:
            raise NatPmpError(f"address request of {len(data)} bytes (2 expected)")
        return None
    if op not in PROTO_OF:
        raise NatPmpError(f"opcode {op} is not a request this gateway knows")
    if len(data) != 12:
        raise NatPmpError(f"mapping request of {len(data)} bytes (12 expected)")
    _v, _o, _res, internal, suggested, lifetime = struct.unpack("!BBHHHI", data)
    return MapRequest(PROTO_OF[op], internal, suggested, lifetime)


def address_response(epoch: int, address: str, result: int = SUCCESS) -> bytes:
    return struct.pack("!BBHI", VERSION, RESPONSE + OP_ADDRESS, result, epoch) + \
        ipaddress.IPv4Address(address).packed


def map_response(r: MapResponse) -> bytes:
    return struct.pack("!BBHIHHI", VERSION, RESPONSE + OPS[r.proto], r.result, r.epoch,
                       r.internal, r.external, r.lifetime)


def error_response(op: int, result: int, epoch: int) -> bytes:
    return struct.pack("!BBHI", VERSION, (RESPONSE + op) & 0xFF, result, epoch)


def parse_map_response(data: bytes, proto: str) -> MapResponse:
    """The gateway's answer to a mapping request for `proto`; an error answer (8 bytes)
    comes back as a MapResponse whose result says why."""
    _ver, op = _head(data)
    if op != RESPONSE + OPS[proto]:
        raise NatPmpError(f"opcode {op}: not the answer to a {proto} mapping request")
    if len(data) < 8:
        raise NatPmpError(f"{len(data)} bytes: shorter than a NAT-PMP answer")
    _v, _o, result, epoch = struct.unpack("!BBHI", data[:8])
    if result != SUCCESS:
        return MapResponse(proto, result, epoch)
    if len(data) != 16:
        raise NatPmpError(f"mapping answer of {len(data)} bytes (16 expected)")
    _v, _o, _r, _e, internal, external, lifetime = struct.unpack("!BBHIHHI", data)
    return MapResponse(proto, result, epoch, internal, external, lifetime)


def parse_address_response(data: bytes) -> AddressResponse:
    _ver, op = _head(data)
    if op != RESPONSE + OP_ADDRESS:
        raise NatPmpError(f"opcode {op}: not the answer to an address request")
    if len(data) < 8:
        raise NatPmpError(f"{len(data)} bytes: shorter than a NAT-PMP answer")
    _v, _o, result, epoch = struct.unpack("!BBHI", data[:8])
    if result != SUCCESS:
        return AddressResponse(result, epoch)
    if len(data) != 12:
        raise NatPmpError(f"address answer of {len(data)} bytes (12 expected)")
    return AddressResponse(result, epoch, str(ipaddress.IPv4Address(data[8:12])))


def result_text(code: int) -> str:
    return RESULT_TEXT.get(code, f"result code {code}")
