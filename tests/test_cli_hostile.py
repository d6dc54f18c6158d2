"""keyagent-ctl against an agent (or a service behind it) that answers hostile values.

The real agent refuses control characters in what it is handed, so these tests put a small
fake agent on a real socket: it answers every request with a crafted reply line, as a
hostile Conduce service (through the agent) or a process in the agent's place could.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import keyagent
import keyagent.errors

from .conftest import run_ctl, run_ctl_process

ESCAPES = "\x1b[2J\x1b]0;owned\x07"  # clear the screen, set the window title
BIDI = "\u202eevil"  # right-to-left override
SEPARATOR = "a\u2028b"  # a line separator, a Z* character


def assert_safe(text: str) -> None:
    """No raw control, bidi or separator character (newlines between lines aside). Not
    ``splitlines()``: it splits on the very separators this must catch."""
    unsafe = [char for char in text if char != "\n" and not char.isprintable()]
    assert not unsafe, repr(text)


Answer = Callable[[dict[str, Any]], dict[str, Any]]


class FakeAgent:
    """A Unix socket server in a thread: each request line gets ``answer(request)`` back,
    with the request's id, until the test ends. With ``one_reply`` each connection is closed
    after its first reply: that also ends a ``log --follow`` that would otherwise wait for
    entries (a follower that took a bad entry without a word then stops at the closed
    connection instead)."""

    def __init__(self, path: str, answer: Answer, *, one_reply: bool = False) -> None:
        self.path = path
        self.answer = answer
        self.one_reply = one_reply
        self.requests: list[dict[str, Any]] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # the listener was closed: the test is over
                return
            with connection:
                buffer = b""
                replied = False
                while not (replied and self.one_reply):
                    chunk = connection.recv(65536)
                    if not chunk:
                        break
                    buffer += chunk
                    while b"\n" in buffer and not (replied and self.one_reply):
                        line, _, buffer = buffer.partition(b"\n")
                        request = json.loads(line)
                        self.requests.append(request)
                        reply = {"id": request.get("id"), **self.answer(request)}
                        connection.sendall(json.dumps(reply).encode() + b"\n")
                        replied = True

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the fake agent did not stop"


@pytest.fixture
def fake_agent(tmp_path: Path) -> Iterator[Callable[[Answer], FakeAgent]]:
    """Start fake agents answering as told; each is closed at the end of the test."""
    started: list[FakeAgent] = []

    def start(answer: Answer) -> FakeAgent:
        directory = tmp_path / f"fake{len(started)}"
        directory.mkdir(mode=0o700)
        agent = FakeAgent(str(directory / "agent.sock"), answer)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.close()


def ok(result: dict[str, Any]) -> Answer:
    return lambda request: {"ok": True, "result": result}


HOSTILE_REMOTE = {
    "remote": [
        {
            "masked": "KA-1\x1b[31m…9z",
            "created": f"2026-01-01{ESCAPES}",
            "held": True,
            "key_id": "0123456789ab",
            "description": f"laptop{BIDI}{SEPARATOR}",
        }
    ],
    "keys": [
        {
            "key_id": "0123456789ab",
            "host": "h.example",
            "user": "u@example.com",
            "source": "create",
            "stale": True,
            "description": f"stale{ESCAPES}",
        }
    ],
}


def test_list_remote_escapes_what_the_service_sent_and_json_stays_exact(
    fake_agent: Callable[[Answer], FakeAgent],
) -> None:
    """list --remote shows a service's escapes and bidi characters escaped; --json is exact."""
    agent = fake_agent(ok(HOSTILE_REMOTE))
    table = run_ctl(agent.path, "--host", "h.example", "--user", "u@example.com", "list-api-keys")
    assert table.code == 0, table.err
    assert_safe(table.out)
    assert "\\x1b[2J\\x1b]0;owned\\x07" in table.out
    assert "laptop\\u202eevila\\u2028b" in table.out
    assert "KA-1\\x1b[31m…9z" in table.out  # non-ASCII but printable text stays as it is
    assert "stale\\x1b[2J" in table.out
    as_json = run_ctl(
        agent.path, "--host", "h.example", "--user", "u@example.com", "list", "--remote", "--json"
    )
    assert json.loads(as_json.out) == HOSTILE_REMOTE


def test_list_and_status_escape_every_value_from_the_agent(
    fake_agent: Callable[[Answer], FakeAgent],
) -> None:
    """The held-key table and status print the agent's values with control characters escaped."""
    held = {
        "keys": [
            {
                "key_id": "0123456789ab",
                "host": "h\x1b[8m",
                "user": f"u{BIDI}",
                "expires": f"soon{ESCAPES}",
                "source": "add\x9b",
                "description": f"d{SEPARATOR}",
            }
        ]
    }
    status = {
        "pid": 1,
        "socket": f"/run/{ESCAPES}",
        "version": f"1{BIDI}",
        "uptime": "3\x00",
        "locked": False,
        "keys": 1,
        "sessions": [{"user": f"u{ESCAPES}", "host": "h\u2066", "logged_in": True, "since": "\r"}],
    }

    def answer(request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "result": held if request["op"] == "list" else status}

    agent = fake_agent(answer)
    listed = run_ctl(agent.path, "list")
    assert listed.code == 0, listed.err
    assert_safe(listed.out)
    assert "h\\x1b[8m" in listed.out
    assert "\\x9b" in listed.out
    shown = run_ctl(agent.path, "status")
    assert shown.code == 0, shown.err
    assert_safe(shown.out)
    assert "/run/\\x1b[2J" in shown.out
    assert "since \\x0d" in shown.out
    assert "3\\x00s" in shown.out
    assert json.loads(run_ctl(agent.path, "status", "--json").out) == status


def test_messages_of_the_agent_and_its_results_are_escaped(
    fake_agent: Callable[[Answer], FakeAgent],
) -> None:
    """An error message, a key id or an expiry that carries escapes reaches the screen escaped."""

    def answer(request: dict[str, Any]) -> dict[str, Any]:
        if request["op"] == "add":
            return {"ok": True, "result": {"key_id": f"ab{ESCAPES}", "expires": BIDI}}
        if request["op"] == "hello":
            return {"ok": True, "result": {"version": ESCAPES, "protocol": BIDI}}
        message = f"the service said: {ESCAPES}{BIDI}"
        return {"ok": False, "error": {"code": f"remote_error{ESCAPES}", "message": message}}

    agent = fake_agent(answer)
    added = run_ctl(agent.path, "--host", "h", "--user", "u", "add", stdin="k3y\n")
    assert added.code == 0, added.err
    assert_safe(added.out)
    assert "ab\\x1b[2J" in added.out
    assert "\\u202eevil" in added.out
    hello = run_ctl(agent.path, "hello")
    assert_safe(hello.out)
    failed = run_ctl(agent.path, "--host", "h", "--user", "u", "logout")
    assert failed.code == 1
    assert_safe(failed.err)
    assert "the service said: \\x1b[2J\\x1b]0;owned\\x07\\u202eevil" in failed.err


def test_exec_refuses_a_key_with_a_nul_before_exec(
    fake_agent: Callable[[Answer], FakeAgent],
) -> None:
    """A key containing NUL (or a control character) never reaches exec: exit 1, a message."""
    for key in ("abc\x00def", "abc\x1b[2Jdef"):
        agent = fake_agent(ok({"key": key}))
        env = {**os.environ, "KEYAGENT_SOCK": agent.path}
        # As a process: were the key passed on, exec would replace the test runner.
        result = run_ctl_process(["exec", "--", "echo", "ran"], env=env)
        assert result.returncode == 1, result.stderr
        assert "no API key has" in result.stderr
        assert "Traceback" not in result.stderr
        assert "abc" not in result.stderr
        assert result.stdout == ""


def test_get_never_prints_a_key_no_api_key_could_be(
    fake_agent: Callable[[Answer], FakeAgent],
) -> None:
    """A process answering in the agent's place with escapes in the "key": get prints
    nothing (exit 1, bad_reply), and keyagent.get_key raises, as exec refuses it."""
    agent = fake_agent(ok({"key": "ab\x1b]0;PWNED\x07\x1b[2Jcd"}))
    got = run_ctl(agent.path, "get")
    assert got.code == 1
    assert got.out == ""
    assert "[bad_reply]" in got.err
    assert "\x1b" not in got.err
    with pytest.raises(keyagent.errors.ProtocolError):
        keyagent.get_key(socket_path=agent.path)


def test_a_refusal_left_by_a_closed_agent_is_raised_as_itself(tmp_path: Path) -> None:
    """A request that cannot be sent because the agent closed the connection after a
    refusal with no id (busy, say, which is sent as a connection is accepted): the client
    raises that refusal, read from what the agent left, rather than 'could not send'
    (exit 2, which means no agent at all)."""
    directory = tmp_path / "refusing"
    directory.mkdir(mode=0o700)
    path = str(directory / "agent.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve_once_then_refuse() -> None:
        connection, _ = listener.accept()
        with connection:
            request = json.loads(connection.recv(65536))
            answer = {"id": request["id"], "ok": True, "result": {}}
            refusal = {"id": None, "ok": False, "error": {"code": "busy", "message": "full"}}
            connection.sendall(f"{json.dumps(answer)}\n{json.dumps(refusal)}\n".encode())

    server = threading.Thread(target=serve_once_then_refuse)
    server.start()
    with listener, keyagent.Client(path, timeout=10) as client:
        assert client.status() == {}
        server.join(10)
        assert not server.is_alive()  # the connection is closed: the next send fails
        with pytest.raises(keyagent.errors.Busy, match="full"):
            client.status()
