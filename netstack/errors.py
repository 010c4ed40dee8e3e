"""Exception types of ours: each renders as one line for the user, never a traceback."""


class NetstackError(Exception):
    """Base of every user-facing error. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class ConfigError(NetstackError):
    """Invalid config: names where (qube and field) and how to fix it."""

    exit_code = 2

    def __init__(self, where: str, problem: str, fix: str = "") -> None:
        self.where, self.problem, self.fix = where, problem, fix
        msg = f"config: {where}: {problem}"
        if fix:
            msg += f" (fix: {fix})"
        super().__init__(msg)


class UsageError(NetstackError):
    """Bad command line input that argparse could not catch."""

    exit_code = 2


class InvariantError(NetstackError):
    """A config or a live change that would break one of the config's `[[invariant]]`s:
    refused before anything changes, one line naming the invariant, the qube and the fix."""

    exit_code = 2


class StateError(NetstackError):
    """The stack is not in the state the command needs (not up, already up, half made)."""

    exit_code = 3


class NotUp(StateError):
    """`down` of a stack with nothing left: what a unit's clean-up before its start finds
    every time (ExecStartPre), so the journal gets it as a notice, not an error."""


class DamagedFile(StateError):
    """A file of ours that cannot be read back: not JSON, cut short, or of a shape another
    version of netstack wrote. Names the file; `fix` says what to do."""

    def __init__(self, path: str, problem: str,
                 fix: str = "`netstack down` and `up` again") -> None:
        self.path, self.problem, self.fix = path, problem, fix
        super().__init__(self.render())

    def render(self) -> str:
        return f"{self.path} is damaged ({self.problem}); fix: {self.fix}"


class OtherSchema(DamagedFile):
    """A file whose `schema` is not the one this version reads."""

    def __init__(self, path: str, found: object, want: int) -> None:
        self.found, self.want = found, want
        super().__init__(path, f"schema {found}, this one reads {want}",
                         "take it down with the version of netstack that made it")

    def render(self) -> str:
        return (f"{self.path} was written by another version of netstack ({self.problem}); "
                f"fix: {self.fix}")


class NotReady(NetstackError):
    """The stack is up but a qube does not do its job yet (tunnel, Tor): a check failed."""

    exit_code = 1


class ApplyError(NetstackError):
    """The system refused a change while bringing a stack up."""

    exit_code = 4


class CannotCheck(NetstackError):
    """What a check compares against cannot be loaded (a config, a recorded state, the
    kernel's live sets): the check could not run, so it has failed (exit 1), never PASS."""

    exit_code = 1


def count(n: int, noun: str, plural: str | None = None) -> str:
    """`1 rule`, `2 rules`, `0 rules`: a number and its noun, for lines a user reads."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
