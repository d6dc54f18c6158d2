"""The agent as a client sees it: a real daemon process on a real socket."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from itertools import count
from pathlib import Path

import pytest

from keyagent import errors
from keyagent.client import Client
from keyagent.store import key_id_for
from keyagent.testing.agent import AgentProcess

from .conftest import AgentFactory, Raw, decode, error_code, request_as_nobody

SECRET = "S3CR3T-api-key-0123456789abcdef"
PASSPHRASE = "correct horse battery staple"


def test_hello_lists_protocol_and_operations(agent: AgentProcess) -> None:
    """hello answers with protocol 1, the package version and every served operation."""
    with agent.client() as client:
        hello = client.hello()
    assert hello["protocol"] == 1
    assert {"hello", "status", "add", "get", "list", "forget", "lock", "unlock", "stop"} <= set(
        hello["ops"]
    )


def test_status_reports_pid_socket_and_counts(agent: AgentProcess) -> None:
    """status names the agent's pid and socket and counts the keys it holds."""
    with agent.client() as client:
        client.add("h.example", "u@example.com", SECRET)
        status = client.status()
    assert status["pid"] == agent.pid
    assert status["socket"] == agent.socket_path
    assert status["keys"] == 1
    assert status["locked"] is False


def test_add_get_list_forget_round_trip(agent: AgentProcess) -> None:
    """A key added is served by get, listed without its secret, and gone once forgotten."""
    with agent.client() as client:
        listed = client.add("h.example", "u@example.com", SECRET, description="ci")
        assert listed["key_id"] == key_id_for(SECRET)
        assert SECRET not in json.dumps(listed)
        assert client.get("h.example") == SECRET
        keys = client.list()
        assert [k["key_id"] for k in keys] == [key_id_for(SECRET)]
        assert keys[0]["source"] == "added"
        assert SECRET not in json.dumps(keys)
        assert client.forget(key_id_for(SECRET)) == 1
        with pytest.raises(errors.NotFound):
            client.get()


def test_adding_the_same_key_again_updates_it(agent: AgentProcess) -> None:
    """Re-adding a held key changes its entry instead of holding a duplicate."""
    with agent.client() as client:
        client.add("h.example", "u@example.com", SECRET, description="old")
        client.add("h.example", "u@example.com", SECRET, description="new")
        keys = client.list()
    assert len(keys) == 1
    assert keys[0]["description"] == "new"


def test_get_prefers_the_newest_match_and_honours_selectors(agent: AgentProcess) -> None:
    """Without a key id, get serves the newest key matching host and user."""
    with agent.client() as client:
        client.add("a.example", "u@example.com", "key-a-1")
        client.add("b.example", "u@example.com", "key-b")
        client.add("a.example", "u@example.com", "key-a-2")
        assert client.get() == "key-a-2"
        assert client.get(host="b.example") == "key-b"
        assert client.get(key_id=key_id_for("key-a-1")) == "key-a-1"
        with pytest.raises(errors.NotFound):
            client.get(host="c.example")


def test_key_id_prefix_matching_two_keys_is_ambiguous(agent: AgentProcess) -> None:
    """A key id prefix shared by two held keys is answered 'ambiguous', not guessed."""
    seen: dict[str, str] = {}
    for n in count():
        secret = f"key-{n}"
        prefix = key_id_for(secret)[:4]
        if prefix in seen:
            first = seen[prefix]
            break
        seen[prefix] = secret
    with agent.client() as client:
        client.add("h", "u", first)
        client.add("h", "u", secret)
        with pytest.raises(errors.Ambiguous):
            client.get(key_id=prefix)
        assert client.get(key_id=key_id_for(first)) == first


def test_forget_all_empties_the_agent(agent: AgentProcess) -> None:
    """forget with all=true drops every held key and says how many."""
    with agent.client() as client:
        client.add("h", "u", "one")
        client.add("h", "u", "two")
        assert client.forget(all=True) == 2
        assert client.list() == []


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"\xff\xfe{}\n", "bad_request"),
        (b"null\n", "bad_request"),
        (b"[]\n", "bad_request"),
        (b"3\n", "bad_request"),
        (b'"op"\n', "bad_request"),
        (b"{\n", "bad_request"),
        (b"[" * 50000 + b"\n", "bad_request"),
        (b'{"op": "get", "op": "stop"}\n', "bad_request"),
        (b'{"id": 1}\n', "bad_request"),
        (b'{"op": "frobnicate"}\n', "unknown_op"),
        (b'{"op": "add", "host": 1, "user": "u", "key": "k"}\n', "bad_request"),
        (b'{"op": "add", "host": "h", "user": "u", "key": "k", "lifetime": -1}\n', "bad_request"),
        (
            b'{"op": "add", "host": "h", "user": "u", "key": "k", "lifetime": 1e400}\n',
            "bad_request",
        ),
        (b'{"op": "add", "host": "h", "user": "u", "key": "k", "lifetime": "1h"}\n', "bad_request"),
        (b'{"op": "get", "key_id": ["x"]}\n', "bad_request"),
        (b'{"op": "get", "colour": "blue"}\n', "bad_request"),
        (b'{"op": "forget"}\n', "bad_request"),
        (b'{"op": "lock", "passphrase": 7}\n', "bad_request"),
        (b'{"op": "hello", "id": {"a": 1}}\n', "bad_request"),
    ],
)
def test_hostile_input_gets_an_error_and_the_agent_goes_on(
    raw: Callable[..., Raw], line: bytes, code: str
) -> None:
    """Malformed, unknown or mistyped requests get a coded error; the connection still works."""
    connection = raw()
    connection.send(line)
    assert error_code(decode(connection.line())) == code
    connection.send(b'{"id": "after", "op": "hello"}\n')
    after = decode(connection.line())
    assert after["ok"] is True
    assert after["id"] == "after"


def test_request_id_is_echoed_verbatim(raw: Callable[..., Raw]) -> None:
    """Every scalar id comes back as sent, on success and on error."""
    connection = raw()
    for request_id in ["x", 0, -5, 2.5, True, None, "é🔑"]:
        connection.send(json.dumps({"id": request_id, "op": "hello"}).encode() + b"\n")
        assert decode(connection.line())["id"] == request_id
        connection.send(json.dumps({"id": request_id, "op": "nope"}).encode() + b"\n")
        assert decode(connection.line())["id"] == request_id


def test_pipelined_requests_are_answered_in_order(raw: Callable[..., Raw]) -> None:
    """Several requests sent in one write get their replies in request order."""
    connection = raw()
    batch = b"".join(
        json.dumps({"id": n, "op": op}).encode() + b"\n"
        for n, op in enumerate(["hello", "status", "nope", "list", "hello"])
    )
    connection.send(batch)
    replies = [decode(connection.line()) for _ in range(5)]
    assert [r["id"] for r in replies] == [0, 1, 2, 3, 4]
    assert [r["ok"] for r in replies] == [True, True, False, True, True]


def test_thousands_of_pipelined_requests_refused_at_once_are_all_answered(
    agent: AgentProcess, raw: Callable[..., Raw]
) -> None:
    """Unlocks pipelined to an unlocked agent are each refused before any work; thousands in
    one write all get their not_locked answer, in order, and the agent goes on serving."""
    connection = raw(timeout=30)
    count = 4000
    connection.send(
        b"".join(
            json.dumps({"id": n, "op": "unlock", "passphrase": PASSPHRASE}).encode() + b"\n"
            for n in range(count)
        )
    )
    for n in range(count):
        answer = decode(connection.line())
        assert (answer["id"], error_code(answer)) == (n, "not_locked")
    with agent.client() as client:
        assert client.hello()["protocol"] == 1


def test_oversized_line_is_refused_and_the_connection_closed(raw: Callable[..., Raw]) -> None:
    """A line over 64 KiB gets too_large and the connection closes; others are unaffected."""
    big = raw()
    big.send(b'{"op": "hello", "pad": "' + b"x" * (70 * 1024) + b'"}\n')
    assert error_code(decode(big.line())) == "too_large"
    assert big.closed_by_peer()
    other = raw()
    other.send(b'{"op": "hello"}\n')
    assert decode(other.line())["ok"] is True


def test_a_long_reply_before_an_oversized_line_is_sent_whole_before_the_close(
    agent: AgentProcess, raw: Callable[..., Raw]
) -> None:
    """A reply larger than the socket's buffer, to a line pipelined just before a line over
    64 KiB, reaches the client whole, then too_large, then the close: the error never cuts
    short what was owed before it."""
    with agent.client() as client:
        client.add(host="h.example", user="u@example.com", key="long-reply-key-0123456789")
    gets = 6000  # each recorded in the audit log: a log reply of well over a megabyte
    filler = raw(timeout=30)
    filler.send(b'{"op": "get"}\n' * gets)
    for _ in range(gets):
        assert decode(filler.line())["ok"] is True
    connection = raw(timeout=30)
    connection.send(b'{"id": "log", "op": "log"}\n' + b"{" + b" " * (70 * 1024) + b"}\n")
    first = connection.line()
    assert len(first) > 1024 * 1024
    reply = decode(first)
    assert reply["id"] == "log"
    assert len(reply["result"]["entries"]) >= gets
    assert error_code(decode(connection.line())) == "too_large"
    assert connection.closed_by_peer()


def test_endless_line_without_newline_is_refused(raw: Callable[..., Raw]) -> None:
    """More than 64 KiB with no newline is too_large too, without waiting for the end."""
    endless = raw()
    endless.send(b"{" + b" " * (65 * 1024))
    assert error_code(decode(endless.line())) == "too_large"
    assert endless.closed_by_peer()


def test_half_line_client_does_not_delay_others(raw: Callable[..., Raw]) -> None:
    """A client stalled mid-line holds up no one: another client is served meanwhile."""
    stalled = raw()
    stalled.send(b'{"op": "hel')
    other = raw()
    other.send(b'{"id": 1, "op": "hello"}\n')
    assert decode(other.line())["ok"] is True
    stalled.send(b'lo"}\n')  # the stalled client's line, still awaited, is answered
    assert decode(stalled.line())["ok"] is True


def test_a_line_cut_by_the_end_of_the_connection_is_answered_not_run(
    agent: AgentProcess, raw: Callable[..., Raw]
) -> None:
    """A request with no newline, then the client's end of sending (shutdown): it is not
    run (it may be cut short), and the client, still reading, is told why."""
    cut = raw()
    cut.send(b'{"id": 1, "op": "stop"}')
    cut.sock.shutdown(socket.SHUT_WR)
    reply = decode(cut.line())
    assert error_code(reply) == "bad_request"
    assert "end each request with a newline" in reply["error"]["message"]
    assert cut.closed_by_peer()
    with agent.client() as client:  # the stop was not run
        assert client.status()["locked"] is False


def test_half_line_times_out(agent_factory: AgentFactory) -> None:
    """A line not completed within --line-timeout gets 'timeout' and the connection closes."""
    agent = agent_factory("--line-timeout", "0.3")
    connected = time.monotonic()  # before the agent can have started its clock
    slow = Raw(agent.socket_path)
    slow.send(b'{"op": "hello"')
    assert error_code(decode(slow.line())) == "timeout"
    assert time.monotonic() - connected >= 0.29  # not before the timeout (0.3 s)
    assert slow.closed_by_peer()
    slow.close()


def test_idle_connections_are_closed(agent_factory: AgentFactory) -> None:
    """A connection silent for --idle-timeout is closed; the agent keeps serving."""
    agent = agent_factory("--idle-timeout", "0.3")
    idle = Raw(agent.socket_path)
    assert idle.closed_by_peer()
    idle.close()
    with agent.client() as client:
        assert client.hello()["protocol"] == 1
        # The client library reconnects by itself after its connection was closed as idle.
        wait = Raw(agent.socket_path)
        assert wait.closed_by_peer()
        wait.close()
        assert client.hello()["protocol"] == 1


def test_connections_beyond_the_cap_are_answered_busy(agent_factory: AgentFactory) -> None:
    """With --max-connections N, connection N+1 gets one 'busy' line and is closed."""
    agent = agent_factory("--max-connections", "3")
    held = [Raw(agent.socket_path) for _ in range(3)]
    for connection in held:  # make sure all three are accepted before the fourth
        connection.send(b'{"op": "hello"}\n')
        assert decode(connection.line())["ok"] is True
    extra = Raw(agent.socket_path)
    assert error_code(decode(extra.line())) == "busy"
    assert extra.closed_by_peer()
    extra.close()
    # Free a slot in a way the test can observe: the agent closes a connection itself
    # (after too_large) in the same step that sends the reply we wait for.
    freed = held.pop()
    freed.send(b"x" * (65 * 1024))
    assert error_code(decode(freed.line())) == "too_large"
    freed.close()
    with agent.client() as client:
        assert client.hello()["protocol"] == 1
    for connection in held:
        connection.close()


def test_client_vanishing_mid_request_and_mid_reply_is_harmless(
    agent: AgentProcess, raw: Callable[..., Raw]
) -> None:
    """Clients that hang up halfway through a line or before reading replies cost nothing."""
    with agent.client() as client:
        for n in range(200):
            client.add("h", "u", f"key-{n:04d}")
    for _ in range(20):
        half = raw()
        half.send(b'{"op": "li')
        half.close()
        gone = raw()
        gone.send(b'{"op": "list"}\n' * 50)
        gone.close()
    with agent.client() as client:
        assert len(client.list()) == 200


def test_client_that_never_reads_does_not_block_others(
    agent: AgentProcess, raw: Callable[..., Raw]
) -> None:
    """A client flooding requests without reading replies is throttled, not served forever."""
    with agent.client() as client:
        for n in range(300):
            client.add("h", "u", f"key-{n:04d}", description="x" * 200)
    flood = raw()
    flood.sock.setblocking(False)
    request = b'{"op": "list"}\n'
    sent = 0
    try:
        while sent < 50 * 1024 * 1024:
            sent += flood.sock.send(request * 1000)
    except BlockingIOError:
        pass  # the agent stopped reading us: backpressure works
    assert sent < 50 * 1024 * 1024
    with agent.client() as client:
        assert client.hello()["protocol"] == 1


def test_keys_expire_on_time(agent: AgentProcess) -> None:
    """A key added with a lifetime is served until its deadline and not after."""
    lifetime = 2.0  # long enough for the first get to be certain to come before it
    with agent.client() as client:
        added_at = time.monotonic()
        listed = client.add("h", "u", SECRET, lifetime=lifetime)
        assert listed["expires"] is not None
        assert client.get() == SECRET
        deadline = added_at + lifetime + 5.0
        while True:  # each round trip is the wait; no sleeping
            try:
                client.get()
            except errors.NotFound:
                break
            assert time.monotonic() < deadline, "key outlived its lifetime"
        assert time.monotonic() - added_at >= lifetime * 0.95
        assert client.list() == []


def test_default_lifetime_from_t_flag(agent_factory: AgentFactory) -> None:
    """keyagent -t sets the lifetime of keys added without one."""
    agent = agent_factory("-t", "1h")
    with agent.client() as client:
        listed = client.add("h", "u", SECRET)
        forever = client.add("h", "u", "other", lifetime=7200)
    assert listed["expires"] is not None
    assert forever["expires"] > listed["expires"]


def test_lock_refuses_everything_but_hello_status_unlock_stop(agent: AgentProcess) -> None:
    """While locked, only hello, status, unlock and stop are answered; the rest get 'locked'."""
    with agent.client() as client:
        client.add("h", "u", SECRET)
        client.lock(PASSPHRASE)
        assert client.status()["locked"] is True
        assert client.hello()["protocol"] == 1
        for call in (
            client.get,
            client.list,
            lambda: client.add("h", "u", "k2"),
            lambda: client.forget(all=True),
            lambda: client.lock("again"),
        ):
            with pytest.raises(errors.Locked):
                call()
        with pytest.raises(errors.BadPassphrase):
            client.unlock("wrong")
        client.unlock(PASSPHRASE)
        assert client.get() == SECRET  # keys survive a lock
        with pytest.raises(errors.NotLocked):
            client.unlock(PASSPHRASE)


def test_usr1_forgets_every_key_of_a_locked_agent_too(agent: AgentProcess) -> None:
    """SIGUSR1 goes through dispatch but is not refused by the lock: a screen-lock hook drops
    the keys of an agent that is already locked; after unlocking, none is left."""
    with agent.client() as client:
        client.add("h.example", "u", SECRET)
        client.lock(PASSPHRASE)
        os.kill(agent.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while "forgot every held key" not in agent.log():  # each status is a round trip
            assert "on a signal failed" not in agent.log()
            assert time.monotonic() < deadline, "the agent never acted on SIGUSR1"
            assert client.status()["locked"] is True
        client.unlock(PASSPHRASE)
        assert client.list() == []
        with pytest.raises(errors.NotFound):
            client.get()


def test_a_locked_agent_can_be_stopped(agent: AgentProcess) -> None:
    """stop works on a locked agent: stopping reveals nothing (ssh-agent can be killed too)."""
    with agent.client() as client:
        client.add("h.example", "u", SECRET)
        client.lock(PASSPHRASE)
        client.stop()
    assert agent.process is not None
    assert agent.process.wait(timeout=10) == 0


def test_failed_unlocks_are_delayed_increasingly_without_stalling_others(
    agent: AgentProcess, raw: Callable[..., Raw]
) -> None:
    """Each wrong passphrase delays that client's reply longer; others are served meanwhile."""
    with agent.client() as client:
        client.lock(PASSPHRASE)
        elapsed = []
        for _ in range(4):
            started = time.monotonic()
            with pytest.raises(errors.BadPassphrase):
                client.unlock("wrong")
            elapsed.append(time.monotonic() - started)
        # Delays are 0.1 s, 0.2 s, 0.4 s, 0.8 s (plus scrypt): each at least its floor.
        for took, floor in zip(elapsed[1:], [0.2, 0.4, 0.8], strict=True):
            assert took >= floor
    guesser, bystander = raw(), raw()
    sent = time.monotonic()
    guesser.send(b'{"id": "guess", "op": "unlock", "passphrase": "wrong"}\n')  # held 1.6 s
    bystander.send(b'{"id": "s", "op": "status"}\n')
    assert decode(bystander.line())["ok"] is True
    served = time.monotonic() - sent
    guesser.sock.settimeout(15)
    assert error_code(decode(guesser.line())) == "bad_passphrase"
    assert time.monotonic() - sent >= 1.6
    assert served < 1.6  # the bystander was answered while the guesser's reply was held


def test_peer_from_another_uid_is_refused(open_agent: AgentProcess) -> None:
    """A process of another user gets 'forbidden' even when file permissions let it connect."""
    agent = open_agent
    answer = request_as_nobody(agent.socket_path, b'{"op": "get"}\n')
    message = json.loads(answer)
    assert error_code(message) == "forbidden"
    assert b"key" not in answer.split(b'"message"')[0]  # nothing of the store leaks
    assert "refused connection from uid 65534" in agent.log()


def test_stop_replies_then_exits_and_removes_the_socket(agent: AgentProcess) -> None:
    """stop is answered, then the agent exits 0 and removes its socket."""
    client = agent.client()
    client.stop()
    assert agent.process is not None
    assert agent.process.wait(10) == 0
    assert not os.path.exists(agent.socket_path)
    # The stop arrived with its connection (read at accept): the accept loop ends there
    # rather than call accept on the listener the stop just closed.
    assert "accept failed" not in agent.log()
    assert "WARNING" not in agent.log()


def test_debug_log_never_contains_secrets(agent: AgentProcess) -> None:
    """Even at debug level, no key or passphrase reaches the log."""
    with agent.client() as client:
        client.add("h", "u", SECRET, description="desc")
        client.get()
        client.list()
        client.lock(PASSPHRASE)
        with pytest.raises(errors.BadPassphrase):
            client.unlock("wrong-" + PASSPHRASE)
        client.unlock(PASSPHRASE)
        client.forget(all=True)
        raw_socket = Raw(agent.socket_path)
        raw_socket.send(
            b'{"op": "add", "host": "h", "user": "u", "key": "'
            + SECRET.encode()
            + b'", "bogus": 1}\n'
        )
        assert error_code(decode(raw_socket.line())) == "bad_request"
        raw_socket.close()
        client.stop()
    assert agent.process is not None
    agent.process.wait(10)
    log = agent.log()
    assert "op=add" in log  # debug logging was on
    assert SECRET not in log
    assert PASSPHRASE not in log


def test_client_reports_a_missing_agent_with_path_and_next_step(tmp_path: os.PathLike[str]) -> None:
    """Connecting to a path with no agent raises AgentUnreachable naming the path and the fix."""
    path = os.path.join(tmp_path, "nothing.sock")
    with pytest.raises(errors.AgentUnreachable) as caught:
        Client(path).hello()
    assert path in caught.value.message
    assert "keyagent" in caught.value.message


def test_remembered_replies_never_outlive_the_state_they_answered(
    agent_factory: AgentFactory,
) -> None:
    """Repeated gets (answered from the memo without debug logging) follow every change."""
    agent = agent_factory(debug=False)
    line = b'{"id": 1, "op": "get"}\n'
    raw = Raw(agent.socket_path)

    def ask() -> dict[str, object]:
        raw.send(line)
        return decode(raw.line())

    assert error_code(ask()) == "not_found"
    with agent.client() as client:
        client.add("h", "u", "first-key")
        assert ask()["result"] == {"key": "first-key", "key_id": key_id_for("first-key")}
        assert ask()["result"] == {"key": "first-key", "key_id": key_id_for("first-key")}
        client.add("h", "u", "second-key")
        assert ask()["result"] == {"key": "second-key", "key_id": key_id_for("second-key")}
        client.lock(PASSPHRASE)
        assert error_code(ask()) == "locked"
        client.unlock(PASSPHRASE)
        client.forget(all=True)
        assert error_code(ask()) == "not_found"
        added_at = time.monotonic()
        client.add("h", "u", "short-lived", lifetime=0.5)
        while "result" in (answer := ask()):  # each round trip is the wait
            assert time.monotonic() < added_at + 5, "a remembered reply outlived its key"
        assert time.monotonic() - added_at >= 0.45
        assert error_code(answer) == "not_found"
    raw.close()


def test_client_refuses_a_socket_served_by_another_user(tmp_path: Path) -> None:
    """The client checks who listens: a socket planted by another user gets no key at all."""
    base = Path(tempfile.mkdtemp(prefix="keyagent-planted-"))
    os.chmod(base, 0o755)
    os.chown(base, 65534, 65534)  # the other user's directory
    path = str(base / "agent.sock")
    ready_r, ready_w = os.pipe()
    got_r, got_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the other user's fake agent: record whatever a client sends
        code = 1
        try:
            os.close(ready_r)
            os.close(got_r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            os.chmod(path, 0o666)
            listener.listen(1)
            os.write(ready_w, b"R")
            peer, _ = listener.accept()
            peer.settimeout(10)
            received = b""
            while chunk := peer.recv(4096):
                received += chunk
            os.write(got_w, received or b"<nothing>")
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(got_w)
    try:
        assert os.read(ready_r, 1) == b"R"
        with pytest.raises(errors.AgentUnreachable) as caught:
            Client(path).add("h", "u", SECRET)
        assert "uid 65534" in caught.value.message
        received = b""
        while chunk := os.read(got_r, 4096):
            received += chunk
        assert received == b"<nothing>"
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(ready_r)
        os.close(got_r)
        shutil.rmtree(base, ignore_errors=True)


def test_failed_unlock_delay_holds_across_parallel_connections(
    agent: AgentProcess, raw: Callable[..., Raw]
) -> None:
    """Guesses sent in parallel on fresh connections are spaced by the growing delay too."""
    with agent.client() as client:
        client.lock(PASSPHRASE)
        for _ in range(3):  # the next delays are 0.4 s, then 0.8 s
            with pytest.raises(errors.BadPassphrase):
                client.unlock("wrong")
    guessers = [raw(timeout=30) for _ in range(2)]
    started = time.monotonic()
    for guesser in guessers:
        guesser.send(b'{"op": "unlock", "passphrase": "wrong"}\n')
    for guesser in guessers:
        assert error_code(decode(guesser.line())) == "bad_passphrase"
    # Without the agent-wide pacing, both would be answered after about 0.8 s.
    assert time.monotonic() - started >= 0.4 + 0.8 + 0.8


def test_a_stopped_server_leaves_no_signal_wakeup_on_its_closed_pipe(tmp_path: Path) -> None:
    """Signals write to the loop's wake-up pipe; once the server has stopped (the pipe
    closed) none is installed, so a second SIGTERM to the process group during the exit
    writes to no closed (or reused) descriptor, and prints no traceback."""
    probe = f"""
import os, signal, socket, sys
from keyagent.agent import Agent
from keyagent.server import Server
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind({str(tmp_path / "a.sock")!r})
listener.listen()
server = Server(Agent(), listener)
server.install_signal_handlers()
server.call_at(server.clock(), lambda: os.kill(os.getpid(), signal.SIGTERM))
server.serve_forever()
print("wakeup fd after stop:", signal.set_wakeup_fd(-1))
os.kill(os.getpid(), signal.SIGTERM)  # a late one: handled, written nowhere
print("late signal taken")
"""
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["wakeup fd after stop: -1", "late signal taken"]
    assert "Traceback" not in result.stderr
