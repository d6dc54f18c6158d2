"""What keyagent's two command lines (``keyagent``, ``keyagent-ctl``) share about argparse.

Imported only once a command line is parsed: ``keyagent-ctl get`` never needs argparse.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from typing import NoReturn

from keyagent.duration import parse_duration
from keyagent.rules import (
    NOT_A_WORKER_COUNT,
    NOT_AN_ENTRY_COUNT,
    TOO_LONG,
    count_problem,
    duration_problem,
    entry_count_problem,
    path_problem,
    worker_count_problem,
)

EXIT_USAGE = 64
"""Exit status of a wrong command line (sysexits' EX_USAGE)."""


class UsageParser(argparse.ArgumentParser):
    """An ArgumentParser that exits with :data:`EXIT_USAGE`, not argparse's 2, and never
    quotes back a value it did not expect: a secret pasted onto the command line by
    mistake is not shown again on the terminal."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {without_values(message)}\n")


_UNRECOGNIZED = "unrecognized arguments: "
_IGNORED = re.compile(r"ignored explicit argument .*", re.DOTALL)
_INVALID_CHOICE = re.compile(r"invalid choice: .*? \(choose from", re.DOTALL)
_AMBIGUOUS = re.compile(r"(ambiguous option: -[^=\s]*)=\S*")


def _option_name(word: str) -> str | None:
    """How an unknown option is shown: ``--name`` without a value after ``=``, ``-x``
    without what is glued to it (``-pSECRET``); None for a word that is no option."""
    if word.startswith("--"):
        return word.split("=", 1)[0]
    if word.startswith("-") and len(word) > 1:
        return word[:2]
    return None


def without_values(message: str) -> str:
    """argparse's ``message`` without the words it quotes from the command line where a
    secret could be among them: unrecognized arguments are shown by option name only (a
    value after ``=`` or glued to a short option is cut), the others counted; an invalid
    choice is not shown (the choices are); an ambiguous or value-less option is not shown
    the value it was given. Values of options that take one (``--lifetime 2x``) are
    quoted by their own checks: they are where the user meant them."""
    message = _INVALID_CHOICE.sub("invalid choice (choose from", message)
    message = _AMBIGUOUS.sub(r"\1", message)
    if message.startswith(_UNRECOGNIZED):
        words = message[len(_UNRECOGNIZED) :].split(" ")
        options = [name for name in map(_option_name, words) if name is not None]
        values = len(words) - len(options)
        shown = ", ".join(options)
        if values:
            counted = f"{values} value{'s' if values > 1 else ''}"
            shown += f"{' and ' if shown else ''}{counted} (not shown: secrets are read from "
            shown += "stdin or a prompt, never from arguments)"
        return f"unrecognized arguments: {shown}"
    return _IGNORED.sub("takes no value", message)


def duration_type(
    max_seconds: float | None = None, too_long: str = "ten years"
) -> Callable[[str], float]:
    """An argparse ``type=`` for durations (``90``, ``15m``, ``2d``) under the one rule for
    durations (:func:`keyagent.rules.duration_problem`: positive, at most ten years), and at
    most ``max_seconds`` if that is given and shorter; ``too_long`` names the limit."""

    def parse(text: str) -> float:
        try:
            seconds = parse_duration(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        problem = duration_problem(seconds)
        if problem is TOO_LONG or (max_seconds is not None and seconds > max_seconds):
            raise argparse.ArgumentTypeError(f"{text!a} is longer than {too_long}")
        if problem is not None:  # parse_duration refuses these first; the rule has the last word
            raise argparse.ArgumentTypeError(f"{text!a} must be {problem}")
        return seconds

    return parse


def path_type(text: str) -> str:
    """An argparse ``type=`` for file paths: not empty, no control characters
    (:func:`keyagent.rules.path_problem`)."""
    # A byte that is not UTF-8 comes as a lone surrogate (surrogateescape): it is a byte of
    # the name, not a control character, and such a name is the user's to choose.
    problem = path_problem(text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{problem}; name another")
    return text


def count_type(text: str) -> int:
    """An argparse ``type=`` for limits such as ``--max-connections`` (a whole number of at
    least 1, :func:`keyagent.rules.count_problem`)."""
    return _whole_number(text, count_problem, "a positive whole number")


def entry_count_type(text: str) -> int:
    """An argparse ``type=`` for counts of audit entries (``--audit-entries``, ``log -n``): a
    whole number from 0 up, :func:`keyagent.rules.entry_count_problem`."""
    return _whole_number(text, entry_count_problem, NOT_AN_ENTRY_COUNT)


def worker_count_type(text: str) -> int:
    """An argparse ``type=`` for ``--http-workers``: a whole number from 1 to 32,
    :func:`keyagent.rules.worker_count_problem`."""
    return _whole_number(text, worker_count_problem, NOT_A_WORKER_COUNT)


def _whole_number(text: str, problem: Callable[[object], str | None], what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!a} is not {what}") from None
    if problem(value) is not None:
        raise argparse.ArgumentTypeError(f"{text!a} is not {what}")
    return value


def renamed(new: str, why: str) -> type[argparse.Action]:
    """An argparse ``action=`` for a retired option: using it is a usage error that names
    ``new``, the option to use instead, and ``why`` it changed. Add it with
    ``help=argparse.SUPPRESS`` so help and completion show only the new name."""

    class Renamed(argparse.Action):
        def __call__(
            self,
            parser: argparse.ArgumentParser,
            namespace: argparse.Namespace,
            values: object,
            option_string: str | None = None,
        ) -> None:
            parser.error(f"{option_string} is now {new} ({why})")

    return Renamed
