"""The uplink watch's benchmark (issue 29 item 1): on a lab VPN chain (configs/vpn.toml),
with the watch running in this process (netstack.watch.Watch, as the supervisor runs it):

- soak: normal traffic (pages and an iperf3 run through the VPN) for a while: alarms (0
  wanted) and the packets the uplink carried meanwhile;
- alarm latency: a datagram in clear from a process of sys-net, from the packet's kernel
  timestamp to the alarm recorded (goal < 1 s), and from the sender's clock before
  sendto;
- cut latency (on_leak = "cut"): from the packet to the uplink set down (goal < 100 ms);
- CPU per GB moved through the chain (iperf3 work -> lab web host) with and without the
  watch, rounds alternating; the watch's own CPU (this process) beside it.

    sudo .venv/bin/python bench/watch.py [--leaks 20] [--rounds 3] [--seconds 5]
        [--soak 20] [--out bench/results/watch.json]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, reap, write  # noqa: E402
from vpn import cpu_now, per_gb  # noqa: E402
from vpn import iperf as _iperf  # noqa: E402

from netstack import plan, stack, watch  # noqa: E402
from netstack.kernel import RealKernel  # noqa: E402

KERNEL = RealKernel()  # this program's one kernel
WEB, VPN = "198.51.100.80", "203.0.113.10"
# a prefix of one's own on a shared host, as the tests' NETSTACK_TEST_STACK_PREFIX
NAME = (os.environ.get("NETSTACK_TEST_STACK_PREFIX", "") + "bwatch")[:8]


class Running:
    """A watch in a thread of this process, as the supervisor runs it."""

    def __init__(self, on_leak: str) -> None:
        self.stopping = threading.Event()
        self.w = watch.Watch(NAME, KERNEL.fork(), on_leak=on_leak, by="command",
                             stopping=self.stopping)
        self.t = threading.Thread(target=self.w.run, daemon=True)

    def __enter__(self) -> watch.Watch:
        self.t.start()
        end = time.monotonic() + 10
        while self.w.sock is None:  # bound: from now on it sees the uplink
            if time.monotonic() > end:
                raise RuntimeError("the watch did not start")
            time.sleep(0.01)
        return self.w

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        self.t.join(5)


def iperf(client: str, server_ns: str, ip: str, seconds: int) -> float:
    """bench/vpn.py's iperf3 run, tried again when iperf3 reports an error (its JSON then
    has no totals: a server still busy with the previous test)."""
    for attempt in range(3):
        try:
            return _iperf(client, server_ns, ip, seconds)
        except KeyError:
            print(f"iperf3 failed (attempt {attempt + 1}), again", file=sys.stderr)
            time.sleep(1)
    raise RuntimeError("iperf3 failed 3 times")


def fetch(n: int = 1) -> None:
    for _ in range(n):
        subprocess.run(["ip", "netns", "exec", f"nst-{NAME}-work", "curl", "-s", "-o",
                        "/dev/null", "--max-time", "3", f"http://{WEB}/"], check=True)


def leak(port: int) -> float:
    """A datagram in clear from a process of sys-net; returns its clock before sendto."""
    p = subprocess.run(
        ["ip", "netns", "exec", f"nst-{NAME}-sys-net", sys.executable, "-c",
         "import socket, time; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
         f"t = time.time(); s.sendto(b'leak', ('{WEB}', {port})); print(t)"],
        check=True, capture_output=True, text=True)
    return float(p.stdout)


def wait_count(w: watch.Watch, n: int, timeout: float = 5) -> None:
    end = time.monotonic() + timeout
    while w.wf.count < n:
        if time.monotonic() > end:
            raise RuntimeError(f"no alarm {n} within {timeout} s")
        time.sleep(0.002)


def uplink_tx() -> int:
    return next(x.tx_packets or 0 for x in KERNEL.links(f"nst-{NAME}-sys-net")
                if x.name == "uplink")


def ms(xs: list[float]) -> dict[str, float]:
    return {"median_ms": round(1000 * statistics.median(xs), 2),
            "max_ms": round(1000 * max(xs), 2), "n": len(xs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--leaks", type=int, default=20, help="leaks per latency figure")
    ap.add_argument("--rounds", type=int, default=3, help="iperf3 rounds with and without")
    ap.add_argument("--seconds", type=int, default=5, help="seconds of each iperf3 run")
    ap.add_argument("--soak", type=float, default=20, help="seconds of normal traffic")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "watch.json"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "vpn.toml"
        cfg.write_text((ROOT / "configs" / "vpn.toml").read_text())
        stack.up(str(cfg), NAME, plan.UplinkSpec("lab"), KERNEL)
        try:
            fetch()
            res = run(a)
        finally:
            stack.down(NAME, KERNEL)
            reap()
    res["machine"] = machine()
    print(f"the watch idle: {res['idle_cpu_ms_per_s']} ms CPU per second")
    print(f"soak {res['soak']['seconds']} s: {res['soak']['uplink_packets']} uplink packets, "
          f"{res['soak']['alarms']} alarms")
    al, cut = res["alarm_latency_from_packet"], res["cut_latency_from_packet"]
    print(f"alarm latency from the packet: {al['median_ms']} ms median, {al['max_ms']} ms max "
          f"(goal < 1000); from the sender's sendto: "
          f"{res['alarm_latency_from_sendto']['median_ms']} ms median")
    print(f"cut latency from the packet: {cut['median_ms']} ms median, {cut['max_ms']} ms max "
          "(goal < 100)")
    c = res["cpu"]
    print(f"CPU s per GB: without the watch {c['without']['total_median']}, with "
          f"{c['with']['total_median']}; the watch's own {c['with']['watch_median']} "
          f"(Gbit/s {c['without']['gbit_median']} / {c['with']['gbit_median']})")
    write(a.out, res)
    return 0


def run(a: argparse.Namespace) -> dict:
    res: dict = {"leaks": a.leaks, "rounds": a.rounds, "seconds": a.seconds}
    # soak: normal traffic under the watch, no alarm
    with Running("log") as w:
        tx0, t0 = uplink_tx(), time.monotonic()
        srv = threading.Thread(target=iperf, args=(f"nst-{NAME}-work", f"nsl-{NAME}-web",
                                                   WEB, min(a.seconds, int(a.soak))))
        srv.start()
        while time.monotonic() - t0 < a.soak:
            fetch()
        srv.join()
        time.sleep(0.5)
        res["soak"] = {"seconds": round(time.monotonic() - t0, 1),
                       "uplink_packets": uplink_tx() - tx0, "alarms": w.wf.count,
                       "reattached": w.wf.reattached}
    # the watch's own cost with nothing to see: its once-a-second re-read of the facts
    with Running("log"):
        before = cpu_now({"watch": os.getpid()})["watch"]
        time.sleep(10)
        res["idle_cpu_ms_per_s"] = round(
            100 * (cpu_now({"watch": os.getpid()})["watch"] - before), 2)
    # alarm latency (log)
    with Running("log") as w:
        from_pkt, from_send = [], []
        for i in range(a.leaks):
            sent = leak(20000 + i)
            wait_count(w, i + 1)
            x = w.wf.alarms[-1]
            from_pkt.append(x.at - x.packet_at)
            from_send.append(x.at - sent)
        res["alarm_latency_from_packet"] = ms(from_pkt)
        res["alarm_latency_from_sendto"] = ms(from_send)
    watch.clear(NAME, KERNEL)
    # cut latency
    cuts = []
    with Running("cut") as w:
        for i in range(a.leaks):
            leak(21000 + i)
            wait_count(w, 1)
            x = w.wf.alarms[-1]
            assert x.cut_at is not None
            cuts.append(x.cut_at - x.packet_at)
            end = time.monotonic() + 5  # the file --clear reads says so (written after)
            while not ((f := watch.read(w.st.dir)) and f.cut):
                if time.monotonic() > end:
                    raise RuntimeError("watch.json does not say the uplink was cut")
                time.sleep(0.005)
            link = next(y for y in KERNEL.links(f"nst-{NAME}-sys-net") if y.name == "uplink")
            assert not link.flags & 0x1, "the uplink is still up after the cut"
            watch.clear(NAME, KERNEL)
            end = time.monotonic() + 15
            while True:
                with contextlib.suppress(subprocess.CalledProcessError):
                    fetch()
                    break
                if time.monotonic() > end:
                    raise RuntimeError("no traffic after --clear")
    res["cut_latency_from_packet"] = ms(cuts)
    # CPU per GB with and without the watch, rounds alternating
    rows: dict[str, list] = {"without": [], "with": []}
    me = {"watch": os.getpid()}
    for _ in range(a.rounds):
        for mode in ("without", "with"):
            ctx = Running("log") if mode == "with" else contextlib.nullcontext()
            with ctx:
                before = cpu_now(me)
                gbit = iperf(f"nst-{NAME}-work", f"nsl-{NAME}-web", WEB, a.seconds)
                after = cpu_now(me)
            rows[mode].append((gbit, per_gb(before, after, gbit * a.seconds / 8)))
    res["cpu"] = {m: {"gbit_median": round(statistics.median(g for g, _ in r), 3),
                      "total_median": round(statistics.median(c["total"] for _, c in r), 2),
                      "watch_median": round(statistics.median(c["watch"] for _, c in r), 3),
                      "runs": [{"gbit": round(g, 3), **c} for g, c in r]}
                  for m, r in rows.items()}
    return res


if __name__ == "__main__":
    sys.exit(main())
