"""The call layer's host-side logic without sandboxes (netstack.calls): which file a
service name can reach, the pending list and its answers, the log, and the client's wire
protocol against a recording stand-in of the daemon (the real daemon with real sandboxes:
tests/integration/test_calls.py)."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netstack import callclient, calls, policy
from netstack.errors import UsageError


def plan(services: str | None) -> SimpleNamespace:
    return SimpleNamespace(call_services=services)


def test_builtin_services_get_the_source_from_the_layer():
    cmd, grants = calls.service_command(plan(None), "qubes.Filecopy", "", "work")
    assert cmd[:4] == ["env", "QREXEC_REMOTE_DOMAIN=work", "QREXEC_SERVICE_ARGUMENT=",
                       "QREXEC_SERVICE_FULL_NAME=qubes.Filecopy"]
    assert cmd[4:6] == ["sh", "-c"] and grants == ()
    assert calls.service_command(plan(None), "my.Echo", "", "work") is None


def test_user_services_specific_argument_first(tmp_path: Path):
    (tmp_path / "my.Echo").write_text("#!/bin/sh\n")
    (tmp_path / "my.Echo+hello").write_text("#!/bin/sh\n")
    cmd, (g,) = calls.service_command(plan(str(tmp_path)), "my.Echo", "hello", "work")
    assert g.path == str(tmp_path / "my.Echo+hello") and g.readonly
    assert cmd[-2:] == ["/run/netstack-service/my.Echo", "hello"]
    cmd, (g,) = calls.service_command(plan(str(tmp_path)), "my.Echo", "other", "work")
    assert g.path == str(tmp_path / "my.Echo") and cmd[-1] == "other"
    (tmp_path / "sub").mkdir()
    assert calls.service_command(plan(str(tmp_path)), "sub", "", "work") is None


def test_a_symlink_out_of_the_services_directory_is_not_a_service(tmp_path: Path):
    d = tmp_path / "svc"
    d.mkdir()
    (tmp_path / "outside").write_text("#!/bin/sh\n")
    (d / "my.Out").symlink_to(tmp_path / "outside")
    assert calls.service_command(plan(str(d)), "my.Out", "", "work") is None


NAME = st.text(alphabet=sorted(policy.ARG_CHARS | {"/", "\0", " "}), max_size=70)


@settings(max_examples=300, deadline=None)
@given(NAME, NAME)
def test_no_callable_name_reaches_outside_the_directory(tmp_path_factory, service, arg):
    """Whatever a caller sends: refused by the name check, or a file directly in DIR."""
    d = tmp_path_factory.getbasetemp() / "svcprop"
    d.mkdir(exist_ok=True)
    if policy.name_problem(service, arg) is not None:
        return
    found = calls.service_command(plan(str(d)), service, arg, "work")
    if found is not None and service in calls.BUILTIN:  # (hypothesis draws the code's own
        assert found[1] == ()                            # constants: qubes.Filecopy)
        assert found[0][-2:] == ["sh", "-c", calls.BUILTIN[service], service][-2:]
    elif found is not None:
        assert os.path.dirname(found[1][0].path) == str(d)


def test_pending_answer_and_timeout(tmp_path: Path):
    d = str(tmp_path)
    p = calls.Pending("0badcafe", "work", "personal", "my.S", "", "f:1", time.time(),
                      time.time() + 5)
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(calls.wait_answer(d, p)))
    t.start()
    end = time.monotonic() + 5
    while not calls.pending(d) and time.monotonic() < end:
        time.sleep(0.01)
    assert [x.id for x in calls.pending(d)] == ["0badcafe"]
    assert calls.answer(d, "0badcafe", "allow").service == "my.S"
    t.join(5)
    assert got == [True] and calls.pending(d) == []
    with pytest.raises(UsageError, match="no call 0badcafe is waiting"):
        calls.answer(d, "0badcafe", "deny")
    with pytest.raises(UsageError, match="not a call id"):
        calls.answer(d, "../x", "allow")
    late = calls.Pending("0badcaff", "work", "personal", "my.S", "", None, time.time(),
                         time.time() + 0.1)
    assert calls.wait_answer(d, late) is False and calls.pending(d) == []


def test_log_lines_and_bound(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(calls, "MAX_LOG", 300)
    for i in range(5):
        calls.log(str(tmp_path), calls.Record(float(i), f"{i:08x}", "work", "personal",
                                              "my.S", "", "deny", None, "x"))
    got = calls.read_log(str(tmp_path))
    assert got and got[-1]["id"] == "00000004" and (tmp_path / "calls.log.1").exists()
    assert os.stat(tmp_path / "calls.log").st_mode & 0o077 == 0


# --- the client's wire protocol --------------------------------------------------------

class StandIn:
    """A recording stand-in of the daemon's side of one call."""

    def __init__(self, path: str, reply: list[tuple[bytes, bytes]]) -> None:
        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(path)
        self.srv.listen(1)
        self.reply, self.got = reply, b""
        self.t = threading.Thread(target=self.serve, daemon=True)
        self.t.start()

    def serve(self) -> None:
        c, _ = self.srv.accept()
        with c:
            while chunk := c.recv(65536):
                self.got += chunk
            for kind, payload in self.reply:
                c.sendall(struct.pack(">cI", kind, len(payload)) + payload)


def client(path: str, *argv: str, input: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, callclient.__file__, *argv], input=input,
                          capture_output=True, timeout=30,
                          env=dict(os.environ, NETSTACK_CALL_SOCKET=path))


def test_client_streams_and_exit_code(tmp_path: Path):
    path = str(tmp_path / "sock")
    s = StandIn(path, [(b"O", b"out\0put"), (b"O", b"!"), (b"X", struct.pack(">i", 7))])
    p = client(path, "personal", "my.Echo+a", input=b"in\0bytes")
    s.t.join(5)
    assert s.got == b"personal my.Echo+a\nin\0bytes"
    assert p.returncode == 7 and p.stdout == b"out\0put!"


def test_client_refused_and_broken(tmp_path: Path):
    path = str(tmp_path / "sock")
    StandIn(path, [(b"R", b"Request refused")])
    p = client(path, "personal", "my.Echo")
    assert p.returncode == 126 and b"Request refused" in p.stderr
    path2 = str(tmp_path / "sock2")
    StandIn(path2, [(b"O", b"partial")])  # closes without an exit code
    p = client(path2, "personal", "my.Echo")
    assert p.returncode == 125 and p.stdout == b"partial"
    p = client(str(tmp_path / "none"), "personal", "my.Echo")  # after CONNECT_WAIT
    assert p.returncode == 125 and b"no call socket" in p.stderr
    p = client(path, "per sonal", "x")
    assert p.returncode == 2
