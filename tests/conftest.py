"""Fixtures and helpers shared by the tests, and the Hypothesis profiles they run under."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest
from hypothesis import HealthCheck, settings

from keyagent import cli, protocol
from keyagent.testing.agent import AgentProcess
from keyagent.testing.emulator_process import Emulator, EmulatorProcess

# The shipped contract suite is made of plain asserts: have pytest explain them as it does in
# test files. (Before the first import of the module, which nothing above imports.)
pytest.register_assert_rewrite("keyagent.testing.account_contract")

AgentFactory = Callable[..., AgentProcess]

# --- Hypothesis --------------------------------------------------------------------------------
# CI must not depend on an earlier run: there, examples come from a fixed seed (derandomize)
# and no example database is read or written, so a red build is red again on re-run and on
# another machine. A failure found on a developer's machine (where the "dev" profile keeps the
# usual random search and its database in .hypothesis/, which git ignores) is committed as an
# explicit @example on the test, never as a database.
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None)


def hypothesis_profile(environ: Mapping[str, str]) -> str:
    """The profile to load: $HYPOTHESIS_PROFILE if set, else "ci" under CI=true, else "dev"."""
    chosen = environ.get("HYPOTHESIS_PROFILE")
    if chosen:
        return chosen
    return "ci" if environ.get("CI", "").lower() not in ("", "0", "false", "no") else "dev"


settings.load_profile(hypothesis_profile(os.environ))


@pytest.fixture(autouse=True)
def no_user_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the developer's own ~/.config/keyagent/config.toml out of every test."""
    monkeypatch.setenv("KEYAGENT_CONFIG", "/dev/null")


@pytest.fixture(autouse=True)
def private_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the agents' state files (the leftovers file) out of the developer's home."""
    state = tmp_path / "state-home"
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    return state


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[AgentFactory]:
    """Start agents with chosen flags; each is stopped at the end of the test."""
    started: list[AgentProcess] = []

    def start(
        *args: str, name: str = "agent", env: dict[str, str] | None = None, debug: bool = True
    ) -> AgentProcess:
        directory = tmp_path / name
        process = AgentProcess(directory, args, env=env, debug=debug).start()
        started.append(process)
        return process

    yield start
    problems = [problem for process in started for problem in stop_and_check(process)]
    assert not problems, "\n".join(problems)


def stop_and_check(process: AgentProcess) -> list[str]:
    """Stop ``process``; what went wrong with it unseen by the test's own checks: an agent
    still running must stop cleanly at SIGTERM, and no agent may have logged a bug."""
    problems = []
    running = process.process is not None and process.process.poll() is None
    status = process.stop()
    if running and status != 0:
        problems.append(f"{process.directory.name}: exit status {status} at SIGTERM")
    log = process.log()
    if "internal error" in log or "Traceback" in log:
        problems.append(f"{process.directory.name} logged a bug:\n{log}")
    return problems


@pytest.fixture
def agent(agent_factory: AgentFactory) -> AgentProcess:
    """A running agent with default settings."""
    return agent_factory()


@pytest.fixture(scope="module")
def module_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """One agent with default settings for a whole test module; use it through shared_agent.

    Starting and stopping agents is a third of the suite's time, and most command-line and
    client tests only read what an agent holds. A module may override this fixture (asking
    for it by name) to put keys in once.
    """
    # Set here, not by no_user_config: a module fixture starts before any function's patch.
    env = {**os.environ, "KEYAGENT_CONFIG": "/dev/null"}
    env["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("module-state"))
    process = AgentProcess(tmp_path_factory.mktemp("module-agent"), env=env).start()
    try:
        yield process
    finally:
        problems = stop_and_check(process)
    assert not problems, "\n".join(problems)


def agent_state(agent: AgentProcess) -> tuple[object, object]:
    """What a test could change in a running agent: its lock, the keys it holds.

    (A stopped agent makes this raise: it cannot be asked.)"""
    with agent.client() as client:
        status = client.status()
        keys = client.list() if not status["locked"] else []
    return status["locked"], keys


@pytest.fixture
def shared_agent(module_agent: AgentProcess) -> Iterator[AgentProcess]:
    """The module's agent, for a test that only reads it: checked to be unchanged after."""
    before = agent_state(module_agent)
    yield module_agent
    assert agent_state(module_agent) == before, "a test given shared_agent changed the agent"


# --- replies -----------------------------------------------------------------------------------


def decode(line: bytes) -> dict[str, Any]:
    """A reply line as a dict, after checking it is a well-formed protocol v1 reply."""
    assert line, "the agent closed the connection instead of replying"
    protocol.parse_reply(line)
    value = json.loads(line)
    assert isinstance(value, dict)
    return value


def error_code(reply: Mapping[str, Any]) -> str:
    """The error code of a refusal; fails the test if the reply is a success."""
    assert reply["ok"] is False, reply
    return str(reply["error"]["code"])


class Raw:
    """A bare socket to the agent, for sending bytes a real client never would."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        """The next reply line (without newline); b"" if the agent closed the connection."""
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                rest, self.buffer = self.buffer, b""
                return rest
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def reply(self) -> dict[str, Any]:
        """The next reply, decoded and checked as a protocol v1 reply."""
        return decode(self.line())

    def closed_by_peer(self) -> bool:
        """Wait (up to the socket timeout) for the agent to close; True if it did."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(agent: AgentProcess) -> Iterator[Callable[..., Raw]]:
    """Open bare sockets to the default agent; all are closed at the end."""
    opened: list[Raw] = []

    def connect(path: str | None = None, timeout: float = 10.0) -> Raw:
        connection = Raw(path or agent.socket_path, timeout)
        opened.append(connection)
        return connection

    yield connect
    for connection in opened:
        connection.close()


# --- keys ---------------------------------------------------------------------------------------

COLLIDING_KEYS: Final = ("KA-4bf6ae", "KA-1ff55bd")
"""Two secrets whose SHA-256 digests share their first 48 bits, so their 12-digit key ids
agree (55d74bcc33ef) while their digests differ; found by brute force in a minute."""


@dataclass
class CtlResult:
    code: int
    out: str
    err: str


def run_ctl(socket_path: str | None, *argv: str, stdin: str = "") -> CtlResult:
    """Run keyagent-ctl in this process through cli.main(argv)."""
    out, err = io.StringIO(), io.StringIO()
    args = ["--socket", socket_path, *argv] if socket_path else list(argv)
    code = cli.main(args, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return CtlResult(code, out.getvalue(), err.getvalue())


def agent_status(agent: AgentProcess) -> dict[str, Any]:
    """``keyagent-ctl status --json`` of ``agent``, which must succeed."""
    result = run_ctl(agent.socket_path, "status", "--json")
    assert result.code == 0, result.err
    parsed: dict[str, Any] = json.loads(result.out)
    return parsed


def run_ctl_process(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    stdin: str = "",
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """Run keyagent-ctl as its own process (python -m keyagent)."""
    return subprocess.run(
        [sys.executable, "-m", "keyagent", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else dict(os.environ),
        check=False,
    )


NOBODY = 65534


def request_as_nobody(path: str, line: bytes, timeout: float = 10.0) -> bytes:
    """Send ``line`` to the socket at ``path`` from a forked child running as ``nobody``.

    Forking (rather than starting an interpreter as nobody, which may not be able to read
    the Python install) keeps the test's own modules. Returns the first reply line, or a
    description of what went wrong in the child.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(path)
            # The agent may refuse (and close) before this request even arrives.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(line)
            data = b""
            # A peer closed unanswered (the HTTP socket's way) may show as a reset.
            with contextlib.suppress(ConnectionResetError):
                while b"\n" not in data and (chunk := sock.recv(4096)):
                    data += chunk
            os.write(write_end, data or b"<closed without reply>")
            code = 0
        except OSError as error:
            os.write(write_end, f"child failed: {error!r}".encode())
        finally:
            os._exit(code)
    os.close(write_end)
    answer = b""
    while chunk := os.read(read_end, 4096):
        answer += chunk
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, answer
    return answer.splitlines()[0]


def wait_until(
    check: Callable[[], bool], what: str, timeout: float = 20.0, *, pause: float = 0.0
) -> None:
    """Repeat ``check`` (a round trip to an agent or an emulator: that is the wait) until it
    holds, failing after ``timeout`` seconds. A check that is no round trip (it reads a file
    or /proc) gives a ``pause`` between tries: spinning on it would starve the very process
    it waits for on a machine of two cores."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(pause)


@pytest.fixture
def open_agent() -> Iterator[AgentProcess]:
    """An agent whose sockets (agent.sock and http.sock) any user can reach: only the
    peer-uid check guards them."""
    # Not under tmp_path: pytest's base temp directory is private to root.
    directory = tempfile.mkdtemp(prefix="keyagent-open-")
    agent = AgentProcess(os.path.join(directory, "agent")).start()
    os.chmod(directory, 0o755)
    os.chmod(agent.directory, 0o755)
    os.chmod(agent.socket_path, 0o666)
    os.chmod(os.path.join(agent.directory, "http.sock"), 0o666)
    yield agent
    agent.stop()
    shutil.rmtree(directory)


@pytest.fixture
def emulator(request: pytest.FixtureRequest) -> Iterator[Emulator]:
    """A loopback HTTPS Conduce emulator process with the test module's account (its
    ``USER`` and ``PASSWORD``), stopped after the test."""
    with EmulatorProcess(request.module.USER, request.module.PASSWORD) as emu:
        yield emu


@pytest.fixture
def conduce_agent(agent_factory: AgentFactory, emulator: Emulator) -> AgentProcess:
    """An agent that trusts the emulator's throw-away CA."""
    return agent_factory(
        "--ca-bundle", emulator.ca_path, "--read-timeout", "5", "--connect-timeout", "5"
    )


ASKPASS = """#!/bin/sh
# What the test wants answered is in the file "mode" beside this script.
here=$(dirname "$0")
printf '%s\\n' "$1" >> "$here/questions"
case $(cat "$here/mode") in
  allow) exit 0 ;;
  refuse) exit 1 ;;
  hang) echo $$ > "$here/hanging"; sleep 300 ;;
esac
exit 2
"""
"""A test askpass program: answers as the file "mode" beside it says, records each question
in "questions", and when hanging writes its pid to the FIFO "hanging"."""


@pytest.fixture
def askpass_dir(tmp_path: Path) -> Path:
    """A private directory holding the test askpass program ("ask"), set to allow."""
    directory = tmp_path / "askpass"
    directory.mkdir(mode=0o700)
    program = directory / "ask"
    program.write_text(ASKPASS)
    program.chmod(0o700)
    (directory / "mode").write_text("allow")
    os.mkfifo(directory / "hanging", 0o600)
    return directory
