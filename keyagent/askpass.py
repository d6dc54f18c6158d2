"""Asking the user to confirm a use of a key (``add --confirm``), like ``ssh-add -c``.

The agent runs the askpass program (``$KEYAGENT_ASKPASS`` or config ``askpass``, checked and
fixed at start-up) with one argument, the question; exit status 0 means "allow". It runs on
a worker thread of its own (the ``confirm`` queue), never on the event loop, in a session
and process group of its own, so that a program left unanswered is killed whole when the
time is up. Its standard input is ``/dev/null``; nothing secret is in its argument or its
environment (a short list of the agent's variables a dialog needs, see :data:`PASSED_ENV`).
"""

from __future__ import annotations

import contextlib
import os
import signal

from keyagent.errors import Denied
from keyagent.log import get_logger

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = ["MAX_QUESTION", "PASSED_ENV", "printable", "run_askpass"]

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


def run_askpass(program: str, question: str, timeout: float) -> None:
    """Ask ``question`` through ``program``; return if it exits 0, else raise
    :class:`~keyagent.errors.Denied` saying why (refused, failed, no answer in time).

    Blocks for up to ``timeout`` seconds: call it on a worker thread.
    """
    import subprocess  # loads with the first confirmation, never in an agent without one

    environment = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
    environment["SSH_ASKPASS_PROMPT"] = "confirm"  # ssh-askpass shows yes/no, not a text field
    try:
        process = subprocess.Popen(
            [program, question[:MAX_QUESTION]],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=environment,
            close_fds=True,
            start_new_session=True,  # its own process group: killed whole on timeout
        )
    except OSError as error:
        log.warning("the askpass program %s could not be run: %s", program, error.strerror)
        raise Denied(
            f"the askpass program {program} could not be run "
            f"({os.strerror(error.errno or 0)}); fix it or set another with KEYAGENT_ASKPASS "
            "or config askpass, then retry"
        ) from None
    try:
        status = process.wait(timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process.pid)
        process.wait()
        raise Denied(
            f"no answer to the confirmation within {timeout:g} s; answer the askpass dialog "
            "when it shows, or raise confirm_timeout in the agent's config"
        ) from None
    finally:
        if process.returncode is None:  # interrupted otherwise: leave nothing behind
            _kill_group(process.pid)
            process.wait()
    _kill_group(process.pid)  # helpers it left behind in its group
    if status != 0:
        raise Denied(
            "refused at the confirmation prompt; the next use asks again"
            if status > 0
            else f"the askpass program was killed by signal {-status}, so the use was refused;"
            " the next use asks again"
        )


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
