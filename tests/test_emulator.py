"""End-to-end tests: keyagent.conduce against the loopback HTTPS Conduce emulator, real TLS."""

from __future__ import annotations

import http.client
import json
import logging
import os
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import pytest

from keyagent.conduce import API_PREFIX, ConduceAccount, HttpSettings
from keyagent.errors import (
    BadCredentials,
    Forbidden,
    LoginRequired,
    NotFound,
    RemoteError,
    RemoteUnreachable,
    SessionExpired,
    TLSError,
)
from keyagent.testing.emulator import SESSION_COOKIE, ConduceEmulator, Fault

USER = "alice@example.com"
PASSWORD = "emulated password 9d1c"
OTHER_USER = "bob@example.com"
OTHER_PASSWORD = "bob's password 55e0"
ROOT = Path(__file__).resolve().parents[1]
LIFETIME = 600.0


class FakeClock:
    """A monotonic clock the test moves by hand, so sessions expire without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Recorder:
    def __init__(self) -> None:
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


AccountFactory = Callable[..., ConduceAccount]


@pytest.fixture(autouse=True)
def hermetic_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the caller's proxies and netrc out of loopback traffic."""
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def emulator(clock: FakeClock) -> Iterator[ConduceEmulator]:
    with ConduceEmulator(session_lifetime=LIFETIME, clock=clock) as emu:
        emu.add_user(USER, PASSWORD)
        emu.add_user(OTHER_USER, OTHER_PASSWORD)
        yield emu


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def make_account(emulator: ConduceEmulator, recorder: Recorder) -> Iterator[AccountFactory]:
    """Builds accounts trusting the emulator's CA, closed at the end of the test."""
    made: list[ConduceAccount] = []

    def make(user: str = USER, host: str | None = None, **settings: Any) -> ConduceAccount:
        options: dict[str, Any] = {
            "verify": emulator.ca_path,
            "connect_timeout": 5.0,
            "read_timeout": 10.0,
            "backoff": 0.05,
        }
        options.update(settings)
        account = ConduceAccount(
            host or emulator.host,
            user,
            HttpSettings(**options),
            sleep=recorder.sleep,
        )
        made.append(account)
        return account

    yield make
    for account in made:
        account.close()


@pytest.fixture
def account(make_account: AccountFactory) -> ConduceAccount:
    """An account of USER, logged in."""
    conduce = make_account()
    conduce.login(PASSWORD)
    return conduce


# --- the API, end to end ------------------------------------------------------------------------


def test_key_lifecycle(account: ConduceAccount, emulator: ConduceEmulator) -> None:
    """A logged-in account creates, lists and deletes keys, and a deleted key stops working."""
    first = account.create_key("laptop")
    second = account.create_key("ci")
    listed = account.list_keys()
    assert [(k.key, k.description) for k in listed] == [(first, "laptop"), (second, "ci")]
    assert all(k.created and "T" in k.created for k in listed)
    assert dict(listed[0].extra) == {"expires": None}
    assert [k.key for k in account.list_keys(api_key=first)] == [first, second]
    account.delete_key(first, api_key=second)
    assert emulator.api_keys(USER) == [second]
    with pytest.raises(BadCredentials, match="rejected the API key"):
        account.list_keys(api_key=first)
    with pytest.raises(NotFound):
        account.delete_key(first)


def test_bad_password_is_bad_credentials(make_account: AccountFactory) -> None:
    """A wrong password is BadCredentials and gives no session."""
    conduce = make_account()
    with pytest.raises(BadCredentials):
        conduce.login("not the password")
    assert not conduce.has_session


def test_unknown_user_is_bad_credentials(make_account: AccountFactory) -> None:
    """An unknown user cannot be told apart from a wrong password."""
    with pytest.raises(BadCredentials):
        make_account("nobody@example.com").login(PASSWORD)


def test_session_cookie_attributes(emulator: ConduceEmulator) -> None:
    """The emulator's login cookie is Secure, HttpOnly and scoped to Path=/."""
    context = ssl.create_default_context(cafile=emulator.ca_path)
    connection = http.client.HTTPSConnection(emulator.host, context=context, timeout=5)
    try:
        body = json.dumps({"email": USER, "password": PASSWORD, "keep": False})
        connection.request("POST", API_PREFIX + "user/login", body=body)
        response = connection.getresponse()
        response.read()
        cookie = response.getheader("Set-Cookie") or ""
    finally:
        connection.close()
    assert response.status == 200
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    assert {"Secure", "HttpOnly", "Path=/"} <= {part.strip() for part in cookie.split(";")}


def test_session_expires_with_the_clock(
    account: ConduceAccount, emulator: ConduceEmulator, clock: FakeClock
) -> None:
    """A session outliving its lifetime answers 401: validate() is False, calls SessionExpired."""
    assert account.validate() is True
    clock.advance(LIFETIME + 1)
    assert account.validate() is False
    assert not account.has_session
    with pytest.raises(LoginRequired):
        account.list_keys()
    account.login(PASSWORD)
    clock.advance(LIFETIME)
    with pytest.raises(SessionExpired):
        account.list_keys()
    assert not account.has_session


def test_expire_sessions_ends_only_the_named_account(
    make_account: AccountFactory, emulator: ConduceEmulator
) -> None:
    """expire_sessions(email) ends that account's sessions and leaves the others alive."""
    alice = make_account()
    alice.login(PASSWORD)
    bob = make_account(OTHER_USER)
    bob.login(OTHER_PASSWORD)
    assert emulator.expire_sessions(USER) == 1
    assert alice.validate() is False
    assert bob.validate() is True


def test_api_key_calls_send_no_cookie(account: ConduceAccount, emulator: ConduceEmulator) -> None:
    """With an API key the request authenticates by Bearer and carries no session cookie."""
    key = account.create_key("k")
    emulator.clear_requests()
    account.list_keys(api_key=key)
    account.list_keys()
    first, second = emulator.requests
    assert (first.auth, first.sent_cookie, first.user) == ("bearer", False, USER)
    assert (second.auth, second.sent_cookie, second.user) == ("cookie", True, USER)


def test_forbidden_user_gets_forbidden(account: ConduceAccount, emulator: ConduceEmulator) -> None:
    """emulator.forbid(email) makes key calls 403 (Forbidden) while the session stays valid."""
    emulator.forbid(USER)
    with pytest.raises(Forbidden):
        account.list_keys()
    with pytest.raises(Forbidden):
        account.create_key("x")
    assert account.validate() is True
    emulator.unforbid(USER)
    assert account.list_keys() == []


def test_forbidden_api_key_gets_forbidden(
    account: ConduceAccount, emulator: ConduceEmulator
) -> None:
    """emulator.forbid(api_key=...) restricts that key only; the session still works."""
    key = account.create_key("restricted")
    emulator.forbid(api_key=key)
    with pytest.raises(Forbidden):
        account.list_keys(api_key=key)
    assert [k.key for k in account.list_keys()] == [key]


def test_deleting_another_users_key_is_not_found(
    account: ConduceAccount, emulator: ConduceEmulator
) -> None:
    """A user cannot delete, or even learn of, another user's key."""
    bobs = emulator.add_key(OTHER_USER, "bob's")
    with pytest.raises(NotFound):
        account.delete_key(bobs)
    assert emulator.api_keys(OTHER_USER) == [bobs]


def test_concurrent_accounts(make_account: AccountFactory, emulator: ConduceEmulator) -> None:
    """Many accounts creating keys at once each get their own distinct keys."""
    accounts = [make_account() for _ in range(8)]
    for conduce in accounts:
        conduce.login(PASSWORD)
    with ThreadPoolExecutor(max_workers=8) as pool:
        created = list(pool.map(lambda a: [a.create_key("c") for _ in range(5)], accounts))
    flat = [key for keys in created for key in keys]
    assert len(set(flat)) == 40
    assert sorted(emulator.api_keys(USER)) == sorted(flat)


def test_request_log_holds_no_secrets(account: ConduceAccount, emulator: ConduceEmulator) -> None:
    """The emulator's request log never holds passwords, cookies or keys."""
    key = account.create_key("k")
    account.list_keys(api_key=key)
    log_text = repr(emulator.requests)
    assert PASSWORD not in log_text
    assert key not in log_text
    assert [r.path for r in emulator.requests] == ["user/login", "apikeys/create", "apikeys/list"]
    assert emulator.requests[0].auth == "password"


# --- faults -------------------------------------------------------------------------------------


def test_delay_beyond_the_read_timeout_is_unreachable(
    make_account: AccountFactory, emulator: ConduceEmulator, recorder: Recorder
) -> None:
    """A delayed answer beyond the read timeout is RemoteUnreachable, and is not retried."""
    conduce = make_account(read_timeout=0.3)
    conduce.login(PASSWORD)
    emulator.inject(Fault.delay(60), path="apikeys/list")
    with pytest.raises(RemoteUnreachable, match=r"did not answer within 0\.3s"):
        conduce.list_keys()
    assert recorder.sleeps == []
    assert emulator.requests[-1].fault == "delay"


def test_short_delay_then_normal_answer(account: ConduceAccount, emulator: ConduceEmulator) -> None:
    """A delay within the read timeout only slows the answer down."""
    emulator.inject(Fault.delay(0.05), count=1)
    assert account.list_keys() == []


def test_hang_until_released(account: ConduceAccount, emulator: ConduceEmulator) -> None:
    """A hung request waits for release(), then gets its normal answer."""
    key = account.create_key("k")
    emulator.inject(Fault.hang(), path="apikeys/list", count=1)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(account.list_keys)
        assert emulator.wait_for_hung(1, timeout=10)
        assert not pending.done()
        assert emulator.release() == 1
        assert [k.key for k in pending.result(timeout=10)] == [key]


def test_close_is_prompt_with_a_hung_request(
    make_account: AccountFactory, recorder: Recorder
) -> None:
    """close() releases hung handlers and drops connections at once (none of its threads is
    left for its join deadline to give up on); the client sees a failure."""
    before = set(threading.enumerate())
    emu = ConduceEmulator().start()
    try:
        emu.add_user(USER, PASSWORD)
        # No retries: the retry of a cut-short list_keys would meet a closed port and
        # a removed CA file, and this test is about the cut itself.
        conduce = make_account(host=emu.host, verify=emu.ca_path, retries=0)
        conduce.login(PASSWORD)
        idle = make_account(host=emu.host, verify=emu.ca_path)
        idle.login(PASSWORD)  # leaves an idle keep-alive connection behind
        emu.inject(Fault.hang())
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(conduce.list_keys)
            assert emu.wait_for_hung(1, timeout=10)
            emu.close()
            left = [  # the pool's thread and its call's deadline are the caller's, which
                # the failure then ends
                thread.name for thread in set(threading.enumerate()) - before
                if not thread.name.startswith(("ThreadPoolExecutor", "keyagent-call-deadline"))
            ]  # fmt: skip
            with pytest.raises(RemoteUnreachable):
                pending.result(timeout=10)
    finally:
        emu.close()
    assert left == []
    assert not Path(emu.ca_path).exists()


@pytest.mark.parametrize("status", [500, 502, 503])
def test_error_statuses_on_create(
    account: ConduceAccount, emulator: ConduceEmulator, status: int, recorder: Recorder
) -> None:
    """5xx on create is a RemoteError with the status, sent once: create is never retried."""
    emulator.inject(Fault.status(status), path="apikeys/create")
    with pytest.raises(RemoteError, match=str(status)):
        account.create_key("x")
    assert [r.path for r in emulator.requests].count("apikeys/create") == 1
    assert recorder.sleeps == []
    assert emulator.api_keys(USER) == []


def test_one_503_on_list_is_retried(
    account: ConduceAccount, emulator: ConduceEmulator, recorder: Recorder
) -> None:
    """A single 503 on list is absorbed by one jittered retry."""
    emulator.inject(Fault.status(503), path="apikeys/list", count=1)
    assert account.list_keys() == []
    assert [r.status for r in emulator.requests[1:]] == [503, 200]
    assert len(recorder.sleeps) == 1


def test_persistent_502_on_list_gives_up(
    account: ConduceAccount, emulator: ConduceEmulator, recorder: Recorder
) -> None:
    """A 502 that persists is reported after retries + 1 attempts."""
    emulator.inject(Fault.status(502), path="apikeys/list")
    with pytest.raises(RemoteError, match="502 Bad Gateway"):
        account.list_keys()
    assert [r.path for r in emulator.requests].count("apikeys/list") == 3
    assert len(recorder.sleeps) == 2


def test_error_body_is_never_reported(account: ConduceAccount, emulator: ConduceEmulator) -> None:
    """A body echoing a secret stays out of the error message."""
    emulator.inject(Fault.status(500, body=f'{{"echo": "{PASSWORD}"}}'), count=1)
    with pytest.raises(RemoteError) as caught:
        account.create_key("x")
    assert PASSWORD not in str(caught.value)


def test_unexpected_shape_on_create(account: ConduceAccount, emulator: ConduceEmulator) -> None:
    """A 200 whose JSON has no key is an unexpected answer."""
    emulator.inject(Fault.status(200, body='{"status": "ok"}'), path="apikeys/create")
    with pytest.raises(RemoteError, match="unexpected answer"):
        account.create_key("x")


def test_reset_on_create_is_unreachable_and_not_retried(
    account: ConduceAccount, emulator: ConduceEmulator, recorder: Recorder
) -> None:
    """A connection reset on create is RemoteUnreachable after exactly one attempt."""
    emulator.inject(Fault.reset(), path="apikeys/create")
    with pytest.raises(RemoteUnreachable):
        account.create_key("x")
    record = emulator.requests[-1]
    assert (record.path, record.fault, record.status) == ("apikeys/create", "reset", None)
    assert [r.path for r in emulator.requests].count("apikeys/create") == 1
    assert recorder.sleeps == []


def test_reset_on_list_is_retried(
    account: ConduceAccount, emulator: ConduceEmulator, recorder: Recorder
) -> None:
    """A single connection reset on list is absorbed by a retry on a new connection."""
    emulator.inject(Fault.reset(), path="apikeys/list", count=1)
    assert account.list_keys() == []
    assert len(recorder.sleeps) == 1


def test_malformed_json(account: ConduceAccount, emulator: ConduceEmulator) -> None:
    """A 200 with a body that is not JSON is RemoteError('unexpected answer')."""
    emulator.inject(Fault.malformed_json(), path="apikeys/list", count=1)
    with pytest.raises(RemoteError, match="unexpected answer"):
        account.list_keys()
    assert account.list_keys() == []


@pytest.mark.parametrize("certificate", ["untrusted", "wrong_host"])
def test_wrong_certificate_is_tls_error(
    account: ConduceAccount,
    emulator: ConduceEmulator,
    recorder: Recorder,
    certificate: Literal["untrusted", "wrong_host"],
) -> None:
    """A certificate from another CA, or for another host, fails verification: TLSError."""
    emulator.inject(Fault.wrong_certificate(certificate))
    with pytest.raises(TLSError, match="certificate"):
        account.list_keys()
    assert recorder.sleeps == []  # a TLS failure is not retried
    emulator.clear_faults()
    assert account.list_keys() == []


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_insecure_accepts_a_wrong_certificate_and_warns(
    make_account: AccountFactory, emulator: ConduceEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    """--insecure connects despite a bad certificate, logging a warning per request."""
    caplog.set_level(logging.WARNING, logger="keyagent.conduce")
    emulator.inject(Fault.wrong_certificate())
    conduce = make_account(insecure=True)
    conduce.login(PASSWORD)
    assert conduce.list_keys() == []
    warnings = [r for r in caplog.records if "TLS verification is off" in r.getMessage()]
    assert len(warnings) == 2


def test_explicit_ca_bundle_beats_requests_ca_bundle_over_tls(
    make_account: AccountFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An inherited REQUESTS_CA_BUNDLE that lacks the CA does not defeat the explicit bundle."""
    unrelated = tmp_path / "unrelated.pem"
    unrelated.write_bytes(b"")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(unrelated))
    make_account().login(PASSWORD)


def test_default_trust_store_rejects_the_emulator(
    make_account: AccountFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the emulator's CA, verification fails: TLS is really checked."""
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    with pytest.raises(TLSError):
        make_account(verify=True).login(PASSWORD)


def test_missing_ca_bundle_is_tls_error(make_account: AccountFactory, tmp_path: Path) -> None:
    """A CA bundle path that does not exist is a TLSError naming --ca-bundle, at once."""
    with pytest.raises(TLSError, match="--ca-bundle") as caught:
        make_account(verify=str(tmp_path / "missing.pem"))
    assert caught.value.__context__ is None


def test_connection_refused_is_unreachable(
    make_account: AccountFactory, recorder: Recorder
) -> None:
    """A port nobody listens on is RemoteUnreachable, after the retries of a safe call."""
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    conduce = make_account(host=f"127.0.0.1:{port}")
    with pytest.raises(RemoteUnreachable):
        conduce.list_keys(api_key="0" * 32)
    assert len(recorder.sleeps) == 2
    with pytest.raises(RemoteUnreachable):
        conduce.login(PASSWORD)


def test_unknown_path_and_wrong_method(emulator: ConduceEmulator) -> None:
    """The emulator answers 404 to unknown paths and 405 to a wrong method."""
    context = ssl.create_default_context(cafile=emulator.ca_path)
    statuses = []
    for method, path in [("GET", API_PREFIX + "nope"), ("GET", API_PREFIX + "apikeys/create")]:
        connection = http.client.HTTPSConnection(emulator.host, context=context, timeout=5)
        try:
            connection.request(method, path)
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
        finally:
            connection.close()
    assert statuses == [404, 405]


def test_inject_validates_its_arguments(emulator: ConduceEmulator) -> None:
    """Fault rules refuse a zero count, absolute paths elsewhere, and per-path certificates."""
    with pytest.raises(ValueError, match="count"):
        emulator.inject(Fault.reset(), count=0)
    with pytest.raises(ValueError, match="fault paths"):
        emulator.inject(Fault.reset(), path="/elsewhere")
    with pytest.raises(ValueError, match="before any path"):
        emulator.inject(Fault.wrong_certificate(), path="apikeys/list")
    with pytest.raises(ValueError, match="status"):
        Fault.status(99)


# --- packaging and the command line -------------------------------------------------------------


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_importing_testing_pulls_in_no_third_party_module() -> None:
    """Importing keyagent.testing (and its emulator) loads neither requests nor trustme."""
    code = (
        "import sys, keyagent.testing, keyagent.testing.emulator; "
        "bad = {'requests', 'trustme', 'urllib3'} & set(sys.modules); "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], env=subprocess_env(), check=True, timeout=60)


def read_settings(process: subprocess.Popen[bytes], deadline: float) -> dict[str, str]:
    """Read KEY=value lines from the process until the three settings are in, or fail."""
    assert process.stdout is not None
    settings: dict[str, str] = {}
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while not {"CONDUCE_HOST", "CONDUCE_CA_BUNDLE", "CONDUCE_USER"} <= settings.keys():
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no settings in time; got {settings}"
            if not selector.select(remaining):
                continue
            chunk = os.read(process.stdout.fileno(), 4096)
            assert chunk, f"the server exited early with {process.poll()}; got {settings}"
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                name, _, value = line.decode().partition("=")
                settings[name] = value
    return settings


@pytest.mark.parametrize(
    ("user", "password", "stop_signal"),
    [
        ("carol@example.com", "from stdin 1b2c", signal.SIGTERM),
        ("demo@example.com", None, signal.SIGINT),
    ],
)
def test_serve_command(
    user: str, password: str | None, stop_signal: signal.Signals, recorder: Recorder
) -> None:
    """`python -m keyagent.testing serve` prints its settings, serves TLS, stops on a signal."""
    command = [sys.executable, "-m", "keyagent.testing", "serve"]
    if password is None:
        password = "demo-password"
    else:
        command += ["--user", user, "--password-stdin"]
    process = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=subprocess_env(),
    )
    assert process.stdin is not None
    assert process.stdout is not None
    assert process.stderr is not None
    try:
        if "--password-stdin" in command:
            process.stdin.write(password.encode() + b"\n")
        process.stdin.close()
        settings = read_settings(process, time.monotonic() + 30)
        assert settings["CONDUCE_USER"] == user
        assert Path(settings["CONDUCE_CA_BUNDLE"]).is_file()
        http_settings = HttpSettings(verify=settings["CONDUCE_CA_BUNDLE"])
        with ConduceAccount(
            settings["CONDUCE_HOST"], user, http_settings, sleep=recorder.sleep
        ) as conduce:
            conduce.login(password)
            assert conduce.validate() is True
        process.send_signal(stop_signal)
        process.wait(timeout=30)
        output = process.stdout.read() + process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        process.stdout.close()
        process.stderr.close()
    assert process.returncode == 0, output
    assert password.encode() not in output
    assert not Path(settings["CONDUCE_CA_BUNDLE"]).exists()


def test_serve_command_refuses_an_empty_password() -> None:
    """--password-stdin with nothing on stdin exits 2 instead of serving without a password."""
    result = subprocess.run(
        [sys.executable, "-m", "keyagent.testing", "serve", "--password-stdin"],
        input=b"",
        capture_output=True,
        env=subprocess_env(),
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert b"empty password" in result.stderr
