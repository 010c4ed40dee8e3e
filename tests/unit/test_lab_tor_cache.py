"""The warm lab's kept Tor network (netstack.tor.network): which shape a cache belongs to,
when a kept network is restored and when it is made anew, what `down` keeps, what a lab
gateway is seeded with, and `down --purge`. Plain files in a temporary directory."""

from __future__ import annotations

import dataclasses
import os
import pwd
import time

import pytest

from netstack.model import TorNode
from netstack.tor import network


def nodes(base: str, exit_addr: str = "203.0.113.41") -> list[TorNode]:
    spec = [("auth1", "authority", "203.0.113.21"), ("auth2", "authority", "203.0.113.22"),
            ("relay1", "relay", "203.0.113.31"), ("exit1", "exit", exit_addr)]
    return [TorNode(n, r, a, network.OR_PORT, network.DIR_PORT, f"nsl-x-{n}",
                    os.path.join(base, n)) for n, r, a in spec]


def fake_run(ns: list[TorNode], expires: float | None = None, salt: int = 0) -> list[str]:
    """What a lab's nodes leave after a run: keys, fingerprints, a consensus, a lock."""
    auths = []
    exp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(expires or time.time() + 300 * 86400))
    for i, n in enumerate(ns):
        os.makedirs(os.path.join(n.dir, "keys"), mode=0o700, exist_ok=True)
        fp = f"{i + salt:040X}"
        with open(os.path.join(n.dir, "fingerprint"), "w") as f:
            f.write(f"{n.name} {fp}\n")
        for x in ("cached-certs", "cached-microdesc-consensus", "cached-microdescs.new",
                  "lock", "torrc"):
            with open(os.path.join(n.dir, x), "w") as f:
                f.write(f"{x} of {n.name}\n")
        if n.role == "authority":
            v3 = f"{i + salt + 100:040X}"
            with open(os.path.join(n.dir, "keys", "authority_certificate"), "w") as f:
                f.write(f"dir-key-certificate-version 3\nfingerprint {v3}\n"
                        f"dir-key-expires {exp}\n")
            auths.append((n, v3, fp))
    lines = network.dirauthority_lines(auths)
    with open(os.path.join(os.path.dirname(ns[0].dir), network.DIRAUTHS), "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = str(tmp_path / "lab-tor")
    monkeypatch.setattr(network, "CACHE_ROOT", root)
    return root


def test_shape_is_the_node_set_and_addresses_not_the_stack(tmp_path):
    a = network.cache_dir(nodes(str(tmp_path / "s1")))
    assert a == network.cache_dir(nodes(str(tmp_path / "s2")))  # another stack, same lab
    assert a != network.cache_dir(nodes(str(tmp_path / "s1"), exit_addr="203.0.113.49"))
    assert a != network.cache_dir(nodes(str(tmp_path / "s1"))[:-1])
    moved = [dataclasses.replace(n, or_port=5001) if n.name == "relay1" else n
             for n in nodes(str(tmp_path / "s1"))]
    assert a != network.cache_dir(moved)


def test_kept_network_comes_back_with_its_keys_and_not_its_lock(cache, tmp_path):
    first = nodes(str(tmp_path / "one" / "tor"))
    lines = fake_run(first)
    assert network.restore(first) is None  # nothing kept yet: made anew
    assert network.save(first, str(tmp_path / "one" / "tor"))
    again = nodes(str(tmp_path / "two" / "tor"))
    assert network.restore(again) == lines
    auth = again[0].dir
    assert os.path.isfile(os.path.join(auth, "keys", "authority_certificate"))
    assert os.path.isfile(os.path.join(auth, "cached-microdesc-consensus"))
    assert not os.path.exists(os.path.join(auth, "lock"))
    assert not os.path.exists(os.path.join(auth, "torrc"))
    assert os.stat(network.cache_dir(first)).st_mode & 0o077 == 0


def test_other_shape_or_expiring_certificate_or_tampered_keys_are_not_restored(cache,
                                                                                tmp_path):
    first = nodes(str(tmp_path / "one" / "tor"))
    fake_run(first)
    network.save(first, str(tmp_path / "one" / "tor"))
    assert network.restore(nodes(str(tmp_path / "x" / "tor"), "203.0.113.49")) is None
    with open(os.path.join(network.cache_dir(first), "nodes", "auth2", "fingerprint"),
              "w") as f:
        f.write("auth2 " + "F" * 40 + "\n")  # no longer what the DirAuthority lines say
    assert network.restore(nodes(str(tmp_path / "y" / "tor"))) is None

    # the broken one went at that restore: the keys made instead are kept at down
    fresh = nodes(str(tmp_path / "y2" / "tor"))
    lines = fake_run(fresh, salt=1000)  # other keys than the broken cache's
    assert network.save(fresh, str(tmp_path / "y2" / "tor"))
    assert network.restore(nodes(str(tmp_path / "y3" / "tor"))) == lines

    soon = nodes(str(tmp_path / "two" / "tor"))
    fake_run(soon, expires=time.time() + 86400)
    network.purge_cache()
    network.save(soon, str(tmp_path / "two" / "tor"))
    assert network.restore(nodes(str(tmp_path / "z" / "tor"))) is None


def test_a_cache_of_other_keys_is_not_overwritten(cache, tmp_path):
    first = nodes(str(tmp_path / "one" / "tor"))
    lines = fake_run(first)
    assert network.save(first, str(tmp_path / "one" / "tor"))
    rival = nodes(str(tmp_path / "two" / "tor"))
    fake_run(rival)
    with open(os.path.join(tmp_path, "two", "tor", network.DIRAUTHS), "w") as f:
        f.write("DirAuthority other\n")  # a second cold up at the same time made other keys
    assert not network.save(rival, str(tmp_path / "two" / "tor"))
    assert network.restore(nodes(str(tmp_path / "three" / "tor"))) == lines


def test_nothing_kept_when_keys_were_never_made(cache, tmp_path):
    ns = nodes(str(tmp_path / "one" / "tor"))
    assert not network.save(ns, str(tmp_path / "one" / "tor"))
    assert not os.path.exists(network.cache_dir(ns))


def test_purge_removes_every_kept_network(cache, tmp_path):
    ns = nodes(str(tmp_path / "one" / "tor"))
    fake_run(ns)
    network.save(ns, str(tmp_path / "one" / "tor"))
    assert network.purge_cache()
    assert not os.path.exists(cache)
    assert not network.purge_cache()


def test_seed_client_copies_only_the_lab_authoritys_directory_files(tmp_path):
    ns = nodes(str(tmp_path / "tor"))
    fake_run(ns)
    gw = tmp_path / "gw"
    gw.mkdir()
    me = pwd.getpwuid(os.getuid()).pw_name
    got = network.seed_client(ns, str(gw), me)
    assert sorted(got) == ["cached-certs", "cached-microdesc-consensus",
                           "cached-microdescs.new"]
    assert sorted(os.listdir(gw)) == sorted(got)  # no keys, no state, no lock
    assert (gw / "cached-certs").read_text() == "cached-certs of auth1\n"
    assert network.seed_client([n for n in ns if n.role != "authority"], str(gw), me) == []


def _next_valid_after(now: int, interval: int, offset: int) -> int:
    """tor's voting_sched_get_start_of_interval_after (networkstatus.c), from midnight UTC."""
    midnight = now - now % 86400
    nxt = midnight + ((now - midnight) // interval + 1) * interval + offset
    return nxt - interval if nxt - interval > now else nxt


def test_authorities_start_with_the_first_vote_held_far_enough_ahead():
    """The held first valid-after time is at least MAX_OFFSET s away whatever the start
    (so the release, 4-8 s after the torrc, comes first), and the offset is one tor
    accepts (at most the voting interval)."""
    for now in range(86400 - 3000, 86400 + 3000, 7):
        off = network.hold_offset(now)
        assert 0 <= off <= network.MAX_OFFSET
        v = _next_valid_after(now, network.HOLD_VOTING_INTERVAL, off)
        assert v - now >= network.MAX_OFFSET, (now, off, v)
    auth, relay = nodes("/d")[0], nodes("/d")[2]
    rc = network.node_torrc(auth, [], "/r", 3)
    assert "TestingV3AuthVotingStartOffset 3" in rc
    assert f"TestingV3AuthInitialVotingInterval {network.HOLD_VOTING_INTERVAL}" in rc
    assert "TestingV3AuthInitialVotingInterval 5" not in rc  # one value, the held one
    rr = network.node_torrc(relay, [], "/r", 3)
    assert "TestingV3AuthVotingStartOffset" not in rr
    assert "TestingV3AuthInitialVotingInterval 5" in rr
    assert (1800 % network.HOLD_VOTING_INTERVAL) == 0  # tor: it divides 30 minutes


def test_release_puts_the_first_vote_after_every_authority_moved():
    """tor votes at V-2 on the 5-s schedule: the release's V leaves at least 0.7 s for the
    three SETCONFs, and is the first grid time after the release (tor takes that one)."""
    from netstack.tor import firstvote

    for now in (1000.0, 1000.05, 1001.3, 1002.99, 1003.5, 1004.999):
        v, off = firstvote.release_time(now)
        assert v - 2 >= now + 0.7 - 1e-9
        assert _next_valid_after(int(now), network.INITIAL_VOTING_INTERVAL, off) == v
        assert _next_valid_after(int(now) + 1, network.INITIAL_VOTING_INTERVAL, off) == v


def _raw_verify(pub_pem: str, sig_b64: str, data: bytes) -> bool:
    """RSA PKCS#1 v1.5 over the bytes themselves (no DigestInfo), as tor checks."""
    import base64

    from cryptography.hazmat.primitives import serialization

    pub = serialization.load_pem_public_key(pub_pem.encode()).public_numbers()
    k = (pub.n.bit_length() + 7) // 8
    em = pow(int.from_bytes(base64.b64decode(sig_b64), "big"), pub.e, pub.n).to_bytes(k, "big")
    return em == b"\x00\x01" + b"\xff" * (k - 3 - len(data)) + b"\x00" + data


def test_authority_certificate_is_what_tor_gencert_writes_and_its_signatures_hold(tmp_path):
    """The in-process certificate: the fields tor-gencert writes, the v3 identity
    fingerprint of the identity key, the signing key's cross-certificate over the
    identity digest, the identity's signature over the document, a year's validity; the
    private keys readable as tor reads them (PEM, PKCS#1), private to root."""
    import hashlib
    import re

    from cryptography.hazmat.primitives import serialization

    fp = network.make_authority_cert(str(tmp_path), "203.0.113.21:7000", now=1767225600)
    cert = (tmp_path / "authority_certificate").read_text()
    lines = cert.splitlines()
    assert lines[:3] == ["dir-key-certificate-version 3", "dir-address 203.0.113.21:7000",
                         f"fingerprint {fp}"]
    assert "dir-key-published 2026-01-01 00:00:00" in lines
    assert "dir-key-expires 2027-01-01 00:00:00" in lines
    pems = re.findall(r"-----BEGIN RSA PUBLIC KEY-----\n.*?-----END RSA PUBLIC KEY-----\n",
                      cert, re.S)
    ident_pub, signing_pub = pems
    ident = serialization.load_pem_private_key(
        (tmp_path / "authority_identity_key").read_bytes(), None)
    der = ident.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.PKCS1)
    assert hashlib.sha1(der).hexdigest().upper() == fp
    assert ident.key_size == network.LAB_IDENTITY_BITS
    signing = serialization.load_pem_private_key(
        (tmp_path / "authority_signing_key").read_bytes(), None)
    assert signing.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.PKCS1).decode() == signing_pub
    cross = re.search(r"-----BEGIN ID SIGNATURE-----\n(.*?)-----END ID SIGNATURE-----",
                      cert, re.S).group(1).replace("\n", "")
    assert _raw_verify(signing_pub, cross, hashlib.sha1(der).digest())
    body, sig = cert.split("-----BEGIN SIGNATURE-----\n")
    assert body.endswith("dir-key-certification\n")
    sig = sig.replace("-----END SIGNATURE-----\n", "").replace("\n", "")
    assert _raw_verify(ident_pub, sig, hashlib.sha1(body.encode()).digest())
    assert not _raw_verify(ident_pub, sig, hashlib.sha1(body.encode() + b" ").digest())
    for f in ("authority_identity_key", "authority_signing_key", "authority_certificate"):
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o600
    # the relay identity: 1024 bits (tor requires it), its fingerprint the DirAuthority's
    rfp = network.make_relay_identity(str(tmp_path))
    rid = serialization.load_pem_private_key((tmp_path / "secret_id_key").read_bytes(), None)
    assert rid.key_size == 1024
    assert hashlib.sha1(rid.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.PKCS1)).hexdigest().upper() == rfp


def test_a_relay_that_had_not_started_is_kept_without_keys(cache, tmp_path):
    """A loaded host: `down` came before one relay made its keys. The network (the
    authorities' keys) is kept all the same; the relay makes its keys at the next start.
    An authority without its fingerprint is no network to keep."""
    ns = nodes(str(tmp_path / "one" / "tor"))
    lines = fake_run(ns)
    relay = next(n for n in ns if n.role == "relay")
    os.remove(os.path.join(relay.dir, "fingerprint"))
    assert network.save(ns, str(tmp_path / "one" / "tor"))
    again = nodes(str(tmp_path / "two" / "tor"))
    assert network.restore(again) == lines
    assert not os.path.exists(os.path.join(next(n for n in again if n.role == "relay").dir,
                                           "fingerprint"))
    network.purge_cache()
    auth = next(n for n in ns if n.role == "authority")
    os.remove(os.path.join(auth.dir, "fingerprint"))
    assert not network.save(ns, str(tmp_path / "one" / "tor"))


def test_purge_of_a_stack_removes_only_the_networks_it_kept(cache, tmp_path):
    """review2 finding 7: `down --purge` of a stack without Tor removed every stack's kept
    lab Tor network. Now: what this stack's down kept (shared with a stack of the same
    shape), never another shape's; the directory goes with its last network."""
    mine = nodes(str(tmp_path / "one" / "tor"))
    fake_run(mine)
    assert network.save(mine, str(tmp_path / "one" / "tor"), stack="a")
    assert network.save(mine, str(tmp_path / "one" / "tor"), stack="b")  # same shape
    other = nodes(str(tmp_path / "two" / "tor"), exit_addr="203.0.113.42")
    fake_run(other, salt=500)
    assert network.save(other, str(tmp_path / "two" / "tor"), stack="c")
    assert network.cache_dir(mine) != network.cache_dir(other)
    assert not network.purge_cache("no-tor")  # a stack that kept nothing removes nothing
    assert os.path.isdir(network.cache_dir(mine)) and os.path.isdir(network.cache_dir(other))
    assert network.purge_cache("b")
    assert not os.path.exists(network.cache_dir(mine))
    assert os.path.isdir(network.cache_dir(other))
    assert network.purge_cache("c") and not os.path.exists(cache)


def test_purge_takes_unowned_networks_and_links_never_their_targets(cache, tmp_path):
    """A network kept before networks named their stacks, or the half-made copy of a
    `down` killed while saving, has no `stacks` file: any stack's purge removes it (else
    nothing ever would). A link in the cache goes as a link; its target stays."""
    mine = nodes(str(tmp_path / "one" / "tor"))
    fake_run(mine)
    assert network.save(mine, str(tmp_path / "one" / "tor"), stack="a")
    legacy = os.path.join(cache, "1111222233334444")
    os.makedirs(os.path.join(legacy, "nodes"))
    half = network.cache_dir(mine) + ".new4242"
    os.makedirs(half)
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "stacks").write_text("b\n")
    os.symlink(target, os.path.join(cache, "bbbb000000000000"))
    assert network.purge_cache("b")
    assert not os.path.lexists(legacy) and not os.path.lexists(half)
    assert not os.path.lexists(os.path.join(cache, "bbbb000000000000"))
    assert (target / "stacks").exists()  # never followed
    assert os.path.isdir(network.cache_dir(mine))  # a's stays
