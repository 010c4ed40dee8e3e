"""`netstack service`: the systemd unit is derived from the stack (pure), checked by
systemd-analyze verify, and `up` speaks the notify protocol (issue 16)."""

from __future__ import annotations

import argparse
import array
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from netstack import service
from netstack.errors import NotReady
from netstack.kinds.runtime import KindRuntime
from netstack.model import UplinkSpec
from tests.unit.test_rules import ROOT

MOVE = service.UnitSpec("main", "/etc/netstack/vpn.toml", UplinkSpec("move", "wlan0"), True)
NAT = service.UnitSpec("n1", "/etc/netstack/vpn.toml", UplinkSpec("nat", "eth0"), True)
LAB = service.UnitSpec("l1", "/etc/netstack/basic.toml", UplinkSpec("lab"), False)


def section(text: str, name: str) -> list[str]:
    body = text.split(f"[{name}]\n", 1)[1].split("\n\n", 1)[0]
    return body.splitlines()


def test_move_mode_is_closed_before_it_is_open():
    u = section(service.unit_text(MOVE), "Unit")
    dev = "sys-subsystem-net-devices-wlan0.device"
    # before any network manager, after the device (it waits for it); not BindsTo=: the
    # device leaves the root namespace when it moves into sys-net, and systemd then
    # stopped the chain (tests/host/test_systemd_boot.py)
    for line in ("Before=network-pre.target", "Wants=network-pre.target", f"Requires={dev}",
                 f"After={dev}", "DefaultDependencies=no", "Conflicts=shutdown.target"):
        assert line in u
    assert not any("network-online" in x for x in u)
    assert not any(x.startswith("BindsTo=") for x in u)


def test_nat_mode_follows_the_hosts_network_and_lab_neither():
    u = section(service.unit_text(NAT), "Unit")
    assert "After=network-online.target" in u and "Wants=network-online.target" in u
    assert not any("network-pre" in x or "BindsTo" in x for x in u)
    lab = section(service.unit_text(LAB), "Unit")
    assert not any("network" in x for x in lab if not x.startswith("Description"))


def test_service_section():
    s = section(service.unit_text(MOVE), "Service")
    py = f"{sys.executable} -m netstack.cli --stack main"
    assert "Type=notify" in s and "NotifyAccess=all" in s  # `up` hands MAINPID over
    assert f"ExecStart={py} up /etc/netstack/vpn.toml --uplink wlan0 --uplink-mode move" in s
    assert f"ExecStop={py} down" in s and f"ExecStopPost=-{py} down" in s
    assert f"ExecStartPre=-{py} down" in s
    assert "Restart=on-failure" in s and "RemainAfterExit=yes" not in s
    assert "RemainAfterExit=yes" in section(service.unit_text(LAB), "Service")
    assert "--lab" in next(x for x in section(service.unit_text(LAB), "Service")
                           if x.startswith("ExecStart="))
    assert section(service.unit_text(MOVE), "Install") == ["WantedBy=multi-user.target"]


def test_device_names_are_escaped_as_systemd_does():
    assert service.device_unit("wl-an0") == "sys-subsystem-net-devices-wl\\x2dan0.device"
    assert service.device_unit("enp0s31f6") == "sys-subsystem-net-devices-enp0s31f6.device"


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed "
                    "(scripts/setup.sh installs it)")
@pytest.mark.parametrize("spec", [MOVE, NAT, LAB], ids=["move", "nat", "lab"])
def test_systemd_analyze_verify(spec, tmp_path):
    path = tmp_path / spec.name
    path.write_text(service.unit_text(spec))
    assert service.verify(str(path)) == ""
    broken = tmp_path / "netstack-x.service"  # and it does catch a broken unit
    broken.write_text(service.unit_text(spec).replace("Type=notify", "Type=nosuch"))
    assert "nosuch" in service.verify(str(broken))


def test_notifier_speaks_sd_notify(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(path)
        env = {"NOTIFY_SOCKET": path, "PATH": "/bin"}
        service.Notifier(env).send(mainpid=42, ready=1)
        assert srv.recv(4096) == b"MAINPID=42\nREADY=1"
        assert env == {"PATH": "/bin"}  # the daemons `up` starts must not say READY
    service.Notifier({}).send(ready=1)  # not under systemd: silent, no error


def test_abstract_notify_socket():
    name = f"netstack-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind("\0" + name)
        service.Notifier({"NOTIFY_SOCKET": "@" + name}).send(status="x y")
        assert srv.recv(100) == b"STATUS=x y"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "netstack.cli", *args], capture_output=True,
                          text=True, cwd=ROOT)


def test_install_list_remove_in_a_unit_dir(tmp_path):
    d = str(tmp_path)
    r = cli("--stack", "l1", "service", "install", "configs/basic.toml", "--lab",
            "--unit-dir", d)
    assert r.returncode == 0, r.stderr
    path = tmp_path / "netstack-l1.service"
    assert path.exists() and oct(path.stat().st_mode & 0o777) == "0o644"
    assert f"up {ROOT}/configs/basic.toml --lab" in path.read_text()  # absolute config
    r = cli("service", "list", "--json", "--unit-dir", d)
    assert '"unit": "netstack-l1.service"' in r.stdout
    assert cli("--stack", "l1", "service", "remove", "--unit-dir", d).returncode == 0
    assert not path.exists()
    r = cli("--stack", "l1", "service", "remove", "--unit-dir", d)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nothing to remove" in r.stderr


def test_bad_config_writes_nothing(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[qubes.sys-net]\nkind = \"nosuch\"\n")
    r = cli("service", "install", str(bad), "--lab", "--unit-dir", str(tmp_path))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert os.listdir(tmp_path) == ["bad.toml"]


def _notify_server(path: str, hold: float, got: list) -> threading.Thread:
    """A stand-in for systemd's notify socket: reads one message with its fds, keeps the
    fds `hold` s (systemd closes a BARRIER=1 fd once it has read what came before it)."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(path)

    def run() -> None:
        with srv:
            msg, anc, _, _ = srv.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
            fds = [fd for lvl, typ, data in anc if lvl == socket.SOL_SOCKET
                   and typ == socket.SCM_RIGHTS for fd in array.array("i", data)]
            got.append((msg, len(fds)))
            time.sleep(hold)
            for fd in fds:
                os.close(fd)

    t = threading.Thread(target=run)
    t.start()
    return t


def test_barrier_returns_once_systemd_closed_its_fd(tmp_path):
    got: list = []
    t = _notify_server(str(tmp_path / "n"), 0.3, got)
    t0 = time.monotonic()
    assert service.Notifier({"NOTIFY_SOCKET": str(tmp_path / "n")}).barrier(5)
    took = time.monotonic() - t0
    t.join()
    assert got == [(b"BARRIER=1", 1)]
    assert 0.3 <= took < 5, took  # waited for the close, not for the deadline


def test_barrier_gives_up_at_its_deadline(tmp_path):
    got: list = []
    t = _notify_server(str(tmp_path / "n"), 1.0, got)  # the anti-test: held past 0.2 s
    assert not service.Notifier({"NOTIFY_SOCKET": str(tmp_path / "n")}).barrier(0.2)
    t.join()
    assert service.Notifier({}).barrier(0.2)  # not under systemd: nothing to wait for


class _SlowTunnel(KindRuntime):
    """A recording fake runtime: not ready `fails` times, then ready."""

    def __init__(self, fails: int) -> None:
        self.fails, self.calls = fails, 0

    def wait_ready(self, q, st, k, timeout, progress):
        self.calls += 1
        if self.calls <= self.fails:
            raise NotReady(f"vpn {q.name}: not up after {timeout:.0f} s: no handshake")
        return 0.0


class _Sent:
    def __init__(self, addr: str | None) -> None:
        self.addr, self.sent = addr, []

    def send(self, **fields) -> None:
        self.sent.append(fields)


@pytest.fixture
def slow_kind(monkeypatch):
    from netstack.kinds import registry
    from netstack.state import State

    rt = _SlowTunnel(2)
    monkeypatch.setitem(registry.KINDS, "slowtest", registry.Kind(registry.KINDS["vpn"].spec, rt))
    monkeypatch.setattr(State, "load", staticmethod(lambda stack: object()))  # the stack is up
    return rt


def _args() -> argparse.Namespace:
    return argparse.Namespace(stack="t1", kernel=None)


def test_under_systemd_up_waits_on_and_says_so(slow_kind):
    """A tunnel that does not connect within the timeout is a state under systemd: `up`
    reports it as STATUS and waits on, so the unit's last STATUS is the connected one."""
    from netstack import cli

    sd = _Sent("/run/systemd/notify")
    q = argparse.Namespace(kind="slowtest", name="sys-proxyvm")
    assert cli.wait_qube_ready(_args(), sd, q, None, 0.01) is not None
    assert slow_kind.calls == 3
    said = [f["status"] for f in sd.sent if "status" in f]
    assert len(said) == 2 and all("not up after 0 s" in s and "still waiting" in s
                                  for s in said), said


def test_without_systemd_up_gives_up_at_the_timeout(slow_kind):
    from netstack import cli

    q = argparse.Namespace(kind="slowtest", name="sys-proxyvm")
    with pytest.raises(NotReady):
        cli.wait_qube_ready(_args(), _Sent(None), q, None, 0.01)
    assert slow_kind.calls == 1
