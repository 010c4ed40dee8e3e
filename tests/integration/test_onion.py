"""An onion service from a workstation (root, shared Tor lab): anon-whonix's table says
`onion = [{port = 80, target = 8080}]`; its keys are made and kept by the gateway's tor;
another workstation reaches it by its .onion name through the private Tor network; the
serving workstation's link carries only packets from and to the gateway."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from netstack.leaktest.capture import Capture
from tests.integration.util import cli, in_ns, wait_for

pytestmark = pytest.mark.root


def test_another_workstation_reaches_the_onion_service(tor_lab, tmp_path):
    s = tor_lab.stack
    st = json.loads(cli("--stack", s, "status", "--json").stdout)
    gw = next(q for q in st["qubes"] if q["name"] == "sys-whonix")
    onion = wait_for(lambda: (json.loads(cli("--stack", s, "status", "--json").stdout)
                              ["qubes"][[q["name"] for q in st["qubes"]].index("sys-whonix")]
                              .get("onions") or {}).get("anon-whonix"), 30, 0.2,
                     "the onion address")
    assert onion.endswith(".onion") and len(onion) == 62
    assert "onion service of anon-whonix: " + onion in cli("--stack", s, "status").stdout
    assert "onion service of anon-whonix: " + onion in cli("--stack", s, "tor", "status").stdout
    (tmp_path / "index.html").write_text("hello from anon-whonix\n")
    server = subprocess.Popen(["ip", "netns", "exec", tor_lab.ns["anon-whonix"],
                               sys.executable, "-m", "http.server", "8080", "--bind",
                               "0.0.0.0", "--directory", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cap = Capture(tor_lab.ns["anon-whonix"], "eth0", str(tmp_path / "ws.pcap")).start()
    try:
        def fetch() -> str | None:
            p = in_ns(tor_lab.ns["anon-whonix2"], "curl", "-sS", "--max-time", "20",
                      "--socks5-hostname", f"{gw['addresses'][0]}:9050",
                      f"http://{onion}/", check=False, timeout=30)
            return p.stdout if p.returncode == 0 else None
        page = wait_for(fetch, 120, 1.0, "the onion service through the private network")
        assert "hello from anon-whonix" in page
    finally:
        cap.stop()
        server.terminate()
        server.wait(5)
    from scapy.layers.inet import IP

    ips = [p[IP] for p in cap.packets() if IP in p]
    from scapy.layers.inet import TCP

    ws, gw_addr = "10.137.0.5", gw["addresses"][0]
    served = [p for p in cap.packets() if TCP in p and 8080 in (p[TCP].sport, p[TCP].dport)]
    assert served and all({p[IP].src, p[IP].dst} == {ws, gw_addr} for p in served), \
        {(p[IP].src, p[IP].dst) for p in served}
    # no relay of the private network ever talks to the serving workstation (other tests of
    # the shared lab may leave TransPort's answers to their own probes on this link)
    tor_nodes = {n.address for n in tor_lab.plan.lab.tor_nodes.values()}
    assert not tor_nodes & {a for ip in ips for a in (ip.src, ip.dst)}
    keys = tor_lab.dir / "tor-sys-whonix" / "onion-anon-whonix" / "hs_ed25519_secret_key"
    assert keys.exists()  # the key is the gateway's; the workstation never had it
