"""Live health of a VPN qube for `status`: tunnel up/down, handshake age (WireGuard) or
connection state (OpenVPN management socket), bytes in/out, restarts. No keys, ever."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from typing import Any

from netstack.vpn.info import VpnInfo


def _wg_dump(dev: str, ns: str | None = None) -> dict[str, Any]:
    """`wg show DEV dump`, run inside `ns`: a kernel WireGuard device exists only in its
    namespace (wireguard-go's control socket is a path every namespace sees, so `wg` found
    it from anywhere; the kernel's device was never found and its tunnel always showed
    "no handshake": seen in scripts/test-host's VM, docs/field-notes.md)."""
    from netstack import netns

    try:
        with netns.entered(ns):  # the child is forked from this thread, in `ns`
            p = subprocess.run(["wg", "show", dev, "dump"], capture_output=True, text=True)
    except OSError:  # the namespace is gone
        return {}
    if p.returncode != 0:
        return {}
    lines = p.stdout.strip().splitlines()
    peers = []
    for line in lines[1:]:
        f = line.split("\t")
        if len(f) < 8:
            continue
        hs = int(f[4])
        peers.append({"endpoint": f[2], "handshake_age_s": round(time.time() - hs, 1)
                      if hs else None, "rx_bytes": int(f[5]), "tx_bytes": int(f[6])})
    return {"peers": peers}


def _ovpn_state(sock_path: str) -> str | None:
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
        s.settimeout(1)
        s.connect(sock_path)
        buf = b""
        s.sendall(b"state\n")
        end = time.monotonic() + 1
        while b"\r\nEND" not in buf and time.monotonic() < end:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
        for line in buf.decode(errors="replace").splitlines():
            parts = line.split(",")
            if len(parts) > 1 and parts[0].isdigit():
                return parts[1]
    return None


def health(vpn: VpnInfo, links: list[Any], child: dict[str, Any] | None,
           resolved: dict[str, list[str]] | None) -> dict[str, Any]:
    """links: kernel.LinkState of the qube's namespace; child: the supervisor's record of
    the tunnel daemon (with "alive")."""
    link = next((x for x in links if x.name == vpn.dev), None)
    known = {**(resolved or {}), **vpn.literal()}
    out: dict[str, Any] = {
        "type": vpn.type, "backend": vpn.backend, "dev": vpn.dev,
        "endpoints": [{"host": e.host, "port": e.port, "proto": e.proto,
                       "addresses": known.get(e.host, [])} for e in vpn.endpoints],
        "dns": vpn.dns, "tunnel": "up" if link and link.addresses else "down",
        "rx_bytes": link.rx_bytes if link else None,
        "tx_bytes": link.tx_bytes if link else None,
        "restarts": child.get("restarts", 0) if child else None,
        "process_alive": bool(child and child.get("alive")),
    }
    if vpn.type == "wireguard" and link:
        peers = _wg_dump(vpn.dev, vpn.netns if vpn.backend == "kernel" else None) \
            .get("peers", [])
        ages = [p["handshake_age_s"] for p in peers if p["handshake_age_s"] is not None]
        out["handshake_age_s"] = min(ages) if ages else None
        if out["handshake_age_s"] is None or out["handshake_age_s"] > 180:
            out["tunnel"] = "down"  # no handshake for 3 minutes: nothing gets through
    elif vpn.type == "openvpn":
        state = _ovpn_state(vpn.mgmt_sock)
        out["state"] = state
        if state != "CONNECTED":
            out["tunnel"] = "down"
    return out
