"""Rotation at the agent's level: rotate replaces a held key by a new one made on the service,
serves it at once and deletes the old one there; create --rotate-every does so on a schedule.
Fakes throughout: an in-memory account and keyring, a fake clock, the inline driver."""

from __future__ import annotations

from typing import Any

import pytest

from keyagent import errors
from keyagent.agent import FIRST_RETRY, Agent, marked
from keyagent.persist import KeyringStore
from keyagent.store import digest_of, key_id_for
from keyagent.testing.memory_keyring import MemoryKeyring

from .fakes import FakeAccount, FakeTime, HeldWorkDriver, driver_for, fails, run, steps

HOST, USER = "app.conduce.com", "ada@example.com"
ACCOUNT = {"host": HOST, "user": USER}
ADDED = "added-key-0000-abcdefghijkl"


class ScriptedAccount(FakeAccount):
    """A FakeAccount whose next creates and deletes may be told to fail, one error each."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.create_errors: list[errors.KeyagentError | None] = []
        self.delete_errors: list[errors.KeyagentError | None] = []

    def create_key(self, description: str, api_key: str | None = None) -> str:
        if self.create_errors:
            error = self.create_errors.pop(0)
            if error is not None:
                self.calls.append(("create", api_key))
                raise error
        return super().create_key(description, api_key=api_key)

    def delete_key(self, key: str, api_key: str | None = None) -> None:
        if self.delete_errors:
            error = self.delete_errors.pop(0)
            if error is not None:
                self.calls.append(("delete", api_key))
                raise error
        super().delete_key(key, api_key=api_key)


def down() -> errors.KeyagentError:
    return errors.RemoteUnreachable("the service did not answer; retry later")


@pytest.fixture
def time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def account() -> ScriptedAccount:
    return ScriptedAccount(keys=[ADDED])


@pytest.fixture
def backend() -> MemoryKeyring:
    return MemoryKeyring()


@pytest.fixture
def agent(time: FakeTime, account: ScriptedAccount, backend: MemoryKeyring) -> Agent:
    # No jitter: retry times are asserted exactly.
    return Agent(
        clock=time.clock(),
        accounts=lambda host, user: account,
        keyring=KeyringStore(backend),
        jitter=lambda delay: delay,
        askpass="/usr/libexec/ask",  # never run here: --confirm keys need one to be added
    )


def create(agent: Agent, **args: Any) -> dict[str, Any]:
    """create, logged in (the session stays live)."""
    if not agent.sessions or not next(iter(agent.sessions.values())).live:
        run(agent, "login", **ACCOUNT, password="pw")
    return run(agent, "create", **ACCOUNT, **args)


def rotate(agent: Agent, **args: Any) -> dict[str, Any]:
    """rotate, driven to its end without dropping the timers of the background work it
    started (a retried deletion), as the server's loop keeps them."""
    ended: list[tuple[Any, errors.KeyagentError | None]] = []
    driver_for(agent).start(
        steps(agent, "rotate", **args), lambda result, error: ended.append((result, error))
    )
    assert ended, "rotate waits for something that never comes"
    result, error = ended[0]
    if error is not None:
        raise error
    assert isinstance(result, dict)
    return result


def served(agent: Agent) -> str:
    secret = run(agent, "get", **ACCOUNT)["key"]
    assert isinstance(secret, str)
    return secret


def keyring_ids(backend: MemoryKeyring) -> set[str]:
    return {user.removeprefix("key:") for (_, user) in backend.entries() if user.startswith("key:")}


def test_rotate_serves_the_new_key_and_deletes_the_old_one_on_the_service(
    agent: Agent, account: ScriptedAccount
) -> None:
    """rotate makes a new key on the service, get serves it from then on, the old key is
    deleted on the service and no longer held, and the reply names both."""
    old = create(agent, description="laptop")
    old_secret = account.keys[-1]
    result = rotate(agent, key_id=old["key_id"])
    new_secret = account.keys[-1]
    assert new_secret != old_secret
    assert old_secret not in account.keys  # deleted on the service
    assert account.descriptions[new_secret] == marked("laptop")
    assert served(agent) == new_secret
    assert result["key_id"] == key_id_for(new_secret)
    assert result["old_key_id"] == old["key_id"]
    assert result["old_fingerprint"] == digest_of(old_secret)
    assert (result["old_deleted"], result["pending_deletion"]) == (True, False)
    assert [key["key_id"] for key in run(agent, "list")["keys"]] == [result["key_id"]]
    assert isinstance(fails(agent, "get", key_id=old["key_id"]), errors.NotFound)


def test_a_failed_create_changes_nothing(agent: Agent, account: ScriptedAccount) -> None:
    """When the service cannot make the new key, rotate fails with that error and the old
    key stays held, served and on the service."""
    old = create(agent)
    old_secret = account.keys[-1]
    on_service = list(account.keys)
    account.create_errors = [down()]
    with pytest.raises(errors.RemoteUnreachable):
        rotate(agent, key_id=old["key_id"])
    assert account.keys == on_service
    assert served(agent) == old_secret
    assert run(agent, "list")["keys"] == [old]
    assert agent.pending_deletions == {}


def test_a_failed_deletion_leaves_the_old_key_pending_and_says_so(
    agent: Agent, account: ScriptedAccount, time: FakeTime
) -> None:
    """When the old key cannot be deleted on the service, the new key is served anyway, the
    reply says the old one is pending deletion, status shows it, and the background retry
    deletes it after the first backoff."""
    old = create(agent)
    old_secret = account.keys[-1]
    account.delete_errors = [down(), down()]  # the rotation's attempt, the first retry's
    result = rotate(agent, key_id=old["key_id"])
    assert (result["old_deleted"], result["pending_deletion"]) == (False, True)
    assert served(agent) == account.keys[-1] != old_secret
    assert old_secret in account.keys
    pending = run(agent, "status")["pending_deletions"]
    assert [entry["key_id"] for entry in pending] == [old["key_id"]]
    driver_for(agent).pass_time(FIRST_RETRY)
    assert old_secret not in account.keys
    assert agent.pending_deletions == {}


def test_rules_flags_description_persistence_and_expiry_carry_over(
    agent: Agent, account: ScriptedAccount, backend: MemoryKeyring, time: FakeTime
) -> None:
    """The new key keeps the old one's description, rules, ephemeral and persisted flags and
    its deadline (a key asked for 8 h stays bounded by those 8 h); the keyring then holds the
    new key's record and not the old one's."""
    old = create(
        agent, description="ci", lifetime=8 * 3600, persist=True, export=False, confirm=True,
        allow_exe=["/usr/bin/curl"],
    )  # fmt: skip
    old_secret = account.keys[-1]
    assert keyring_ids(backend) == {digest_of(old_secret)}
    time.advance(3600)
    new = rotate(agent, key_id=old["key_id"])
    for field in ("description", "expires", "exportable", "confirm", "allowed_exes",
                  "ephemeral", "persisted", "host", "user"):  # fmt: skip
        assert new[field] == old[field], field
    assert new["source"] == "created"
    new_secret = account.keys[-1]
    assert keyring_ids(backend) == {digest_of(new_secret)}
    (record,) = KeyringStore(backend).load_all(time.wall)[0]
    assert (record.secret, record.description, record.exportable) == (new_secret, "ci", False)
    assert record.expires == pytest.approx(time.wall + 7 * 3600)
    # Bounded by the old deadline: seven hours on, the new key expires and, being
    # ephemeral, is deleted on the service.
    time.advance(7 * 3600)
    agent.reap()
    assert run(agent, "list")["keys"] == []
    assert new_secret not in account.keys


def test_an_added_key_is_rotated_into_a_created_key(agent: Agent, account: ScriptedAccount) -> None:
    """A key given with add can be rotated: the new key is a created one, not ephemeral
    (as the added key was not), and the added key is deleted on the service."""
    added = run(agent, "add", **ACCOUNT, key=ADDED, description="from the web ui")
    result = rotate(agent, key_id=added["key_id"])
    assert ADDED not in account.keys
    assert (result["source"], result["ephemeral"]) == ("created", False)
    assert result["description"] == "from the web ui"
    assert ("create", ADDED) in account.calls  # the old key authenticated its successor


def test_rotate_all_rotates_each_created_key_and_reports_a_failure(
    agent: Agent, account: ScriptedAccount
) -> None:
    """rotate --all rotates every created key of the account one after another; one that
    fails is reported with its error and the others are still rotated; added keys are left."""
    first, second, third = (create(agent, description=f"k{n}") for n in range(3))
    run(agent, "add", **ACCOUNT, key=ADDED)
    account.create_errors = [None, down()]  # the second rotation fails
    result = rotate(agent, all=True, **ACCOUNT)
    assert [key["old_key_id"] for key in result["rotated"]] == [first["key_id"], third["key_id"]]
    (failed,) = result["failed"]
    assert failed["key_id"] == second["key_id"]
    assert failed["error"]["code"] == "remote_unreachable"
    held = {key["key_id"] for key in run(agent, "list")["keys"]}
    assert second["key_id"] in held
    assert key_id_for(ADDED) in held
    assert {first["key_id"], third["key_id"]}.isdisjoint(held)
    assert len(held) == 4


def test_rotate_needs_a_key_id_or_all_with_an_account(agent: Agent) -> None:
    """rotate without a key id or all, with both, or all without host and user, is refused."""
    create(agent)
    assert isinstance(fails(agent, "rotate"), errors.BadRequest)
    assert isinstance(fails(agent, "rotate", key_id="abcd", all=True), errors.BadRequest)
    assert "'host' and 'user'" in fails(agent, "rotate", all=True).message
    assert isinstance(fails(agent, "rotate", key_id="0000"), errors.NotFound)


def test_rotation_is_recorded_in_the_audit_log(agent: Agent, account: ScriptedAccount) -> None:
    """A rotation writes 'rotate' with the new key's id and 'rotated' with the old one's;
    a failed one writes 'rotate' with the old key's id and the error's code."""
    old = create(agent)
    result = rotate(agent, key_id=old["key_id"])
    entries = run(agent, "log")["entries"]
    assert [(e["op"], e["outcome"], e["key_id"]) for e in entries[-2:]] == [
        ("rotate", "ok", result["key_id"]),
        ("rotated", "ok", old["key_id"]),
    ]
    assert entries[-1]["pid"] == 1  # who asked
    account.create_errors = [down()]
    with pytest.raises(errors.RemoteUnreachable):
        rotate(agent, key_id=result["key_id"])
    last = run(agent, "log")["entries"][-1]
    assert (last["op"], last["outcome"], last["key_id"]) == (
        "rotate",
        "remote_unreachable",
        result["key_id"],
    )


def test_rotate_every_rotates_the_key_on_its_schedule(
    agent: Agent, account: ScriptedAccount, time: FakeTime
) -> None:
    """A key created with rotate_every is replaced when the interval has passed (not
    before); the new key keeps the schedule, and list shows it and the next rotation."""
    old = create(agent, rotate_every=3600)
    old_secret = account.keys[-1]
    listed = run(agent, "list")["keys"][0]
    assert listed["rotate_every"] == 3600
    assert listed["next_rotation"] == "2023-11-14T23:13:20Z"  # an hour after FakeTime's start
    deadline = agent.rotate_due()
    assert deadline == time.monotonic + 3600
    time.advance(3599)
    assert agent.rotate_due() == deadline
    assert account.keys[-1] == old_secret
    time.advance(1)
    driver_for(agent)
    agent.rotate_due()
    new_secret = account.keys[-1]
    assert new_secret != old_secret
    assert old_secret not in account.keys
    assert served(agent) == new_secret
    (listed,) = run(agent, "list")["keys"]
    assert listed["key_id"] != old["key_id"]
    assert listed["rotate_every"] == 3600
    assert listed["next_rotation"] == "2023-11-15T00:13:20Z"
    assert agent.rotate_due() == time.monotonic + 3600
    rotations = [e for e in run(agent, "log")["entries"] if e["op"].startswith("rotate")]
    assert [(e["op"], e["pid"]) for e in rotations] == [("rotate", None), ("rotated", None)]


def test_a_failed_scheduled_rotation_is_retried_with_backoff(
    agent: Agent, account: ScriptedAccount, time: FakeTime, caplog: pytest.LogCaptureFixture
) -> None:
    """A scheduled rotation that fails is logged and retried after 1 s, then 2 s, until it
    succeeds; the key is served meanwhile."""
    create(agent, rotate_every=60)
    old_secret = account.keys[-1]
    driver_for(agent)
    account.create_errors = [down(), down()]
    time.advance(60)
    assert agent.rotate_due() == time.monotonic + FIRST_RETRY
    assert "could not rotate key" in caplog.text
    assert served(agent) == old_secret
    time.advance(FIRST_RETRY)
    assert agent.rotate_due() == time.monotonic + 2 * FIRST_RETRY
    time.advance(2 * FIRST_RETRY)
    agent.rotate_due()
    assert account.keys[-1] != old_secret
    assert old_secret not in account.keys
    assert run(agent, "list")["keys"][0]["rotate_every"] == 60


def test_a_forgotten_key_is_not_rotated_on_schedule(
    agent: Agent, account: ScriptedAccount, time: FakeTime
) -> None:
    """Forgetting a key with a schedule ends its schedule: nothing is made on the service."""
    old = create(agent, rotate_every=60, keep=True)
    run(agent, "forget", key_id=old["key_id"])
    created = account.created
    time.advance(60)
    assert agent.rotate_due() is None
    assert account.created == created


def test_rotate_every_longer_than_the_lifetime_is_refused(
    agent: Agent, account: ScriptedAccount
) -> None:
    """create with rotate_every not shorter than its lifetime is refused before the service
    is asked for anything."""
    run(agent, "login", **ACCOUNT, password="pw")
    error = fails(agent, "create", **ACCOUNT, lifetime=600, rotate_every=600)
    assert isinstance(error, errors.BadRequest)
    assert "--rotate-every" in error.message
    assert account.created == 0


def test_the_keyring_record_keeps_rotate_every_and_a_restart_keeps_the_schedule(
    agent: Agent, account: ScriptedAccount, backend: MemoryKeyring, time: FakeTime
) -> None:
    """A persisted key with rotate_every is saved with it, and an agent restoring the key
    rotates it on that schedule, counted from the restart."""
    create(agent, rotate_every=3600, persist=True)
    (record,) = KeyringStore(backend).load_all(time.wall)[0]
    assert record.rotate_every == 3600
    restarted = Agent(
        clock=time.clock(), accounts=lambda host, user: account, keyring=KeyringStore(backend)
    )
    assert restarted.restore([record]) == 1
    assert run(restarted, "list")["keys"][0]["rotate_every"] == 3600
    assert restarted.rotate_due() == time.monotonic + 3600


def rotating(
    agent: Agent, time: FakeTime, key_id: str
) -> tuple[HeldWorkDriver, list[tuple[Any, errors.KeyagentError | None]]]:
    """A rotation started on a driver that holds its work until the test ends it; and where
    its outcome goes."""
    held_work = HeldWorkDriver(time)
    ended: list[tuple[Any, errors.KeyagentError | None]] = []
    held_work.start(
        steps(agent, "rotate", key_id=key_id),
        lambda result, error: ended.append((result, error)),
    )
    return held_work, ended


def test_a_key_forgotten_while_its_successor_is_made_is_not_replaced(
    agent: Agent, account: ScriptedAccount, time: FakeTime
) -> None:
    """If the key is forgotten while the service makes its successor, the rotation fails
    with not_found, holds nothing, and deletes the successor on the service."""
    old = create(agent, keep=True)  # not ephemeral: forgetting it leaves it on the service
    old_secret = account.keys[-1]
    held_work, ended = rotating(agent, time, old["key_id"])
    (making,) = held_work.held
    run(agent, "forget", key_id=old["key_id"])
    held_work.end(making)  # the service answers with the new key now
    ((_result, error),) = ended
    assert isinstance(error, errors.NotFound)
    assert "forgotten or expired while it was rotated" in error.message
    assert run(agent, "list")["keys"] == []
    assert account.keys == [ADDED, old_secret]  # the successor deleted, the old key kept
    assert account.created == 2


@pytest.mark.parametrize("lifetime", [None, 3600])
def test_a_rotation_the_stop_comes_in_the_middle_of_is_not_made(
    agent: Agent, account: ScriptedAccount, time: FakeTime, lifetime: float | None
) -> None:
    """The agent begins to stop while the service makes the successor: the rotation is
    busy, saying so; the successor is deleted on the service with the stop's deletions,
    and the old key is left to the stop (a key that stays stays; an ephemeral one goes)."""
    old = create(agent, keep=True) if lifetime is None else create(agent, lifetime=lifetime)
    old_secret = account.keys[-1]
    held_work, ended = rotating(agent, time, old["key_id"])
    (making,) = held_work.held
    driver_for(agent)  # the stop's deletions run inline
    agent.begin_stop()
    held_work.end(making)
    ((_result, error),) = ended
    assert isinstance(error, errors.Busy)
    assert error.message.startswith("the agent began to stop while the service made the key")
    assert agent.deletions_at_stop() == 0
    expected = [ADDED, old_secret] if lifetime is None else [ADDED]
    assert account.keys == expected
    assert account.created == 2
    entries = [(e.op, e.outcome, e.key_id) for e in agent.audit_log.last(None)]
    assert ("rotate", "busy", old["key_id"]) in entries


def test_a_persisted_key_forgotten_while_its_successor_is_saved_is_not_replaced(
    agent: Agent, account: ScriptedAccount, time: FakeTime, backend: MemoryKeyring
) -> None:
    """A persisted key's successor is saved to the keyring before it replaces the key; if
    the key is forgotten meanwhile, the successor goes from the keyring and the service."""
    old = create(agent, keep=True, persist=True)
    old_secret = account.keys[-1]
    held_work, ended = rotating(agent, time, old["key_id"])
    held_work.end(held_work.held[0])  # the service makes the successor
    (saving,) = held_work.held  # its keyring record, before the old key is replaced
    run(agent, "forget", key_id=old["key_id"], persist=True)
    held_work.end(saving)
    while held_work.held:  # the successor's record deleted again
        held_work.end(held_work.held[0])
    ((_result, error),) = ended
    assert isinstance(error, errors.NotFound)
    assert "forgotten or expired while it was rotated" in error.message
    assert keyring_ids(backend) == set()
    assert run(agent, "list")["keys"] == []
    assert account.keys == [ADDED, old_secret]


def test_a_successor_the_agent_holds_already_is_refused_before_the_keyring_sees_it(
    agent: Agent, account: ScriptedAccount, backend: MemoryKeyring
) -> None:
    """A service that answers a persisted key's rotation with another key the agent holds
    is broken or hostile: the rotation fails with remote_error and nothing changes, in
    memory or in the keyring, where the other key's record (its rules) is not overwritten."""
    old = create(agent, persist=True)
    other = create(agent, persist=True, confirm=True)
    other_secret = account.keys[-1]
    records = dict(backend.entries())
    account.issue = [other_secret]
    error = fails(agent, "rotate", key_id=old["key_id"])
    assert error.code == "remote_error"
    assert "answered create with a key the agent holds already" in error.message
    assert backend.entries() == records
    listed = {key["key_id"]: key for key in run(agent, "list")["keys"]}
    assert set(listed) == {old["key_id"], other["key_id"]}
    assert listed[other["key_id"]]["confirm"] is True


def test_a_create_answered_with_a_key_the_agent_holds_changes_nothing(
    agent: Agent, account: ScriptedAccount, backend: MemoryKeyring
) -> None:
    """create answered with a key the agent holds for the same account is remote_error:
    taken as new, the key would be merged into the held one (its rules), and a keyring
    failure after would delete the user's key on the service."""
    held = create(agent, persist=True, confirm=True)
    held_secret = account.keys[-1]
    account.issue = [held_secret]
    backend.locked = True  # the save that would fail, and undo the create
    error = fails(agent, "create", **ACCOUNT, persist=True)
    backend.locked = False
    assert error.code == "remote_error"
    assert "answered create with a key the agent holds already" in error.message
    (listed,) = run(agent, "list")["keys"]
    assert (listed["key_id"], listed["confirm"]) == (held["key_id"], True)
    assert held_secret in account.keys  # not deleted on the service
    assert keyring_ids(backend) == {digest_of(held_secret)}


def test_a_create_answered_with_a_key_the_agent_is_deleting_is_refused(
    agent: Agent, account: ScriptedAccount
) -> None:
    """A key forgotten with its deletion on the service still pending must not come back
    as a new key: the background deletion would revoke it later, while get hands it out."""
    made = create(agent, lifetime=3600)
    secret = account.keys[-1]
    account.delete_errors = [down()]
    run(agent, "forget", key_id=made["key_id"])
    assert secret in account.keys  # its deletion failed: pending, retried later
    account.issue = [secret]
    error = fails(agent, "create", **ACCOUNT)
    assert error.code == "remote_error"
    assert "a key the agent is deleting" in error.message
    assert run(agent, "list")["keys"] == []
