"""The agent's loggers: :mod:`logging` in a library, a lean sink in the serving process.

``get_logger(name)`` returns a :class:`Logger` with the usual ``debug`` … ``error``
methods (``%``-style arguments, formatted only if the level is on). Until
:func:`to_stderr` or :func:`to_syslog` is called, which only :mod:`keyagent.core` does, a
record goes to the standard :mod:`logging` logger of the same name, so tests (``caplog``)
and programs embedding keyagent configure it as usual. In the serving process records go
straight to stderr or to the ``syslog`` C module: ``logging`` and what it imports
(``traceback``, ``tokenize``, ``string``, ``weakref``) are over 1 MiB the agent would
otherwise keep resident. Nothing here formats exceptions: callers log types, never
messages that might quote a secret (see :func:`keyagent.effects.log_internal`).
"""

from __future__ import annotations

import contextlib
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from logging import Logger as StdLogger

__all__ = [
    "DEBUG", "ERROR", "INFO", "WARNING", "Logger", "get_logger", "one_line", "to_stderr",
    "to_syslog",
]  # fmt: skip

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
_LEVEL_NAMES = {DEBUG: "DEBUG", INFO: "INFO", WARNING: "WARNING", ERROR: "ERROR"}


class _Sink:
    """Where the serving process's records go, and from which level. ``emit_many`` writes
    several records of one level together (one write to stderr; syslog takes one each)."""

    __slots__ = ("emit", "emit_many", "level")  # emit_many: set per instance

    def __init__(
        self,
        level: int,
        emit: Callable[[int, str], None],
        emit_many: Callable[[int, list[str]], None] | None = None,
    ) -> None:
        self.level = level
        self.emit = emit
        self.emit_many = emit_many or self._one_by_one

    def _one_by_one(self, level: int, texts: list[str]) -> None:
        for text in texts:
            self.emit(level, text)


_sink: _Sink | None = None


def one_line(text: str) -> str:
    """``text`` with every character of Unicode category C* or Z* other than the space
    (controls such as a newline or ESC, bidi overrides, line separators) written as a Python
    escape (``\\x0a``, ``\\x1b``, ``\\u202e``), never raw.

    A log record is one line: a value in it (a program's path, which any local user can
    choose) must not start a forged line of the agent's own in the journal. Every line
    keyagent-ctl and keyagent print goes through here too (:func:`keyagent.client.shown`),
    so that nothing can clear the screen, set the window title or reorder what the user
    reads.
    """
    if text.isprintable():  # the common case, in C: nothing to escape
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def to_stderr(level: int) -> None:
    """Send records at ``level`` and above to stderr as ``keyagent[PID]: LEVEL: message``."""
    prefix = f"keyagent[{os.getpid()}]: "

    def emit(level: int, text: str) -> None:
        emit_many(level, [text])

    def emit_many(level: int, texts: list[str]) -> None:
        start = f"{prefix}{_LEVEL_NAMES.get(level, level)}: "
        try:
            sys.stderr.write("".join(f"{start}{text}\n" for text in texts))
            sys.stderr.flush()
        except (OSError, ValueError):
            pass  # a closed terminal must not take the agent down

    global _sink  # noqa: PLW0603  # one process-wide destination, set once at start-up
    _sink = _Sink(level, emit, emit_many)


def to_syslog(level: int, *, errors_fd: int | None = None) -> None:
    """Send records at ``level`` and above to syslog (authpriv), as ``keyagent[PID]``; with
    ``errors_fd``, errors to that descriptor as well (``keyagent CMD``'s stderr, kept for
    this alone: nothing else the process writes reaches it)."""
    import syslog

    syslog.openlog("keyagent", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
    priorities = {
        DEBUG: syslog.LOG_DEBUG, INFO: syslog.LOG_INFO, WARNING: syslog.LOG_WARNING,
        ERROR: syslog.LOG_ERR,
    }  # fmt: skip

    def emit(level: int, text: str) -> None:
        # syslog() wants text it can encode: escape lone surrogates (undecodable paths).
        safe = text.encode("utf-8", "backslashreplace").decode("utf-8")
        with contextlib.suppress(OSError, ValueError):  # logging must not stop the agent
            syslog.syslog(priorities.get(level, syslog.LOG_ERR), safe)
        if errors_fd is not None and level >= ERROR:
            line = f"{prefix}{_LEVEL_NAMES.get(level, level)}: {text}\n"
            with contextlib.suppress(OSError):  # nor a closed terminal
                os.write(errors_fd, line.encode("utf-8", "backslashreplace"))

    prefix = f"keyagent[{os.getpid()}]: "
    global _sink  # noqa: PLW0603  # one process-wide destination, set once at start-up
    _sink = _Sink(level, emit)


class Logger:
    """A named logger; see the module docstring for where its records go.

    ``floor``: records at this level and above reach the serving process's sink even when
    its level is higher (the audit trail reaches syslog at info from a background agent
    that otherwise logs warnings only).
    """

    __slots__ = ("_std", "floor", "name")

    def __init__(self, name: str, floor: int | None = None) -> None:
        self.name = name
        self.floor = floor
        self._std: StdLogger | None = None

    def __repr__(self) -> str:
        return f"Logger({self.name!r})"

    def _standard(self) -> StdLogger:
        if self._std is None:
            import logging

            self._std = logging.getLogger(self.name)
        return self._std

    def isEnabledFor(self, level: int) -> bool:  # the name logging uses
        sink = _sink
        if sink is None:
            return self._standard().isEnabledFor(level)
        return level >= sink.level or (self.floor is not None and level >= self.floor)

    def log(self, level: int, msg: str, *args: object) -> None:
        sink = _sink
        if sink is None:
            std = self._standard()
            if std.isEnabledFor(level):
                std.log(level, msg, *args, stacklevel=3)
        elif level >= sink.level or (self.floor is not None and level >= self.floor):
            try:
                text = msg % args if args else msg
            except (TypeError, ValueError):
                text = f"{msg} (unformattable arguments)"
            sink.emit(level, one_line(text))

    def log_many(self, level: int, texts: list[str]) -> None:
        """Several records of one level, already formatted, written together."""
        sink = _sink
        if sink is None:
            for text in texts:
                self.log(level, "%s", text)
        elif level >= sink.level or (self.floor is not None and level >= self.floor):
            sink.emit_many(level, [one_line(text) for text in texts])

    def debug(self, msg: str, *args: object) -> None:
        self.log(DEBUG, msg, *args)

    def info(self, msg: str, *args: object) -> None:
        self.log(INFO, msg, *args)

    def warning(self, msg: str, *args: object) -> None:
        self.log(WARNING, msg, *args)

    def error(self, msg: str, *args: object) -> None:
        self.log(ERROR, msg, *args)


def get_logger(name: str, *, floor: int | None = None) -> Logger:
    return Logger(name, floor)
