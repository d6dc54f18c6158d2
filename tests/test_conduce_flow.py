"""The Conduce life cycle end to end: real agent and emulator processes, and keyagent-ctl."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from pathlib import Path

import pytest

from keyagent import errors
from keyagent.client import Client
from keyagent.conduce import ConduceAccount, HttpSettings
from keyagent.store import key_id_for
from keyagent.testing.agent import AgentProcess
from keyagent.testing.emulator import Fault
from keyagent.testing.emulator_process import Emulator

from .conftest import AgentFactory, CtlResult, run_ctl, run_ctl_process

USER = "alice@example.com"
PASSWORD = "pa55-w0rd-that-must-never-leak"


def ctl(agent: AgentProcess, emu: Emulator, *argv: str, stdin: str = "") -> CtlResult:
    return run_ctl(agent.socket_path, "--host", emu.host, "--user", USER, *argv, stdin=stdin)


def login(agent: AgentProcess, emu: Emulator) -> None:
    result = ctl(agent, emu, "login", "--password-stdin", stdin=PASSWORD + "\n")
    assert result.code == 0, result.err


def held_secret(agent: AgentProcess) -> str:
    with agent.client() as client:
        return client.get()


def test_login_create_list_get_remove_list(conduce_agent: AgentProcess, emulator: Emulator) -> None:
    """The whole API-key life cycle works through the agent, and the service agrees at each step."""
    login(conduce_agent, emulator)
    created = ctl(conduce_agent, emulator, "create", "--description", "laptop")
    assert created.code == 0, created.err
    (on_service,) = emulator.api_keys(USER)
    assert key_id_for(on_service) in created.out
    assert on_service not in created.out  # not printed without --print

    listed = ctl(conduce_agent, emulator, "list", "--remote", "--json")
    remote = json.loads(listed.out)["remote"]
    assert [(k["held"], k["description"]) for k in remote] == [(True, "laptop [keyagent]")]
    assert on_service not in listed.out
    assert remote[0]["masked"] == f"{on_service[:4]}…{on_service[-4:]}"

    assert held_secret(conduce_agent) == on_service
    removed = ctl(conduce_agent, emulator, "remove", key_id_for(on_service))
    assert removed.code == 0, removed.err
    assert emulator.api_keys(USER) == []
    assert json.loads(ctl(conduce_agent, emulator, "list", "--json").out)["keys"] == []


@pytest.mark.parametrize(
    "body",
    ['[{"id": "3f2b9c1e-0000-4000-8000-00000000a1b2", "name": "ci"}]', '["k-one", "k-two"]'],
)
def test_a_list_the_agent_does_not_understand_is_remote_error(
    conduce_agent: AgentProcess, emulator: Emulator, body: str
) -> None:
    """list --remote on a list with no recognised key field fails with remote_error naming
    its shape; it neither says "no API keys" nor marks the held key stale."""
    login(conduce_agent, emulator)
    created = ctl(conduce_agent, emulator, "create")
    assert created.code == 0, created.err
    emulator.inject(Fault.status(200, body), path="apikeys/list", count=1)
    listed = ctl(conduce_agent, emulator, "list", "--remote")
    assert listed.code == 1
    assert "[remote_error]" in listed.err
    assert "does not understand" in listed.err
    assert "none with a key field" in listed.err
    assert "no API keys" not in listed.out + listed.err
    assert "stale" not in listed.out
    assert "3f2b9c1e" not in listed.err
    assert "k-one" not in listed.err
    # The next, understood, answer lists the held key as held, not stale.
    again = json.loads(ctl(conduce_agent, emulator, "list", "--remote", "--json").out)
    assert [key["held"] for key in again["remote"]] == [True]
    assert not any(key.get("stale") for key in again["keys"])


def test_a_hostile_description_from_the_service_is_remote_error(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """A listed description with a terminal escape fails list --remote with remote_error
    naming the field; the escape reaches neither the screen nor the message."""
    login(conduce_agent, emulator)
    body = json.dumps(
        [
            {"apikey": "3f2b9c1e-0000-4000-8000-00000000a1b2", "description": "ok"},
            {"apikey": "3f2b9c1e-0000-4000-8000-00000000c3d4", "description": "\x1b]0;pwned\x07"},
        ]
    )
    emulator.inject(Fault.status(200, body), path="apikeys/list", count=1)
    listed = ctl(conduce_agent, emulator, "list", "--remote")
    assert listed.code == 1
    assert "[remote_error]" in listed.err
    assert "invalid 'description' in entry 2" in listed.err
    assert "\x1b" not in listed.out + listed.err
    assert "pwned" not in listed.out + listed.err


def test_created_keys_are_uuids(conduce_agent: AgentProcess, emulator: Emulator) -> None:
    """The emulator issues UUID keys, as the Conduce docs describe them."""
    import uuid

    login(conduce_agent, emulator)
    made = ctl(conduce_agent, emulator, "create", "--print")
    assert made.code == 0, made.err
    key = made.out.strip()
    assert str(uuid.UUID(key)) == key
    assert emulator.api_keys(USER) == [key]


def test_conduce_api_words_and_flags_work(conduce_agent: AgentProcess, emulator: Emulator) -> None:
    """create-api-key, list-api-keys, remove-api-key work with --user/--host after the verb."""
    login(conduce_agent, emulator)
    sock = conduce_agent.socket_path
    made = run_ctl(sock, "create-api-key", "--user", USER, "--host", emulator.host, "--print")
    assert made.code == 0, made.err
    key = made.out.strip()
    assert emulator.api_keys(USER) == [key]
    listed = run_ctl(sock, "list-api-keys", "--user", USER, "--host", emulator.host)
    assert listed.code == 0
    assert f"{key[:4]}…{key[-4:]}" in listed.out
    gone = run_ctl(
        sock, "remove-api-key", "-", "--user", USER, "--host", emulator.host, stdin=key + "\n"
    )
    assert gone.code == 0, gone.err
    assert emulator.api_keys(USER) == []


def test_remove_reads_the_key_itself_from_stdin(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """remove - takes the key on stdin, so it never appears on a command line."""
    login(conduce_agent, emulator)
    sock = conduce_agent.socket_path
    made = run_ctl(sock, "create", "--user", USER, "--host", emulator.host, "--print")
    assert made.code == 0, made.err
    key = made.out.strip()
    gone = run_ctl(sock, "remove", "-", "--user", USER, "--host", emulator.host, stdin=key + "\n")
    assert gone.code == 0, gone.err
    assert emulator.api_keys(USER) == []


def test_wrong_password_is_bad_credentials(conduce_agent: AgentProcess, emulator: Emulator) -> None:
    """A rejected login exits 1 with bad_credentials and leaves no session (not even a
    logged-out entry in status for an account the agent did not know)."""
    result = ctl(conduce_agent, emulator, "login", "--password-stdin", stdin="wrong\n")
    assert result.code == 1
    assert "[bad_credentials]" in result.err
    with conduce_agent.client() as client:
        assert client.status()["sessions"] == []


def test_login_needs_a_terminal_or_password_stdin(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """Without a terminal, login refuses to read a password unless --password-stdin is given."""
    result = ctl(conduce_agent, emulator, "login", stdin=PASSWORD)
    assert result.code == 64
    assert "--password-stdin" in result.err


def test_create_without_session_or_key_needs_login(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """With neither a session nor a held key, create answers login_required without a request."""
    result = ctl(conduce_agent, emulator, "create")
    assert result.code == 1
    assert "[login_required]" in result.err
    assert emulator.requests == []


def test_session_expiry_is_detected_and_reported(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """When the service drops the session, the agent says session_expired and status shows it."""
    login(conduce_agent, emulator)
    emulator.expire_sessions(USER)
    result = ctl(conduce_agent, emulator, "list", "--remote")
    assert result.code == 1
    assert "[session_expired]" in result.err
    with conduce_agent.client() as client:
        (session,) = client.status()["sessions"]
    assert session["expired"] is True
    login(conduce_agent, emulator)  # logging in again clears it
    assert ctl(conduce_agent, emulator, "list", "--remote").code == 0


def test_held_api_key_stands_in_for_an_expired_session(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """A held API key of the account authenticates remote calls when the session has expired."""
    login(conduce_agent, emulator)
    assert ctl(conduce_agent, emulator, "create").code == 0
    emulator.expire_sessions(USER)
    emulator.clear_requests()
    result = ctl(conduce_agent, emulator, "create", "-C", "second")
    assert result.code == 0, result.err
    assert len(emulator.api_keys(USER)) == 2
    creates = [r for r in emulator.requests if r.path == "apikeys/create"]
    assert [r.auth for r in creates] == ["cookie", "bearer"]


def test_held_api_key_works_without_any_login(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """A key added by hand lets the agent list and create keys with no password at all."""
    seed = emulator.add_key(USER, "seed")
    assert ctl(conduce_agent, emulator, "add", stdin=seed).code == 0
    listed = ctl(conduce_agent, emulator, "list", "--remote", "--json")
    assert listed.code == 0, listed.err
    assert [k["held"] for k in json.loads(listed.out)["remote"]] == [True]
    assert ctl(conduce_agent, emulator, "create").code == 0
    assert {r.auth for r in emulator.requests} == {"bearer"}


def test_idle_session_is_validated_before_use(
    agent_factory: AgentFactory, emulator: Emulator
) -> None:
    """A session idle longer than --validate-after is checked with validate-session first."""
    agent = agent_factory("--ca-bundle", emulator.ca_path, "--validate-after", "0.001")
    login(agent, emulator)
    emulator.clear_requests()
    assert ctl(agent, emulator, "list", "--remote").code == 0
    assert [r.path for r in emulator.requests] == ["user/validate-session", "apikeys/list"]
    with agent.client() as client:
        assert client.status()["sessions"][0]["last_validated"] is not None


def test_remote_listing_marks_unheld_and_stale_keys(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """Keys only on the service are held: false; keys held but gone from the service are stale."""
    login(conduce_agent, emulator)
    other = emulator.add_key(USER, "made elsewhere")
    assert ctl(conduce_agent, emulator, "create", "-C", "mine").code == 0
    mine = held_secret(conduce_agent)
    # Revoke "mine" behind the agent's back, with the other key.
    with ConduceAccount(emulator.host, USER, HttpSettings(verify=emulator.ca_path)) as account:
        account.delete_key(mine, api_key=other)
    result = json.loads(ctl(conduce_agent, emulator, "list", "--remote", "--json").out)
    assert [(k["description"], k["held"]) for k in result["remote"]] == [("made elsewhere", False)]
    assert [(k["key_id"], k["stale"]) for k in result["keys"]] == [(key_id_for(mine), True)]
    table = ctl(conduce_agent, emulator, "list", "--remote")
    assert "stale" in table.out
    assert other not in table.out


def test_remove_a_key_the_agent_does_not_hold_by_its_id(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """remove KEY_ID finds a key the agent does not hold on the service and deletes it."""
    login(conduce_agent, emulator)
    stranger = emulator.add_key(USER, "old")
    result = ctl(conduce_agent, emulator, "remove", key_id_for(stranger)[:8])
    assert result.code == 0, result.err
    assert emulator.api_keys(USER) == []


def test_remove_of_a_held_key_gone_from_the_service_forgets_it(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """A held key deleted elsewhere (the console, another agent): remove takes the service's
    "no such key" as deleted, forgets it and says it was already gone; remove of a key the
    agent does not hold says nothing of forgetting."""
    login(conduce_agent, emulator)
    assert ctl(conduce_agent, emulator, "create").code == 0
    secret = held_secret(conduce_agent)
    # Deleted elsewhere: another client of the service, with the key itself.
    settings = HttpSettings(verify=emulator.ca_path)
    with ConduceAccount(emulator.host, USER, settings) as elsewhere:
        elsewhere.delete_key(secret, api_key=secret)
    assert emulator.api_keys(USER) == []
    result = ctl(conduce_agent, emulator, "remove", key_id_for(secret))
    assert result.code == 0, result.err
    assert (
        result.out == f"key {key_id_for(secret)} was already gone from the service and forgot it\n"
    )
    assert run_ctl(conduce_agent.socket_path, "get").code == 1
    stranger = emulator.add_key(USER, "old")
    result = ctl(conduce_agent, emulator, "remove", key_id_for(stranger))
    assert result.out == f"removed key {key_id_for(stranger)} on the service\n"


def test_failed_remote_delete_keeps_the_local_key(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """If the service fails the delete, the agent keeps the key and says why."""
    login(conduce_agent, emulator)
    assert ctl(conduce_agent, emulator, "create").code == 0
    secret = held_secret(conduce_agent)
    emulator.inject(Fault.status(500), path="apikeys/delete", count=1)
    result = ctl(conduce_agent, emulator, "remove", key_id_for(secret))
    assert result.code == 1
    assert "[remote_error]" in result.err
    assert "500" in result.err
    assert held_secret(conduce_agent) == secret
    assert emulator.api_keys(USER) == [secret]


def test_a_hung_service_blocks_no_other_client(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """While one client's Conduce call hangs, other clients' local requests are answered."""
    login(conduce_agent, emulator)
    with conduce_agent.client() as client:
        client.add(emulator.host, USER, "local-key")
    emulator.inject(Fault.hang(), path="apikeys/list")
    outcome: dict[str, object] = {}

    def slow_list() -> None:
        with Client(conduce_agent.socket_path) as slow:
            outcome["remote"] = slow.call("list", host=emulator.host, user=USER, remote=True)

    waiter = threading.Thread(target=slow_list)
    waiter.start()
    try:
        assert emulator.wait_for_hung(1, timeout=10)
        with conduce_agent.client() as other:
            for _ in range(50):
                assert other.get() == "local-key"
                assert other.list()[0]["host"] == emulator.host
            assert other.hello()["protocol"] == 1
        assert "remote" not in outcome  # the hung call is still pending
    finally:
        emulator.clear_faults()
        emulator.release()
        waiter.join(15)
    assert "remote" in outcome


@pytest.mark.parametrize(
    ("fault", "path", "code"),
    [
        (Fault.status(500, body='{"error": "LEAKED-BODY"}'), "apikeys/list", "remote_error"),
        (Fault.status(502), "apikeys/create", "remote_error"),
        (Fault.status(503), "apikeys/create", "remote_error"),
        (Fault.status(403), "apikeys/list", "forbidden"),
        (Fault.reset(), "apikeys/create", "remote_unreachable"),
        (Fault.malformed_json(), "apikeys/list", "remote_error"),
        (Fault.malformed_json(), "apikeys/create", "remote_error"),
    ],
    ids=["500", "502-create", "503-create", "403", "reset", "malformed-list", "malformed-create"],
)
def test_faults_map_to_error_codes_and_the_agent_goes_on(
    conduce_agent: AgentProcess, emulator: Emulator, fault: Fault, path: str, code: str
) -> None:
    """Each service failure gives its error code, no body text, and the agent keeps serving."""
    login(conduce_agent, emulator)
    emulator.inject(fault, path=path)
    verb = ["create"] if path == "apikeys/create" else ["list", "--remote"]
    result = ctl(conduce_agent, emulator, *verb)
    assert result.code == 1
    assert f"[{code}]" in result.err
    assert "LEAKED-BODY" not in result.err
    emulator.clear_faults()
    assert ctl(conduce_agent, emulator, *verb).code == 0
    if path == "apikeys/create":  # never retried: at most one key may have been created
        assert len([r for r in emulator.requests if r.path == path]) == 2


def test_safe_calls_are_retried_on_503(conduce_agent: AgentProcess, emulator: Emulator) -> None:
    """A list that meets one 503 is retried and succeeds; create is never retried."""
    login(conduce_agent, emulator)
    emulator.inject(Fault.status(503), path="apikeys/list", count=1)
    assert ctl(conduce_agent, emulator, "list", "--remote").code == 0
    lists = [r.status for r in emulator.requests if r.path == "apikeys/list"]
    assert lists == [503, 200]


def test_slow_service_times_out_as_unreachable(
    agent_factory: AgentFactory, emulator: Emulator
) -> None:
    """A service slower than --read-timeout is remote_unreachable, and the agent goes on."""
    agent = agent_factory("--ca-bundle", emulator.ca_path, "--read-timeout", "0.3")
    login(agent, emulator)
    emulator.inject(Fault.delay(5), path="apikeys/create")
    result = ctl(agent, emulator, "create")
    assert result.code == 1
    assert "[remote_unreachable]" in result.err
    assert run_ctl(agent.socket_path, "status").code == 0


def test_wrong_certificate_is_a_tls_error(conduce_agent: AgentProcess, emulator: Emulator) -> None:
    """A certificate from another CA fails with tls_error, not a silent fallback."""
    emulator.inject(Fault.wrong_certificate("untrusted"))
    result = ctl(conduce_agent, emulator, "login", "--password-stdin", stdin=PASSWORD)
    assert result.code == 1
    assert "[tls_error]" in result.err


def test_agent_without_the_ca_refuses_the_emulator(
    agent_factory: AgentFactory, emulator: Emulator
) -> None:
    """TLS verification is on by default: an unknown CA is a tls_error."""
    agent = agent_factory()
    result = ctl(agent, emulator, "login", "--password-stdin", stdin=PASSWORD)
    assert result.code == 1
    assert "[tls_error]" in result.err


def test_explicit_ca_bundle_beats_requests_ca_bundle(
    agent_factory: AgentFactory, emulator: Emulator, tmp_path: Path
) -> None:
    """--ca-bundle wins over an inherited REQUESTS_CA_BUNDLE that would not trust the host."""
    wrong = tmp_path / "wrong-ca.pem"
    import trustme

    wrong.write_bytes(trustme.CA().cert_pem.bytes())
    env = {**os.environ, "REQUESTS_CA_BUNDLE": str(wrong)}
    agent = agent_factory("--ca-bundle", emulator.ca_path, env=env)
    login(agent, emulator)
    inherited_only = agent_factory(name="inherited", env={**env})
    result = ctl(inherited_only, emulator, "login", "--password-stdin", stdin=PASSWORD)
    assert "[tls_error]" in result.err


def test_no_password_key_or_cookie_in_log_or_errors(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """After a full flow with faults at debug level, no password, key or cookie is in the log."""
    outputs: list[str] = []
    login(conduce_agent, emulator)
    tokens = emulator.session_tokens()  # the cookie values the service handed out
    for argv in (["create", "--print"], ["list", "--remote"], ["create"]):
        result = ctl(conduce_agent, emulator, *argv)
        outputs.append(result.err)
    emulator.inject(Fault.status(500), path="apikeys/list", count=1)
    outputs.append(ctl(conduce_agent, emulator, "list", "--remote").err)
    emulator.expire_sessions(USER)
    outputs.append(
        ctl(conduce_agent, emulator, "login", "--password-stdin", stdin="wrong-" + PASSWORD).err
    )
    created = emulator.api_keys(USER)
    assert len(created) == 2
    for secret in created:
        outputs.append(ctl(conduce_agent, emulator, "remove", key_id_for(secret)).err)
    with conduce_agent.client() as client:
        client.stop()
    assert conduce_agent.process is not None
    conduce_agent.process.wait(10)
    log = conduce_agent.log()
    assert "op=create" in log
    for text in [log, *outputs]:
        for secret in [PASSWORD, *tokens, *created]:
            assert secret not in text


def test_password_never_in_argv_of_ctl(conduce_agent: AgentProcess, emulator: Emulator) -> None:
    """keyagent-ctl login reads the password from stdin; its argv holds no password."""
    env = {**os.environ, "KEYAGENT_SOCK": conduce_agent.socket_path}
    result = run_ctl_process(
        ["login", "--host", emulator.host, "--user", USER, "--password-stdin"],
        env=env,
        stdin=PASSWORD + "\n",
    )
    assert result.returncode == 0, result.stderr
    with Client(conduce_agent.socket_path) as client:
        assert client.status()["sessions"][0]["logged_in"] is True
    with Client(conduce_agent.socket_path) as client, pytest.raises(errors.LoginRequired):
        client.create("other.example", USER)


class DrippingService:
    """A TLS server that answers its first request with a head, then its body one byte every
    0.2 s (each byte well within any read timeout), until closed."""

    def __init__(self, tmp_path: Path) -> None:
        import ssl

        import trustme

        authority = trustme.CA()
        self.ca_path = tmp_path / "drip-ca.pem"
        authority.cert_pem.write_to_path(str(self.ca_path))
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        authority.issue_cert("127.0.0.1").configure_cert(self._context)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve)
        self._thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            raw, _ = self._listener.accept()
            with self._context.wrap_socket(raw, server_side=True) as tls:
                tls.recv(65536)
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                while not self._stop.wait(0.2):
                    tls.sendall(b" ")

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(10)
        assert not self._thread.is_alive()


def test_a_service_that_drips_its_answer_is_cut_at_the_calls_deadline(tmp_path: Path) -> None:
    """--read-timeout bounds each wait for the next bytes: a service that sends its answer a
    byte at a time would hold the call for hours (this one: 100,000 bytes at five a second).
    The whole call has a deadline, connect_timeout + 2 x read_timeout, at which it ends as a
    call with no answer does (a create: the key may have been made)."""
    service = DrippingService(tmp_path)
    try:
        settings = HttpSettings(verify=str(service.ca_path), connect_timeout=1, read_timeout=1)
        with (
            ConduceAccount(service.host, USER, settings) as account,
            pytest.raises(errors.RemoteUnreachable) as caught,
        ):
            account.create_key("dripped", api_key="k" * 16)
    finally:
        service.close()
    message = caught.value.message
    assert f"{service.host} did not finish answering within 3s" in message
    assert "the key may have been made" in message


def test_a_tls_handshake_that_never_ends_is_not_a_key_that_may_exist(tmp_path: Path) -> None:
    """A host that accepts the TCP connection and never says a word of TLS: urllib3 reports
    the handshake's timeout as a read timeout, but nothing was sent, so a create says the
    handshake did not end within the connect timeout, not that a key may have been made or
    that the host did not answer within the read timeout."""
    listener = socket.create_server(("127.0.0.1", 0))
    host = f"127.0.0.1:{listener.getsockname()[1]}"
    settings = HttpSettings(connect_timeout=1, read_timeout=3)
    try:
        with (
            ConduceAccount(host, USER, settings) as account,
            pytest.raises(errors.RemoteUnreachable) as caught,
        ):
            account.create_key("never-sent", api_key="k" * 16)
        accepted, _ = listener.accept()  # the connection was made, and is in the backlog
        accepted.settimeout(5)
        assert accepted.recv(65536)[:1] == b"\x16"  # a TLS ClientHello: no request followed
        accepted.close()
    finally:
        listener.close()
    assert caught.value.message == (
        f"{host} accepted a connection but did not complete the TLS handshake within 1s; "
        "check that the host serves HTTPS on that port, and the network"
    )
