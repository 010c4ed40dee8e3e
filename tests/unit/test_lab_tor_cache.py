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


def test_first_round_offset_puts_a_valid_after_time_lead_seconds_ahead():
    for now in (1000.0, 1001.2, 1003.9, 1004.99):
        off = network.voting_offset(now, 7)
        v = int(now + 7)
        assert 0 <= off < network.INITIAL_VOTING_INTERVAL
        assert (v - off) % network.INITIAL_VOTING_INTERVAL == 0
    auth = nodes("/d")[0]
    assert "TestingV3AuthVotingStartOffset 3" in network.node_torrc(auth, [], "/r", 3)
    assert "TestingV3AuthVotingStartOffset" not in network.node_torrc(nodes("/d")[2], [],
                                                                        "/r", 3)


def test_a_key_maker_that_does_not_finish_is_killed_and_named_in_one_line():
    """tor-gencert ran past 60 s in scripts/test-host's VM and `up --lab` ended in a
    traceback of subprocess.TimeoutExpired: now the child is killed and the error is one
    line naming it."""
    from netstack.errors import ApplyError

    p = network.start_keymaker(["sleep", "30"])
    with pytest.raises(ApplyError, match="gencert of auth1 did not finish in 0 s"):
        network.finish_keymaker(p, None, "gencert of auth1", timeout=0.2)
    assert p.returncode is not None  # killed and reaped, not left running
