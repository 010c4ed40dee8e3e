"""The command line builds only the subcommand it names (netstack/cli.py, parser(only=));
what it parses must be what the whole parser parses."""

from __future__ import annotations

import pytest

from netstack import cli
from netstack.errors import UsageError

LINES = [
    ["up", "configs/basic.toml", "--lab"],
    ["--stack", "t1", "up", "--lab", "--no-wait", "--vpn-timeout", "5"],
    ["--stack=t2", "down", "--purge"],
    ["status", "--json"],
    ["plan", "configs/vpn.toml", "--lab", "--json"],
    ["tor", "circuits", "--json"],
    ["audit", "--json"],
    ["exec", "--user", "nobody", "work", "true"],
    ["firewall", "work", "list"],
]


@pytest.mark.parametrize("argv", LINES, ids=[" ".join(a) for a in LINES])
def test_one_subcommand_parses_as_all_of_them(argv):
    word = cli.command_word(argv)
    assert word == next(a for a in argv if not a.startswith("-") and a not in ("t1",))
    assert vars(cli.parser(word).parse_args(argv)) == vars(cli.parser().parse_args(argv))


def test_help_and_unknown_words_get_the_whole_parser():
    assert cli.command_word(["--help"]) is None and cli.command_word([]) is None
    assert cli.command_word(["--stack", "x"]) is None
    full = cli.parser("bogus")  # not a command: every subcommand, so the error names them
    with pytest.raises(UsageError, match="invalid choice: 'bogus'.*'status'"):
        full.parse_args(["bogus"])
