"""What keyagent's two command lines (``keyagent``, ``keyagent-ctl``) share about argparse.

Imported only once a command line is parsed: ``keyagent-ctl get`` never needs argparse.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from keyagent.duration import parse_duration

EXIT_USAGE = 64
"""Exit status of a wrong command line (sysexits' EX_USAGE)."""


class UsageParser(argparse.ArgumentParser):
    """An ArgumentParser that exits with :data:`EXIT_USAGE`, not argparse's 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def duration_type(max_seconds: float | None = None, too_long: str = "") -> Callable[[str], float]:
    """An argparse ``type=`` for durations (``90``, ``15m``, ``2d``), at most ``max_seconds``."""

    def parse(text: str) -> float:
        try:
            seconds = parse_duration(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        if max_seconds is not None and seconds > max_seconds:
            raise argparse.ArgumentTypeError(f"'{text}' is longer than {too_long}")
        return seconds

    return parse
