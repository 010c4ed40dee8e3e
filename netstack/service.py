"""Start the chain at boot: a systemd unit whose main process is the stack's supervisor,
`down` on stop, restarted on failure. In move mode it is ordered before network-pre.target
and after the device, so no network manager of the host configures the uplink before
sys-net owns it: closed before it is open.

`up` speaks systemd's notify protocol itself when NOTIFY_SOCKET is set, so the unit needs
no wrapper: MAINPID = the supervisor and READY=1 as soon as the chain exists and is closed
(what network-pre.target and units after it need; waiting for Tor's bootstrap there would
hold the whole boot for minutes, and a laptop without a network would never start), then
STATUS lines while tunnels connect and Tor bootstraps, and a last one when they have."""

from __future__ import annotations

import array
import os
import select
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass

from netstack.errors import UsageError
from netstack.model import UplinkSpec

UNIT_DIR = "/etc/systemd/system"
_CHECKOUT_DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "docs", "host.md")
# run from a checkout: its docs/host.md; installed (scripts/build-deb): the man page
DOCS = (f"file://{_CHECKOUT_DOCS}" if os.path.exists(_CHECKOUT_DOCS)
        else "man:netstack-service(1)")
BIN = "/usr/bin/netstack"  # where the Debian package puts the command
TEMPLATE = "netstack@.service"  # the package's template unit: netstack@NAME.service


@dataclass(frozen=True)
class UnitSpec:
    stack: str
    config: str  # absolute
    uplink: UplinkSpec
    supervised: bool  # the stack has a supervisor (daemons or services) to be the main pid
    python: str = sys.executable

    @property
    def name(self) -> str:
        return unit_name(self.stack)


def unit_name(stack: str) -> str:
    return f"netstack-{stack}.service"


def _cmd(spec: UnitSpec, *args: str) -> str:
    return shlex.join([spec.python, "-m", "netstack.cli", "--stack", spec.stack, *args])


def device_unit(dev: str) -> str:
    """systemd's device unit for a network interface (its name escaped as systemd does)."""
    esc = "".join(c if c.isalnum() or c in ":_." else f"\\x{ord(c):02x}" for c in dev)
    return f"sys-subsystem-net-devices-{esc}.device"


def unit_text(spec: UnitSpec) -> str:
    """The unit file (pure). Move mode: before network-pre.target, after the device;
    nat mode: after the host's network is online (it NATs to it); lab: nothing of the
    host's network at all."""
    up = ["up", spec.config]
    unit = [f"Description=netstack chain {spec.stack!r} ({os.path.basename(spec.config)})",
            f"Documentation={DOCS}",
            "After=local-fs.target"]
    if spec.uplink.mode == "lab":
        up.append("--lab")
    else:
        dev = spec.uplink.dev or ""
        up += ["--uplink", dev, "--uplink-mode", spec.uplink.mode]
        if spec.uplink.mode == "move":
            d = device_unit(dev)
            # Requires=, not BindsTo=: `up` moves the device into sys-net, which takes its
            # device unit away in the root namespace, and BindsTo= made systemd stop the
            # chain there and then (docs/field-notes.md, "systemd at boot")
            unit += ["DefaultDependencies=no", f"Requires={d}", f"After={d}",
                     "Before=network-pre.target", "Wants=network-pre.target",
                     "Conflicts=shutdown.target", "Before=shutdown.target"]
        else:
            unit += ["After=network-online.target", "Wants=network-online.target"]
    service = _service(_cmd(spec, "down"), _cmd(spec, *up), spec.supervised)
    return ("# written by `netstack service install`; `netstack service remove` deletes it\n"
            "[Unit]\n" + "\n".join(unit) + "\n\n[Service]\n" + "\n".join(service)
            + "\n\n[Install]\nWantedBy=multi-user.target\n")


def _service(down: str, up: str, supervised: bool) -> list[str]:
    """The [Service] lines every netstack unit has (written ones and the template)."""
    service = [
        "Type=notify",
        "NotifyAccess=all",  # `up` hands over: MAINPID=<the supervisor>, then READY=1
        f"ExecStartPre=-{down}",  # what a crash of the whole unit left
        f"ExecStart={up}",
        f"ExecStop={down}",
        f"ExecStopPost=-{down}",  # after a failure: nothing stays half made
        "Restart=on-failure",
        "RestartSec=2",
        "TimeoutStartSec=300",
        "KillMode=mixed",
    ]
    if not supervised:  # nothing runs once the chain is made: active while it exists
        service.append("RemainAfterExit=yes")
    return service


def template_text(netstack: str = BIN, etc: str = "/etc/netstack") -> str:
    """The Debian package's template unit (pure): netstack@NAME.service brings up the stack
    NAME from NAME.toml (`up NAME` finds it in /etc/netstack) with the options of `up` in
    ETC/NAME.env: the uplink (`NETSTACK_UP_OPTIONS=--uplink eth0 --uplink-mode nat`, or
    `--lab`) and any other (`--vpn-timeout 120`); the file is required: no uplink said, no
    chain. For nat and lab mode: a move-mode chain must
    be ordered before the host's network and after its device, which a template cannot
    name, so `netstack service install NAME --uplink DEV` writes that unit instead.
    RemainAfterExit: a template cannot know whether the stack has a supervisor to be the
    main process; without one `up` exits 0 once the chain is made, which must not stop
    it (a failed main process still fails the unit and restarts it)."""
    def cmd(*args: str) -> str:
        return shlex.join([netstack, "--stack", "%i", *args])

    unit = ["Description=netstack chain %i (%i.toml)",
            "Documentation=man:netstack(1) man:netstack-service(1)",
            "After=local-fs.target network-online.target", "Wants=network-online.target"]
    service = [f"EnvironmentFile={etc}/%i.env",
               *_service(cmd("down"), cmd("up", "%i") + " $NETSTACK_UP_OPTIONS", True),
               "RemainAfterExit=yes",
               # 2: a bad config or usage (no NAME.toml, a bad name): no restart loop
               "RestartPreventExitStatus=2"]
    return (f"# {TEMPLATE}: the chain of {etc}/NAME.toml as the stack NAME (1-8 of a-z 0-9);\n"
            f"# {etc}/NAME.env has up's options: NETSTACK_UP_OPTIONS=--uplink DEV --uplink-mode "
            "nat (or --lab)\n"
            "[Unit]\n" + "\n".join(unit) + "\n\n[Service]\n" + "\n".join(service)
            + "\n\n[Install]\nWantedBy=multi-user.target\n")


def systemd_running() -> bool:
    return os.path.isdir("/run/systemd/system")


def install(spec: UnitSpec, unit_dir: str = UNIT_DIR, enable: bool = True) -> list[str]:
    """Write the unit (0644, atomically); with systemd running, reload and enable it.
    Returns what was done, one line each."""
    if not os.path.isdir(unit_dir):
        raise UsageError(f"--unit-dir {unit_dir}: no such directory")
    from netstack.kernel import atomic_write

    path = os.path.join(unit_dir, spec.name)
    atomic_write(path, unit_text(spec), 0o644)
    done = [f"wrote {path}"]
    if enable and unit_dir == UNIT_DIR and systemd_running():
        _systemctl("daemon-reload")
        _systemctl("enable", spec.name)
        done.append(f"enabled {spec.name} (starts at boot; `systemctl start {spec.name}` "
                    "starts it now)")
    elif enable and unit_dir == UNIT_DIR:
        done.append("systemd is not running here: the unit is written but not enabled")
    return done


def remove(stack: str, unit_dir: str = UNIT_DIR) -> list[str]:
    path = os.path.join(unit_dir, unit_name(stack))
    if not os.path.exists(path):
        raise UsageError(f"no unit {path}: nothing to remove (see `netstack service list`)")
    done = []
    if unit_dir == UNIT_DIR and systemd_running():
        _systemctl("disable", "--now", unit_name(stack))
        done.append(f"stopped and disabled {unit_name(stack)}")
    os.unlink(path)
    done.append(f"removed {path}")
    if unit_dir == UNIT_DIR and systemd_running():
        _systemctl("daemon-reload")
    return done


def _systemctl(*args: str) -> None:
    p = subprocess.run(["systemctl", *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise UsageError(f"systemctl {' '.join(args)}: {p.stderr.strip() or p.returncode}")


def verify(path: str) -> str:
    """`systemd-analyze verify` of a written unit: its complaints, or "" when clean."""
    p = subprocess.run(["systemd-analyze", "verify", path], capture_output=True, text=True)
    lines = [x for x in (p.stdout + p.stderr).splitlines() if x.strip()]
    return "\n".join(lines) if p.returncode != 0 or lines else ""


class Notifier:
    """systemd's notify protocol (sd_notify(3)) without libsystemd: datagrams to
    NOTIFY_SOCKET; silent when there is none (not started by systemd)."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        """Takes NOTIFY_SOCKET out of the environment: the daemons `up` starts (openvpn,
        tor) speak the protocol too and would say READY for the whole unit."""
        addr = (env if env is not None else os.environ).pop("NOTIFY_SOCKET", "")
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        self.addr = addr or None

    def send(self, **fields: object) -> None:
        if not self.addr:
            return
        msg = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(self.addr)
            s.sendall(msg)

    def barrier(self, timeout: float = 30.0) -> bool:
        """sd_notify_barrier(3): returns once systemd has read every message sent before,
        or after `timeout` (False then). Call it before exiting: systemd matches a datagram
        to its unit by the sender's pid, and one whose sender is gone by the time it is
        read is dropped, so `up`'s last STATUS line was lost (docs/field-notes.md, "systemd
        at boot"). systemd closes the pipe's write end it is sent as it reads the
        BARRIER=1 message, after the ones before it; older systemd closes it unread, so
        this never waits for nothing. True when not under systemd."""
        if not self.addr:
            return True
        r, w = os.pipe()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.connect(self.addr)
                s.sendmsg([b"BARRIER=1"],
                          [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]))])
            os.close(w)
            w = -1
            p = select.poll()
            p.register(r, select.POLLHUP)
            return bool(p.poll(timeout * 1000))
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
