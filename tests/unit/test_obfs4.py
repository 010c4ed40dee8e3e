"""obfs4 bridges (no root): the X25519 we use (cryptography's, through netstack.lab.pki)
against RFC 7748's vectors, the lab bridge's state and cert as obfs4proxy reads them, bridge
lines accepted and refused."""

from __future__ import annotations

import base64
import json

import pytest

from netstack.errors import ConfigError
from netstack.lab.pki import wg_keypair, x25519_public
from netstack.tor.obfs4 import LAB_REF, make_state, parse_line


def x25519(k: bytes, u: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )

    return X25519PrivateKey.from_private_bytes(k).exchange(X25519PublicKey.from_public_bytes(u))


def test_x25519_matches_rfc7748():
    k = bytes.fromhex("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4")
    u = bytes.fromhex("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c")
    assert x25519(k, u).hex() == \
        "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    assert x25519_public(alice).hex() == \
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"


def test_wireguard_keys_are_what_wg_pubkey_derives():
    import subprocess

    priv, pub = wg_keypair()
    assert subprocess.run(["wg", "pubkey"], input=priv, capture_output=True, text=True,
                          check=True).stdout.strip() == pub


def test_the_state_and_cert_agree(tmp_path):
    cert = make_state(str(tmp_path / "pt_state"))
    st = json.loads((tmp_path / "pt_state" / "obfs4_state.json").read_text())
    raw = base64.b64decode(cert + "==")
    assert raw[:20].hex() == st["node-id"] and raw[20:].hex() == st["public-key"]
    assert x25519_public(bytes.fromhex(st["private-key"])).hex() == st["public-key"]
    parse_line("b", f"obfs4 203.0.113.51:5443 cert={cert} iat-mode=0")


@pytest.mark.parametrize("line", [LAB_REF, "obfs4 192.0.2.7:443 " + "A" * 40 + " cert="
                                  + "B" * 70 + " iat-mode=2", "obfs4 [2001:db8::7]:443 cert="
                                  + "C" * 70])
def test_good_lines(line):
    parse_line("bridge", line)


@pytest.mark.parametrize("line,err", [
    ("snowflake 192.0.2.3:80 fingerprint=x", "not shipped"),
    ("obfs4 192.0.2.7:0 cert=" + "A" * 70, "address:port"),
    ("obfs4 192.0.2.7:443 cert=" + "A" * 70 + " iat-mode=9", "iat-mode"),
    ("obfs4 192.0.2.7:443 cert=short", "cert="),
    ("", "empty"),
])
def test_bad_lines(line, err):
    with pytest.raises(ConfigError, match=err):
        parse_line("bridge", line)
