"""tcpdump captures inside a namespace, started and stopped by PID, read back with scapy.

A capture is ready only once tcpdump says it is listening (an event, not a sleep); it is
stopped with SIGINT so the pcap is complete and readable by tshark and Wireshark.

A capture in a stack's namespace (`nst-STACK-*`, `nsl-STACK-*`) is recorded in that stack's
intent log as a process (pid and start time) while it runs, and forgotten once stopped: if
`check` or `leaktest` dies without stopping it (SIGKILL, a crash), `down` ends it by PID like
the stack's other processes, never by name.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from typing import Any

from netstack.processes import register_process, stack_of, unregister_process  # noqa: F401


class Capture:
    def __init__(self, netns: str, iface: str, path: str, bpf: str = "") -> None:
        self.netns, self.iface, self.path, self.bpf = netns, iface, path, bpf
        self.proc: subprocess.Popen | None = None
        self._pkts: list[Any] | None = None
        self._reg: Any = None
        self.pid: int | None = None  # of the last tcpdump started (tests check it ended)

    def start(self, timeout: float = 5.0) -> Capture:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        argv = ["ip", "netns", "exec", self.netns, "tcpdump", "-i", self.iface, "-n", "-U",
                "-Z", "root", "--immediate-mode", "-w", self.path]
        if self.bpf:
            argv.append(self.bpf)
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.pid = self.proc.pid  # `ip netns exec` execs tcpdump: the same process
        self._reg = register_process(self.netns, f"capture {self.netns}/{self.iface}",
                                     self.proc.pid)
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        buf = b""
        while b"listening on" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"tcpdump on {self.netns}/{self.iface} did not start: "
                                   f"{buf.decode(errors='replace').strip()}")
            r, _, _ = select.select([self.proc.stderr], [], [], left)
            if r:
                chunk = os.read(self.proc.stderr.fileno(), 4096)
                if not chunk:
                    continue
                buf += chunk
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._settle()
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None
        if self._reg is not None:
            unregister_process(self._reg)
            self._reg = None

    def _settle(self, quiet: float = 0.05, deadline: float = 1.0) -> None:
        """Until the pcap has not grown for `quiet` seconds (at most `deadline`): tcpdump
        exits at SIGINT without reading what is still queued for it, so a packet that
        crossed the link just before the stop was lost (a ping's reply, on a loaded host:
        docs/field-notes.md, "tcpdump at SIGINT"). With -U each packet read is written at
        once, so a pcap that stops growing is one tcpdump has caught up with."""
        def size() -> int:
            try:
                return os.stat(self.path).st_size
            except OSError:
                return -1

        end = time.monotonic() + deadline
        last, since = size(), time.monotonic()
        while time.monotonic() < end:
            time.sleep(quiet / 3)  # a poll with a deadline: the pcap's size is the event
            now = size()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return

    def packets(self) -> list[Any]:
        import scapy.layers.inet  # noqa: F401  (register Ethernet/IP dissectors, else Raw)
        import scapy.layers.inet6  # noqa: F401
        import scapy.layers.l2  # noqa: F401
        from scapy.utils import rdpcap

        self.stop()
        if self._pkts is not None:
            return self._pkts
        if not os.path.exists(self.path) or os.path.getsize(self.path) < 24:
            return []
        pkts = self._pkts = list(rdpcap(self.path))
        from scapy.packet import Raw

        if pkts and all(isinstance(p, Raw) for p in pkts):
            raise RuntimeError(f"{self.path}: packets not dissected")
        return pkts

    def __enter__(self) -> Capture:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
