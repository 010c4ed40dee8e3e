"""obfs4 bridges: the bridge lines users write, and the lab's own obfs4 bridge, whose
identity is made before it starts so `up` can hand its line to the gateway at once.

A bridge line: `obfs4 ADDR:PORT [FINGERPRINT] cert=BASE64 iat-mode=0|1|2`. The cert is the
bridge's node id (20 bytes) and its Curve25519 public key (32 bytes), base64 without
padding; obfs4proxy keeps them in `pt_state/obfs4_state.json`, which we write ourselves
(X25519 of RFC 7748, a few lines of arithmetic, so no crypto library is needed)."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re

from netstack.errors import ConfigError

TRANSPORTS = ("obfs4",)  # what Debian's obfs4proxy serves, and so what we ship
OBFS4_PORT = 5443
LAB_REF = "lab:obfs4"
P = 2**255 - 19
A24 = 121665


def x25519(k: bytes, u: bytes) -> bytes:
    """RFC 7748 scalar multiplication on Curve25519 (the Montgomery ladder)."""
    kn = int.from_bytes(k, "little")
    kn &= ~7
    kn &= ~(128 << 8 * 31)
    kn |= 64 << 8 * 31
    x1 = int.from_bytes(u, "little") & ((1 << 255) - 1)
    x2, z2, x3, z3, swap = 1, 0, x1, 1, 0
    for t in reversed(range(255)):
        kt = (kn >> t) & 1
        swap ^= kt
        if swap:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = kt
        a, b = (x2 + z2) % P, (x2 - z2) % P
        aa, bb = a * a % P, b * b % P
        e = (aa - bb) % P
        c, d = (x3 + z3) % P, (x3 - z3) % P
        da, cb = d * a % P, c * b % P
        x3, z3 = (da + cb) ** 2 % P, x1 * (da - cb) ** 2 % P
        x2, z2 = aa * bb % P, e * (aa + A24 * e) % P
    if swap:
        x2, x3, z2, z3 = x3, x2, z3, z2
    return (x2 * pow(z2, P - 2, P) % P).to_bytes(32, "little")


def make_state(pt_state: str) -> str:
    """Write a new obfs4 bridge identity; returns its cert (for the bridge line)."""
    node_id, priv, seed = os.urandom(20), os.urandom(32), os.urandom(24)
    pub = x25519(priv, (9).to_bytes(32, "little"))
    os.makedirs(pt_state, mode=0o700, exist_ok=True)
    with open(os.path.join(pt_state, "obfs4_state.json"), "w") as f:
        json.dump({"node-id": node_id.hex(), "private-key": priv.hex(),
                   "public-key": pub.hex(), "drbg-seed": seed.hex(), "iat-mode": 0}, f)
    return base64.b64encode(node_id + pub).decode().rstrip("=")


def parse_line(where: str, line: str) -> None:
    """A bridge line we can use, or a ConfigError naming what is wrong with it."""
    if line == LAB_REF:
        return
    fix = 'e.g. "obfs4 192.0.2.7:443 cert=AbC... iat-mode=0" (from bridges.torproject.org)'
    words = line.split()
    if not words:
        raise ConfigError(where, "is empty", fix)
    transport = words[0]
    if transport not in TRANSPORTS:
        raise ConfigError(where, f"transport {transport!r} is not shipped (only "
                          f"{', '.join(TRANSPORTS)}: Debian's obfs4proxy)", fix)
    if len(words) < 3:
        raise ConfigError(where, "needs an address:port and cert=", fix)
    host, _, port = words[1].rpartition(":")
    try:
        ipaddress.ip_address(host.strip("[]"))
        ok = port.isdigit() and 0 < int(port) < 65536
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(where, f"{words[1]!r} is not an address:port", fix)
    rest = words[2:]
    if rest and re.fullmatch(r"[0-9A-Fa-f]{40}", rest[0]):
        rest = rest[1:]
    args = dict(w.split("=", 1) for w in rest if "=" in w)
    if len(args) != len(rest) or not re.fullmatch(r"[A-Za-z0-9+/]{60,80}", args.get("cert", "")):
        raise ConfigError(where, "needs cert=BASE64 (and only key=value arguments)", fix)
    if args.get("iat-mode", "0") not in ("0", "1", "2"):
        raise ConfigError(where, "iat-mode must be 0, 1 or 2", fix)
