"""Structured records in systemd's journal, without libsystemd or python3-systemd: the
native protocol (systemd.journal-fields(7), "Native Journal Protocol") is datagrams of
`FIELD=value` lines to /run/systemd/journal/socket, a value holding a newline sent as the
field's name, a newline, its length as 64-bit little-endian and the bytes.

Used when netstack runs under systemd (INVOCATION_ID, set for every process of a unit, is
in the environment; the supervisor inherits it from `up`), so `journalctl -u
netstack@NAME NETSTACK_EVENT=daemon-exit` or `-o json` finds the chain's events by field:
NETSTACK_STACK, NETSTACK_EVENT, NETSTACK_QUBE, NETSTACK_DAEMON, ... A record is sent and
forgotten: a journal that is gone or full never stops or fails the chain. NETSTACK_JOURNAL=1
or 0 forces it on or off (tests, a foreground run whose user wants it).
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import re
import socket
import struct
import sys
from collections.abc import Mapping

SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "netstack"
# syslog priorities (journalctl -p)
ERR, WARNING, NOTICE, INFO, DEBUG = 3, 4, 5, 6, 7
_FIELD = re.compile(r"[A-Z0-9][A-Z0-9_]{0,63}")


def wanted(env: Mapping[str, str] | None = None, socket_path: str = SOCKET) -> bool:
    """Records go to the journal: forced by NETSTACK_JOURNAL, else when systemd started
    this process (INVOCATION_ID) and the journal's socket is there."""
    env = os.environ if env is None else env
    forced = env.get("NETSTACK_JOURNAL")
    if forced in ("0", "1"):
        return forced == "1"
    return "INVOCATION_ID" in env and os.path.exists(socket_path)


def stderr_is_journal(env: Mapping[str, str] | None = None, fd: int | None = None) -> bool:
    """systemd connected our stderr (or `fd`) to the journal (JOURNAL_STREAM is "DEV:INODE"
    of that stream, systemd.exec(5)): a plain line there would repeat a structured
    record."""
    env = os.environ if env is None else env
    try:
        dev, ino = (int(x) for x in env.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(sys.stderr.fileno() if fd is None else fd)
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def encode(fields: Mapping[str, object]) -> bytes:
    """The datagram for these fields (pure). Names are upper-cased; a name the journal
    would refuse (it drops the whole record) is a programming error."""
    out = bytearray()
    for name, value in fields.items():
        key = name.upper()
        if not _FIELD.fullmatch(key):
            raise ValueError(f"journal field name {name!r}")
        data = value if isinstance(value, bytes) else str(value).encode()
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def record(message: str, priority: int = INFO, **fields: object) -> dict[str, object]:
    """MESSAGE, PRIORITY, SYSLOG_IDENTIFIER and the caller's fields as NETSTACK_NAME (pure;
    None values left out)."""
    rec: dict[str, object] = {"MESSAGE": message, "PRIORITY": priority,
                              "SYSLOG_IDENTIFIER": IDENTIFIER}
    for k, v in fields.items():
        if v is not None:
            rec[f"NETSTACK_{k.upper()}"] = v
    return rec


def send(message: str, priority: int = INFO, *, socket_path: str = SOCKET,
         env: Mapping[str, str] | None = None, **fields: object) -> bool:
    """One record, when `wanted`; True if the journal took it. Never raises."""
    if not wanted(env, socket_path):
        return False
    data = encode(record(message, priority, **fields))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            try:
                s.sendto(data, socket_path)
            except OSError as e:
                if e.errno != errno.EMSGSIZE:  # larger than a datagram: pass it in a memfd
                    raise
                fd = os.memfd_create("netstack-journal", os.MFD_ALLOW_SEALING)
                try:
                    os.write(fd, data)
                    # journald takes a memfd only sealed against change
                    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                                | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
                    s.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    array.array("i", [fd]))], 0, socket_path)
                finally:
                    os.close(fd)
    except OSError:
        return False
    return True
