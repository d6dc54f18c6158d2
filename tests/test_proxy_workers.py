"""The HTTP socket's worker processes (keyagent.proxy_pool, keyagent.proxy_worker): who serves
a connection, how many, and what happens when one dies or misbehaves."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from keyagent.agent import Peer
from keyagent.errors import KeyagentError
from keyagent.grant import Grant
from keyagent.proxy_pool import WORKER_IDLE, ProxyPool, _Worker
from keyagent.proxy_worker import BOARD_SLOT, GENERATION, WORKER_NICE, FlightBoard
from keyagent.rules import DEFAULT_HTTP_WORKERS, MAX_USER
from keyagent.testing.agent import AgentProcess, wait_for_exit
from keyagent.testing.emulator_process import Emulator

from .conftest import AgentFactory, run_ctl, wait_until

USER = "worker@example.com"
PASSWORD = "worker-pa55word-never-shown"
TEAMS = "/conduce/api/v1/user/list-teams"


@pytest.fixture
def secret(emulator: Emulator) -> str:
    """An API key of USER on the emulator."""
    return emulator.add_key(USER, "for the workers")


@pytest.fixture
def conduce_agent(agent_factory: AgentFactory, emulator: Emulator, secret: str) -> AgentProcess:
    """An agent that trusts the emulator's CA and holds ``secret``."""
    agent = agent_factory("--ca-bundle", emulator.ca_path, "--read-timeout", "5")
    result = run_ctl(
        agent.socket_path, "--host", emulator.host, "--user", USER, "add", stdin=secret + "\n"
    )
    assert result.code == 0, result.err
    return agent


def signals_ignored(pid: int) -> set[int]:
    """The signals ``pid`` ignores (SigIgn in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("SigIgn:"):
                mask = int(line.split()[1], 16)
                return {signum for signum in range(1, 65) if mask & (1 << (signum - 1))}
    return set()


def http_path(agent: AgentProcess) -> str:
    return str(Path(agent.socket_path).with_name("http.sock"))


def workers_of(pid: int) -> list[int]:
    """The pids of ``pid``'s children named keyagent-http (the name the worker gives itself)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{entry}/comm", "rb") as comm:
                name = comm.read().strip()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and name == b"keyagent-http":
            found.append(int(entry))
    return sorted(found)


def said(agent: AgentProcess, text: str) -> bool:
    """Whether the agent's log holds ``text``, after a round trip (the loop's turn is the wait)."""
    with agent.client() as client:
        client.status()
    return text in agent.log()


class KeepAlive:
    """One keep-alive connection to the HTTP socket that has had one answer and stays open."""

    def __init__(self, path: str, host: str) -> None:
        self.host = host
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(15)
        self.sock.connect(path)

    def get(self, path: str = TEAMS) -> bytes:
        """Send one GET; the answer's status line, or b"" if the connection was closed."""
        try:
            return self._get(path)
        except (BrokenPipeError, ConnectionResetError):
            return b""

    def _get(self, path: str) -> bytes:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                return data.split(b"\r\n", 1)[0]
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return head.split(b"\r\n", 1)[0]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def connections() -> Iterator[list[KeepAlive]]:
    """Connections a test opens, closed at its end."""
    opened: list[KeepAlive] = []
    yield opened
    for conn in opened:
        conn.close()


def test_connections_are_served_by_worker_processes(
    conduce_agent: AgentProcess, emulator: Emulator, connections: list[KeepAlive], secret: str
) -> None:
    """A proxied request is served by a child process named keyagent-http, which runs at a
    lower priority than the agent, ignores the signals meant for the agent, and holds the
    key in neither its command line nor its environment; none starts before it is needed."""
    assert workers_of(conduce_agent.pid) == []
    conn = KeepAlive(http_path(conduce_agent), emulator.host)
    connections.append(conn)
    assert conn.get() == b"HTTP/1.1 200 OK"
    (worker,) = workers_of(conduce_agent.pid)
    assert os.getpgid(worker) == os.getpgid(conduce_agent.pid)  # the agent's scheduling group
    agent_nice = os.getpriority(os.PRIO_PROCESS, conduce_agent.pid)
    assert os.getpriority(os.PRIO_PROCESS, worker) == min(19, agent_nice + WORKER_NICE)
    assert {signal.SIGINT, signal.SIGTERM, signal.SIGHUP} <= signals_ignored(worker)
    with open(f"/proc/{worker}/cmdline", "rb") as cmdline:
        argv = cmdline.read()
    assert b"/keyagent/_http_worker.py" in argv
    assert secret.encode() not in argv
    if os.geteuid() == 0:  # a non-dumpable process's environ is root's to read
        with open(f"/proc/{worker}/environ", "rb") as environ:
            assert secret.encode() not in environ.read()
    with conduce_agent.client() as client:
        (key,) = client.list()
        assert client.get(key_id=key["key_id"]) == secret  # the agent itself answers as before
    # Of the agent's memfds it holds the generation read-only (a worker cannot wind it back
    # to keep using grants the agent has since withdrawn), and its own flight board.
    memfds = {}
    for fd in os.listdir(f"/proc/{worker}/fd"):
        target = os.readlink(f"/proc/{worker}/fd/{fd}")
        if target.startswith("/memfd:"):
            with open(f"/proc/{worker}/fdinfo/{fd}") as info:
                flags = int(next(line for line in info if line.startswith("flags:")).split()[1], 8)
            memfds[target.split()[0]] = flags & os.O_ACCMODE
            if os.geteuid() == 0:  # a non-dumpable process's descriptors are root's to open
                assert_sealed(f"/proc/{worker}/fd/{fd}", generation="generation" in target)
    assert memfds == {
        "/memfd:keyagent-generation": os.O_RDONLY, "/memfd:keyagent-flights": os.O_RDWR
    }  # fmt: skip


def assert_sealed(path: str, *, generation: bool) -> None:
    """The memfd at ``path``, reopened writable as a worker could: its size cannot change
    (the agent maps it: a shrunk file kills the reader with SIGBUS), nor, for the
    generation, its content."""
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 1 << 30)
        if generation:
            with pytest.raises(PermissionError):
                os.pwrite(fd, b"\0" * 8, 0)
    finally:
        os.close(fd)


def test_status_names_the_workers(
    conduce_agent: AgentProcess, emulator: Emulator, connections: list[KeepAlive]
) -> None:
    """status (and --json) lists the HTTP workers' pids: none before the first proxied call,
    then the one serving it; and the most it may run, by default the automatic figure."""
    with conduce_agent.client() as client:
        status = client.status()
    assert (status["http_workers"], status["http_workers_max"]) == ([], DEFAULT_HTTP_WORKERS)
    result = run_ctl(conduce_agent.socket_path, "status")
    assert f"HTTP workers: none running, at most {DEFAULT_HTTP_WORKERS}\n" in result.out
    conn = KeepAlive(http_path(conduce_agent), emulator.host)
    connections.append(conn)
    assert conn.get() == b"HTTP/1.1 200 OK"
    (worker,) = workers_of(conduce_agent.pid)
    with conduce_agent.client() as client:
        assert client.status()["http_workers"] == [worker]
    result = run_ctl(conduce_agent.socket_path, "status")
    assert result.code == 0, result.err
    assert f"HTTP workers: 1 of at most {DEFAULT_HTTP_WORKERS} (pid {worker})" in result.out


def test_busy_workers_make_more_up_to_the_limit(
    conduce_agent: AgentProcess, emulator: Emulator, connections: list[KeepAlive]
) -> None:
    """Each connection opened while every worker has one starts another worker, up to
    DEFAULT_HTTP_WORKERS; later connections share them, and all are answered."""
    for _ in range(DEFAULT_HTTP_WORKERS + 2):
        conn = KeepAlive(http_path(conduce_agent), emulator.host)
        connections.append(conn)
        assert conn.get() == b"HTTP/1.1 200 OK"
    assert len(workers_of(conduce_agent.pid)) == DEFAULT_HTTP_WORKERS
    for conn in connections:
        assert conn.get() == b"HTTP/1.1 200 OK"


def test_one_http_worker_serves_every_connection(
    agent_factory: AgentFactory, emulator: Emulator, secret: str, connections: list[KeepAlive]
) -> None:
    """--http-workers 1: connections open at once, and requests in flight at once, are all
    served by the one worker; no other is ever started, and status says one of at most one."""
    agent = agent_factory(
        "--ca-bundle", emulator.ca_path, "--read-timeout", "5", "--http-workers", "1"
    )  # fmt: skip
    added = run_ctl(
        agent.socket_path, "--host", emulator.host, "--user", USER, "add", stdin=secret + "\n"
    )
    assert added.code == 0, added.err
    for _ in range(4):  # with the default, each of these would start a worker of its own
        conn = KeepAlive(http_path(agent), emulator.host)
        connections.append(conn)
        assert conn.get() == b"HTTP/1.1 200 OK"
    (worker,) = workers_of(agent.pid)
    with ThreadPoolExecutor(max_workers=len(connections)) as pool:
        answers = list(pool.map(lambda conn: conn.get(), connections))
    assert answers == [b"HTTP/1.1 200 OK"] * len(connections)
    assert workers_of(agent.pid) == [worker]
    with agent.client() as client:
        status = client.status()
    assert (status["http_workers"], status["http_workers_max"]) == ([worker], 1)
    shown = run_ctl(agent.socket_path, "status")
    assert shown.code == 0, shown.err
    assert f"HTTP workers: 1 of at most 1 (pid {worker})\n" in shown.out
    as_json = run_ctl(agent.socket_path, "status", "--json")
    assert as_json.code == 0, as_json.err
    assert json.loads(as_json.out)["http_workers_max"] == 1


def test_http_workers_from_the_configuration_file(
    agent_factory: AgentFactory, tmp_path: Path
) -> None:
    """http_workers in config.toml sets the most workers; the flag beats it."""
    config = tmp_path / "config.toml"
    config.write_text("http_workers = 3\n")
    config.chmod(0o600)
    from_file = agent_factory("--config", str(config), name="file")
    with from_file.client() as client:
        assert client.status()["http_workers_max"] == 3
    shown = run_ctl(from_file.socket_path, "status")
    assert "HTTP workers: none running, at most 3\n" in shown.out
    from_flag = agent_factory("--config", str(config), "--http-workers", "5", name="flag")
    with from_flag.client() as client:
        assert client.status()["http_workers_max"] == 5


@pytest.mark.parametrize("value", ["0", "-1", "33", "2.5", "two"])
def test_a_bad_http_workers_flag_is_a_usage_error(value: str) -> None:
    """keyagent --http-workers outside 1..32, or not a whole number, exits 64 naming the rule."""
    result = subprocess.run(
        [sys.executable, "-m", "keyagent.daemon", "-D", "--http-workers", value],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 64
    assert f"'{value}' is not a whole number from 1 to 32" in result.stderr


@pytest.mark.parametrize(
    ("line", "got"), [("0", "0"), ("33", "33"), ("true", "a boolean"), ('"4"', "a string")]
)
def test_a_bad_http_workers_setting_stops_the_daemon(tmp_path: Path, line: str, got: str) -> None:
    """http_workers = 0 (or too many, or not a whole number) in config.toml: keyagent exits
    78 naming the file, the line and the rule, and serves nothing."""
    config = tmp_path / "config.toml"
    config.write_text(f"http_workers = {line}\n")
    config.chmod(0o600)
    result = subprocess.run(
        [sys.executable, "-m", "keyagent.daemon", "-D", "--config", str(config),
         "-a", str(tmp_path / "agent.sock")],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 78
    assert (
        f"{config}:1: 'http_workers' must be a whole number from 1 to 32; got {got}"
        in result.stderr
    )
    assert not (tmp_path / "agent.sock").exists()


def test_a_killed_worker_is_replaced(
    conduce_agent: AgentProcess, emulator: Emulator, connections: list[KeepAlive]
) -> None:
    """A worker that dies takes its connections with it; the agent says so, keeps serving
    agent.sock, and the next connection gets a new worker."""
    first = KeepAlive(http_path(conduce_agent), emulator.host)
    connections.append(first)
    assert first.get() == b"HTTP/1.1 200 OK"
    (worker,) = workers_of(conduce_agent.pid)
    os.kill(worker, signal.SIGKILL)
    assert first.get() == b""  # closed with the worker
    wait_until(
        lambda: said(conduce_agent, f"HTTP worker {worker} exited"), "the worker's end logged"
    )
    second = KeepAlive(http_path(conduce_agent), emulator.host)
    connections.append(second)
    assert second.get() == b"HTTP/1.1 200 OK"
    (replacement,) = workers_of(conduce_agent.pid)
    assert replacement != worker
    with conduce_agent.client() as client:
        assert client.status()["keys"] == 1


def test_workers_end_with_the_agent(
    conduce_agent: AgentProcess, emulator: Emulator, connections: list[KeepAlive]
) -> None:
    """Workers exit when the agent does, even when it is killed and cannot tell them."""
    conn = KeepAlive(http_path(conduce_agent), emulator.host)
    connections.append(conn)
    assert conn.get() == b"HTTP/1.1 200 OK"
    (worker,) = workers_of(conduce_agent.pid)
    os.kill(conduce_agent.pid, signal.SIGKILL)
    assert wait_for_exit(worker, 10)


def test_a_stopped_agent_leaves_no_worker(
    conduce_agent: AgentProcess, emulator: Emulator, connections: list[KeepAlive]
) -> None:
    """A clean stop ends and reaps every worker before the agent exits."""
    for _ in range(2):
        conn = KeepAlive(http_path(conduce_agent), emulator.host)
        connections.append(conn)
        assert conn.get() == b"HTTP/1.1 200 OK"
    workers = workers_of(conduce_agent.pid)
    assert len(workers) == 2
    conduce_agent.stop()
    for worker in workers:
        assert not os.path.exists(f"/proc/{worker}")


# --- the agent's side, with a stand-in worker -----------------------------------------


class Loop:
    """What a ProxyPool needs of the server: watched descriptors, calls run at once, and
    timers on a fake clock that :meth:`advance` moves."""

    def __init__(self) -> None:
        self.watched: dict[int, Callable[[], None]] = {}
        self.calls: list[Callable[[], Any]] = []
        self.now = 1000.0
        self.timers: list[tuple[float, Callable[[], None]]] = []
        self.holding = False
        self.held: list[tuple[Callable[[], Any], Callable[[Any, Any], None]]] = []

    def watch(self, fd: int, handler: Callable[[], None]) -> None:
        self.watched[fd] = handler

    def unwatch(self, fd: int) -> None:
        self.watched.pop(fd, None)

    def start_call(self, call: Callable[[], Any], done: Callable[[Any, Any], None]) -> None:
        """Run ``call`` at once, as the server does a question that needs no waiting; or,
        while :attr:`holding`, keep it unanswered (as one waiting on askpass would be)."""
        self.calls.append(call)
        if self.holding:
            self.held.append((call, done))
            return
        try:
            value = call()
        except KeyagentError as error:
            done(None, error)
        else:
            done(value, None)

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        self.timers.append((when, callback))

    def clock(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock and run the timers now due."""
        self.now += seconds
        due = [timer for timer in self.timers if timer[0] <= self.now]
        self.timers = [timer for timer in self.timers if timer[0] > self.now]
        for _, callback in due:
            callback()


class TokenAgent:
    """An agent's credentials token, audit log and lending, and nothing else: it lends a
    key that needs confirming (Grant.confirmed) and records what it was told was
    confirmed already."""

    def __init__(self) -> None:
        self.token = 0
        self.audited: list[tuple[str, Peer, dict[str, Any]]] = []
        self.asked: list[tuple[int, frozenset[str]]] = []
        self.session_mark: str | None = None
        """When set, the account's session is lent (under this login's mark) instead."""

    def credentials_token(self) -> int:
        return self.token

    def audit(self, op: str, peer: Peer, **fields: Any) -> None:
        self.audited.append((op, peer, fields))

    def authorize_proxy(
        self, peer: Peer, host: str, user: str | None, key_id: str | None, confirmed: Any
    ) -> Grant:
        self.asked.append((peer.pid, confirmed))
        if self.session_mark is not None:
            return Grant(
                host, "u", header="Cookie", value="session=c00k1e-value", mark=self.session_mark,
                confirmed=True, token=self.token,
            )  # fmt: skip
        return Grant(
            host, "u", header="Authorization", value="Bearer k", digest="d" * 64,
            confirmed=True, token=self.token, mark="key 7, lock 0",
        )  # fmt: skip


# A stand-in worker: reads its control socket until the agent closes it, then exits.
STAND_IN = (
    "import socket, sys\ns = socket.socket(fileno=int(sys.argv[1]))\nwhile s.recv(65536): pass"
)


def add_stand_in(
    pool: ProxyPool, loop: Loop, conn: int, *, ready: bool = True
) -> tuple[_Worker, socket.socket]:
    """A stand-in worker process in ``pool``, serving connection ``conn``; returns it and
    the worker's end of its control socket (to send from as the worker would)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    process = subprocess.Popen(
        [sys.executable, "-c", STAND_IN, str(theirs.fileno())], pass_fds=[theirs.fileno()]
    )
    worker = _Worker(process, ours)
    worker.ready = ready
    pool.workers.append(worker)
    loop.watch(ours.fileno(), lambda: pool._readable(worker))
    worker.conns.add(conn)
    pool.peers[conn] = Peer(4242, os.getuid(), os.getgid(), "/usr/bin/curl")
    return worker, theirs


StandIn = tuple[ProxyPool, Loop, TokenAgent, _Worker, socket.socket]
BUSY = b"HTTP/1.1 503 busy\r\n\r\n"


@pytest.fixture
def stand_in() -> Iterator[StandIn]:
    """A pool with one stand-in worker serving connection 1; yields the pool, its loop, its
    agent, the worker and the worker's end of the control socket."""
    loop, agent = Loop(), TokenAgent()
    pool = ProxyPool(
        agent,  # type: ignore[arg-type]  # the methods a pool calls
        {}, watch=loop.watch, unwatch=loop.unwatch, start_call=loop.start_call,
        call_at=loop.call_at, clock=loop.clock, busy=BUSY,
    )  # fmt: skip
    worker, theirs = add_stand_in(pool, loop, 1)
    yield pool, loop, agent, worker, theirs
    theirs.close()
    pool.close()  # closes the control sockets and reaps the stand-ins


def closed(theirs: socket.socket, conn: int) -> None:
    theirs.send(json.dumps({"t": "closed", "conn": conn}).encode())


def test_an_extra_worker_ends_after_idling_and_the_first_stays(stand_in: StandIn) -> None:
    """A worker other than the first ends WORKER_IDLE seconds after its last connection
    closed (its control socket is closed and it exits); the first never does."""
    pool, loop, _, first, first_end = stand_in
    second, second_end = add_stand_in(pool, loop, 2)
    closed(second_end, 2)
    loop.watched[second.control.fileno()]()
    closed(first_end, 1)
    loop.watched[first.control.fileno()]()
    loop.advance(WORKER_IDLE - 1)
    assert pool.workers == [first, second]
    loop.advance(2)
    assert pool.workers == [first]
    assert second.control.fileno() == -1
    assert second.process.wait(10) == 0  # it saw its control socket close and ended
    loop.advance(10 * WORKER_IDLE)
    assert pool.workers == [first]
    second_end.close()


def test_a_worker_that_gets_a_connection_again_stays(stand_in: StandIn) -> None:
    """An idle worker given a connection before its time is up is not ended."""
    pool, loop, _, _, _ = stand_in
    second, second_end = add_stand_in(pool, loop, 2)
    closed(second_end, 2)
    loop.watched[second.control.fileno()]()
    loop.advance(WORKER_IDLE / 2)
    tool, agent_side = socket.socketpair()
    with tool, agent_side:
        assert pool.admit(agent_side, Peer(4243, os.getuid(), os.getgid()))
    assert len(second.conns) == 1  # the worker with the fewest connections took it
    loop.advance(WORKER_IDLE)
    assert second in pool.workers
    second_end.close()


@pytest.mark.parametrize(
    "message",
    [
        b"not json",
        b"[1, 2]",
        json.dumps({"t": "audit", "conn": 2, "outcome": "ok"}).encode(),  # not its connection
        json.dumps({"t": "audit", "conn": [1], "outcome": "ok"}).encode(),
        json.dumps({"t": "audit", "conn": 1, "outcome": "ok", "status": "200"}).encode(),
        json.dumps({"t": "audit", "conn": 1, "outcome": None}).encode(),
        json.dumps({"t": "audit", "conn": 1, "outcome": "ok", "user": ["u"]}).encode(),
        json.dumps({"t": "authorize", "conn": 1, "ask": 1, "host": 7}).encode(),
        json.dumps({"t": "session_refused", "conn": 1, "ask": 1, "host": "h"}).encode(),
        json.dumps({"t": "key_refused", "conn": 1, "ask": 1, "host": "h", "user": "u"}).encode(),
        json.dumps(
            {"t": "key_refused", "conn": 1, "ask": 1, "host": "h", "user": "u", "refused": ["a"]}
        ).encode(),
        json.dumps(
            {
                "t": "key_refused",
                "conn": 1,
                "ask": 1,
                "host": "h",
                "user": "u",
                "refused": ["a" * 64] * 4,
            }
        ).encode(),
        json.dumps(
            {"t": "authorize", "conn": 1, "ask": 1, "host": "h", "refused": ["a" * 64]}
        ).encode(),
        json.dumps(
            {"t": "session_refused", "conn": 1, "ask": 1, "host": "h", "user": "u", "retry": 0}
        ).encode(),
        json.dumps(
            {"t": "authorize", "conn": 1, "ask": 1, "host": "h", "user": None, "retry": False}
        ).encode(),
        json.dumps({"t": "ready"}).encode(),  # it said so already
        b"[" * 60_000,  # deeper than the JSON decoder goes: RecursionError, not ValueError
        json.dumps({"t": "sign", "conn": 1}).encode(),
    ],
)
def test_a_worker_sending_a_bad_message_is_let_go(stand_in: StandIn, message: bytes) -> None:
    """A message no worker sends ends that worker (killed and reaped) and forgets its
    connections; nothing reaches the agent's state or audit log."""
    pool, loop, agent, worker, theirs = stand_in
    theirs.send(message)
    loop.watched[worker.control.fileno()]()
    assert pool.workers == []
    assert pool.open_connections == 0
    assert loop.watched == {}
    assert worker.process.returncode == -signal.SIGKILL
    assert agent.audited == []
    assert loop.calls == []


def test_a_workers_audit_entry_names_the_agents_peer(
    stand_in: StandIn,
) -> None:
    """An audit entry from a worker is recorded with the peer the agent accepted, and a
    question becomes a call on the loop; the worker stays."""
    pool, loop, agent, worker, theirs = stand_in
    theirs.send(json.dumps({
        "t": "audit", "conn": 1, "outcome": "ok", "method": "GET", "path": "/api/v2/x",
        "status": 200, "host": "h", "user": "u", "key_id": None,
    }).encode())  # fmt: skip
    theirs.send(json.dumps({
        "t": "authorize", "conn": 1, "ask": 9, "host": "h", "user": None, "key_id": None,
        "confirmed": [],
    }).encode())  # fmt: skip
    loop.watched[worker.control.fileno()]()
    assert pool.workers == [worker]
    ((op, peer, fields),) = agent.audited
    assert (op, peer.pid, fields["path"], fields["status"]) == ("proxy", 4242, "/api/v2/x", 200)
    assert len(loop.calls) == 1


def test_entries_queued_behind_a_bad_message_are_still_recorded(stand_in: StandIn) -> None:
    """A worker let go for a bad message may have sent entries after it: their slots on its
    board are empty already, so the agent reads them off the control socket first."""
    pool, loop, agent, worker, theirs = stand_in
    theirs.send(json.dumps({"t": "sign", "conn": 1}).encode())
    theirs.send(json.dumps({"t": "audit", "conn": 1, "outcome": "ok", "status": 200}).encode())
    theirs.send(json.dumps({"t": "audit", "conn": 2, "outcome": "ok"}).encode())  # not its own
    loop.watched[worker.control.fileno()]()
    assert pool.workers == []
    ((op, peer, fields),) = agent.audited
    assert (op, peer.pid, fields["outcome"], fields["status"]) == ("proxy", 4242, "ok", 200)


def test_a_dead_workers_requests_under_way_are_recorded_from_its_board(
    stand_in: StandIn,
) -> None:
    """A worker that dies with requests under way cannot send their entries: the agent
    reads them from its flight board and records each as cut, with the peer it accepted
    (not the worker's word). What is not one of its connections, or not an entry, is
    dropped; a slot emptied when its entry was sent records nothing."""
    pool, loop, agent, worker, theirs = stand_in
    memory = mmap.mmap(-1, 8 * BOARD_SLOT)
    board = FlightBoard(memory)
    entry = {"method": "GET", "path": "/api/v2/data/blob/9", "host": "h", "key_id": "k"}
    board.post({"conn": 1, "outcome": "ok", "status": 200, **entry})
    board.clear(board.post({"conn": 1, **entry}) or 0)  # sent already
    board.post({"conn": 2, **entry})  # not its connection
    board.post({"conn": 1, **entry, "status": "200"})  # not an entry
    start = board.post({"conn": 1, **entry}) or 0
    memory[start * BOARD_SLOT + 4] = ord("[")  # not JSON any more
    worker.board = memory
    worker.process.kill()  # it died, and its end of the control socket with it
    worker.process.wait()
    theirs.close()
    loop.watched[worker.control.fileno()]()
    assert pool.workers == []
    ((op, peer, fields),) = agent.audited
    assert (op, peer.pid, peer.exe) == ("proxy", 4242, "/usr/bin/curl")
    assert (fields["outcome"], fields["status"], fields["path"]) == ("cut", 200, entry["path"])
    assert worker.board is None


def test_publish_moves_the_generation_only_on_a_change(
    stand_in: StandIn,
) -> None:
    """The generation workers compare grants with changes when the agent's credentials
    token does, and only then."""
    pool, _, agent, _, _ = stand_in
    shared = pool.shared_generation()

    def generation() -> int:
        return int(GENERATION.unpack_from(shared)[0])

    start = generation()
    pool.publish()
    assert generation() == start
    agent.token += 1
    pool.publish()
    pool.publish()
    assert generation() == start + 1


def answers(theirs: socket.socket) -> list[dict[str, Any]]:
    """The messages the pool has sent a stand-in worker so far (its end, read here)."""
    theirs.setblocking(False)
    found = []
    with contextlib.suppress(BlockingIOError):
        while data := theirs.recv(65536):
            found.append(json.loads(data))
    return found


def authorize(theirs: socket.socket, conn: int, ask: int, **extra: Any) -> None:
    question = {"t": "authorize", "conn": conn, "ask": ask, "host": "h", "user": None}
    theirs.send(json.dumps({**question, "key_id": None, **extra}).encode())


def test_confirmed_keys_are_the_agents_record_not_the_workers(stand_in: StandIn) -> None:
    """Which keys the user confirmed on a connection is what the agent saw it lend, per
    connection: a worker claiming more is not believed, and a closed connection's record
    goes with it."""
    pool, loop, agent, worker, theirs = stand_in
    with socket.socket(fileno=os.dup(theirs.fileno())) as reader:
        authorize(theirs, 1, 1, confirmed=["e" * 64])  # a claim no worker makes any more
        loop.watched[worker.control.fileno()]()
        authorize(theirs, 1, 2)
        loop.watched[worker.control.fileno()]()
        (first, second) = [answer for answer in answers(reader) if answer["t"] == "answer"]
    assert [asked for _, asked in agent.asked] == [frozenset(), frozenset({"key 7, lock 0"})]
    assert first["grant"]["value"] == second["grant"]["value"] == "Bearer k"
    closed(theirs, 1)
    loop.watched[worker.control.fileno()]()
    assert pool.confirmed == {}


def test_a_confirmed_session_is_remembered_by_its_login(stand_in: StandIn) -> None:
    """A session the user allowed on a connection is remembered as the agent marked that
    login (no digest: a session has none), and the connection's next question says so."""
    _, loop, agent, worker, theirs = stand_in
    agent.session_mark = "session 9"
    with socket.socket(fileno=os.dup(theirs.fileno())) as reader:
        authorize(theirs, 1, 1)
        loop.watched[worker.control.fileno()]()
        authorize(theirs, 1, 2)
        loop.watched[worker.control.fileno()]()
        answered = [answer for answer in answers(reader) if answer["t"] == "answer"]
    assert [asked for _, asked in agent.asked] == [frozenset(), frozenset({"session 9"})]
    assert all(answer["grant"]["session"] for answer in answered)


def test_a_grant_carries_the_generation_it_was_lent_in(stand_in: StandIn) -> None:
    """A grant goes out with the generation the agent publishes, once any change since
    the last publish is counted."""
    pool, loop, agent, worker, theirs = stand_in
    shared = pool.shared_generation()
    agent.token += 1  # a change not yet published
    with socket.socket(fileno=os.dup(theirs.fileno())) as reader:
        authorize(theirs, 1, 1)
        loop.watched[worker.control.fileno()]()
        (answer,) = answers(reader)
    assert answer["grant"]["token"] == GENERATION.unpack_from(shared)[0] == 1


def test_audit_fields_longer_than_any_sent_are_cut_not_refused(stand_in: StandIn) -> None:
    """A user name of MAX_USER characters and an unusual method, as a tool may send them,
    are recorded (a field longer than the agent keeps is cut), and the worker stays."""
    pool, loop, agent, worker, theirs = stand_in
    theirs.send(json.dumps({
        "t": "audit", "conn": 1, "outcome": "unauthorized", "method": "UPDATEREDIRECTREF" * 4,
        "user": "u" * MAX_USER, "path": "/api/" + "p" * 2000, "status": 401,
    }).encode())  # fmt: skip
    loop.watched[worker.control.fileno()]()
    assert pool.workers == [worker]
    ((_, _, fields),) = agent.audited
    assert fields["user"] == "u" * MAX_USER
    assert fields["method"] == ("UPDATEREDIRECTREF" * 4)[:32]
    assert len(fields["path"]) == 600


def test_connections_wait_for_a_worker_to_be_ready(stand_in: StandIn) -> None:
    """A connection given to a worker that is still starting is held by the agent and
    handed over once the worker says it is ready."""
    pool, loop, _, _, _ = stand_in
    starting, starting_end = add_stand_in(pool, loop, 2, ready=False)
    pool.workers.reverse()  # a tie on connections: the first in the list takes it
    pool.max_workers = 2  # and no third one is started
    tool, agent_side = socket.socketpair()
    with tool:
        assert pool.admit(agent_side, Peer(4243, os.getuid(), os.getgid()))
        assert [sock for _, sock in starting.waiting] == [agent_side]
        starting_end.send(json.dumps({"t": "ready"}).encode())
        loop.watched[starting.control.fileno()]()
        assert starting.waiting == []
        assert agent_side.fileno() == -1  # handed over: the agent's copy is closed
    starting_end.close()


def test_a_worker_that_dies_before_ready_makes_the_socket_busy_for_a_while(
    stand_in: StandIn,
) -> None:
    """The connections waiting for a worker that exits before it is ready are answered
    busy, and no new worker is started (each would fail the same way) until the back-off
    has passed."""
    pool, loop, _, first, first_end = stand_in
    pool._let_go(first, "was told to go")  # only the starting worker is left
    starting, starting_end = add_stand_in(pool, loop, 2, ready=False)
    pool.max_workers = 1
    tool, agent_side = socket.socketpair()
    with tool:
        assert pool.admit(agent_side, Peer(4243, os.getuid(), os.getgid()))
        starting_end.close()  # as if it died during its imports
        starting.process.kill()
        starting.process.wait()  # its copy of the control socket is closed by now
        loop.watched[starting.control.fileno()]()
        assert pool.workers == []
        tool.settimeout(10)
        assert tool.recv(100) == BUSY
    other_tool, other_side = socket.socketpair()
    with other_tool, other_side:
        # Room for a worker, and none running: but the last one failed a moment ago.
        assert not pool.admit(other_side, Peer(4244, os.getuid(), os.getgid()))
        assert pool.workers == []
    first_end.close()


# --- credentials a connection keeps, and when it may not ---------------------------------


def post_head(conn: KeepAlive, body: bytes) -> None:
    """The head of a POST to the emulator's echo endpoint, without its body."""
    conn.sock.sendall(
        f"POST /conduce/api/v1/echo HTTP/1.1\r\nHost: {conn.host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    )


def status_line(conn: KeepAlive) -> bytes:
    data = b""
    while b"\r\n" not in data:
        chunk = conn.sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n", 1)[0]


def test_a_lock_while_a_body_arrives_stops_the_request(
    conduce_agent: AgentProcess, emulator: Emulator, connections: list[KeepAlive]
) -> None:
    """A request whose head came before the lock and whose body came after is refused
    (423): what goes out is what the agent lends when it is sent, and the service sees
    nothing."""
    conn = KeepAlive(http_path(conduce_agent), emulator.host)
    connections.append(conn)
    assert conn.get() == b"HTTP/1.1 200 OK"  # a grant the connection keeps
    body = b'{"x": 1}'
    post_head(conn, body)
    with conduce_agent.client() as client:
        client.lock("a passphrase")
    emulator.clear_requests()
    conn.sock.sendall(body)
    assert status_line(conn) == b"HTTP/1.1 423 Locked"
    assert emulator.requests == []


def test_a_new_login_replaces_the_cookie_a_connection_kept(
    conduce_agent: AgentProcess, emulator: Emulator, connections: list[KeepAlive]
) -> None:
    """Logging in again while a session is live gives a new cookie, and a keep-alive
    connection uses it from its next request on (not the old one, which the service may
    have ended)."""

    def login() -> None:
        result = run_ctl(
            conduce_agent.socket_path, "--host", emulator.host, "--user", USER, "login",
            "--password-stdin", stdin=PASSWORD + "\n",
        )  # fmt: skip
        assert result.code == 0, result.err

    login()
    conn = KeepAlive(http_path(conduce_agent), emulator.host)
    connections.append(conn)
    assert conn.get() == b"HTTP/1.1 200 OK"
    assert emulator.expire_sessions(USER) == 1  # the service ends the first session...
    login()  # ...and the user logs in again before the agent noticed
    emulator.clear_requests()
    assert conn.get() == b"HTTP/1.1 200 OK"
    assert [record.auth for record in emulator.requests] == ["cookie"]


def test_one_question_at_a_time_per_connection(stand_in: StandIn) -> None:
    """While the agent is still answering a connection's question (askpass, say), another
    question for that connection is answered busy at once, not queued; once the first is
    answered, the connection may ask again."""
    pool, loop, agent, worker, theirs = stand_in
    loop.holding = True
    with socket.socket(fileno=os.dup(theirs.fileno())) as reader:
        authorize(theirs, 1, 1)
        authorize(theirs, 1, 2)
        loop.watched[worker.control.fileno()]()
        (busy,) = answers(reader)
        assert (busy["ask"], busy["error"][0]) == (2, "busy")
        (call, done) = loop.held.pop()
        done(call(), None)
        loop.holding = False
        authorize(theirs, 1, 3)
        loop.watched[worker.control.fileno()]()
        assert [(answer["ask"], "grant" in answer) for answer in answers(reader)] == [
            (1, True), (3, True),
        ]  # fmt: skip
    assert pool.workers == [worker]
    assert len(agent.asked) == 2


def test_audit_entries_sent_before_the_stop_are_recorded(stand_in: StandIn) -> None:
    """At the agent's exit the audit entries a worker sent but the loop did not read yet are
    recorded, and nothing else it sent is acted on."""
    pool, loop, agent, _, theirs = stand_in
    theirs.send(json.dumps({"t": "audit", "conn": 1, "outcome": "ok", "method": "GET"}).encode())
    authorize(theirs, 1, 1)
    pool.close()
    ((op, peer, fields),) = agent.audited
    assert (op, peer.pid, fields["outcome"]) == ("proxy", 4242, "ok")
    assert loop.calls == []
