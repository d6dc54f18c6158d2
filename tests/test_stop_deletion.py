"""Deletion at stop, at the agent's level: a stopping agent deletes its ephemeral keys that are
not persisted, and its pending deletions, on the service, once each, and says which it could
not; each deletion the agent makes on its own is in the audit log. Fakes and a fake clock."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

import pytest

from keyagent import daemon, errors, service
from keyagent._argparse import EXIT_USAGE
from keyagent.agent import Agent, Stop
from keyagent.config import Config, ConfigError, load
from keyagent.duration import parse_duration
from keyagent.persist import KeyringStore
from keyagent.protocol import remove_command
from keyagent.server import Limits
from keyagent.store import digest_of, key_id_for
from keyagent.testing.memory_keyring import MemoryKeyring

from .fakes import (
    PEER,
    FakeAccount,
    FakeTime,
    HeldWorkDriver,
    driver_for,
    fails,
    request,
    run,
    steps,
)

ROOT = Path(__file__).resolve().parent.parent
HOST, USER = "app.conduce.com", "ada@example.com"
ACCOUNT = {"host": HOST, "user": USER}


@pytest.fixture
def time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def account() -> FakeAccount:
    return FakeAccount(keys=["existing-key-0000-abcdefgh"])


@pytest.fixture
def agent(time: FakeTime, account: FakeAccount) -> Agent:
    return Agent(
        clock=time.clock(),
        accounts=lambda host, user: account,
        keyring=KeyringStore(MemoryKeyring()),
        jitter=lambda delay: delay,
    )


def create(agent: Agent, account: FakeAccount, **args: Any) -> str:
    """Log in if need be, create a key; its secret."""
    if not agent.sessions or not next(iter(agent.sessions.values())).live:
        run(agent, "login", **ACCOUNT, password="pw")
    run(agent, "create", **ACCOUNT, **args)
    return account.keys[-1]


def deletions(agent: Agent) -> list[tuple[str, str, str | None, int | None]]:
    """The audit log's delete entries: (outcome, key id, user, pid)."""
    return [
        (entry.outcome, entry.key_id or "", entry.user, entry.pid)
        for entry in agent.audit_log.last()
        if entry.op == "delete"
    ]


def test_stop_deletes_ephemeral_keys_that_are_not_persisted_and_keeps_the_others(
    agent: Agent, account: FakeAccount
) -> None:
    """At stop an ephemeral key is deleted on the service and no longer served; a persisted
    ephemeral key, a kept key and an added key stay on the service and are still served."""
    ephemeral = create(agent, account, lifetime=3600)
    persisted = create(agent, account, lifetime=3600, persist=True)
    kept = create(agent, account, lifetime=3600, keep=True)
    run(agent, "add", **ACCOUNT, key="existing-key-0000-abcdefgh")
    driver_for(agent)
    assert agent.begin_stop() == 0  # inline: the one deletion has ended already
    assert ephemeral not in account.keys
    assert {persisted, kept, "existing-key-0000-abcdefgh"} <= set(account.keys)
    assert isinstance(fails(agent, "get", key_id=key_id_for(ephemeral)), errors.NotFound)
    assert run(agent, "get", key_id=key_id_for(persisted))["key"] == persisted
    assert agent.deletions_at_stop() == 0
    assert agent.pending_deletions == {}
    assert deletions(agent) == [("ok", key_id_for(ephemeral), USER, None)]
    assert agent.end_stop("unused") == 0


def test_the_stop_reply_counts_the_keys_to_delete_before_any_is_deleted(
    agent: Agent, account: FakeAccount
) -> None:
    """stop answers with how many keys it will delete on the service (unless locked), and
    deletes none yet: the server sends the reply first, then begins the deletions."""
    secret = create(agent, account, lifetime=3600)
    create(agent, account, lifetime=3600, persist=True)
    outcome = agent.handle(request("stop"), PEER)
    assert outcome == Stop({"stopping": True, "deleting": 1})
    assert secret in account.keys
    assert agent.at_stop is None
    run(agent, "lock", passphrase="pass phrase")
    assert agent.handle(request("stop"), PEER) == Stop({"stopping": True, "locked": True})
    run(agent, "unlock", passphrase="pass phrase")
    run(agent, "forget", all=True, local=True)
    assert agent.handle(request("stop"), PEER) == Stop({"stopping": True})


def test_stop_and_forget_name_created_keys_that_stay_valid_with_nobody_holding_them(
    agent: Agent, account: FakeAccount
) -> None:
    """A key the agent made without a lifetime is not deleted when the agent stops or
    forgets it (a tool may use it), but nobody holds it afterwards: stop (unless locked)
    and forget name it, so the user can remove it. Added, persisted and ephemeral keys are
    not named; forget --local of an ephemeral key is (it stays valid too)."""
    plain = create(agent, account)
    ephemeral = create(agent, account, lifetime=3600)
    create(agent, account, persist=True)
    run(agent, "add", **ACCOUNT, key="existing-key-0000-abcdefgh")
    outcome = agent.handle(request("stop"), PEER)
    staying = {"key_id": key_id_for(plain), "host": HOST, "user": USER}
    assert outcome == Stop({"stopping": True, "deleting": 1, "staying": [staying]})
    run(agent, "lock", passphrase="pass phrase")
    assert agent.handle(request("stop"), PEER) == Stop({"stopping": True, "locked": True})
    run(agent, "unlock", passphrase="pass phrase")
    forgotten = run(agent, "forget", key_id=key_id_for(plain))
    assert forgotten["staying"] == [staying]
    local = run(agent, "forget", key_id=key_id_for(ephemeral), local=True)
    assert [key["key_id"] for key in local["staying"]] == [key_id_for(ephemeral)]
    rest = run(agent, "forget", all=True)
    assert "staying" not in rest


def test_an_exiting_agent_names_the_created_keys_it_leaves_valid(
    agent: Agent, account: FakeAccount, caplog: pytest.LogCaptureFixture
) -> None:
    """However the agent is stopped (a signal, keyagent CMD's end: no stop reply to tell
    anyone), it names among its errors each key it made without a lifetime, which stays
    valid on the service held by nobody, with the command that deletes it; a user name
    starting with "-" stays a value of --user there."""
    plain = create(agent, account)
    run(agent, "add", **ACCOUNT, key="existing-key-0000-abcdefgh")
    agent.begin_stop()
    with caplog.at_level(logging.ERROR, logger="keyagent.agent"):
        agent.end_stop("stopped")
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert f"key {key_id_for(plain)} of {USER} on {HOST}, made by this agent" in line
    assert f"keyagent-ctl remove --host={HOST} --user={USER} {digest_of(plain)}" in line
    assert plain not in line
    assert remove_command("h", "-x@example.com", "ab") == (
        "keyagent-ctl remove --host=h --user=-x@example.com ab"
    )


def test_a_pending_deletion_waiting_to_retry_gets_an_attempt_at_stop_and_only_one(
    agent: Agent, account: FakeAccount, time: FakeTime
) -> None:
    """A deletion waiting out its backoff is attempted again at once when the agent stops;
    the retry it was waiting for then makes no second call and no second audit entry."""
    secret = create(agent, account, lifetime=60)
    account.failures = [errors.RemoteError("the service answered 503")]
    driver = driver_for(agent)
    time.advance(60)
    agent.reap()  # expired: the first attempt fails, a retry waits a second
    assert secret in account.keys
    assert [digest_of(secret)] == list(agent.pending_deletions)
    calls = len(account.calls)
    agent.begin_stop()
    assert secret not in account.keys
    assert len(account.calls) == calls + 1
    driver.pass_time(60)  # the retry's timer fires: nothing is left to do
    assert len(account.calls) == calls + 1
    assert deletions(agent) == [("ok", key_id_for(secret), USER, None)]


def test_keys_not_deleted_at_stop_are_logged_with_the_command_and_audited(
    agent: Agent, account: FakeAccount, time: FakeTime, caplog: pytest.LogCaptureFixture
) -> None:
    """A deletion that fails at stop, and one still under way when the agent exits, are each
    logged with the key id, host, user and the keyagent-ctl remove command (never the
    secret), and recorded in the audit log with their outcome."""
    hanging = create(agent, account, lifetime=3600)
    failing = create(agent, account, lifetime=3600)
    driver = HeldWorkDriver(time)
    agent.driven_by(driver.start_background)
    assert agent.begin_stop() == 2
    (first,) = driver.held  # one account: one call at a time, newest key first
    account.fail_next = errors.RemoteUnreachable("could not reach app.conduce.com")
    driver.end(first)
    assert agent.deletions_at_stop() == 1
    (second,) = driver.held  # the next one started, and never ends
    with caplog.at_level(logging.INFO, logger="keyagent.agent"):
        assert agent.end_stop("not done within stop_timeout, 10 s") == 2
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 2
    for secret, line in zip((failing, hanging), lines, strict=True):
        assert key_id_for(secret) in line
        assert f"keyagent-ctl remove --host={HOST} --user={USER} {digest_of(secret)}" in line
        assert secret not in line
    assert "could not reach app.conduce.com" in lines[0]
    assert "not done within stop_timeout, 10 s" in lines[1]
    assert deletions(agent) == [
        ("remote_unreachable", key_id_for(failing), USER, None),
        ("timeout", key_id_for(hanging), USER, None),
    ]
    assert {failing, hanging} <= set(account.keys)
    assert second in driver.held


def test_a_create_under_way_at_stop_is_waited_for_and_its_key_deleted(
    agent: Agent, account: FakeAccount, time: FakeTime
) -> None:
    """A create the stop came in the middle of counts as work the stopping agent waits for,
    and the key it makes (ephemeral or not: nobody would hold it once the agent exits) is
    deleted on the service, not left there, and the client told so (busy, naming the key)
    rather than that the agent holds it; a create asked for once the agent is stopping is
    refused (busy)."""
    run(agent, "login", **ACCOUNT, password="pw")
    driver_for(agent)
    held_work = HeldWorkDriver(time)
    ended: list[tuple[Any, errors.KeyagentError | None]] = []
    for lifetime in ({"lifetime": 3600}, {}):
        held_work.start(
            steps(agent, "create", **ACCOUNT, **lifetime),
            lambda result, error: ended.append((result, error)),
        )
    assert agent.begin_stop() == 2  # nothing to delete yet; the creates under way
    for _ in range(2):  # one at a time: the account's calls wait in line
        (making,) = held_work.held
        held_work.end(making)  # the service answers with the new key now
    late = account.keys[-2:]
    assert [(result, type(error)) for result, error in ended] == [(None, errors.Busy)] * 2
    for secret, (_, error) in zip(late, ended, strict=True):
        assert error is not None
        assert f"made key {key_id_for(secret)}" in error.message
        assert "deletes that key on the service" in error.message
    assert agent.deletions_at_stop() == 0
    assert not set(late) & set(account.keys)
    refused = fails(agent, "create", **ACCOUNT, lifetime=60)
    assert isinstance(refused, errors.Busy)
    assert "stopping" in refused.message


def test_the_agents_own_deletions_are_audited_however_they_end(
    agent: Agent, account: FakeAccount, time: FakeTime
) -> None:
    """Deletions the agent makes on its own (at expiry, after forget) are audited as op
    delete by the agent itself (no pid): deleted, already gone, and given up after a day."""
    deleted = create(agent, account, lifetime=60)
    gone = create(agent, account, lifetime=60)
    account.keys.remove(gone)
    driver = driver_for(agent)
    time.advance(60)
    agent.reap()
    given_up = create(agent, account, lifetime=3600)
    account.failures = [errors.RemoteError("the service answered 503")] * 10_000
    run(agent, "forget", key_id=key_id_for(given_up))
    driver.pass_time(2 * 24 * 3600)
    assert sorted(deletions(agent)) == sorted(
        [
            ("ok", key_id_for(deleted), USER, None),
            ("not_found", key_id_for(gone), USER, None),
            ("remote_error", key_id_for(given_up), USER, None),
        ]
    )
    entry = next(entry for entry in agent.audit_log.last() if entry.op == "delete")
    assert (entry.host, entry.uid, entry.exe) == (HOST, None, None)


def test_the_default_stop_timeout_is_below_the_shipped_units_timeout_stop_sec() -> None:
    """The shipped keyagent.service (and its contrib copy) sets TimeoutStopSec above the
    default stop_timeout, so systemd lets the agent finish deleting and logging before it
    would kill it."""
    shipped = service.template(service.SERVICE_UNIT)
    assert (ROOT / "contrib" / "systemd" / service.SERVICE_UNIT).read_text() == shipped
    (value,) = [
        line.partition("=")[2].strip()
        for line in shipped.splitlines()
        if line.startswith("TimeoutStopSec=")
    ]
    assert Config().stop_timeout == Limits().stop_timeout < parse_duration(value)


def test_stop_timeout_is_a_duration_from_the_file_or_the_flag(tmp_path: Path) -> None:
    """stop_timeout in the config file and keyagent --stop-timeout take durations such as
    "15s"; zero is refused naming the file, the line and the rule (exit 78), and the flag
    beats the file."""
    path = tmp_path / "config.toml"
    path.write_text('stop_timeout = "5s"\n')
    assert load(str(path), env={}).stop_timeout == 5.0
    assert load(str(path), env={}, flags={"stop_timeout": 3.0}).stop_timeout == 3.0
    path.write_text('stop_timeout = "0s"\n')
    with pytest.raises(ConfigError) as caught:
        load(str(path), env={})
    assert str(caught.value) == f"{path}:1: 'stop_timeout' must be a positive duration; got \"0s\""
    args = daemon.build_parser().parse_args(["--stop-timeout", "1m", "--config", str(path)])
    assert args.stop_timeout == 60.0
    errors_out = io.StringIO()
    with contextlib.redirect_stderr(errors_out), pytest.raises(SystemExit) as exited:
        daemon.build_parser().parse_args(["--stop-timeout", "0"])
    assert exited.value.code == EXIT_USAGE
    assert "--stop-timeout" in errors_out.getvalue()


def test_a_stopping_agent_starts_no_scheduled_rotation(
    agent: Agent, account: FakeAccount, time: FakeTime
) -> None:
    """Once the agent is stopping, a rotation that falls due makes no new key on the
    service: the agent is on its way out."""
    secret = create(agent, account, rotate_every=600)
    driver_for(agent)
    agent.begin_stop()
    time.advance(601)
    assert agent.rotate_due() is None
    assert account.keys[-1] == secret
    assert [name for name, _ in account.calls].count("create") == 1


def test_the_stop_reply_counts_creates_under_way_once_and_adds_not_at_all(
    agent: Agent, account: FakeAccount, time: FakeTime
) -> None:
    """stop's reply: a create whose keyring save is under way is one create waited for, not
    also a key to delete (the save decides); an add --persist waiting on the keyring is
    neither (it makes no key on the service)."""
    run(agent, "login", **ACCOUNT, password="pw")
    driver_for(agent)
    held_work = HeldWorkDriver(time)
    held_work.start(
        steps(agent, "create", **ACCOUNT, lifetime=3600, persist=True), lambda r, e: None
    )
    (making,) = held_work.held
    held_work.end(making)  # the service made the key; its keyring save waits now
    stop = agent.process_stop({})
    assert isinstance(stop, Stop)
    assert stop.result == {"stopping": True, "waiting": 1}
    (saving,) = held_work.held
    held_work.end(saving)
    held_work.start(
        steps(agent, "add", **ACCOUNT, key="added-key-0000-abcdefgh", persist=True),
        lambda r, e: None,
    )
    assert held_work.held  # the add's keyring save
    stop = agent.process_stop({})
    assert isinstance(stop, Stop)
    assert stop.result == {"stopping": True}


@pytest.mark.parametrize("lifetime", [{"lifetime": 3600}, {}], ids=["ephemeral", "lasting"])
@pytest.mark.parametrize("saved", [True, False], ids=["saved", "save-failed"])
def test_a_key_being_persisted_at_stop_is_kept_if_saved_and_deleted_if_not(
    agent: Agent, account: FakeAccount, time: FakeTime, saved: bool, lifetime: dict[str, int]
) -> None:
    """A created key whose keyring save is under way when the stop comes is waited for:
    saved, it is kept (it comes back at the next start); if the save fails, it is deleted on
    the service like any ephemeral key that is not persisted, a key without a lifetime too
    (nobody would hold it once the agent exits), and the create says so (busy)."""
    run(agent, "login", **ACCOUNT, password="pw")
    driver_for(agent)
    assert agent.keyring is not None
    backend = MemoryKeyring()
    agent.keyring = KeyringStore(backend)
    if not saved:
        backend.fail_with = RuntimeError("the keyring went away")
    held_work = HeldWorkDriver(time)
    ended: list[errors.KeyagentError | None] = []
    held_work.start(
        steps(agent, "create", **ACCOUNT, **lifetime, persist=True),
        lambda result, error: ended.append(error),
    )
    (making,) = held_work.held
    held_work.end(making)  # the service made the key; its keyring save waits now
    (saving,) = held_work.held
    key = account.keys[-1]
    assert agent.begin_stop() == 1  # the save under way
    assert key in account.keys
    held_work.end(saving)
    assert agent.deletions_at_stop() == 0
    assert (key in account.keys) is saved
    (error,) = ended
    if saved:
        assert error is None
    else:
        assert isinstance(error, errors.Busy)
        assert f"deletes key {key_id_for(key)} on the service" in error.message
