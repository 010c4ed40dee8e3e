"""A call waiting for `call-answer` is withdrawn when its caller goes away (a killed
`copy`: an `allow` given later delivered the file before); netstack-call's half-close
after its stdin (data still queued) is not going away."""

from __future__ import annotations

import socket
import threading
import time

from netstack import calls


def testpeer_closed_only_when_the_caller_is_gone():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        assert not calls.peer_closed(a)
        b.sendall(b"a file offered")
        b.shutdown(socket.SHUT_WR)  # its stdin ended: still waiting for the answer
        assert not calls.peer_closed(a)
        b.close()  # the caller's process ended
        assert calls.peer_closed(a)
    finally:
        a.close()


def test_wait_answer_withdraws_when_the_caller_is_gone(tmp_path):
    p = calls.Pending("c1", "work", "personal", "qubes.Filecopy", "", "x.policy:1",
                      time.time(), time.time() + 30)
    gone = threading.Event()
    t0 = time.monotonic()
    threading.Timer(0.3, gone.set).start()
    assert calls.wait_answer(str(tmp_path), p, gone=gone.is_set) is False
    assert time.monotonic() - t0 < 5  # withdrawn, not waited out
    assert calls.pending(str(tmp_path)) == []  # and gone from the list `calls` shows
