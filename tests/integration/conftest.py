from __future__ import annotations

import pytest

from tests.integration.util import BASIC, cli, new_stack_name, reap_zombies, running_stack


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
        cli("--stack", s, "down", "--purge", check=False)
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
