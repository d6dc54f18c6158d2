"""Process hardening shared by the agent's serving process and its HTTP workers: no core
dumps, no ptrace or /proc/PID/mem for the user's other processes, a recognisable name.

Both hold secrets (the agent all of them, a worker those it was lent), and both are fresh
interpreters (``execve`` resets the dumpable flag), so each calls :func:`harden` itself.
"""

from __future__ import annotations

import ctypes
import os
import resource

from keyagent.log import get_logger

__all__ = ["harden", "hardening_problems", "tracer_pid"]

log = get_logger("keyagent")

PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15


def harden(max_connections: int, name: bytes = b"keyagent") -> None:
    """No core dumps, no ptrace by other processes of the user, enough descriptors.

    Runs in the process itself: ``execve`` resets the dumpable flag. Also names the process
    (``pgrep keyagent``, ``top``): after the exec it would be called after the interpreter.
    """
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, name, 0, 0, 0)
    # Non-dumpable: no core file, and /proc/<pid>/mem and ptrace are closed to the user's
    # other processes, which could otherwise read every key out of memory.
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("could not make the agent non-dumpable: %s", os.strerror(ctypes.get_errno()))
    for problem in hardening_problems(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0), tracer_pid()):
        log.warning("%s", problem)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + 64
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < wanted:
            log.warning(
                "descriptor limit %d allows fewer than %d connections", target, max_connections
            )


def tracer_pid() -> int:
    """The pid of the process tracing this one (``TracerPid`` in /proc/self/status), 0 if none
    or unknown."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"TracerPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def hardening_problems(dumpable: int, tracer: int) -> list[str]:
    """What the hardening read back says is wrong: the agent stays dumpable, or a process
    attached before it started (it keeps its access: hardening cannot undo an attach)."""
    problems = []
    if dumpable != 0:
        problems.append(
            "the agent is still dumpable: processes of your user may read keys from its "
            "memory; check the kernel's ptrace and core-dump settings"
        )
    if tracer != 0:
        problems.append(
            f"the agent is being traced by pid {tracer}, which can read every key it will "
            "hold; stop that process and restart the agent unless you started the tracer"
        )
    return problems
