"""The hardening suite: load, slow and vanishing clients, service and keyring faults, secrets.

Real agent processes (and a real Conduce emulator process) wherever the behaviour is seen from
outside; an in-process server on a real socket where the fault must be injected inside the
agent (the OS keyring). Nothing sleeps: every wait is on a socket, a process or an event, with
a deadline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import select
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from keyagent import errors, protocol
from keyagent.agent import Agent
from keyagent.client import Client
from keyagent.errors import Busy, Timeout
from keyagent.persist import KeyringStore
from keyagent.server import Limits, Server
from keyagent.sockets import bind_listener
from keyagent.store import digest_of, key_id_for
from keyagent.testing.agent import AgentProcess, wait_for_exit
from keyagent.testing.emulator import Fault
from keyagent.testing.emulator_process import Emulator, EmulatorProcess
from keyagent.testing.memory_keyring import MemoryKeyring

from .conftest import AgentFactory, Raw, decode, error_code

USER = "hardening@example.com"
PASSWORD = "hardening-pa55w0rd-never-leaks"


# --- shared helpers ----------------------------------------------------------------------------


@pytest.fixture
def closing() -> Iterator[contextlib.ExitStack]:
    """Sockets and other resources a test opens; all closed at the end, pass or fail."""
    with contextlib.ExitStack() as stack:
        yield stack


def connect(stack: contextlib.ExitStack, path: str, timeout: float = 10.0) -> Raw:
    """A bare connection to ``path`` that the test's ``closing`` stack closes."""
    raw = Raw(path, timeout)
    stack.callback(raw.close)
    return raw


def request(op: str, request_id: protocol.Scalar = None, **args: Any) -> bytes:
    return protocol.encode_request(op, request_id, args)


def read_until_eof(sock: socket.socket, deadline: float) -> bytes:
    """Everything the peer sends until it closes; fails if it is still open at ``deadline``."""
    data = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"connection still open at its deadline (got {bytes(data)!r})"
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(data)
        except TimeoutError:
            continue
        if not chunk:
            return bytes(data)
        data += chunk


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid``, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


@pytest.fixture
def descriptors() -> Iterator[Callable[[int], None]]:
    """Raise this process's RLIMIT_NOFILE for a test (agents started after inherit it)."""
    original = resource.getrlimit(resource.RLIMIT_NOFILE)

    def ensure(needed: int) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or soft >= needed:
            return
        if hard != resource.RLIM_INFINITY and hard < needed:
            try:  # root may raise the hard limit too
                resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            except (ValueError, OSError):
                pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below the {needed} needed")
            return
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))

    yield ensure
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, original)


# --- load: a thousand connections at once ------------------------------------------------------


@dataclass(eq=False)
class Scripted:
    """One connection running a fixed list of requests, each checked against its reply."""

    sock: socket.socket
    steps: list[tuple[bytes, Callable[[dict[str, Any]], None]]]
    step: int = 0
    buffer: bytes = b""

    @property
    def done(self) -> bool:
        return self.step >= len(self.steps)

    def send_next(self) -> None:
        self.sock.sendall(self.steps[self.step][0])

    def take_reply(self, line: bytes) -> None:
        self.steps[self.step][1](decode(line))
        self.step += 1


def run_scripts(scripts: Sequence[Scripted], timeout: float) -> None:
    """Run every script at once, one request in flight per connection, replies checked."""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        for script in scripts:
            selector.register(script.sock, selectors.EVENT_READ, script)
            script.send_next()
        pending = len(scripts)
        while pending:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{pending} connection(s) still waiting for replies"
            for key, _ in selector.select(remaining):
                ready: Scripted = key.data
                chunk = ready.sock.recv(65536)
                assert chunk, f"the agent closed a connection at step {ready.step}"
                ready.buffer += chunk
                while b"\n" in ready.buffer and not ready.done:
                    line, _, ready.buffer = ready.buffer.partition(b"\n")
                    ready.take_reply(line)
                    if not ready.done:
                        ready.send_next()
                if ready.done:
                    selector.unregister(ready.sock)
                    pending -= 1


def ok_with(check: Callable[[dict[str, Any]], bool], request_id: int) -> Callable[..., None]:
    def verify(reply: dict[str, Any]) -> None:
        assert reply["id"] == request_id, reply
        assert reply["ok"] is True, reply
        assert check(reply["result"]), reply

    return verify


def load_script(sock: socket.socket, n: int) -> Scripted:
    host, secret = f"load-{n}.example", f"load-key-{n:04d}-S3CR3T"
    key_id = key_id_for(secret)
    base = n * 10
    return Scripted(
        sock,
        [
            (request("hello", base), ok_with(lambda r: r["protocol"] == 1, base)),
            (
                request("add", base + 1, host=host, user=USER, key=secret),
                ok_with(lambda r: r["key_id"] == key_id, base + 1),
            ),
            (
                request("get", base + 2, host=host),
                ok_with(lambda r: r == {"key": secret, "key_id": key_id}, base + 2),
            ),
            (
                request("list", base + 3, host=host, user=USER),
                ok_with(lambda r: [k["key_id"] for k in r["keys"]] == [key_id], base + 3),
            ),
            (
                request("forget", base + 4, key_id=key_id),
                ok_with(lambda r: r["forgotten"] == 1, base + 4),
            ),
        ],
    )


def test_a_thousand_simultaneous_connections_are_all_served(
    agent_factory: AgentFactory,
    descriptors: Callable[[int], None],
    closing: contextlib.ExitStack,
) -> None:
    """1,000 connections open at the same time, each making five requests, all get right answers."""
    count = 1000
    descriptors(count + 256)
    agent = agent_factory("--max-connections", "1100")
    socks = []
    for _ in range(count):  # every connection is open before the first request is sent
        sock = closing.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        sock.settimeout(10)
        sock.connect(agent.socket_path)
        socks.append(sock)
    run_scripts([load_script(sock, n) for n, sock in enumerate(socks)], timeout=60)
    # Still all open and all served: one more request on every connection.
    finals = [
        Scripted(sock, [(request("hello", -n), ok_with(lambda r: r["protocol"] == 1, -n))])
        for n, sock in enumerate(socks)
    ]
    run_scripts(finals, timeout=30)
    with agent.client() as client:
        assert client.list() == []
    assert "refused connection" not in agent.log()


# --- slowloris ---------------------------------------------------------------------------------

LINE_TIMEOUT = 1.0
IDLE_TIMEOUT = 2.0
# How late a close may come after its deadline on a loaded two-core CI machine.
SLACK = 2.0
# How early: both processes read the same monotonic clock, but the agent reads it once per
# wake-up, so its idea of when bytes arrived can be a little older than the bytes.
EARLY = 0.1
SLOW_CONNECTIONS = 200
WELL_BEHAVED = 2
EXTRA_CONNECTIONS = 20


@dataclass(eq=False)
class SlowClient:
    """One hostile connection, after one complete request. ``trickle`` sends a line a byte at
    a time; ``half`` sends most of a 64 KiB line, then nothing; ``silent`` sends nothing;
    ``deaf`` pipelines requests with large replies and never reads them."""

    kind: str
    sock: socket.socket
    payload: bytes = b""
    """What a trickle has still to send, a byte at a time."""
    sent_hello: float = 0.0
    answered: float = 0.0
    """When the reply to its one complete request arrived."""
    line_started: float | None = None
    """When the first byte of its unfinished line was sent (``deaf``: of its requests)."""
    sent_all: float = 0.0
    next_byte: float = float("inf")
    received: bytearray = field(default_factory=bytearray)
    closed_at: float | None = None

    @property
    def trickling(self) -> bool:
        return bool(self.payload) and self.closed_at is None and not self.received


class WellBehaved:
    """Clients on their own connections doing hello/add/get/list in a loop, until stopped.

    Each round's end time and any failure are recorded; nothing is raised in the threads.
    """

    def __init__(self, socket_path: str, count: int) -> None:
        self.socket_path = socket_path
        self.failures: list[str] = []
        self.rounds: list[float] = []
        self._stop = threading.Event()
        self._connected = threading.Barrier(count + 1)
        self._threads = [
            threading.Thread(target=self._run, args=(n,), name=f"well-behaved-{n}", daemon=True)
            for n in range(count)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()
        self._connected.wait(10)  # each thread has connected and been answered once

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in self._threads)

    def _run(self, n: int) -> None:
        host, secret = f"wb-{n}.example", f"well-behaved-{n}-S3CR3T"
        key_id = key_id_for(secret)
        with Client(self.socket_path, timeout=10) as client:
            try:
                client.hello()
            except errors.KeyagentError as error:
                self.failures.append(f"client {n}: first hello: {error.code}")
            self._connected.wait(10)
            while not self._stop.is_set():
                try:
                    assert client.hello()["protocol"] == 1
                    assert client.add(host, USER, secret)["key_id"] == key_id
                    assert client.get(host=host) == secret
                    assert [k["key_id"] for k in client.list(host=host)] == [key_id]
                except (errors.KeyagentError, AssertionError) as error:
                    self.failures.append(f"client {n}: {type(error).__name__}: {error}")
                    return
                self.rounds.append(time.monotonic())
                self._stop.wait(0.01)  # pacing, and the stop signal


def free_slot_is_usable(path: str, stack: contextlib.ExitStack) -> None:
    """A new connection is served; then the agent itself closes it (too_large), so the slot is
    free again by the time this returns (a client-side close would race with what follows)."""
    probe = connect(stack, path)
    probe.send(request("hello", "probe"))
    assert probe.reply()["ok"] is True
    probe.send(b"x" * (protocol.MAX_LINE + 1))
    assert error_code(probe.reply()) == "too_large"
    assert probe.closed_by_peer()


DEAF_HOST = "deaf.example"


def slow_round(agent: AgentProcess, stack: contextlib.ExitStack) -> tuple[list[SlowClient], float]:
    """Open the hostile connections, check the cap, and wait until the agent has closed them.

    Returns the slow clients (for their timings) and when the first of them was cut off.
    """
    path = agent.socket_path
    kinds = ["trickle", "half", "silent", "deaf", "half"]
    with contextlib.ExitStack() as sockets:
        slow = []
        for n in range(SLOW_CONNECTIONS):
            sock = sockets.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            sock.settimeout(10)
            sock.connect(path)
            slow.append(SlowClient(kinds[n % len(kinds)], sock))
        # Each has one complete request answered first: proof that the agent admitted it.
        for n, client in enumerate(slow):
            client.sent_hello = time.monotonic()
            client.sock.sendall(request("hello", n))
        for n, client in enumerate(slow):
            buffer = b""
            while not buffer.endswith(b"\n"):
                chunk = client.sock.recv(4096)
                assert chunk, "a slow client was closed before its first reply"
                buffer += chunk
            client.answered = time.monotonic()
            assert decode(buffer.rstrip(b"\n"))["id"] == n

        # The cap is reached: further connections get one 'busy' line and are closed.
        busy_line = protocol.encode_error(None, Busy())
        for _ in range(EXTRA_CONNECTIONS):
            extra = sockets.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            extra.connect(path)
            assert read_until_eof(extra, time.monotonic() + 10) == busy_line

        # Now the slow part; trickles send a byte every 0.1 s from here on.
        start = time.monotonic()
        listing = request("list", "deaf", host=DEAF_HOST) * 40  # about 1.4 MB of replies
        for client in slow:
            client.sock.setblocking(False)
            if client.kind == "trickle":
                client.payload = b'{"id": "trickle", "op": "hello", "pad": "' + b"." * 100
                client.next_byte = start
            elif client.kind == "half":
                client.line_started = time.monotonic()
                client.sock.send(b'{"id": "half", "op": "get", "host": "' + b"h" * 60_000)
            elif client.kind == "deaf":
                client.line_started = time.monotonic()
                client.sock.send(listing)
                client.sent_all = time.monotonic()

        # Closes are seen with POLLRDHUP, so a deaf client is never read from.
        poller = select.poll()
        by_fd = {client.sock.fileno(): client for client in slow}
        for client in slow:
            events = select.POLLRDHUP if client.kind == "deaf" else select.POLLIN
            poller.register(client.sock, events)
        first_cut: float | None = None
        deadline = start + max(LINE_TIMEOUT, IDLE_TIMEOUT) + SLACK + 5.0
        open_count = len(slow)
        while open_count:
            now = time.monotonic()
            assert now < deadline, f"{open_count} slow connection(s) still open"
            for client in slow:
                if client.trickling and client.next_byte <= now:
                    if client.line_started is None:
                        client.line_started = time.monotonic()
                    with contextlib.suppress(BlockingIOError, BrokenPipeError):
                        client.sock.send(client.payload[:1])
                    client.payload = client.payload[1:]
                    client.next_byte = now + 0.1
            wake = min((c.next_byte for c in slow if c.trickling), default=deadline)
            timeout = max(0.0, min(wake, deadline) - time.monotonic())
            for fd, _ in poller.poll(timeout * 1000):
                client = by_fd[fd]
                chunk = b""
                if client.kind != "deaf":
                    with contextlib.suppress(ConnectionResetError):
                        chunk = client.sock.recv(65536)
                if chunk:
                    client.received += chunk
                    first_cut = first_cut or time.monotonic()
                    continue
                client.closed_at = time.monotonic()
                first_cut = first_cut or client.closed_at
                poller.unregister(fd)
                open_count -= 1
    free_slot_is_usable(path, stack)
    return slow, first_cut or deadline


def check_slow_clients(slow: list[SlowClient]) -> None:
    timeout_line = protocol.encode_error(None, Timeout())
    for client in slow:
        assert client.closed_at is not None
        if client.kind == "silent":
            # Idle: closed without a word, not before --idle-timeout and not long after.
            assert client.received == b""
            assert client.closed_at >= client.sent_hello + IDLE_TIMEOUT - EARLY
            assert client.closed_at <= client.answered + IDLE_TIMEOUT + SLACK
        elif client.kind == "deaf":
            # No longer read from once its replies pile up, then closed as idle.
            assert client.line_started is not None
            assert client.closed_at >= client.line_started + IDLE_TIMEOUT - EARLY
            assert client.closed_at <= client.sent_all + IDLE_TIMEOUT + SLACK
        else:
            # Half a line, or a line trickled a byte at a time: trickling does not extend the
            # deadline, which runs from the line's first byte.
            assert client.line_started is not None
            assert bytes(client.received) == timeout_line, client.kind
            assert client.closed_at >= client.line_started + LINE_TIMEOUT - EARLY, client.kind
            assert client.closed_at <= client.line_started + LINE_TIMEOUT + SLACK, client.kind


def test_slowloris_clients_are_cut_off_on_time_and_hold_up_no_one(
    agent_factory: AgentFactory,
    descriptors: Callable[[int], None],
    closing: contextlib.ExitStack,
) -> None:
    """200 slow clients get timeout (or an idle close) on time, extras get busy, others are served,
    and the agent's memory goes back to its idle level afterwards."""
    descriptors(SLOW_CONNECTIONS * 2 + 256)
    cap = SLOW_CONNECTIONS + WELL_BEHAVED
    agent = agent_factory(
        "--line-timeout", str(LINE_TIMEOUT),
        "--idle-timeout", str(IDLE_TIMEOUT),
        "--max-connections", str(cap),
    )  # fmt: skip
    with agent.client() as client:  # what the deaf clients list, about 35 KB a time
        for n in range(30):
            client.add(DEAF_HOST, USER, f"deaf-filler-{n:02d}", description="d" * 1000)
    well_behaved = WellBehaved(agent.socket_path, WELL_BEHAVED)
    well_behaved.start()
    try:
        # Warm-up: one full round, so that the agent's idle level includes whatever a round
        # leaves allocated for good (interned strings, grown dicts, the selector).
        check_slow_clients(slow_round(agent, closing)[0])
        idle = rss_bytes(agent.pid)

        rounds_before = len(well_behaved.rounds)
        slow, first_cut = slow_round(agent, closing)
        check_slow_clients(slow)
        served_meanwhile = [t for t in well_behaved.rounds[rounds_before:] if t < first_cut]
        after = rss_bytes(agent.pid)
    finally:
        well_behaved.stop()
    assert well_behaved.failures == []
    # Served while every slow client was still connected, not only once they were cut off.
    assert served_meanwhile, "no well-behaved request was answered while the slow ones were open"
    assert after <= max(idle * 1.3, idle + 8 * 1024 * 1024), (idle, after)


# --- Conduce faults through the real agent ----------------------------------------------------


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    """A loopback HTTPS Conduce emulator process with one account; hung requests are released
    and the process stopped after the test."""
    with EmulatorProcess(USER, PASSWORD) as emu:
        try:
            yield emu
        finally:
            emu.clear_faults()
            emu.release()


@pytest.fixture
def conduce_agent(agent_factory: AgentFactory, emulator: Emulator) -> AgentProcess:
    """An agent that trusts the emulator's CA, with a read timeout far above the tests' waits."""
    return agent_factory("--ca-bundle", emulator.ca_path, "--read-timeout", "30")


def login(agent: AgentProcess, emu: Emulator) -> None:
    with agent.client() as client:
        client.login(emu.host, USER, PASSWORD)


def held_ids(agent: AgentProcess, emu: Emulator) -> set[str]:
    with agent.client() as client:
        return {key["key_id"] for key in client.list(host=emu.host, user=USER)}


def test_client_vanishing_during_a_remote_create_loses_no_key(
    conduce_agent: AgentProcess, emulator: Emulator, closing: contextlib.ExitStack
) -> None:
    """A client that hangs up while its create waits on the service leaves the key created,
    held by the agent, and the agent serving."""
    agent = conduce_agent
    login(agent, emulator)
    emulator.inject(Fault.hang(), path="apikeys/create", count=1)
    gone = connect(closing, agent.socket_path)
    gone.send(request("create", "c1", host=emulator.host, user=USER, reveal=True))
    assert emulator.wait_for_hung(1, timeout=10)
    gone.close()
    emulator.release()
    # Remote calls of one account run one at a time, in order: this listing's reply comes
    # after the agent has finished the vanished client's create.
    with agent.client() as client:
        listed = client.call("list", host=emulator.host, user=USER, remote=True)
    (created,) = emulator.api_keys(USER)
    assert [k["key_id"] for k in listed["keys"]] == [key_id_for(created)]
    assert [(k["key_id"], k["held"]) for k in listed["remote"]] == [(key_id_for(created), True)]


@pytest.mark.parametrize("case", ["lock", "failed-unlock"])
def test_client_vanishing_before_a_slow_local_reply_does_not_stop_the_agent(
    agent_factory: AgentFactory, closing: contextlib.ExitStack, case: str
) -> None:
    """A client that hangs up before its lock (key derivation on a worker) or its failed unlock
    (reply held back) is answered costs the agent nothing: it keeps its keys and serves on."""
    agent = agent_factory("--no-keyring")
    with agent.client() as client:
        client.add("h.example", USER, "kept-key")
        if case == "failed-unlock":
            client.lock("the right passphrase")
    gone = connect(closing, agent.socket_path)
    gone.send(request(case.removeprefix("failed-"), 1, passphrase="a passphrase"))
    gone.close()  # long before scrypt (and, for unlock, the 0.1 s hold-back) is done
    with agent.client() as client:
        # Key derivations run one at a time, in order, so each reply below comes after the
        # vanished request's. A second failed unlock is held back twice as long as the first,
        # so its reply also comes after the vanished one's hold-back has run out.
        if case == "lock":
            with pytest.raises(errors.Locked):
                client.lock("another passphrase")
            client.unlock("a passphrase")
        else:
            with pytest.raises(errors.BadPassphrase):
                client.unlock("another wrong passphrase")
            client.unlock("the right passphrase")
        assert client.get(host="h.example") == "kept-key"
    assert agent.process is not None
    assert agent.process.poll() is None


def test_client_vanishing_mid_reply_or_mid_line_of_a_create_loses_no_key(
    conduce_agent: AgentProcess, emulator: Emulator, closing: contextlib.ExitStack
) -> None:
    """A client that hangs up with replies still streaming out leaves its created key held and
    on the service; half a create line never reaches the service."""
    agent = conduce_agent
    login(agent, emulator)
    create = request("create", "c1", host=emulator.host, user=USER, reveal=True)
    # Mid-reply: a create, then many large listings queued behind it; once the replies are
    # streaming out, the client reads a few bytes and hangs up with the rest unread.
    with agent.client() as client:
        for n in range(40):
            client.add(emulator.host, USER, f"filler-key-{n:03d}", description="d" * 1000)
    emulator.inject(Fault.hang(), path="apikeys/create", count=1)
    streaming = connect(closing, agent.socket_path)
    listing = request("list", "l", host=emulator.host, user=USER)
    streaming.send(create + listing * 150)  # about 6 MB of replies
    assert emulator.wait_for_hung(1, timeout=10)
    emulator.release()
    assert streaming.sock.recv(10).startswith(b'{"id":"c1"')
    readable, _, _ = select.select([streaming.sock], [], [], 10)
    assert readable, "no further reply was on its way"
    streaming.close()
    with agent.client() as client:
        listed = client.call("list", host=emulator.host, user=USER, remote=True)
        assert client.hello()["protocol"] == 1
    (created,) = emulator.api_keys(USER)
    assert key_id_for(created) in {k["key_id"] for k in listed["keys"]}
    assert [(k["key_id"], k["held"]) for k in listed["remote"]] == [(key_id_for(created), True)]

    # Half a create line, then gone: the agent never sees a request, the service no call.
    emulator.clear_requests()
    half = connect(closing, agent.socket_path)
    half.send(create[: len(create) // 2])
    half.sock.shutdown(socket.SHUT_WR)
    assert half.closed_by_peer()
    with agent.client() as client:
        client.call("list", host=emulator.host, user=USER, remote=True)
    assert [r.path for r in emulator.requests] == ["apikeys/list"]
    assert emulator.api_keys(USER) == [created]
    assert "internal error" not in agent.log()


def test_half_closed_client_still_gets_its_remote_reply(
    conduce_agent: AgentProcess, emulator: Emulator, closing: contextlib.ExitStack
) -> None:
    """A client that shuts down its sending side after a create (as nc -q does) gets the reply."""
    login(conduce_agent, emulator)
    emulator.inject(Fault.delay(0.2), path="apikeys/create", count=1)
    client = connect(closing, conduce_agent.socket_path)
    client.send(request("create", 7, host=emulator.host, user=USER))
    client.sock.shutdown(socket.SHUT_WR)
    reply = client.reply()
    assert reply["ok"] is True
    assert reply["result"]["key_id"] == key_id_for(emulator.api_keys(USER)[0])
    assert client.closed_by_peer()


def test_session_expiring_between_create_and_list_remote(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """When the session expires after a create, list --remote is answered with the created key
    (standing in for the session) and the session is reported expired."""
    login(conduce_agent, emulator)
    with conduce_agent.client() as client:
        created = client.create(emulator.host, USER, description="before expiry")
        emulator.expire_sessions(USER)
        emulator.clear_requests()
        listed = client.call("list", host=emulator.host, user=USER, remote=True)
        (session,) = client.status()["sessions"]
    assert [(k["key_id"], k["stale"]) for k in listed["keys"]] == [(created["key_id"], False)]
    assert [(k["key_id"], k["held"]) for k in listed["remote"]] == [(created["key_id"], True)]
    lists = [(r.auth, r.status) for r in emulator.requests if r.path == "apikeys/list"]
    assert lists == [("cookie", 401), ("bearer", 200)]
    assert session["expired"] is True
    login(conduce_agent, emulator)
    with conduce_agent.client() as client:
        assert client.status()["sessions"][0]["expired"] is False


def test_session_expiring_while_a_create_is_in_flight(
    conduce_agent: AgentProcess, emulator: Emulator, closing: contextlib.ExitStack
) -> None:
    """A create whose session expires while it waits on the service creates no key the agent
    does not hold: without a held key it is session_expired, with one it is retried by key."""
    agent = conduce_agent
    login(agent, emulator)
    emulator.inject(Fault.hang(), path="apikeys/create", count=1)
    waiting = connect(closing, agent.socket_path)
    waiting.send(request("create", 1, host=emulator.host, user=USER))
    assert emulator.wait_for_hung(1, timeout=10)
    emulator.expire_sessions(USER)
    emulator.release()
    assert error_code(waiting.reply()) == "session_expired"
    assert emulator.api_keys(USER) == []
    with agent.client() as client:
        assert client.status()["sessions"][0]["expired"] is True

    # Now with a held key of the account: the 401 means the service did nothing, so the
    # agent retries with the key, and exactly one new key exists, held.
    seed = emulator.add_key(USER, "seed")
    login(agent, emulator)
    with agent.client() as client:
        client.add(emulator.host, USER, seed)
    emulator.inject(Fault.hang(), path="apikeys/create", count=1)
    waiting.send(request("create", 2, host=emulator.host, user=USER))
    assert emulator.wait_for_hung(1, timeout=10)
    emulator.expire_sessions(USER)
    emulator.release()
    reply = waiting.reply()
    assert reply["ok"] is True, reply
    on_service = emulator.api_keys(USER)
    assert len(on_service) == 2
    assert {key_id_for(key) for key in on_service} == held_ids(agent, emulator)
    assert [r.auth for r in emulator.requests if r.path == "apikeys/create"][-2:] == [
        "cookie",
        "bearer",
    ]


def test_stop_completes_while_a_remote_call_hangs(
    conduce_agent: AgentProcess, emulator: Emulator, closing: contextlib.ExitStack
) -> None:
    """stop is answered at once and the agent exits 0, removing its socket, while a Conduce
    call hangs: it waits for the call up to stop_timeout (10 s), as for its deletions, then
    exits anyway, and the hung client's connection is closed unanswered."""
    agent = conduce_agent
    login(agent, emulator)
    emulator.inject(Fault.hang(), path="apikeys/list")
    hung = connect(closing, agent.socket_path)
    hung.send(request("list", 1, host=emulator.host, user=USER, remote=True))
    assert emulator.wait_for_hung(1, timeout=10)
    with agent.client(timeout=5) as client:
        client.stop()
    # stop_timeout (10 s) and a margin for a loaded machine, well within --read-timeout (30 s).
    assert wait_for_exit(agent.pid, 16), "the agent did not exit while a remote call hung"
    assert agent.process is not None
    assert agent.process.wait(5) == 0
    assert not os.path.exists(agent.socket_path)
    assert read_until_eof(hung.sock, time.monotonic() + 5) == b""  # closed, never answered


# --- keyring faults, inside the agent --------------------------------------------------------
# The keyring lives in the agent process, and MemoryKeyring's fault switches (block,
# fail_with, locked) are attributes, with no environment hook: PYTHON_KEYRING_BACKEND can
# select it in a daemon, but not make it block or fail. So these tests run the real Server on
# a real socket in a thread of the test process, with the agent's keyring timeout at 0.5 s.
# Server has no thread-safe stop (signals reach only the main thread): the fixture stops it
# with the protocol's own stop request.

KEYRING_TIMEOUT = 0.5


@dataclass
class InProcessAgent:
    socket_path: str
    agent: Agent
    backend: MemoryKeyring


@pytest.fixture
def keyring_agent(tmp_path: Path) -> Iterator[InProcessAgent]:
    """A Server on a real socket in a thread, with an in-memory keyring it can be made to fail."""
    path = str(tmp_path / "inproc" / "agent.sock")
    backend = MemoryKeyring()
    agent = Agent(socket_path=path, keyring=KeyringStore(backend), keyring_timeout=KEYRING_TIMEOUT)
    listener = bind_listener(path)
    server = Server(agent, listener, limits=Limits(max_connections=32, idle_timeout=60))
    ready = threading.Event()
    server.on_ready = ready.set
    thread = threading.Thread(target=server.serve_forever, name="in-process-agent", daemon=True)
    thread.start()
    try:
        assert ready.wait(10)
        yield InProcessAgent(path, agent, backend)
    finally:
        backend.locked = False
        backend.fail_with = None
        if backend.block is not None:
            backend.block.set()  # let a worker stuck in the keyring finish
        if thread.is_alive():
            with Client(path, timeout=10) as client:
                client.stop()
        thread.join(10)
        listener.close()
    assert not thread.is_alive(), "the in-process server did not stop"


def keyring_ids(backend: MemoryKeyring) -> set[str]:
    return {user.removeprefix("key:") for (_, user) in backend.entries() if user.startswith("key:")}


def test_blocked_keyring_times_out_while_other_clients_are_served(
    keyring_agent: InProcessAgent, closing: contextlib.ExitStack
) -> None:
    """With the keyring stuck, add --persist answers keyring_unavailable after the keyring
    timeout, and other clients' get requests are answered all the while."""
    path, backend = keyring_agent.socket_path, keyring_agent.backend
    secret = "blocked-keyring-S3CR3T"
    with Client(path) as other:
        other.add("h.example", USER, "in-memory-key")
    backend.block = threading.Event()
    slow = connect(closing, path)
    sent = time.monotonic()
    slow.send(request("add", 1, host="h.example", user=USER, key=secret, persist=True))
    assert backend.waiting.wait(10), "the keyring call never started"
    served = 0
    with Client(path, timeout=10) as other:
        while not select.select([slow.sock], [], [], 0)[0]:  # each round trip is the wait
            assert other.get(host="h.example") == "in-memory-key"
            served += 1
            assert time.monotonic() < sent + 10, "no reply to the blocked add"
    reply = slow.reply()
    waited = time.monotonic() - sent
    assert error_code(reply) == "keyring_unavailable"
    assert "unlock" in reply["error"]["message"]
    assert secret not in reply["error"]["message"]
    assert waited >= KEYRING_TIMEOUT
    assert served > 0
    with Client(path) as client:  # nothing changed in memory, and the agent goes on
        assert key_id_for(secret) not in {k["key_id"] for k in client.list()}
        assert client.hello()["protocol"] == 1


def test_keyring_write_finishing_after_its_deadline_leaves_a_consistent_state(
    keyring_agent: InProcessAgent, closing: contextlib.ExitStack
) -> None:
    """A persist that timed out and then completes leaves keyring and memory in agreement:
    the client was told the add failed, so the late write is undone."""
    path, backend = keyring_agent.socket_path, keyring_agent.backend
    secret = "late-keyring-S3CR3T"
    backend.block = threading.Event()
    slow = connect(closing, path)
    slow.send(request("add", 1, host="h.example", user=USER, key=secret, persist=True))
    assert error_code(slow.reply()) == "keyring_unavailable"
    backend.block.set()  # the keyring answers at last: the write goes through
    with Client(path) as client:
        # Keyring calls run one at a time, in order: two no-op keyring requests in a row
        # guarantee that the late write, and anything the agent queues when it learns of it,
        # are done.
        for _ in range(2):  # not_found, once its keyring call has been made
            with pytest.raises(errors.NotFound):
                client.forget("0123456789ab" * 5 + "cdef", persist=True)
        held = {k["key_id"] for k in client.list()}
    assert digest_of(secret) not in keyring_ids(backend)
    assert key_id_for(secret) not in held
    writes = [op for op, _, name in backend.calls if name == f"key:{digest_of(secret)}"]
    assert writes == ["set", "delete"]  # the write did go through, and was then undone


def test_failing_or_locked_keyring_is_keyring_unavailable_and_the_agent_goes_on(
    keyring_agent: InProcessAgent, caplog: pytest.LogCaptureFixture
) -> None:
    """A keyring that raises, or is locked, makes persist requests keyring_unavailable with no
    secret in the message or log; memory keeps working, and persisting works once it is back."""
    path, backend = keyring_agent.socket_path, keyring_agent.backend
    secret = "raising-keyring-S3CR3T"
    caplog.set_level(logging.DEBUG)  # a secret in a debug line is a leak too
    with Client(path) as client:
        backend.fail_with = RuntimeError(f"D-Bus error while storing {secret}")
        with pytest.raises(errors.KeyringUnavailable) as raised:
            client.add("h.example", USER, secret, persist=True)
        assert secret not in raised.value.message
        client.add("h.example", USER, "plain-key")  # no keyring involved: works
        assert client.get(host="h.example") == "plain-key"

        backend.fail_with = None
        backend.locked = True
        with pytest.raises(errors.KeyringUnavailable) as raised:
            client.add("h.example", USER, secret, persist=True)
        assert "unlock" in raised.value.message
        assert key_id_for(secret) not in {k["key_id"] for k in client.list()}
        assert keyring_ids(backend) == set()

        backend.locked = False
        listed = client.add("h.example", USER, secret, persist=True)
        assert listed["persisted"] is True
        assert keyring_ids(backend) == {digest_of(secret)}
        assert client.get(key_id=listed["key_id"]) == secret
    assert secret not in caplog.text


# --- secrets never leak: log, errors, argv, environment, files ---------------------------------

LOCAL_KEY = "local-api-key-S3CR3T-7f3a9c"
PERSISTED_KEY = "persisted-api-key-S3CR3T-41d2"
PASSPHRASE = "lock-passphrase-S3CR3T-horse"
WRONG_PASSPHRASE = "wrong-passphrase-S3CR3T-pony"
WRONG_PASSWORD = "wrong-password-S3CR3T-1234"
BODY_MARKER = "LEAKED-BODY-S3CR3T"


class ProcScanner:
    """Reads every process's argv (/proc/*/cmdline) in a loop until stopped; keeps each
    distinct one, to be searched for secrets once they are all known."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="proc-scanner", daemon=True)

    def __enter__(self) -> ProcScanner:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def scan(self) -> None:
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    self.seen.add(Path(entry.path, "cmdline").read_bytes())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.scan()
            self._stop.wait(0.005)


@dataclass
class CtlRun:
    argv: list[str]
    code: int
    out: str
    err: str
    cmdline: bytes
    environ: bytes
    reveals: bool = False
    """Whether printing a key on stdout is this command's job (get, create --print)."""


@pytest.fixture
def private_home(tmp_path: Path) -> dict[str, Path]:
    """HOME and every XDG directory in a private temporary tree."""
    dirs = {
        "HOME": tmp_path / "home",
        "XDG_CONFIG_HOME": tmp_path / "xdg" / "config",
        "XDG_STATE_HOME": tmp_path / "xdg" / "state",
        "XDG_DATA_HOME": tmp_path / "xdg" / "data",
        "XDG_CACHE_HOME": tmp_path / "xdg" / "cache",
        "XDG_RUNTIME_DIR": tmp_path / "xdg" / "runtime",
    }
    for directory in dirs.values():
        directory.mkdir(parents=True, mode=0o700)
    return dirs


def test_no_secret_in_log_errors_argv_environment_or_files(
    emulator: Emulator, private_home: dict[str, Path]
) -> None:
    """After a full flow with faults, driven by keyagent-ctl processes at debug level, no key,
    password, passphrase or session cookie is in the log, an error, any argv, the agent's
    environment or any file under HOME and the XDG directories."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("KEYAGENT_", "DBUS_"))},
        **{name: str(path) for name, path in private_home.items()},
        # An in-memory keyring, so that --persist works without touching a real one.
        "PYTHON_KEYRING_BACKEND": "keyagent.testing.memory_keyring.MemoryKeyring",
        "KEYAGENT_HOST": emulator.host,
        "KEYAGENT_USER": USER,
    }
    # The agent on the default socket path, so keyagent-ctl finds it with no variable at all.
    agent = AgentProcess(
        private_home["XDG_RUNTIME_DIR"] / "keyagent",
        ["--ca-bundle", emulator.ca_path, "--read-timeout", "5"],
        env=env,
    )
    runs: list[CtlRun] = []
    tokens: set[str] = set()
    created: set[str] = set()

    def ctl(*argv: str, stdin: str = "") -> CtlRun:
        process = subprocess.Popen(
            [sys.executable, "-m", "keyagent", *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        try:
            # Popen returns once the exec happened, and the secret is only written below:
            # this is the argv and environment the process has while it holds the secret.
            cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{process.pid}/environ").read_bytes()
            out, err = process.communicate(stdin, timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        run = CtlRun(list(argv), process.returncode, out, err, cmdline, environ)
        runs.append(run)
        return run

    def ok(*argv: str, stdin: str = "", reveals: bool = False) -> CtlRun:
        run = ctl(*argv, stdin=stdin)
        run.reveals = reveals
        assert run.code == 0, (argv, run.err)
        return run

    def fails(code: str, *argv: str, stdin: str = "") -> CtlRun:
        run = ctl(*argv, stdin=stdin)
        assert run.code == 1, (argv, run.out, run.err)
        assert f"[{code}]" in run.err, (argv, run.err)
        return run

    with ProcScanner() as scanner, contextlib.ExitStack() as stack:
        agent.start()
        stack.callback(agent.stop)
        agent_cmdline = Path(f"/proc/{agent.pid}/cmdline").read_bytes()

        ok("status")
        ok("add", "--description", "laptop", stdin=LOCAL_KEY)
        ok("add", "--persist", "--description", "kept", stdin=PERSISTED_KEY)
        got = ok("get", "--key-id", key_id_for(LOCAL_KEY), reveals=True)
        assert got.out.strip() == LOCAL_KEY
        ok("list")
        ok("lock", stdin=PASSPHRASE + "\n")
        fails("locked", "get")
        fails("bad_passphrase", "unlock", stdin=WRONG_PASSPHRASE + "\n")
        ok("unlock", stdin=PASSPHRASE + "\n")

        fails("bad_credentials", "login", "--password-stdin", stdin=WRONG_PASSWORD + "\n")
        ok("login", "--password-stdin", stdin=PASSWORD + "\n")
        tokens.update(emulator.session_tokens())
        ok("create", "--description", "one")
        printed = ok("create", "--print", reveals=True).out.strip()
        created.update(emulator.api_keys(USER))
        assert printed in created
        ok("list", "--remote")
        ok("list", "--remote", "--json")
        emulator.inject(Fault.status(500, body=json.dumps({"echo": BODY_MARKER})), count=1)
        fails("remote_error", "list", "--remote")
        emulator.inject(Fault.reset(), path="apikeys/create", count=1)
        fails("remote_unreachable", "create")
        emulator.expire_sessions(USER)
        ok("list", "--remote")  # a held key stands in for the expired session
        ok("login", "--password-stdin", stdin=PASSWORD + "\n")
        tokens.update(emulator.session_tokens())
        ok("create", "--persist")
        created.update(emulator.api_keys(USER))
        for key in sorted(created):
            ok("remove", key_id_for(key))
        fails("not_found", "remove", key_id_for(LOCAL_KEY)[:6] + "00")
        ok("logout")
        ok("forget", "--persist", key_id_for(PERSISTED_KEY))
        ok("status")
        try:
            agent_environ = Path(f"/proc/{agent.pid}/environ").read_bytes()
        except PermissionError:  # non-dumpable: only root may read it, which settles it too
            agent_environ = b""
        scanner.scan()
        ok("stop")
        assert wait_for_exit(agent.pid, 10)

    secrets = {
        LOCAL_KEY, PERSISTED_KEY, PASSPHRASE, WRONG_PASSPHRASE, PASSWORD, WRONG_PASSWORD,
        BODY_MARKER, *tokens, *created,
    }  # fmt: skip
    assert len(tokens) >= 2
    assert len(created) == 3

    def leaks(text: str | bytes) -> list[str]:
        data = text.encode() if isinstance(text, str) else text
        return sorted(secret for secret in secrets if secret.encode() in data)

    log = agent.log()
    assert "op=create" in log  # debug logging was on
    assert leaks(log) == []
    for run in runs:
        assert leaks(run.err) == [], run.argv
        assert leaks(run.cmdline) == [], run.argv
        assert leaks(run.environ) == [], run.argv
        if not run.reveals:
            assert leaks(run.out) == [], run.argv
    assert leaks(agent_cmdline) == []
    assert leaks(agent_environ) == []
    assert [cmdline for cmdline in scanner.seen if leaks(cmdline)] == []
    assert {run.cmdline for run in runs} & scanner.seen, "the scanner saw no keyagent-ctl"
    files = [
        path
        for root in private_home.values()
        for path in root.rglob("*")
        if path.is_file() and not path.is_symlink() and path != agent.log_path
    ]
    for path in files:
        assert leaks(path.read_bytes()) == [], path


def test_a_keyring_request_that_succeeds_gets_exactly_one_reply(
    keyring_agent: InProcessAgent, closing: contextlib.ExitStack
) -> None:
    """A persisted add answered in time gets no second (timeout) reply, and pipelined
    requests behind it keep their order."""
    path = keyring_agent.socket_path
    conn = connect(closing, path)
    conn.send(
        request("add", 1, host="h.example", user=USER, key="one-reply-S3CR3T", persist=True)
        + request("hello", 2)
    )
    assert conn.reply()["id"] == 1
    assert conn.reply()["id"] == 2
    # Past the keyring deadline, nothing more may arrive: a third request is answered next.
    deadline = time.monotonic() + KEYRING_TIMEOUT * 2
    # One connection for every round trip: opening one per round let a busy machine pile up
    # closed connections faster than the in-process agent reaped them (answered busy).
    with Client(path) as other:
        while time.monotonic() < deadline:  # each round trip is the wait
            other.hello()
    conn.send(request("hello", 3))
    assert conn.reply()["id"] == 3
