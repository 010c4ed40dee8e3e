"""A hostile ISP in the lab (`up --lab --isp SCENARIO[,SCENARIO]`): what a network that
fights back does, made in the lab's ISP router namespace (`nsl-STACK-isp`, the other end
of sys-net's uplink) with nftables rules and small daemons, never anywhere else. Going
with the namespace, everything goes at `down`.

- `udp-blocked`: forwards no UDP but DNS (port 53): WireGuard and OpenVPN over UDP never
  connect; OpenVPN over TCP 443 (`lab:openvpn-tcp`) does.
- `dns-hijack`: answers every DNS query itself (a redirect to its forger): every A is FORGED.
- `captive-portal`: forwards nothing but DNS until a login; HTTP goes to its portal (302).
- `tls-intercept`: every TCP connection but DNS and HTTP goes through its box: TLS is
  terminated with a certificate of its own CA (made in the ISP, trusted by nothing of the
  chain), so Tor's relays are never reached; OpenVPN over TCP 443 meets the ISP's impostor
  OpenVPN server (the provider's tls-crypt key, the ISP's CA); what the box cannot parse
  (obfs4: random bytes) passes, as it does through real ones.
- `flapping`: its end of the customer link goes down FLAP_DOWN s, up FLAP_UP s, for ever.

The chain must stay closed through each: nothing in clear leaves sys-net, and what the
VPN or Tor cannot verify it refuses (tests/integration/test_hostile_isp.py; docs/isp.md).

The daemons are this module's `main` (run by the supervisor in the ISP namespace; their
stdout, one JSON line per event, is the stack's `isp-*.log`)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from netstack.errors import UsageError
from netstack.lab.services import CHECK_BODY, CHECK_PATH  # noqa: F401  (what the check expects)
from netstack.model import Daemon

SCENARIOS = ("udp-blocked", "dns-hijack", "captive-portal", "tls-intercept", "flapping")
FORGED = "203.0.113.66"  # every forged A answer: a documentation address no lab host has
FORGER_PORT, PORTAL_PORT, MITM_PORT = 5353, 8081, 8443
IMPOSTOR_PORT = 1443  # the ISP's own OpenVPN server, on its loopback (tls-intercept)
PORTAL_SET = "portal_in"  # customers that logged in to the portal
FLAP_DOWN, FLAP_UP = 2.0, 4.0
ISP_CA_NAME = "Hostile ISP interception CA"


def parse(values: list[str] | None) -> tuple[str, ...]:
    """`--isp` values (repeated, each possibly comma-separated) as a tuple in the order of
    SCENARIOS; an unknown name is a UsageError naming the known ones."""
    got: set[str] = set()
    for v in values or ():
        for name in v.split(","):
            name = name.strip()
            if not name:
                continue
            if name not in SCENARIOS:
                raise UsageError(f"--isp {name!r}: no such scenario; fix: use one or more of "
                                 f"{', '.join(SCENARIOS)} (comma-separated or repeated)")
            got.add(name)
    return tuple(s for s in SCENARIOS if s in got)


def ruleset(scenarios: tuple[str, ...], cust_if: str) -> dict[str, Any]:
    """The ISP router's ruleset: a router that forwards everything (the lab's plain ISP),
    plus each scenario's rules on what comes from or goes to the customer link."""
    from netstack.rules.nft import (
        ACCEPT,
        COUNTER,
        DROP,
        NamedSet,
        accept_all,
        ct_state,
        iifname,
        in_set,
        l4proto,
        match,
        oifname,
        payload,
        redirect,
        th_dport,
    )

    def th_sport(port: Any) -> Any:
        return match(payload("th", "sport"), port)

    rs = accept_all()
    fwd, nat = rs["forward"], rs["nat_prerouting"]
    dns = [l4proto("tcp", "udp"), th_dport(53)]
    if "dns-hijack" in scenarios:  # before the portal: its DNS is forged too
        nat.add(iifname(cust_if), *dns, COUNTER, redirect(FORGER_PORT),
                comment="dns-hijack: every query to the ISP's forger")
    if "captive-portal" in scenarios:
        rs.add_set(NamedSet(PORTAL_SET, "ipv4_addr"))
        logged = in_set(payload("ip", "saddr"), PORTAL_SET)
        not_logged = match(payload("ip", "saddr"), f"@{PORTAL_SET}", "!=")
        nat.add(iifname(cust_if), not_logged, l4proto("tcp"), th_dport(80), COUNTER,
                redirect(PORTAL_PORT), comment="captive-portal: HTTP to the portal")
        fwd.add(iifname(cust_if), logged, ACCEPT, comment="captive-portal: logged in")
        fwd.add(iifname(cust_if), *dns, ACCEPT, comment="captive-portal: DNS before login")
        fwd.add(iifname(cust_if), COUNTER, DROP, comment="captive-portal: nothing else")
    if "udp-blocked" in scenarios:
        fwd.add(iifname(cust_if), l4proto("udp"), match(payload("th", "dport"), 53, "!="),
                COUNTER, DROP, comment="udp-blocked: no UDP out but DNS")
        fwd.add(oifname(cust_if), l4proto("udp"), th_sport(53), ACCEPT,
                comment="udp-blocked: DNS answers")
        fwd.add(oifname(cust_if), l4proto("udp"), COUNTER, DROP,
                comment="udp-blocked: no UDP in")
    if "tls-intercept" in scenarios:
        nat.add(iifname(cust_if), l4proto("tcp"),
                match(payload("th", "dport"), {"set": [53, 80]}, "!="),
                ct_state("new"), COUNTER, redirect(MITM_PORT),
                comment="tls-intercept: TCP to the ISP's TLS box")
    # (the daemons bind 0.0.0.0: a redirect lands on cust0's own address)
    return rs.to_json()


def daemons(scenarios: tuple[str, ...], isp_ns: str, cust_if: str,
            lab_dir: str, vpn_keys: bool = False) -> list[Daemon]:
    """Each scenario's daemon in the ISP namespace, run by the supervisor. vpn_keys: the
    lab runs its VPN servers, so tls-intercept also runs an impostor OpenVPN server."""
    mod = (sys.executable, "-m", "netstack.lab.isp")
    out = []
    if "dns-hijack" in scenarios:
        out.append(Daemon("isp-dns-forger", isp_ns, (*mod, "forger"),
                          ready=f"udp/{FORGER_PORT}"))
    if "captive-portal" in scenarios:
        out.append(Daemon("isp-portal", isp_ns, (*mod, "portal"), ready=f"tcp/{PORTAL_PORT}"))
    if "tls-intercept" in scenarios:
        out.append(Daemon("isp-tls-box", isp_ns,
                          (*mod, "mitm", os.path.join(lab_dir, "isp")),
                          ready=f"tcp/{MITM_PORT}"))
        if vpn_keys:  # after the lab's own server files: it copies their tls-crypt key
            out.append(Daemon("isp-ovpn-impostor", isp_ns,
                              (*mod, "impostor", lab_dir, os.path.join(lab_dir, "isp")),
                              requires=os.path.join(lab_dir, "ovpn-server.conf"),
                              ready=f"tcp/{IMPOSTOR_PORT}"))
    if "flapping" in scenarios:
        out.append(Daemon("isp-flap", isp_ns, (*mod, "flap", cust_if)))
    return out


# --- the daemons (run in the ISP namespace) ---------------------------------------------


def _event(**rec: Any) -> None:
    rec["t"] = round(time.time(), 3)
    print(json.dumps(rec), flush=True)


def forged_answer(msg: bytes) -> bytes:
    """Every A question answered FORGED (authoritative, TTL 60); other types an empty
    NOERROR; what is not one query gets nothing."""
    import dns.flags
    import dns.message
    import dns.rdataclass
    import dns.rdatatype
    import dns.rrset

    q = dns.message.from_wire(msg)
    if len(q.question) != 1 or q.flags & dns.flags.QR:
        raise ValueError("one query expected")
    r = dns.message.make_response(q)
    r.flags |= dns.flags.AA
    if q.question[0].rdtype == dns.rdatatype.A:
        r.answer.append(dns.rrset.from_text_list(q.question[0].name, 60, dns.rdataclass.IN,
                                                 dns.rdatatype.A, [FORGED]))
    return r.to_wire()


def serve_forger() -> None:
    import socket
    import struct
    import threading

    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", FORGER_PORT))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", FORGER_PORT))
    tcp.listen(16)

    def one(msg: bytes, peer: Any, proto: str) -> bytes:
        try:
            reply = forged_answer(msg)
            from netstack.dnswire import parse_question

            _event(ev="forged", proto=proto, client=peer[0], name=parse_question(msg)[2])
            return reply
        except Exception as e:  # noqa: BLE001 - garbage from a client: no answer
            _event(ev="garbage", proto=proto, client=peer[0], error=str(e)[:80])
            return b""

    def tcp_loop() -> None:
        while True:
            c, peer = tcp.accept()
            with c:
                c.settimeout(3)
                try:
                    n = struct.unpack("!H", c.recv(2, socket.MSG_WAITALL))[0]
                    reply = one(c.recv(n, socket.MSG_WAITALL), peer, "tcp")
                    if reply:
                        c.sendall(struct.pack("!H", len(reply)) + reply)
                except (OSError, struct.error):
                    continue

    threading.Thread(target=tcp_loop, daemon=True).start()
    while True:
        msg, peer = udp.recvfrom(4096)
        reply = one(msg, peer, "udp")
        if reply:
            udp.sendto(reply, peer)


def portal_login_url(router: str) -> str:
    return f"http://{router}:{PORTAL_PORT}/login"


def serve_portal() -> None:
    """HTTP: `GET /login` puts the client in PORTAL_SET (the ISP forwards it from then
    on); anything else is a 302 to the login page, as hotel portals answer."""
    import subprocess
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        server_version = "hostile-isp-portal"

        def do_GET(self) -> None:  # noqa: N802
            client = self.client_address[0]
            if self.path.startswith("/login"):
                rc = subprocess.run(["nft", "add", "element", "inet", "netstack", PORTAL_SET,
                                     "{", client, "}"], capture_output=True).returncode
                _event(ev="login", client=client, ok=rc == 0)
                body = b"welcome: logged in\n" if rc == 0 else b"login failed\n"
                self.send_response(200 if rc == 0 else 500)
            else:
                _event(ev="redirect", client=client, host=self.headers.get("Host"),
                       path=self.path)
                here = self.connection.getsockname()[0]
                body = b"<html>please log in</html>\n"
                self.send_response(302)
                self.send_header("Location", portal_login_url(here))
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("0.0.0.0", PORTAL_PORT), Handler)
    srv.daemon_threads = True
    srv.serve_forever()


def serve_mitm(ca_dir: str) -> None:
    """Terminates TLS with a certificate for the name the client asked (SNI), issued by
    the ISP's own CA (made here, kept in `ca_dir`, handed to nobody): a client that checks
    who it talks to refuses it. Logs each handshake and its outcome."""
    import socket
    import ssl
    import threading

    from netstack.lab import pki

    os.makedirs(ca_dir, mode=0o700, exist_ok=True)
    ca = pki.make_ca(ISP_CA_NAME, days=2)
    pki.write_private(os.path.join(ca_dir, "isp-ca.key"), ca.key_pem)
    with open(os.path.join(ca_dir, "isp-ca.pem"), "wb") as f:
        f.write(ca.cert_pem)
    leaf = pki.issue(ca, "intercepted", days=2, usage="server",
                     dns_names=("intercepted.isp.invalid",))
    key, crt = os.path.join(ca_dir, "leaf.key"), os.path.join(ca_dir, "leaf.pem")
    pki.write_private(key, leaf.key_pem)
    with open(crt, "wb") as f:
        f.write(leaf.cert_pem + ca.cert_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, key)
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("0.0.0.0", MITM_PORT))
    lsock.listen(64)
    SO_ORIGINAL_DST = 80  # noqa: N806

    def conn(c: socket.socket, peer: Any) -> None:
        import struct

        try:
            raw = c.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            dport = struct.unpack("!H", raw[2:4])[0]
            dst = socket.inet_ntoa(raw[4:8])
        except OSError:
            dst, dport = None, None
        c.settimeout(3)
        try:
            first = c.recv(1, socket.MSG_PEEK)
        except OSError:  # (a timeout: a protocol whose server speaks first)
            first = b""
        if first != b"\x16":  # not TLS (or silent): OpenVPN on 443 meets the impostor,
            # anything else passes untouched, as a TLS box passes what it cannot parse
            # (obfs4 looks like random bytes: a Tor bridge gets through)
            if first and dport == 443:
                relay(c, peer, ("127.0.0.1", IMPOSTOR_PORT), "impostor", dst, dport)
            elif dst is not None and dport is not None:
                relay(c, peer, (dst, dport), "passed", dst, dport)
            else:
                c.close()
            return
        c.settimeout(10)
        try:
            with ctx.wrap_socket(c, server_side=True) as t:
                _event(ev="handshake", client=peer[0], dst=dst, dport=dport, ok=True,
                       version=t.version())
                t.recv(4096)  # the client decides: a checking one hangs up here
        except (OSError, ssl.SSLError) as e:
            _event(ev="handshake", client=peer[0], dst=dst, dport=dport, ok=False,
                   error=str(e)[:120])
        finally:
            c.close()

    def relay(c: socket.socket, peer: Any, to: tuple[str, int], ev: str, dst: Any,
              dport: Any) -> None:
        import selectors

        _event(ev=ev, client=peer[0], dst=dst, dport=dport)
        try:
            u = socket.create_connection(to, timeout=5)
        except OSError as e:
            _event(ev=ev, client=peer[0], ok=False, error=str(e)[:120])
            c.close()
            return
        sel = selectors.DefaultSelector()
        sel.register(c, selectors.EVENT_READ, u)
        sel.register(u, selectors.EVENT_READ, c)
        c.settimeout(None)
        u.settimeout(None)
        try:
            while True:
                for key, _ in sel.select(60):
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            c.close()
            u.close()

    while True:
        c, peer = lsock.accept()
        threading.Thread(target=conn, args=(c, peer), daemon=True).start()


def impostor(lab_dir: str, isp_dir: str) -> None:
    """The ISP's own OpenVPN server, as a TLS-intercepting box would put in the VPN's way:
    the provider's tls-crypt key (providers ship one key to all their customers, so an ISP
    can have it), but a certificate named `server` issued by the ISP's CA. A client that
    pins its provider's CA (`ca`) refuses it at the TLS handshake (VERIFY ERROR)."""
    import shutil

    from netstack.lab import pki

    os.makedirs(isp_dir, mode=0o700, exist_ok=True)

    def p(n: str) -> str:
        return os.path.join(isp_dir, n)

    ca = pki.make_ca(ISP_CA_NAME + " (VPN)", days=2)
    with open(p("impostor-ca.crt"), "wb") as f:
        f.write(ca.cert_pem)
    leaf = pki.issue(ca, "server", days=2, usage="server")
    pki.write_private(p("impostor.key"), leaf.key_pem)
    with open(p("impostor.crt"), "wb") as f:
        f.write(leaf.cert_pem)
    shutil.copyfile(os.path.join(lab_dir, "tls-crypt.key"), p("tls-crypt.key"))
    os.chmod(p("tls-crypt.key"), 0o600)
    with open(p("impostor.conf"), "w") as f:
        f.write("\n".join([
            "dev ovi0", "dev-type tun", "proto tcp-server", f"port {IMPOSTOR_PORT}",
            "local 127.0.0.1", "topology subnet", "server 10.71.0.0 255.255.255.0",
            f"ca {p('impostor-ca.crt')}", f"cert {p('impostor.crt')}",
            f"key {p('impostor.key')}", "dh none", f"tls-crypt {p('tls-crypt.key')}",
            "data-ciphers AES-256-GCM:CHACHA20-POLY1305", "disable-dco", "verb 3",
            "script-security 1", ""]))
    _event(ev="impostor-ready", conf=p("impostor.conf"))
    os.execvp("openvpn", ["openvpn", "--config", p("impostor.conf")])


def flap(dev: str) -> None:
    """The ISP's end of the customer link down FLAP_DOWN s, up FLAP_UP s, for ever (the
    timing IS the scenario); up again when ended (SIGTERM)."""
    import signal
    import subprocess

    def set_state(state: str) -> None:
        subprocess.run(["ip", "link", "set", dev, state], check=True)
        _event(ev=state, dev=dev)

    def stop(*_: Any) -> None:
        set_state("up")
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    while True:
        time.sleep(FLAP_UP)
        set_state("down")
        time.sleep(FLAP_DOWN)
        set_state("up")


def main(argv: list[str]) -> None:
    what = argv[0] if argv else ""
    if what == "forger":
        serve_forger()
    elif what == "portal":
        serve_portal()
    elif what == "mitm" and len(argv) == 2:
        serve_mitm(argv[1])
    elif what == "impostor" and len(argv) == 3:
        impostor(argv[1], argv[2])
    elif what == "flap" and len(argv) == 2:
        flap(argv[1])
    else:
        sys.exit("usage: python -m netstack.lab.isp forger | portal | mitm CA_DIR | "
                 "impostor LAB_DIR ISP_DIR | flap DEV")


if __name__ == "__main__":
    main(sys.argv[1:])
