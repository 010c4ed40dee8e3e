"""VPN ProxyVM benchmark: throughput from the app qube through the whole chain
(work -> sys-proxyvm -> WireGuard -> lab VPN server -> web) versus WireGuard between two
bare namespaces, in the same run, as a ratio; CPU seconds per GB moved for both (softirq,
system, user of the whole machine, and each wireguard-go's own); and the time from `up`
to the first packet through the tunnel. Prints a table and writes JSON.

    sudo .venv/bin/python bench/vpn.py [--seconds 3] [--runs 3] [--out bench/results/vpn.json]
                                       [--lab-wg auto|kernel|wireguard-go] [--no-flowtable-run]
                                       [--profile]

The bare baseline's two ends are what the chain's two ends are: its client the VPN qube's
backend (kernel WireGuard where the kernel has it, else wireguard-go), its server the
lab's VPN server's (`--lab-wg auto`: kernel WireGuard where the kernel has it), so the
ratio compares like with like.
Where the forwarding qubes have a flowtable (docs/field-notes.md, "Flowtables"), the chain
is also measured with their `flow add` rules removed (same stack, same run), and the JSON
says how many rules each namespace on the path has and how many of its flows the
flowtables carried: where the time goes, without perf. `--profile` adds one more chain run
and one more bare run under a sampling profiler of the whole machine (bench/kprofile.py:
perf_event_open, kernel functions and user processes): where the CPU goes in each.
"""

from __future__ import annotations

import argparse
import contextlib
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
from netstack.kernel import RealKernel, slow_factor  # noqa: E402

KERNEL = RealKernel()  # this program's one kernel

WEB = "198.51.100.80"


def sh(*a: str, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(a, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise RuntimeError(f"{a}: {p.stderr.strip()}")
    return p


CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq")


def cpu_now(pids: dict[str, int]) -> dict[str, float]:
    """Seconds of CPU so far: the machine's by kind (/proc/stat) and each named process's
    (utime + stime of /proc/PID/stat, its threads included)."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        vals = f.readline().split()[1:8]
    out = {k: int(v) / tick for k, v in zip(CPU_FIELDS, vals, strict=True)}
    for name, pid in pids.items():
        try:
            with open(f"/proc/{pid}/stat") as f:
                st = f.read().rsplit(")", 1)[1].split()
            out[name] = (int(st[11]) + int(st[12])) / tick
        except OSError:
            out[name] = 0.0
    return out


def per_gb(before: dict[str, float], after: dict[str, float], gbytes: float
           ) -> dict[str, float]:
    d = {k: after[k] - before[k] for k in after}
    busy = sum(d[k] for k in CPU_FIELDS if k not in ("idle", "iowait"))
    out = {"total": busy / gbytes}
    out.update({k: d[k] / gbytes for k in ("softirq", "system", "user")})
    out.update({k: d[k] / gbytes for k in d if k not in CPU_FIELDS})
    return {k: round(v, 3) for k, v in out.items()}


def measured(fn, pids: dict[str, int], seconds: int, prof=None
             ) -> tuple[float, dict[str, float]]:
    """(Gbit/s, CPU seconds per GB moved) of one iperf run (under `prof`, a
    kprofile.Profile, if given)."""
    before = cpu_now(pids)
    with prof if prof is not None else contextlib.nullcontext():
        gbit = fn()
    after = cpu_now(pids)
    return gbit, per_gb(before, after, gbit * seconds / 8)


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


def bare_wireguard(seconds: int, kernel: bool = False, prof=None,
                   server_kernel: bool | None = None) -> tuple[float, dict[str, float]]:
    """WireGuard between two bare namespaces joined by a veth: the ceiling. Kernel
    WireGuard (kernel=True) or wireguard-go at the client; the server (the iperf end) as
    `server_kernel` says (default: as the client), so that the pair's two ends are what
    the chain's two ends are (the chain's VPN qube, the lab's server)."""
    a, b = "nsb-wga", "nsb-wgb"
    server_kernel = kernel if server_kernel is None else server_kernel
    procs: dict[str, subprocess.Popen] = {}
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
            if (kernel if n == a else server_kernel):
                sh("ip", "-n", n, "link", "add", dev, "type", "wireguard")
            else:
                with contextlib.suppress(FileNotFoundError):  # left by a killed run
                    os.unlink(f"/var/run/wireguard/{dev}.sock")
                procs["wg_client" if n == a else "wg_server"] = subprocess.Popen(
                    ["ip", "netns", "exec", n, "wireguard-go", "-f", dev],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
        pids = {k: p.pid for k, p in procs.items()}
        return measured(lambda: iperf(a, b, "10.99.0.2", seconds), pids, seconds, prof)
    finally:
        for p in procs.values():
            p.terminate()  # a clean exit removes its control socket
            p.wait()
        for n in (a, b):
            netns.delete(n)


def first_packet(cfg: str, name: str, lab_wg_kernel: bool = False) -> tuple[float, float]:
    """(seconds from up() start to up() return, to the first TCP connect through the
    tunnel from the app qube to the lab web server)."""
    from netstack.errors import NetstackError

    for attempt in range(3):  # a VM under emulation: a lab server late, a DNS answer lost
        t0 = time.perf_counter()
        try:
            stack.up(cfg, name, plan.UplinkSpec("lab", lab_wg_kernel=lab_wg_kernel), KERNEL)
            break
        except NetstackError as e:
            print(f"up {name}: {e}; again", file=sys.stderr)
            with contextlib.suppress(Exception):  # `up` may have undone itself
                stack.down(name, KERNEL)
            reap()
            if attempt == 2:
                raise
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
            if time.perf_counter() - t0 > 30 * slow_factor():  # (x5 in the VM: 29.4 s seen)
                _tunnel_facts(name)
                with contextlib.suppress(Exception):  # leave nothing behind
                    stack.down(name, KERNEL)
                raise
            time.sleep(0.002)


def _tunnel_facts(name: str) -> None:
    """Why no first packet: both ends' `wg show`, links and routes, to stderr (the lab
    server on kernel WireGuard carried nothing in the VM: docs/benchmarks.md)."""
    for ns in (f"nst-{name}-sys-proxyvm", f"nsl-{name}-vpn"):
        for argv in (["wg", "show"], ["ip", "-br", "addr"], ["ip", "route"],
                     ["nft", "list", "ruleset"]):
            p = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True,
                               text=True)
            print(f"--- {ns}: {' '.join(argv)}\n{(p.stdout + p.stderr)[-3000:]}",
                  file=sys.stderr)


PATH_QUBES = ("work", "sys-proxyvm", "sys-firewall", "sys-net")


def path_facts(name: str) -> dict[str, dict[str, int]]:
    """Per namespace on the chain's path: rules in all, rules in its forward chain, and
    whether it has a flowtable (`nft -j list ruleset`)."""
    out = {}
    for q in PATH_QUBES:
        js = json.loads(sh("ip", "netns", "exec", f"nst-{name}-{q}", "nft", "-j", "list",
                           "ruleset").stdout)["nftables"]
        rules = [i["rule"] for i in js if "rule" in i]
        out[q] = {"rules": len(rules),
                  "forward_rules": sum(r["chain"] == "forward" for r in rules),
                  "flowtables": sum("flowtable" in i for i in js)}
    return out


def conntrack_facts(name: str) -> dict[str, dict[str, int]]:
    """Per forwarding namespace: conntrack entries, and those on the flowtable."""
    out = {}
    for q in ("sys-firewall", "sys-net"):
        p = subprocess.run(["ip", "netns", "exec", f"nst-{name}-{q}", "conntrack", "-L"],
                           capture_output=True, text=True)
        lines = [x for x in p.stdout.splitlines() if x.strip()]
        out[q] = {"entries": len(lines), "offloaded": sum("[OFFLOAD]" in x for x in lines)}
    return out


def drop_offload(name: str) -> int:
    """Delete the `flow add` rules of the stack's forwarding qubes (the flowtable stays,
    nothing new goes on it): the chain as it is without flowtables. Returns how many."""
    n = 0
    for q in ("sys-firewall", "sys-net"):
        ns = f"nst-{name}-{q}"
        js = json.loads(sh("ip", "netns", "exec", ns, "nft", "-j", "-a", "list", "chain",
                           "inet", "netstack", "forward").stdout)["nftables"]
        for i in js:
            r = i.get("rule")
            if r and any("flow" in x for x in r["expr"]):
                sh("ip", "netns", "exec", ns, "nft", "delete", "rule", "inet", "netstack",
                   "forward", "handle", str(r["handle"]))
                n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "vpn.json"))
    ap.add_argument("--lab-wg", choices=("auto", "kernel", "wireguard-go"), default="auto",
                    help="the lab VPN server's WireGuard (auto: kernel where it exists)")
    ap.add_argument("--no-flowtable-run", action="store_true",
                    help="skip the run with the flowtables' `flow add` rules removed")
    ap.add_argument("--profile", action="store_true",
                    help="one more chain and bare run each under a sampling profiler")
    a = ap.parse_args()
    from netstack.hostcaps import kernel_wireguard

    lab_kernel = a.lab_wg == "kernel" or (a.lab_wg == "auto" and kernel_wireguard())
    cfg = str(ROOT / "configs" / "vpn.toml")
    res: dict = {"machine": machine(), "lab_server": "kernel" if lab_kernel
                 else "wireguard-go"}
    ups, firsts = [], []
    for i in range(a.runs):
        u, f = first_packet(cfg, f"bv{i}", lab_kernel)
        ups.append(u)
        firsts.append(f)
        if i < a.runs - 1:
            stack.down(f"bv{i}", KERNEL)
            reap()
    name = f"bv{a.runs - 1}"
    from netstack.processes import children
    from netstack.state import State

    st = State.load(name)
    assert st is not None
    info = st.plan.qube("sys-proxyvm").info
    kernel = info.backend == "kernel"
    kids = children(st)
    pids = {"wg_client": kids["vpn-sys-proxyvm"].pid, "wg_server": kids["lab-wireguard"].pid}
    def chain_run(prof=None) -> tuple[float, dict[str, float]]:
        return measured(lambda: iperf(f"nst-{name}-work", f"nsl-{name}-web", WEB,
                                      a.seconds), pids, a.seconds, prof)

    try:
        res["path"] = path_facts(name)
        flowtables = sum(v["flowtables"] for v in res["path"].values())
        chain, bare, chain_cpu, bare_cpu = [], [], [], []
        for _ in range(a.runs):
            g, c = bare_wireguard(a.seconds, kernel, server_kernel=lab_kernel)
            bare.append(g)
            bare_cpu.append(c)
            g, c = chain_run()
            chain.append(g)
            chain_cpu.append(c)
        # iperf3's connections are closed by now: their entries stay until conntrack
        # times them out, with [OFFLOAD] cleared; count during one more run instead
        res["conntrack_during_chain"] = {}
        if flowtables:
            import threading

            seen: dict = {}
            t = threading.Timer(a.seconds / 2, lambda: seen.update(conntrack_facts(name)))
            t.start()
            chain_run()
            t.join()
            res["conntrack_during_chain"] = seen
        if a.profile:  # not among the measured runs: sampling costs CPU too
            from kprofile import Profile, summary

            for what, run in (("chain", chain_run),
                              ("bare", lambda prof: bare_wireguard(
                                  a.seconds, kernel, prof, server_kernel=lab_kernel))):
                prof = Profile()
                g, c = run(prof=prof)
                res[f"profile_{what}"] = {"gbit_s": round(g, 3), "cpu_s_per_gb": c,
                                          **summary(prof)}
        noflow, noflow_cpu = [], []
        if flowtables and not a.no_flowtable_run:
            res["flow_add_rules_removed"] = drop_offload(name)
            for _ in range(a.runs):
                g, c = chain_run()
                noflow.append(g)
                noflow_cpu.append(c)
    finally:
        stack.down(name, KERNEL)
        reap()

    def med(rows: list[dict[str, float]]) -> dict[str, float]:
        return {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]}

    res["backend"] = info.backend
    res["up_s_median"] = round(statistics.median(ups), 3)
    res["up_to_first_packet_s_median"] = round(statistics.median(firsts), 3)
    res["up_to_first_packet_s_max"] = round(max(firsts), 3)
    res["chain_gbit_s_median"] = round(statistics.median(chain), 3)
    res["bare_gbit_s_median"] = round(statistics.median(bare), 3)
    res["ratio"] = round(res["chain_gbit_s_median"] / res["bare_gbit_s_median"], 3)
    res["chain_cpu_s_per_gb"] = med(chain_cpu)
    res["bare_cpu_s_per_gb"] = med(bare_cpu)
    # the same, as CPU cores busy per Gbit/s moved (1 Gbit/s = 0.125 GB/s)
    res["chain_cores_per_gbit_s"] = round(res["chain_cpu_s_per_gb"]["total"] * 0.125, 2)
    res["bare_cores_per_gbit_s"] = round(res["bare_cpu_s_per_gb"]["total"] * 0.125, 2)
    res["chain_runs"] = [round(x, 3) for x in chain]
    res["bare_runs"] = [round(x, 3) for x in bare]
    if noflow:  # the same chain, its flowtables unused
        res["chain_no_flowtable_gbit_s_median"] = round(statistics.median(noflow), 3)
        res["ratio_no_flowtable"] = round(res["chain_no_flowtable_gbit_s_median"]
                                          / res["bare_gbit_s_median"], 3)
        res["chain_no_flowtable_cpu_s_per_gb"] = med(noflow_cpu)
        res["chain_no_flowtable_runs"] = [round(x, 3) for x in noflow]
    for k, v in res.items():
        print(f"{k:<36} {v}")
    write(a.out, res)


if __name__ == "__main__":
    main()
