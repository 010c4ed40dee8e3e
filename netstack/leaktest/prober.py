"""A scapy sender kept running inside a namespace (scapy imported once), so probes go out
within milliseconds of a trigger and a battery of cases costs one interpreter start."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field


@dataclass
class Sent:
    """What the sender confirmed: packets the socket took, and why each failed spec failed."""

    sent: int
    failed: list[str] = field(default_factory=list)


class Prober:
    def __init__(self, ns: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "netstack.leaktest.send",
             "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line or not json.loads(line).get("ready"):
            raise RuntimeError(f"probe sender in {ns} did not start")

    def send(self, packets: list[dict]) -> Sent:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(packets) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            return Sent(0, [f"the probe sender died (exit {self.proc.poll()})"])
        r = json.loads(line)
        return Sent(r["sent"], [f"packet {f['index'] + 1}: {f['error']}" for f in r["failed"]])

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Prober:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
