"""bench/vpn.py inside scripts/test-host's VM (issue 27 item 4): the VPN chain against bare
WireGuard, kernel WireGuard at both ends of both (the chain's VPN qube and the lab's server,
and the bare pair), with flowtables in the forwarding qubes, in one run. A benchmark, not a
check: it runs only when asked (`scripts/test-host -- -k bench`), and its JSON comes out of
the VM with the results (NETSTACK_TEST_HOST_OUT/vpn-LAB.json, then $NETSTACK_TEST_HOST_LAST).
LAB is the lab server's WireGuard (`--lab-wg`): kernel, or wireguard-go for comparison
(`-k "bench and kernel"` runs one); the chain's VPN qube and the bare pair are kernel
WireGuard in both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.util import reap_zombies, stack_leftovers

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("lab", ["kernel", "wireguard-go"])
def test_bench_vpn_kernel_wireguard_chain_against_bare(request, tmp_path, lab):
    if "bench" not in (request.config.getoption("keyword") or ""):
        pytest.skip("a benchmark: run it with `scripts/test-host -- -k bench`")
    out = Path(os.environ.get("NETSTACK_TEST_HOST_OUT") or tmp_path) / f"vpn-{lab}.json"
    runs = os.environ.get("NETSTACK_BENCH_RUNS", "3")
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "vpn.py"), "--runs", runs,
                        "--seconds", "5", "--lab-wg", lab, "--profile", "--out", str(out)],
                       capture_output=True,
                       text=True, timeout=1800,
                       # netstack's own waits x5 (the lab's servers were not ready in 60 s
                       # in six tries at load 20: docs/field-notes.md)
                       env=dict(os.environ, NETSTACK_SLOW_FACTOR="5"))
    print(p.stdout[-6000:], p.stderr[-20000:])
    reap_zombies()
    for i in range(int(runs)):
        assert not stack_leftovers(f"bv{i}")
    assert p.returncode == 0
    res = json.loads(out.read_text())
    assert (res["backend"], res["lab_server"]) == ("kernel", lab), res
    assert res["path"]["sys-net"]["flowtables"] == res["path"]["sys-firewall"]["flowtables"] == 1
    for k in ("chain_cpu_s_per_gb", "bare_cpu_s_per_gb"):
        assert res[k]["total"] > 0, res
    print(f"ratio {res['ratio']} (goal 0.9): chain {res['chain_gbit_s_median']} against bare "
          f"{res['bare_gbit_s_median']} Gbit/s; CPU s/GB chain "
          f"{res['chain_cpu_s_per_gb']['total']} bare {res['bare_cpu_s_per_gb']['total']}")
    for what in ("chain", "bare"):
        prof = res.get(f"profile_{what}", {})
        print(f"profile {what} ({prof.get('gbit_s')} Gbit/s, {prof.get('samples')} samples): "
              f"{prof.get('groups')}")
