#!/usr/bin/python3
"""netstack-call TARGET SERVICE[+ARG]: ask for a service in another qube, from inside an
app qube's sandbox (the peer of Qubes' qrexec-client-vm; docs/calls.md).

This file runs inside the sandbox, with the host's /usr/bin/python3 and nothing of
netstack: it imports only the standard library. It is bound into every app qube's sandbox
at /run/netstack-call/netstack-call, beside the qube's one call socket (`sock`). Who calls
is never said here: the host knows the qube by the socket the call came in on.

The wire: this side sends one line `TARGET SERVICE[+ARG]\\n`, then its stdin as raw bytes
and a half-close at its end. The host answers in frames (1 type byte, 4-byte big-endian
length, payload): `O` the service's stdout, `X` its exit code (4 bytes, signed), `R` the
call was refused. Exit code: the service's; 126 refused; 125 the call layer failed."""

import contextlib
import os
import socket
import struct
import sys
import threading
import time

SOCKET = os.environ.get("NETSTACK_CALL_SOCKET", "/run/netstack-call/sock")
REFUSED, BROKEN = 126, 125
CONNECT_WAIT = 5.0  # seconds: the host makes the socket when the stack's supervisor starts


def _connect() -> socket.socket:
    end = time.monotonic() + CONNECT_WAIT
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(SOCKET)
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if time.monotonic() >= end:
                raise
            time.sleep(0.05)


def _pump_stdin(s: socket.socket) -> None:
    fd = sys.stdin.fileno() if sys.stdin is not None else -1
    try:
        while fd >= 0:
            data = os.read(fd, 65536)
            if not data:
                break
            s.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_WR)


def _read(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        print("usage: netstack-call TARGET SERVICE[+ARG]   (e.g. netstack-call personal "
              "my.Echo+hello < file)", file=sys.stderr)
        return 2
    target, service = argv
    if any(c in target + service for c in " \n\0"):
        print("netstack-call: no spaces, newlines or NULs in TARGET or SERVICE",
              file=sys.stderr)
        return 2
    try:
        s = _connect()
    except OSError as e:
        print(f"netstack-call: no call socket at {SOCKET} ({e.strerror})", file=sys.stderr)
        return BROKEN
    s.sendall(f"{target} {service}\n".encode())
    threading.Thread(target=_pump_stdin, args=(s,), daemon=True).start()
    out = sys.stdout.buffer
    try:
        while True:
            kind, n = struct.unpack(">cI", _read(s, 5))
            payload = _read(s, n)
            if kind == b"O":
                out.write(payload)
                out.flush()
            elif kind == b"X":
                return struct.unpack(">i", payload)[0]
            elif kind == b"R":
                print(f"netstack-call: {payload.decode(errors='replace')}", file=sys.stderr)
                return REFUSED
    except (EOFError, OSError):
        print("netstack-call: the call layer closed the call", file=sys.stderr)
        return BROKEN


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)
