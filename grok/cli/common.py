"""What every ``grok-*`` program shares: one-line errors, exit statuses, argument types.

A program is ``build_parser()`` plus ``run(args)``; ``run_program`` parses the command line and
turns the library's errors (``GrokError``), the operating system's (``OSError``: a file that
cannot be read or written) and a ``UsageError`` (a bad command line found after parsing) into one
line on stderr, ``PROG: error: ...``, and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from grok.errors import GrokError

EXIT_OK = 0
EXIT_ERROR = 1  # the library or the system refused: bad file, does not fit, ...
EXIT_BAD_ARGS = 2  # argparse's own status for a bad command line
EXIT_INTERRUPTED = 130  # the shell's status for SIGINT


class UsageError(Exception):
    """A bad command line found after parsing (a prompt file that cannot be read, ...)."""


def report(prog: str, message: object) -> None:
    """Prints ``PROG: error: <message>`` on one line of stderr (newlines folded to spaces)."""
    one_line = " ".join(str(message).split())
    print(f"{prog}: error: {one_line}", file=sys.stderr)


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line on stderr (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        report(self.prog, message)
        raise SystemExit(EXIT_BAD_ARGS)


def run_program(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], int | None],
    argv: Sequence[str] | None = None,
    *,
    error_status: int = EXIT_ERROR,
) -> int:
    """Parses ``argv`` and calls ``run(args)``; returns the exit status.

    ``run`` returns its status (None is 0). A ``UsageError`` exits with 2; a ``GrokError`` or
    ``OSError`` with ``error_status``; Ctrl-C with 130; each after one line on stderr.
    """
    args = parser.parse_args(argv)
    try:
        status = run(args)
    except UsageError as e:
        report(parser.prog, e)
        return EXIT_BAD_ARGS
    except (GrokError, OSError) as e:
        report(parser.prog, e)
        return error_status
    except KeyboardInterrupt:
        report(parser.prog, "interrupted")
        return EXIT_INTERRUPTED
    return EXIT_OK if status is None else status


# Argument types. argparse reports an ArgumentTypeError as
# "argument --flag: <message>", so each message names the value and what was expected.


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (mesh axes, batch sizes, ...)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (token counts, seeds, ...)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (sizes in GB, ...); ``nan``, ``inf``, 0 and negatives are refused."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """Any finite number (the library checks its range and names the field)."""
    return _float(text)
