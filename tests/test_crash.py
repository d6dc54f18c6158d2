"""Nothing is lost across a crash, at the agent's level on a fake clock: persisted ephemeral
keys keep their flag and are deleted on the service (then in the keyring) even when they
expired while the agent was down; the leftovers file names every ephemeral key only memory
holds, and the next agent deletes those it does not hold again."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from keyring import errors as errors_keyring

from keyagent import errors
from keyagent.agent import FIRST_RETRY, LEFTOVERS_RETRY, RETRY_DELETION_FOR, Agent
from keyagent.leftovers import Leftover, LeftoversFile
from keyagent.persist import KeyringStore, PersistedKey
from keyagent.store import digest_of, key_id_for
from keyagent.testing.memory_keyring import MemoryKeyring

from .fakes import WALL, FakeAccount, FakeTime, HeldWorkDriver, driver_for, fails, run

HOST, USER = "app.conduce.com", "ada@example.com"
ACCOUNT = {"host": HOST, "user": USER}
KEPT = "kept-key-0000-abcdefgh"
"""A key of the account that is not ephemeral: credentials an agent can restart with."""


@pytest.fixture
def time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def account() -> FakeAccount:
    return FakeAccount(keys=[KEPT])


@pytest.fixture
def backend() -> MemoryKeyring:
    return MemoryKeyring()


@pytest.fixture
def leftovers_path(tmp_path: Path) -> str:
    return str(tmp_path / "state" / "keyagent" / "leftovers-test.json")


def make_agent(
    time: FakeTime, account: FakeAccount, backend: MemoryKeyring, leftovers_path: str
) -> Agent:
    """An agent as core.serve makes one: keyring, leftovers file; no jitter."""
    return Agent(
        clock=time.clock(), accounts=lambda host, user: account, jitter=lambda d: d,
        keyring=KeyringStore(backend), leftovers=LeftoversFile(leftovers_path),
    )  # fmt: skip


@pytest.fixture
def agent(
    time: FakeTime, account: FakeAccount, backend: MemoryKeyring, leftovers_path: str
) -> Agent:
    return make_agent(time, account, backend, leftovers_path)


def restart(
    time: FakeTime, account: FakeAccount, backend: MemoryKeyring, leftovers_path: str
) -> Agent:
    """A new agent started as core.serve starts one after the old one was killed: the keyring
    restored first, then the leftovers file adopted; then a driver serves it."""
    agent = make_agent(time, account, backend, leftovers_path)
    keys, _ = KeyringStore(backend).load_all(time.wall)
    agent.restore(keys)
    assert agent.leftovers is not None
    agent.adopt_leftovers(agent.leftovers.read())
    driver_for(agent)
    return agent


def login(agent: Agent) -> None:
    run(agent, "login", **ACCOUNT, password="pw")


def create(agent: Agent, **args: Any) -> str:
    """create logged in, then log out (so only held keys are credentials); the new secret."""
    login(agent)
    run(agent, "create", **ACCOUNT, **args)
    run(agent, "logout", **ACCOUNT)
    account = agent.sessions[(HOST, USER)].account
    assert isinstance(account, FakeAccount)
    return account.keys[-1]


def in_file(path: str) -> list[str]:
    """The fingerprints the leftovers file names (none if there is no file)."""
    try:
        document = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return []
    return [entry["fingerprint"] for entry in document["keys"]]


def keyring_ids(backend: MemoryKeyring) -> set[str]:
    return {user.removeprefix("key:") for (_, user) in backend.entries() if user.startswith("key:")}


def entry(backend: MemoryKeyring, secret: str) -> dict[str, Any]:
    raw = backend.entries()[("keyagent", f"key:{digest_of(secret)}")]
    document: dict[str, Any] = json.loads(raw)
    return document


# --- persisted ephemeral keys -----------------------------------------------------------------


def test_a_persisted_ephemeral_key_comes_back_ephemeral_with_its_expiry(
    agent: Agent, time: FakeTime, account: FakeAccount, backend: MemoryKeyring,
    leftovers_path: str,
) -> None:  # fmt: skip
    """create --persist of an ephemeral key stores the flag in the keyring; a restarted agent
    holds it as ephemeral with its original expiry, and deletes it on the service then."""
    secret = create(agent, lifetime=3600, persist=True)
    assert entry(backend, secret)["ephemeral"] is True
    (listed,) = [k for k in run(agent, "list")["keys"] if k["fingerprint"] == digest_of(secret)]
    time.advance(600)
    again = restart(time, account, backend, leftovers_path)
    (restored,) = run(again, "list")["keys"]
    assert restored["ephemeral"] is True
    assert restored["expires"] == listed["expires"]
    assert again.held_keys.holding(digest_of(secret)).ephemeral is True  # type: ignore[union-attr]
    time.advance(3000)
    again.reap()
    assert secret not in account.keys
    assert keyring_ids(backend) == set()


def test_records_without_the_flag_read_as_not_ephemeral(backend: MemoryKeyring) -> None:
    """A keyring entry written before the flag existed loads as not ephemeral; a flag that is
    not a boolean makes the entry unreadable (it is skipped and kept, as corrupt entries are)."""
    store = KeyringStore(backend)
    old = PersistedKey(digest_of("old-key-0000-abcdef"), HOST, USER, "old-key-0000-abcdef", "",
                       None, None)  # fmt: skip
    store.save(old)
    assert "ephemeral" not in backend.entries()[("keyagent", f"key:{old.digest}")]
    bad = old._replace(digest=digest_of("bad-key-0000-abcdef"), secret="bad-key-0000-abcdef")
    store.save(bad)
    key = f"key:{bad.digest}"
    document = json.loads(backend.entries()[("keyagent", key)])
    backend.put("keyagent", key, json.dumps({**document, "ephemeral": "yes"}))
    live, _ = store.load_all(WALL)
    assert [(k.digest, k.ephemeral) for k in live] == [(old.digest, False)]
    assert keyring_ids(backend) == {old.digest, bad.digest}


def test_load_all_hands_back_expired_ephemeral_keys_and_deletes_the_others(
    backend: MemoryKeyring,
) -> None:
    """At start an expired non-ephemeral key is deleted from the keyring as before; an expired
    ephemeral one is handed back (with its secret, for the service) and stays in the keyring."""
    store = KeyringStore(backend)
    plain = PersistedKey(
        digest_of("plain-key-000-abcdef"), HOST, USER, "plain-key-000-abcdef", "", None, WALL - 1
    )
    ephemeral = plain._replace(
        digest=digest_of("ephem-key-000-abcdef"), secret="ephem-key-000-abcdef", ephemeral=True
    )
    store.save(plain)
    store.save(ephemeral)
    live, expired = store.load_all(WALL)
    assert live == [ephemeral]
    assert expired == [plain.digest]
    assert keyring_ids(backend) == {ephemeral.digest}


def test_an_ephemeral_key_that_expired_while_the_agent_was_down_is_deleted_at_start(
    agent: Agent, time: FakeTime, account: FakeAccount, backend: MemoryKeyring,
    leftovers_path: str,
) -> None:  # fmt: skip
    """A persisted ephemeral key whose expiry passed while no agent ran is not held at the next
    start but deleted on the service at once, with itself; then its keyring entry goes."""
    secret = create(agent, lifetime=60, persist=True)
    time.advance(3600)  # the agent was down meanwhile
    again = restart(time, account, backend, leftovers_path)
    assert secret not in account.keys
    assert ("delete", secret) in account.calls  # no session, no other key: the key itself
    assert run(again, "list")["keys"] == []
    assert keyring_ids(backend) == set()
    assert again.pending_deletions == {}


def test_the_keyring_entry_outlives_a_failing_deletion(
    agent: Agent, time: FakeTime, account: FakeAccount, backend: MemoryKeyring,
    leftovers_path: str,
) -> None:  # fmt: skip
    """While the service refuses the deletion of an expired persisted ephemeral key (at start
    or at expiry while running), its keyring entry stays, so a crash meanwhile loses nothing;
    once the service deletes it, the entry goes."""
    secret = create(agent, lifetime=60, persist=True)
    account.failures = [errors.RemoteError("the service answered 503")] * 3
    time.advance(60)
    agent.reap()
    assert digest_of(secret) in keyring_ids(backend)
    assert digest_of(secret) in agent.pending_deletions
    assert digest_of(secret) not in in_file(leftovers_path)  # the keyring holds it
    # The agent is killed here; the next one tries again, and fails twice more.
    account.failures = [errors.RemoteError("the service answered 503")] * 2
    again = restart(time, account, backend, leftovers_path)
    assert secret in account.keys
    assert digest_of(secret) in keyring_ids(backend)
    (pending,) = run(again, "status")["pending_deletions"]
    assert pending["key_id"] == key_id_for(secret)
    driver_for(again).pass_time(FIRST_RETRY * 3)
    assert secret not in account.keys
    assert keyring_ids(backend) == set()


def test_a_key_already_gone_from_the_service_leaves_the_keyring_too(
    agent: Agent, time: FakeTime, account: FakeAccount, backend: MemoryKeyring,
    leftovers_path: str,
) -> None:  # fmt: skip
    """An expired persisted ephemeral key that someone deleted on the service meanwhile counts
    as deleted: its keyring entry is deleted at the next start."""
    secret = create(agent, lifetime=60, persist=True)
    account.keys.remove(secret)
    time.advance(120)
    restart(time, account, backend, leftovers_path)
    assert keyring_ids(backend) == set()


def test_an_expired_non_ephemeral_key_is_only_deleted_from_the_keyring(
    agent: Agent, time: FakeTime, account: FakeAccount, backend: MemoryKeyring,
    leftovers_path: str,
) -> None:  # fmt: skip
    """A persisted key created with keep stays on the service when it expires while the agent
    is down; only its keyring entry goes, as before."""
    secret = create(agent, lifetime=60, persist=True, keep=True)
    time.advance(120)
    restart(time, account, backend, leftovers_path)
    assert secret in account.keys
    assert keyring_ids(backend) == set()


# --- the leftovers file -------------------------------------------------------------------------


def test_create_records_an_ephemeral_key_before_it_replies(
    agent: Agent, account: FakeAccount, leftovers_path: str
) -> None:
    """The leftovers file names a new ephemeral key by the time create has replied (the inline
    driver ends the handler only after its last effect); no secret, only id, account, expiry."""
    login(agent)
    listing = run(agent, "create", **ACCOUNT, lifetime=60)
    secret = account.keys[-1]
    assert in_file(leftovers_path) == [digest_of(secret)]
    text = Path(leftovers_path).read_text()
    assert secret not in text
    (recorded,) = json.loads(text)["keys"]
    assert recorded == {
        "fingerprint": digest_of(secret), "host": HOST, "user": USER, "expires": WALL + 60,
    }  # fmt: skip
    assert listing["key_id"] == key_id_for(secret)


def test_the_file_follows_the_set_of_ephemeral_keys_only_memory_holds(
    agent: Agent, time: FakeTime, account: FakeAccount, leftovers_path: str
) -> None:
    """Kept and persisted keys are never in the file; a key leaves it when forget --local
    drops it, or once its deletion on the service has ended; with none left the file goes."""
    first = create(agent, lifetime=60)
    second = create(agent, lifetime=600)
    create(agent, lifetime=60, keep=True)
    create(agent, lifetime=60, persist=True)
    assert in_file(leftovers_path) == sorted([digest_of(first), digest_of(second)])
    account.failures = [errors.RemoteError("the service answered 503")]
    time.advance(60)
    agent.reap()  # first fails once: still in the file while its deletion is pending
    assert digest_of(first) in agent.pending_deletions
    assert in_file(leftovers_path) == sorted([digest_of(first), digest_of(second)])
    driver_for(agent).pass_time(FIRST_RETRY)
    assert first not in account.keys
    assert in_file(leftovers_path) == [digest_of(second)]
    run(agent, "forget", key_id=digest_of(second), local=True)
    assert not Path(leftovers_path).exists()
    assert second in account.keys  # forget --local keeps it there, and forgets it here


def test_a_key_forgotten_from_the_keyring_joins_the_file_while_deleted(
    agent: Agent, time: FakeTime, account: FakeAccount, backend: MemoryKeyring,
    leftovers_path: str,
) -> None:  # fmt: skip
    """forget --persist of a persisted ephemeral key drops its keyring entry first; while its
    deletion on the service is pending, the leftovers file names it instead, so an agent
    killed then leaves it to the next one."""
    secret = create(agent, lifetime=600, persist=True)
    assert in_file(leftovers_path) == []
    account.failures = [errors.RemoteError("the service answered 503")]
    run(agent, "forget", key_id=digest_of(secret), persist=True)
    assert keyring_ids(backend) == set()
    assert digest_of(secret) in agent.pending_deletions
    assert in_file(leftovers_path) == [digest_of(secret)]
    again = restart(time, account, backend, leftovers_path)
    login(again)
    assert secret not in account.keys
    assert in_file(leftovers_path) == []


def test_a_killed_agents_key_is_deleted_with_a_held_key_of_the_account(
    agent: Agent, time: FakeTime, account: FakeAccount, backend: MemoryKeyring,
    leftovers_path: str,
) -> None:  # fmt: skip
    """After a SIGKILL (the old agent simply stops), the next agent finds the non-persisted
    ephemeral key in apikeys/list by its fingerprint and deletes it with a key it restored
    from the keyring; the entry then leaves the file."""
    run(agent, "add", **ACCOUNT, key=KEPT, persist=True)
    secret = create(agent, lifetime=3600)
    account.calls.clear()
    again = restart(time, account, backend, leftovers_path)
    assert secret not in account.keys
    assert account.calls == [("list", KEPT), ("delete", KEPT)]
    assert again.orphans == {}
    assert in_file(leftovers_path) == []
    assert [k["fingerprint"] for k in run(again, "list")["keys"]] == [digest_of(KEPT)]


def test_without_credentials_the_leftover_waits_for_the_next_login(
    agent: Agent, time: FakeTime, account: FakeAccount, backend: MemoryKeyring,
    leftovers_path: str,
) -> None:  # fmt: skip
    """With no key of the account and no session, a left-over key waits (status shows it) and
    stays in the file; the next login of that account deletes it."""
    secret = create(agent, lifetime=3600)
    account.calls.clear()
    again = restart(time, account, backend, leftovers_path)
    assert account.calls == []  # nothing to authenticate with: no call at all
    (pending,) = run(again, "status")["pending_deletions"]
    assert pending["key_id"] == key_id_for(secret)
    assert (pending["left_over"], pending["waiting_for_login"]) == (True, True)
    assert in_file(leftovers_path) == [digest_of(secret)]
    login(again)
    assert secret not in account.keys
    assert run(again, "status")["pending_deletions"] == []
    assert in_file(leftovers_path) == []


def test_a_leftover_absent_from_the_service_leaves_the_file(
    agent: Agent, time: FakeTime, account: FakeAccount, backend: MemoryKeyring,
    leftovers_path: str,
) -> None:  # fmt: skip
    """A left-over key the account's list does not have (deleted by someone) is done: no
    delete call, and it leaves the file."""
    secret = create(agent, lifetime=3600)
    account.keys.remove(secret)
    again = restart(time, account, backend, leftovers_path)
    login(again)
    assert ("delete", None) not in account.calls
    assert again.orphans == {}
    assert in_file(leftovers_path) == []


def test_a_leftover_is_retried_with_backoff_and_given_up_after_a_day(
    agent: Agent, time: FakeTime, account: FakeAccount, backend: MemoryKeyring,
    leftovers_path: str,
) -> None:  # fmt: skip
    """A left-over key whose deletion fails is retried with backoff, shown as a pending
    deletion by status meanwhile; one that keeps failing is given up (leaving the file)
    after 24 h."""
    run(agent, "add", **ACCOUNT, key=KEPT, persist=True)
    secret = create(agent, lifetime=3600)
    account.failures = [errors.RemoteError("the service answered 503")]
    again = restart(time, account, backend, leftovers_path)
    assert secret in account.keys
    # (Not through run: the inline driver drops background timers when a request ends.)
    (pending,) = again.process_status({})["pending_deletions"]
    assert (pending["attempts"], pending["waiting_for_login"]) == (1, False)
    driver_for(again).pass_time(FIRST_RETRY)
    assert secret not in account.keys
    assert in_file(leftovers_path) == []
    # And one that never succeeds is given up after a day.
    third = create(again, lifetime=3600)
    account.failures = [errors.RemoteError("the service answered 503")] * 100_000
    last = restart(time, account, backend, leftovers_path)
    driver_for(last).pass_time(RETRY_DELETION_FOR - 3600)
    assert in_file(leftovers_path) == [digest_of(third)]
    driver_for(last).pass_time(7200)
    assert last.orphans == {}
    assert in_file(leftovers_path) == []
    assert third in account.keys
    assert [
        (entry.key_id, entry.outcome) for entry in last.audit_log.last() if entry.op == "delete"
    ] == [(key_id_for(third), "remote_error")]


def test_a_key_held_again_is_no_orphan(
    agent: Agent, time: FakeTime, account: FakeAccount, backend: MemoryKeyring,
    leftovers_path: str,
) -> None:  # fmt: skip
    """An entry of the file whose key the keyring gave back (persisted after the file was
    written, before the agent died) is held, not deleted, and leaves the file."""
    secret = create(agent, lifetime=3600, persist=True)
    assert agent.leftovers is not None
    agent.leftovers.write([Leftover(digest_of(secret), HOST, USER, WALL + 3600)])
    again = restart(time, account, backend, leftovers_path)
    assert secret in account.keys
    assert again.orphans == {}
    assert in_file(leftovers_path) == []


def test_a_leftover_of_an_account_the_agent_cannot_track_is_retried(
    time: FakeTime, account: FakeAccount, backend: MemoryKeyring, leftovers_path: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """With every account place taken by logged-in accounts, a left-over key of another
    account is retried later (a warning says why), never an internal error."""
    agent = make_agent(time, account, backend, leftovers_path)
    driver = driver_for(agent)
    for number in range(64):
        run(agent, "login", host=HOST, user=f"user{number}@example.com", password="pw")
    leftover = Leftover(digest_of("lost-key-0000-abcdef"), HOST, USER, WALL + 60)
    assert agent.adopt_leftovers([leftover]) == 1
    (pending,) = agent.process_status({})["pending_deletions"]
    assert (pending["left_over"], pending["waiting_for_login"]) == (True, False)
    assert "already has 64 accounts logged in" in caplog.text
    driver.pass_time(FIRST_RETRY)
    assert agent.orphans[leftover.fingerprint].attempts == 2
    assert in_file(leftovers_path) == [leftover.fingerprint]


# --- rotation meets crash safety --------------------------------------------------------------


def test_a_rotated_ephemeral_key_is_named_in_the_leftovers_file_in_place_of_the_old(
    agent: Agent, account: FakeAccount, leftovers_path: str
) -> None:
    """Rotating an ephemeral key that only memory holds records its successor in the
    leftovers file before the reply, and the old key leaves it once deleted."""
    old = create(agent, lifetime=3600)
    driver_for(agent)
    assert in_file(leftovers_path) == [digest_of(old)]
    rotated = run(agent, "rotate", key_id=key_id_for(old))
    new = account.keys[-1]
    assert rotated["old_deleted"] is True
    assert rotated["key_id"] == key_id_for(new)
    assert in_file(leftovers_path) == [digest_of(new)]
    assert old not in account.keys


def test_a_rotated_persisted_ephemeral_key_comes_back_ephemeral(
    agent: Agent, time: FakeTime, account: FakeAccount, backend: MemoryKeyring,
    leftovers_path: str,
) -> None:  # fmt: skip
    """The keyring record of a rotated persisted ephemeral key keeps the flag, so after a
    restart the successor is still deleted on the service at its expiry."""
    old = create(agent, lifetime=3600, persist=True)
    login(agent)
    run(agent, "rotate", key_id=key_id_for(old))
    new = account.keys[-1]
    assert keyring_ids(backend) == {digest_of(new)}
    assert entry(backend, new)["ephemeral"] is True
    again = restart(time, account, backend, leftovers_path)
    assert again.held_keys.holding(digest_of(new)).ephemeral is True  # type: ignore[union-attr]


def test_rotate_all_includes_created_keys_restored_from_the_keyring(
    agent: Agent, time: FakeTime, account: FakeAccount, backend: MemoryKeyring,
    leftovers_path: str,
) -> None:  # fmt: skip
    """After a restart, rotate --all still rotates the keys the agent created (their keyring
    record has a creation date) and leaves alone a key that add persisted."""
    created = create(agent, persist=True)
    run(agent, "add", **ACCOUNT, key=KEPT, persist=True)
    again = restart(time, account, backend, leftovers_path)
    login(again)
    result = run(again, "rotate", all=True, **ACCOUNT)
    assert [item["old_key_id"] for item in result["rotated"]] == [key_id_for(created)]
    assert result["failed"] == []
    assert created not in account.keys
    assert KEPT in account.keys


class WatchedAccount(FakeAccount):
    """A FakeAccount that calls ``on_delete`` with each key it is asked to delete, before
    deleting it: what was on disk at that moment is what a crash there would leave."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.on_delete: Callable[[str], None] = lambda key: None

    def delete_key(self, key: str, api_key: str | None = None) -> None:
        self.on_delete(key)
        super().delete_key(key, api_key=api_key)


def test_a_rotated_key_is_named_in_the_leftovers_file_while_it_is_deleted(
    time: FakeTime, backend: MemoryKeyring, leftovers_path: str
) -> None:
    """While the old key of a rotation is being deleted on the service, the leftovers file
    names it and its successor, so a crash during that call loses neither; when that call
    fails the key stays named (and pending) for the retry, and leaves the file once deleted."""
    account = WatchedAccount()
    agent = make_agent(time, account, backend, leftovers_path)
    old = create(agent, lifetime=3600)
    driver_for(agent)
    on_disk: list[list[str]] = []  # the file's fingerprints at each delete call
    refusals = [errors.RemoteError("the service answered 503")]  # the rotation's own attempt

    def watch(key: str) -> None:
        on_disk.append(sorted(in_file(leftovers_path)))
        if refusals:
            raise refusals.pop()

    account.on_delete = watch
    rotated = run(agent, "rotate", key_id=key_id_for(old))
    new = account.keys[-1]
    assert rotated["pending_deletion"] is True
    both = sorted([digest_of(old), digest_of(new)])
    assert on_disk == [both, both]  # the rotation's attempt, then the background retry's
    assert old not in account.keys
    assert in_file(leftovers_path) == [digest_of(new)]
    assert run(agent, "status")["pending_deletions"] == []


def test_a_persisted_key_is_rotated_in_the_keyring_before_the_old_one_is_deleted(
    time: FakeTime, backend: MemoryKeyring, leftovers_path: str
) -> None:
    """Rotating a persisted key saves the new key's record before the old key is deleted on
    the service: a crash then brings back the new key, never the dead old one."""
    account = WatchedAccount()
    agent = make_agent(time, account, backend, leftovers_path)
    old = create(agent, persist=True)
    seen: dict[str, set[str]] = {}

    def watch(key: str) -> None:
        seen.setdefault(key, keyring_ids(backend))

    account.on_delete = watch
    login(agent)
    run(agent, "rotate", key_id=key_id_for(old))
    new = account.keys[-1]
    assert digest_of(new) in seen[old]
    assert keyring_ids(backend) == {digest_of(new)}


def test_a_persisted_key_the_keyring_cannot_rotate_stays_as_it_was(
    time: FakeTime, backend: MemoryKeyring, leftovers_path: str
) -> None:
    """When the keyring refuses the new key's record, the rotation is undone: the old key
    stays held, in the keyring and on the service, the new key is deleted there, and a
    restart brings back the old key, which the service still accepts."""
    account = FakeAccount()
    agent = make_agent(time, account, backend, leftovers_path)
    old = create(agent, persist=True)
    login(agent)
    backend.fail_with = errors_keyring.KeyringError("the keyring is read-only")
    error = fails(agent, "rotate", key_id=key_id_for(old))
    backend.fail_with = None
    assert error.code == "keyring_unavailable"
    assert f"key {key_id_for(old)} was not rotated" in error.message
    assert account.keys == [old]  # the new key made, then deleted again
    assert keyring_ids(backend) == {digest_of(old)}
    assert [key["key_id"] for key in run(agent, "list")["keys"]] == [key_id_for(old)]
    assert run(agent, "status")["pending_deletions"] == []
    (entry,) = [e for e in run(agent, "log")["entries"] if e["op"] == "rotate"]
    assert (entry["key_id"], entry["outcome"]) == (key_id_for(old), "keyring_unavailable")
    again = restart(time, account, backend, leftovers_path)
    assert again.held_keys.holding(digest_of(old)) is not None


def test_forgetting_a_persisted_ephemeral_key_deletes_its_keyring_entry_too(
    agent: Agent, time: FakeTime, account: FakeAccount, backend: MemoryKeyring,
    leftovers_path: str,
) -> None:  # fmt: skip
    """forget without --persist (or SIGUSR1's forget of every key) of a persisted ephemeral
    key deletes it on the service and its keyring entry, so a restart does not bring back a
    key the service no longer knows; forget --local leaves both."""
    kept = create(agent, lifetime=3600, persist=True)
    gone = create(agent, lifetime=3600, persist=True)
    run(agent, "forget", key_id=key_id_for(kept), local=True)
    result = run(agent, "forget", key_id=key_id_for(gone))
    assert (result["forgotten"], result["deleting"]) == (1, 1)
    assert gone not in account.keys
    assert kept in account.keys
    assert keyring_ids(backend) == {digest_of(kept)}
    again = restart(time, account, backend, leftovers_path)
    assert again.held_keys.holding(digest_of(gone)) is None


def test_a_stopping_agent_leaves_the_leftovers_file_to_its_successor(
    agent: Agent, account: FakeAccount, leftovers_path: str
) -> None:
    """Once the agent is stopping (its sockets closed, so a new agent may serve the same path
    and own the file), it no longer writes the leftovers file: its deletions at stop never
    overwrite what the new agent recorded there."""
    key = create(agent, lifetime=3600)
    driver_for(agent)
    assert in_file(leftovers_path) == [digest_of(key)]
    # What a new agent holds, written the moment this one closed its sockets (the inline
    # driver deletes the key during begin_stop itself).
    successors = [Leftover("f" * 64, HOST, USER, WALL + 3600)]
    LeftoversFile(leftovers_path).write(successors)
    agent.begin_stop()
    assert agent.deletions_at_stop() == 0
    assert key not in account.keys
    assert LeftoversFile(leftovers_path).read() == successors


def test_a_leftover_added_again_before_its_deletion_is_kept(
    agent: Agent, time: FakeTime, account: FakeAccount, backend: MemoryKeyring,
    leftovers_path: str,
) -> None:  # fmt: skip
    """A left-over key waiting for a login that the user adds to the agent again meanwhile is
    the user's to keep: the login does not delete it, and it leaves the file."""
    secret = create(agent, lifetime=3600)
    again = restart(time, account, backend, leftovers_path)
    assert digest_of(secret) in again.orphans  # waits: no credentials for the account
    run(again, "add", **ACCOUNT, key=secret)
    assert again.orphans == {}  # at once, not at the next login
    assert run(again, "status")["pending_deletions"] == []
    login(again)
    assert secret in account.keys
    assert again.orphans == {}
    assert in_file(leftovers_path) == []


def test_a_leftover_being_deleted_cannot_be_added_meanwhile(
    agent: Agent, time: FakeTime, account: FakeAccount, backend: MemoryKeyring,
    leftovers_path: str,
) -> None:  # fmt: skip
    """While the deletion of a left-over key is under way on the service, adding that key
    is busy (it may be gone in a moment), not held to be deleted under the user's feet."""
    run(agent, "add", **ACCOUNT, key=KEPT, persist=True)
    secret = create(agent, lifetime=3600)
    again = make_agent(time, account, backend, leftovers_path)
    background = HeldWorkDriver(time)
    again.driven_by(background.start_background)
    keys, _ = KeyringStore(backend).load_all(time.wall)
    again.restore(keys)
    assert again.leftovers is not None
    again.adopt_leftovers(again.leftovers.read())
    assert again.orphans[digest_of(secret)].running  # its calls wait in background.held
    refused = fails(again, "add", **ACCOUNT, key=secret)
    assert isinstance(refused, errors.Busy)
    assert "is being deleted on the service right now" in refused.message
    while background.held:
        background.end(background.held[0])
    assert secret not in account.keys
    assert again.held_keys.holding(digest_of(secret)) is None


def test_a_key_added_for_the_account_deletes_its_waiting_leftovers(
    agent: Agent, time: FakeTime, account: FakeAccount, backend: MemoryKeyring,
    leftovers_path: str,
) -> None:  # fmt: skip
    """A left-over key that waits for credentials is deleted as soon as the account has any:
    a key added serves as well as a login. Each such deletion is in the audit log, as the
    agent's own deletions are (op delete, no process)."""
    secret = create(agent, lifetime=3600)
    gone = create(agent, lifetime=3600)
    account.keys.remove(gone)  # deleted on the service by someone meanwhile
    again = restart(time, account, backend, leftovers_path)
    assert set(again.orphans) == {digest_of(secret), digest_of(gone)}
    run(again, "add", **ACCOUNT, key=KEPT)
    assert secret not in account.keys
    assert again.orphans == {}
    assert in_file(leftovers_path) == []
    deletions = {
        (entry.key_id, entry.outcome, entry.host, entry.user, entry.pid)
        for entry in again.audit_log.last()
        if entry.op == "delete"
    }
    assert deletions == {
        (key_id_for(secret), "ok", HOST, USER, None),
        (key_id_for(gone), "not_found", HOST, USER, None),
    }


class FailingLeftovers(LeftoversFile):
    """A leftovers file whose next ``failures`` writes fail (a full disk, say)."""

    def __init__(self, path: str, failures: int) -> None:
        super().__init__(path)
        self.failures = failures

    def write(self, entries: Iterable[Leftover]) -> bool:
        if self.failures:
            self.failures -= 1
            return False
        return super().write(entries)


def test_after_a_failed_write_the_next_change_writes_the_whole_file(
    time: FakeTime, account: FakeAccount, backend: MemoryKeyring, leftovers_path: str
) -> None:
    """A write of the leftovers file that fails leaves its content unknown: the next change
    writes the file again, even one after which the same keys are to be named."""
    agent = Agent(
        clock=time.clock(), accounts=lambda host, user: account, jitter=lambda d: d,
        keyring=KeyringStore(backend), leftovers=FailingLeftovers(leftovers_path, 1),
    )  # fmt: skip
    first = create(agent, lifetime=3600)
    assert in_file(leftovers_path) == []  # its write failed
    run(agent, "add", **ACCOUNT, key=KEPT)
    run(agent, "forget", key_id=key_id_for(KEPT))  # a change that leaves the same keys to name
    assert in_file(leftovers_path) == [digest_of(first)]


def test_a_failed_write_of_the_leftovers_file_is_retried_with_a_growing_wait(
    time: FakeTime, account: FakeAccount, backend: MemoryKeyring, leftovers_path: str
) -> None:
    """With no change to come, a failed write of the leftovers file is tried again after
    LEFTOVERS_RETRY seconds, then twice that, until one succeeds."""
    leftovers = FailingLeftovers(leftovers_path, 2)
    agent = Agent(
        clock=time.clock(), accounts=lambda host, user: account, jitter=lambda d: d,
        keyring=KeyringStore(backend), leftovers=leftovers,
    )  # fmt: skip
    key = create(agent, lifetime=3600)
    driver = driver_for(agent)
    assert in_file(leftovers_path) == []
    driver.pass_time(LEFTOVERS_RETRY)
    assert (leftovers.failures, in_file(leftovers_path)) == (0, [])  # the retry failed too
    driver.pass_time(2 * LEFTOVERS_RETRY - 1)
    assert in_file(leftovers_path) == []
    driver.pass_time(1)
    assert in_file(leftovers_path) == [digest_of(key)]
