"""Unit tests for keyagent.persist (keys in the OS keyring) and the in-memory test keyring."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import keyring
import pytest
from keyring.backends import fail, null
from keyring.backends.chainer import ChainerBackend
from keyring.errors import InitError, KeyringLocked, NoKeyringError, PasswordDeleteError
from keyring.testing.backend import BackendBasicTests

from keyagent.errors import KeyringUnavailable
from keyagent.persist import KeyringStore, PersistedKey, UnreadableLock
from keyagent.store import digest_of
from keyagent.testing.memory_keyring import MemoryKeyring

SERVICE = "keyagent"
WALL = 1_700_000_000.0  # 2023-11-14T22:13:20Z
SECRET = "zebra-quokka-7781-S3CR3T"
SECRETS = (SECRET, "okapi-narwhal-0042-S3CR3T", "quokka-zebra-0043-S3CR3T")  # keys are ASCII


def make_key(
    secret: str = SECRET,
    *,
    host: str = "app.conduce.com",
    user: str = "ada@example.com",
    description: str = "laptop",
    created: str | None = "2023-11-14T22:13:20Z",
    expires: float | None = None,
) -> PersistedKey:
    return PersistedKey(
        digest=digest_of(secret),
        host=host,
        user=user,
        secret=secret,
        description=description,
        created=created,
        expires=expires,
    )


def index_of(memory: MemoryKeyring) -> dict[str, list[str]]:
    """The decoded index entry, or an empty one if there is none."""
    raw = memory.entries(SERVICE).get((SERVICE, "index"))
    if raw is None:
        return {"keys": [], "pending": []}
    document = json.loads(raw)
    assert document["v"] == 1
    return {"keys": document["keys"], "pending": document.get("pending", [])}


def assert_tidy(memory: MemoryKeyring) -> None:
    """No pending ids, and exactly one entry per indexed key: nothing orphaned."""
    index = index_of(memory)
    assert index["pending"] == []
    usernames = {username for (_, username) in memory.entries(SERVICE)} - {"index"}
    assert usernames == {f"key:{key_id}" for key_id in index["keys"]}


def ids(keys: list[PersistedKey]) -> list[str]:
    return [key.digest for key in keys]


@pytest.fixture(autouse=True)
def no_secret_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Capture every log record at DEBUG and fail the test if one mentions a secret."""
    caplog.set_level(logging.DEBUG)
    yield
    for record in caplog.records:
        text = record.getMessage() + repr(record.args)
        if record.exc_info:
            text += "".join(traceback.format_exception(*record.exc_info))
        for secret in SECRETS:
            assert secret not in text, record


def fail_backend() -> object:
    """keyring's backend that raises NoKeyringError on every call."""
    return fail.Keyring()  # type: ignore[no-untyped-call]  # keyring leaves __init__ unannotated


def null_backend() -> object:
    """keyring's backend that stores nothing (what ``keyring --disable`` selects)."""
    return null.Keyring()  # type: ignore[no-untyped-call]


@pytest.fixture
def memory() -> MemoryKeyring:
    return MemoryKeyring()


@pytest.fixture
def store(memory: MemoryKeyring) -> KeyringStore:
    return KeyringStore(memory)


def assert_clean_error(error: KeyringUnavailable) -> None:
    """One message naming a fix, no secret anywhere, no chained keyring exception shown."""
    rendered = "".join(traceback.format_exception(error))
    for secret in SECRETS:
        assert secret not in rendered
        assert secret not in repr(error)
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__
    assert error.code == "keyring_unavailable"


# --- the in-memory backend -------------------------------------------------------------------


class TestMemoryKeyringContract(BackendBasicTests):
    """keyring's own contract suite for backends, run against MemoryKeyring."""

    def init_keyring(self) -> MemoryKeyring:
        return MemoryKeyring()


def test_memory_keyring_is_never_chosen_by_keyring() -> None:
    """keyring's discovery skips MemoryKeyring, and its priority is below fail's and null's."""
    import keyring.backend

    assert MemoryKeyring not in set(keyring.backend.KeyringBackend.get_viable_backends())
    assert MemoryKeyring.priority < min(fail.Keyring.priority, null.Keyring.priority)


def test_memory_keyring_locked_and_fail_with(memory: MemoryKeyring) -> None:
    """locked raises KeyringLocked and fail_with raises the given exception, on every call."""
    memory.set_password("s", "u", "p")
    memory.locked = True
    calls: list[Callable[[], object]] = [
        lambda: memory.get_password("s", "u"),
        lambda: memory.set_password("s", "u", "q"),
        lambda: memory.delete_password("s", "u"),
    ]
    for call in calls:
        with pytest.raises(KeyringLocked):
            call()
    memory.locked = False
    memory.fail_with = OSError("bus gone")
    with pytest.raises(OSError, match="bus gone"):
        memory.get_password("s", "u")
    memory.fail_with = None
    assert memory.get_password("s", "u") == "p"
    assert ("set", "s", "u") in memory.calls
    assert all("p" not in call[2] for call in memory.calls)


def test_memory_keyring_block_holds_calls_until_set(memory: MemoryKeyring) -> None:
    """A call made while block is an unset Event waits for it, and signals waiting."""
    memory.block = threading.Event()
    finished = threading.Event()

    def writer() -> None:
        memory.set_password("s", "u", "p")
        finished.set()

    thread = threading.Thread(target=writer)
    thread.start()
    assert memory.waiting.wait(10)
    assert not finished.is_set()
    assert memory.entries() == {}
    memory.block.set()
    thread.join(10)
    assert finished.is_set()
    assert memory.entries() == {("s", "u"): "p"}


# --- the store: round trips and the scheme ---------------------------------------------------


def test_persisted_key_repr_hides_the_secret() -> None:
    """repr (and so str) of a PersistedKey shows its id but never its secret."""
    key = make_key()
    assert SECRET not in repr(key)
    assert SECRET not in str(key)
    assert key.digest in repr(key)


def test_round_trip_save_load_delete_delete_all(store: KeyringStore, memory: MemoryKeyring) -> None:
    """Saved keys load back equal and oldest first; delete and delete_all remove them all."""
    first = make_key(SECRETS[0], expires=WALL + 3600)
    second = make_key(SECRETS[1], user="bob@example.com", description="", created=None)
    third = make_key(SECRETS[2], host="eu.conduce.com", description="ünïcode ✓")
    for key in (first, second, third):
        store.save(key)
    assert store.load_all(WALL) == ([first, second, third], [])
    assert KeyringStore(memory).load_all(WALL) == ([first, second, third], [])

    assert store.delete(second.digest) is True
    assert store.delete(second.digest) is False
    assert store.load_all(WALL) == ([first, third], [])
    assert_tidy(memory)

    assert store.delete_all() == 2
    assert store.load_all(WALL) == ([], [])
    assert memory.entries() == {}
    assert store.delete_all() == 0


def test_storage_scheme_is_as_documented(store: KeyringStore, memory: MemoryKeyring) -> None:
    """One compact JSON entry per key under key:<id>, and an index listing the ids."""
    key = make_key(expires=WALL + 60)
    store.save(key)
    entries = memory.entries()
    assert set(entries) == {(SERVICE, f"key:{key.digest}"), (SERVICE, "index")}
    assert json.loads(entries[(SERVICE, f"key:{key.digest}")]) == {
        "v": 1,
        "key": SECRET,
        "host": "app.conduce.com",
        "user": "ada@example.com",
        "description": "laptop",
        "created": "2023-11-14T22:13:20Z",
        "expires": WALL + 60,
    }
    assert " " not in entries[(SERVICE, "index")]
    assert json.loads(entries[(SERVICE, "index")]) == {
        "v": 1,
        "keys": [key.digest],
        "pending": [],
    }


def test_write_order_entry_before_index_and_index_before_delete(
    store: KeyringStore, memory: MemoryKeyring
) -> None:
    """A new key's entry is written before the index lists it; delete unlists before deleting."""
    key = make_key()
    entry = f"key:{key.digest}"
    store.save(key)
    writes = [(op, user) for op, _, user in memory.calls if op != "get"]
    assert writes == [("set", "index"), ("set", entry), ("set", "index")]
    memory.calls.clear()
    store.delete(key.digest)
    writes = [(op, user) for op, _, user in memory.calls if op != "get"]
    assert writes == [("set", "index"), ("delete", entry), ("delete", "index")]


def test_service_name_separates_stores(memory: MemoryKeyring) -> None:
    """Two services on one backend keep separate keys and indexes."""
    KeyringStore(memory, service="keyagent-a").save(make_key(SECRETS[0]))
    KeyringStore(memory, service="keyagent-b").save(make_key(SECRETS[1]))
    live, _ = KeyringStore(memory, service="keyagent-a").load_all(WALL)
    assert ids(live) == [digest_of(SECRETS[0])]
    assert KeyringStore(memory, service="keyagent-a").delete_all() == 1
    live, _ = KeyringStore(memory, service="keyagent-b").load_all(WALL)
    assert ids(live) == [digest_of(SECRETS[1])]


def test_resaving_updates_the_entry_and_moves_it_last(store: KeyringStore) -> None:
    """Saving a persisted key again replaces its metadata and makes it the newest."""
    store.save(make_key(SECRETS[0]))
    store.save(make_key(SECRETS[1]))
    updated = make_key(SECRETS[0], description="renamed", expires=WALL + 10)
    store.save(updated)
    live, _ = store.load_all(WALL)
    assert live == [make_key(SECRETS[1]), updated]


def test_save_rejects_a_key_id_that_does_not_match_the_secret(store: KeyringStore) -> None:
    """A PersistedKey whose id is not its secret's hash is a caller bug: ValueError, no secret."""
    key = make_key()
    forged = PersistedKey(
        digest="0" * 64,
        host=key.host,
        user=key.user,
        secret=key.secret,
        description="",
        created=None,
        expires=None,
    )
    with pytest.raises(ValueError, match="does not match") as caught:
        store.save(forged)
    assert SECRET not in str(caught.value)


def test_delete_of_unknown_or_malformed_ids_touches_nothing(
    store: KeyringStore, memory: MemoryKeyring
) -> None:
    """delete returns False for an id that is not persisted, and writes nothing."""
    store.save(make_key())
    memory.calls.clear()
    assert store.delete(digest_of("not persisted")) is False
    assert store.delete("not-a-key-id") is False
    assert store.delete(digest_of(SECRET)[:6]) is False
    assert [op for op, _, _ in memory.calls if op != "get"] == []


# --- expiry and repairs ----------------------------------------------------------------------


def test_load_deletes_expired_keys_and_returns_their_ids(
    store: KeyringStore, memory: MemoryKeyring
) -> None:
    """Keys whose wall-clock expiry has passed are deleted on load and reported by id."""
    gone = make_key(SECRETS[0], expires=WALL - 1)
    due = make_key(SECRETS[1], expires=WALL)
    alive = make_key(SECRETS[2], expires=WALL + 1)
    forever = make_key("forever-S3CR3T-free", expires=None)
    for key in (gone, due, alive, forever):
        store.save(key)
    live, expired = store.load_all(WALL)
    assert live == [alive, forever]
    assert expired == [gone.digest, due.digest]
    assert_tidy(memory)
    assert index_of(memory)["keys"] == [alive.digest, forever.digest]
    assert store.load_all(WALL + 2) == ([forever], [alive.digest])


def test_index_ids_without_an_entry_are_ignored_and_pruned(
    store: KeyringStore, memory: MemoryKeyring, caplog: pytest.LogCaptureFixture
) -> None:
    """An indexed id with no entry is skipped, logged by id and dropped from the index."""
    kept, lost = make_key(SECRETS[0]), make_key(SECRETS[1])
    store.save(kept)
    store.save(lost)
    memory.delete_password(SERVICE, f"key:{lost.digest}")
    assert store.load_all(WALL) == ([kept], [])
    assert index_of(memory)["keys"] == [kept.digest]
    assert_tidy(memory)
    assert any(lost.digest[:12] in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    "corrupt",
    [
        "{not json",
        "",
        "[]",
        '"a string"',
        json.dumps({"v": 1, "host": "h", "user": "u"}),
        json.dumps({"v": 0, "key": SECRETS[1], "host": "h", "user": "u"}),
        json.dumps({"v": True, "key": SECRETS[1], "host": "h", "user": "u"}),
        json.dumps({"v": 1, "key": SECRETS[1], "host": 7, "user": "u"}),
        json.dumps({"v": 1, "key": SECRETS[1], "host": "h", "user": "u", "expires": "soon"}),
        json.dumps({"v": 1, "key": SECRETS[1], "host": "h", "user": "u", "created": 5}),
        '{"v":1,"key":"' + SECRETS[1] + '","host":"h","user":"u","expires":NaN}',
        json.dumps({"v": 1, "key": "someone else's key", "host": "h", "user": "u"}),
        json.dumps({"v": "2", "key": SECRETS[1], "host": "h", "user": "u"}),
        '{"v":2,"key":"' + SECRETS[1] + '","host":"h","user":"u","exportable":false,'
        '"exportable":true}',
    ],
    ids=[
        "not-json",
        "empty",
        "list",
        "string",
        "no-secret",
        "version-0",
        "version-bool",
        "bad-host",
        "bad-expires",
        "bad-created",
        "nan-expires",
        "wrong-secret",
        "version-string",
        "repeated-member",  # which one wins is the reader's guess: a looser rule, here
    ],
)
def test_corrupt_entries_are_skipped_logged_by_id_and_left_to_forget(
    store: KeyringStore,
    memory: MemoryKeyring,
    caplog: pytest.LogCaptureFixture,
    corrupt: str,
) -> None:
    """An entry that does not parse, or whose secret is not its id's, is skipped with a
    warning naming its id and how to forget it; it stays (it may be the only copy of a
    key), until forgotten."""
    good, bad = make_key(SECRETS[0]), make_key(SECRETS[1])
    store.save(good)
    store.save(bad)
    memory.put(SERVICE, f"key:{bad.digest}", corrupt)
    assert store.load_all(WALL) == ([good], [])
    assert memory.entries()[(SERVICE, f"key:{bad.digest}")] == corrupt
    assert_tidy(memory)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"forget --persist {bad.digest}" in message for message in warnings)
    assert store.delete(bad.digest)
    assert (SERVICE, f"key:{bad.digest}") not in memory.entries()
    assert_tidy(memory)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("host", "h\u2028x"),
        ("host", "app..conduce.com"),
        ("user", "u\u00a0v"),
        ("description", "\x1b]0;owned\x07"),
        ("description", "bidi \u202e"),
        ("created", "2024\x1b[2J"),
    ],
)
def test_entries_with_values_a_client_could_not_send_are_skipped_with_a_warning(
    store: KeyringStore,
    memory: MemoryKeyring,
    caplog: pytest.LogCaptureFixture,
    field: str,
    value: str,
) -> None:
    """A keyring record is outside input: a value the protocol refuses skips that record only,
    with a warning naming the field (never the value), and the other keys still load."""
    good, bad = make_key(SECRETS[0]), make_key(SECRETS[1])
    store.save(good)
    store.save(bad)
    document = json.loads(memory.get_password(SERVICE, f"key:{bad.digest}") or "")
    document[field] = value
    memory.put(SERVICE, f"key:{bad.digest}", json.dumps(document))
    assert store.load_all(WALL) == ([good], [])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(bad.digest[:12] in m and f"invalid {field}" in m for m in warnings)
    assert not any(value in m for m in warnings)
    assert (SERVICE, f"key:{bad.digest}") in memory.entries()  # left for the user to forget


def test_an_unreadable_entry_of_the_old_format_is_named_for_deletion_by_hand(
    store: KeyringStore, memory: MemoryKeyring, caplog: pytest.LogCaptureFixture
) -> None:
    """An entry under a 12-digit name (the old format) that cannot be read is skipped with
    a warning that says how to delete it: forget takes only a full fingerprint for a key
    it does not hold, so the warning names the keyring entry instead."""
    key = make_key(SECRETS[0])
    short = key.digest[:12]
    memory.put(SERVICE, f"key:{short}", "{not json")
    memory.put(SERVICE, "index", json.dumps({"v": 1, "keys": [short], "pending": []}))
    assert store.load_all(WALL) == ([], [])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"delete the entry key:{short} of service {SERVICE}" in m for m in warnings)
    assert not any("forget --persist" in m for m in warnings)
    assert (SERVICE, f"key:{short}") in memory.entries()


def test_entries_named_by_a_short_id_are_renamed_to_the_full_digest(
    store: KeyringStore, memory: MemoryKeyring
) -> None:
    """An entry written under the old 12-digit name loads and is renamed to its full digest."""
    key = make_key(SECRETS[0])
    store.save(key)
    payload = memory.get_password(SERVICE, f"key:{key.digest}") or ""
    memory.delete_password(SERVICE, f"key:{key.digest}")
    memory.put(SERVICE, f"key:{key.digest[:12]}", payload)
    memory.put(SERVICE, "index", json.dumps({"v": 1, "keys": [key.digest[:12]], "pending": []}))
    assert store.load_all(WALL) == ([key], [])
    assert index_of(memory)["keys"] == [key.digest]
    assert (SERVICE, f"key:{key.digest[:12]}") not in memory.entries()
    assert store.delete(key.digest) is True
    assert_tidy(memory)


def test_entries_from_a_newer_keyagent_are_left_alone(
    store: KeyringStore, memory: MemoryKeyring
) -> None:
    """An entry with a newer format version is neither loaded nor pruned; delete_all removes it."""
    current, newer = make_key(SECRETS[0]), make_key(SECRETS[1])
    store.save(current)
    store.save(newer)
    document = {"v": 3, "key": SECRETS[1], "shape": "unknown"}
    memory.put(SERVICE, f"key:{newer.digest}", json.dumps(document))
    assert store.load_all(WALL) == ([current], [])
    assert index_of(memory)["keys"] == [current.digest, newer.digest]
    assert store.delete_all() == 2
    assert memory.entries() == {}


def test_an_index_from_a_newer_keyagent_makes_the_store_unavailable(
    store: KeyringStore, memory: MemoryKeyring
) -> None:
    """A newer index is not overwritten: every operation reports KeyringUnavailable instead."""
    memory.put(SERVICE, "index", json.dumps({"v": 2, "sets": {}}))
    for call in (lambda: store.save(make_key()), lambda: store.load_all(WALL)):
        with pytest.raises(KeyringUnavailable, match="upgrade keyagent"):
            call()
    assert memory.entries()[(SERVICE, "index")] == json.dumps({"v": 2, "sets": {}})


@pytest.mark.parametrize(
    "raw",
    ["{", "[1,2]", '{"v":1,"keys":"abc"}', '{"keys":[]}', "7", "[" * 100_000 + "]" * 100_000],
)
def test_an_unreadable_index_is_kept_and_refused(
    store: KeyringStore, memory: MemoryKeyring, raw: str
) -> None:
    """A corrupt index names keys the store can no longer find: replacing it would leave
    their secrets in the keyring for good, out of every command's reach. So it is neither
    read as empty nor overwritten; every use says what to do, until the user restores or
    deletes it."""
    lost = make_key(SECRETS[1])
    store.save(lost)
    memory.put(SERVICE, "index", raw)
    before = memory.entries()
    uses = [
        lambda: store.load_all(WALL),
        lambda: store.save(make_key()),
        lambda: store.delete(make_key().digest),
        store.fingerprints,
        store.delete_all,
    ]
    for use in uses:
        with pytest.raises(KeyringUnavailable, match="index of service keyagent is unreadable"):
            use()
    assert memory.entries() == before
    memory.delete_password(SERVICE, "index")  # what the message says to do, to start anew
    assert store.load_all(WALL) == ([], [])
    assert store.delete(lost.digest)  # forget --persist FINGERPRINT of an entry left behind
    assert (SERVICE, f"key:{lost.digest}") not in memory.entries()
    store.save(make_key())
    assert store.load_all(WALL) == ([make_key()], [])


def test_a_record_nested_too_deeply_is_skipped_and_the_others_load(
    store: KeyringStore, memory: MemoryKeyring, caplog: pytest.LogCaptureFixture
) -> None:
    """A keyring record that would exhaust the JSON parser's recursion is corrupt like any
    other: skipped with a warning naming it, kept, and the records after it load."""
    first, second = make_key(SECRETS[0]), make_key(SECRETS[1])
    store.save(first)
    store.save(second)
    memory.put(SERVICE, f"key:{first.digest}", '{"v":1,"x":' + "[" * 100_000 + "]" * 100_000 + "}")
    with caplog.at_level(logging.WARNING):
        assert store.load_all(WALL) == ([second], [])
    assert any(first.digest[:12] in m and "unreadable" in m for m in caplog.messages)
    assert (SERVICE, f"key:{first.digest}") in memory.entries()


def test_a_lock_record_nested_too_deeply_is_unreadable(
    store: KeyringStore, memory: MemoryKeyring
) -> None:
    """The lock record is outside input too: nested past the parser's recursion, it is an
    unreadable lock (the agent then starts locked), not a crash of the reader."""
    memory.put(SERVICE, "lock", '{"v":1,"salt":' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(UnreadableLock):
        store.load_lock()


def test_malformed_ids_in_the_index_are_ignored(store: KeyringStore, memory: MemoryKeyring) -> None:
    """Index members that are not 12 lowercase hex characters are skipped without a lookup."""
    key = make_key()
    store.save(key)
    document = {"v": 1, "keys": [key.digest, "../etc", 5, key.digest.upper()], "pending": []}
    memory.put(SERVICE, "index", json.dumps(document))
    memory.calls.clear()
    assert store.load_all(WALL) == ([key], [])
    assert {user for _, _, user in memory.calls} == {"index", f"key:{key.digest}"}


def test_an_id_both_listed_and_pending_is_kept(store: KeyringStore, memory: MemoryKeyring) -> None:
    """If an edited index lists an id as both persisted and pending, the listing wins."""
    key = make_key()
    store.save(key)
    document = {"v": 1, "keys": [key.digest], "pending": [key.digest]}
    memory.put(SERVICE, "index", json.dumps(document))
    assert store.load_all(WALL) == ([key], [])
    assert store.load_all(WALL) == ([key], [])


# --- crash safety ----------------------------------------------------------------------------


class CrashingKeyring(MemoryKeyring):
    """A MemoryKeyring whose writes (set or delete) fail from the ``crash_at``-th one on."""

    def __init__(self) -> None:
        super().__init__()
        self.crash_at: int | None = None
        self.writes = 0

    def _write(self) -> None:
        if self.crash_at is not None and self.writes >= self.crash_at:
            raise RuntimeError("the agent died here")
        self.writes += 1

    def set_password(self, service: str, username: str, password: str) -> None:
        self._write()
        super().set_password(service, username, password)

    def delete_password(self, service: str, username: str) -> None:
        self._write()
        super().delete_password(service, username)


def seed_two(store: KeyringStore) -> None:
    store.save(make_key(SECRETS[0]))
    store.save(make_key(SECRETS[1], expires=WALL + 5))


def seed_with_debris(store: KeyringStore) -> None:
    """Two keys, one expired, a corrupt one and an indexed id without an entry."""
    seed_two(store)
    store.save(make_key(SECRETS[2]))
    store.save(make_key("dangling-S3CR3T-free"))
    backend = store._ready()
    assert isinstance(backend, MemoryKeyring)
    backend.put(SERVICE, f"key:{digest_of(SECRETS[2])}", "{corrupt")
    backend._entries.pop((SERVICE, f"key:{digest_of('dangling-S3CR3T-free')}"))


ID0, ID1 = digest_of(SECRETS[0]), digest_of(SECRETS[1])

CRASH_CASES: dict[str, tuple[Callable[[KeyringStore], object], Callable[[KeyringStore], None]]] = {
    "save-new": (lambda store: store.save(make_key(SECRETS[2])), seed_two),
    "save-first": (lambda store: store.save(make_key(SECRETS[0])), lambda store: None),
    "resave-older": (lambda store: store.save(make_key(SECRETS[0], description="x")), seed_two),
    "delete": (lambda store: store.delete(ID0), seed_two),
    "delete-last": (lambda store: store.delete(ID0), lambda store: store.save(make_key())),
    "delete_all": (lambda store: store.delete_all(), seed_two),
    "load_all-prunes": (lambda store: store.load_all(WALL + 10), seed_with_debris),
}


@pytest.mark.parametrize("case", sorted(CRASH_CASES))
def test_a_crash_at_any_write_leaves_a_consistent_view(case: str) -> None:
    """Whichever write a crash interrupts, a restarted store sees the before or after state
    of that operation and, once it has loaded, leaves no pending id and no orphaned entry."""
    operation, seed = CRASH_CASES[case]

    def fresh() -> tuple[CrashingKeyring, KeyringStore]:
        backend = CrashingKeyring()
        store = KeyringStore(backend)
        seed(store)
        backend.writes = 0
        return backend, store

    backend, store = fresh()
    before = {key.digest: key for key in KeyringStore(backend).load_all(0.0)[0]}
    backend, store = fresh()
    operation(store)
    total = backend.writes
    after = {key.digest: key for key in KeyringStore(backend).load_all(0.0)[0]}
    assert total >= 1

    for crash_at in range(total):
        backend, store = fresh()
        backend.crash_at = crash_at
        if case.startswith("load_all"):
            operation(store)  # load_all returns what it read even when its repairs fail
        else:
            with pytest.raises(KeyringUnavailable):
                operation(store)
        backend.crash_at = None
        restarted = KeyringStore(backend)
        seen = {key.digest: key for key in restarted.load_all(0.0)[0]}
        assert seen in (before, after), crash_at
        assert_tidy(backend)
        assert {key.digest: key for key in restarted.load_all(0.0)[0]} == seen


def test_load_returns_live_keys_even_if_tidying_fails() -> None:
    """If the keyring refuses the repairs, load_all still returns the live keys it read."""
    backend = CrashingKeyring()
    store = KeyringStore(backend)
    seed_two(store)
    backend.writes = 0
    backend.crash_at = 0
    live, expired = store.load_all(WALL + 10)
    assert ids(live) == [ID0]
    assert expired == []
    backend.crash_at = None
    assert store.load_all(WALL + 10) == ([make_key(SECRETS[0])], [ID1])


def test_concurrent_saves_from_worker_threads_all_land(
    store: KeyringStore, memory: MemoryKeyring
) -> None:
    """Saves from many threads at once are serialised: every key ends up in the index."""
    keys = [make_key(f"thread-key-{n}") for n in range(40)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(store.save, keys))
    live, _ = store.load_all(WALL)
    assert sorted(ids(live)) == sorted(key.digest for key in keys)
    assert_tidy(memory)


def test_a_blocked_keyring_blocks_only_the_calling_thread(
    store: KeyringStore, memory: MemoryKeyring
) -> None:
    """A save stuck on the keyring completes once the keyring answers, on its own thread."""
    memory.block = threading.Event()
    finished = threading.Event()

    def work() -> None:
        store.save(make_key())
        finished.set()

    worker = threading.Thread(target=work)
    worker.start()
    assert memory.waiting.wait(10)
    assert not finished.is_set()
    memory.block.set()
    worker.join(10)
    assert finished.is_set()
    assert store.load_all(WALL) == ([make_key()], [])


# --- unavailable keyrings ----------------------------------------------------------------


def test_fail_backend_is_unavailable_with_the_fix_in_the_message() -> None:
    """keyring's fail backend makes check and save raise KeyringUnavailable naming the fix."""
    store = KeyringStore(fail_backend())
    for call in (lambda: store.load_all(WALL), lambda: store.save(make_key())):
        with pytest.raises(KeyringUnavailable) as caught:
            call()
        assert "gnome-keyring" in caught.value.message
        assert "PYTHON_KEYRING_BACKEND" in caught.value.message
        assert_clean_error(caught.value)


def test_null_backend_is_unavailable() -> None:
    """keyring's null backend (keyring disabled) would drop every write: unavailable."""
    with pytest.raises(KeyringUnavailable, match="disabled"):
        KeyringStore(null_backend()).load_all(WALL)


def test_locked_keyring_asks_to_unlock(store: KeyringStore, memory: MemoryKeyring) -> None:
    """A locked keyring makes every operation raise KeyringUnavailable saying to unlock it."""
    store.save(make_key())
    memory.locked = True
    calls: list[Callable[[], object]] = [
        lambda: store.save(make_key(SECRETS[1])),
        lambda: store.load_all(WALL),
        lambda: store.delete(digest_of(SECRET)),
        store.delete_all,
    ]
    for call in calls:
        with pytest.raises(KeyringUnavailable, match="unlock your keyring") as caught:
            call()
        assert_clean_error(caught.value)
    memory.locked = False
    assert store.load_all(WALL) == ([make_key()], [])


class DBusException(Exception):
    """Stands in for a third-party backend's own exception type."""


class LockedException(Exception):
    """Stands in for secretstorage's LockedException escaping keyring's backend."""


@pytest.mark.parametrize(
    ("exception", "expected"),
    [
        (DBusException(f"org.freedesktop.DBus.Error.NoReply: {SECRET}"), "DBusException"),
        (OSError(f"EIO while storing {SECRET}"), "builtins.OSError"),
        (LockedException(f"item {SECRET} is locked"), "unlock your keyring"),
        (KeyringLocked(f"cannot unlock {SECRET}"), "unlock your keyring"),
        (NoKeyringError(f"no backend for {SECRET}"), "no OS keyring backend"),
        (InitError(f"Failed to create the collection: {SECRET}"), "could not be opened"),
        # On the keyring's worker thread these would end the thread, and with it every
        # later keyring call of the agent.
        (SystemExit(f"exit {SECRET}"), "builtins.SystemExit"),
        (KeyboardInterrupt(), "builtins.KeyboardInterrupt"),
        (asyncio.CancelledError(), "asyncio.exceptions.CancelledError"),
        (GeneratorExit(), "builtins.GeneratorExit"),
    ],
    ids=[
        "dbus",
        "oserror",
        "secretstorage-locked",
        "locked",
        "no-keyring",
        "init-error",
        "system-exit",
        "keyboard-interrupt",
        "cancelled",
        "generator-exit",
    ],
)
def test_backend_exceptions_become_keyring_unavailable_without_secrets(
    store: KeyringStore,
    memory: MemoryKeyring,
    exception: BaseException,
    expected: str,
) -> None:
    """Any exception from a backend becomes KeyringUnavailable, raised from None, secret-free."""
    memory.fail_with = exception
    for call in (lambda: store.save(make_key()), lambda: store.load_all(WALL)):
        with pytest.raises(KeyringUnavailable) as caught:
            call()
        assert expected in caught.value.message
        assert_clean_error(caught.value)


def test_a_backend_that_cannot_delete_is_reported(store: KeyringStore) -> None:
    """PasswordDeleteError for an entry that is still there is a failure, not 'already gone'."""

    class Undeletable(MemoryKeyring):
        def delete_password(self, service: str, username: str) -> None:
            raise PasswordDeleteError("this backend cannot delete")

    backend = Undeletable()
    undeletable = KeyringStore(backend)
    undeletable.save(make_key())
    with pytest.raises(KeyringUnavailable, match="delete") as caught:
        undeletable.delete(digest_of(SECRET))
    assert_clean_error(caught.value)


def test_no_secret_in_errors_or_logs_across_failing_operations(
    memory: MemoryKeyring, caplog: pytest.LogCaptureFixture
) -> None:
    """Every failure path of every operation keeps secrets out of messages and log records."""
    store = KeyringStore(memory)
    for secret in SECRETS:
        store.save(make_key(secret, expires=WALL + 1))
    memory.put(SERVICE, f"key:{digest_of(SECRETS[0])}", f'{{"v":1,"key":"{SECRETS[0]}"')
    store.load_all(WALL + 2)
    for secret in SECRETS:
        memory.fail_with = DBusException(f"could not store {secret}")
        key = make_key(secret)
        calls: list[Callable[[], object]] = [
            partial(store.save, key),
            partial(store.load_all, WALL),
            partial(store.delete, key.digest),
            store.delete_all,
        ]
        for call in calls:
            with pytest.raises(KeyringUnavailable) as caught:
                call()
            assert_clean_error(caught.value)
    assert caplog.records  # the autouse fixture checks each of them


# --- choosing the backend ----------------------------------------------------------------


class RecommendedKeyring(MemoryKeyring):
    """A backend keyring would recommend (priority >= 1)."""

    priority = 5.0


class LowPriorityKeyring(MemoryKeyring):
    """A backend keyring picks only for want of better, like keyrings.alt's file backends."""

    priority = 0.5


class PlaintextKeyring(MemoryKeyring):
    """A plain-text backend that claims a high priority."""

    priority = 5.0


@pytest.fixture
def chosen(monkeypatch: pytest.MonkeyPatch) -> Callable[[object], None]:
    """Make keyring.get_keyring() return a given backend for this test only (its public
    name, which KeyringStore calls; keyring's own choice is global, cached state)."""
    monkeypatch.delenv("PYTHON_KEYRING_BACKEND", raising=False)

    def choose(backend: object) -> None:
        monkeypatch.setattr(keyring, "get_keyring", lambda: backend)

    return choose


def test_keyrings_recommended_choice_is_used(chosen: Callable[[object], None]) -> None:
    """With no backend given, the store uses keyring's choice when keyring recommends it."""
    backend = RecommendedKeyring()
    chosen(backend)
    store = KeyringStore()
    store.save(make_key())
    assert (SERVICE, f"key:{digest_of(SECRET)}") in backend.entries()


@pytest.mark.parametrize("backend_class", [LowPriorityKeyring, PlaintextKeyring])
def test_an_unrecommended_choice_needs_python_keyring_backend(
    chosen: Callable[[object], None],
    monkeypatch: pytest.MonkeyPatch,
    backend_class: type[MemoryKeyring],
) -> None:
    """A plain-text or low-priority automatic choice is refused unless the user named it."""
    backend = backend_class()
    chosen(backend)
    dotted = f"{__name__}.{backend_class.__name__}"
    with pytest.raises(KeyringUnavailable) as caught:
        KeyringStore().save(make_key())
    assert f"PYTHON_KEYRING_BACKEND={dotted}" in caught.value.message
    assert "gnome-keyring" in caught.value.message
    assert backend.entries() == {}

    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", dotted)
    KeyringStore().save(make_key())
    assert (SERVICE, f"key:{digest_of(SECRET)}") in backend.entries()


def test_keyrings_fail_choice_is_unavailable_even_when_named(
    chosen: Callable[[object], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """keyring's fail backend cannot store anything, whether chosen or configured."""
    chosen(fail_backend())
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.fail.Keyring")
    with pytest.raises(KeyringUnavailable, match="no OS keyring backend"):
        KeyringStore().load_all(WALL)


def test_a_backend_keyring_cannot_load_is_unavailable(
    chosen: Callable[[object], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PYTHON_KEYRING_BACKEND naming nothing importable gives KeyringUnavailable."""
    chosen(None)
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyagent_no_such_module.Keyring")
    with pytest.raises(KeyringUnavailable, match="PYTHON_KEYRING_BACKEND") as caught:
        KeyringStore().load_all(WALL)
    assert_clean_error(caught.value)


class EmptyChain(ChainerBackend):
    """A chainer that found no backends to chain."""

    viable = False
    backends: list[object] = []  # noqa: RUF012  # shadows keyring's class property

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]


class OneChain(ChainerBackend):
    """A chainer in front of one in-memory backend."""

    viable = False
    backends: list[object] = [RecommendedKeyring()]  # noqa: RUF012  # as above

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]


def test_a_chainer_without_backends_is_unavailable() -> None:
    """A chainer with nothing to chain would drop writes: unavailable."""
    with pytest.raises(KeyringUnavailable, match="no OS keyring backend"):
        KeyringStore(EmptyChain()).load_all(WALL)


def test_a_chainer_is_unwrapped_to_the_backend_it_writes_to() -> None:
    """Reads, writes and deletes all go to the chainer's first backend."""
    store = KeyringStore(OneChain())
    store.save(make_key())
    first = OneChain.backends[0]
    assert isinstance(first, RecommendedKeyring)
    assert (SERVICE, f"key:{digest_of(SECRET)}") in first.entries()
    assert store.delete_all() == 1
    assert first.entries() == {}


def test_importing_persist_does_not_import_keyring() -> None:
    """keyagent.persist imports keyring lazily, so importing it stays cheap."""
    code = "import sys, keyagent.persist; print('keyring' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert result.stdout.strip() == "False"


def test_rotate_every_is_saved_and_read_back(store: KeyringStore) -> None:
    """A key's rotation interval survives the keyring; a key without one reads back None."""
    scheduled = make_key(SECRETS[0])._replace(rotate_every=3600.0)
    plain = make_key(SECRETS[1])
    store.save(scheduled)
    store.save(plain)
    assert store.load_all(WALL) == ([scheduled, plain], [])
    assert [key.rotate_every for key in store.load_all(WALL)[0]] == [3600.0, None]


@pytest.mark.parametrize("value", [5, 0, -60, True, "1h", [3600], 1e12])
def test_an_invalid_rotate_every_skips_the_entry_with_a_warning(
    store: KeyringStore, memory: MemoryKeyring, caplog: pytest.LogCaptureFixture, value: object
) -> None:
    """A rotation interval the protocol would refuse (under a minute, not a number, over ten
    years) skips that record, with a warning naming the field; the other keys still load."""
    good, bad = make_key(SECRETS[0]), make_key(SECRETS[1])
    store.save(good)
    store.save(bad)
    document = json.loads(memory.get_password(SERVICE, f"key:{bad.digest}") or "")
    document["rotate_every"] = value
    memory.put(SERVICE, f"key:{bad.digest}", json.dumps(document))
    assert store.load_all(WALL) == ([good], [])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(bad.digest[:12] in m and "invalid rotate_every" in m for m in warnings)


@pytest.mark.parametrize("value", [10**400, -(10**400)], ids=["huge", "huge-negative"])
def test_an_expiry_no_float_can_hold_skips_the_entry_and_the_others_load(
    store: KeyringStore, memory: MemoryKeyring, value: int
) -> None:
    """An expiry of hundreds of digits (no float holds it) makes that record unreadable, not
    the whole restore: the other keys still load."""
    good, bad = make_key(SECRETS[0]), make_key(SECRETS[1])
    store.save(good)
    store.save(bad)
    document = json.loads(memory.get_password(SERVICE, f"key:{bad.digest}") or "")
    document["expires"] = value
    memory.put(SERVICE, f"key:{bad.digest}", json.dumps(document))
    assert store.load_all(WALL)[0] == [good]
