"""One user-error type and one CLI wrapper (docs/ARCHITECTURE.md, "Errors").

A mistake in what a user gave us (a config, an override, a prompt, a file, a run directory, a checkpoint)
raises `UserError` with one line that names the problem and what is valid. Every CLI runs its main through
`cli`, which prints `error: <line>` to stderr and exits with status 2, without a traceback. Anything else is
our bug and keeps its traceback. A CLI writes its outputs only after its inputs are known good, or writes to a
temporary name and renames, so an error leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import functools
import sys


class UserError(ValueError):
    """A user's mistake: one line, exit status 2."""


def cli(main):
    """Wrap a CLI's `main(argv=None) -> int`: UserError becomes one line on stderr and exit status 2."""
    @functools.wraps(main)
    def wrapped(argv=None) -> int:
        try:
            return main(argv)
        except UserError as e:
            msg = " ".join(str(e).split()) or type(e).__name__
            print(f"error: {msg}", file=sys.stderr)
            return 2
    return wrapped


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are UserErrors too: one line through `cli`, not a usage block."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")
