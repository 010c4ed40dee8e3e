"""Lab content real programs need under `netstack check` (the offline internet, `--sink`):
a static files host (`files.lab.test`, also `git.lab.test`, `pypi.lab.test`, `www.lab.test`)
serving

- a git repository made at `up` for dumb HTTP (`git update-server-info`), so
  `git clone http://git.lab.test/hello.git` works with nothing but git and this module;
- a PEP 503 simple index with one tiny pure-Python wheel the lab builds itself with the
  stdlib zipfile (METADATA, WHEEL, RECORD with hashes), so `pip download --index-url
  http://pypi.lab.test/simple/ labhello` works;
- a page (/webrtc.html) whose script opens an RTCPeerConnection with the lab's STUN server
  (lab/stun.py) so a browser sends STUN binding requests to a lab address.

The sink answers every other name; these answer with real content because a program that
gets a stand-in answer (a git clone of the sink's page) fails and says nothing about its
flows. Each host runs as a supervised daemon in its own lab namespace (no change to the
lab's socket-passing services), and logs who came in the lab services' JSON-lines form
(EventLog): client, sport, proto, dst, port, and what was asked."""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import time
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from netstack.addressing import LAB_DOMAIN, LabHost
from netstack.model import Daemon

FILES = LabHost("files", "198.51.100.81", f"files.{LAB_DOMAIN}")
STUN = LabHost("stun", "203.0.113.78", f"stun.{LAB_DOMAIN}")
ALIASES = ("git", "pypi", "www")  # more names of the files host
HTTP_PORT = 80
STUN_PORT = 3478
REPO = "hello.git"
PKG, VERSION = "labhello", "1.0"
WHEEL = f"{PKG}-{VERSION}-py3-none-any.whl"
PAGE = "webrtc.html"
HOLD_MS = 2000  # how long the page's last image keeps its load event back
LOG = {"files": "lab-files.log", "stun": "lab-stun.log"}  # next to lab-http.log


def hosts() -> list[LabHost]:
    """The content hosts, planned like every lab host (lab/plan.py)."""
    return [FILES, STUN]


def plan(daemons: list[Daemon], zone: dict[str, str], netns: dict[str, str],
         lab_dir: str, state_dir: str) -> None:
    """Add the content daemons (ready once their port is bound, so `up` returns only when
    a program can use them) and the files host's other names to the lab DNS zone.
    netns: lab host name -> its namespace."""
    for a in ALIASES:
        zone[f"{a}.{LAB_DOMAIN}"] = FILES.address
    root = os.path.join(lab_dir, "content")
    py = sys.executable
    daemons.append(Daemon("lab-files-server", netns[FILES.name],
                          (py, "-m", "netstack.lab.content", "--root", root, "--bind",
                           FILES.address, "--log", os.path.join(state_dir, LOG["files"])),
                          ready=f"tcp/{HTTP_PORT}"))
    daemons.append(Daemon("lab-stun-server", netns[STUN.name],
                          (py, "-m", "netstack.lab.stun", "--bind", STUN.address,
                           "--log", os.path.join(state_dir, LOG["stun"])),
                          ready=f"udp/{STUN_PORT}"))


# --- what the files host serves ------------------------------------------------------------

def build(root: str) -> None:
    """Make the served tree afresh under `root`: repository, index with its wheel, page.
    Deterministic (fixed author, dates and zip times), so a test can assert on hashes."""
    if os.path.isdir(root):
        shutil.rmtree(root)
    os.makedirs(root, 0o755)
    make_repo(os.path.join(root, REPO))
    make_index(root)
    with open(os.path.join(root, PAGE), "w") as f:
        f.write(webrtc_page(STUN.address, STUN_PORT))
    with open(os.path.join(root, "index.html"), "w") as f:
        f.write("<!doctype html><title>lab files</title><p>netstack lab files host</p>\n")


def _git(*args: str, cwd: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": cwd, "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_AUTHOR_NAME": "netstack lab", "GIT_AUTHOR_EMAIL": "lab@lab.test",
           "GIT_COMMITTER_NAME": "netstack lab", "GIT_COMMITTER_EMAIL": "lab@lab.test",
           "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z",
           "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z"}
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


def make_repo(bare: str) -> None:
    """A bare repository with one commit, ready for dumb HTTP (info/refs, objects/info/packs
    written by `git update-server-info`)."""
    work = bare + ".work"
    os.makedirs(work)
    with open(os.path.join(work, "README"), "w") as f:
        f.write("hello from the netstack lab\n")
    _git("init", "-q", "-b", "main", ".", cwd=work)
    _git("add", "README", cwd=work)
    _git("commit", "-q", "-m", "hello", cwd=work)
    _git("clone", "-q", "--bare", work, bare, cwd=os.path.dirname(bare))
    _git("update-server-info", cwd=bare)
    shutil.rmtree(work)


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(
        b"=").decode()


def wheel_bytes() -> bytes:
    """A pure-Python wheel (PEP 427) of `labhello`: module, METADATA 2.1, WHEEL, RECORD."""
    dist = f"{PKG}-{VERSION}.dist-info"
    files = {
        f"{PKG}/__init__.py": b'"""A package the netstack lab builds and serves."""\n'
                              b'GREETING = "hello from the netstack lab"\n',
        f"{dist}/METADATA": (f"Metadata-Version: 2.1\nName: {PKG}\nVersion: {VERSION}\n"
                             "Summary: A package the netstack lab serves\n").encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: netstack-lab\n"
                         b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{n},{_record_hash(d)},{len(d)}\n" for n, d in files.items())
    files[f"{dist}/RECORD"] = (record + f"{dist}/RECORD,,\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for n, d in files.items():
            info = zipfile.ZipInfo(n, date_time=(2026, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, d)
    return buf.getvalue()


def make_index(root: str) -> None:
    """PEP 503: /simple/ lists the project, /simple/labhello/ links the wheel with its
    sha256 (pip checks it)."""
    data = wheel_bytes()
    os.makedirs(os.path.join(root, "packages"))
    with open(os.path.join(root, "packages", WHEEL), "wb") as f:
        f.write(data)
    proj = os.path.join(root, "simple", PKG)
    os.makedirs(proj)
    with open(os.path.join(root, "simple", "index.html"), "w") as f:
        f.write(f'<!DOCTYPE html>\n<html><body><a href="{PKG}/">{PKG}</a></body></html>\n')
    with open(os.path.join(proj, "index.html"), "w") as f:
        f.write(f'<!DOCTYPE html>\n<html><body><a href="../../packages/{WHEEL}#sha256='
                f'{hashlib.sha256(data).hexdigest()}">{WHEEL}</a></body></html>\n')


def webrtc_page(stun: str, port: int) -> str:
    """Creating a data channel and setting an offer as local description starts ICE
    gathering: the browser sends STUN binding requests to the server for a srflx
    candidate. The page writes what it gathered into the DOM (`--dump-dom` shows it); its
    last image (/hold/) holds the load event back until gathering is well under way."""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>lab webrtc</title></head>
<body><pre id="out">starting</pre>
<script>
const out = document.getElementById('out');
const say = (s) => {{ out.textContent += '\\n' + s; }};
const pc = new RTCPeerConnection({{iceServers: [{{urls: 'stun:{stun}:{port}'}}]}});
pc.createDataChannel('lab');
pc.onicecandidate = (e) => say(e.candidate ? 'candidate ' + e.candidate.candidate
                                           : 'gathering done');
pc.onicegatheringstatechange = () => say('gathering ' + pc.iceGatheringState);
pc.createOffer().then((o) => pc.setLocalDescription(o)).then(() => say('offer set'))
  .catch((e) => say('error ' + e));
</script>
<img src="/hold/{HOLD_MS}" alt=""></body></html>
"""


# --- the files host's server ---------------------------------------------------------------

def serve(root: str, bind: str, log_path: str, port: int = HTTP_PORT) -> None:
    """Static files from `root` (directories answer with their index.html), each request
    logged with the 5-tuple as this host saw it."""
    from netstack.lab.services import EventLog, conn_record, peek_first

    log = EventLog(log_path)

    class Handler(SimpleHTTPRequestHandler):
        server_version = "netstack-lab-files"

        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, directory=root, **kw)

        def setup(self) -> None:
            # One record per connection, also one that never sends a byte (a browser's
            # preconnect): check accounts for every connection it saw on the link.
            # HTTP/1.0 (the handler's default) means one request per connection.
            first = peek_first(self.request)  # before the handler reads a byte
            try:  # the whole request line, for the record (the mark covers 64 bytes)
                head = self.request.recv(2048, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except OSError:
                head = first
            line = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            log.write(**conn_record("tcp", self.client_address, self.request.getsockname(),
                                    first, method=line[0] if len(line) == 3 else None,
                                    path=line[1] if len(line) == 3 else None))
            super().setup()

        def do_GET(self) -> None:  # noqa: N802
            """/hold/MS answers after MS milliseconds (at most 5000): the WebRTC page
            loads one so a headless browser stays until ICE gathering has begun (its
            `--dump-dom` waits for the load event, and virtual time stands still while a
            request is pending). Everything else: the static files."""
            if self.path.startswith("/hold/") and self.path[6:].isdigit():
                time.sleep(min(int(self.path[6:]), 5000) / 1000)
                self.send_response(204)
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args: Any) -> None:
            pass

    srv = ThreadingHTTPServer((bind, port), Handler, bind_and_activate=False)
    srv.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # TCPServer's bind, not HTTPServer's: that one asks DNS for our own name (a reverse
    # lookup in the lab's log before any program ran, and a wait if DNS is not up yet)
    socketserver.TCPServer.server_bind(srv)
    srv.server_name, srv.server_port = FILES.fqdn, port
    srv.server_activate()
    srv.daemon_threads = True
    srv.serve_forever()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="the lab's static files host")
    ap.add_argument("--root", required=True)
    ap.add_argument("--bind", required=True)
    ap.add_argument("--log", required=True)
    a = ap.parse_args(argv)
    build(a.root)  # before the port is bound: `up` waits for the port, so content is there
    serve(a.root, a.bind, a.log)


if __name__ == "__main__":
    main()
