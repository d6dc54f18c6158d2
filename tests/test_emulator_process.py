"""The emulator as a process: its control channel, and faults that reach real TLS clients."""

from __future__ import annotations

import http.client
import inspect
import json
import os
import signal
import socket
import ssl
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Literal

import pytest

from keyagent.conduce import ConduceAccount, HttpSettings
from keyagent.errors import Forbidden, RemoteError, RemoteUnreachable, TLSError
from keyagent.testing.agent import wait_for_exit
from keyagent.testing.emulator import (
    API_PREFIX,
    CONTROL_PREFIX,
    SESSION_COOKIE,
    ConduceEmulator,
    Fault,
    RequestRecord,
)
from keyagent.testing.emulator_process import (
    Emulator,
    EmulatorControlError,
    EmulatorProcess,
    EmulatorStartError,
)

USER = "carol@example.com"
PASSWORD = "process password 4e1f"
OTHER_USER = "dave@example.com"
OTHER_PASSWORD = "dave's password 90ab"

StartEmulator = Callable[..., EmulatorProcess]
Connect = Callable[..., ConduceAccount]


def _conforms(local: ConduceEmulator, remote: EmulatorProcess) -> tuple[Emulator, Emulator]:
    # Never called: mypy checks here that both classes implement the shared protocol.
    return local, remote


@pytest.fixture(autouse=True)
def hermetic_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the caller's proxies and netrc out of loopback traffic."""
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


@pytest.fixture
def start_emulator() -> Iterator[StartEmulator]:
    """Start emulator processes; every one is stopped at the end of the test."""
    started: list[EmulatorProcess] = []

    def start(user: str = USER, password: str = PASSWORD, **options: object) -> EmulatorProcess:
        process = EmulatorProcess(user, password, **options)  # type: ignore[arg-type]
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.close()


@pytest.fixture
def emulator(start_emulator: StartEmulator) -> EmulatorProcess:
    """An emulator process with one account."""
    return start_emulator()


@pytest.fixture
def connect(emulator: EmulatorProcess) -> Iterator[Connect]:
    """Open ConduceAccounts on the emulator, trusting its CA; all are closed at the end."""
    opened: list[ConduceAccount] = []

    def open_account(user: str = USER, read_timeout: float = 10.0) -> ConduceAccount:
        # retries=0: every request the test causes is exactly one request the emulator sees.
        settings = HttpSettings(verify=emulator.ca_path, read_timeout=read_timeout, retries=0)
        account = ConduceAccount(emulator.host, user, settings)
        opened.append(account)
        return account

    yield open_account
    for account in opened:
        account.close()


def control_status(
    path: str, authorization: str | None, method: str = "POST", call: str = "session_count"
) -> int:
    """Send one hand-made control request and return the status of the answer."""
    headers = {"Content-Type": "application/json", "Content-Length": "2"}
    if authorization is not None:
        headers["Authorization"] = authorization
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    request = f"{method} {CONTROL_PREFIX}{call} HTTP/1.1\r\nHost: localhost\r\n{head}\r\n{{}}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(request.encode())
        answer = b""
        while chunk := sock.recv(65536):  # HTTP/1.0 answers: the server closes when done
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def test_same_api_as_the_in_process_emulator() -> None:
    """EmulatorProcess has every shared method and property with ConduceEmulator's signature."""
    names = [name for name in vars(Emulator) if not name.startswith("_")]
    assert len(names) == 20
    for name in names:
        local, remote = getattr(ConduceEmulator, name), getattr(EmulatorProcess, name)
        if isinstance(local, property):
            assert isinstance(remote, property), name
        else:
            assert inspect.signature(local) == inspect.signature(remote), name


def test_start_reports_settings_and_serves_tls(emulator: EmulatorProcess) -> None:
    """A started process serves HTTPS on host/port with ca_path, and private control files."""
    os.kill(emulator.pid, 0)  # alive
    assert emulator.host == f"127.0.0.1:{emulator.port}"
    assert emulator.url == f"https://{emulator.host}"
    assert Path(emulator.ca_path).is_file()
    directory = Path(emulator.control_path).parent
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_ISSOCK(os.stat(emulator.control_path).st_mode)
    assert stat.S_IMODE(os.stat(emulator.control_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(emulator.control_token_path).st_mode) == 0o600

    context = ssl.create_default_context(cafile=emulator.ca_path)
    connection = http.client.HTTPSConnection(emulator.host, context=context, timeout=10)
    try:
        body = json.dumps({"email": USER, "password": PASSWORD})
        connection.request("POST", API_PREFIX + "user/login", body=body)
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    assert response.status == 200
    jar: SimpleCookie = SimpleCookie(response.getheader("Set-Cookie"))
    assert emulator.session_tokens(USER) == [jar[SESSION_COOKIE].value]
    assert emulator.session_tokens(OTHER_USER) == []
    assert emulator.session_count() == 1


def test_control_calls_need_the_token(emulator: EmulatorProcess) -> None:
    """Without the right bearer token the control API answers 401, and nothing else leaks."""
    token = Path(emulator.control_token_path).read_text().strip()
    path = emulator.control_path
    assert control_status(path, None) == 401
    assert control_status(path, "Bearer wrong-token") == 401
    assert control_status(path, f"Basic {token}") == 401
    assert control_status(path, "Bearer wrong-token", call="no_such_call") == 401
    assert control_status(path, f"Bearer {token}", call="no_such_call") == 404
    assert control_status(path, f"Bearer {token}", method="GET") == 405
    assert control_status(path, f"Bearer {token}") == 200
    assert token not in emulator.log()


def test_control_calls_are_neither_logged_nor_faulted(
    emulator: EmulatorProcess, connect: Connect
) -> None:
    """A fault on every path leaves control calls alone, and they never enter the request log."""
    emulator.inject(Fault.status(500))
    assert emulator.session_count() == 0
    assert emulator.api_keys(USER) == []
    assert emulator.requests == []
    with pytest.raises(RemoteError, match="500"):
        connect().login(PASSWORD)
    assert [(r.path, r.fault, r.status) for r in emulator.requests] == [
        ("user/login", "status", 500)
    ]


def test_accounts_keys_and_forbid_through_the_control_channel(
    emulator: EmulatorProcess, connect: Connect
) -> None:
    """add_user, add_key, api_keys, forbid, unforbid and expire_sessions act on the live service."""
    emulator.add_user(OTHER_USER, OTHER_PASSWORD)
    other = connect(OTHER_USER)
    other.login(OTHER_PASSWORD)
    key = emulator.add_key(OTHER_USER, "seeded")
    assert emulator.api_keys(OTHER_USER) == [key]
    assert emulator.api_keys(USER) == []
    assert [(k.key, k.description) for k in other.list_keys(api_key=key)] == [(key, "seeded")]

    emulator.forbid(OTHER_USER)
    with pytest.raises(Forbidden):
        other.list_keys()
    emulator.unforbid(OTHER_USER)
    assert len(other.list_keys()) == 1
    emulator.forbid(api_key=key)
    with pytest.raises(Forbidden):
        other.list_keys(api_key=key)
    assert len(other.list_keys()) == 1  # the session is not restricted, only that key
    emulator.unforbid(api_key=key)
    assert len(other.list_keys(api_key=key)) == 1

    connect().login(PASSWORD)
    assert emulator.session_count() == 2
    assert emulator.expire_sessions(OTHER_USER) == 1
    assert emulator.session_count(OTHER_USER) == 0
    assert emulator.session_count(USER) == 1
    assert other.validate() is False
    assert emulator.expire_sessions() == 1


def test_bad_arguments_raise_what_the_in_process_emulator_raises(
    emulator: EmulatorProcess,
) -> None:
    """Argument errors come back as the KeyError or ValueError the method itself raises."""
    with pytest.raises(KeyError, match=r"nobody@example\.com"):
        emulator.add_key("nobody@example.com")
    with pytest.raises(ValueError, match="count"):
        emulator.inject(Fault.hang(), count=0)
    with pytest.raises(ValueError, match="exactly one"):
        emulator.forbid()
    with pytest.raises(ValueError, match="before any path"):
        emulator.inject(Fault.wrong_certificate(), path="apikeys/list")
    with pytest.raises(ValueError, match="fault paths"):
        emulator.inject(Fault.reset(), path="/elsewhere")
    assert emulator.session_count() == 0  # and the emulator goes on


def test_request_log_wait_and_clear(emulator: EmulatorProcess, connect: Connect) -> None:
    """requests returns RequestRecords; wait_for_requests and clear_requests work remotely."""
    assert emulator.wait_for_requests(1, timeout=0) is False
    account = connect()
    account.login(PASSWORD)
    assert emulator.wait_for_requests(1, timeout=10) is True
    assert account.list_keys() == []
    assert emulator.requests == [
        RequestRecord("POST", "user/login", "password", False, None, 200, USER),
        RequestRecord("GET", "apikeys/list", "cookie", True, None, 200, USER),
    ]
    emulator.clear_requests()
    assert emulator.requests == []
    assert emulator.wait_for_requests(1, timeout=0) is False


@pytest.mark.parametrize(
    ("fault", "error", "read_timeout"),
    [
        (Fault.status(503), RemoteError, 10.0),
        (Fault.status(200, body="[not json"), RemoteError, 10.0),
        (Fault.reset(), RemoteUnreachable, 10.0),
        (Fault.malformed_json(), RemoteError, 10.0),
        (Fault.delay(30), RemoteUnreachable, 0.3),
    ],
    ids=["503", "200-bad-body", "reset", "malformed", "delay"],
)
def test_injected_faults_reach_tls_clients(
    emulator: EmulatorProcess,
    connect: Connect,
    fault: Fault,
    error: type[Exception],
    read_timeout: float,
) -> None:
    """A fault injected through the control channel is what a real TLS client meets, once."""
    account = connect(read_timeout=read_timeout)
    account.login(PASSWORD)
    emulator.inject(fault, path="apikeys/list", count=1)
    with pytest.raises(error):
        account.list_keys()
    assert account.list_keys() == []  # count=1: the next request is served normally
    lists = [r for r in emulator.requests if r.path == "apikeys/list"]
    assert [r.fault for r in lists] == [fault.kind, None]
    assert lists[1].status == 200


@pytest.mark.parametrize("certificate", ["untrusted", "wrong_host"])
def test_wrong_certificate_breaks_tls_but_not_the_control_channel(
    emulator: EmulatorProcess,
    connect: Connect,
    certificate: Literal["untrusted", "wrong_host"],
) -> None:
    """While TLS clients meet a bad certificate, every control call still works."""
    emulator.inject(Fault.wrong_certificate(certificate))
    with pytest.raises(TLSError):
        connect().login(PASSWORD)
    with pytest.raises(TLSError):
        connect().login(PASSWORD)
    # The handshakes failed, so no request was ever read; the control channel answers.
    assert emulator.requests == []
    assert emulator.session_count() == 0
    assert emulator.add_key(USER, "during the outage") in emulator.api_keys(USER)
    emulator.clear_faults()
    account = connect()
    account.login(PASSWORD)
    assert len(account.list_keys()) == 1


def test_hang_is_seen_by_wait_for_hung_and_ended_by_release(
    emulator: EmulatorProcess, connect: Connect
) -> None:
    """A hung request is reported by wait_for_hung and answered normally after release."""
    account = connect()
    account.login(PASSWORD)
    emulator.inject(Fault.hang(), path="apikeys/list", count=1)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(account.list_keys)
        assert emulator.wait_for_hung(1, timeout=10) is True
        assert not pending.done()
        assert emulator.wait_for_hung(2, timeout=0) is False
        assert emulator.release() == 1
        assert pending.result(timeout=10) == []
    assert emulator.release() == 0
    (hung,) = [r for r in emulator.requests if r.path == "apikeys/list"]
    assert (hung.fault, hung.status) == ("hang", 200)


def test_close_stops_the_process_and_removes_its_files(start_emulator: StartEmulator) -> None:
    """close() ends the process with status 0, removes its directory, and is idempotent."""
    emulator = start_emulator()
    directory = Path(emulator.control_path).parent
    os.kill(emulator.pid, 0)  # alive
    assert emulator.close() == 0
    assert emulator.returncode == 0
    assert not directory.exists()
    assert emulator.close() == 0
    with pytest.raises(EmulatorControlError, match="exited with status 0"):
        emulator.session_count()


def test_a_dead_process_makes_control_calls_fail_clearly(start_emulator: StartEmulator) -> None:
    """When the emulator process is killed, a control call says so, and close() cleans up."""
    emulator = start_emulator()
    directory = Path(emulator.control_path).parent
    os.kill(emulator.pid, signal.SIGKILL)
    assert wait_for_exit(emulator.pid, 10)
    with pytest.raises(EmulatorControlError, match="control call release failed"):
        emulator.release()
    assert directory.exists()  # a killed emulator leaves it behind...
    assert emulator.close() == -signal.SIGKILL
    assert not directory.exists()  # ...and close() removes it


def test_start_failure_carries_the_stderr(start_emulator: StartEmulator) -> None:
    """A process that cannot start raises EmulatorStartError with its stderr in the message."""
    with pytest.raises(EmulatorStartError, match="empty password"):
        start_emulator(password="")


def test_session_lifetime_is_passed_on(start_emulator: StartEmulator) -> None:
    """session_lifetime reaches the process: with 0, a session is over as soon as it starts."""
    emulator = start_emulator(session_lifetime=0.0)
    settings = HttpSettings(verify=emulator.ca_path, retries=0)
    with ConduceAccount(emulator.host, USER, settings) as account:
        account.login(PASSWORD)
        assert emulator.session_count(USER) == 0
        assert account.validate() is False


@pytest.mark.parametrize(
    "fault",
    [
        Fault.delay(1.5),
        Fault.hang(),
        Fault.status(418),
        Fault.status(200, body='{"odd": true}'),
        Fault.reset(),
        Fault.malformed_json(),
        Fault.wrong_certificate("untrusted"),
        Fault.wrong_certificate("wrong_host"),
    ],
)
def test_faults_survive_the_json_round_trip(fault: Fault) -> None:
    """Every kind of fault comes back equal from to_json and from_json."""
    assert Fault.from_json(json.loads(json.dumps(fault.to_json()))) == fault


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"kind": "explode"}, "unknown fault kind"),
        ({"kind": "delay", "seconds": -1}, "negative"),
        ({"kind": "delay", "seconds": "5"}, "number of seconds"),
        ({"kind": "status", "code": 99}, "final status code"),
        ({"kind": "status", "code": True}, "integer code"),
        ({"kind": "status", "code": 500, "body": 7}, "string or null"),
        ({"kind": "wrong_certificate", "certificate": "expired"}, "untrusted"),
        ({"kind": "hang", "extra": 1}, "unknown fault field"),
    ],
)
def test_bad_fault_documents_are_refused(document: dict[str, object], message: str) -> None:
    """A fault object that describes no valid fault is a ValueError naming the problem."""
    with pytest.raises(ValueError, match=message):
        Fault.from_json(document)


def test_bad_fault_over_the_control_channel_is_a_value_error(emulator: EmulatorProcess) -> None:
    """The emulator process checks a fault it receives exactly as Fault's constructors do."""
    with pytest.raises(ValueError, match="negative"):
        emulator.inject(Fault("delay", seconds=-1.0))
    assert emulator.requests == []
