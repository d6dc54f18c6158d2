"""The HTTP socket end to end: a real agent and the shipped HTTPS emulator, curl and
requests as the tools (keyagent.proxy, keyagent.http_client)."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
import requests
import requests.adapters

import keyagent
from keyagent import errors
from keyagent.store import key_id_for
from keyagent.testing.agent import AgentProcess
from keyagent.testing.emulator import (
    REDIRECT_LOCATION,
    Fault,
    blob_chunks,
    blob_sha256,
    key_id,
)
from keyagent.testing.emulator_process import Emulator

from .conftest import AgentFactory, request_as_nobody, run_ctl, wait_until
from .test_proxy_workers import said, workers_of

USER = "carol@example.com"
PASSWORD = "proxy-pa55word-never-shown"
VALIDATE = "/conduce/api/v1/user/validate-session"
CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")


@pytest.fixture
def conduce_agent(agent_factory: AgentFactory, emulator: Emulator) -> AgentProcess:
    """An agent that trusts the emulator's CA, with short timeouts."""
    return agent_factory(
        "--ca-bundle", emulator.ca_path, "--read-timeout", "3", "--connect-timeout", "3",
        "--line-timeout", "2",
    )  # fmt: skip


def http_path(agent: AgentProcess) -> str:
    return str(Path(agent.socket_path).with_name("http.sock"))


def ctl(agent: AgentProcess, emu: Emulator, *argv: str, stdin: str = "") -> None:
    result = run_ctl(agent.socket_path, "--host", emu.host, "--user", USER, *argv, stdin=stdin)
    assert result.code == 0, result.err


def login(agent: AgentProcess, emu: Emulator) -> None:
    ctl(agent, emu, "login", "--password-stdin", stdin=PASSWORD + "\n")


def add_key(agent: AgentProcess, emu: Emulator) -> str:
    """A key made on the service, then held by the agent; returns it."""
    secret = emu.add_key(USER, "for the proxy")
    ctl(agent, emu, "add", stdin=secret + "\n")
    return secret


def exchange(path: str, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes to the HTTP socket; everything it answers until it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        if data:  # nothing to send: a refusal on accept may already have closed the socket
            sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def curl(agent: AgentProcess, url: str, *args: str) -> tuple[int, dict[str, str], bytes]:
    """curl --unix-socket: status, headers (lower-case names) and body."""
    assert CURL is not None
    result = subprocess.run(
        [CURL, "-sS", "-i", "--unix-socket", http_path(agent), *args, url],
        capture_output=True,
        timeout=30,
        check=True,
    )
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 1"):  # 100 Continue: the final answer follows
        head, _, body = body.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


# --- the socket itself --------------------------------------------------------------------


def test_the_socket_is_private_and_announced(agent: AgentProcess) -> None:
    """http.sock sits beside agent.sock, mode 0600, and status names it."""
    path = http_path(agent)
    assert os.stat(path).st_mode & 0o777 == 0o600
    with agent.client() as client:
        assert client.status()["http_socket"] == path
    result = run_ctl(agent.socket_path, "status")
    assert f"HTTP socket: {path}" in result.out


def test_eval_lines_export_the_http_socket(tmp_path: Path) -> None:
    """eval "$(keyagent)" exports KEYAGENT_HTTP_SOCK, and keyagent -k unsets it."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "KEYAGENT_CONFIG": "/dev/null"}
    env.pop("KEYAGENT_SOCK", None)
    script = (
        f'eval "$({sys.executable} -m keyagent.daemon -s)" >/dev/null && '
        'printf "%s\\n" "$KEYAGENT_HTTP_SOCK" && test -S "$KEYAGENT_HTTP_SOCK" && '
        f'eval "$({sys.executable} -m keyagent.daemon -k)" >/dev/null && '
        'printf "[%s]\\n" "${KEYAGENT_HTTP_SOCK-unset}"'
    )
    result = subprocess.run(
        ["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    assert first == str(runtime / "keyagent" / "http.sock")
    assert second == "[unset]"


def test_another_user_gets_nothing(open_agent: AgentProcess) -> None:
    """A connection from another uid is closed before a byte is read, whatever the file
    permissions (loosened here so that the peer check is what is tested)."""
    request = b"GET /conduce/api/v1/user/list-teams HTTP/1.1\r\nHost: h\r\n\r\n"
    assert request_as_nobody(http_path(open_agent), request) == b"<closed without reply>"
    assert "refused HTTP connection from uid 65534" in open_agent.log()


# --- forwarding ---------------------------------------------------------------------------


@needs_curl
def test_curl_gets_what_the_service_answers(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """Through the socket, curl sees the service's status, body and Content-Type, made with
    the session the agent holds."""
    login(conduce_agent, emulator)
    status, headers, body = curl(conduce_agent, f"http://{emulator.host}{VALIDATE}")
    assert status == 200
    assert json.loads(body) == {"email": USER}
    assert headers["content-type"] == "application/json"
    assert "x-keyagent-error" not in headers
    assert "set-cookie" not in headers


@needs_curl
def test_a_held_key_authenticates_and_the_tools_own_credentials_are_dropped(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """With only a key held, the call is made with it; an Authorization header from the tool
    never reaches the service (its wrong key would make the call fail)."""
    add_key(conduce_agent, emulator)
    status, _, _ = curl(
        conduce_agent,
        f"http://{emulator.host}/conduce/api/v1/apikeys/../user/validate-session",
        "--path-as-is",
    )
    assert status == 404  # dot segments are refused, not resolved
    status, _, _ = curl(
        conduce_agent,
        f"http://{emulator.host}/conduce/api/v1/user/validate-session",
        "-H", "Authorization: Bearer not-a-key-of-anyone", "-H", "Cookie: session=forged",
    )  # fmt: skip
    # Answered 200 with the agent's key: the tool's wrong key did not go out in its place,
    # and the emulator saw a bearer key and no cookie.
    assert status == 200
    (record,) = [r for r in emulator.requests if r.path == "user/validate-session"]
    assert (record.auth, record.sent_cookie, record.user) == ("bearer", False, USER)


def test_each_lending_is_in_the_agents_log_before_the_request_leaves(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """The agent logs what it lends, to whom, at info, as it lends it (once per connection):
    a request's audit entry comes when it ends, and an agent killed meanwhile would leave no
    other trace of a use. The session and a key each."""
    login(conduce_agent, emulator)
    secret = add_key(conduce_agent, emulator)
    python = os.path.realpath(sys.executable)
    with keyagent.http_session(emulator.host, socket_path=http_path(conduce_agent)) as session:
        assert session.get(f"https://{emulator.host}{VALIDATE}").status_code == 200
    with conduce_agent.client() as client:
        client.logout(emulator.host, USER)
    with keyagent.http_session(emulator.host, socket_path=http_path(conduce_agent)) as session:
        assert session.get(f"https://{emulator.host}{VALIDATE}").status_code == 200
    lent = [
        line.split("INFO: ", 1)[1]
        for line in conduce_agent.log().splitlines()
        if "INFO: lending " in line
    ]
    me = f"to pid {os.getpid()} ({python}) for proxied requests"
    assert lent == [
        f"lending the session of {USER} on {emulator.host} {me}",
        f"lending key {key_id_for(secret)} of {USER} on {emulator.host} {me}",
    ]
    assert secret not in conduce_agent.log()


@needs_curl
def test_credential_endpoints_never_reach_the_service(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """apikeys/list through the socket would hand every key to the tool: refused with 403,
    naming the command to use, and the service never sees the request."""
    login(conduce_agent, emulator)
    emulator.clear_requests()
    for path in ("apikeys/list", "apikeys/create", "apikeys/delete", "user/login", "user/logout"):
        status, headers, body = curl(
            conduce_agent, f"http://{emulator.host}/conduce/api/v1/{path}", "-X", "POST"
        )
        assert status == 403, path
        assert headers["x-keyagent-error"] == "forbidden"
        assert "keyagent-ctl" in json.loads(body)["error"]["message"]
    assert emulator.requests == []


@needs_curl
def test_agent_errors_are_marked(conduce_agent: AgentProcess, emulator: Emulator) -> None:
    """No credentials: 401 login_required from the agent; outside the API: 404."""
    status, headers, body = curl(conduce_agent, f"http://{emulator.host}{VALIDATE}")
    assert (status, headers["x-keyagent-error"]) == (401, "login_required")
    assert json.loads(body)["error"]["code"] == "login_required"
    status, headers, _ = curl(conduce_agent, f"http://{emulator.host}/etc/passwd")
    assert (status, headers["x-keyagent-error"]) == (404, "not_found")


def test_http_session_makes_requests_calls_through_the_agent(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """keyagent.http_session: an https:// URL, unchanged, answered through the agent."""
    login(conduce_agent, emulator)
    session = keyagent.http_session(emulator.host, socket_path=http_path(conduce_agent))
    with session:
        answer = session.get(f"https://{emulator.host}{VALIDATE}")
        assert answer.status_code == 200
        assert answer.json() == {"email": USER}
        refused = session.post(f"https://{emulator.host}/conduce/api/v1/apikeys/list")
        assert refused.status_code == 403
        assert refused.headers["X-Keyagent-Error"] == "forbidden"


class Recorder(requests.adapters.BaseAdapter):
    """Stands in for another host: records what it is sent, answers 204."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[requests.PreparedRequest] = []

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        self.sent.append(request)
        answer = requests.Response()
        answer.status_code, answer.request, answer.url = 204, request, str(request.url)
        answer._content = b""
        return answer

    def close(self) -> None:
        pass


def test_http_session_names_its_account_to_the_agent_only(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """With two accounts held for the host, http_session(user=) picks one: its choice goes
    to the agent with each call, never into a request for another host. A URL that spells
    out port 443 goes through the agent too."""
    teams = f"https://{emulator.host}/conduce/api/v1/user/list-teams"
    other = "dave@example.com"
    emulator.add_user(other, "dave-pa55word")
    login(conduce_agent, emulator)
    result = run_ctl(
        conduce_agent.socket_path, "--host", emulator.host, "--user", other, "add",
        stdin=emulator.add_key(other) + "\n",
    )  # fmt: skip
    assert result.code == 0, result.err
    path = http_path(conduce_agent)
    with keyagent.http_session(emulator.host, socket_path=path) as either:
        assert either.get(teams).status_code == 409
    for user in (USER, other):
        with keyagent.http_session(emulator.host, user, socket_path=path) as session:
            answer = session.get(teams)
            assert answer.status_code == 200, answer.text
            assert [team["name"] for team in answer.json()] == [user]
            # The service redirects to another host: requests follows, without the choice.
            elsewhere = Recorder()
            session.mount("https://redirected.invalid/", elsewhere)
            session.get(f"https://{emulator.host}/api/v2/data/redirect")
            (followed,) = elsewhere.sent
            assert not [name for name in followed.headers if name.lower().startswith("x-keyagent")]
            assert followed.headers.get("Host") is None
    with keyagent.http_session("app.conduce.example", socket_path=path) as session:
        adapter = session.get_adapter("https://app.conduce.example/x")
        assert session.get_adapter("https://app.conduce.example:443/x") is adapter
        assert session.get_adapter("https://app.conduce.example:8443/x") is not adapter


def test_a_tool_never_holds_the_key(
    conduce_agent: AgentProcess, emulator: Emulator, tmp_path: Path
) -> None:
    """A tool process that calls the service through the agent ends with the answer and no
    trace of the key: not in its environment, not in what it received or printed."""
    secret = add_key(conduce_agent, emulator)
    tool = tmp_path / "tool.py"
    tool.write_text(
        textwrap.dedent(
            f"""
            import os, sys, keyagent
            session = keyagent.http_session({emulator.host!r})
            answer = session.get("https://{emulator.host}{VALIDATE}")
            received = repr(answer.status_code) + repr(dict(answer.headers)) + answer.text
            environ = open("/proc/self/environ", "rb").read().decode("latin-1")
            print(received)
            print(environ)
            """
        )
    )
    env = {**os.environ, "KEYAGENT_HTTP_SOCK": http_path(conduce_agent)}
    result = subprocess.run(
        [sys.executable, str(tool)], env=env, capture_output=True, text=True, timeout=60,
        check=True,
    )  # fmt: skip
    assert result.stdout.startswith("200")
    assert secret not in result.stdout
    assert secret not in result.stderr


def test_the_session_expiring_falls_back_to_a_held_key(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """When the service refuses the session, the agent learns it and retries with a key."""
    login(conduce_agent, emulator)
    add_key(conduce_agent, emulator)
    emulator.expire_sessions(USER)
    session = keyagent.http_session(emulator.host, socket_path=http_path(conduce_agent))
    emulator.clear_requests()
    with session:
        answer = session.get(f"https://{emulator.host}{VALIDATE}")
    assert answer.status_code == 200
    assert "X-Keyagent-Error" not in answer.headers
    tried = [(r.auth, r.status) for r in emulator.requests]
    # The request with the session, the agent's check that the session expired (the same
    # endpoint here), then the request again with the key.
    assert tried == [("cookie", 401), ("cookie", 401), ("bearer", 200)]
    with conduce_agent.client() as client:
        (state,) = client.status()["sessions"]
    assert state["expired"] is True


def test_a_revoked_key_falls_back_to_the_next_held_key(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """When the service refuses the newest held key (revoked: unknown to the service), the
    agent checks the key itself and retries with the next one; the tool gets the answer.
    A key the tool names is never swapped for another."""
    good = add_key(conduce_agent, emulator)
    revoked = "revoked-key-the-service-no-longer-knows-0001"
    ctl(conduce_agent, emulator, "add", stdin=revoked + "\n")
    emulator.clear_requests()
    status, _, body = curl(conduce_agent, f"http://{emulator.host}/conduce/api/v1/user/list-teams")
    assert status == 200, body
    tried = [(r.path, r.status) for r in emulator.requests]
    # The request with the revoked key, the agent's check of that key, the request again.
    assert tried == [("user/list-teams", 401), ("apikeys/list", 401), ("user/list-teams", 200)]
    with conduce_agent.client() as client:
        entries = [
            (e["outcome"], e["status"], e["key_id"]) for e in client.log() if e["op"] == "proxy"
        ]
    # An entry per try, each naming the key it used.
    assert entries == [("ok", 401, key_id_for(revoked)), ("ok", 200, key_id_for(good))]
    status, _, _ = curl(
        conduce_agent, f"http://{emulator.host}/conduce/api/v1/user/list-teams",
        "-H", f"X-Keyagent-Key-Id: {key_id_for(revoked)}",
    )  # fmt: skip
    assert status == 401


def test_a_revoked_key_is_noted_by_a_streamed_upload(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """A streamed upload cannot be sent again: the first one made with a revoked key gets
    the 401, but the agent checks the key and notes it refused (audit "check", list
    --json "refused"), so the next upload goes with the next key."""
    good = add_key(conduce_agent, emulator)
    revoked = "revoked-key-the-service-no-longer-knows-0002"
    ctl(conduce_agent, emulator, "add", stdin=revoked + "\n")
    url = f"http://{emulator.host}/api/v2/data/upload"
    upload = ("-H", "Transfer-Encoding: chunked", "--data-binary", "x" * 1000)
    first, _, _ = curl(conduce_agent, url, *upload)
    second, _, body = curl(conduce_agent, url, *upload)
    assert (first, second) == (401, 200), body
    with conduce_agent.client() as client:
        entries = client.log()
        listed = {key["key_id"]: key["refused"] for key in client.list()}
    # The check is made while the 401 is under way, so its entry comes first.
    assert [(e["op"], e["outcome"], e["status"], e["key_id"]) for e in entries][-3:] == [
        ("check", "bad_credentials", None, key_id_for(revoked)),
        ("proxy", "ok", 401, key_id_for(revoked)),
        ("proxy", "ok", 200, key_id_for(good)),
    ]
    assert listed == {key_id_for(good): False, key_id_for(revoked): True}
    shown = run_ctl(conduce_agent.socket_path, "list")
    (row,) = [line for line in shown.out.splitlines() if line.startswith(key_id_for(revoked))]
    assert "added (refused)" in row


# --- failures -----------------------------------------------------------------------------


def test_malformed_http_gets_400_and_a_close(conduce_agent: AgentProcess) -> None:
    """Something that is not HTTP/1.1 is answered 400 and the connection closed."""
    answer = exchange(http_path(conduce_agent), b"NOT HTTP AT ALL\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"X-Keyagent-Error: bad_request" in answer
    smuggled = exchange(
        http_path(conduce_agent),
        b"POST /api/v2/data/x HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    assert smuggled.startswith(b"HTTP/1.1 400 ")


def test_a_get_with_a_body_is_refused_and_never_reaches_the_service(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """The body of a GET could be left unread by a service and taken for the next request
    on the agent's pooled connection (smuggling one past the agent's checks, with its
    credential): such a request is answered 400 and closed, and nothing is sent."""
    emulator.clear_requests()
    answer = exchange(
        http_path(conduce_agent),
        f"GET /api/v2/data/x HTTP/1.1\r\nHost: {emulator.host}\r\nContent-Length: 5\r\n"
        "\r\nhello".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"X-Keyagent-Error: bad_request" in answer
    assert b"may not have a body" in answer
    assert emulator.requests == []


def test_what_is_not_http_is_answered_in_the_agents_words_and_recorded(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """Malformed requests get the agent's own message (never the tool's bytes, which may
    hold a credential), a fitting status (431 for a head too large, 505 for another HTTP
    version) and a close without a reset; each leaves a proxy entry; none reaches the
    service."""
    path = http_path(conduce_agent)
    host = emulator.host
    cases = [
        (b"GET /api/v2/x HTTP/1.1\r\nHost: " + host.encode()
         + b"\r\nAuthorization : Bearer s3kr1t-in-a-bad-line\r\n\r\n", 400, b"NAME: VALUE"),
        (b"GET /api/v2/x HTTP/1.1\r\n\r\n", 400, b"no Host header"),
        (b"GET /api/v2/x HTTP/1.1\r\nHost: " + host.encode() + b"\r\nX-Big: "
         + b"a" * 70000 + b"\r\n\r\n", 431, b"larger than 16 KiB"),
        (b"GET /api/v2/x HTTP/1.1\r\nHost: " + host.encode() + b"\r\nX-Big: "
         + b"a" * 20000 + b"\r\n\r\n", 431, b"larger than 16 KiB"),  # whole in one read
        (b"GET /api/v2/x HTTP/2.0\r\nHost: " + host.encode() + b"\r\n\r\n", 505, b"HTTP/1.1"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, b"HTTP/1.1"),
        (b"POST /api/v2/x HTTP/1.1\r\nHost: " + host.encode()
         + b"\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400, b"disagree"),
    ]  # fmt: skip
    emulator.clear_requests()
    for raw, status, words in cases:
        answer = exchange(path, raw)  # read to the end: a reset would raise here
        assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:100]
        assert answer.count(b"X-Keyagent-Error") == 1  # one answer, then the close
        assert b"X-Keyagent-Error: bad_request" in answer
        assert words in answer
        assert b"s3kr1t" not in answer
        assert b"bytearray" not in answer
    assert emulator.requests == []
    with conduce_agent.client() as client:
        entries = [e for e in client.log() if e["op"] == "proxy"]
    assert [(e["outcome"], e["method"], e["path"]) for e in entries] == [
        ("bad_request", None, None)
    ] * len(cases)
    assert "s3kr1t" not in json.dumps(entries)


def test_repeated_control_headers_and_unknown_expectations_are_refused(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """Two X-Keyagent-User (or Key-Id) headers are a bad request, not a guess at which one;
    an Expect other than 100-continue is 417."""
    login(conduce_agent, emulator)
    url = f"http://{emulator.host}/conduce/api/v1/user/list-teams"
    for header in ("X-Keyagent-User", "X-Keyagent-Key-Id"):
        status, headers, body = curl(
            conduce_agent, url, "-H", f"{header}: {USER}", "-H", f"{header}: other@example.com"
        )
        assert (status, headers["x-keyagent-error"]) == (400, "bad_request")
        assert f"more than one {header}" in json.loads(body)["error"]["message"]
    status, headers, _ = curl(conduce_agent, url, "-H", "Expect: teapot")
    assert (status, headers["x-keyagent-error"]) == (417, "bad_request")
    assert headers["connection"] == "close"


def test_a_tool_that_leaves_before_its_body_is_recorded(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """A small body is read before the request leaves; a tool that hangs up first is
    recorded as cut, with the account, and the service never sees the request."""
    login(conduce_agent, emulator)
    emulator.clear_requests()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(http_path(conduce_agent))
        sock.sendall(
            f"POST /api/v2/data/x HTTP/1.1\r\nHost: {emulator.host}\r\n"
            "Content-Length: 1000\r\n\r\nonly ten b".encode()
        )
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(4096) == b""  # closed without an answer: nobody to read it
    with conduce_agent.client() as client:
        entries = [e for e in client.log() if e["op"] == "proxy"]
    assert [(e["outcome"], e["method"], e["path"], e["user"]) for e in entries] == [
        ("cut", "POST", "/api/v2/data/x", USER)
    ]
    assert emulator.requests == []


def read_to_close(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def agent_error(answer: bytes) -> tuple[int, str, dict[str, Any]]:
    """Status, X-Keyagent-Error and JSON body of one whole answer of the agent's own."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    return int(lines[0].split()[1]), headers["x-keyagent-error"], json.loads(body)


def test_a_slow_head_is_answered_408_and_cut(conduce_agent: AgentProcess) -> None:
    """A request head that does not arrive whole within --line-timeout gets 408 timeout,
    saying so, and the connection ends, while other clients are served."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.settimeout(20)
        connected = time.monotonic()  # before the agent can have started its clock
        slow.connect(http_path(conduce_agent))
        slow.sendall(b"GET /conduce/api/v1/user/list-teams HTTP/1.1\r\n")
        with conduce_agent.client() as client:
            assert client.status()["locked"] is False
        status, code, body = agent_error(read_to_close(slow))
        assert time.monotonic() - connected >= 1.9  # not before --line-timeout (2 s)
    assert (status, code, body["error"]["code"]) == (408, "timeout", "timeout")
    assert "did not arrive whole within 2 s" in body["error"]["message"]
    with conduce_agent.client() as client:
        (entry,) = [e for e in client.log() if e["op"] == "proxy"]
    assert (entry["outcome"], entry["method"], entry["path"]) == ("timeout", None, None)


def stalled(agent: AgentProcess, emu: Emulator, head: str, body: str) -> dict[str, Any]:
    """Send a request that stops part way and wait: its answer must be 408 timeout and a
    close. Returns the answer's message and the request's one audit entry."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(http_path(agent))
        sock.sendall(f"{head}\r\nHost: {emu.host}\r\n".encode() + body.encode())
        status, code, answer = agent_error(read_to_close(sock))
    assert (status, code) == (408, "timeout")
    with agent.client() as client:
        (entry,) = [e for e in client.log() if e["op"] == "proxy"]
    assert entry["outcome"] == "timeout"
    return {"message": answer["error"]["message"], "entry": entry}


def test_a_body_shorter_than_announced_is_answered_408(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """A tool that sends less body than its Content-Length and waits for the answer is
    told, after the I/O timeout, why it gets none (408 timeout), rather than cut off in
    silence; the request never reaches the service, and is recorded as timed out."""
    login(conduce_agent, emulator)
    emulator.clear_requests()
    seen = stalled(
        conduce_agent, emulator, "POST /api/v2/data/x HTTP/1.1",
        "Content-Length: 1000\r\n\r\nonly ten b",
    )  # fmt: skip
    assert "no more of the request's body came" in seen["message"]
    assert (seen["entry"]["method"], seen["entry"]["path"]) == ("POST", "/api/v2/data/x")
    assert emulator.requests == []


def test_a_streamed_upload_that_stalls_is_answered_408(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """A chunked upload streams to the service as it comes; a tool that stops sending
    mid-way gets 408 too, and the request is recorded as timed out."""
    login(conduce_agent, emulator)
    seen = stalled(
        conduce_agent, emulator, "PUT /api/v2/data/x HTTP/1.1",
        "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )  # fmt: skip
    assert seen["entry"]["method"] == "PUT"


def test_unreachable_service_is_a_502(agent_factory: AgentFactory, tmp_path: Path) -> None:
    """Nothing listening at the host: 502 remote_unreachable from the agent."""
    agent = agent_factory("--connect-timeout", "2", name="unreachable")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    host = f"127.0.0.1:{port}"
    secret = "k" * 32
    result = run_ctl(agent.socket_path, "--host", host, "--user", USER, "add", stdin=secret + "\n")
    assert result.code == 0, result.err
    answer = exchange(
        http_path(agent),
        f"GET {VALIDATE} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 502 ")
    assert b"X-Keyagent-Error: remote_unreachable" in answer
    assert secret.encode() not in answer


def test_an_untrusted_certificate_is_a_502(agent_factory: AgentFactory, emulator: Emulator) -> None:
    """Without the emulator's CA, verification fails: 502 tls_error, never an answer."""
    agent = agent_factory("--connect-timeout", "3", name="no-ca")
    result = run_ctl(
        agent.socket_path, "--host", emulator.host, "--user", USER, "add", stdin="k" * 32 + "\n"
    )
    assert result.code == 0, result.err
    answer = exchange(
        http_path(agent),
        f"GET {VALIDATE} HTTP/1.1\r\nHost: {emulator.host}\r\nConnection: close\r\n\r\n".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 502 ")
    assert b"X-Keyagent-Error: tls_error" in answer


def test_a_hung_service_is_a_504_and_get_stays_answered(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """A service that never answers: get on agent.sock is served meanwhile, and the proxied
    call ends in 504 after --read-timeout."""
    add_key(conduce_agent, emulator)
    emulator.inject(Fault.hang(), path="user/validate-session")
    answers: list[bytes] = []
    request = f"GET {VALIDATE} HTTP/1.1\r\nHost: {emulator.host}\r\nConnection: close\r\n\r\n"
    caller = threading.Thread(
        target=lambda: answers.append(exchange(http_path(conduce_agent), request.encode(), 30))
    )
    caller.start()
    try:
        assert emulator.wait_for_hung(1, timeout=10)
        with conduce_agent.client() as client:
            assert client.get()  # answered while the proxied call hangs
        caller.join(timeout=20)
        assert answers, "the proxied call did not end"
        assert answers[0].startswith(b"HTTP/1.1 504 ")
        assert b"X-Keyagent-Error: timeout" in answers[0]
    finally:
        emulator.release()
        caller.join(timeout=20)


def test_a_locked_agent_refuses_proxied_calls(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """Locked: 423 locked, and the service sees nothing."""
    add_key(conduce_agent, emulator)
    with conduce_agent.client() as client:
        client.lock("lock passphrase")
    emulator.clear_requests()
    answer = exchange(
        http_path(conduce_agent),
        f"GET {VALIDATE} HTTP/1.1\r\nHost: {emulator.host}\r\nConnection: close\r\n\r\n".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 423 ")
    assert emulator.requests == []


def test_keep_alive_serves_several_requests_on_one_connection(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """Requests on one connection are all answered, in order; a refusal (no body) keeps
    the connection open for the next one."""
    login(conduce_agent, emulator)
    one = f"GET {VALIDATE} HTTP/1.1\r\nHost: {emulator.host}\r\n\r\n"
    refused = f"GET /outside HTTP/1.1\r\nHost: {emulator.host}\r\n\r\n"
    two = f"GET {VALIDATE} HTTP/1.1\r\nHost: {emulator.host}\r\nConnection: close\r\n\r\n"
    answer = exchange(http_path(conduce_agent), (one + refused + two).encode())
    assert answer.count(b"HTTP/1.1 200 OK") == 2
    assert answer.count(b"HTTP/1.1 404 Not Found") == 1


# --- what passes through, both ways (the emulator's data endpoints) ------------------------


def echo(agent: AgentProcess, emu: Emulator, path: str, *args: str) -> dict[str, Any]:
    status, headers, body = curl(agent, f"http://{emu.host}{path}", *args)
    assert status == 200, body
    assert "set-cookie" not in headers  # the echo sets one: stripped
    assert headers["x-echo"] == "1"  # other headers pass
    document: dict[str, Any] = json.loads(body)
    return document


@needs_curl
@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE"])
def test_every_method_query_and_body_pass_unchanged(
    conduce_agent: AgentProcess, emulator: Emulator, method: str
) -> None:
    """Method, path, query string, body and the tool's other headers reach the service as
    the tool sent them, authenticated with the agent's key and no credential of the tool.
    (A GET goes without a body: one is refused, see the test below.)"""
    secret = add_key(conduce_agent, emulator)
    body = b'{"query": "x&y=1"}' if method != "GET" else b""
    sent = ["--data-binary", body.decode()] if body else []
    seen = echo(
        conduce_agent, emulator, "/conduce/api/v2/resources/search?a=1&b=%20two",
        "-X", method, *sent, "-H", "Content-Type: application/json",
        "-H", "Authorization: Bearer tool-held-key", "-H", "Cookie: session=forged",
        "-H", "X-Tool: kept",
    )  # fmt: skip
    assert seen["method"] == method
    assert seen["path"] == "/conduce/api/v2/resources/search"
    assert seen["query"] == "a=1&b=%20two"
    assert seen["body_length"] == len(body)
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    headers = seen["headers"]
    assert headers["authorization"] == {"auth": "bearer", "key_id": key_id(secret), "valid": True}
    assert "cookie" not in headers
    assert headers["x-tool"] == "kept"
    assert headers["content-type"] == "application/json"
    assert not any(name.startswith("x-keyagent") for name in headers)


@needs_curl
def test_head_and_the_doubled_slash_of_the_python_client(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """HEAD gets the head GET would; //api/v2/... goes out as the client wrote it."""
    add_key(conduce_agent, emulator)
    seen = echo(conduce_agent, emulator, "//api/v2/data/transactions", "--path-as-is")
    assert seen["path"] == "//api/v2/data/transactions"
    status, headers, body = curl(
        conduce_agent, f"http://{emulator.host}/api/v2/data/blob/1000", "-I"
    )
    assert (status, headers["content-length"], body) == (200, "1000", b"")


@needs_curl
def test_redirects_are_passed_back_not_followed(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """A 302 reaches the tool as it is; the agent never calls the other host."""
    add_key(conduce_agent, emulator)
    status, headers, _ = curl(conduce_agent, f"http://{emulator.host}/api/v2/data/redirect")
    assert status == 302
    assert headers["location"] == REDIRECT_LOCATION


@needs_curl
def test_a_large_upload_waits_for_100_continue_and_streams(
    conduce_agent: AgentProcess, emulator: Emulator, tmp_path: Path
) -> None:
    """curl's Expect: 100-continue upload (chunked and with a length) arrives whole."""
    add_key(conduce_agent, emulator)
    data = os.urandom(3 * 1024 * 1024)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(data)
    for framing in ([], ["-H", "Transfer-Encoding: chunked"]):
        status, _, body = curl(
            conduce_agent, f"http://{emulator.host}/api/v2/data/upload",
            "-X", "PUT", "-H", "Expect: 100-continue", "--data-binary", f"@{upload}", *framing,
        )  # fmt: skip
        assert status == 200, body
        assert json.loads(body) == {
            "length": len(data), "sha256": hashlib.sha256(data).hexdigest()
        }  # fmt: skip


@needs_curl
def test_an_early_answer_to_an_upload_ends_it(
    conduce_agent: AgentProcess, emulator: Emulator, tmp_path: Path
) -> None:
    """The service answers 413 before a 64 MiB upload's end: the tool gets that answer with
    ``Connection: close`` and uploads no further, as it would talking to the service."""
    assert CURL is not None
    add_key(conduce_agent, emulator)
    size = 64 * 1024 * 1024
    upload = tmp_path / "upload.json"
    with upload.open("wb") as file:
        file.truncate(size)  # sparse: nothing to write
    # curl's own Expect: 100-continue with a length; none with chunks.
    for framing in ([], ["-H", "Transfer-Encoding: chunked", "-H", "Expect:"]):
        result = subprocess.run(
            [
                CURL, "-sS", "-i", "--unix-socket", http_path(conduce_agent),
                "--data-binary", f"@{upload}", *framing, "-w", "\n%{size_upload}",
                f"http://{emulator.host}/conduce/api/v1/datasets/create",
            ],
            capture_output=True, timeout=30, check=True,
        )  # fmt: skip
        answer, _, uploaded = result.stdout.rpartition(b"\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        if head.startswith(b"HTTP/1.1 100 "):
            head, _, body = body.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413 "), answer
        assert b"\r\nConnection: close" in head
        assert json.loads(body) == {"error": HTTPStatus(413).phrase}  # as the emulator says it
        assert int(uploaded) < size // 2, "the upload went on after the answer"


def test_an_early_answer_reaches_a_tool_that_uploads_before_it_reads(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """http.client sends the whole body before it reads: the agent drains what the tool
    still sends after answering (a lingering close), so the tool reads the 413, as from
    the service itself, rather than a reset."""
    add_key(conduce_agent, emulator)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(http_path(conduce_agent))
        tool = http.client.HTTPConnection(emulator.host, timeout=20)
        tool.sock = sock
        body = b"{" + b" " * (8 * 1024 * 1024) + b"}"
        tool.request("POST", "/conduce/api/v1/datasets/create", body=body)
        answer = tool.getresponse()
        assert (answer.status, answer.getheader("Connection")) == (413, "close")
        assert json.loads(answer.read()) == {"error": HTTPStatus(413).phrase}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_large_bodies_stream_through_without_growing_the_agent(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """A 96 MiB download and a 96 MiB upload through the agent arrive whole, while the
    agent's resident memory grows by less than 8 MiB (it holds a chunk, not the body)."""
    add_key(conduce_agent, emulator)
    size = 96 * 1024 * 1024
    session = keyagent.http_session(emulator.host, socket_path=http_path(conduce_agent))
    with session:
        # Warm up: the first proxied call loads h11, urllib3 and the TLS context.
        assert session.get(f"https://{emulator.host}/api/v2/data/blob/1024").status_code == 200
        before = rss_kib(conduce_agent.pid)
        digest = hashlib.sha256()
        with session.get(
            f"https://{emulator.host}/api/v2/data/blob/{size}?chunked=1", stream=True
        ) as answer:
            assert answer.status_code == 200
            received = 0
            for chunk in answer.iter_content(1024 * 1024):
                digest.update(chunk)
                received += len(chunk)
        assert (received, digest.hexdigest()) == (size, blob_sha256(size))
        after_download = rss_kib(conduce_agent.pid)

        def pieces() -> Iterator[bytes]:
            yield from blob_chunks(size)

        uploaded = session.post(f"https://{emulator.host}/api/v2/data/upload", data=pieces())
        assert uploaded.json() == {"length": size, "sha256": blob_sha256(size)}
        after_upload = rss_kib(conduce_agent.pid)
    assert after_download - before < 8 * 1024, (before, after_download)
    assert after_upload - before < 8 * 1024, (before, after_upload)


def test_100_continue_comes_only_for_an_accepted_request(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """A tool waiting for 100 Continue gets it once the agent accepted the request, and then
    uploads; a refused request gets its refusal instead, and never uploads."""
    add_key(conduce_agent, emulator)
    body = b"x" * 5000
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(http_path(conduce_agent))
        sock.sendall(
            f"PUT /api/v2/data/upload HTTP/1.1\r\nHost: {emulator.host}\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 100 ")
        sock.sendall(body)
        answer = b""
        while b'"sha256"' not in answer:
            answer += sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200 ")
    refused = exchange(
        http_path(conduce_agent),
        f"POST /conduce/api/v1/apikeys/create HTTP/1.1\r\nHost: {emulator.host}\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode(),
    )
    assert refused.startswith(b"HTTP/1.1 403 ")
    assert b"100 Continue" not in refused


def test_an_agent_error_to_a_head_is_a_head_and_the_connection_goes_on(
    agent: AgentProcess,
) -> None:
    """A HEAD the agent refuses gets the error's head alone (its Content-Length that of the
    JSON a GET would get), and the next request on the connection is answered."""
    answer = exchange(
        http_path(agent),
        b"HEAD /conduce/api/v1/apikeys/list HTTP/1.1\r\nHost: h.example\r\n\r\n"
        b"GET /outside HTTP/1.1\r\nHost: h.example\r\nConnection: close\r\n\r\n",
    )
    head, rest = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 403 ")
    assert b"X-Keyagent-Error: forbidden" in head
    assert b"Connection: close" not in head
    assert rest.startswith(b"HTTP/1.1 404 ")  # no body in between
    refused = exchange(
        http_path(agent),
        b"GET /conduce/api/v1/apikeys/list HTTP/1.1\r\nHost: h.example\r\n"
        b"Connection: close\r\n\r\n",
    )
    length = re.search(rb"Content-Length: (\d+)", head)
    assert length is not None
    assert int(length.group(1)) == len(refused.split(b"\r\n\r\n", 1)[1])


def test_the_connection_cap_is_shared(agent_factory: AgentFactory) -> None:
    """HTTP and JSON-lines connections count against one --max-connections: past it, an
    HTTP tool gets 503 busy and a JSON-lines client gets busy."""
    agent = agent_factory("--max-connections", "2", name="capped")
    idle_http = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle_json = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Each makes one request and waits for its answer, so both are surely admitted.
        idle_http.settimeout(10)
        idle_http.connect(http_path(agent))
        idle_http.sendall(b"GET /outside HTTP/1.1\r\nHost: h\r\n\r\n")
        assert idle_http.recv(4096).startswith(b"HTTP/1.1 404 ")
        idle_json.settimeout(10)
        idle_json.connect(agent.socket_path)
        idle_json.sendall(b'{"op": "hello"}\n')
        assert idle_json.recv(4096).startswith(b"{")
        # Both kinds are refused on accept, before any request is read: read, do not write.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as extra:
            extra.settimeout(10)
            extra.connect(agent.socket_path)
            assert json.loads(extra.recv(4096))["error"]["code"] == "busy"
        answer = exchange(http_path(agent), b"")
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert b"X-Keyagent-Error: busy" in answer
    finally:
        idle_http.close()
        idle_json.close()


def test_http_connections_leave_the_agent_socket_room_to_lock_and_stop(
    agent_factory: AgentFactory,
) -> None:
    """A tool that holds HTTP connections open up to the cap leaves the last places (a
    quarter of the cap, at most 16) to the agent socket: lock and stop still get in."""
    agent = agent_factory("--max-connections", "8", name="crowded")
    with contextlib.ExitStack() as closing:
        for _ in range(6):  # each answered, so surely admitted and held
            held = closing.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            held.settimeout(10)
            held.connect(http_path(agent))
            held.sendall(b"GET /outside HTTP/1.1\r\nHost: h\r\n\r\n")
            assert held.recv(4096).startswith(b"HTTP/1.1 404 ")
        assert b"X-Keyagent-Error: busy" in exchange(http_path(agent), b"")  # the 7th
        first, last = closing.enter_context(agent.client()), closing.enter_context(agent.client())
        first.status()
        last.status()  # the 8th place: the last one
        with agent.client() as client, pytest.raises(errors.Busy):
            client.status()
        assert "busy (8 connections open, 6 of them HTTP)" in agent.log()
        last.lock("crowded passphrase")
        last.stop()
    assert agent.process is not None
    assert agent.process.wait(10) == 0


@needs_curl
def test_proxied_calls_are_in_the_audit_log(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """Each proxied request is recorded with method, path (no query), status, key and peer;
    a refused one with its code; never the key or a query value."""
    secret = add_key(conduce_agent, emulator)
    curl(conduce_agent, f"http://{emulator.host}/conduce/api/v1/echo/x?token=query-S3CR3T")
    curl(conduce_agent, f"http://{emulator.host}/conduce/api/v1/apikeys/list")
    with conduce_agent.client() as client:
        entries = [entry for entry in client.log() if entry["op"] == "proxy"]
    forwarded, refused = entries
    assert forwarded["method"] == "GET"
    assert forwarded["path"] == "/conduce/api/v1/echo/x"
    assert forwarded["status"] == 200
    assert forwarded["outcome"] == "ok"
    assert forwarded["key_id"] == key_id_for(secret)
    assert (forwarded["host"], forwarded["user"]) == (emulator.host, USER)
    assert forwarded["exe"] == os.path.realpath(CURL or "")
    assert refused["outcome"] == "forbidden"
    assert refused["status"] is None
    shown = json.dumps(entries)
    assert "query-S3CR3T" not in shown
    assert secret not in shown
    assert secret not in conduce_agent.log()


ENDLESS = f"/api/v2/data/blob/{1 << 40}"


def start_endless_download(agent: AgentProcess, emu: Emulator) -> socket.socket:
    """A tool's connection whose download has started and would never end."""
    tool = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tool.settimeout(10)
    tool.connect(http_path(agent))
    tool.sendall(f"GET {ENDLESS}?part=1 HTTP/1.1\r\nHost: {emu.host}\r\n\r\n".encode())
    assert tool.recv(65536).startswith(b"HTTP/1.1 200 ")
    return tool


def test_a_tool_that_leaves_mid_answer_is_in_the_audit_log(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """The key was used though the tool hung up before the answer ended: recorded as
    ``cut``, with the status the service gave."""
    secret = add_key(conduce_agent, emulator)
    with conduce_agent.client() as client:
        start_endless_download(conduce_agent, emulator).close()  # the worker's next write fails
        # All entries, then new ones: the entry may be recorded before following starts.
        follow = client.follow_log()
        entry = next(entry for entry in follow if entry["op"] == "proxy")
        follow.close()
    assert (entry["outcome"], entry["status"], entry["path"]) == ("cut", 200, ENDLESS)
    assert entry["key_id"] == key_id_for(secret)
    assert entry["method"] == "GET"


def test_a_request_whose_worker_is_killed_is_in_the_audit_log(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """A worker killed mid-request (kill -9 by a process of the user, the OOM killer) never
    sends that request's entry: the agent records it from the worker's flight board, as
    ``cut``, so killing the worker does not erase the use of the key."""
    secret = add_key(conduce_agent, emulator)
    with start_endless_download(conduce_agent, emulator):
        (worker,) = workers_of(conduce_agent.pid)
        os.kill(worker, signal.SIGKILL)
        # The agent records what the board holds before it logs the worker's end.
        wait_until(
            lambda: said(conduce_agent, f"HTTP worker {worker} exited"), "the worker's end logged"
        )
    with conduce_agent.client() as client:
        (entry,) = [entry for entry in client.log() if entry["op"] == "proxy"]
    assert (entry["outcome"], entry["method"], entry["path"]) == ("cut", "GET", ENDLESS)
    assert (entry["key_id"], entry["pid"]) == (key_id_for(secret), os.getpid())
    assert entry["status"] == 200  # the service had answered: the board said so too


def test_a_request_under_way_at_stop_is_in_the_audit_log(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """Stopping the agent ends its workers and the requests they carry; each is recorded
    first, as ``cut``, in the agent's log (the ring goes with the agent)."""
    secret = add_key(conduce_agent, emulator)
    tool = start_endless_download(conduce_agent, emulator)
    with tool:
        assert conduce_agent.stop() == 0
    lines = [line for line in conduce_agent.log().splitlines() if "op=proxy" in line]
    assert len(lines) == 1, lines
    fields = dict(field.split("=", 1) for field in lines[0].split(" audit ", 1)[-1].split())
    assert (fields["outcome"], fields["status"], fields["path"]) == ("cut", "200", ENDLESS)
    assert fields["key_id"] == key_id_for(secret)
    assert "part=1" not in lines[0]


def test_a_connection_reuses_its_credentials_only_while_nothing_changed(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """On one keep-alive connection, a lock or a forgotten key takes effect at the very next
    request: what the connection was lent before is not used again."""
    add_key(conduce_agent, emulator)
    request = f"GET {VALIDATE} HTTP/1.1\r\nHost: {emulator.host}\r\n\r\n".encode()

    def answer(sock: socket.socket) -> bytes:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head, re.IGNORECASE)[1])  # type: ignore[index]
        while len(body) < length:
            body += sock.recv(65536)
        return head

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(http_path(conduce_agent))
        assert answer(sock).startswith(b"HTTP/1.1 200 ")
        assert answer(sock).startswith(b"HTTP/1.1 200 ")
        with conduce_agent.client() as client:
            client.lock("a passphrase")
        assert answer(sock).startswith(b"HTTP/1.1 423 ")
        with conduce_agent.client() as client:
            client.unlock("a passphrase")
        assert answer(sock).startswith(b"HTTP/1.1 200 ")
        with conduce_agent.client() as client:
            client.forget(all=True)
        assert answer(sock).startswith(b"HTTP/1.1 401 ")


def test_review_spellings_and_audit_hygiene(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """A fragment cannot smuggle user/login past the check (urllib3 would drop it); a huge
    path is cut in the audit entry; an absolute-form target's password never reaches the
    audit log; odd framing or non-ASCII targets are 400 bad_request; none of it reaches
    the service."""
    login(conduce_agent, emulator)
    emulator.clear_requests()
    body = f'{{"email": "{USER}", "password": "wrong"}}'
    for target in ("/conduce/api/v1/user/login#", "/conduce/api/v1/user/logout#x"):
        answer = exchange(
            http_path(conduce_agent),
            f"POST {target} HTTP/1.1\r\nHost: {emulator.host}\r\nContent-Length: {len(body)}"
            f"\r\nConnection: close\r\n\r\n{body}".encode(),
        )
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    for raw in (
        f"GET http://a:hunter2@{emulator.host}/x HTTP/1.1\r\nHost: {emulator.host}\r\n"
        "Connection: close\r\n\r\n",
        f"GET /api/v2/{'p' * 10000} HTTP/1.1\r\nHost: {emulator.host}\r\n"
        "X-Keyagent-User: nobody@example.com\r\nConnection: close\r\n\r\n",
    ):
        answer = exchange(http_path(conduce_agent), raw.encode())
        assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 401 ")), answer[:200]
    odd = exchange(
        http_path(conduce_agent),
        f"POST /api/v2/data/x HTTP/1.1\r\nHost: {emulator.host}\r\n"
        "Transfer-Encoding: gzip, chunked\r\n\r\n".encode(),
    )
    assert odd.startswith(b"HTTP/1.1 501 ")  # a transfer coding it does not know (RFC 9112)
    assert b"X-Keyagent-Error: bad_request" in odd
    wide = exchange(
        http_path(conduce_agent),
        f"GET /api/v2/d\xe9j\xe0 HTTP/1.1\r\nHost: {emulator.host}\r\n\r\n".encode("latin-1"),
    )
    assert wide.startswith(b"HTTP/1.1 400 ")
    assert emulator.requests == []
    with conduce_agent.client() as client:
        entries = client.log()
        (state,) = client.status()["sessions"]
    shown = json.dumps(entries)
    assert "hunter2" not in shown
    assert max(len(entry.get("path") or "") for entry in entries) < 600
    assert state["logged_in"]
    assert not state["expired"]


def test_a_401_from_an_endpoint_does_not_end_a_live_session(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """An endpoint answering 401 while the session is alive: the agent validates the session,
    keeps it, and the tool gets the service's own 401."""
    login(conduce_agent, emulator)
    emulator.clear_requests()
    emulator.inject(Fault.status(401), path="/api/v2/data/refusing", count=1)
    answer = exchange(
        http_path(conduce_agent),
        f"GET /api/v2/data/refusing HTTP/1.1\r\nHost: {emulator.host}\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert b"X-Keyagent-Error" not in answer
    with conduce_agent.client() as client:
        (state,) = client.status()["sessions"]
    assert state["logged_in"]
    assert not state["expired"]
    paths = [record.path for record in emulator.requests]
    assert paths == ["/api/v2/data/refusing", "user/validate-session"]
