"""netstack.journal speaks journald's native protocol: checked on a real AF_UNIX datagram
socket standing in for /run/systemd/journal/socket, decoded as journald decodes it (a
newline in a value goes length-prefixed; a record too large for a datagram goes as a sealed
memfd). Under systemd for real (journalctl -o json shows the fields):
tests/host/test_deb.py."""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct

import pytest

from netstack import journal

ON = {"NETSTACK_JOURNAL": "1"}


def decode(data: bytes) -> dict[str, str]:
    """journald's parser of the native protocol (the inverse of journal.encode)."""
    out, i = {}, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            out[k.decode()] = v.decode()
            i = nl + 1
        else:
            (n,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            out[line.decode()] = data[nl + 9:nl + 9 + n].decode()
            assert data[nl + 9 + n:nl + 10 + n] == b"\n"
            i = nl + 10 + n
    return out


@pytest.fixture
def sink(tmp_path):
    path = str(tmp_path / "journal.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    yield path, s
    s.close()


def test_a_record_with_fields(sink):
    path, s = sink
    assert journal.send("wg: exited with 1", journal.WARNING, socket_path=path, env=ON,
                        stack="main", event="daemon-exit", daemon="wg", exit_status=1,
                        qube=None)
    got = decode(s.recv(65536))
    assert got == {"MESSAGE": "wg: exited with 1", "PRIORITY": "4",
                   "SYSLOG_IDENTIFIER": "netstack", "NETSTACK_STACK": "main",
                   "NETSTACK_EVENT": "daemon-exit", "NETSTACK_DAEMON": "wg",
                   "NETSTACK_EXIT_STATUS": "1"}


def test_newlines_go_length_prefixed(sink):
    path, s = sink
    msg = "first line\nsecond = line\n"
    journal.send(msg, socket_path=path, env=ON, config="a=b")
    raw = s.recv(65536)
    assert b"MESSAGE\n" + struct.pack("<Q", len(msg)) in raw
    assert decode(raw)["MESSAGE"] == msg and decode(raw)["NETSTACK_CONFIG"] == "a=b"


def test_too_large_for_a_datagram_goes_as_a_sealed_memfd(sink):
    path, s = sink
    msg = "x" * (4 << 20)  # beyond any datagram the kernel takes (wmem_max)
    assert journal.send(msg, socket_path=path, env=ON, stack="big")
    data, anc, _flags, _addr = s.recvmsg(16, socket.CMSG_SPACE(4))
    assert data == b"" and anc, "no file descriptor passed"
    fds = array.array("i")
    fds.frombytes(anc[0][2][:4])
    fd = fds[0]
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SHRINK  # journald's demand
        got = decode(os.pread(fd, 8 << 20, 0))
    finally:
        os.close(fd)
    assert got["MESSAGE"] == msg and got["NETSTACK_STACK"] == "big"


def test_off_outside_systemd_and_never_raises(tmp_path, sink):
    path, s = sink
    assert not journal.wanted({}, path)  # a terminal's run: no INVOCATION_ID
    assert journal.wanted({"INVOCATION_ID": "ab12"}, path)  # a unit's process
    assert not journal.wanted({"INVOCATION_ID": "ab12"}, str(tmp_path / "none"))
    assert not journal.wanted({"INVOCATION_ID": "ab12", "NETSTACK_JOURNAL": "0"}, path)
    assert not journal.send("x", socket_path=path, env={})
    # a journal that went away: False, not an exception that would stop the chain
    assert not journal.send("x", socket_path=str(tmp_path / "gone"),
                            env={"NETSTACK_JOURNAL": "1"})


def test_field_names_the_journal_would_refuse():
    with pytest.raises(ValueError):
        journal.encode({"bad name": "x"})
    with pytest.raises(ValueError):
        journal.encode({"_PID": "1"})  # trusted fields are journald's own
    assert journal.encode({"netstack_qube": "work"}) == b"NETSTACK_QUBE=work\n"


def test_stderr_is_journal(tmp_path):
    st = os.fstat(2)
    assert journal.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert not journal.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
    assert not journal.stderr_is_journal({})
