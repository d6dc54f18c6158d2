"""Start a real ``keyagent`` process for tests, and wait on it without sleeping.

Other projects can use it to test their own tools against a real agent::

    with AgentProcess(tmp_path) as agent:
        agent.client().add("app.conduce.com", "me@example.com", "k3y")
        run_my_tool(env={"KEYAGENT_SOCK": agent.socket_path})
"""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from keyagent.client import Client


class AgentStartError(RuntimeError):
    """The agent process did not come up; the message carries its log."""


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` (not necessarily our child) has exited; True if it did."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)


def read_line(stream: int, timeout: float) -> bytes:
    """Read one line from a pipe file descriptor within ``timeout`` seconds (b"" on EOF)."""
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no complete line within {timeout}s (got {data!r})")
        readable, _, _ = select.select([stream], [], [], remaining)
        if not readable:
            continue
        chunk = os.read(stream, 1)
        if not chunk:
            return data
        data += chunk
    return data


class AgentProcess:
    """A ``keyagent -d`` (or, without ``debug``, ``-D``) process in the foreground, on a socket
    in ``directory``; its log goes to ``directory/agent.log``."""

    def __init__(
        self,
        directory: Path | str,
        args: Sequence[str] = (),
        *,
        env: dict[str, str] | None = None,
        socket_name: str = "agent.sock",
        start_timeout: float = 20.0,
        debug: bool = True,
        wrapper: Sequence[str] = (),
    ) -> None:
        self.directory = Path(directory)
        self.wrapper = list(wrapper)
        """A command the agent runs under, e.g. ``["strace", "-f", "-o", "/dev/null"]``."""
        self.socket_path = str(self.directory / socket_name)
        self.log_path = self.directory / "agent.log"
        self.args = list(args)
        self.env = env
        self.start_timeout = start_timeout
        self.debug = debug
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None  # noqa: S101
        return self.process.pid

    def start(self) -> AgentProcess:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        env = dict(os.environ if self.env is None else self.env)
        env.pop("KEYAGENT_SOCK", None)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    *self.wrapper,
                    sys.executable,
                    "-m",
                    "keyagent.daemon",
                    "-d" if self.debug else "-D",
                    "-a",
                    self.socket_path,
                    *self.args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
            )
        assert self.process.stdout is not None  # noqa: S101
        # -d prints the shell lines once the socket is bound and listening.
        try:
            first = read_line(self.process.stdout.fileno(), self.start_timeout)
        except TimeoutError:
            first = b""
        if not first.startswith(b"KEYAGENT_SOCK="):
            self.stop()
            raise AgentStartError(f"agent did not start; log:\n{self.log()}")
        return self

    def client(self, timeout: float | None = 30.0) -> Client:
        return Client(self.socket_path, timeout=timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        """Terminate the agent (if running) and return its exit status."""
        process = self.process
        if process is None:
            return None
        # Under a wrapper (strace), the agent is the wrapper's child: a wrapper stopped first
        # may detach and leave it running, so the agent is stopped first, by its own pid.
        served_by = self._served_by() if self.wrapper and process.poll() is None else None
        if served_by is not None and served_by != process.pid:
            _end(served_by, timeout)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()
        return process.returncode

    def _served_by(self) -> int | None:
        """The pid of the process that answers on the agent's socket (SO_PEERCRED)."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(self.socket_path)
                credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        except OSError:
            return None
        pid: int = struct.unpack("3i", credentials)[0]
        return pid

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _end(pid: int, timeout: float) -> None:
    """SIGTERM to ``pid``, not a child of this process, and wait (a pidfd) until it is gone;
    SIGKILL after ``timeout``."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                signal.pidfd_send_signal(pidfd, sig)
            except ProcessLookupError:
                return
            readable, _, _ = select.select([pidfd], [], [], timeout)
            if readable:
                return
    finally:
        os.close(pidfd)
