"""`up` under systemd (Type=notify): MAINPID = the stack's supervisor and READY=1 once the
chain exists and is closed, then STATUS lines while the tunnel connects, and a last
STATUS once it carries traffic (root)."""

from __future__ import annotations

import json
import os
import socket

import pytest

from netstack.processes import supervisor_pid
from tests.integration.util import (
    ROOT,
    cli,
    load_state,
    new_stack_name,
    reap_zombies,
    stack_leftovers,
)

pytestmark = pytest.mark.root


def test_up_notifies_systemd_once_the_chain_is_up(tmp_path):
    stack = new_stack_name("sd")
    path = str(tmp_path / "notify")
    msgs: list[dict[str, str]] = []
    import array
    import threading
    import time

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(path)
        srv.settimeout(0.2)
        done = threading.Event()

        def systemd() -> None:
            """Read as systemd does: each message, and the descriptor a BARRIER=1 brings
            closed once read (what `up`'s barrier waits for)."""
            while not done.is_set():
                try:
                    raw, anc, _f, _a = srv.recvmsg(4096, socket.CMSG_SPACE(16))
                except TimeoutError:
                    continue
                for level, kind, data in anc:
                    if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                        fds = array.array("i")
                        fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
                        for fd in fds:
                            os.close(fd)
                msgs.append(dict(x.split("=", 1) for x in raw.decode().split("\n")))

        reader = threading.Thread(target=systemd, daemon=True)
        reader.start()
        try:
            t0 = time.monotonic()
            cli("--stack", stack, "up", str(ROOT / "configs" / "vpn.toml"), "--lab",
                env={"NOTIFY_SOCKET": path})
            took = time.monotonic() - t0
            # READY is sent after the wait: the tunnel is up when a unit becomes active
            s = json.loads(cli("--stack", stack, "status", "--json").stdout)
            v = next(q for q in s["qubes"] if q["name"] == "sys-proxyvm")["vpn"]
            assert v["tunnel"] == "up" and v["handshake_age_s"] is not None
            sup = supervisor_pid(load_state(stack))
        finally:
            done.set()
            reader.join(5)
            cli("--stack", stack, "down", "--purge", check=False)
            reap_zombies()
    assert took < 25, took  # the barrier was answered: `up` did not wait out its 30 s
    assert stack_leftovers(stack) == []
    assert msgs[0] == {"STATUS": "bringing the chain up"}
    assert msgs[1] == {"MAINPID": str(sup)}  # systemd watches the supervisor from now on
    assert msgs[2] == {"READY": "1", "STATUS": "chain made and closed; connecting"}
    assert sum("READY" in m for m in msgs) == 1  # and nobody else (openvpn, tor) says it
    assert any(m.get("STATUS", "").startswith("vpn sys-proxyvm: ") for m in msgs[3:])
    # the last STATUS, then a barrier: systemd has read it while `up` is still the unit's
    assert msgs[-2:] == [{"STATUS": "chain up: tunnels connected, Tor bootstrapped"},
                         {"BARRIER": "1"}]
