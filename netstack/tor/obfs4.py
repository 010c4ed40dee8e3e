"""obfs4 bridges: the bridge lines users write, and the lab's own obfs4 bridge, whose
identity is made before it starts so `up` can hand its line to the gateway at once.

A bridge line: `obfs4 ADDR:PORT [FINGERPRINT] cert=BASE64 iat-mode=0|1|2`. The cert is the
bridge's node id (20 bytes) and its Curve25519 public key (32 bytes), base64 without
padding; obfs4proxy keeps them in `pt_state/obfs4_state.json`, which we write ourselves
(the X25519 key pair from the `cryptography` library: constant time, a kept library)."""

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
def make_state(pt_state: str) -> str:
    """Write a new obfs4 bridge identity; returns its cert (for the bridge line)."""
    from netstack.lab.pki import x25519_pair

    node_id, seed = os.urandom(20), os.urandom(24)
    priv, pub = x25519_pair()
    os.makedirs(pt_state, mode=0o700, exist_ok=True)
    # not codec: obfs4proxy's/lyrebird's own state file, in its format (read by it)
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
