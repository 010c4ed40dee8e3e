"""Tor-over-VPN benchmark: `up --lab` of configs/tor-over-vpn.toml to 100 % bootstrap and to
the first byte from anon-whonix through the whole chain (Tor over VPN over the lab), median
and max of N runs; and the memory of the running stack (RSS of every process it started).

The first run starts cold: the kept lab Tor network (keys, consensus, descriptors under
/var/lib/netstack/lab-tor, netstack.tor.network) is removed first, as `down --purge` does;
the runs after it are warm. Medians and maxima are given for both.

    sudo .venv/bin/python bench/tor.py [--runs 5] [--out bench/results/tor.json]
        [--root CHECKOUT]  # another checkout's netstack (e.g. an older commit), same bench
        [--prefix tw]      # stack names: PREFIX + run number
        [--logs DIR]       # keep each run's daemon logs (tor's own timeline) in DIR/RUN
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
# --root: the netstack package of another checkout (read before anything imports it)
CODE = Path(sys.argv[sys.argv.index("--root") + 1]).resolve() if "--root" in sys.argv \
    else ROOT
sys.path.insert(0, str(CODE))

from common import machine, reap, write  # noqa: E402

from netstack import netns, plan, stack  # noqa: E402
from netstack.kernel import RealKernel  # noqa: E402
from netstack.processes import children  # noqa: E402
from netstack.state import ProcessRec, State  # noqa: E402
from netstack.tor.control import wait_bootstrap  # noqa: E402
from netstack.tor.gateway import TorInfo  # noqa: E402

KERNEL = RealKernel()  # this program's one kernel

WEB = "198.51.100.80"


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def first_byte(ns: str, deadline: float) -> None:
    """An HTTP GET from inside `ns` until the first byte of the answer arrives."""
    while True:
        with netns.entered(ns):
            s = socket.socket()
        s.settimeout(5)
        try:
            s.connect((WEB, 80))
            s.sendall(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n")
            if s.recv(1):
                return
        except OSError:
            pass
        finally:
            s.close()
        if time.monotonic() > deadline:
            raise TimeoutError("no first byte")
        time.sleep(0.05)




def purge_lab_cache() -> str:
    """What `down --purge` does to the kept lab Tor network; 'none' for code without one."""
    try:
        from netstack.tor.network import purge_cache
    except ImportError:
        return "none"
    purge_cache()
    return "purged"


def keep_logs(name: str, dst: str, t0_wall: float) -> None:
    """The run's daemon logs (every tor logs to its supervisor's file), copied before `down`
    removes them, with the wall time `up` began: what a slow first byte waited for."""
    import glob
    import shutil

    os.makedirs(dst, exist_ok=True)
    for f in glob.glob(os.path.join(stack.stack_dir(name), "*.log")):
        shutil.copy(f, dst)
    with open(os.path.join(dst, "t0"), "w") as f:
        f.write(time.strftime("%H:%M:%S", time.gmtime(t0_wall)) + f"{t0_wall % 1:.3f}"[1:] +
                "\n")


def one_run(name: str, measure_memory: bool, logs: str = "") -> dict:
    cfg = str(CODE / "configs" / "tor-over-vpn.toml")
    t0_wall = time.time()
    t0 = time.monotonic()
    p, _ = stack.up(cfg, name, plan.UplinkSpec("lab"), KERNEL)
    t_up = time.monotonic() - t0
    try:
        wait_bootstrap(p.infos(TorInfo)[0].control_socket, 120)
        t_boot = time.monotonic() - t0
        first_byte(f"nst-{name}-anon-whonix", t0 + 120)
        t_fb = time.monotonic() - t0
        out = {"up_s": t_up, "bootstrap_s": t_boot, "first_byte_s": t_fb}
        if measure_memory:
            st = State.load(name)
            pids = [o.pid for o in st.objects if isinstance(o, ProcessRec) and o.pid]
            kids = list(children(st).values())
            pids += [c.pid for c in kids]
            total = sum(rss_kib(x) for x in pids)
            tors = sum(rss_kib(c.pid) for c in kids if c.name.startswith(("lab-tor", "tor-")))
            out.update(rss_total_mib=round(total / 1024, 1), rss_tor_mib=round(tors / 1024, 1),
                       processes=len(pids))
        return out
    finally:
        if logs:
            keep_logs(name, os.path.join(logs, name), t0_wall)
        stack.down(name, KERNEL)
        reap()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "tor.json"))
    ap.add_argument("--root", default=str(ROOT), help="checkout whose netstack is measured")
    ap.add_argument("--prefix", default="tw", help="stack names: PREFIX + run number")
    ap.add_argument("--logs", default="", help="keep each run's daemon logs under this dir")
    a = ap.parse_args()
    cache = purge_lab_cache()
    runs = []
    for i in range(a.runs):
        load = os.getloadavg()[0]  # other work on the host slows tor's start and key making
        r = one_run(f"{a.prefix}{i}", i == 0, a.logs)
        r["start"] = "cold" if i == 0 or cache == "none" else "warm"
        r["load1"] = round(load, 2)
        print(f"run {i} ({r['start']}, load {load:.2f}): " + ", ".join(
            f"{k} {v:.2f}" for k, v in r.items() if k.endswith("_s")), flush=True)
        runs.append(r)
    res: dict = {"machine": machine(), "code": str(CODE), "lab_cache": cache,
                 "runs": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
                          for r in runs]}
    for k in ("up_s", "bootstrap_s", "first_byte_s"):
        res[f"{k}_median"] = round(statistics.median(r[k] for r in runs), 3)
        res[f"{k}_max"] = round(max(r[k] for r in runs), 3)
        for start in ("cold", "warm"):
            vals = [r[k] for r in runs if r["start"] == start]
            if vals:
                res[f"{k}_{start}_median"] = round(statistics.median(vals), 3)
                res[f"{k}_{start}_max"] = round(max(vals), 3)
    res["memory"] = {k: runs[0][k] for k in ("rss_total_mib", "rss_tor_mib", "processes")}
    for k, v in res.items():
        if k != "runs":
            print(f"{k:<22} {v}")
    write(a.out, res)


if __name__ == "__main__":
    main()
