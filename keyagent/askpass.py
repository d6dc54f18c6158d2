"""Asking the user to confirm a use of a key (``add --confirm``), like ``ssh-add -c``.

The agent runs the askpass program (``$KEYAGENT_ASKPASS`` or config ``askpass``, checked and
fixed at start-up) with one argument, the question; exit status 0 means "allow". It runs on
a worker thread of its own (the ``confirm`` queue), never on the event loop, in a session
and process group of its own, so that a program left unanswered is killed whole when the
time is up or the agent stops (:class:`Dialogs`). Its standard input is ``/dev/null``;
nothing secret is in its argument or its environment (a short list of the agent's
variables a dialog needs, see :data:`PASSED_ENV`).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time

from keyagent.errors import Denied
from keyagent.log import get_logger

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = ["MAX_QUESTION", "PASSED_ENV", "STOPPING", "Dialogs", "printable"]

log = get_logger("keyagent.askpass")

PASSED_ENV: Final = (
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE",
    "LC_MESSAGES", "DISPLAY", "WAYLAND_DISPLAY", "XAUTHORITY", "XDG_RUNTIME_DIR",
    "DBUS_SESSION_BUS_ADDRESS", "TERM", "TMPDIR",
)  # fmt: skip
"""The variables of the agent's environment an askpass program sees: what a graphical or
terminal dialog needs to show itself, nothing else."""
MAX_QUESTION: Final = 2048
"""The longest question passed to the program, in characters."""


def printable(text: str, limit: int = 256) -> str:
    """``text`` without control, format or separator characters (a description or a path
    could otherwise rewrite the dialog or the terminal), cut to ``limit`` characters."""
    kept = "".join(char if char.isprintable() else " " if char.isspace() else "" for char in text)
    return kept if len(kept) <= limit else kept[: limit - 3] + "..."


class Dialogs:
    """The askpass programs one agent has running: each started, waited for and ended here,
    and every one still running ended at once when the agent stops (:meth:`close`), so no
    dialog stays on the user's screen asking about a key the agent no longer serves.

    A program's process group is killed before its leader is reaped, never after: until it
    is reaped, its pid (the group's id) cannot name another process or group.
    """

    def __init__(self) -> None:
        self._running: set[int] = set()
        """Process group ids (the leaders' pids) of programs started and not yet reaped."""
        self._guard = threading.Lock()
        self._closed = threading.Event()

    def ask(self, program: str, question: str, timeout: float) -> None:
        """Ask ``question`` through ``program``; return if it exits 0, else raise
        :class:`~keyagent.errors.Denied` saying why (refused, failed, no answer in time, the
        agent stopping).

        Blocks for up to ``timeout`` seconds: call it on a worker thread.
        """
        import subprocess  # loads with the first confirmation, never in an agent without one

        environment = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
        environment["SSH_ASKPASS_PROMPT"] = "confirm"  # ssh-askpass: yes/no, not a text field
        if self._closed.is_set():
            raise Denied(STOPPING)
        try:
            # Started outside the lock: close(), on the event loop, must never wait for an
            # exec (a program on a hung network mount, say).
            process = subprocess.Popen(
                [program, question[:MAX_QUESTION]],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=environment,
                close_fds=True,
                start_new_session=True,  # its own process group: ended whole
            )
        except OSError as error:
            log.warning("the askpass program %s could not be run: %s", program, error.strerror)
            raise Denied(
                f"the askpass program {program} could not be run "
                f"({os.strerror(error.errno or 0)}); fix it or set another with "
                "KEYAGENT_ASKPASS or config askpass, then retry"
            ) from None
        with self._guard:
            self._running.add(process.pid)
            closing = self._closed.is_set()  # close() ran while it started: it ends now
        try:
            answered = not closing and _exited_within(process.pid, timeout)
        finally:
            # Answered or not (or this thread interrupted): the group goes, helpers it left
            # behind included, and only then is the leader reaped.
            with self._guard:
                _kill_group(process.pid)
                self._running.discard(process.pid)
                closed = self._closed.is_set()
            status = process.wait()
        if not answered:
            raise Denied(
                STOPPING
                if closed
                else f"no answer to the confirmation within {timeout:g} s; answer the askpass "
                "dialog when it shows, or raise confirm_timeout in the agent's config"
            )
        if status != 0:
            raise Denied(
                STOPPING
                if closed and status == -signal.SIGKILL
                else "refused at the confirmation prompt; the next use asks again"
                if status > 0
                else f"the askpass program was killed by signal {-status}, so the use was "
                "refused; the next use asks again"
            )

    def close(self) -> None:
        """The agent is stopping: end every program still running, and start no more."""
        with self._guard:
            self._closed.set()
            for pgid in self._running:
                _kill_group(pgid)


STOPPING: Final = "the agent is stopping, so the use was not confirmed and was refused"


def _exited_within(pid: int, timeout: float) -> bool:
    """Whether child ``pid`` exits within ``timeout`` seconds; it is left unreaped."""
    try:
        handle = os.pidfd_open(pid)
    except OSError:  # no pidfd_open (Linux before 5.3): wait without reaping, by polling
        return _polled_exit(pid, timeout)
    try:
        # poll, not select: a busy agent has descriptors past select's limit of 1024.
        poller = select.poll()
        poller.register(handle, select.POLLIN)
        return bool(poller.poll(max(timeout, 0.0) * 1000))
    finally:
        os.close(handle)


def _polled_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(left, 0.05))


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
