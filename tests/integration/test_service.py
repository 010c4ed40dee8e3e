"""`up` under systemd (Type=notify): MAINPID = the stack's supervisor and READY=1 once the
chain exists and is closed, then STATUS lines while the tunnel connects, and a last
STATUS once it carries traffic (root)."""

from __future__ import annotations

import json
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
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(path)
        srv.setblocking(False)
        try:
            cli("--stack", stack, "up", str(ROOT / "configs" / "vpn.toml"), "--lab",
                env={"NOTIFY_SOCKET": path})
            # READY is sent after the wait: the tunnel is up when a unit becomes active
            s = json.loads(cli("--stack", stack, "status", "--json").stdout)
            v = next(q for q in s["qubes"] if q["name"] == "sys-proxyvm")["vpn"]
            assert v["tunnel"] == "up" and v["handshake_age_s"] is not None
            while True:
                try:
                    raw = srv.recv(4096).decode()
                except BlockingIOError:
                    break
                msgs.append(dict(x.split("=", 1) for x in raw.split("\n")))
            sup = supervisor_pid(load_state(stack))
        finally:
            cli("--stack", stack, "down", "--purge", check=False)
            reap_zombies()
    assert stack_leftovers(stack) == []
    assert msgs[0] == {"STATUS": "bringing the chain up"}
    assert msgs[1] == {"MAINPID": str(sup)}  # systemd watches the supervisor from now on
    assert msgs[2] == {"READY": "1", "STATUS": "chain made and closed; connecting"}
    assert sum("READY" in m for m in msgs) == 1  # and nobody else (openvpn, tor) says it
    assert any(m.get("STATUS", "").startswith("vpn sys-proxyvm: ") for m in msgs[3:])
    assert msgs[-1] == {"STATUS": "chain up: tunnels connected, Tor bootstrapped"}
