"""`netstack check [CONFIG] [--qube Q] [--expect tor|vpn|direct] -- CMD`: leak-test any
program. A lab stack of its own (the offline internet: every name answers, every port
takes a connection) or a running one (`--stack`), CMD run in the workstation's sandbox with
the lab CA handed over, every link of the chain captured while it runs, the stack taken
down after (also on Ctrl-C, SIGTERM, SIGHUP, `--timeout` or CMD crashing), and one verdict
per flow CMD caused: its class, its outcome, the way out, and the evidence.

A flow is one conversation on the workstation's own link (its 5-tuple there: protocol,
addresses, ports; ICMP echo by its identifier). Its outcome comes from evidence, never
from a guess:

- left: a lab host saw it. Every lab service logs each connection or datagram in one
  record (lab/services.conn_record): protocol, the client's and its own address and port
  as it saw them after NAT, and a payload mark, the length and sha256 of the first up to
  64 bytes it received. Tor exits and the VPN server's NAT rewrite the tuple but not the
  stream, so the flow is the one whose first payload bytes (on the workstation's link)
  carry that mark; through a SOCKS port the mark is looked for past the handshake; DNS
  re-asked by Tor matches by the name; ICMP echo by the echo seen on a lab host's link.
  The way out (tor, vpn, direct) is who the lab host saw: a Tor exit, the VPN server,
  sys-net's ISP address.
- stopped: its packets are on the link into the workstation's netvm and on no link beyond
  it, and the audit's evaluator, running its first packet through that netvm's live
  ruleset, names the hook and rule that drop it.
- answered: the netvm's own service answered it (a Tor gateway's DNSPort answering from
  its cache): the evaluator delivers it to the netvm itself (input accepted), a reply is on
  the workstation's link, and no link beyond carried it. Not a leak, not a bypass.
- held: what the netvm's own service took (delivered to it as for answered: a DNS query
  its resolver did not answer while CMD ran, a stream Tor's TransPort gave up) and no
  link beyond carried and no lab host logged: it never left (had the service sent it on,
  the lab's hosts, its sink included, would have logged it). Not a leak, not a bypass,
  not a wolf cry; a command that failed for it exits 3.
- unknown: anything else (no lab host saw it, yet the evaluator lets it through, or its
  packets are seen beyond the hop the evaluator names), always with the reason.

Besides flows, any packet on any link that the chain does not allow there (the leak
test's rules) is a leak, with the pcap and frame that prove it.

The table, `--json`, `--junit` and `--html` are renderings of the same Report. CMD's own
stdout goes to check's stderr with `--json`, so the report is the only thing on stdout.

Exit: 0 clean; 1 a leak (something left another way than --expect, or a packet where the
chain forbids it) or a flow of unknown outcome; 2 CMD tried to get around the chain and
was stopped (`--bypass warn` makes it 0); 3 CMD failed, ran past `--timeout` (ended, the
report says so) or was ended because check got SIGINT, SIGTERM or SIGHUP (the report is
still written, the stack taken down, every capture ended). A signal before CMD started
(while the lab stack comes up) exits 128+signal with no report."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from netstack.addressing import VIRTUAL_DNS
from netstack.errors import UsageError, count
from netstack.kernel import Kernel

EXPECT = ("tor", "vpn", "direct")
CA_INSIDE = "/run/netstack-lab-ca.pem"
CA_ENV = ("SSL_CERT_FILE", "CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
          "GIT_SSL_CAINFO")
CLASSES = {  # class -> what it means, in the report's words
    "allowed": "left through the chain",
    "proxy": "through the gateway's SOCKS port",
    "dns": "DNS to a resolver of its own (not the chain's)",
    "udp": "direct UDP (STUN, WebRTC, QUIC)",
    "ipv6": "IPv6",
    "multicast": "multicast or broadcast (mDNS, LLMNR, SSDP)",
    "raw": "raw IP (a protocol other than TCP, UDP, ICMP)",
    "gateway": "the gateway's or another qube's own addresses",
    "icmp": "ICMP (ping, traceroute)",
    "tcp": "TCP the chain did not carry",
}
WORDS = {0: "CLEAN", 1: "LEAK", 2: "STOPPED", 3: "COMMAND FAILED"}
STREAM_MAX = 4096  # client bytes of a TCP flow kept to look for a payload mark
MARK_BYTES = 64  # as lab/services.MARK_BYTES


@dataclass
class Evidence:
    """What an outcome rests on: a lab service's log record, a packet in a capture, or the
    evaluator's rule."""

    kind: str  # lab-log | capture | rule
    link: str | None = None
    pcap: str | None = None
    frame: int | None = None
    detail: str = ""


@dataclass
class Flow:
    """One conversation CMD started, as its workstation's link saw it, and its verdict."""

    family: str
    proto: str
    dst: str
    dport: int | None
    packets: int = 0
    bytes: int = 0
    klass: str = "allowed"
    outcome: str = "unknown"  # left | answered | held | stopped | unknown
    via: str | None = None  # tor | vpn | direct (how it reached the lab, when it did)
    names: list[str] = field(default_factory=list)
    stopped_by: dict[str, Any] | None = None
    first_frame: int = 0  # in the workstation link's pcap
    src: str = ""
    sport: int | None = None
    echo_id: int | None = None  # ICMP echo identifier
    reason: str = ""  # why this outcome, in words (always given for unknown)
    evidence: list[Evidence] = field(default_factory=list)
    # kept to match, never reported: the client's first bytes (TCP), datagrams (UDP),
    # echo payloads (ICMP), the names a DNS flow asked
    _stream: bytes = field(default=b"", repr=False)
    _datagrams: list[bytes] = field(default_factory=list, repr=False)
    _asked: list[str] = field(default_factory=list, repr=False)
    _replied: bool = field(default=False, repr=False)


@dataclass
class Leak:
    link: str
    pcap: str
    frame: int
    summary: str
    kind: str = "link"  # link: a packet the chain forbids there; flow: left the wrong way


@dataclass
class Report:
    stack: str
    qube: str
    expect: str
    command: list[str]
    exit_status: int | None
    seconds: float
    pcaps: str
    flows: list[Flow]
    leaks: list[Leak]
    names_asked: list[str]
    chain: list[dict[str, Any]]
    links: list[dict[str, Any]]
    verdict: int = 0
    bypass: str = "fail"
    ended_by: str | None = None  # timeout | SIGINT | SIGTERM | SIGHUP: CMD did not finish
    captures: list[dict[str, Any]] = field(default_factory=list)  # tcpdump pid per link

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for f in d["flows"]:
            for k in [k for k in f if k.startswith("_")]:
                del f[k]
        d["verdict_word"] = word(self)
        d["reasons"] = reasons(self)
        return d

    @property
    def stopped(self) -> list[Flow]:
        return [f for f in self.flows if f.outcome == "stopped"]

    @property
    def unknown(self) -> list[Flow]:
        return [f for f in self.flows if f.outcome == "unknown"]


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, handled where Ctrl-C is (a CI runner's time-out sends SIGTERM)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
    """SIGTERM and SIGHUP raise Interrupted while CMD (or the lab stack) is being brought
    about; once `defer()` is called (report and teardown under way) they are only noted,
    so a second signal cannot cut the report or `down` short."""

    def __init__(self) -> None:
        self.deferred = False
        self.pending: int | None = None
        self.old: dict[int, Any] = {}

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGHUP):
                self.old[s] = signal.signal(s, self._on)
        return self

    def _on(self, signum: int, _frame: Any) -> None:
        if self.deferred:
            self.pending = signum
            return
        raise Interrupted(signum)

    def defer(self) -> None:
        self.deferred = True

    def __exit__(self, *exc: Any) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


def default_expect(protection: str) -> str:
    return {"tor": "tor", "vpn": "vpn"}.get(protection, "direct")


def run(cmd: list[str], config: str | None = None, qube: str | None = None,
        expect: str | None = None, stack: str | None = None, pcaps: str | None = None,
        bypass: str = "fail", progress: Any = None, fault: Any = None,
        timeout: float | None = None, stdout: Any = None, *, kernel: Kernel) -> Report:
    """fault: a protection broken on purpose while CMD runs (tests only: the leak test's
    Fault), to show the report catches what the chain guards. timeout: seconds CMD may
    run before it is ended (the report says so, verdict 3). stdout: where CMD's output
    goes (default: check's own; `--json` sends it to stderr)."""
    from netstack import stack as stacks
    from netstack.model import UplinkSpec

    if not cmd:
        raise UsageError("check: give the command after --, e.g. netstack check -- curl "
                         "https://example.org/")
    if expect is not None and expect not in EXPECT:
        raise UsageError(f"--expect {expect!r}: use one of {', '.join(EXPECT)}")
    if bypass not in ("fail", "warn"):
        raise UsageError(f"--bypass {bypass!r}: use fail or warn")
    if timeout is not None and timeout <= 0:
        raise UsageError(f"--timeout {timeout}: give a number of seconds above 0")
    stacks.require_root("check")
    own = stack is None
    name = stack or "ck" + secrets.token_hex(3)
    with Signals() as sig:
        try:
            if own:
                if progress:
                    progress(f"bringing up lab stack {name} (offline internet)")
                remove_orphans(kernel, progress)
                stacks.up(config, name, UplinkSpec("lab", sink=True), kernel,
                          owner=os.getpid())
                wait_ready(name, kernel, progress)
            return _run(name, cmd, qube, expect, pcaps, bypass, fault, timeout, stdout, sig,
                        kernel)
        finally:
            sig.defer()
            from netstack.state import State

            if own and State.load(name) is not None:  # `up` cleans up what it half made
                if progress:
                    progress(f"taking stack {name} down")
                stacks.down(name, kernel)
                _remove_overlay(name)


def _remove_overlay(name: str) -> None:
    from netstack.rules.qubefw import overlay_path

    with contextlib.suppress(OSError):
        shutil.rmtree(os.path.dirname(overlay_path(name)))


def remove_orphans(kernel: Kernel, progress: Any = None) -> list[str]:
    """Take down the lab stacks of earlier checks whose process is gone (a `kill -9`
    leaves its stack up: nothing else would ever remove it). Only stacks that name their
    owning check (state.owner) are touched: never a user's stack, never a live check's.
    Returns the stacks removed."""
    from netstack import stack as stacks
    from netstack.errors import NetstackError
    from netstack.state import State, owner_gone

    gone = []
    for name in State.stacks():
        if not name.startswith("ck"):
            continue
        try:
            st = State.load(name)
            if st is None or not owner_gone(st.data):
                continue
            if progress:
                progress(f"taking down lab stack {name}: its check (pid {st.data.owner}) "
                         "is gone")
            if stacks.down(name, kernel):
                continue  # what is left stays named by `status`
        except NetstackError:  # damaged, or being changed by another netstack: not ours now
            continue
        _remove_overlay(name)
        gone.append(name)
    return gone


def wait_ready(stack: str, k: Kernel, progress: Any = None, timeout: float = 120) -> None:
    """Every VPN carries traffic and every Tor gateway bootstrapped (as `up` waits)."""
    from netstack.kinds.registry import RUNTIMES
    from netstack.state import State

    st = State.load(stack)
    assert st is not None and st.plan is not None
    for q in st.plan.qubes:
        role = RUNTIMES[q.kind]
        last: list[str] = []

        def say(pct: int, what: str, q: Any = q, last: list[str] = last) -> None:
            line = f"{q.name}: {pct}% {what}"
            if progress and (not last or last[-1] != line):
                last.append(line)
                progress(line)
        role.wait_ready(q, st, k, timeout, say)
        wait_circuit(q, timeout, say)


def wait_circuit(q: Any, timeout: float, say: Any) -> None:
    """A Tor gateway is ready for the program once it has a BUILT circuit, not at 100 %
    bootstrap: the first stream right after bootstrap can fail (docs/field-notes.md, Tor; the check
    corpus saw curl fail its first TLS stream 1 run in 4), and the program must not be
    judged by the lab's readiness."""
    from netstack.tor.gateway import TorInfo

    if not isinstance(getattr(q, "info", None), TorInfo):
        return
    from netstack.tor.control import TorError, status

    end = time.monotonic() + timeout
    while True:
        try:
            s = status(q.info.control_socket)
            if s["circuit_established"] and s["circuits_built"] > 0:
                say(100, f"{count(s['circuits_built'], 'circuit')} built")
                return
        except TorError:
            pass
        if time.monotonic() > end:
            raise TorError(f"{q.name}: tor built no circuit within {timeout:.0f} s")
        time.sleep(0.1)


class Watch:
    """Captures on every link of a workstation's chain and the lab logs' positions, from
    `start` on; `report` stops the captures and says what happened since (`check` runs
    one around CMD; the pytest plugin one per `chain.mark()`). Each capture is recorded in
    the stack's state while it runs (leaktest/capture.py), so `down` ends it even if this
    process is killed."""

    def __init__(self, stack: str, qube: str | None, k: Kernel, expect: str | None = None,
                 pcaps: str | None = None, bypass: str = "fail") -> None:
        from netstack.leaktest import battery

        self.k = k.fork()  # its own handles: the captures' threads use them
        self.ctx = battery.context(stack, qube, self.k)
        self.expect = expect or default_expect(self.ctx.protection)
        self.bypass = bypass
        when = time.strftime("%Y%m%d-%H%M%S")
        self.out_dir = pcaps or os.path.join(os.getcwd(), "pcaps",
                                             f"{when}-{stack}-check-{secrets.token_hex(2)}")
        self.lks: list[Any] = []
        self.logs: dict[str, int] = {}
        self.t0 = 0.0

    def start(self) -> Watch:
        from netstack.leaktest import battery
        from netstack.leaktest.capture import Capture

        os.makedirs(self.out_dir, exist_ok=True)
        self.lks = battery.links(self.ctx)
        self.logs = _log_marks(self.ctx)
        try:
            for lk in self.lks:
                lk.capture = Capture(lk.netns, lk.iface, os.path.join(
                    self.out_dir, lk.name.replace(":", "_") + ".pcap"))
                lk.capture.start()
        except BaseException:
            self.stop()
            raise
        self.t0 = time.monotonic()
        return self

    def stop(self) -> None:
        for lk in self.lks:
            if lk.capture:
                lk.capture.stop()

    def close(self) -> None:
        self.stop()
        self.k.close()

    def report(self, cmd: list[str], status: int | None, ended_by: str | None = None
               ) -> Report:
        _settle_logs(self.ctx)  # the last records, replies and tcpdump's buffer land
        self.stop()
        secs = time.monotonic() - self.t0
        try:
            gw = self.ctx.chain[1]
            rulesets = {gw.netns: self.k.nft_list(gw.netns)}
            r = _report(self.ctx, self.lks, self.logs, rulesets, cmd, status, secs,
                        self.out_dir, self.expect, self.bypass, ended_by)
            r.captures = [{"link": lk.name, "pid": lk.capture.pid} for lk in self.lks
                          if lk.capture]
            return r
        finally:
            self.k.close()


def _settle_logs(ctx: Any, quiet: float = 0.15, deadline: float = 2.0) -> None:
    """Until the lab logs have not grown for `quiet` seconds (at most `deadline`): a
    service writes its record as the reply goes out, and CMD may exit first."""
    def sizes() -> list[int]:
        return [os.path.getsize(p) if os.path.exists(p) else 0 for p in _lab_logs(ctx)]
    end = time.monotonic() + deadline
    last, since = sizes(), time.monotonic()
    while time.monotonic() < end:
        time.sleep(0.03)
        now = sizes()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


def _run(stack: str, cmd: list[str], qube: str | None, expect: str | None,
         pcaps: str | None, bypass: str, fault: Any, timeout: float | None = None,
         stdout: Any = None, sig: Signals | None = None, kernel: Kernel | None = None
         ) -> Report:
    assert kernel is not None
    w = Watch(stack, qube, kernel, expect, pcaps, bypass).start()
    status: int | None = None
    ended_by: str | None = None
    try:
        repair = fault.inject(w.ctx) if fault else None
        try:
            status, ended_by = run_cmd(w.ctx, cmd, timeout, stdout)
        finally:
            if sig:
                sig.defer()
            if repair:
                repair()
    except BaseException:
        w.close()
        raise
    return w.report(cmd, status, ended_by)


def lab_ca(ctx: Any) -> tuple[Any, ...]:
    """The lab CA, where TLS libraries look for it, as a grant of the workstation's sandbox
    (none without a lab)."""
    from netstack import sandbox
    from netstack.lab.sink import ca_path

    lab = ctx.plan.lab
    ca = ca_path(lab.dir) if lab else ""
    if not (ca and os.path.exists(ca)):
        return ()
    public = os.path.join(ctx.state.dir, "lab-ca.pem")  # the stack dir is 0711
    shutil.copyfile(ca, public)
    os.chmod(public, 0o644)
    return (sandbox.Grant("lab-ca", public, CA_INSIDE, tuple((v, CA_INSIDE) for v in CA_ENV),
                          readonly=True),)


def run_in(ctx: Any, cmd: list[str], capture: bool = False, **how: Any) -> Any:
    """CMD in the workstation's sandbox (a service qube: as root in its namespace) with the
    lab CA handed over, through netstack.executor: its Outcome (capture: its output kept)."""
    from netstack import executor

    return executor.run(ctx.kernel, ctx.state, ctx.ws, cmd, extra=lab_ca(ctx),
                        capture=capture, **how)


def run_cmd(ctx: Any, cmd: list[str], timeout: float | None = None, stdout: Any = None
            ) -> tuple[int, str | None]:
    """CMD in the workstation's sandbox until it exits, runs past `timeout` or check is
    interrupted (Ctrl-C, SIGTERM, SIGHUP, handed on to it): then it is ended (SIGKILL after
    executor.GRACE; the sandbox's PID namespace ends with it). (status, what ended it). It is
    recorded in the stack's state while it runs, and dies with check: after a `kill -9` of
    check, `down` ends whatever is left of it by PID."""
    o = run_in(ctx, cmd, timeout=timeout, stdout=stdout,
               name=f"check program in {ctx.ws.name}")
    return o.code, o.ended_by


def _lab_logs(ctx: Any) -> list[str]:
    """Every lab service's log in the stack's directory (lab-http, lab-dns, lab-sink and
    any other service that writes services.conn_record lines)."""
    try:
        names = sorted(os.listdir(ctx.state.dir))
    except OSError:
        return []
    return [os.path.join(ctx.state.dir, n) for n in names
            if n.startswith("lab-") and n.endswith(".log")]


def _log_marks(ctx: Any) -> dict[str, int]:
    """How long each lab log is now: CMD's records come after."""
    out = {}
    for p in _lab_logs(ctx):
        with contextlib.suppress(OSError):
            out[os.path.basename(p)] = os.path.getsize(p)
    return out


def _new_records(ctx: Any, marks: dict[str, int]) -> list[dict[str, Any]]:
    """The connection records lab services wrote since `marks`, each with its service
    (daemon logs in text, such as the VPN server's, are skipped)."""
    out = []
    for p in _lab_logs(ctx):
        name = os.path.basename(p)
        try:
            with open(p, "rb") as f:
                f.seek(marks.get(name, 0))
                data = f.read()
        except OSError:
            continue
        for line in data.decode(errors="replace").splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if isinstance(r, dict) and "client" in r:
                r["service"] = name[:-4]
                out.append(r)
    return out


# --- the report -----------------------------------------------------------------------------

def proxies(ctx: Any) -> set[tuple[str, int]]:
    """(address, port) of the proxies the workstation's netvm offers it (a Tor gateway's
    SOCKS ports), from the environment the netvm gives its clients."""
    gw = ctx.chain[1]
    env = gw.client_env
    host = env.get("TOR_SOCKS_HOST")
    return {(host, int(v)) for k, v in env.items() if host and k.startswith("TOR_SOCKS_PORT")}


def classify(ctx: Any, family: str, proto: str, dst: str, dport: int | None) -> str:
    """The class of a flow by what it is (the outcome says whether the chain carried it)."""
    a = ipaddress.ip_address(dst)
    if proto == "tcp" and (dst, dport) in proxies(ctx):
        return "proxy"
    if family == "ipv6":
        return "ipv6"
    if a.is_multicast or dst == "255.255.255.255" or dst.endswith(".255"):
        return "multicast"
    if proto not in ("tcp", "udp", "icmp"):
        return "raw"
    if dport == 53 and dst not in VIRTUAL_DNS:
        return "dns"
    if dst in VIRTUAL_DNS and dport == 53:
        return "allowed"
    if a in ipaddress.ip_network("10.137.0.0/16") or a in ipaddress.ip_network(
            "10.139.0.0/16"):
        return "gateway"
    if proto == "icmp":
        return "icmp"
    if proto == "udp":
        return "udp"
    return "allowed"


def _name(host: Any) -> str | None:
    """A name from a Host header or SNI (its port dropped); None for an address literal."""
    if not isinstance(host, str) or not host:
        return None
    h = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    h = h.strip("[]")
    try:
        ipaddress.ip_address(h)
        return None
    except ValueError:
        return h


def _via(ctx: Any, client: str) -> str:
    if client in ctx.exits:
        return "tor"
    if ctx.vpn_server and client == ctx.vpn_server:
        return "vpn"
    return "direct"


def _digest(data: bytes) -> str:
    """As lab/services.mark: the first 16 hex digits of sha256."""
    return hashlib.sha256(data).hexdigest()[:16]


def _is_reply_icmp(six: bool, typ: int) -> bool:
    """ICMP the workstation sends about someone else's packet (errors, echo replies,
    neighbour discovery): not a flow CMD started."""
    if six:
        return typ < 128 or typ in (129, 130, 131, 132, 133, 134, 135, 136, 137, 143)
    return typ not in (8, 13, 15, 17)


def flows_of(ctx: Any, pkts: list[Any]) -> tuple[list[Flow], list[str], dict[str, list[str]]]:
    """CMD's flows on its own link (one per 5-tuple; ICMP echo per identifier), the names
    it asked, and address -> names answered."""
    from scapy.layers.dns import DNS
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import IPv6

    own = {a for a in (ctx.ws.ipv4, ctx.ws.ipv6) if a}
    flows: dict[tuple, Flow] = {}
    segs: dict[tuple, dict[int, bytes]] = {}
    isn: dict[tuple, int] = {}
    starts: dict[tuple, bool] = {}  # a packet other than a bare RST was sent
    replied: set[tuple] = set()  # (client, its port, server, its port) that answered
    asked: list[str] = []
    answers: dict[str, list[str]] = {}
    for i, p in enumerate(pkts, start=1):
        ip = p.getlayer(IP) or p.getlayer(IPv6)
        if ip is None:
            continue
        qnames: list[str] = []
        if DNS in p:
            try:
                d = p[DNS]
                qds = list(d.qd) if isinstance(d.qd, list) else [d.qd] if d.qd else []
                ans = list(d.an) if isinstance(d.an, list) else \
                    [d.an[j] for j in range(d.ancount)] if d.an else []
                if d.qr == 0:
                    for q in qds:
                        qn = q.qname.decode(errors="replace").rstrip(".")
                        if not qn:
                            continue
                        qnames.append(qn)
                        if qn not in asked and ip.src in own:
                            asked.append(qn)
                for rr in ans if d.qr == 1 else []:
                    if getattr(rr, "type", 0) == 1:
                        names = answers.setdefault(str(rr.rdata), [])
                        n = rr.rrname.decode(errors="replace").rstrip(".")
                        if n not in names:
                            names.append(n)
            except Exception:  # noqa: BLE001 - not DNS after all (a port-53/5353 payload)
                qnames = []
        six = isinstance(ip, IPv6)
        if ip.src not in own and not (six and not ip.src.startswith("fe80:")
                                      and ip.src != "::"):
            if ip.dst in own:  # a reply: its flow got an answer on the workstation's link
                r_sport = p[TCP].dport if TCP in p else p[UDP].dport if UDP in p else None
                r_dport = p[TCP].sport if TCP in p else p[UDP].sport if UDP in p else None
                replied.add((ip.dst, r_sport, ip.src, r_dport))
            continue  # replies, and the link's own neighbour discovery
        icmp = ICMP in p or (six and getattr(ip, "nh", 0) == 58)
        proto = "tcp" if TCP in p else "udp" if UDP in p else "icmp" if icmp else \
            f"ip-proto-{ip.proto if not six else ip.nh}"
        sport = p[TCP].sport if TCP in p else p[UDP].sport if UDP in p else None
        dport = p[TCP].dport if TCP in p else p[UDP].dport if UDP in p else None
        echo_id = None
        payload = b""
        if proto == "icmp":
            l4 = p.getlayer(ICMP) if ICMP in p else ip.payload
            typ = int(getattr(l4, "type", 0))
            if _is_reply_icmp(six, typ):
                continue
            echo_id = getattr(l4, "id", None)
            payload = bytes(l4.payload) if l4.payload else b""
        elif proto == "tcp":
            payload = bytes(p[TCP].payload)
        elif proto == "udp":
            payload = bytes(p[UDP].payload)
        key = ("ipv6" if six else "ipv4", proto, ip.src, sport, ip.dst, dport, echo_id)
        f = flows.get(key)
        if f is None:
            f = flows[key] = Flow(key[0], proto, ip.dst, dport, first_frame=i, src=ip.src,
                                  sport=sport, echo_id=echo_id)
            f.klass = classify(ctx, key[0], proto, ip.dst, dport)
        f.packets += 1
        f.bytes += len(ip)
        for qn in qnames:
            if qn not in f._asked:
                f._asked.append(qn)
        if proto == "tcp":
            flags = int(p[TCP].flags)
            if flags & 0x02:
                isn[key] = int(p[TCP].seq) + 1
            if not (flags & 0x04) or payload:
                starts[key] = True
            if payload:
                segs.setdefault(key, {}).setdefault(int(p[TCP].seq), payload)
        else:
            starts[key] = True
            if payload and len(f._datagrams) < 64:
                f._datagrams.append(payload)
    out = []
    for key, f in flows.items():
        if not starts.get(key):
            continue  # bare RSTs: the answer to someone else's packet
        if key in segs:
            f._stream = _assemble(segs[key], isn.get(key))
        f._replied = (f.src, f.sport, f.dst, f.dport) in replied
        out.append(f)
    return out, asked, answers


def _assemble(segs: dict[int, bytes], isn: int | None) -> bytes:
    """The client's byte stream from its segments (retransmissions and overlaps once),
    up to STREAM_MAX bytes."""
    base = isn if isn is not None else min(segs)
    out = bytearray()
    for seq in sorted(segs, key=lambda x: (x - base) % 2**32):
        off = (seq - base) % 2**32
        data = segs[seq]
        if off > len(out):
            break  # a hole (a segment the capture missed): stop at what is certain
        out += data[len(out) - off:]
        if len(out) >= STREAM_MAX:
            break
    return bytes(out[:STREAM_MAX])


def _marked(f: Flow, r: dict[str, Any], anywhere: bool) -> bool:
    """The flow carries the record's payload mark: its first bytes (TCP: the stream;
    anywhere: past a proxy's handshake too; UDP: a datagram)."""
    n, m = r.get("mark_len"), r.get("mark")
    if not n or not m or r.get("proto") != f.proto:
        return False
    if f.proto == "tcp":
        s = f._stream
        offsets = range(0, len(s) - n + 1) if anywhere else range(0, 1 if len(s) >= n else 0)
        return any(_digest(s[o:o + n]) == m for o in offsets)
    if f.proto == "udp":
        return any(min(len(d), MARK_BYTES) == n and _digest(d[:n]) == m
                   for d in f._datagrams)
    return False


def route_of(netns: str, dst: str, src: str, iif: str) -> tuple[str | None, str]:
    """Where the netvm's kernel routes a packet forwarded from `iif` (`ip route get`, the
    live table, policy rules included): (device, "") with "lo" for what it delivers to
    itself (its own, broadcast and multicast addresses), or (None, why not)."""
    if ipaddress.ip_address(dst).is_multicast:
        return "lo", ""  # not routed: delivered locally or nowhere (no multicast routing)
    p = subprocess.run(["ip", "-n", netns, "-j", "route", "get", dst, "from", src, "iif",
                        iif], capture_output=True, text=True)
    if p.returncode != 0:
        return None, (p.stderr.strip().splitlines() or ["no route"])[-1]
    try:
        r = json.loads(p.stdout)[0]
    except (ValueError, IndexError):
        return None, "unreadable answer from ip route get"
    return ("lo" if r.get("type") in ("local", "broadcast", "multicast") else r.get("dev")), ""


def _stopped_by(ctx: Any, rs: dict[str, Any], f: Flow) -> dict[str, Any] | None:
    """Run the flow's first packet through the workstation's netvm's live ruleset (the
    audit's evaluator, NAT included), routed as that netvm's kernel routes the address
    after NAT (`ip route get`: into a tunnel, or up, per family). Its fate there: "drop"
    with the hook and rule, "routing" when the kernel has no route for it, "local" when
    it is delivered to the netvm's own service (a Tor gateway's DNSPort), or None when it
    is passed on (or its fate cannot be told: the outcome then rests on other evidence)."""
    from netstack.audit.evaluator import Packet, Ruleset, Step, fate

    gw = ctx.chain[1]
    vif = next((c.vif for c in gw.clients if c.name == ctx.ws.name), None)
    if vif is None:
        return None
    saddr = f.src or (ctx.ws.ipv4 if f.family == "ipv4" else (ctx.ws.ipv6 or "::"))
    local = {a for a in (gw.ipv4, gw.ipv6) if a}
    routes: dict[str, tuple[str | None, str]] = {}

    def route(d: str) -> str | None:
        if d not in routes:
            routes[d] = route_of(gw.netns, d, saddr, vif)
        return routes[d][0]
    if f.dst not in local and route(f.dst) == "lo":
        local.add(f.dst)  # its own, broadcast or multicast: through input, as the kernel
    p = Packet(family=f.family, iifname=vif, saddr=saddr, daddr=f.dst,
               l4proto=f.proto if not f.proto.startswith("ip-proto-") else
               f.proto.split("-")[-1], dport=f.dport,
               sport=(f.sport or 40000) if f.dport is not None else None,
               icmp_type=(8 if f.family == "ipv4" else 128) if f.proto == "icmp" else None)
    traces: list[tuple[str, list[Step], list[str]]] = []
    try:
        hooks = fate(Ruleset(rs), p, route, local,
                     lambda _i, fam: gw.ipv4 if fam == "ipv4" else gw.ipv6, traces)
    except Exception:  # noqa: BLE001 - a report line must not break the report
        return None
    for (hook, verdict), (_h, steps, _t) in zip(hooks, traces, strict=False):
        last = steps[-1] if steps else None
        rule = {"qube": gw.name, "hook": hook,
                "rule": (last.comment or f"{last.chain} policy") if last else "policy",
                "chain": last.chain if last else None,
                "handle": last.handle if last else None}
        if verdict == "drop":
            return {"fate": "drop", **rule}
        if hook == "input" and verdict == "accept":
            return {"fate": "local", **rule}
    if hooks and hooks[-1] == ("route", "lost"):
        why = next((w for _d, (dev, w) in routes.items() if dev is None and w), "no route")
        if "unreachable" in why.lower() or "no route" in why.lower():
            return {"fate": "routing", "qube": gw.name, "hook": "routing",
                    "rule": f"no route ({why})", "chain": None, "handle": None}
    return None


@dataclass
class Seen:
    """One link's capture, read back."""

    link: str
    zone: str
    pcap: str
    pkts: list[Any]


def _l4(p: Any) -> tuple[str | None, str | None, str | None, int | None, int | None, Any]:
    """(proto, src, dst, sport, dport, the L4 layer) of a captured packet."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import IPv6

    ip = p.getlayer(IP) or p.getlayer(IPv6)
    if ip is None:
        return None, None, None, None, None, None
    for name, layer in (("tcp", TCP), ("udp", UDP)):
        if layer in p:
            return name, ip.src, ip.dst, p[layer].sport, p[layer].dport, p[layer]
    if ICMP in p:
        return "icmp", ip.src, ip.dst, None, None, p[ICMP]
    six = isinstance(ip, IPv6)
    if six and getattr(ip, "nh", 0) == 58:
        return "icmp", ip.src, ip.dst, None, None, ip.payload
    return f"ip-proto-{ip.nh if six else ip.proto}", ip.src, ip.dst, None, None, ip.payload


def _same_flow(f: Flow, p: Any) -> bool:
    """A packet elsewhere in the chain (after NAT) is this flow's: same protocol and
    destination (and port), and for a flow with payload the same first payload bytes."""
    proto, _src, dst, _sp, dport, l4 = _l4(p)
    if proto != f.proto or dst != f.dst:
        return False
    if f.proto in ("tcp", "udp"):
        if dport != f.dport:
            return False
        data = bytes(l4.payload) if l4 is not None and l4.payload else b""
        if f.proto == "udp" and f._datagrams:
            return data in f._datagrams
        return True
    if f.proto == "icmp":
        data = bytes(l4.payload) if l4 is not None and l4.payload else b""
        if _is_reply_icmp(":" in f.dst, int(getattr(l4, "type", 0))):
            return False
        return data in f._datagrams if f._datagrams else True
    return True


def attribute(ctx: Any, flows: list[Flow], records: list[dict[str, Any]],
              seen: list[Seen], stop: Any, src: Seen | None = None) -> None:
    """Each flow's outcome from evidence (see the module docstring). records: the lab
    services' new records; seen: every link's capture; stop(flow): the evaluator's rule
    that drops the flow's first packet in the workstation's netvm, or None."""
    src = src or next((x for x in seen if x.zone == "source"), None)
    src_link, src_pcap = (src.link, src.pcap) if src else ("workstation", "")
    claimed: set[int] = set()
    ordered = sorted(records, key=lambda r: r.get("t", 0))

    def take(f: Flow, r: dict[str, Any], how: str) -> None:
        claimed.add(id(r))
        if r.get("proto") == "tcp":  # later requests on the same connection are its too
            claimed.update(id(x) for x in records if x.get("proto") == "tcp" and
                           (x.get("service"), x.get("client"), x.get("cport")) ==
                           (r.get("service"), r.get("client"), r.get("cport")))
        f.outcome = "left"
        f.via = _via(ctx, r["client"])
        f.names = sorted(set(f.names) | {n for n in (_name(r.get("host")), _name(r.get("sni")))
                                         if n})
        where = f"{r.get('dst')}:{r.get('dport')}" if r.get("dst") else "its port"
        f.evidence.append(Evidence(
            "lab-log", link=r.get("service"), detail=f"{r.get('service')} saw "
            f"{r.get('proto')} from {r['client']}:{r.get('cport')} to {where} ({how})"))
        if not f.reason:
            f.reason = f"{r.get('service')} logged it, {how}"

    def free(pred: Any) -> list[dict[str, Any]]:
        return [r for r in ordered if id(r) not in claimed and pred(r)]

    by_first = sorted(flows, key=lambda f: (f.klass == "proxy", f.first_frame))
    # 1. the tuple as the lab host saw it is the workstation's own (nothing rewrote it)
    for f in by_first:
        for r in free(lambda r, f=f: r.get("proto") == f.proto and r.get("client") == f.src
                      and r.get("cport") == f.sport and r.get("dst") == f.dst
                      and r.get("dport") == f.dport):
            take(f, r, "by its 5-tuple")
    # 2. the payload mark at the start of the stream (NAT, Tor's transparent proxy)
    for f in by_first:
        if f.klass == "proxy":
            continue
        hits = free(lambda r, f=f: _marked(f, r, False) and (
            int(r.get("mark_len") or 0) >= 8 or r.get("dst") in (None, f.dst)))
        for r in hits if f.proto == "udp" else hits[:1]:
            take(f, r, f"by the mark of its first {r.get('mark_len')} payload bytes")
    # 3. through a SOCKS port: the mark past the proxy's handshake
    for f in by_first:
        if f.klass != "proxy":
            continue
        for r in free(lambda r, f=f: _marked(f, r, True)):
            take(f, r, f"by the mark of {r.get('mark_len')} bytes it sent through the proxy")
    # 4. DNS asked again by a gateway (Tor's DNSPort): the name reached the lab's resolver
    for f in by_first:
        if f.outcome == "left" or f.dport != 53 or not f._asked:
            continue
        hits = free(lambda r, f=f: r.get("service") == "lab-dns" and r.get("name") in f._asked)
        for r in hits:
            take(f, r, f"by the name it asked ({r.get('name')}), asked again on its way")
    # 5. a TCP connection that carried no payload: its destination as the lab host saw it
    for f in by_first:
        if f.outcome == "left" or f.proto != "tcp" or f._stream:
            continue
        hits = free(lambda r, f=f: r.get("proto") == "tcp" and not r.get("mark_len")
                    and r.get("dst") == f.dst and r.get("dport") == f.dport)
        if hits:
            take(f, hits[0], "by its destination (it sent no payload)")
    # 6. what no service logs (ICMP echo, a closed port): a lab host's link carried it
    lab_side = [x for x in seen if x.zone == "lab-host"]
    lab_tuples = {(r.get("client"), r.get("cport")) for r in records}
    used: set[tuple[str, int]] = set()
    for f in by_first:
        if f.outcome == "left":
            continue
        for x in lab_side:
            for i, p in enumerate(x.pkts, start=1):
                proto, psrc, _d, sport, _dp, _l = _l4(p)
                if not _same_flow(f, p) or (psrc, sport) in lab_tuples \
                        or (x.link, i) in used:
                    continue
                if f.proto == "tcp" and f._stream:
                    continue  # a connection with payload is a service's to log
                used.add((x.link, i))
                f.outcome, f.via = "left", _via(ctx, psrc)
                f.evidence.append(Evidence("capture", x.link, x.pcap, i,
                                           f"{p.summary()} on the lab host's link"))
                f.reason = f"seen on {x.link} (frame {i})"
                break
            if f.outcome == "left":
                break
    # what did not arrive: stopped only if the rule is named and nothing got past it
    beyond = [x for x in seen if x.zone not in ("source", "sibling", "lab-host")]
    for f in flows:
        if f.outcome == "left":
            continue
        f.evidence.append(Evidence("capture", src_link, src_pcap, f.first_frame,
                                   f"{count(f.packets, 'packet')} on the workstation's link"))
        past = next(((x, i) for x in beyond for i, p in enumerate(x.pkts, start=1)
                     if _same_flow(f, p)), None)
        rule = stop(f)
        if rule and rule.get("fate") == "local":
            if f._replied and past is None and f.dport == 53:  # its resolver, nothing else
                f.outcome = "answered"
                f.evidence.append(Evidence("rule", rule["qube"], None, None, _rule_text(rule)
                                           + ": delivered to its own service, which replied"))
                f.reason = (f"{rule['qube']}'s own service answered it (e.g. Tor's DNSPort "
                            "from its cache) and no link beyond carried it")
                continue
            if past is None:  # its own service took it, and it went nowhere in the lab
                f.outcome = "held"
                f.evidence.append(Evidence("rule", rule["qube"], None, None, _rule_text(rule)
                                           + ": delivered to its own service, which sent "
                                           "it nowhere"))
                f.reason = (f"{rule['qube']}'s own resolver took it and did not reply while "
                            "the command ran (glibc asks the second nameserver when the "
                            "first fails); no link beyond carried it" if f.dport == 53 else
                            f"{rule['qube']}'s own service took it ({rule['hook']}: "
                            f"{rule['rule']}; Tor's TransPort) and no lab host saw it: it "
                            "never left (a stream Tor gave up; the command's exit says how "
                            "it fared)")
                continue
            f.outcome = "unknown"
            f.reason = (f"{rule['qube']} hands it to its own service ({rule['hook']}: "
                        f"{rule['rule']}; a transparent proxy, a resolver) and no lab host "
                        "saw it" + (f"; seen on {past[0].link} (frame {past[1]})" if past
                                    else ""))
            continue
        f.stopped_by = rule
        if rule and past is None:
            f.outcome = "stopped"
            f.evidence.append(Evidence("rule", f"{rule['qube']}", None, None,
                                       _rule_text(rule)))
            f.reason = (f"{rule['qube']} drops it ({rule['hook']}: {rule['rule']}) and "
                        "no link beyond carried it")
            continue
        f.outcome = "unknown"
        if past is not None:
            x, i = past
            f.evidence.append(Evidence("capture", x.link, x.pcap, i, "seen beyond the hop"))
            f.reason = (f"seen on {x.link} (frame {i}) but no lab host logged it"
                        + (f", though {rule['qube']} {rule['hook']} should drop it"
                           if rule else ""))
        elif rule is None:
            f.reason = (f"no lab host saw it, and {ctx.chain[1].name}'s rules let it through "
                        "(it went somewhere the lab does not log)")
        else:
            f.reason = "no lab host saw it"


def _rule_text(rule: dict[str, Any]) -> str:
    """The evaluator's rule as evidence: "hook: rule (handle N)"."""
    return f"{rule['hook']}: {rule['rule']}" + (
        f" (handle {rule['handle']})" if rule.get("handle") is not None else "")


def _report(ctx: Any, lks: list[Any], marks: dict[str, int], rulesets: dict[str, Any],
            cmd: list[str], status: int | None, secs: float, out_dir: str, expect: str,
            bypass: str, ended_by: str | None = None) -> Report:
    import scapy.layers.dns  # noqa: F401  (dissect DNS when the pcap is read)

    from netstack.leaktest.battery import flow_allowed

    seen = [Seen(lk.name, lk.zone, lk.capture.path if lk.capture else "",
                 lk.capture.packets() if lk.capture else []) for lk in lks]
    src = next(x for x in seen if x.zone == "source")
    flows, asked, answers = flows_of(ctx, src.pkts)
    for f in flows:
        f.names = sorted(set(answers.get(f.dst, [])))
    gw_rs = rulesets.get(ctx.chain[1].netns, {"nftables": []})
    attribute(ctx, flows, _new_records(ctx, marks), seen, lambda f: _stopped_by(ctx, gw_rs, f),
              src)
    leaks: list[Leak] = []
    link_rows = []
    for x in seen:
        bad = 0
        if x.zone != "source":
            opened = opened_conns(x.pkts)
            for i, p in enumerate(x.pkts, start=1):
                if predates(p, opened):
                    continue  # a connection of before the run (a late FIN): not the program's
                if not flow_allowed(ctx, x.zone, p):
                    bad += 1
                    if len(leaks) < 50:
                        leaks.append(Leak(x.link, x.pcap, i, p.summary()))
        link_rows.append({"link": x.link, "zone": x.zone, "packets": len(x.pkts),
                          "violations": bad, "pcap": x.pcap or None})
    for f in flows:
        if f.outcome == "left" and f.via != expect:
            leaks.append(Leak(src.link, src.pcap, f.first_frame,
                              f"{f.proto} {f.dst}:{f.dport} left via {f.via}, not {expect}",
                              kind="flow"))
    chain = [{"name": q.name, "kind": q.kind, "label": q.label, "address": q.ipv4}
             for q in ctx.chain]
    r = Report(ctx.stack, ctx.ws.name, expect, list(cmd), status, round(secs, 2), out_dir,
               flows, leaks, asked, chain, link_rows, bypass=bypass, ended_by=ended_by)
    r.verdict = verdict(r)
    return r


def _conn(p: Any) -> frozenset | None:
    """A TCP packet's connection, either direction (None: not TCP)."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6

    ip = p.getlayer(IP) or p.getlayer(IPv6)
    if ip is None or TCP not in p:
        return None
    return frozenset({(ip.src, p[TCP].sport), (ip.dst, p[TCP].dport)})


def opened_conns(pkts: list[Any]) -> set[frozenset]:
    """The TCP connections whose SYN this capture saw (they began during the run)."""
    from scapy.layers.inet import TCP

    return {c for p in pkts if TCP in p and p[TCP].flags & 0x02
            and (c := _conn(p)) is not None}


def predates(p: Any, opened: set[frozenset]) -> bool:
    """A TCP packet of a connection that began before the capture (no SYN of it seen): a
    shared lab's late FIN or retransmission from an earlier program, not this one's. A leak
    of this run begins with its SYN on the link, which is judged."""
    c = _conn(p)
    return c is not None and c not in opened


def flow_fails(r: Report, f: Flow) -> str | None:
    """Why this flow made the exit code what it is (the JUnit failure's message), or None:
    only the flows behind the verdict fail (under a leak or an unknown outcome, exit 1, a
    stopped attempt is reported but does not fail: it did not decide the code)."""
    v = verdict(r)
    if v == 1:
        if f.outcome == "unknown":
            return "unknown outcome"
        if f.outcome == "left" and f.via != r.expect:
            return "leak"
        return None
    if v == 2 and f.outcome == "stopped" and r.bypass == "fail":
        return "stopped bypass attempt"
    return None


def word(r: Report) -> str:
    """The verdict in one word: LEAK only when something leaked (an unknown outcome alone is
    UNKNOWN, exit 1 all the same)."""
    v = verdict(r)
    if v == 1 and not r.leaks and not any(f.outcome == "left" and f.via != r.expect
                                          for f in r.flows):
        return "UNKNOWN"
    return WORDS[v]


def command_fails(r: Report) -> str | None:
    if r.ended_by == "timeout":
        return "the command ran past --timeout and was ended"
    if r.ended_by:
        return f"the command was ended by check's {r.ended_by}"
    if r.exit_status not in (0, None):
        return f"the command exited {r.exit_status}"
    return None


def verdict(r: Report) -> int:
    """0 clean; 1 a leak or an unknown outcome; 2 a stopped bypass attempt (bypass fail);
    3 the command failed, timed out or was ended. The first that applies."""
    if r.leaks or r.unknown:
        return 1
    if command_fails(r):
        return 3
    if r.stopped and r.bypass == "fail":
        return 2
    return 0


def reasons(r: Report) -> list[str]:
    """Why the verdict is what it is, one line per cause (empty when clean)."""
    out = [f"LEAK on {x.link}: {x.summary} ({x.pcap} frame {x.frame})" for x in r.leaks]
    out += [f"UNKNOWN {flow_line(f)}: {f.reason}" for f in r.unknown]
    c = command_fails(r)
    if c:
        out.append(c)
    if r.bypass == "fail":
        out += [f"STOPPED {flow_line(f)}" for f in r.stopped]
    return out


# --- reports CI systems read ------------------------------------------------------------------

def junit(r: Report) -> str:
    """A testcase per flow (named by its class), one for the command and one for the
    links; a failure, with the evidence, for exactly what made the exit code non-zero:
    no failure when it is 0, at least one otherwise."""
    from xml.sax.saxutils import escape, quoteattr

    cases: list[tuple[str, str, str | None, str]] = []
    for f in sorted(r.flows, key=lambda f: (f.klass, f.first_frame)):
        why = flow_fails(r, f)
        where = _where(f)
        text = flow_line(f) + "\n" + "\n".join(_evidence_line(e) for e in f.evidence)
        if f.reason:
            text += f"\nreason: {f.reason}"
        cases.append((f"netstack.check.{f.klass}", f"{f.klass}: {f.proto} {where}"
                      + (f" from port {f.sport}" if f.sport else ""), text if why else None,
                      why or ""))
    link_leaks = [x for x in r.leaks if x.kind == "link"]
    cases.append(("netstack.check.links", "no packet where the chain forbids it",
                  "\n".join(f"{x.link} {os.path.basename(x.pcap)} frame {x.frame}: "
                            f"{x.summary}" for x in link_leaks) or None, "leak"))
    c = command_fails(r) if verdict(r) == 3 else None  # failed, but not what decided
    cases.append(("netstack.check.command", "the command", c, "command failed"))
    body = []
    for cls, name, failure, kind in cases:
        body.append(f"  <testcase classname={quoteattr(cls)} name={quoteattr(name)}>")
        if failure is not None:
            body.append(f"    <failure message={quoteattr(kind)}>{escape(failure)}</failure>")
        body.append("  </testcase>")
    failures = sum(1 for _c, _n, f, _k in cases if f is not None)
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<testsuite name="netstack check" '
            f'tests="{len(cases)}" failures="{failures}" errors="0" time="{r.seconds}">\n'
            + "\n".join(body) + "\n</testsuite>\n")


def _evidence_line(e: Evidence) -> str:
    where = " ".join(x for x in (e.link, os.path.basename(e.pcap) if e.pcap else None,
                                 f"frame {e.frame}" if e.frame else None) if x)
    return f"  evidence ({e.kind}) {where}: {e.detail}"


def _where(f: Flow) -> str:
    """dst:port ([dst]:port for IPv6), or the address alone."""
    if f.dport is None:
        return f.dst
    return f"[{f.dst}]:{f.dport}" if ":" in f.dst else f"{f.dst}:{f.dport}"


def flow_line(f: Flow) -> str:
    where = _where(f)
    if f.echo_id is not None:
        where += f" echo id {f.echo_id}"
    names = f" ({', '.join(f.names)})" if f.names else ""
    if f.outcome == "left":
        how = f"left via {f.via}"
    elif f.outcome == "answered":
        how = f"answered by the chain itself: {f.reason}"
    elif f.outcome == "held":
        how = f"held by the chain itself: {f.reason}"
    elif f.outcome == "stopped" and f.stopped_by:
        s = f.stopped_by
        how = (f"stopped by {s['qube']} {s['hook']}: {s['rule']}"
               + (f" (handle {s['handle']})" if s.get("handle") else ""))
    else:
        how = f"outcome unknown: {f.reason or 'no evidence'}"
    return (f"{f.proto} {where}{names}: {count(f.packets, 'packet')}, "
            f"{count(f.bytes, 'byte')}, {how}")


def table(r: Report) -> str:
    ended = f", ended by {r.ended_by}" if r.ended_by else ""
    lines = [f"netstack check of {' '.join(r.command)} in {r.qube} (expect {r.expect}), "
             f"stack {r.stack}, {r.seconds} s, exit status {r.exit_status}{ended}"]
    lines.append(f"{'class':<10} {'outcome':<8} flow")
    for f in sorted(r.flows, key=lambda f: (f.outcome != "left", f.klass, f.first_frame)):
        lines.append(f"{f.klass:<10} {f.outcome:<8} {flow_line(f)}")
    if r.names_asked:
        lines.append("names asked: " + ", ".join(r.names_asked))
    for x in r.leaks:
        lines.append(f"LEAK on {x.link}: {x.summary}  ({x.pcap} frame {x.frame})")
    c = command_fails(r)
    if c:
        lines.append(f"COMMAND: {c}")
    lines.append(f"{word(r)}: {count(len(r.flows), 'flow')}, {len(r.stopped)} stopped, "
                 f"{len(r.unknown)} unknown, {count(len(r.leaks), 'leak')}; pcaps in {r.pcaps}")
    return "\n".join(lines)


LABEL_HEX = {"red": "#d32f2f", "orange": "#f57c00", "yellow": "#fbc02d", "green": "#388e3c",
             "gray": "#757575", "blue": "#1976d2", "purple": "#7b1fa2", "black": "#212121"}


def html(r: Report) -> str:
    """One self-contained page: the chain in its label colours, packets per link, the
    flows, and each leak with its packet."""
    from html import escape

    w, box = 170, 130
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * len(r.chain) + 40}" '
           'height="120">']
    for i, q in enumerate(r.chain):
        x = 20 + i * w
        col = LABEL_HEX.get(q["label"], "#555")
        svg.append(f'<rect x="{x}" y="20" width="{box}" height="50" rx="8" fill="{col}"/>'
                   f'<text x="{x + box / 2}" y="42" fill="#fff" text-anchor="middle" '
                   f'font-size="13">{escape(q["name"])}</text><text x="{x + box / 2}" y="60" '
                   f'fill="#fff" text-anchor="middle" font-size="11">{escape(q["kind"])} '
                   f'{escape(q["address"])}</text>')
        if i:
            svg.append(f'<line x1="{x - w + box}" y1="45" x2="{x}" y2="45" stroke="#333" '
                       'stroke-width="2"/>')
        link = next((lk for lk in r.links if lk["link"].startswith(q["name"] + ":")), None)
        if link:
            col = "#c62828" if link["violations"] else "#2e7d32"
            svg.append(f'<text x="{x + box / 2}" y="92" text-anchor="middle" font-size="11" '
                       f'fill="{col}">{link["packets"]} pkts, {link["violations"]} bad'
                       '</text>')
    svg.append("</svg>")
    rows = "".join(f"<tr><td>{escape(f.klass)}</td><td>{escape(f.outcome)}</td>"
                   f"<td>{escape(flow_line(f))}<br><small>"
                   + "<br>".join(escape(_evidence_line(e)) for e in f.evidence)
                   + "</small></td></tr>" for f in r.flows)
    links = "".join(f"<tr><td>{escape(lk['link'])}</td><td>{escape(lk['zone'])}</td>"
                    f"<td>{lk['packets']}</td><td>{lk['violations']}</td></tr>"
                    for lk in r.links)
    leaks = "".join(f"<li><b>{escape(x.link)}</b> {escape(os.path.basename(x.pcap))} frame "
                    f"{x.frame}: <code>{escape(x.summary)}</code></li>" for x in r.leaks)
    leaks += "".join(f"<li>{escape(x)}</li>" for x in reasons(r)
                     if not x.startswith("LEAK"))
    w = word(r)
    return (f"<!doctype html><meta charset='utf-8'><title>netstack check: {w}</title>"
            "<style>body{font-family:sans-serif;margin:2em}td{padding:2px 8px;"
            "border-bottom:1px solid #ddd}code{font-size:90%}</style>"
            f"<h1>netstack check: {w}</h1><p><code>{escape(' '.join(r.command))}</code> "
            f"in {escape(r.qube)}, expected {escape(r.expect)}, exit status "
            f"{r.exit_status}, {r.seconds} s</p>{''.join(svg)}<h2>Flows</h2><table>"
            f"<tr><th>class</th><th>outcome</th><th>flow</th></tr>{rows}</table>"
            f"<h2>Links</h2><table><tr><th>link</th><th>zone</th><th>packets</th>"
            f"<th>not allowed</th></tr>{links}</table><h2>Leaks and reasons</h2>"
            f"<ul>{leaks or '<li>none</li>'}</ul>")
