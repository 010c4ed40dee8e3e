"""VPN ProxyVM benchmark: throughput from the app qube through the whole chain
(work -> sys-proxyvm -> WireGuard -> lab VPN server -> web) versus wireguard-go between two
bare namespaces, in the same run, as a ratio; and the time from `up` to the first packet
through the tunnel. Prints a table and writes JSON.

    sudo .venv/bin/python bench/vpn.py [--seconds 3] [--runs 3] [--out bench/results/vpn.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, reap, write  # noqa: E402

from netstack import netns, plan, stack  # noqa: E402

WEB = "198.51.100.80"


def sh(*a: str, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(a, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise RuntimeError(f"{a}: {p.stderr.strip()}")
    return p


def iperf(client_ns: str, server_ns: str, server_ip: str, seconds: int) -> float:
    # a persistent server: the readiness probe below does not use it up
    srv = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-B",
                            server_ip], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while True:  # the server listens when a connect succeeds
            with netns.entered(client_ns):
                s = socket.socket()
            s.settimeout(0.2)
            try:
                s.connect((server_ip, 5201))
                s.close()
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        out = sh("ip", "netns", "exec", client_ns, "iperf3", "-c", server_ip, "-t",
                 str(seconds), "-J")
        return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait()


def bare_wireguard(seconds: int) -> float:
    """wireguard-go between two bare namespaces joined by a veth: the ceiling."""
    a, b = "nsb-wga", "nsb-wgb"
    procs = []
    for n in (a, b):
        if netns.exists(n):
            netns.delete(n)
        netns.create(n)
    try:
        sh("ip", "-n", a, "link", "add", "v0", "type", "veth", "peer", "name", "v0", "netns", b)
        for n, ip in ((a, "192.0.2.101"), (b, "192.0.2.102")):
            sh("ip", "-n", n, "addr", "add", f"{ip}/24", "dev", "v0")
            sh("ip", "-n", n, "link", "set", "v0", "up")
            sh("ip", "-n", n, "link", "set", "lo", "up")
        keys = {}
        for n in (a, b):
            k = sh("wg", "genkey").stdout.strip()
            keys[n] = (k, sh("wg", "pubkey", input=k).stdout.strip())
        for n, dev, me, peer, peer_ip in ((a, "wgbench-a", "10.99.0.1", b, "192.0.2.102"),
                                          (b, "wgbench-b", "10.99.0.2", a, "192.0.2.101")):
            procs.append(subprocess.Popen(["ip", "netns", "exec", n, "wireguard-go", "-f", dev],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + 5
            while not os.path.exists(f"/var/run/wireguard/{dev}.sock"):
                if time.monotonic() > deadline:
                    raise RuntimeError("wireguard-go did not start")
                time.sleep(0.01)
            kf = f"/tmp/{dev}.key"
            fd = os.open(kf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.write(fd, keys[n][0].encode())
            os.close(fd)
            for attempt in range(50):  # the socket file appears before it accepts
                try:
                    sh("ip", "netns", "exec", n, "wg", "set", dev, "private-key", kf,
                       "listen-port", "51820", "peer", keys[peer][1], "endpoint",
                       f"{peer_ip}:51820", "allowed-ips", "10.99.0.0/24")
                    break
                except RuntimeError:
                    if attempt == 49:
                        raise
                    time.sleep(0.02)
            os.unlink(kf)
            sh("ip", "-n", n, "addr", "add", f"{me}/24", "dev", dev)
            sh("ip", "-n", n, "link", "set", dev, "mtu", "1420", "up")
        return iperf(a, b, "10.99.0.2", seconds)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for n in (a, b):
            netns.delete(n)


def first_packet(cfg: str, name: str) -> tuple[float, float]:
    """(seconds from up() start to up() return, to the first TCP connect through the
    tunnel from the app qube to the lab web server)."""
    t0 = time.perf_counter()
    stack.up(cfg, name, plan.UplinkSpec("lab"))
    t1 = time.perf_counter()
    while True:
        with netns.entered(f"nst-{name}-work"):
            s = socket.socket()
        s.settimeout(0.2)
        try:
            s.connect((WEB, 80))
            s.close()
            return t1 - t0, time.perf_counter() - t0
        except OSError:
            s.close()
            if time.perf_counter() - t0 > 30:
                raise
            time.sleep(0.002)




def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "vpn.json"))
    a = ap.parse_args()
    cfg = str(ROOT / "configs" / "vpn.toml")
    res: dict = {"machine": machine()}
    ups, firsts = [], []
    for i in range(a.runs):
        u, f = first_packet(cfg, f"bv{i}")
        ups.append(u)
        firsts.append(f)
        if i < a.runs - 1:
            stack.down(f"bv{i}")
            reap()
    name = f"bv{a.runs - 1}"
    try:
        chain, bare = [], []
        for _ in range(a.runs):
            bare.append(bare_wireguard(a.seconds))
            chain.append(iperf(f"nst-{name}-work", f"nsl-{name}-web", WEB, a.seconds))
    finally:
        stack.down(name)
        reap()
    res["up_s_median"] = round(statistics.median(ups), 3)
    res["up_to_first_packet_s_median"] = round(statistics.median(firsts), 3)
    res["chain_gbit_s_median"] = round(statistics.median(chain), 3)
    res["bare_wireguard_go_gbit_s_median"] = round(statistics.median(bare), 3)
    res["ratio"] = round(res["chain_gbit_s_median"] / res["bare_wireguard_go_gbit_s_median"], 3)
    res["chain_runs"] = [round(x, 3) for x in chain]
    res["bare_runs"] = [round(x, 3) for x in bare]
    for k, v in res.items():
        print(f"{k:<36} {v}")
    write(a.out, res)


if __name__ == "__main__":
    main()
