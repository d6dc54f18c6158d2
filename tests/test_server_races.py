"""The event loop under races: clients that hang up at once, far deadlines, a lock that
overtakes a reply, local work beside hung network calls, and the reply memo.

Real agent processes wherever the behaviour is seen from outside; an in-process server on a
real socket where the test must reach inside (a fake clock, accounts that hang on an event,
the in-memory keyring, the memo itself). Nothing sleeps: every wait is on a socket, an event
or a round trip, with a deadline.
"""

from __future__ import annotations

import calendar
import contextlib
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from keyagent import errors, protocol
from keyagent.agent import Agent
from keyagent.client import Client
from keyagent.effects import Work
from keyagent.persist import KeyringStore
from keyagent.protocol import MAX_LIFETIME
from keyagent.server import LOCAL_QUEUES, Limits, Server
from keyagent.sockets import bind_listener
from keyagent.store import key_id_for
from keyagent.testing.agent import AgentProcess
from keyagent.testing.emulator import Fault
from keyagent.testing.emulator_process import Emulator, EmulatorProcess
from keyagent.testing.memory_keyring import MemoryKeyring

from .conftest import AgentFactory, Raw, decode, error_code, wait_until
from .fakes import FakeAccount, FakeTime, run, steps

USER = "races@example.com"
PASSWORD = "races-pa55w0rd"
PASSPHRASE = "races passphrase"
DAY = 86400.0
ROUNDS = 40


def request(op: str, request_id: protocol.Scalar = None, **args: Any) -> bytes:
    return protocol.encode_request(op, request_id, args)


def send_and_hang_up(path: str, data: bytes) -> None:
    """Connect, write ``data`` and close at once, reading nothing."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(data)


def expires_in(listed: dict[str, Any]) -> float:
    """Seconds from now until a listed key's ``expires`` (an ISO 8601 UTC time)."""
    expires = listed["expires"]
    assert isinstance(expires, str), listed
    return calendar.timegm(time.strptime(expires, "%Y-%m-%dT%H:%M:%SZ")) - time.time()


@dataclass
class Serving:
    """A Server running in a thread of the test process, on a real socket."""

    socket_path: str
    agent: Agent
    server: Server
    thread: threading.Thread
    failures: list[BaseException]

    def client(self, timeout: float = 30.0) -> Client:
        return Client(self.socket_path, timeout=timeout)

    def alive(self) -> bool:
        return self.thread.is_alive() and not self.failures


@contextlib.contextmanager
def serving(path: Path, agent: Agent, limits: Limits | None = None) -> Iterator[Serving]:
    """Serve ``agent`` on ``path`` in a thread; stopped with a ``stop`` request at the end."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    agent.socket_path = str(path)
    listener = bind_listener(str(path))
    server = Server(agent, listener, limits=limits)
    failures: list[BaseException] = []
    ready = threading.Event()
    server.on_ready = ready.set

    def run() -> None:
        try:
            server.serve_forever()
        except BaseException as error:  # noqa: BLE001  # reported by the test, not as a warning
            failures.append(error)

    thread = threading.Thread(target=run, name="in-process-agent", daemon=True)
    thread.start()
    try:
        assert ready.wait(10), "the in-process server did not start"
        yield Serving(str(path), agent, server, thread, failures)
    finally:
        if thread.is_alive():
            with Client(str(path), timeout=10) as client:
                client.stop()
        thread.join(10)
        listener.close()
    assert not failures, f"the in-process server failed: {failures!r}"
    assert not thread.is_alive(), "the in-process server did not stop"


# --- a request followed at once by a hang-up (review item 7) --------------------------------------


@pytest.mark.parametrize("op", ["lock", "forget"])
def test_a_request_sent_just_before_hanging_up_runs_exactly_once(
    agent_factory: AgentFactory, op: str
) -> None:
    """Forty clients that each write lock (or forget --all) and close at once all have it
    applied, each request exactly once, whatever order the agent sees data and hang-up in."""
    agent = agent_factory("--no-keyring")
    with agent.client() as client:
        for n in range(ROUNDS):
            passphrase = f"{PASSPHRASE} {n}"
            if op == "lock":
                line = request("lock", f"gone-{n}", passphrase=passphrase)
            else:
                client.add("h.example", USER, f"key-{n:02d}")
                line = request("forget", f"gone-{n}", all=True)
            send_and_hang_up(agent.socket_path, line)
            if op == "lock":
                wait_until(lambda: client.status()["locked"] is True, f"lock {n} applied")
                client.unlock(passphrase)  # it was that client's lock
            else:
                wait_until(lambda: client.list() == [], f"forget {n} applied")
    log = agent.log()
    for n in range(ROUNDS):
        assert log.count(f"op={op} id='gone-{n}' ") == 1, n
    assert agent.process is not None
    assert agent.process.poll() is None


def test_lines_queued_behind_slow_work_run_after_the_client_hung_up(
    agent_factory: AgentFactory,
) -> None:
    """Pipelined lines behind a lock (key derivation on a worker) and an unlock still run, in
    order and once each, when the client hangs up before any reply."""
    agent = agent_factory("--no-keyring")
    with agent.client() as client:
        for n in range(10):
            secret = f"pipelined-key-{n:02d}"
            send_and_hang_up(
                agent.socket_path,
                request("lock", f"l{n}", passphrase=PASSPHRASE)
                + request("unlock", f"u{n}", passphrase=PASSPHRASE)
                + request("add", f"a{n}", host="h.example", user=USER, key=secret)
                + request("hello", f"h{n}")[:-5],  # half a line: never a request
            )

            def added(secret: str = secret) -> bool:
                with contextlib.suppress(errors.Locked):  # between its lock and its unlock
                    return key_id_for(secret) in {k["key_id"] for k in client.list()}
                return False

            wait_until(added, f"round {n}: the key added after lock and unlock")
            assert client.status()["locked"] is False
    log = agent.log()
    for n in range(10):
        for request_id in (f"l{n}", f"u{n}", f"a{n}"):
            assert log.count(f" id='{request_id}' ") == 1, request_id
        assert f"id='h{n}'" not in log


def test_a_hung_up_client_whose_lines_went_unread_is_still_served(tmp_path: Path) -> None:
    """A client that stopped reading (so the agent stopped reading it) and then hangs up
    still gets every complete line it sent run: each of its adds is held afterwards."""
    agent = Agent()
    limits = Limits(max_pending_output=4096)
    with (
        serving(tmp_path / "a" / "agent.sock", agent, limits) as served,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock,
    ):
        sock.connect(served.socket_path)
        # Many listings whose replies are never read, then adds: the agent stops reading
        # this client long before it reaches the adds.
        with served.client() as client:
            for n in range(20):
                client.add("h.example", USER, f"filler-{n:02d}", description="d" * 200)
        lines = request("list", "l") * 300 + b"".join(
            request("add", n, host="x.example", user=USER, key=f"late-{n:03d}") for n in range(50)
        )
        sock.setblocking(False)
        sent = 0
        with contextlib.suppress(BlockingIOError):
            while sent < len(lines):
                sent += sock.send(lines[sent:])
        # All of it reached the agent's socket (its receive buffer is large enough), or
        # the test would not say what it claims.
        assert sent == len(lines)
        sock.close()
        with served.client() as client:
            wait_until(
                lambda: len(client.list(host="x.example")) == 50, "every add of the gone client"
            )
        assert served.alive()


# --- deadlines past epoll's limit (review item 14) ------------------------------------------------


def add_then_leave(agent: AgentProcess, *adds: dict[str, Any]) -> list[dict[str, Any]]:
    """Add keys on one connection, then hang up and wait until the agent has closed it too:
    with no connection left, a key's deadline is all the agent's next wait depends on."""
    raw = Raw(agent.socket_path)
    try:
        raw.send(b"".join(request("add", n, **add) for n, add in enumerate(adds)))
        replies = [decode(raw.line()) for _ in adds]
        raw.sock.shutdown(socket.SHUT_WR)
        assert raw.closed_by_peer()
    finally:
        raw.close()
    assert all(reply["ok"] for reply in replies), replies
    return [reply["result"] for reply in replies]


def still_serving(agent: AgentProcess) -> dict[str, dict[str, Any]]:
    """The keys the agent lists, by key id, after checking it is alive and answering."""
    with agent.client() as client:
        assert client.hello()["protocol"] == 1
        listed = {k["key_id"]: k for k in client.list()}
    assert agent.process is not None
    assert agent.process.poll() is None
    return listed


@pytest.mark.parametrize("lifetime", [30 * DAY, 365 * DAY, MAX_LIFETIME], ids=["30d", "1y", "10y"])
def test_far_lifetimes_are_held_and_the_agent_goes_on(
    agent_factory: AgentFactory, lifetime: float
) -> None:
    """A key living 30 days, a year or ten years (past epoll's 24.9-day limit) is held with
    the right expiry, and the agent keeps serving once nothing but that key is left to wait
    on."""
    agent = agent_factory("--no-keyring")
    add_then_leave(
        agent, {"host": "h.example", "user": USER, "key": "far-key", "lifetime": lifetime}
    )
    listed = still_serving(agent)
    assert abs(expires_in(listed[key_id_for("far-key")]) - lifetime) < 120


def test_a_far_default_lifetime_does_not_stop_the_agent(agent_factory: AgentFactory) -> None:
    """keyagent -t 30d, then an add without a lifetime: held for 30 days, agent serving."""
    agent = agent_factory("--no-keyring", "-t", "30d")
    add_then_leave(agent, {"host": "h.example", "user": USER, "key": "default-lifetime-key"})
    (listed,) = still_serving(agent).values()
    assert abs(expires_in(listed) - 30 * DAY) < 120


def test_a_far_idle_timeout_with_an_idle_connection(agent_factory: AgentFactory) -> None:
    """--idle-timeout 30d with a connection left idle: the agent goes on serving, and the
    idle connection too."""
    agent = agent_factory("--no-keyring", "--idle-timeout", "30d")
    idle = Raw(agent.socket_path)
    try:
        with agent.client() as client:  # the idle one was accepted first: it is in the wait
            assert client.hello()["protocol"] == 1
            assert client.hello()["protocol"] == 1
        idle.send(request("hello", "idle"))
        assert decode(idle.line())["id"] == "idle"
    finally:
        idle.close()
    assert agent.process is not None
    assert agent.process.poll() is None


def test_a_persisted_far_key_survives_a_restart(tmp_path: Path) -> None:
    """Keys persisted with lifetimes of 30 days, a year and ten years come back after a
    restart, and the restarted agent serves on (a far key once made every start crash)."""
    backend = MemoryKeyring()
    lifetimes = {"k30d": 30 * DAY, "k1y": 365 * DAY, "k10y": MAX_LIFETIME}
    path = tmp_path / "persist" / "agent.sock"
    with serving(path, Agent(keyring=KeyringStore(backend))) as first, first.client() as client:
        for secret, lifetime in lifetimes.items():
            client.add("h.example", USER, secret, lifetime=lifetime, persist=True)
        assert client.hello()["protocol"] == 1
    # A fresh agent, started the way the daemon starts one: the persisted keys read back.
    restarted = Agent(keyring=KeyringStore(backend))
    live, _ = KeyringStore(backend).load_all(time.time())
    assert restarted.restore(live) == len(lifetimes)
    with serving(path, restarted) as second, second.client(timeout=10) as client:
        assert client.hello()["protocol"] == 1
        listed = {k["key_id"]: k for k in client.list()}
        assert client.get(key_id=key_id_for("k10y")) == "k10y"
        assert second.alive()
    for secret, lifetime in lifetimes.items():
        assert abs(expires_in(listed[key_id_for(secret)]) - lifetime) < 120, secret


# --- a lock that overtakes a reply carrying a secret (review item 17) -----------------------------


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    """A loopback HTTPS Conduce emulator process with one account."""
    with EmulatorProcess(USER, PASSWORD) as emu:
        try:
            yield emu
        finally:
            emu.clear_faults()
            emu.release()


def test_a_create_with_reveal_finishing_after_a_lock_reveals_nothing(
    agent_factory: AgentFactory, emulator: Emulator
) -> None:
    """A create --reveal that waits on the service while the agent is locked is answered
    'locked', with no key in the reply; the key is held and served after unlock."""
    agent = agent_factory("--no-keyring", "--ca-bundle", emulator.ca_path, "--read-timeout", "30")
    with agent.client() as client:
        client.login(emulator.host, USER, PASSWORD)
    emulator.inject(Fault.hang(), path="apikeys/create", count=1)
    creating = Raw(agent.socket_path, timeout=30)
    try:
        creating.send(request("create", "c", host=emulator.host, user=USER, reveal=True))
        assert emulator.wait_for_hung(1, timeout=10)
        with agent.client() as client:
            client.lock(PASSPHRASE)  # answered while the create still waits on the service
        emulator.release()
        line = creating.line()
    finally:
        creating.close()
    (created,) = emulator.api_keys(USER)
    reply = decode(line)
    assert error_code(reply) == "locked"
    assert "result" not in reply
    assert created.encode() not in line
    message = reply["error"]["message"]
    assert f"keyagent-ctl get --key-id {key_id_for(created)}" in message
    assert "unlock" in message
    with agent.client() as client:
        client.unlock(PASSPHRASE)
        assert client.get(key_id=key_id_for(created)) == created


def test_a_lock_closes_connections_whose_unread_replies_hold_keys(tmp_path: Path) -> None:
    """Replies with a key queued for a client that stopped reading are not delivered after a
    lock: the agent closes that connection, and no key is left waiting in its buffers."""
    big_key = "K" * 8000
    with serving(tmp_path / "run" / "agent.sock", Agent()) as served:
        with served.client() as client:
            client.add("h.example", USER, big_key)
        stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(served.socket_path)
        try:
            stalled.sendall(b"".join(request("get", n) for n in range(400)))

            def queued() -> list[bytearray]:
                return [conn.outbuf for conn in list(served.server.connections.values())]

            with served.client() as client:  # each round trip is the wait
                wait_until(
                    lambda: (
                        client.hello() is not None
                        and any(b'"key":' in outbuf for outbuf in queued())
                    ),
                    "replies with the key queued for the stalled client",
                )
                client.lock(PASSPHRASE)
                assert not any(b'"key":' in outbuf for outbuf in queued())
                assert client.status()["locked"] is True
            stalled.settimeout(10)
            while stalled.recv(65536):  # what the kernel already held, then the agent's close
                pass
        finally:
            stalled.close()


# --- local work beside hung network calls (review item 18) ----------------------------------------


def test_local_work_is_on_the_queues_that_have_threads_of_their_own() -> None:
    """lock, unlock and every keyring step are queued where the server runs them on threads
    of their own; Conduce calls are not."""
    agent = Agent(
        clock=FakeTime().clock(),
        keyring=KeyringStore(MemoryKeyring()),
        accounts=lambda host, user: FakeAccount(),
    )

    def queue_of(op: str, **args: Any) -> str | None:
        handler = steps(agent, op, **args)
        work = next(handler)
        assert isinstance(work, Work), op
        handler.close()  # its work is not done: the agent stays as it was
        return work.queue

    assert queue_of("add", host="h", user="u", key="k", persist=True) in LOCAL_QUEUES
    assert queue_of("forget", all=True, persist=True) in LOCAL_QUEUES
    assert queue_of("lock", passphrase=PASSPHRASE) in LOCAL_QUEUES
    assert queue_of("login", host="h", user="u", password="pw") not in LOCAL_QUEUES
    run(agent, "lock", passphrase=PASSPHRASE)
    assert queue_of("unlock", passphrase=PASSPHRASE) in LOCAL_QUEUES


class HangingAccount(FakeAccount):
    """A Conduce account whose login hangs until ``release`` is set."""

    def __init__(self, release: threading.Event, hung: threading.Semaphore) -> None:
        super().__init__(password=PASSWORD)
        self.release = release
        self.hung = hung

    def login(self, password: str) -> None:
        self.hung.release()
        self.release.wait()
        super().login(password)


def test_lock_unlock_and_keyring_work_never_wait_behind_hung_remote_calls(
    tmp_path: Path,
) -> None:
    """With every network worker stuck in a Conduce call (and more calls queued), lock, unlock,
    a persisted add and forget --persist are all answered before any stuck call returns."""
    release, hung = threading.Event(), threading.Semaphore(0)
    workers = Limits().workers
    agent = Agent(
        accounts=lambda host, user: HangingAccount(release, hung),
        keyring=KeyringStore(MemoryKeyring()),
    )
    # If local work did wait behind the network, the hung calls are let go eventually, and
    # the ordering check below says so instead of the test hanging.
    watchdog = threading.Timer(20, release.set)
    with contextlib.ExitStack() as stack:
        served = stack.enter_context(serving(tmp_path / "r" / "agent.sock", agent))
        stack.callback(release.set)
        stack.callback(watchdog.cancel)
        logins = []
        for n in range(workers + 2):  # one account each: their calls do not queue up
            raw = Raw(served.socket_path, timeout=30)
            stack.callback(raw.close)
            raw.send(request("login", n, host="h.example", user=f"u{n}@x", password=PASSWORD))
            logins.append(raw)
        for _ in range(workers):
            assert hung.acquire(timeout=10), "the remote calls never started"
        watchdog.start()
        with served.client() as client:
            client.lock(PASSPHRASE)
            client.unlock(PASSPHRASE)
            client.add("h.example", USER, "persisted-key", persist=True)
            assert client.forget(all=True, persist=True) == 1
        assert not release.is_set(), "local work waited until the remote calls were let go"
        assert select.select([raw.sock for raw in logins], [], [], 0)[0] == []
        release.set()
        for n, raw in enumerate(logins):
            reply = decode(raw.line())
            assert (reply["id"], reply["ok"]) == (n, True)


# --- the reply memo never outlives the keys (review item 10) --------------------------------------


def memo_holds(served: Serving, secret: str) -> bool:
    return any(secret.encode() in reply for reply, _ in served.server._memo.values())


def test_the_memo_is_dropped_at_once_by_forget_lock_and_expiry(tmp_path: Path) -> None:
    """Remembered get replies, which hold secrets, are gone from the server's memory as soon
    as forget, lock or an expiry has happened, not at the next read."""
    fake = FakeTime()
    with serving(tmp_path / "m" / "agent.sock", Agent(clock=fake.clock())) as served:
        assert served.server._memo_enabled, "debug logging is on: nothing is remembered"
        getter = Raw(served.socket_path)

        def get() -> dict[str, Any]:
            getter.send(request("get", 1))
            return decode(getter.line())

        with served.client() as client:
            for case in ("forget", "lock", "expiry"):
                secret = f"memo-{case}-S3CR3T"
                client.add("h.example", USER, secret, lifetime=60 if case == "expiry" else None)
                assert get()["result"]["key"] == secret
                assert get()["result"]["key"] == secret  # the second one from the memo
                assert memo_holds(served, secret)
                if case == "forget":
                    client.forget(all=True)
                elif case == "lock":
                    client.lock(PASSPHRASE)
                else:
                    fake.advance(61)
                    client.status()  # a request (not remembered itself) on the new time
                assert not memo_holds(served, secret), case
                assert served.server._memo == {}, case
                if case == "lock":
                    assert error_code(get()) == "locked"
                    client.unlock(PASSPHRASE)
                    assert get()["result"]["key"] == secret
                    client.forget(all=True)
                else:
                    assert error_code(get()) == "not_found"
        getter.close()
