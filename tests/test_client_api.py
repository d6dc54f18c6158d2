"""The Python client library against a real agent (and small fakes of one): sharing a
Client between threads and across fork(), following the audit log, reply limits and
timeouts, messages, and keyagent.http_session."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import select
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import requests

import keyagent
from keyagent import cli, errors
from keyagent import client as client_module
from keyagent.client import Client
from keyagent.testing.agent import AgentProcess
from keyagent.testing.emulator import Fault
from keyagent.testing.emulator_process import Emulator

from .conftest import run_ctl, wait_until

USER = "démo@example.com"
"""A non-ASCII account: its name goes to the agent's HTTP socket as a header."""
PASSWORD = "client-api-pa55word"
TEAMS = "/conduce/api/v1/user/list-teams"
HOSTS = [f"h{i}.example" for i in range(6)]
FORKED = "forked.example"
"""The host only the fork test asks about: the audit log says who asked."""


def key_for(host: str) -> str:
    return f"KA-{host}-0123456789"


@pytest.fixture(scope="module")
def module_agent(module_agent: AgentProcess) -> AgentProcess:
    """The module's agent holds one key per host of HOSTS."""
    with module_agent.client() as client:
        for host in [*HOSTS, FORKED]:
            client.add(host, "u@example.com", key_for(host))
    return module_agent


@pytest.fixture
def holding(shared_agent: AgentProcess) -> AgentProcess:
    return shared_agent


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# --- fork ----------------------------------------------------------------------------------


def in_child(
    work: Callable[[], str], meanwhile: Callable[[], None] = lambda: None
) -> tuple[int, str]:
    """Fork; the child runs ``work`` and reports what it returns (or raised), while the
    parent runs ``meanwhile``. The child's pid and its report, once it has exited."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        try:
            os.close(read_end)
            try:
                report = work()
            except BaseException as error:  # noqa: BLE001  # reported to the parent
                report = f"child raised {error!r}"
            os.write(write_end, report.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        meanwhile()
    finally:
        received = b""
        while chunk := os.read(read_end, 65536):
            received += chunk
        os.close(read_end)
        os.waitpid(pid, 0)
    return pid, received.decode()


def test_a_forked_child_gets_a_connection_of_its_own(holding: AgentProcess) -> None:
    """A Client used on both sides of a fork: the child's requests go on a connection the
    child opened (the agent records the child as the asker), each side gets the key it asked
    for, and the parent's connection goes on serving it."""
    with holding.client() as client:
        assert client.get(HOSTS[0]) == key_for(HOSTS[0])  # connected before the fork

        def child() -> str:
            keys = [client.get(FORKED) for _ in range(50)]
            return json.dumps([key for key in keys if key != key_for(FORKED)])

        parent_keys: list[str] = []

        def parent() -> None:  # asking too while the child does
            parent_keys.extend(client.get(HOSTS[0]) for _ in range(50))

        pid, report = in_child(child, parent)
        assert report == "[]"
        assert set(parent_keys) == {key_for(HOSTS[0])}
        asked = {(entry["host"], entry["pid"]) for entry in client.log(200) if entry["op"] == "get"}
        assert (FORKED, pid) in asked
        assert (FORKED, os.getpid()) not in asked
        assert client.get(HOSTS[2]) == key_for(HOSTS[2])


def test_a_forked_child_is_not_stuck_behind_a_parent_request(tmp_path: Path) -> None:
    """Forked while another thread of the parent waits for a reply (holding the client's
    lock), the child still gets its own requests through: the inherited lock, which
    nothing in the child would release, is not the child's."""
    path = str(tmp_path / "agent.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    first_asked = threading.Event()

    def serve() -> None:  # the first connection is never answered; later ones are
        with contextlib.suppress(OSError):
            silent, _ = listener.accept()
            silent.recv(65536)
            first_asked.set()
            answered, _ = listener.accept()
            with silent, answered:
                request = json.loads(answered.recv(65536).partition(b"\n")[0])
                answered.sendall(ok_line(request["id"], {"protocol": 1}))
                answered.recv(1)  # until the child hangs up

    server = threading.Thread(target=serve)
    server.start()
    client = Client(path, timeout=None)
    waiting, outcome = in_thread(client.hello)
    try:
        assert first_asked.wait(30)

        def child() -> str:
            signal.alarm(10)  # stuck on the parent's lock: killed, and reports nothing
            return str(client.hello()["protocol"])

        _, report = in_child(child)
        assert report == "1"
    finally:
        client.close()
        waiting.join(30)
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes an accept() still waiting
        listener.close()
        server.join(30)
    assert not server.is_alive()
    assert [type(error) for error in outcome] == [errors.AgentUnreachable]


def test_a_forked_child_closing_an_inherited_follow_closes_its_own_descriptor(
    holding: AgentProcess,
) -> None:
    """Forked while a parent thread waits in a follow_log's next(), the child's close()
    closes the child's copy of the socket (it does not wait for a thread it does not
    have), and the parent's following goes on until the parent closes it."""
    with holding.client() as client:
        follow = client.follow_log(n=0)
        reader, outcome = in_thread(functools.partial(list, follow))
        inside = cast(Any, follow)  # the generator's state, which nothing public shows
        wait_until(lambda: inside._running, "the reader is inside next()", pause=0.01)
        descriptor = inside._connection.sock.fileno()

        def child() -> str:
            signal.alarm(10)  # stuck on the parent's lock: killed, and reports nothing
            follow.close()
            try:
                os.fstat(descriptor)
            except OSError:
                return "closed"
            return "still open"

        _, report = in_child(child)
        assert report == "closed"
        assert reader.is_alive()  # the parent still follows
        follow.close()
        reader.join(30)
        assert outcome == [[]]


# --- threads -------------------------------------------------------------------------------


def test_a_client_shared_by_threads_gives_each_its_own_key(holding: AgentProcess) -> None:
    """Threads sharing one Client each get the key for the host they ask about, every time."""
    results: dict[str, list[str]] = {host: [] for host in HOSTS}
    start = threading.Barrier(len(HOSTS))
    with holding.client() as client:

        def ask(host: str) -> None:
            start.wait()
            for _ in range(40):
                try:
                    results[host].append(client.get(host))
                except Exception as error:  # noqa: BLE001  # reported by the assert below
                    results[host].append(repr(error))

        threads = [threading.Thread(target=ask, args=(host,)) for host in HOSTS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    wrong = {
        host: [got for got in answers if got != key_for(host)] for host, answers in results.items()
    }
    assert wrong == {host: [] for host in HOSTS}


# --- follow_log ----------------------------------------------------------------------------


def test_following_leaves_the_client_usable(holding: AgentProcess) -> None:
    """follow_log has a connection of its own: the client answers during and after it, and
    two follows run at once."""
    with holding.client() as client:
        first = client.follow_log(n=1)
        second = client.follow_log(n=1)
        assert client.hello()["protocol"]
        assert next(first)["op"]
        assert next(second)["op"]
        client.get(HOSTS[3])  # recorded, so each follower sees it
        assert next(first) == next(second)
        first.close()
        assert client.hello()["protocol"]
        second.close()
        assert client.status()["locked"] is False


def test_closing_an_unstarted_follow_closes_its_connection(holding: AgentProcess) -> None:
    """A follow_log generator closed before its first next() closes its connection, and the
    client goes on working."""
    with holding.client() as client:
        client.hello()
        before = open_fds()
        follow = client.follow_log(n=0)
        assert len(open_fds() - before) == 1
        follow.close()
        assert open_fds() <= before
        assert client.hello()["protocol"]
        with pytest.raises(StopIteration):
            next(follow)


# --- arguments -----------------------------------------------------------------------------


def test_allow_exe_given_one_path_as_a_string(agent: AgentProcess) -> None:
    """allow_exe="/usr/bin/env" is one program, not one per character."""
    with agent.client() as client:
        added = client.add(
            "one.example", "u@example.com", "KA-one-0123456789", allow_exe="/usr/bin/env"
        )
    assert added["allowed_exes"] == [os.path.realpath("/usr/bin/env")]


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), float("nan"), True])
def test_a_timeout_out_of_range_is_refused(timeout: float) -> None:
    with pytest.raises(ValueError, match="above 0 and finite, or None"):
        Client("/nonexistent/agent.sock", timeout=timeout)


def test_an_unreachable_socket_path_is_shown_escaped(tmp_path: Path) -> None:
    """A socket path with control characters (KEYAGENT_SOCK is anyone's to set) comes back in
    the message escaped, not raw."""
    path = str(tmp_path / "evil\x1b]0;owned\x07.sock")
    with pytest.raises(errors.AgentUnreachable) as caught, Client(path) as client:
        client.hello()
    assert "\x1b" not in caught.value.message
    assert "\x07" not in caught.value.message
    assert "evil\\x1b]0;owned\\x07.sock" in caught.value.message


# --- replies: size and deadline -------------------------------------------------------------


class FakeAgent:
    """A Unix socket that reads a request, then has ``answer(request_id, connection)`` answer
    on the connection, which stays open until the test is over (or ``answer`` closes it)."""

    def __init__(self, path: str, answer: Callable[[int, socket.socket], None]) -> None:
        self.path = path
        self.answer = answer
        self.done = threading.Event()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.thread = threading.Thread(target=self._serve)
        self.thread.start()

    def _serve(self) -> None:
        connection, _ = self.listener.accept()
        with connection, contextlib.suppress(OSError):
            data = b""
            while b"\n" not in data:
                data += connection.recv(65536)
            request = json.loads(data.partition(b"\n")[0])
            self.answer(request["id"], connection)
            self.done.wait(30)  # until the test is over (a bound: never a hang)

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        self.listener.close()


@pytest.fixture
def fake_agent(tmp_path: Path) -> Iterator[Callable[..., FakeAgent]]:
    started: list[FakeAgent] = []

    def start(answer: Callable[[int, socket.socket], None]) -> FakeAgent:
        directory = tmp_path / f"fake{len(started)}"
        directory.mkdir(mode=0o700)
        fake = FakeAgent(str(directory / "agent.sock"), answer)
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.close()


def ok_line(request_id: int, result: dict[str, Any]) -> bytes:
    return json.dumps({"id": request_id, "ok": True, "result": result}).encode() + b"\n"


def test_close_from_another_thread_ends_a_request_in_flight(
    fake_agent: Callable[..., FakeAgent],
) -> None:
    """A request waiting on an agent that does not answer (a confirm question, say) ends
    with AgentUnreachable when another thread closes the client, which does not wait for
    the reply it would never get."""
    asked = threading.Event()
    fake = fake_agent(lambda _request_id, _connection: asked.set())
    client = Client(fake.path, timeout=None)
    waiting, outcome = in_thread(client.hello)
    assert asked.wait(30)
    client.close()
    waiting.join(30)
    assert not waiting.is_alive()
    assert [type(error) for error in outcome] == [errors.AgentUnreachable]


def in_thread(call: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """``call`` started in a thread of its own; the list gets what it returned or raised."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as error:  # noqa: BLE001  # what the test looks at
            outcome.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_a_follow_closed_from_another_thread_ends_quietly(holding: AgentProcess) -> None:
    """The thread iterating a follow_log stops, without an error, when another thread closes
    the generator, whether it is waiting for an entry at that moment, about to, or still
    reading the backlog. The close comes at a different point of the reader's work each
    time, so it is repeated: closing the socket under the reader failed about one time in
    thirty (EBADF), and closing the generator while it ran crashed CPython 3.11."""
    with holding.client() as client:
        for _ in range(200):
            follow = client.follow_log(n=0)
            reader, outcome = in_thread(functools.partial(list, follow))
            follow.close()
            reader.join(30)
            assert not reader.is_alive()
            assert outcome == [[]]  # no entry, no error
        assert client.hello()["protocol"]


def test_a_reply_over_max_reply_is_refused(fake_agent: Callable[..., FakeAgent]) -> None:
    """A reply longer than max_reply, whole or without its newline, raises bad_reply with
    the way out, instead of growing without bound."""
    line = ok_line(1, {"keys": [{"key_id": "0" * 12}] * 200})
    whole = fake_agent(lambda request_id, connection: connection.sendall(line))
    with (
        Client(whole.path, max_reply=1000) as client,
        pytest.raises(errors.ProtocolError, match="max_reply"),
    ):
        client.list()
    endless = fake_agent(lambda request_id, connection: connection.sendall(b"x" * 5000))
    with (
        Client(endless.path, max_reply=1000) as client,
        pytest.raises(errors.ProtocolError, match="max_reply"),
    ):
        client.list()


def test_a_long_reply_in_many_pieces_is_read_whole(fake_agent: Callable[..., FakeAgent]) -> None:
    """A reply of several megabytes, sent in small pieces, with the next line already behind
    it, is read exactly."""
    keys = [{"key_id": f"{i:012x}", "host": "h.example"} for i in range(40_000)]
    line = ok_line(1, {"keys": keys})

    def answer(request_id: int, connection: socket.socket) -> None:
        for start in range(0, len(line), 1000):
            connection.sendall(line[start : start + 1000])
        connection.sendall(ok_line(2, {"protocol": 1}))

    fake = fake_agent(answer)
    with Client(fake.path) as client:
        assert client.list() == keys
        assert client.hello() == {"protocol": 1}


def test_a_dripping_reply_is_cut_off_by_the_timeout(fake_agent: Callable[..., FakeAgent]) -> None:
    """An answer that comes a byte at a time, each well within the timeout, is still cut off
    when the whole of it has taken longer: the timeout bounds the reply, not each read."""

    def drip(request_id: int, connection: socket.socket) -> None:
        for byte in b'{"id": 1, "ok": true, "result": {"padding": "' + b"x" * 60:
            connection.sendall(bytes([byte]))
            # The misbehaviour under test, a byte every 0.1 s, until the client hangs up.
            hung_up, _, _ = select.select([connection], [], [], 0.1)
            if hung_up:
                return
        connection.close()  # then: not "did not answer", whatever the client's reading

    fake = fake_agent(drip)
    with (
        Client(fake.path, timeout=1) as client,
        pytest.raises(errors.AgentUnreachable, match="did not answer within 1s"),
    ):
        client.hello()


def test_the_default_reply_cap_holds_the_agents_biggest_replies() -> None:
    """MAX_REPLY leaves room for the whole audit ring at its largest, a kilobyte an entry."""
    from keyagent.rules import MAX_AUDIT_ENTRIES

    assert client_module.MAX_REPLY >= MAX_AUDIT_ENTRIES * 1000


# --- a connection lost before the answer ---------------------------------------------------


def hang_up(_request_id: int, connection: socket.socket) -> None:
    connection.close()


@pytest.mark.parametrize(
    ("call", "made"),
    [
        (lambda client: client.create("h.example", "u@example.com"), "made the key"),
        (lambda client: client.rotate("0123456789ab"), "made the new key"),
    ],
    ids=["create", "rotate"],
)
def test_a_key_maker_cut_off_says_to_look_not_to_retry(
    fake_agent: Callable[..., FakeAgent], call: Callable[[Client], object], made: str
) -> None:
    """An agent that goes between a create (or rotate) and its answer may have made the key
    on the service: the error says to look and delete it, never to retry, which could make
    a second key (the README says so too)."""
    fake = fake_agent(hang_up)
    with pytest.raises(errors.AgentUnreachable) as caught, Client(fake.path) as client:
        call(client)
    message = caught.value.message
    assert f"may have {made}" in message
    assert "keyagent-ctl list --remote" in message
    assert "keyagent-ctl remove" in message
    assert "; retry" not in message


def test_keyagent_ctl_create_cut_off_says_to_look(fake_agent: Callable[..., FakeAgent]) -> None:
    fake = fake_agent(hang_up)
    result = run_ctl(fake.path, "create", "--host", "h.example", "--user", "u@example.com")
    assert result.code == cli.EXIT_NO_AGENT
    assert "may have made the key" in result.err
    assert "retry" not in result.err.replace("not a retry", "")


def test_a_key_maker_not_answered_in_time_says_not_to_retry(
    fake_agent: Callable[..., FakeAgent],
) -> None:
    """A create the agent does not answer within the client's timeout may still make the
    key: the error says so, and not to retry."""
    fake = fake_agent(lambda _request_id, _connection: None)  # reads, never answers
    with pytest.raises(errors.AgentUnreachable) as caught, Client(fake.path, timeout=0.2) as c:
        c.create("h.example", "u@example.com")
    assert "did not answer within 0.2s" in caught.value.message
    assert "may still make the key" in caught.value.message
    assert "do not retry" in caught.value.message


def test_other_requests_cut_off_say_retry(fake_agent: Callable[..., FakeAgent]) -> None:
    fake = fake_agent(hang_up)
    with pytest.raises(errors.AgentUnreachable) as caught, Client(fake.path) as client:
        client.list()
    assert caught.value.message.endswith("closed the connection; retry")


# --- http_session --------------------------------------------------------------------------


def http_path(agent: AgentProcess) -> str:
    return str(Path(agent.socket_path).with_name("http.sock"))


@pytest.fixture
def serving(conduce_agent: AgentProcess, emulator: Emulator) -> AgentProcess:
    """An agent holding a key for USER (a non-ASCII name) on the emulator."""
    with conduce_agent.client() as client:
        client.add(emulator.host, USER, emulator.add_key(USER))
    return conduce_agent


def test_http_session_names_a_non_ascii_account(serving: AgentProcess, emulator: Emulator) -> None:
    """http_session(user=) with a non-ASCII account: the agent gets the name (as UTF-8) and
    answers for that account."""
    with keyagent.http_session(emulator.host, USER, socket_path=http_path(serving)) as session:
        answer = session.get(f"https://{emulator.host}{TEAMS}")
    assert answer.status_code == 200, answer.text
    assert [team["name"] for team in answer.json()] == [USER]


def test_http_session_timeout_bounds_a_slow_answer(
    serving: AgentProcess, emulator: Emulator
) -> None:
    """The session's timeout applies to a request that gives none: a service slower than it
    (the agent itself would wait 5 s) raises requests' ReadTimeout."""
    emulator.inject(Fault.delay(30), path="user/list-teams")
    session = keyagent.http_session(emulator.host, socket_path=http_path(serving), timeout=1)
    with session, pytest.raises(requests.exceptions.ReadTimeout):
        session.get(f"https://{emulator.host}{TEAMS}")
    emulator.clear_faults()


def test_http_session_timeout_bounds_a_silent_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KEYAGENT_HTTP_SOCK naming a socket that accepts and never answers: the session's
    timeout ends the wait."""
    directory = tmp_path / "silent"
    directory.mkdir(mode=0o700)
    path = str(directory / "http.sock")
    done = threading.Event()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(4)

        def hold() -> None:
            connection, _ = listener.accept()
            with connection:
                done.wait(30)  # silent until the test is over (a bound: never a hang)

        holder = threading.Thread(target=hold)
        holder.start()
        monkeypatch.setenv("KEYAGENT_HTTP_SOCK", path)
        try:
            session = keyagent.http_session("app.conduce.example", timeout=1)
            with session, pytest.raises(requests.exceptions.ReadTimeout):
                session.get(f"https://app.conduce.example{TEAMS}")
        finally:
            done.set()
            holder.join()


def test_http_session_after_fork_uses_a_connection_of_its_own(
    serving: AgentProcess, emulator: Emulator
) -> None:
    """A session that pooled a connection to the agent, used in a forked child: the child's
    request goes on a connection of its own (the agent records the child as the asker),
    and the parent's goes on working."""
    url = f"https://{emulator.host}{TEAMS}"
    with keyagent.http_session(emulator.host, socket_path=http_path(serving)) as session:
        assert session.get(url).status_code == 200

        def child() -> str:
            return str(session.get(url).status_code)

        pid, report = in_child(child)
        assert report == "200"
        assert session.get(url).status_code == 200
    with serving.client() as client:
        askers = [entry["pid"] for entry in client.log(20) if entry["op"] == "proxy"]
    assert askers[-3:] == [os.getpid(), pid, os.getpid()]


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), float("nan"), True])
def test_an_http_session_timeout_out_of_range_is_refused(timeout: float) -> None:
    with pytest.raises(ValueError, match="above 0 and finite, or None"):
        keyagent.http_session(
            "app.conduce.com", socket_path="/nonexistent/http.sock", timeout=timeout
        )


@pytest.mark.skipif(os.geteuid() != 0, reason="listening as another user needs root")
@pytest.mark.parametrize("tool", ["client", "keyagent-ctl"])
def test_a_socket_another_user_listens_on_gets_nothing(tool: str) -> None:
    """A socket served by another uid (a planted path, a wrong KEYAGENT_SOCK) is refused
    before anything is sent, with a message naming the socket and that uid."""
    from .conftest import NOBODY

    # Outside tmp_path, which is root's alone: the other user must reach the directory.
    directory = Path(tempfile.mkdtemp(prefix="ka-planted-"))
    os.chmod(directory, 0o755)
    os.chown(directory, NOBODY, NOBODY)
    path = directory / "agent.sock"
    ready_read, ready_write = os.pipe()
    got_read, got_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the other user: listen, accept one connection, report what it sent
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(path))
            listener.listen(1)
            os.write(ready_write, b"1")
            peer, _ = listener.accept()
            peer.settimeout(10)
            received = b""
            with contextlib.suppress(OSError):
                while chunk := peer.recv(4096):
                    received += chunk
            os.write(got_write, b"got:" + received)
        finally:
            os._exit(0)
    os.close(ready_write)
    os.close(got_write)
    try:
        assert os.read(ready_read, 1) == b"1"
        if tool == "client":
            with pytest.raises(errors.AgentUnreachable) as caught, Client(str(path)) as client:
                client.status()
            message = caught.value.message
        else:
            result = run_ctl(str(path), "status")
            assert result.code == 2
            message = result.err
        with os.fdopen(got_read, "rb") as got:
            sent = got.read()
    finally:
        # Read to its end above; a test that failed before leaves the child in accept().
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_read)
        shutil.rmtree(directory, ignore_errors=True)
    assert sent == b"got:"
    assert f"the socket {path} is served by uid {NOBODY}, not by you" in message
