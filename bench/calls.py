"""Call layer benchmark (root): the cost of one `netstack-call` between two app qubes'
sandboxes, and of a stream through one. A stack of configs/basic.toml with the test
policy and services of tests/integration/test_calls.py is made and removed.

    sudo .venv/bin/python bench/calls.py [--calls 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from tests.integration.test_calls import CAP, make_config
    from tests.integration.util import cli, new_stack_name, reap_zombies

    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20)
    n = ap.parse_args().calls
    d = make_config()
    s = new_stack_name("m")
    cli("--stack", s, "up", f"{d}/c.toml", "--lab", "--no-wait")
    try:
        ex = [sys.executable, "-m", "netstack.cli", "--stack", s, "exec", "work", "--"]
        env = dict(os.environ, SUDO_USER="")
        loop = (f"i=0; s=$(date +%s%N); while [ $i -lt {n} ]; do netstack-call personal "
                "my.Touch+m </dev/null || exit 9; i=$((i+1)); done; e=$(date +%s%N); "
                f"echo $(( (e-s)/{n}/1000000 ))")
        p = subprocess.run(ex + ["sh", "-c", loop], capture_output=True, text=True, env=env)
        print(f"ms per call, {n} in a loop in one sandbox: {p.stdout.strip()}")
        t = time.monotonic()
        for _ in range(10):
            subprocess.run(ex + ["true"], capture_output=True, env=env)
        print(f"ms per `netstack exec work -- true`: {(time.monotonic() - t) * 100:.0f}")
        size = CAP - 100000
        one = (f"s=$(date +%s%N); head -c {size} /dev/zero | netstack-call personal my.Echo "
               ">/dev/null; e=$(date +%s%N); echo $(( (e-s)/1000000 ))")
        for _ in range(3):
            p = subprocess.run(ex + ["sh", "-c", one], capture_output=True, text=True, env=env)
            print(f"ms for {size} bytes each way through my.Echo: {p.stdout.strip()}")
    finally:
        cli("--stack", s, "down", "--purge", check=False)
        reap_zombies()
        shutil.rmtree(d)


if __name__ == "__main__":
    main()
