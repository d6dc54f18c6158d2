"""The audit log end to end: a real agent process, keyagent-ctl log (table, --json, -n,
--follow), followers that another client's requests feed, a follower that stops reading,
the lock, the reply memo, and the audit_entries setting."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keyagent.agent import Agent, Peer
from keyagent.server import Limits
from keyagent.store import key_id_for
from keyagent.testing.agent import AgentProcess, read_line

from .conftest import AgentFactory, Raw, decode, request_as_nobody, run_ctl, run_ctl_process
from .fakes import FakeTime
from .test_server_races import serving

SECRET = "audit-e2e-S3CR3T"
HOST = "app.conduce.com"
USER = "ada@example.com"
DEADLINE = 20.0


def ctl_env(agent: AgentProcess) -> dict[str, str]:
    return {**os.environ, "KEYAGENT_SOCK": agent.socket_path, "KEYAGENT_CONFIG": "/dev/null"}


def add_key(agent: AgentProcess, key: str = SECRET) -> str:
    with agent.client() as client:
        return str(client.add(HOST, USER, key)["key_id"])


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


class Follower:
    """``keyagent-ctl log --follow`` as a process whose output the test reads line by line."""

    def __init__(self, agent: AgentProcess, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "keyagent", "log", "--follow", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ctl_env(agent),
        )

    def line(self) -> str:
        """The next line it prints, waited for up to DEADLINE seconds."""
        assert self.process.stdout is not None
        text = read_line(self.process.stdout.fileno(), DEADLINE).decode()
        assert text.endswith("\n"), f"the follower ended: {self.stop()}"
        return text

    def stop(self) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        _, err = self.process.communicate(timeout=DEADLINE)
        return self.process.returncode, err.decode()


@pytest.fixture
def connect() -> Iterator[Callable[[str], Raw]]:
    """Open bare sockets to an agent's socket; all are closed at the end of the test."""
    opened: list[Raw] = []

    def open_raw(path: str) -> Raw:
        opened.append(Raw(path, timeout=DEADLINE))
        return opened[-1]

    yield open_raw
    for connection in opened:
        connection.close()


@pytest.fixture
def followers() -> Iterator[list[Follower]]:
    started: list[Follower] = []
    yield started
    for follower in started:
        if follower.process.poll() is None:
            follower.process.kill()
            follower.process.wait()
        for pipe in (follower.process.stdout, follower.process.stderr):
            if pipe is not None:
                pipe.close()


# --- keyagent-ctl log ----------------------------------------------------------------------------


def test_log_shows_each_use_and_change_as_a_table(agent: AgentProcess) -> None:
    """After add, get, exec, a failed get and forget, keyagent-ctl log prints one row each,
    oldest first, with the op, outcome, key id, account and the client's pid and uid; never
    the key."""
    key_id = add_key(agent)
    assert run_ctl(agent.socket_path, "get").out == f"{SECRET}\n"
    env = ctl_env(agent)
    execed = run_ctl_process(["exec", "--", sys.executable, "-c", "pass"], env=env)
    assert execed.returncode == 0, execed.stderr
    assert run_ctl(agent.socket_path, "get", "--key-id", "ffff").code == 1
    assert run_ctl(agent.socket_path, "list").code == 0  # a read: not recorded
    assert run_ctl(agent.socket_path, "forget", key_id).code == 0
    shown = run_ctl(agent.socket_path, "log")
    assert shown.code == 0, shown.err
    lines = shown.out.splitlines()
    assert lines[0].split() == [
        "TIME", "OP", "OUTCOME", "KEY_ID", "HOST", "USER", "PID", "UID", "EXE", "REQUEST",
    ]  # fmt: skip
    rows = [line.split() for line in lines[1:]]
    assert [row[1:6] for row in rows] == [
        ["add", "ok", key_id, HOST, USER],
        ["get", "ok", key_id, HOST, USER],
        ["exec", "ok", key_id, HOST, USER],
        ["get", "not_found", "ffff", "-", "-"],
        ["forget", "ok", key_id, HOST, USER],  # the key forgotten, named in full
    ]
    assert rows[0][6:8] == [str(os.getpid()), str(os.getuid())]  # run_ctl runs in this process
    assert rows[2][6] != str(os.getpid())  # exec ran as its own process
    assert SECRET not in shown.out
    agent.stop()  # its audit lines are all written by then
    assert "audit time=" in agent.log()
    assert SECRET not in agent.log()


def test_log_json_and_n_give_the_last_entries_as_json_lines(agent: AgentProcess) -> None:
    """--json prints one JSON object per entry; -n N only the last N."""
    for number in range(3):
        add_key(agent, f"{SECRET}-{number}")
    everything = json_lines(run_ctl(agent.socket_path, "log", "--json").out)
    assert [entry["key_id"] for entry in everything] == [
        key_id_for(f"{SECRET}-{number}") for number in range(3)
    ]
    assert set(everything[0]) == {
        "time", "op", "outcome", "key_id", "host", "user", "pid", "uid", "exe", "method",
        "path", "status",
    }  # fmt: skip
    assert everything[0]["uid"] == os.geteuid()
    assert json_lines(run_ctl(agent.socket_path, "log", "--json", "-n", "2").out) == everything[1:]
    assert run_ctl(agent.socket_path, "log", "-n", "0").out == "no audit entries\n"
    bad = run_ctl(agent.socket_path, "log", "-n", "-1")
    assert (bad.code, bad.out) == (64, "")
    assert "from 0 to 1000000" in bad.err


def test_the_table_escapes_what_it_did_not_write(tmp_path: Path) -> None:
    """Untrusted text in an entry (a program path, a proxied path) reaches the terminal with
    its control characters escaped, never raw."""
    agent = Agent(clock=FakeTime().clock())
    agent.audit(
        "proxy", Peer(4242, 1000, 1000), method="GET", path="/conduce/api/\x1b[2Jx?q=1",
        status=200, host=HOST, user=USER,
    )  # fmt: skip
    with serving(tmp_path / "t" / "agent.sock", agent) as served:
        shown = run_ctl(served.socket_path, "log")
    assert shown.code == 0, shown.err
    assert "\x1b" not in shown.out
    assert "GET /conduce/api/\\x1b[2Jx 200" in shown.out


def test_log_is_refused_while_locked(agent: AgentProcess) -> None:
    """A locked agent refuses log (it tells how the agent is used): exit 1, code locked."""
    add_key(agent)
    assert run_ctl(agent.socket_path, "lock", stdin="pass phrase\n").code == 0
    refused = run_ctl(agent.socket_path, "log")
    assert (refused.code, refused.out) == (1, "")
    assert "[locked]" in refused.err
    assert run_ctl(agent.socket_path, "unlock", stdin="pass phrase\n").code == 0
    ops = [entry["op"] for entry in json_lines(run_ctl(agent.socket_path, "log", "--json").out)]
    assert ops == ["add", "lock", "log", "unlock"]


# --- following -----------------------------------------------------------------------------------


def test_follow_prints_an_entry_another_client_causes(
    agent: AgentProcess, followers: list[Follower]
) -> None:
    """log --follow --json prints the backlog, then each new entry as another client's request
    makes it; Ctrl-C ends it with status 130 and nothing but a newline on stderr."""
    key_id = add_key(agent)
    follower = Follower(agent, "--json", "-n", "1")
    followers.append(follower)
    assert json.loads(follower.line())["op"] == "add"  # the backlog: it follows from now on
    assert run_ctl(agent.socket_path, "get").code == 0
    entry = json.loads(follower.line())
    assert (entry["op"], entry["outcome"], entry["key_id"]) == ("get", "ok", key_id)
    assert entry["pid"] == os.getpid()
    assert follower.stop() == (130, "\n")


def test_follow_as_a_table_and_a_closed_pipe_ends_with_141(
    agent: AgentProcess, followers: list[Follower]
) -> None:
    """The table form prints a header then a row per entry; when its reader goes away, the
    next entry ends it with status 141, as a command killed by SIGPIPE."""
    key_id = add_key(agent)
    follower = Follower(agent, "-n", "1")
    followers.append(follower)
    assert follower.line().split()[:3] == ["TIME", "OP", "OUTCOME"]
    # The backlog comes once the agent follows for it.
    assert follower.line().split()[1:4] == ["add", "ok", key_id]
    assert run_ctl(agent.socket_path, "get", "--key-id", "abcd").code == 1
    assert follower.line().split()[1:4] == ["get", "not_found", "abcd"]
    output = follower.process.stdout
    assert output is not None
    output.close()
    assert run_ctl(agent.socket_path, "get", "--key-id", "abcd").code == 1
    assert follower.process.wait(DEADLINE) == 141


def test_a_follower_that_stops_reading_is_dropped_not_buffered(
    agent_factory: AgentFactory, connect: Callable[[str], Raw]
) -> None:
    """A follower that reads nothing while many entries are made costs the agent at most its
    output cap: it is dropped with a last busy line saying entries were dropped, and the
    agent's memory does not grow with the entries it could not send."""
    agent = agent_factory("--audit-entries", "0", debug=False)
    add_key(agent)
    silent = connect(agent.socket_path)
    silent.send(b'{"id": "f", "op": "log", "follow": true}\n')
    assert decode(silent.line()) == {"id": "f", "ok": True, "result": {"entries": []}}
    rss_before = resident_kib(agent.pid)
    getter = connect(agent.socket_path)
    made = 0
    for _ in range(6):
        getter.send(b'{"op": "get"}\n' * 10_000)
        for _ in range(10_000):
            assert decode(getter.line())["ok"] is True
        made += 10_000
    growth = resident_kib(agent.pid) - rss_before
    lines = []
    while line := silent.line():
        lines.append(json.loads(line))
    assert lines[-1]["ok"] is False
    assert lines[-1]["error"]["code"] == "busy"
    assert "dropped" in lines[-1]["error"]["message"]
    received = lines[:-1]
    assert all(entry["id"] == "f" and entry["entry"]["op"] == "get" for entry in received)
    assert 0 < len(received) < made / 4
    # 60,000 unsent entries are over 15 MiB as lines; a dropped follower keeps none of them.
    assert growth < 8 * 1024, f"the agent grew by {growth} KiB"
    with agent.client() as client:
        assert client.status()["locked"] is False


def test_a_lock_ends_following_with_a_locked_line(
    agent: AgentProcess, connect: Callable[[str], Raw]
) -> None:
    """Followers see the lock's own entry, then a last locked line, and the connection closes."""
    watcher = connect(agent.socket_path)
    watcher.send(b'{"id": 3, "op": "log", "follow": true, "n": 0}\n')
    assert decode(watcher.line())["ok"] is True
    assert run_ctl(agent.socket_path, "lock", stdin="pass phrase\n").code == 0
    entry = json.loads(watcher.line())
    assert (entry["id"], entry["entry"]["op"]) == (3, "lock")
    last = decode(watcher.line())
    assert (last["id"], last["error"]["code"]) == (3, "locked")
    assert watcher.closed_by_peer()


def test_a_follower_whose_following_ended_has_an_idle_timeout_to_read_its_last_line(
    agent_factory: AgentFactory, connect: Callable[[str], Raw]
) -> None:
    """A follower far behind (entries queued in the agent, unread) whose following ends, by
    a lock here, gets its last line if it reads within the idle timeout that starts then,
    however long it has followed: it was never idle while it followed. The agent's own
    deadlines pace the test: a half line's timeout says when to lock (well before the
    follower's first idle deadline), an idle connection's close says that deadline has
    passed (when a follower still timed from its request would be closed)."""
    idle = 4.0
    agent = agent_factory(
        "--idle-timeout", str(idle), "--line-timeout", str(0.6 * idle), debug=False
    )  # fmt: skip
    add_key(agent)
    idler = connect(agent.socket_path)  # closed as idle when the follower's deadline is due
    follower = connect(agent.socket_path)
    follower.send(b'{"id": "f", "op": "log", "follow": true, "n": 0}\n')
    assert decode(follower.line())["ok"] is True
    pacer = connect(agent.socket_path)
    pacer.send(b'{"op": "hello"')  # a half line: answered timeout at 0.6 of the idle time
    # More entries than a socket buffer holds (about 250 bytes each), fewer than would
    # make the follower be dropped for falling behind (a megabyte).
    getter = connect(agent.socket_path)
    getter.send(b'{"op": "get"}\n' * 2500)
    for _ in range(2500):
        assert decode(getter.line())["ok"] is True
    assert decode(pacer.line())["error"]["code"] == "timeout"
    assert run_ctl(agent.socket_path, "lock", stdin="pass phrase\n").code == 0
    assert not idler.buffer, "the idle connection was closed before the lock"
    assert idler.closed_by_peer()  # the follower's first idle deadline has passed
    lines = []
    while line := follower.line():
        lines.append(json.loads(line))
    assert sum("entry" in line for line in lines) >= 2500
    assert (lines[-1]["id"], lines[-1]["error"]["code"]) == ("f", "locked")


def test_a_follower_that_closes_is_forgotten(
    agent: AgentProcess, connect: Callable[[str], Raw]
) -> None:
    """A follower that hangs up stops being followed: later entries go nowhere and the agent
    serves on."""
    gone = connect(agent.socket_path)
    gone.send(b'{"op": "log", "follow": true}\n')
    assert decode(gone.line())["ok"] is True
    gone.close()
    add_key(agent)
    with agent.client() as client:
        assert [entry["op"] for entry in client.log()] == ["add"]


def test_the_client_library_follows_too(agent: AgentProcess) -> None:
    """Client.follow_log yields the backlog, then entries as they are made."""
    add_key(agent)
    with agent.client() as client:
        stream = client.follow_log(n=5)
        assert next(stream)["op"] == "add"
        with agent.client() as other:
            other.forget(all=True)
        assert next(stream)["op"] == "forget"
        stream.close()


def test_following_starts_when_asked_not_when_first_read(agent: AgentProcess) -> None:
    """An entry recorded between follow_log() and the first next() is not missed: the
    request goes to the agent at the call."""
    add_key(agent)
    with agent.client() as client:
        stream = client.follow_log(n=0)
        with agent.client() as other:
            other.forget(all=True)  # before the first next()
            other.add(HOST, USER, SECRET)  # what a lazy follow would see first
        assert next(stream)["op"] == "forget"
        stream.close()


# --- what the agent records -----------------------------------------------------------------------


def test_gets_answered_from_the_reply_memo_are_each_recorded(
    agent_factory: AgentFactory, connect: Callable[[str], Raw]
) -> None:
    """An agent without -d answers a repeated get from its memo of replies; each is still a use
    of the key and gets its own entry."""
    agent = agent_factory(debug=False)
    key_id = add_key(agent)
    getter = connect(agent.socket_path)
    for _ in range(3):
        getter.send(b'{"id": 1, "op": "get"}\n')
        assert decode(getter.line())["result"]["key"] == SECRET
    with agent.client() as client:
        entries = client.log()
    assert [(entry["op"], entry["key_id"]) for entry in entries] == [("add", key_id)] + [
        ("get", key_id)
    ] * 3


def test_audit_entries_bounds_what_log_keeps(agent_factory: AgentFactory, tmp_path: Path) -> None:
    """--audit-entries N keeps the last N entries; 0 keeps none (the agent's log still has
    every entry); from the configuration file too."""
    two = agent_factory("--audit-entries", "2", name="two")
    for number in range(3):
        add_key(two, f"{SECRET}-{number}")
    with two.client() as client:
        assert [entry["key_id"] for entry in client.log()] == [
            key_id_for(f"{SECRET}-{number}") for number in (1, 2)
        ]
    none = agent_factory("--audit-entries", "0", name="none")
    key_id = add_key(none)
    with none.client() as client:
        assert client.log() == []
    none.stop()  # entries reach the log within 50 ms, and at the latest when it stops
    assert f"op=add outcome=ok key_id={key_id}" in none.log()
    config = tmp_path / "config.toml"
    config.write_text("audit_entries = 1\n")
    config.chmod(0o600)
    one = agent_factory("--config", str(config), name="one")
    add_key(one, "first-key")
    add_key(one)
    with one.client() as client:
        assert [entry["key_id"] for entry in client.log()] == [key_id_for(SECRET)]


def test_a_bad_audit_entries_flag_is_a_usage_error() -> None:
    """keyagent --audit-entries outside 0..1000000 exits 64 naming the rule."""
    result = subprocess.run(
        [sys.executable, "-m", "keyagent.daemon", "-D", "--audit-entries", "-5"],
        capture_output=True, text=True, timeout=DEADLINE, check=False,
    )  # fmt: skip
    assert result.returncode == 64
    assert "from 0 to 1000000" in result.stderr


def test_a_connection_from_another_user_is_recorded(open_agent: AgentProcess) -> None:
    """Another user's connection, refused forbidden, leaves an entry with its uid."""
    answer = request_as_nobody(open_agent.socket_path, b'{"op": "get"}\n')
    assert json.loads(answer)["error"]["code"] == "forbidden"
    with open_agent.client() as client:
        entries = client.log()
    assert [(e["op"], e["outcome"], e["uid"]) for e in entries] == [("connect", "forbidden", 65534)]


def test_a_follower_cap_comes_from_the_server_limits(
    tmp_path: Path, connect: Callable[[str], Raw]
) -> None:
    """The cap on a follower's unread output is the server's max_pending_output."""
    agent = Agent(clock=FakeTime().clock())
    limits = Limits(max_pending_output=4096)
    with serving(tmp_path / "c" / "agent.sock", agent, limits) as served:
        silent = connect(served.socket_path)
        silent.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        silent.send(b'{"id": 9, "op": "log", "follow": true}\n')
        assert decode(silent.line())["ok"] is True
        getter = connect(served.socket_path)
        getter.send(b'{"op": "get", "key_id": "abcd"}\n' * 3000)
        for _ in range(3000):
            assert decode(getter.line())["error"]["code"] == "not_found"
        lines = []
        while line := silent.line():
            lines.append(json.loads(line))
    assert lines[-1]["error"]["code"] == "busy"
    assert len(lines) - 1 < 3000


def resident_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")
