"""The agent's use of the OS keyring, against the in-memory backend from keyagent.testing."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from keyagent import errors
from keyagent.agent import Agent, Stop
from keyagent.effects import MAX_QUEUED, Work
from keyagent.persist import KeyringStore
from keyagent.store import digest_of, key_id_for
from keyagent.testing.memory_keyring import MemoryKeyring

from .fakes import PEER, FakeAccount, FakeTime, HeldWorkDriver, driver_for, request, run, steps

SECRET = "persisted-S3CR3T-0000"


@pytest.fixture
def backend() -> MemoryKeyring:
    return MemoryKeyring()


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def agent(backend: MemoryKeyring, fake_time: FakeTime) -> Agent:
    return Agent(clock=fake_time.clock(), keyring=KeyringStore(backend))


def drain_background(agent: Agent) -> None:
    """Run the background work the agent has started: an agent with an inline driver runs
    it at once; one without (restored, not yet served) gets its driver now."""
    driver_for(agent)


def keyring_ids(backend: MemoryKeyring) -> set[str]:
    return {user.removeprefix("key:") for (_, user) in backend.entries() if user.startswith("key:")}


def test_add_with_persist_writes_the_keyring_then_holds(
    agent: Agent, backend: MemoryKeyring
) -> None:
    """add persist: true stores the key in the keyring and lists it as persisted."""
    listed = run(agent, "add", host="h", user="u", key=SECRET, persist=True)
    assert listed["persisted"] is True
    assert keyring_ids(backend) == {digest_of(SECRET)}


def test_add_without_persist_touches_no_keyring(agent: Agent, backend: MemoryKeyring) -> None:
    """Without persist, nothing reaches the keyring."""
    assert run(agent, "add", host="h", user="u", key=SECRET)["persisted"] is False
    assert backend.calls == []


def test_default_persist_applies_unless_the_request_says_otherwise(
    backend: MemoryKeyring, fake_time: FakeTime
) -> None:
    """An agent configured to persist does so by default; persist: false opts out."""
    agent = Agent(clock=fake_time.clock(), keyring=KeyringStore(backend), default_persist=True)
    assert run(agent, "add", host="h", user="u", key=SECRET)["persisted"] is True
    assert (
        run(agent, "add", host="h", user="u", key="other-key", persist=False)["persisted"] is False
    )
    assert keyring_ids(backend) == {digest_of(SECRET)}


def test_locked_keyring_fails_the_request_and_changes_nothing(
    agent: Agent, backend: MemoryKeyring
) -> None:
    """A locked keyring makes add --persist fail with keyring_unavailable; nothing is held."""
    backend.locked = True
    with pytest.raises(errors.KeyringUnavailable) as caught:
        run(agent, "add", host="h", user="u", key=SECRET, persist=True)
    assert "unlock" in caught.value.message
    assert SECRET not in caught.value.message
    assert run(agent, "list")["keys"] == []
    assert run(agent, "add", host="h", user="u", key=SECRET)["key_id"] == key_id_for(SECRET)


def test_agent_without_keyring_refuses_persist() -> None:
    """An agent started with --no-keyring answers keyring_unavailable to persist requests."""
    agent = Agent()
    with pytest.raises(errors.KeyringUnavailable):
        run(agent, "add", host="h", user="u", key=SECRET, persist=True)


def test_forget_with_persist_deletes_keyring_then_memory(
    agent: Agent, backend: MemoryKeyring
) -> None:
    """forget persist: true deletes the keyring entry and the held key."""
    run(agent, "add", host="h", user="u", key=SECRET, persist=True)
    result = run(agent, "forget", key_id=key_id_for(SECRET), persist=True)
    assert (result["forgotten"], result["unpersisted"]) == (1, 1)
    assert keyring_ids(backend) == set()


def test_plain_forget_keeps_the_keyring_copy(agent: Agent, backend: MemoryKeyring) -> None:
    """forget without persist drops the key from memory only; a full id can unpersist later."""
    run(agent, "add", host="h", user="u", key=SECRET, persist=True)
    run(agent, "forget", key_id=key_id_for(SECRET))
    assert keyring_ids(backend) == {digest_of(SECRET)}
    later = run(agent, "forget", key_id=digest_of(SECRET), persist=True)
    assert (later["forgotten"], later["unpersisted"]) == (0, 1)
    assert keyring_ids(backend) == set()


def test_forget_with_persist_of_a_fingerprint_that_names_nothing_is_not_found(
    agent: Agent, backend: MemoryKeyring
) -> None:
    """A full fingerprint that is neither held nor kept in the keyring is not_found (the
    user mistyped it), where one with only a keyring entry deletes the entry."""
    with pytest.raises(errors.NotFound, match="no key abababababab is held or kept in the OS"):
        run(agent, "forget", key_id="ab" * 32, persist=True)
    run(agent, "add", host="h", user="u", key=SECRET, persist=True)
    run(agent, "forget", key_id=key_id_for(SECRET))  # from memory only: the keyring keeps it
    result = run(agent, "forget", key_id=digest_of(SECRET), persist=True)
    assert (result["forgotten"], result["unpersisted"]) == (0, 1)
    assert keyring_ids(backend) == set()


def test_forget_all_with_persist_empties_the_keyring(agent: Agent, backend: MemoryKeyring) -> None:
    """forget all with persist removes every persisted key from the keyring."""
    for n in range(3):
        run(agent, "add", host="h", user="u", key=f"{SECRET}-{n}", persist=True)
    assert run(agent, "forget", all=True, persist=True)["unpersisted"] == 3
    assert backend.entries() == {}


def test_expired_persisted_key_is_deleted_from_the_keyring(
    agent: Agent, backend: MemoryKeyring, fake_time: FakeTime
) -> None:
    """When a persisted key's lifetime ends, the agent deletes its keyring entry too."""
    run(agent, "add", host="h", user="u", key=SECRET, persist=True, lifetime=60)
    fake_time.advance(59)
    agent.reap()
    assert keyring_ids(backend) == {digest_of(SECRET)}
    fake_time.advance(2)
    agent.reap()
    assert keyring_ids(backend) == set()


def test_restore_holds_persisted_keys_with_their_remaining_lifetime(
    backend: MemoryKeyring, fake_time: FakeTime
) -> None:
    """A new agent restores persisted keys as source 'keyring' with the time they had left."""
    first = Agent(clock=fake_time.clock(), keyring=KeyringStore(backend))
    run(first, "add", host="h", user="u", key=SECRET, persist=True, lifetime=100)
    run(first, "add", host="h", user="u", key="forever-key", persist=True)
    fake_time.advance(40)
    second = Agent(clock=fake_time.clock(), keyring=KeyringStore(backend))
    live, expired = KeyringStore(backend).load_all(fake_time.clock().wall())
    assert expired == []
    assert second.restore(live) == 2
    keys = {k["key_id"]: k for k in run(second, "list")["keys"]}
    restored = keys[key_id_for(SECRET)]
    assert (restored["source"], restored["persisted"]) == ("keyring", True)
    fake_time.advance(59)
    assert run(second, "get", key_id=key_id_for(SECRET))["key"] == SECRET
    fake_time.advance(2)
    with pytest.raises(errors.NotFound):
        run(second, "get", key_id=key_id_for(SECRET))


def test_keyring_work_has_a_deadline(agent: Agent) -> None:
    """A keyring call is Work on the keyring queue with the keyring deadline, whose timeout
    error names the fix."""
    work = next(steps(agent, "add", host="h", user="u", key=SECRET, persist=True))
    assert isinstance(work, Work)
    assert (work.queue, work.timeout) == ("keyring", agent.keyring_timeout)
    assert work.timeout_error is not None
    assert "unlock" in work.timeout_error().message


# --- keyring work that ends after its deadline ------------------------------------------------


@pytest.fixture
def held_work(agent: Agent, fake_time: FakeTime) -> HeldWorkDriver:
    """A driver for ``agent`` whose work waits until the test ends it."""
    driver = HeldWorkDriver(fake_time)
    agent.driven_by(driver.start_background)
    return driver


def start(
    driver: HeldWorkDriver, agent: Agent, op: str, **args: Any
) -> list[errors.KeyagentError | None]:
    """Start a request; the list gets its error (None for a result) when it has ended."""
    answers: list[errors.KeyagentError | None] = []
    driver.start(steps(agent, op, **args), lambda _result, error: answers.append(error))
    return answers


def test_a_save_ending_after_its_deadline_is_undone(
    agent: Agent, backend: MemoryKeyring, held_work: HeldWorkDriver
) -> None:
    """add --persist whose keyring save outlasts the deadline is answered keyring_unavailable;
    when the save does complete, its entry is deleted and the key is not held."""
    answers = start(held_work, agent, "add", host="h", user="u", key=SECRET, persist=True)
    held_work.pass_time(agent.keyring_timeout)
    [error] = answers
    assert isinstance(error, errors.KeyringUnavailable)
    assert "did not answer within" in error.message
    [save] = held_work.held
    held_work.end(save)  # the save completes after all, and a delete queues behind it
    assert keyring_ids(backend) == {digest_of(SECRET)}
    [delete] = held_work.held
    held_work.end(delete)
    assert keyring_ids(backend) == set()
    assert len(agent.held_keys) == 0
    assert answers == [error]  # answered once


def test_a_forget_ending_after_its_deadline_is_followed_in_memory(
    agent: Agent, backend: MemoryKeyring, held_work: HeldWorkDriver
) -> None:
    """forget --persist whose keyring delete outlasts the deadline is answered with the
    timeout; when the delete does complete, the key is forgotten from memory too."""
    driver = held_work
    add = start(driver, agent, "add", host="h", user="u", key=SECRET, persist=True)
    driver.end(driver.held[0])
    assert add == [None]
    answers = start(driver, agent, "forget", key_id=key_id_for(SECRET), persist=True)
    driver.pass_time(agent.keyring_timeout)
    assert isinstance(answers[0], errors.KeyringUnavailable)
    assert len(agent.held_keys) == 1
    driver.end(driver.held[0])
    assert keyring_ids(backend) == set()
    assert len(agent.held_keys) == 0


def test_a_save_failing_after_its_deadline_changes_nothing_more(
    agent: Agent, backend: MemoryKeyring, held_work: HeldWorkDriver
) -> None:
    """A keyring save that fails after its deadline leaves nothing to undo: no delete runs."""
    answers = start(held_work, agent, "add", host="h", user="u", key=SECRET, persist=True)
    held_work.pass_time(agent.keyring_timeout)
    assert isinstance(answers[0], errors.KeyringUnavailable)
    backend.locked = True
    held_work.end(held_work.held[0])
    assert held_work.held == []
    assert backend.entries() == {}


def test_remove_deletes_the_keyring_entry_after_the_service(
    backend: MemoryKeyring, fake_time: FakeTime
) -> None:
    """remove of a persisted key deletes it remotely, from memory and from the keyring."""
    account = FakeAccount(keys=[SECRET, "helper-key-0000000000"])
    agent = Agent(
        clock=fake_time.clock(), keyring=KeyringStore(backend), accounts=lambda host, user: account
    )
    run(agent, "add", host="h", user="u", key="helper-key-0000000000")
    run(agent, "add", host="h", user="u", key=SECRET, persist=True)
    run(agent, "remove", key_id=key_id_for(SECRET))
    assert account.keys == ["helper-key-0000000000"]
    assert keyring_ids(backend) == set()


def test_remove_reports_a_keyring_entry_left_behind(
    backend: MemoryKeyring, fake_time: FakeTime
) -> None:
    """If the keyring fails after the remote delete, the error says what remains and the fix."""
    account = FakeAccount(keys=[SECRET, "helper-key-0000000000"])
    agent = Agent(
        clock=fake_time.clock(), keyring=KeyringStore(backend), accounts=lambda host, user: account
    )
    run(agent, "add", host="h", user="u", key="helper-key-0000000000")
    run(agent, "add", host="h", user="u", key=SECRET, persist=True)
    backend.locked = True
    with pytest.raises(errors.KeyringUnavailable) as caught:
        run(agent, "remove", key_id=key_id_for(SECRET))
    assert f"forget --persist {digest_of(SECRET)}" in caught.value.message
    assert account.keys == ["helper-key-0000000000"]


def test_a_created_key_whose_save_ends_late_is_undone(
    backend: MemoryKeyring, fake_time: FakeTime
) -> None:
    """create --persist whose keyring save outlasts the deadline fails, holding nothing, and
    the key is deleted on the service; when the save does complete, its record goes too (a
    restart must not bring back a key the service no longer knows)."""
    account = FakeAccount()
    agent = Agent(
        clock=fake_time.clock(), keyring=KeyringStore(backend), accounts=lambda host, user: account
    )
    driver = HeldWorkDriver(fake_time)
    agent.driven_by(driver.start_background)
    login = start(driver, agent, "login", host="h", user="u", password="pw")
    driver.end(driver.held[0])
    assert login == [None]
    answers = start(driver, agent, "create", host="h", user="u", persist=True)
    driver.end(driver.held[0])  # the remote call
    driver.pass_time(agent.keyring_timeout)
    assert isinstance(answers[0], errors.KeyringUnavailable)
    assert "deletes it on the service and holds nothing" in answers[0].message
    assert run(agent, "list")["keys"] == []
    while driver.held:  # the save completes after all; the deletion and the undo follow
        driver.end(driver.held[0])
    assert account.keys == []
    assert keyring_ids(backend) == set()


def test_create_with_persist_holds_nothing_when_the_keyring_fails(
    backend: MemoryKeyring, fake_time: FakeTime
) -> None:
    """A key asked to be persisted that the keyring refuses is deleted on the service and not
    held: kept on the service (its mark keeps prune away) and gone at stop, it would be
    left valid with nobody to hold it. Without any keyring (--no-keyring) nothing is made."""
    account = FakeAccount()
    agent = Agent(
        clock=fake_time.clock(), keyring=KeyringStore(backend), accounts=lambda host, user: account
    )
    run(agent, "login", host="h", user="u", password="pw")
    backend.locked = True
    with pytest.raises(errors.KeyringUnavailable) as caught:
        run(agent, "create", host="h", user="u", persist=True)
    assert "deletes it on the service and holds nothing" in caught.value.message
    assert run(agent, "list")["keys"] == []
    assert account.keys == []
    backend.locked = False
    unkept = Agent(clock=fake_time.clock(), keyring=None, accounts=lambda host, user: account)
    run(unkept, "login", host="h", user="u", password="pw")
    with pytest.raises(errors.KeyringUnavailable, match="nothing was created"):
        run(unkept, "create", host="h", user="u", persist=True)
    assert account.created == 1
    created = run(agent, "create", host="h", user="u", persist=True)
    assert created["persisted"] is True
    assert keyring_ids(backend) == {digest_of(account.keys[0])}


# --- a lock that survives a restart ----------------------------------------------------------

PASSPHRASE = "lock-S3CR3T-phrase"


def restart(backend: MemoryKeyring, fake_time: FakeTime) -> Agent:
    """A new agent over the same keyring, restored as the serving process does at start."""
    agent = Agent(clock=fake_time.clock(), keyring=KeyringStore(backend))
    store = KeyringStore(backend)
    live, _ = store.load_all(fake_time.clock().wall())
    agent.restore(live, store.load_lock())
    return agent


def test_a_lock_the_keyring_does_not_take_is_locked_but_says_so(
    agent: Agent, backend: MemoryKeyring, fake_time: FakeTime
) -> None:
    """With persisted keys, lock saves the lock in the keyring before it answers. If the
    keyring refuses, the agent is locked all the same, and the reply is keyring_unavailable
    saying a restart could serve the keys unlocked, and what to do; unlock and lock again
    once the keyring works saves it."""
    run(agent, "add", host="h.example", user="u", key=SECRET, persist=True)
    backend.locked = True
    with pytest.raises(errors.KeyringUnavailable) as caught:
        run(agent, "lock", passphrase=PASSPHRASE)
    assert caught.value.message.startswith(
        "the agent is locked, but the OS keyring has not taken the lock, so a restart could "
        "serve the 1 persisted key(s) unlocked ("
    )
    assert caught.value.message.endswith("); fix the keyring, then unlock and lock again")
    assert agent.lock.locked
    with pytest.raises(errors.Locked):
        run(agent, "get", host="h.example")
    backend.locked = False
    assert backend.get_password("keyagent", "lock") is None
    assert run(agent, "unlock", passphrase=PASSPHRASE) == {"locked": False}
    assert run(agent, "lock", passphrase=PASSPHRASE) == {"locked": True}
    assert restart(backend, fake_time).lock.locked


def test_a_lock_whose_save_cannot_even_wait_in_line_says_the_agent_is_locked(
    agent: Agent, held_work: HeldWorkDriver
) -> None:
    """With the keyring's queue full (a keyring that hangs, 64 requests waiting), the lock's
    save is refused before it is tried: the reply still says the agent is locked and that
    the keyring has not taken the lock, never a bare busy."""
    run(agent, "add", host="h.example", user="u", key=SECRET, persist=True)
    for n in range(MAX_QUEUED):
        start(held_work, agent, "add", host="h.example", user="u", key=f"k-{n:02d}-S3CR3T",
              persist=True)  # fmt: skip
    answers = start(held_work, agent, "lock", passphrase=PASSPHRASE)
    while not answers:  # the key derivation is work too: let it run
        held_work.end(held_work.held[-1])
    (error,) = answers
    assert isinstance(error, errors.KeyringUnavailable)
    assert error.message.startswith("the agent is locked, but the OS keyring has not taken")
    assert agent.lock.locked


def test_a_lock_over_persisted_keys_survives_a_restart(
    agent: Agent, backend: MemoryKeyring, fake_time: FakeTime
) -> None:
    """Locked with persisted keys, a restarted agent comes back locked (the keyring holds the
    lock's salted hash, never the passphrase); unlocking clears that record."""
    run(agent, "add", host="h.example", user="u", key=SECRET, persist=True)
    assert run(agent, "lock", passphrase=PASSPHRASE) == {"locked": True}
    drain_background(agent)
    stored = backend.get_password("keyagent", "lock") or ""
    assert PASSPHRASE not in stored
    second = restart(backend, fake_time)
    assert second.lock.locked
    with pytest.raises(errors.Locked):
        run(second, "get", host="h.example")
    assert run(second, "unlock", passphrase=PASSPHRASE) == {"locked": False}
    drain_background(second)
    assert backend.get_password("keyagent", "lock") is None
    assert run(second, "get", host="h.example")["key"] == SECRET
    assert not restart(backend, fake_time).lock.locked


def test_a_lock_over_memory_only_keys_leaves_the_keyring_alone(
    agent: Agent, backend: MemoryKeyring
) -> None:
    """Without persisted keys nothing comes back after a restart, so nothing is stored."""
    run(agent, "add", host="h.example", user="u", key=SECRET)
    run(agent, "lock", passphrase=PASSPHRASE)
    assert backend.calls == []
    assert backend.entries() == {}


def test_a_stored_lock_without_keys_to_guard_is_dropped(
    backend: MemoryKeyring, fake_time: FakeTime
) -> None:
    """A lock record with no persisted key left does not lock a new, empty agent."""
    KeyringStore(backend).save_lock(b"s" * 16, b"d" * 32)
    agent = restart(backend, fake_time)
    assert not agent.lock.locked
    drain_background(agent)
    assert backend.get_password("keyagent", "lock") is None


def test_an_add_waiting_on_the_keyring_holds_off_other_adds_and_lengthens_nothing(
    agent: Agent, backend: MemoryKeyring, held_work: HeldWorkDriver, fake_time: FakeTime
) -> None:
    """While add --persist of a key waits on the keyring, another add of that key (for
    another account, here) is busy, rather than decided on what was true before the wait;
    and the time the save took does not lengthen a held key's life."""
    answers = start(held_work, agent, "add", host="h", user="u", key=SECRET, persist=True)
    with pytest.raises(errors.Busy, match="under way"):
        next(steps(agent, "add", host="h2", user="someone", key=SECRET))
    [save] = held_work.held
    held_work.end(save)
    assert answers == [None]
    (listed,) = run(agent, "list")["keys"]
    assert (listed["host"], listed["user"], listed["persisted"]) == ("h", "u", True)
    run(agent, "forget", all=True, persist=True)

    run(agent, "add", host="h", user="u", key=SECRET, lifetime=60.0)
    deadline = fake_time.monotonic + 60
    answers = start(held_work, agent, "add", host="h", user="u", key=SECRET, persist=True)
    fake_time.advance(30)  # the keyring takes its time
    [save] = held_work.held
    held_work.end(save)
    assert answers == [None]
    held = agent.held_keys.holding(digest_of(SECRET))
    assert held is not None
    assert held.deadline == pytest.approx(deadline)


def test_a_create_still_saving_at_stop_is_waited_for_and_named_if_the_agent_exits_first(
    backend: MemoryKeyring, fake_time: FakeTime, caplog: pytest.LogCaptureFixture
) -> None:
    """A create --persist whose keyring save is under way when stop comes is counted in
    "waiting", not named as staying (its save decides whether it comes back). If the agent
    exits before the save ends, the key (kept on the service: prune leaves it) is named in
    the log with the command that deletes it."""
    account = FakeAccount()
    agent = Agent(
        clock=fake_time.clock(), keyring=KeyringStore(backend), accounts=lambda host, user: account
    )
    driver = HeldWorkDriver(fake_time)
    agent.driven_by(driver.start_background)
    start(driver, agent, "login", host="h", user="u", password="pw")
    driver.end(driver.held[0])
    start(driver, agent, "create", host="h", user="u", persist=True)
    driver.end(driver.held[0])  # the service made the key; its save is held
    (secret,) = account.keys
    stopping = agent.handle(request("stop"), PEER)
    assert stopping == Stop({"stopping": True, "waiting": 1})
    agent.begin_stop()
    with caplog.at_level(logging.ERROR):
        agent.end_stop("not done within stop_timeout, 10 s")
    (line,) = [r.getMessage() for r in caplog.records if key_id_for(secret) in r.getMessage()]
    assert "was being saved to the OS keyring when the agent exited" in line
    assert f"keyagent-ctl remove --host=h --user=u {digest_of(secret)}" in line
