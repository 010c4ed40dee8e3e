"""sys-net's connectivity check, the way NetworkManager does it: an HTTP GET of a known URL
(`connectivity_check = "http://..."` in the net qube's table; in a hostile-ISP lab the lab's
web host) whose answer is known byte for byte. The same answer: the network is open
(`full`); another answer (a redirect, a login page): something between us and the internet
rewrites HTTP, a captive portal (`portal`); no answer at all: `limited`. It runs in sys-net's
namespace, from sys-net's own address, as NetworkManager runs on a Qubes sys-net: one GET in
clear, which any network can see and which says nothing of what the chain carries.

Only `status` runs it (on demand; 2 s at most), never a background loop."""

from __future__ import annotations

import socket
import time
from typing import Any
from urllib.parse import urlsplit

from netstack import netns

EXPECT = "NetworkManager is online\n"  # the body the check URL answers (lab.isp.CHECK_BODY)
TIMEOUT = 2.0


def classify(status: int | None, headers: dict[str, str], body: bytes,
             expect: str = EXPECT) -> tuple[str, str]:
    """(state, why) from one answer (pure): NetworkManager's states full/portal/limited."""
    if status is None:
        return "limited", "no answer"
    if status == 200 and body.decode(errors="replace") == expect:
        return "full", "the expected answer"
    if 300 <= status < 400:
        return "portal", f"HTTP {status} to {headers.get('location', '?')}"
    return "portal", f"HTTP {status} with another body ({len(body)} bytes)"


def check(ns: str, url: str, resolver: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The check from inside namespace `ns`, the URL's name asked of `resolver` there.
    Returns {"url", "state", "why", "address", "seconds"}."""
    t0 = time.monotonic()
    u = urlsplit(url)
    host, port = u.hostname or "", u.port or 80
    out: dict[str, Any] = {"url": url, "address": None}
    try:
        try:
            socket.inet_aton(host)
            addr = host
        except OSError:
            from netstack.dnswire import resolve_in

            addr = resolve_in(ns, resolver, host, timeout=timeout / 2, tries=1)[0]
        out["address"] = addr
        with netns.entered(ns):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with s:
            s.settimeout(max(0.1, timeout - (time.monotonic() - t0)))
            s.connect((addr, port))
            path = (u.path or "/") + (f"?{u.query}" if u.query else "")
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: netstack "
                      "connectivity check\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while len(data) < 65536:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode(errors="replace").split("\r\n")
        status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else None
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (x.partition(":") for x in lines[1:])}
        out["state"], out["why"] = classify(status, headers, body)
    except Exception as e:  # noqa: BLE001 - any failure on the way is "no answer"
        out["state"], out["why"] = "limited", f"no answer ({str(e)[:100] or type(e).__name__})"
    out["seconds"] = round(time.monotonic() - t0, 3)
    return out
