"""Where the CPU goes, without perf(1): a sampling profiler of the whole machine on Linux's
perf_event_open(2) (software cpu-clock, every CPU, kernel and user), its samples named by
/proc/kallsyms (kernel) or the sampled process's name (user). Made for bench/vpn.py in
scripts/test-host's VM, whose Debian root has no perf (docs/field-notes.md): root only.

    with Profile() as prof:
        run_the_load()
    prof.top(20)  # [(symbol, share of samples), ...]
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import struct
import threading
import time
from collections import Counter

_NR_PERF_EVENT_OPEN = 298  # x86_64
_PERF_TYPE_SOFTWARE, _PERF_COUNT_SW_CPU_CLOCK = 1, 0
_PERF_SAMPLE_IP, _PERF_SAMPLE_TID = 1, 2
_PERF_RECORD_SAMPLE = 9
_IOC_ENABLE, _IOC_DISABLE = 0x2400, 0x2401
_PERF_FLAG_FD_CLOEXEC = 8
_PAGES = 64  # ring of data pages per CPU (read every 50 ms)
KERNEL_BASE = 0xFFFF800000000000


class _Attr(ctypes.Structure):
    """struct perf_event_attr as of PERF_ATTR_SIZE_VER0 (64 bytes), all this needs."""
    _fields_ = [("type", ctypes.c_uint32), ("size", ctypes.c_uint32),
                ("config", ctypes.c_uint64), ("sample_period", ctypes.c_uint64),
                ("sample_type", ctypes.c_uint64), ("read_format", ctypes.c_uint64),
                ("flags", ctypes.c_uint64), ("wakeup_events", ctypes.c_uint32),
                ("bp_type", ctypes.c_uint32), ("config1", ctypes.c_uint64)]


class Kallsyms:
    """Kernel addresses to function names (root reads the real addresses)."""

    def __init__(self) -> None:
        rows = []
        with open("/proc/kallsyms") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[1] in "tTwW":
                    a = int(parts[0], 16)
                    if a:
                        rows.append((a, parts[2]))
        rows.sort()
        self.addrs = [a for a, _ in rows]
        self.names = [n for _, n in rows]

    def name(self, ip: int) -> str:
        i = bisect.bisect_right(self.addrs, ip) - 1
        return self.names[i] if i >= 0 else hex(ip)


class Profile:
    """Samples every CPU every `period_ms` of CPU time (idle included: its share is the
    machine's idle) while the `with` block runs."""

    def __init__(self, period_ms: float = 1.0) -> None:
        self.period_ns = int(period_ms * 1e6)
        self.samples: Counter[tuple[str, int]] = Counter()  # (kernel symbol | "", pid)
        self.comms: dict[int, str] = {}
        self.lost = 0
        self._fds: list[int] = []
        self._maps: list[mmap.mmap] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._libc = ctypes.CDLL(None, use_errno=True)

    def __enter__(self) -> Profile:
        attr = _Attr(type=_PERF_TYPE_SOFTWARE, size=ctypes.sizeof(_Attr),
                     config=_PERF_COUNT_SW_CPU_CLOCK, sample_period=self.period_ns,
                     sample_type=_PERF_SAMPLE_IP | _PERF_SAMPLE_TID, flags=1)  # disabled
        page = mmap.PAGESIZE
        for cpu in range(os.cpu_count() or 1):
            fd = self._libc.syscall(_NR_PERF_EVENT_OPEN, ctypes.byref(attr), -1, cpu, -1,
                                    _PERF_FLAG_FD_CLOEXEC)
            if fd < 0:
                e = ctypes.get_errno()
                self.close()
                raise OSError(e, f"perf_event_open: {os.strerror(e)}")
            self._fds.append(fd)
            self._maps.append(mmap.mmap(fd, page * (1 + _PAGES)))
        for fd in self._fds:
            self._libc.ioctl(fd, _IOC_ENABLE, 0)
        self._thread = threading.Thread(target=self._reader, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._fds:
            self._libc.ioctl(fd, _IOC_DISABLE, 0)
        self._stop.set()
        if self._thread:
            self._thread.join()
        self._drain()
        self.close()

    def close(self) -> None:
        for m in self._maps:
            m.close()
        for fd in self._fds:
            os.close(fd)
        self._maps, self._fds = [], []

    def _reader(self) -> None:
        while not self._stop.wait(0.05):
            self._drain()

    def _drain(self) -> None:
        page = mmap.PAGESIZE
        size = page * _PAGES
        for m in self._maps:
            def read(at: int, n: int, m: mmap.mmap = m) -> bytes:
                a = at % size
                if a + n <= size:
                    return bytes(m[page + a:page + a + n])
                return bytes(m[page + a:page + size]) + bytes(m[page:page + a + n - size])

            head = struct.unpack_from("Q", m, 1024)[0]
            tail = struct.unpack_from("Q", m, 1032)[0]
            while tail < head:
                typ, _misc, n = struct.unpack("IHH", read(tail, 8))
                if n == 0:
                    break
                if typ == _PERF_RECORD_SAMPLE:
                    ip, pid, _tid = struct.unpack("QII", read(tail + 8, 16))
                    self.samples[(hex(ip) if ip >= KERNEL_BASE else "", pid)] += 1
                    if pid not in self.comms:
                        try:
                            with open(f"/proc/{pid}/comm") as f:
                                self.comms[pid] = f.read().strip()
                        except OSError:
                            self.comms[pid] = f"pid {pid}"
                elif typ == 2:  # PERF_RECORD_LOST
                    self.lost += 1
                tail += n
            struct.pack_into("Q", m, 1032, tail)

    def shares(self) -> Counter[str]:
        """Samples by name: a kernel function, or `[user] COMM` for user space, `idle`."""
        ks = Kallsyms()
        out: Counter[str] = Counter()
        for (ip, pid), n in self.samples.items():
            if ip:
                name = ks.name(int(ip, 16))
                if pid == 0 and name in IDLE:
                    name = "idle"
                out[name] += n
            else:
                out[f"[user] {self.comms.get(pid, pid)}"] += n
        return out

    def top(self, n: int = 25) -> list[tuple[str, float]]:
        s = self.shares()
        total = sum(s.values()) or 1
        return [(k, round(v / total, 4)) for k, v in s.most_common(n)]


IDLE = {"default_idle", "native_safe_halt", "pv_native_safe_halt", "mwait_idle",
        "arch_cpu_idle", "cpu_idle_poll", "default_idle_call", "do_idle", "acpi_safe_halt",
        "acpi_idle_do_entry", "intel_idle", "poll_idle"}

# what a kernel function is part of, by the start of its name: first match wins
GROUPS = (
    ("idle", ("idle",)),
    ("wireguard crypto", ("chacha20", "poly1305", "curve25519", "blake2s", "hchacha",
                          "chacha_")),
    ("wireguard", ("wg_", "wireguard")),
    ("nftables", ("nft_", "nf_tables", "__nft", "nft")),
    ("conntrack", ("nf_conntrack", "nf_ct_", "__nf_ct", "__nf_conntrack", "tcp_in_window",
                   "nf_confirm", "hash_conntrack")),
    ("flowtable", ("nf_flow", "flow_offload")),
    ("netfilter core", ("nf_hook", "nf_", "ipv4_conntrack", "ipv6_conntrack")),
    ("veth", ("veth_",)),
    ("tcp", ("tcp_", "__tcp")),
    ("udp", ("udp", "__udp")),
    ("ip", ("ip_", "ip6_", "__ip", "ipv6_", "fib", "dst_", "rt_", "inet_")),
    ("skb/net core", ("skb", "__skb", "netif", "__netif", "napi", "net_rx", "__napi",
                      "dev_", "__dev", "gro", "eth_", "validate_xmit", "sch_", "pfifo",
                      "qdisc", "__qdisc", "kfree_skb", "consume_skb", "sk_", "__sk",
                      "sock_", "neigh", "__neigh", "__build_skb", "build_skb", "csum",
                      "__x64_sys_sendto", "__sys_", "rps_")),
    ("copy/memory", ("copy_", "_copy", "memcpy", "memset", "memmove", "__memcpy",
                     "__memset", "clear_page", "kmem_", "__kmalloc", "kmalloc",
                     "kfree", "__slab", "slab_", "___slab", "page_", "__alloc_pages",
                     "get_page", "free_", "__free", "rep_movs", "__get_user",
                     "__put_user", "check_heap", "__check_object", "__virt_addr_valid")),
    ("scheduler/irq", ("__schedule", "schedule", "finish_task_switch", "try_to_wake",
                       "_raw_spin", "__softirqentry", "__do_softirq", "do_softirq",
                       "irq_", "__irq", "run_ksoftirqd", "ksoftirqd", "smpboot",
                       "__local_bh", "local_bh", "asm_", "sysvec", "hrtimer", "tick_",
                       "update_", "enqueue_", "dequeue_", "pick_", "__update", "rcu_",
                       "native_", "ttwu", "select_task", "switch_", "__switch",
                       "queue_work", "process_one_work", "worker_thread", "kthread")),
)


def group_of(name: str) -> str:
    if name.startswith("[user]"):
        return name
    for g, prefixes in GROUPS:
        if name.startswith(prefixes):
            return g
    return "other kernel"


def summary(prof: Profile, n: int = 25) -> dict[str, object]:
    """Shares of all samples by group and the top functions (idle included, so shares of
    busy time are share / (1 - idle))."""
    s = prof.shares()
    total = sum(s.values()) or 1
    groups: Counter[str] = Counter()
    for k, v in s.items():
        groups[group_of(k)] += v
    return {"samples": total, "lost_records": prof.lost,
            "groups": {**{k: round(v / total, 4) for k, v in groups.most_common()
                          if v / total >= 0.005},
                       "(each under 0.5 %)": round(sum(v for v in groups.values()
                                                       if v / total < 0.005) / total, 4)},
            "top": [[k, round(v / total, 4)] for k, v in s.most_common(n)]}


if __name__ == "__main__":  # a self-check: profile a second of this machine
    with Profile() as p:
        end = time.monotonic() + 1
        while time.monotonic() < end:
            pass
    import json

    print(json.dumps(summary(p, 10), indent=1))
