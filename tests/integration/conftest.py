from __future__ import annotations

import os
import shutil
import tempfile

import pytest

# The run's own kept lab Tor networks (docs/field-notes.md, "A warm lab"): a Tor stack that
# goes down keeps its network here and the next one of the same shape bootstraps from it in
# seconds instead of half a minute. Set before anything imports netstack.tor.network, and
# never the machine's /var/lib/netstack/lab-tor, which other runs on the host purge at any
# time. Tests that need a cold network name a cache of their own.
if "NETSTACK_LAB_TOR_CACHE" not in os.environ:
    os.environ["NETSTACK_LAB_TOR_CACHE"] = tempfile.mkdtemp(prefix="netstack-labtor-",
                                                            dir="/var/tmp")
    _RUN_TOR_CACHE: str | None = os.environ["NETSTACK_LAB_TOR_CACHE"]
else:
    _RUN_TOR_CACHE = None

from tests.integration.util import (  # noqa: E402  (after the cache is chosen)
    BASIC,
    cli,
    new_stack_name,
    purge_homes,
    reap_zombies,
    running_stack,
)


def pytest_unconfigure(config):
    """The run's kept lab Tor networks go at its end (after every fixture's teardown; also
    after --collect-only)."""
    if _RUN_TOR_CACHE:
        shutil.rmtree(_RUN_TOR_CACHE, ignore_errors=True)
        shutil.rmtree(_RUN_TOR_CACHE + ".purged", ignore_errors=True)


@pytest.fixture(scope="session")
def basic_stack():
    """One shared basic chain over the lab for tests that do not disturb it."""
    with running_stack(BASIC, "b") as stack:
        yield stack


@pytest.fixture
def own_stack():
    """A name for a stack a test makes and breaks itself; cleaned up whatever happens."""
    made: list[str] = []

    def make(prefix: str = "o") -> str:
        s = new_stack_name(prefix)
        made.append(s)
        return s

    yield make
    for s in made:
        # `down`, then the homes as `--purge` removes them: a Tor stack's network is kept
        # for the next Tor stack's warm up (conftest's run cache), not purged with it
        cli("--stack", s, "down", check=False)
        purge_homes(s)
        reap_zombies()


@pytest.fixture(scope="session")
def tor_lab():
    """One Tor-over-VPN stack with two workstations, shared by the Tor and leak tests."""
    from tests.integration.labs import TorLab

    t = TorLab()
    try:
        yield t
    finally:
        t.close()
