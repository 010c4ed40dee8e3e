"""The lab VPN server's NAT-PMP gateway, as ProtonVPN's answers: on the server's tunnel
addresses only (10.66.0.1 ..., never on its public link), port 5351; a mapping request for
UDP or TCP gets one public port per client (the same for both protocols and on every
renewal while it lives), a lifetime of at most 60 s, and the server forwards that public
port, arriving on its public link, to the same port of the client's tunnel address. A
mapping not renewed in time lapses: the forward is an nft map element with a timeout, so
the kernel removes it (a client that stops renewing stops being reachable, as with the
real provider). Run by the stack's supervisor in the lab's `vpn` host:

    python -m netstack.lab.natpmpd --public 198.51.100.x --listen 10.66.0.1 ...
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import select
import socket
import subprocess
import sys
import time

from netstack.vpn import natpmp

MAX_LIFETIME = 60  # what ProtonVPN grants
PORTS = (40000, 59999)  # where the lab draws public ports from
IP_FREEBIND = 15  # linux/in.h: bind to a tunnel address before the tunnel device exists
TABLE = "natpmp"
SETUP = f"""table ip {TABLE}
delete table ip {TABLE}
table ip {TABLE} {{
  map ports {{ type inet_proto . inet_service : ipv4_addr ; flags timeout ; }}
  chain pre {{ type nat hook prerouting priority dstnat; policy accept;
    iifname "{{public_if}}" dnat to meta l4proto . th dport map @ports
  }}
}}
"""


def nft(text: str) -> None:
    p = subprocess.run(["nft", "-f", "-"], input=text, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"nft: {p.stderr.strip()[:300]}")


def forward_commands(proto: str, port: int, client: str, lifetime: int) -> str:
    """One transaction: the element (re)made with a fresh timeout (an `add` of an element
    that exists keeps its old timeout, so add + delete + add)."""
    el = f"{proto} . {port}"
    if lifetime == 0:
        return f"add element ip {TABLE} ports {{ {el} timeout 1s : {client} }}\n" \
               f"delete element ip {TABLE} ports {{ {el} }}\n"
    return (f"add element ip {TABLE} ports {{ {el} timeout 1s : {client} }}\n"
            f"delete element ip {TABLE} ports {{ {el} }}\n"
            f"add element ip {TABLE} ports {{ {el} timeout {lifetime}s : {client} }}\n")


class Gateway:
    """The protocol's state: which public port each client holds."""

    def __init__(self, public: str, clients: list[str], max_lifetime: int = MAX_LIFETIME,
                 rng: random.Random | None = None) -> None:
        self.public = public
        self.clients = [ipaddress.ip_network(n) for n in clients]
        self.max_lifetime = max_lifetime
        self.started = time.monotonic()
        self.ports: dict[str, int] = {}
        self.rng = rng or random.Random()

    def epoch(self) -> int:
        return int(time.monotonic() - self.started)

    def answer(self, data: bytes, client: str) -> tuple[bytes | None, str | None]:
        """(the answer, the nft commands to run first) for one datagram from `client`."""
        if not any(ipaddress.ip_address(client) in n for n in self.clients):
            return None, None  # not from a tunnel: no answer at all
        if len(data) >= 2 and data[0] != natpmp.VERSION:
            return natpmp.error_response(data[1], natpmp.UNSUPPORTED_VERSION,
                                         self.epoch()), None
        try:
            req = natpmp.parse_request(data)
        except natpmp.NatPmpError:
            op = data[1] if len(data) >= 2 else 0
            return natpmp.error_response(op, natpmp.UNSUPPORTED_OP, self.epoch()), None
        if req is None:
            return natpmp.address_response(self.epoch(), self.public), None
        port = self.ports.get(client)
        if port is None:
            taken = set(self.ports.values())
            port = self.rng.randint(*PORTS)
            while port in taken:
                port = self.rng.randint(*PORTS)
            self.ports[client] = port
        life = min(req.lifetime, self.max_lifetime)
        resp = natpmp.MapResponse(req.proto, natpmp.SUCCESS, self.epoch(), req.internal,
                                  0 if life == 0 else port, life)
        return natpmp.map_response(resp), forward_commands(req.proto, port, client, life)


def main(argv: list[str] | None = None) -> int:
    a = argparse.ArgumentParser(prog="netstack.lab.natpmpd")
    a.add_argument("--public", required=True, help="the server's public IPv4 address")
    a.add_argument("--public-if", default="eth0")
    a.add_argument("--listen", action="append", required=True,
                   help="a tunnel address of the server (answers there only)")
    a.add_argument("--clients", action="append", required=True,
                   help="a tunnel network whose addresses may ask")
    a.add_argument("--max-lifetime", type=int, default=MAX_LIFETIME)
    args = a.parse_args(argv)
    nft(SETUP.replace("{public_if}", args.public_if))
    gw = Gateway(args.public, args.clients, args.max_lifetime)
    socks = []
    for addr in args.listen:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        s.bind((addr, natpmp.PORT))
        socks.append(s)
    print(json.dumps({"listening": args.listen, "public": args.public}), flush=True)
    while True:
        ready, _, _ = select.select(socks, [], [])
        for s in ready:
            data, (client, cport) = s.recvfrom(64)
            resp, cmds = gw.answer(data, client)
            if cmds:
                try:
                    nft(cmds)
                except RuntimeError as e:  # the mapping could not be made: say so
                    print(json.dumps({"client": client, "error": str(e)}), flush=True)
                    resp = natpmp.error_response(data[1], natpmp.NETWORK_FAILURE, gw.epoch())
            if resp is not None:
                s.sendto(resp, (client, cport))
            print(json.dumps({"t": round(time.time(), 3), "client": client, "cport": cport,
                              "request": data.hex(), "answer": resp.hex() if resp else None}),
                  flush=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        os._exit(0)
