"""Fuzzing one live agent process over its socket, with hypothesis; and the atheris harness.

One agent serves every example of the module, twice over: once run with debug logging (as
AgentProcess runs it) and once without, which is how people run it and the only way the
server's memo of repeated reads is on. After each example: every reply is a valid
protocol v1 line and is exactly what the protocol module predicts for a refused line (the
oracle is :func:`keyagent.protocol.parse_request`, run here on the same bytes), the agent
closes the connection only after ``too_large`` or at the end of the input, and a fresh
connection is still answered. All the while a well-behaved client, on its own connection,
must see only right answers.

The agent can never reach a network: its HTTPS proxy is a loopback port that refuses
connections (bound, never listening), so remote operations with fuzzed hosts fail fast
and locally. Its keyring is the in-memory one from keyagent.testing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyagent import errors, protocol
from keyagent.client import Client
from keyagent.protocol import MAX_LINE, OPS, InvalidRequest, Request
from keyagent.server import CUT_LINE
from keyagent.store import digest_of, key_id_for
from keyagent.testing.agent import AgentProcess

FUZZ_DIR = Path(__file__).resolve().parent.parent / "fuzz"
REPLY_TIMEOUT = 20.0
MARKER = "S3CR3T"
"""In every generated key, password and passphrase: it must never appear in an error."""

BG_HOST, BG_USER = "bg.fuzz.test", "bg@fuzz.test"
BG_SECRET = f"bg-{MARKER}-well-behaved-0123456789"
BG_KEY_ID = key_id_for(BG_SECRET)

# Codes a valid request may get from this agent. Not: internal (a bug), too_large and
# timeout (framing), busy (cap), unknown_op (it serves every op), locked (never locked:
# see spare_the_run), forbidden (same uid, and no service to answer 403).
AGENT_CODES = frozenset(
    {
        "bad_request", "not_found", "ambiguous", "not_locked", "bad_passphrase",
        "login_required", "bad_credentials", "session_expired", "remote_error",
        "remote_unreachable", "tls_error", "keyring_unavailable",
        # A key added with export false, confirm or allow_exe, then asked for with get.
        "forbidden", "denied",
    }
)  # fmt: skip


def fuzz_settings(max_examples: int) -> settings:
    """Examples share one live agent (a module fixture): no deadline, no fixture warning."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


# --- the agent, and a well-behaved client beside the fuzzer ------------------------------------


@pytest.fixture(scope="module", params=["debug", "quiet"])
def fuzz_agent(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AgentProcess]:
    """One agent for the whole module (per logging mode); its proxy refuses every connection."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as refuser:
        refuser.bind(("127.0.0.1", 0))  # never listen(): connecting is refused at once
        proxy = f"http://127.0.0.1:{refuser.getsockname()[1]}"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("KEYAGENT_")},
            "KEYAGENT_CONFIG": "/dev/null",
            "PYTHON_KEYRING_BACKEND": "keyagent.testing.memory_keyring.MemoryKeyring",
            **{name: proxy for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")},
            "NO_PROXY": "",
            "no_proxy": "",
        }
        agent = AgentProcess(
            tmp_path_factory.mktemp("fuzz") / "agent",
            ["--connect-timeout", "1", "--read-timeout", "1"],
            env=env,
            debug=request.param == "debug",
        )
        with agent:
            yield agent
            assert agent.process is not None
            assert agent.process.poll() is None, "the agent died"
            assert MARKER not in agent.log(), "a secret reached the agent's log"


class Background:
    """A well-behaved client doing hello/add/get/list in a loop on its own connection."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.rounds = 0
        self.failures: list[str] = []
        self._progress = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fuzz-bystander", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(REPLY_TIMEOUT + 10)

    def assert_healthy(self, since: int) -> None:
        """No failure so far, and a round completed after ``since`` (waited for)."""
        with self._progress:
            progressed = self._progress.wait_for(
                lambda: self.rounds > since or bool(self.failures), REPLY_TIMEOUT
            )
        assert self.failures == []
        assert progressed, "the well-behaved client made no progress"

    def _run(self) -> None:
        with Client(self.socket_path, timeout=REPLY_TIMEOUT) as client:
            while not self._stop.is_set():
                try:
                    self._round(client)
                except Exception as error:  # noqa: BLE001  # recorded, asserted in the tests
                    self.failures.append(f"round {self.rounds}: {type(error).__name__}: {error}")
                with self._progress:
                    self.rounds += 1
                    self._progress.notify_all()
                if len(self.failures) > 20:
                    return
                self._stop.wait(0.005)  # pacing, and the stop signal

    @staticmethod
    def _round(client: Client) -> None:
        assert client.hello()["protocol"] == 1
        assert client.add(BG_HOST, BG_USER, BG_SECRET)["key_id"] == BG_KEY_ID
        assert client.get(key_id=BG_KEY_ID) == BG_SECRET
        assert BG_KEY_ID in {k["key_id"] for k in client.list(host=BG_HOST, user=BG_USER)}


@pytest.fixture(scope="module")
def background(fuzz_agent: AgentProcess) -> Iterator[Background]:
    """The well-behaved client, started once for the module."""
    bystander = Background(fuzz_agent.socket_path)
    bystander.start()
    yield bystander
    bystander.stop()
    assert bystander.failures == []


# --- one example: send lines, predict every reply, check the agent still answers ---------------

Outcome = Request | InvalidRequest


def outcome_of(line: bytes) -> Outcome:
    try:
        return protocol.parse_request(line)
    except InvalidRequest as invalid:
        return invalid


def spare_the_run(line: bytes) -> bytes:
    """The line to send instead of one that would end or freeze the run for every example.

    Valid stop and lock requests are never sent (a stopped agent fails every later example; a
    locked one answers everything 'locked', the well-behaved client included), nor valid
    forgets of every key or of the well-behaved client's key, nor a log with follow (its
    connection then carries entries only). Invalid ones are sent: the protocol refuses them
    before the agent acts.
    """
    outcome = outcome_of(line)
    if not isinstance(outcome, Request):
        return line
    key_id = outcome.args.get("key_id")
    forgets_too_much = outcome.op == "forget" and (
        outcome.args.get("all") is True
        or (key_id is not None and digest_of(BG_SECRET).startswith(key_id))
    )
    # A follow keeps its connection for audit entries: the lines after it go unanswered.
    follows = outcome.op == "log" and outcome.args.get("follow") is True
    if outcome.op in {"stop", "lock"} or forgets_too_much or follows:
        return protocol.encode_request("hello", outcome.id, {})[:-1]
    return line


def same_id(left: object, right: object) -> bool:
    """Equal ids of the same JSON type: 1, 1.0 and true are three different ids."""
    return type(left) is type(right) and left == right


def check_reply(outcome: Outcome, line: bytes, agent: AgentProcess) -> None:
    """``line`` is a well-formed reply, and the right one for ``outcome``."""
    line.decode("utf-8")
    parsed = protocol.parse_reply(line)
    message = json.loads(line)
    assert set(message) in ({"id", "ok", "result"}, {"id", "ok", "error"}), message
    if not parsed.ok:
        assert set(message["error"]) == {"code", "message"}
        assert isinstance(message["error"]["message"], str)
        assert message["error"]["message"]
        assert MARKER not in message["error"]["message"]
    if isinstance(outcome, InvalidRequest):
        # Refused before the agent sees it: exactly the line the protocol module encodes.
        assert line + b"\n" == protocol.encode_error(outcome.request_id, outcome.error)
        return
    assert same_id(parsed.id, outcome.id), (parsed.id, outcome.id)
    if parsed.error is not None:
        assert parsed.error.code in AGENT_CODES, (outcome, message)
        return
    result = message["result"]
    assert isinstance(result, dict)
    if outcome.op == "hello":
        assert result["protocol"] == protocol.PROTOCOL_VERSION
    elif outcome.op == "status":
        assert result["pid"] == agent.pid
        assert result["locked"] is False
    elif outcome.op == "add":
        assert result["key_id"] == key_id_for(outcome.args["key"])
        assert "key" not in result
    elif outcome.op == "get":
        assert result["key_id"] == key_id_for(result["key"])
    elif outcome.op == "list":
        assert all("key" not in key for key in result["keys"])


def exchange(agent: AgentProcess, lines: list[bytes], *, terminated: bool = True) -> None:
    """Send ``lines`` on a new connection (the last one unfinished unless ``terminated``),
    shut down the sending side, read until the agent closes, and check every reply."""
    lines = [spare_the_run(line) for line in lines]
    complete = lines if terminated else lines[:-1]
    expected: list[Outcome] = []
    for line in complete:
        expected.append(outcome_of(line))
        if len(line) > MAX_LINE:
            break  # too_large: the agent answers, then closes the connection
    else:
        if not terminated and len(lines[-1]) > MAX_LINE:
            expected.append(InvalidRequest(errors.TooLarge()))
        elif not terminated and lines[-1]:  # cut by the end of sending: not run, but answered
            expected.append(InvalidRequest(errors.BadRequest(CUT_LINE)))
    data = b"\n".join(lines) + (b"\n" if terminated else b"")
    received = bytearray()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(REPLY_TIMEOUT)
        sock.connect(agent.socket_path)
        # Replies are read while the lines are sent, as a well-behaved client does: the
        # agent stops reading a client that leaves a megabyte of replies unread (a log of
        # the whole audit ring is more), and a client that only sent would wait for ever.
        sock.setblocking(False)
        sending = memoryview(data)
        deadline = time.monotonic() + REPLY_TIMEOUT
        closed = False
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            while not closed:
                left = deadline - time.monotonic()
                assert left > 0, "the agent neither replied nor closed"
                for _, events in selector.select(left):
                    if events & selectors.EVENT_WRITE:
                        try:
                            sending = sending[sock.send(sending[:65536]) :]
                        except BlockingIOError:
                            pass
                        except (BrokenPipeError, ConnectionResetError):
                            sending = sending[:0]  # after too_large the agent stops reading
                        if not sending:
                            with contextlib.suppress(OSError):
                                sock.shutdown(socket.SHUT_WR)
                            selector.modify(sock, selectors.EVENT_READ)
                    if events & selectors.EVENT_READ:
                        try:
                            chunk = sock.recv(65536)
                        except BlockingIOError:
                            continue
                        except ConnectionResetError:
                            chunk = b""
                        received += chunk
                        closed = not chunk
    *replies, tail = bytes(received).split(b"\n")
    assert tail == b"", "a reply without its newline"
    assert len(replies) == len(expected), (replies, expected)
    for outcome, reply in zip(expected, replies, strict=True):
        check_reply(outcome, reply, agent)


def fresh_connection_answers(agent: AgentProcess) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(REPLY_TIMEOUT)
        sock.connect(agent.socket_path)
        sock.sendall(protocol.encode_request("hello", "fresh", {}))
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            assert chunk, "a fresh connection was closed without an answer"
            data += chunk
    reply = protocol.parse_reply(data[:-1])
    assert reply.ok
    assert reply.id == "fresh"


def run_example(agent: AgentProcess, lines: list[bytes], *, terminated: bool = True) -> None:
    exchange(agent, lines, terminated=terminated)
    fresh_connection_answers(agent)


# --- strategies -------------------------------------------------------------------------------

_no_controls = st.characters(codec="utf-8", exclude_categories=("Cc", "Cs"))
_token = st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zs", "Zl", "Zp"))
_any_char = st.characters(codec="utf-8")  # controls, surrogates and bidi overrides included


def _secret(alphabet: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.text(alphabet, max_size=30).map(lambda tail: f"{MARKER}-{tail}")


# Hosts near the edges of the host grammar: labels of 0 to 70 characters, hyphens at either
# end, doubled dots, ports from 0 to 99999; and text of any printable character.
_LABELS = st.text("ab-0", max_size=70)
DNS_LIKE_HOSTS = st.builds(
    lambda labels, port: ".".join(labels) + port,
    st.lists(_LABELS, min_size=1, max_size=5),
    st.one_of(st.just(""), st.integers(0, 99999).map(lambda port: f":{port}")),
)
BAD_HOSTS = [
    "app..conduce.com",  # an empty label: urllib3's LocationParseError escaped as internal
    "a" * 255,  # a label over 63 characters (found by this suite on 3.12)
    "x." + "a" * 64,
    "app.conduce.com:99999",  # a port out of range: was remote_error, inviting a retry
    "app.conduce.com:0",
    "app.conduce.com.",
    "-app.conduce.com",
    "256.1.1.1",
    "[:]",
    "[::1",
    "h\u2028x",
]
HOSTS = st.one_of(
    st.text(_token, min_size=1, max_size=30),
    DNS_LIKE_HOSTS,
    st.sampled_from(["127.0.0.1:1", "[::1]:1", "xn--zz", "-a", *BAD_HOSTS]),
)
ARGUMENTS: dict[str, st.SearchStrategy[Any]] = {
    "host": HOSTS,
    "user": st.text(_no_controls, min_size=1, max_size=30),
    "key": _secret(st.characters(codec="ascii", exclude_categories=("Cc", "Zs"))),
    "description": st.text(_no_controls, max_size=40),
    "passphrase": _secret(_no_controls),
    "password": _secret(st.characters(codec="utf-8", exclude_categories=["Cs"])),
    "key_id": st.text("0123456789abcdefABCDEF", min_size=4, max_size=64),
    "lifetime": st.one_of(
        st.integers(1, int(protocol.MAX_LIFETIME)),
        st.floats(0, protocol.MAX_LIFETIME, exclude_min=True),
    ),
    "persist": st.booleans(),
    "keep": st.booleans(),
    "local": st.booleans(),
    "delete": st.booleans(),
    "all": st.booleans(),
    "remote": st.booleans(),
    "reveal": st.booleans(),
    "export": st.booleans(),
    "confirm": st.booleans(),
    "allow_exe": st.lists(
        st.one_of(st.sampled_from(["/usr/bin/curl", "/opt/t/run"]), st.text(_no_controls)),
        max_size=3,
    ),
    "rotate_every": st.one_of(
        st.integers(60, int(protocol.MAX_LIFETIME)), st.floats(60, protocol.MAX_LIFETIME)
    ),
    "follow": st.booleans(),
    "n": st.one_of(st.integers(0, 1_000_000), st.integers()),
    "purpose": st.one_of(st.just("exec"), st.text(_any_char, max_size=8)),
}
SCALAR_IDS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=10),
)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**80), 2**80),
    st.floats(),  # NaN and infinities: not JSON, and refused as such
    st.text(_any_char, max_size=20),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
    ),
    max_leaves=16,
)
STRICT_JSON_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**80), 2**80),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(_any_char, max_size=20),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
    ),
    max_leaves=16,
)
"""JSON values that json.dumps writes as standard JSON (no NaN or infinities)."""
ARGUMENT_NAMES = sorted({name for spec in OPS.values() for name in spec})
NAMES = st.one_of(st.sampled_from([*ARGUMENT_NAMES, "id", "op"]), st.text(_any_char, max_size=12))

# Fuzzed ops: all but stop and lock, whose valid forms would end or freeze the run; their
# invalid forms still come up below (wrong types, random JSON objects).
FUZZED_OPS = sorted(set(OPS) - {"stop", "lock"})


def valid_request(op: str) -> st.SearchStrategy[dict[str, Any]]:
    spec = OPS[op]
    return st.fixed_dictionaries(
        {"op": st.just(op), **{n: ARGUMENTS[n] for n, (_, needed) in spec.items() if needed}},
        optional={
            "id": SCALAR_IDS,
            **{n: ARGUMENTS[n] for n, (_, needed) in spec.items() if not needed},
        },
    )


def serialize(data: st.DataObject, message: object) -> bytes:
    """JSON text as a client might write it: ASCII-escaped or raw UTF-8 (lone surrogates then
    make bytes that are not UTF-8), compact or spaced."""
    compact = data.draw(st.booleans(), label="compact")
    text = json.dumps(
        message,
        allow_nan=True,
        ensure_ascii=data.draw(st.booleans(), label="ascii"),
        separators=(",", ":") if compact else None,
    )
    return text.encode("utf-8", "surrogatepass")


def mutate(data: st.DataObject, message: dict[str, Any]) -> bytes:
    """A valid request with members dropped, added, retyped, made huge, made of odd
    characters, nested, or duplicated."""
    duplicate: tuple[str, object] | None = None
    for _ in range(data.draw(st.integers(0, 3), label="mutations")):
        kind = data.draw(
            st.sampled_from(["drop", "add", "retype", "huge", "unicode", "nest", "duplicate"])
        )
        if kind == "add":
            message[data.draw(NAMES, label="name")] = data.draw(JSON_VALUES, label="value")
            continue
        if not message:
            continue
        name = data.draw(st.sampled_from(sorted(message)), label="member")
        if kind == "drop":
            del message[name]
        elif kind == "retype":
            message[name] = data.draw(JSON_VALUES, label="value")
        elif kind == "huge":
            length = data.draw(
                st.one_of(
                    st.sampled_from([255, 256, 320, 321, 1024, 1025, 4096, 4097, 8192, 8193]),
                    st.integers(MAX_LINE - 100, MAX_LINE + 100),
                    st.integers(0, 20_000),
                ),
                label="length",
            )
            message[name] = data.draw(st.sampled_from(["x", "é", "🔑", "\u202e"])) * length
        elif kind == "unicode":
            message[name] = data.draw(st.text(_any_char, min_size=1, max_size=30))
        elif kind == "nest":
            depth = data.draw(st.integers(1, 40), label="depth")
            wrapped: object = message[name]
            for level in range(depth):
                wrapped = [wrapped] if level % 2 else {"v": wrapped}
            message[name] = wrapped
        else:
            duplicate = (name, data.draw(JSON_VALUES, label="value"))
    line = serialize(data, message)
    if duplicate is not None and line.endswith(b"}") and message:
        extra = json.dumps({duplicate[0]: duplicate[1]}, allow_nan=True)[1:]
        line = line[:-1] + b"," + extra.encode("utf-8", "surrogatepass")
    return line


# --- the properties -----------------------------------------------------------------------------


@pytest.fixture
def fuzz(fuzz_agent: AgentProcess, background: Background) -> Iterator[AgentProcess]:
    """The module's agent; after the test, the well-behaved client must have been served
    right all along, and must complete a round after the test's last request."""
    since = background.rounds
    yield fuzz_agent
    background.assert_healthy(since)


@fuzz_settings(400)
@given(
    lines=st.lists(st.binary(max_size=200), min_size=1, max_size=4),
    terminated=st.booleans(),
)
def test_random_byte_lines_get_valid_replies(
    fuzz: AgentProcess, lines: list[bytes], terminated: bool
) -> None:
    """Any bytes, as one or more lines, get one valid reply per complete line; the agent goes on."""
    run_example(fuzz, b"\n".join(lines).split(b"\n"), terminated=terminated)


@fuzz_settings(200)
@given(data=st.data())
def test_random_json_values_get_valid_replies(fuzz: AgentProcess, data: st.DataObject) -> None:
    """Any JSON value, or any object with an op and arguments of any type, gets a valid reply."""
    value = data.draw(
        st.one_of(
            JSON_VALUES,
            st.fixed_dictionaries(
                {"op": st.one_of(st.sampled_from(sorted(OPS)), JSON_VALUES)},
                optional={"id": JSON_VALUES},
            ).flatmap(
                lambda head: st.dictionaries(NAMES, JSON_VALUES, max_size=4).map(
                    lambda rest: {**rest, **head}
                )
            ),
        ),
        label="value",
    )
    run_example(fuzz, [serialize(data, value)])


@fuzz_settings(500)
@given(data=st.data())
def test_mutated_valid_requests_get_valid_replies(fuzz: AgentProcess, data: st.DataObject) -> None:
    """Valid requests of every op, mutated or not, and pipelined, each get their right reply."""
    count = data.draw(st.integers(1, 3), label="pipelined")
    lines = []
    for _ in range(count):
        op = data.draw(st.sampled_from(FUZZED_OPS), label="op")
        lines.append(mutate(data, data.draw(valid_request(op), label="request")))
    run_example(fuzz, lines)


# What a value of each kind of argument is not.
WRONG_VALUES: dict[str, list[object]] = {
    "text": [None, 0, -1, 1.5, True, False, [], {}, ["x"], {"x": "y"}],
    "bool": [None, 0, 1, 1.0, "true", "", [], {}, [True]],
    "key_id": [None, 1234, 1.5, True, [], {}, ["abcd"], 0xABCD],
    "lifetime": [None, True, False, "60", "", [], {}, [60], {"s": 60}],
    "allow_exe": [None, True, "/usr/bin/curl", 1, {}, [1], [None], [["/bin/sh"]]],
    "n": [None, True, "10", 1.5, -1, 1_000_001, [], {}],
    "purpose": [None, True, 1, "", "EXEC", [], {}, ["exec"]],
    "rotate_every": [None, True, "1h", 59, 0, -1, 1e12, [], {}, [3600]],
}
TEXT_ARGUMENTS = {"host", "user", "key", "description", "passphrase", "password"}
# A valid value for each argument, so that a request fails on the one wrong argument only.
VALID_VALUES: dict[str, object] = {
    "host": "h.example", "user": "u@example.com", "key": f"{MARKER}-k", "description": "d",
    "passphrase": f"{MARKER}-p", "password": f"{MARKER}-pw", "key_id": "abcd", "lifetime": 60,
    "persist": False, "all": False, "remote": False, "reveal": False, "export": True,
    "confirm": False, "allow_exe": [], "follow": False, "n": 1, "purpose": "exec",
    "keep": False, "local": True, "delete": False, "rotate_every": 3600,
}  # fmt: skip


def kind_of(name: str) -> str:
    if name in TEXT_ARGUMENTS:
        return "text"
    return (
        name
        if name in {"key_id", "lifetime", "allow_exe", "n", "purpose", "rotate_every"}
        else "bool"
    )


def wrongly_typed(op: str, name: str, value: object) -> bytes:
    """A request of ``op`` with every required argument valid, except ``name`` = ``value``."""
    message: dict[str, object] = {"id": f"{op}.{name}", "op": op}
    for argument, (_, needed) in OPS[op].items():
        if needed:
            message[argument] = VALID_VALUES[argument]
    message[name] = value
    return json.dumps(message, allow_nan=False).encode()


def assert_names_the_argument(agent: AgentProcess, lines: list[bytes], names: list[str]) -> None:
    """Each line is refused bad_request with a message that names its argument."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(REPLY_TIMEOUT)
        sock.connect(agent.socket_path)
        sock.sendall(b"".join(line + b"\n" for line in lines))
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    replies = received.splitlines()
    assert len(replies) == len(lines)
    for line, reply, name in zip(lines, replies, names, strict=True):
        outcome = outcome_of(line)
        assert isinstance(outcome, InvalidRequest)
        check_reply(outcome, reply, agent)
        error = json.loads(reply)["error"]
        assert error["code"] == "bad_request"
        assert f"'{name}'" in error["message"]


HOST_OPS = sorted(op for op, spec in OPS.items() if "host" in spec)


@pytest.mark.parametrize("host", BAD_HOSTS)
def test_a_host_outside_the_grammar_is_bad_request_for_every_op(
    fuzz: AgentProcess, host: str
) -> None:
    """Every op that takes a host refuses one outside the host grammar as bad_request, before
    any network call: never internal, never a remote error that invites a retry."""
    lines = [wrongly_typed(op, "host", host) for op in HOST_OPS]
    assert_names_the_argument(fuzz, lines, ["host"] * len(lines))


def test_every_argument_of_every_op_refuses_every_wrong_type(fuzz: AgentProcess) -> None:
    """Every argument of every op, given a value of each wrong JSON type, is bad_request naming
    it, and nothing else happens (stop and lock included: a wrong type never reaches them)."""
    lines, names = [], []
    for op, spec in OPS.items():
        for name in spec:
            for value in WRONG_VALUES[kind_of(name)]:
                lines.append(wrongly_typed(op, name, value))
                names.append(name)
    assert_names_the_argument(fuzz, lines, names)
    fresh_connection_answers(fuzz)
    with Client(fuzz.socket_path) as client:
        assert client.status()["locked"] is False


@fuzz_settings(125)
@given(data=st.data())
def test_wrong_argument_types_are_bad_request_naming_the_argument(
    fuzz: AgentProcess, data: st.DataObject
) -> None:
    """An argument of any op given any JSON value of a wrong type is bad_request naming it."""
    op = data.draw(st.sampled_from([op for op, spec in OPS.items() if spec]), label="op")
    name = data.draw(st.sampled_from(sorted(OPS[op])), label="argument")
    kind = kind_of(name)
    wrong: Callable[[object], bool] = {
        "text": lambda v: not isinstance(v, str),
        "bool": lambda v: not isinstance(v, bool),
        "key_id": lambda v: not isinstance(v, str),
        "lifetime": lambda v: isinstance(v, bool) or not isinstance(v, int | float),
        "allow_exe": lambda v: not isinstance(v, list) or not all(isinstance(i, str) for i in v),
        "n": lambda v: isinstance(v, bool) or not isinstance(v, int),
        "purpose": lambda v: not isinstance(v, str),
        "rotate_every": lambda v: isinstance(v, bool) or not isinstance(v, int | float),
    }[kind]
    value = data.draw(STRICT_JSON_VALUES.filter(wrong), label="value")
    assert_names_the_argument(fuzz, [wrongly_typed(op, name, value)], [name])
    fresh_connection_answers(fuzz)


def test_repeated_reads_follow_every_change(fuzz: AgentProcess) -> None:
    """The same get line, sent again and again, is answered from the agent's current state:
    after an add, a forget and an expiry (whether or not the agent remembers replies)."""
    host = "memo.fuzz.test"
    line = b'{"id":"same","op":"get","host":"memo.fuzz.test"}\n'
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock,
        Client(fuzz.socket_path) as client,
    ):
        sock.settimeout(REPLY_TIMEOUT)
        sock.connect(fuzz.socket_path)
        buffer = b""

        def ask() -> str | None:
            nonlocal buffer
            sock.sendall(line)
            while b"\n" not in buffer:
                chunk = sock.recv(65536)
                assert chunk
                buffer += chunk
            reply, _, buffer = buffer.partition(b"\n")
            message = json.loads(reply)
            assert message["id"] == "same"
            if message["ok"]:
                return str(message["result"]["key"])
            assert message["error"]["code"] == "not_found"
            return None

        secrets = [f"memo-{MARKER}-{n}" for n in range(3)]
        try:
            assert [ask(), ask()] == [None, None]
            client.add(host, BG_USER, secrets[0])
            assert [ask(), ask()] == [secrets[0], secrets[0]]
            client.add(host, BG_USER, secrets[1])
            assert [ask(), ask()] == [secrets[1], secrets[1]]
            client.forget(key_id_for(secrets[1]))
            assert [ask(), ask()] == [secrets[0], secrets[0]]
            lifetime = 2.0  # the first ask is certain to come before it ends
            added = time.monotonic()
            client.add(host, BG_USER, secrets[2], lifetime=lifetime)
            assert ask() == secrets[2]
            while (answer := ask()) == secrets[2]:  # each round trip is the wait
                assert time.monotonic() < added + lifetime + REPLY_TIMEOUT, "never expired"
            assert time.monotonic() >= added + lifetime
            assert [answer, ask()] == [secrets[0], secrets[0]]
        finally:
            for secret in secrets:
                with contextlib.suppress(errors.NotFound):
                    client.forget(key_id_for(secret))


def test_the_client_can_send_every_valid_request(fuzz_agent: AgentProcess) -> None:
    """The reference client can send a request the protocol calls valid: a key of 8192
    characters (keys are ASCII) with a description of emoji, which the agent accepts as
    raw UTF-8."""
    key = "k" * 8192
    message = {
        "op": "add", "host": "emoji.example", "user": "u", "key": key,
        "description": "\U0001f511" * 1024,
    }  # fmt: skip
    assert isinstance(outcome_of(json.dumps(message, ensure_ascii=False).encode()), Request)
    with Client(fuzz_agent.socket_path) as client:
        try:
            added = client.add("emoji.example", "u", key, description="\U0001f511" * 1024)
            assert added["key_id"] == key_id_for(key)
        finally:
            with contextlib.suppress(errors.KeyagentError):
                client.forget(key_id_for(key))


# --- the coverage-guided harness ----------------------------------------------------------------

ATHERIS_MISSING = importlib.util.find_spec("atheris") is None


@pytest.mark.skipif(
    ATHERIS_MISSING,
    reason="atheris is not installed: pip install atheris (a manylinux wheel exists for "
    "CPython 3.11 on x86_64; no compiler needed) to run fuzz/fuzz_protocol.py",
)
def test_atheris_harness_runs_briefly(tmp_path: Path) -> None:
    """The atheris harness runs 20,000 inputs from the seed corpus without finding a crash."""
    corpus = tmp_path / "corpus"
    shutil.copytree(FUZZ_DIR / "corpus", corpus)  # libFuzzer adds inputs to its first corpus
    harness = [sys.executable, str(FUZZ_DIR / "fuzz_protocol.py")]
    flags = ["-runs=20000", "-max_total_time=60", f"-artifact_prefix={tmp_path}/"]
    result = subprocess.run(
        [*harness, *flags, str(corpus)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    # libFuzzer may count one run more than asked ("Done 20001 runs"): at least all of them.
    done = re.search(r"^Done (\d+) runs", result.stderr, re.MULTILINE)
    assert done is not None, result.stderr[-6000:]
    assert int(done.group(1)) >= 20000
    assert not list(tmp_path.glob("crash-*"))
