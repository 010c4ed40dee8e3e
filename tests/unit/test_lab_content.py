"""The lab content programs fetch under `netstack check` (lab/content.py, lab/stun.py),
without root: the wheel is one pip accepts (RECORD hashes match), the index links it
with its sha256, the STUN answer carries the address asked from, and the lab plans the
content hosts only with the offline internet (--sink)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import struct
import zipfile

from netstack.lab import content, stun


def test_the_wheel_has_a_record_that_matches_every_file():
    z = zipfile.ZipFile(io.BytesIO(content.wheel_bytes()))
    dist = f"{content.PKG}-{content.VERSION}.dist-info"
    rows = [r.split(",") for r in z.read(f"{dist}/RECORD").decode().splitlines()]
    assert sorted(r[0] for r in rows) == sorted(z.namelist())
    for name, digest, size in rows:
        if name.endswith("RECORD"):
            assert (digest, size) == ("", "")
            continue
        data = z.read(name)
        want = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert (digest, int(size)) == (f"sha256={want}", len(data))
    meta = z.read(f"{dist}/METADATA").decode()
    assert f"Name: {content.PKG}" in meta and f"Version: {content.VERSION}" in meta
    assert content.wheel_bytes() == content.wheel_bytes()  # deterministic


def test_the_index_links_the_wheel_with_its_hash(tmp_path):
    content.make_index(str(tmp_path))
    data = (tmp_path / "packages" / content.WHEEL).read_bytes()
    page = (tmp_path / "simple" / content.PKG / "index.html").read_text()
    assert f"{content.WHEEL}#sha256={hashlib.sha256(data).hexdigest()}" in page
    assert f'href="{content.PKG}/"' in (tmp_path / "simple" / "index.html").read_text()


def test_the_page_asks_the_labs_stun_server_and_holds_its_load_event():
    page = content.webrtc_page(content.STUN.address, content.STUN_PORT)
    assert f"stun:{content.STUN.address}:{content.STUN_PORT}" in page
    assert "createDataChannel" in page and "setLocalDescription" in page
    assert f'src="/hold/{content.HOLD_MS}"' in page


def test_a_binding_request_gets_the_xor_mapped_address_with_a_fingerprint():
    txid = os.urandom(12)
    req = struct.pack("!HHI", stun.BINDING_REQUEST, 0, stun.MAGIC) + txid
    assert stun.parse_request(req) == txid
    resp = stun.binding_response(txid, "203.0.113.10", 40000)
    kind, length, cookie = struct.unpack("!HHI", resp[:8])
    assert (kind, cookie, resp[8:20]) == (stun.BINDING_SUCCESS, stun.MAGIC, txid)
    assert length == len(resp) - 20
    assert stun.mapped_address(resp) == ("203.0.113.10", 40000)
    crc = struct.unpack("!I", resp[-4:])[0]
    assert crc == (binascii.crc32(resp[:-8]) ^ stun.FINGERPRINT_XOR) & 0xFFFFFFFF


def test_what_is_not_a_binding_request_gets_no_answer():
    assert stun.parse_request(b"\x00\x01\x00\x00" + b"\0" * 16) is None  # no magic cookie
    assert stun.parse_request(b"short") is None
    assert stun.parse_request(struct.pack("!HHI", 0x0111, 0, stun.MAGIC) + b"\0" * 12) is None


def test_content_hosts_are_planned_only_with_the_offline_internet():
    from netstack import stack
    from netstack.model import UplinkSpec

    cfg = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "basic.toml")
    with_sink = stack.plan_only(cfg, "u1", UplinkSpec("lab", sink=True))
    without = stack.plan_only(cfg, "u1", UplinkSpec("lab"))
    servers = {"lab-files-server", "lab-stun-server"}
    assert servers <= {d.name for d in with_sink.daemons}
    assert not servers & {d.name for d in without.daemons}
    assert {"files", "stun"} <= set(with_sink.lab.hosts)
    assert not {"files", "stun"} & set(without.lab.hosts)
    zone = next(s.zone for s in with_sink.services if s.name == "lab-dns")
    for n in ("files", "git", "pypi", "www"):
        assert zone[f"{n}.lab.test"] == content.FILES.address
    assert zone["stun.lab.test"] == content.STUN.address
    assert {d.ready for d in with_sink.daemons if d.name in servers} == {"tcp/80", "udp/3478"}
