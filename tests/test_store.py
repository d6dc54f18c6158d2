"""Unit tests for keyagent.store: held keys, lifetimes, the reaper and the lock."""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyagent.errors import Ambiguous, Locked, NotFound, NotLocked, TooMany
from keyagent.store import (
    SCRYPT_LEN,
    HeldKey,
    KeyStore,
    Lock,
    derive,
    digest_of,
    iso,
    key_id_for,
    new_salt,
)

from .conftest import COLLIDING_KEYS

WALL = 1_700_000_000.0  # 2023-11-14T22:13:20Z
SECRET = "zebra-quokka-7781-S3CR3T"


def put(
    store: KeyStore,
    secret: str,
    *,
    host: str = "app.conduce.com",
    user: str = "ada@example.com",
    now: float = 0.0,
    lifetime: float | None = None,
) -> HeldKey:
    return store.put(
        host=host, user=user, secret=secret, now=now, wall=WALL + now, lifetime=lifetime
    )


def colliding_secrets(prefix_len: int = 4) -> tuple[str, str, str]:
    """Two secrets whose key ids share their first ``prefix_len`` characters, and that prefix."""
    seen: dict[str, str] = {}
    for index in itertools.count():
        secret = f"collide-{index}"
        prefix = key_id_for(secret)[:prefix_len]
        if prefix in seen:
            return seen[prefix], secret, prefix
        seen[prefix] = secret
    raise AssertionError("unreachable")  # pragma: no cover


# --- key ids and dates -----------------------------------------------------------------------


@pytest.mark.parametrize("secret", ["k", SECRET, "ключ-🔑", "a" * 8192])
def test_key_id_is_the_first_twelve_hex_of_sha256(secret: str) -> None:
    """key_id_for is the first 12 lowercase hex characters of the secret's UTF-8 SHA-256."""
    key_id = key_id_for(secret)
    assert key_id == hashlib.sha256(secret.encode("utf-8")).hexdigest()[:12]
    assert len(key_id) == 12
    assert set(key_id) <= set("0123456789abcdef")


def test_key_id_differs_for_different_secrets() -> None:
    """Different secrets get different key ids."""
    assert key_id_for("one") != key_id_for("two")


def test_iso_formats_utc_to_the_second() -> None:
    """iso shows a POSIX timestamp in UTC as ISO 8601 with a Z, truncated to the second."""
    assert iso(0) == "1970-01-01T00:00:00Z"
    assert iso(WALL) == "2023-11-14T22:13:20Z"
    assert iso(WALL + 0.999) == "2023-11-14T22:13:20Z"


def test_iso_of_none_is_none() -> None:
    """iso passes None through, for keys that never expire."""
    assert iso(None) is None


# --- HeldKey ---------------------------------------------------------------------------------


def test_held_key_repr_hides_the_secret() -> None:
    """A HeldKey's repr names its key id but never contains the secret."""
    held = put(KeyStore(), SECRET)
    text = repr(held)
    assert SECRET not in text
    assert "secret" not in text
    assert held.key_id in text


def test_listing_has_every_field_but_the_secret() -> None:
    """listing() shows exactly the public fields, with dates as ISO strings, and no secret."""
    store = KeyStore()
    held = store.put(
        host="h.example",
        user="u@example.com",
        secret=SECRET,
        now=5.0,
        wall=WALL,
        lifetime=60.0,
        description="ci key",
        created="2024-01-02T03:04:05Z",
        source="created",
        persisted=True,
    )
    listing = held.listing()
    assert listing == {
        "key_id": key_id_for(SECRET),
        "fingerprint": digest_of(SECRET),
        "host": "h.example",
        "user": "u@example.com",
        "description": "ci key",
        "created": "2024-01-02T03:04:05Z",
        "added": "2023-11-14T22:13:20Z",
        "expires": "2023-11-14T22:14:20Z",
        "source": "created",
        "persisted": True,
        "exportable": True,
        "confirm": False,
        "allowed_exes": [],
        "ephemeral": False,
        "rotate_every": None,
        "next_rotation": None,
        "refused": False,
    }
    assert SECRET not in repr(listing)


def test_listing_of_a_key_without_lifetime_has_no_expiry() -> None:
    """A key held without a lifetime lists expires as None and its defaults."""
    listing = put(KeyStore(), SECRET).listing()
    assert listing["expires"] is None
    assert listing["created"] is None
    assert listing["description"] == ""
    assert listing["source"] == "added"
    assert listing["persisted"] is False


# --- put -------------------------------------------------------------------------------------


def test_put_holds_a_key_with_its_fields() -> None:
    """put returns the held key with its id, host, user, secret, wall time and deadline."""
    store = KeyStore()
    held = put(store, SECRET, now=10.0, lifetime=30.0)
    assert len(store) == 1
    assert held.key_id == key_id_for(SECRET)
    assert held.secret == SECRET
    assert held.host == "app.conduce.com"
    assert held.user == "ada@example.com"
    assert held.added == WALL + 10.0
    assert held.deadline == 40.0
    assert held.expires == WALL + 40.0


def test_put_same_secret_twice_updates_instead_of_duplicating() -> None:
    """Holding the same secret again keeps one entry, with the new host, user and added time."""
    store = KeyStore()
    first = put(store, SECRET, host="old.example", user="old@example.com", now=1.0)
    second = put(store, SECRET, host="new.example", user="new@example.com", now=2.0)
    assert len(store) == 1
    assert second is first
    assert second.host == "new.example"
    assert second.user == "new@example.com"
    assert second.added == WALL + 2.0
    assert [held.key_id for held in store.matching(3.0)] == [key_id_for(SECRET)]


def test_put_same_secret_moves_it_to_newest() -> None:
    """Re-adding an older key makes it the newest match again."""
    store = KeyStore()
    put(store, "first")
    put(store, "second")
    assert store.newest(0.0).secret == "second"
    put(store, "first")
    assert store.newest(0.0).secret == "first"
    assert [held.secret for held in store.matching(0.0)] == ["first", "second"]


def test_put_again_keeps_description_and_created_unless_given() -> None:
    """A re-add without description or created keeps the old ones; a given one replaces them."""
    store = KeyStore()
    store.put(host="h", user="u", secret=SECRET, now=0, wall=WALL, description="d1", created="c1")
    held = store.put(host="h", user="u", secret=SECRET, now=0, wall=WALL)
    assert (held.description, held.created) == ("d1", "c1")
    held = store.put(
        host="h", user="u", secret=SECRET, now=0, wall=WALL, description="", created="c2"
    )
    assert (held.description, held.created) == ("", "c2")


def test_put_again_keeps_persisted_once_set() -> None:
    """persisted is sticky: a later put with persisted=False does not clear it."""
    store = KeyStore()
    store.put(host="h", user="u", secret=SECRET, now=0, wall=WALL, persisted=True)
    held = store.put(host="h", user="u", secret=SECRET, now=0, wall=WALL, persisted=False)
    assert held.persisted is True


def test_put_again_keeps_the_original_source() -> None:
    """A key's source (added or created) is where it first came from; re-adding keeps it."""
    store = KeyStore()
    store.put(host="h", user="u", secret="a", now=0, wall=WALL, source="created")
    held = store.put(host="h", user="u", secret="a", now=0, wall=WALL, source="added")
    assert held.source == "created"
    store.put(host="h", user="u", secret="b", now=0, wall=WALL, source="added")
    held = store.put(host="h", user="u", secret="b", now=0, wall=WALL, source="created")
    assert held.source == "added"


def test_put_again_replaces_a_keyring_source() -> None:
    """A key restored from the keyring takes the source of a later explicit put."""
    store = KeyStore()
    store.put(host="h", user="u", secret="a", now=0, wall=WALL, source="keyring")
    held = store.put(host="h", user="u", secret="a", now=0, wall=WALL, source="created")
    assert held.source == "created"


def test_put_again_without_lifetime_makes_the_key_permanent() -> None:
    """Re-adding with no lifetime clears the old deadline, and the old one no longer reaps it."""
    store = KeyStore()
    put(store, SECRET, now=0.0, lifetime=10.0)
    held = put(store, SECRET, now=5.0)
    assert held.deadline is None
    assert held.expires is None
    expired, _ = store.reap(100.0)
    assert expired == []
    assert store.newest(100.0).secret == SECRET


def test_put_again_with_a_lifetime_restarts_it() -> None:
    """Re-adding with a lifetime sets a fresh deadline from the new now."""
    store = KeyStore()
    put(store, SECRET, now=0.0, lifetime=10.0)
    held = put(store, SECRET, now=8.0, lifetime=10.0)
    assert held.deadline == 18.0
    assert store.reap(10.0)[0] == []
    assert store.newest(17.9).secret == SECRET
    assert store.reap(18.0)[0] == [held]


# --- matching and newest ----------------------------------------------------------------------


@pytest.fixture
def three_keys() -> KeyStore:
    store = KeyStore()
    put(store, "k1", host="a.example", user="ada")
    put(store, "k2", host="b.example", user="ada")
    put(store, "k3", host="a.example", user="bob")
    return store


def test_matching_without_selectors_lists_all_newest_first(three_keys: KeyStore) -> None:
    """matching() with no selectors yields every live key, most recently added first."""
    assert [held.secret for held in three_keys.matching(0.0)] == ["k3", "k2", "k1"]


def test_matching_filters_by_host(three_keys: KeyStore) -> None:
    """matching(host=...) yields only that host's keys."""
    assert [h.secret for h in three_keys.matching(0.0, host="a.example")] == ["k3", "k1"]


def test_matching_filters_by_user(three_keys: KeyStore) -> None:
    """matching(user=...) yields only that user's keys."""
    assert [h.secret for h in three_keys.matching(0.0, user="ada")] == ["k2", "k1"]


def test_matching_combines_selectors(three_keys: KeyStore) -> None:
    """Every given selector must match: host and user together narrow to one key."""
    assert [h.secret for h in three_keys.matching(0.0, "a.example", "ada")] == ["k1"]
    assert list(three_keys.matching(0.0, "b.example", "bob")) == []


def test_matching_host_is_exact(three_keys: KeyStore) -> None:
    """Host and user selectors compare whole strings, not prefixes or case-folded."""
    assert list(three_keys.matching(0.0, host="a.exam")) == []
    assert list(three_keys.matching(0.0, host="A.EXAMPLE")) == []
    assert list(three_keys.matching(0.0, user="Ada")) == []


@pytest.mark.parametrize("length", [4, 6, 11, 12])
def test_matching_by_key_id_prefix(three_keys: KeyStore, length: int) -> None:
    """A key id prefix of any accepted length selects the key whose id starts with it."""
    key_id = key_id_for("k2")
    found = list(three_keys.matching(0.0, key_id=key_id[:length]))
    assert [held.secret for held in found] == ["k2"]


def test_matching_full_key_id_still_checks_host_and_user(three_keys: KeyStore) -> None:
    """A full 12-character key id that names a key of another host matches nothing."""
    key_id = key_id_for("k2")
    assert list(three_keys.matching(0.0, host="a.example", key_id=key_id)) == []
    assert [h.secret for h in three_keys.matching(0.0, host="b.example", key_id=key_id)] == ["k2"]


def test_matching_unknown_key_id_is_empty(three_keys: KeyStore) -> None:
    """A key id held by no key, full or prefix, matches nothing."""
    unknown = key_id_for("not held")
    assert list(three_keys.matching(0.0, key_id=unknown)) == []
    assert list(three_keys.matching(0.0, key_id="zzzz")) == []


def test_newest_picks_the_most_recently_added(three_keys: KeyStore) -> None:
    """newest() is the most recently added key among the matches."""
    assert three_keys.newest(0.0).secret == "k3"
    assert three_keys.newest(0.0, user="ada").secret == "k2"
    assert three_keys.newest(0.0, host="a.example").secret == "k3"


def test_newest_by_key_id(three_keys: KeyStore) -> None:
    """newest(key_id=...) returns the key with that id, even if it is not the newest."""
    assert three_keys.newest(0.0, key_id=key_id_for("k1")).secret == "k1"
    assert three_keys.newest(0.0, key_id=key_id_for("k1")[:4]).secret == "k1"


def test_newest_of_an_empty_store_is_not_found() -> None:
    """newest() on an empty store raises NotFound with a message that says how to add one."""
    with pytest.raises(NotFound) as caught:
        KeyStore().newest(0.0)
    assert caught.value.message == (
        "no key is held; add one with keyagent-ctl add or keyagent-ctl create"
    )


def test_not_found_message_names_the_selectors_but_no_secret() -> None:
    """NotFound names the key id, host and user asked for, never a held secret."""
    store = KeyStore()
    put(store, SECRET, host="h.example", user="ada@example.com")
    with pytest.raises(NotFound) as caught:
        store.newest(0.0, host="other.example", user="bob@example.com", key_id="abcd")
    message = caught.value.message
    assert "key id abcd" in message
    assert "host other.example" in message
    assert "user bob@example.com" in message
    assert SECRET not in message
    assert SECRET not in repr(caught.value)


def test_ambiguous_prefix_raises() -> None:
    """A key id prefix shared by two live keys raises Ambiguous, without any secret."""
    first, second, prefix = colliding_secrets()
    store = KeyStore()
    put(store, first)
    put(store, second)
    with pytest.raises(Ambiguous) as caught:
        store.newest(0.0, key_id=prefix)
    assert prefix in caught.value.message
    assert first not in caught.value.message
    assert second not in caught.value.message
    assert len(list(store.matching(0.0, key_id=prefix))) == 2


def test_longer_prefix_resolves_ambiguity() -> None:
    """Giving the full key id of one of two keys sharing a prefix picks that key."""
    first, second, _ = colliding_secrets()
    store = KeyStore()
    put(store, first)
    put(store, second)
    assert store.newest(0.0, key_id=key_id_for(first)).secret == first
    assert store.newest(0.0, key_id=key_id_for(second)).secret == second


def test_prefix_is_not_ambiguous_when_other_selectors_narrow_it() -> None:
    """A shared prefix is fine when host narrows the matches to one key."""
    first, second, prefix = colliding_secrets()
    store = KeyStore()
    put(store, first, host="a.example")
    put(store, second, host="b.example")
    assert store.newest(0.0, host="a.example", key_id=prefix).secret == first


def test_prefix_is_not_ambiguous_when_the_other_key_expired() -> None:
    """Only live keys count: a shared prefix with an expired key resolves to the live one."""
    first, second, prefix = colliding_secrets()
    store = KeyStore()
    put(store, first, lifetime=5.0)
    put(store, second)
    assert store.newest(5.0, key_id=prefix).secret == second


def test_many_matches_without_key_id_are_not_ambiguous() -> None:
    """Without a key id, several matches simply yield the newest."""
    store = KeyStore()
    for index in range(5):
        put(store, f"k{index}")
    assert store.newest(0.0).secret == "k4"


# --- discard and clear -----------------------------------------------------------------------


def test_discard_drops_one_key_and_returns_it() -> None:
    """discard() removes the key with that full id and returns it; unknown ids give None."""
    store = KeyStore()
    held = put(store, "a")
    put(store, "b")
    assert store.discard(held.digest) is held
    assert len(store) == 1
    assert store.discard(held.digest) is None
    assert [h.secret for h in store.matching(0.0)] == ["b"]


def test_discard_needs_the_full_key_id() -> None:
    """discard() does not treat its argument as a prefix."""
    store = KeyStore()
    held = put(store, "a")
    assert store.discard(held.digest[:6]) is None
    assert len(store) == 1


def test_clear_drops_everything_and_its_deadlines() -> None:
    """clear() returns every key, empties the store and leaves no deadline to wait for."""
    store = KeyStore()
    a = put(store, "a", lifetime=10.0)
    b = put(store, "b")
    assert store.clear() == [a, b]
    assert len(store) == 0
    assert store.reap(0.0) == ([], None)


# --- lifetimes and the reaper ----------------------------------------------------------------


def test_key_is_live_until_just_before_its_deadline() -> None:
    """A key with a lifetime is returned just before its deadline and never at or after it."""
    store = KeyStore()
    held = put(store, SECRET, now=100.0, lifetime=60.0)
    assert held.alive(159.999)
    assert store.newest(159.999).secret == SECRET
    assert not held.alive(160.0)
    assert list(store.matching(160.0)) == []
    with pytest.raises(NotFound):
        store.newest(160.0)
    with pytest.raises(NotFound):
        store.newest(1e9, key_id=held.key_id)


def test_key_without_lifetime_never_expires() -> None:
    """A key without a lifetime is alive at any time."""
    held = put(KeyStore(), SECRET)
    assert held.alive(1e18)


def test_reap_drops_due_keys_and_returns_the_next_deadline() -> None:
    """reap() removes keys whose deadline is at or before now and returns the next deadline."""
    store = KeyStore()
    a = put(store, "a", lifetime=10.0)
    b = put(store, "b", lifetime=20.0)
    put(store, "c")
    assert store.reap(9.0) == ([], 10.0)
    assert store.reap(10.0) == ([a], 20.0)
    assert len(store) == 2
    assert store.reap(25.0) == ([b], None)
    assert [held.secret for held in store.matching(25.0)] == ["c"]


def test_reap_returns_expired_keys_in_deadline_order() -> None:
    """Keys due at once come back earliest deadline first, whatever their insertion order."""
    store = KeyStore()
    late = put(store, "late", lifetime=30.0)
    early = put(store, "early", lifetime=10.0)
    middle = put(store, "middle", lifetime=20.0)
    expired, next_deadline = store.reap(100.0)
    assert expired == [early, middle, late]
    assert next_deadline is None
    assert len(store) == 0


def test_reap_of_an_empty_store() -> None:
    """reap() on an empty store drops nothing and has no next deadline."""
    assert KeyStore().reap(0.0) == ([], None)


def test_reap_skips_a_forgotten_key() -> None:
    """A deadline left behind by a discarded key drops nothing when it comes due."""
    store = KeyStore()
    held = put(store, "a", lifetime=10.0)
    other = put(store, "b")
    store.discard(held.digest)
    assert store.reap(10.0) == ([], None)
    assert list(store.matching(10.0)) == [other]


def test_forget_then_readd_with_longer_lifetime_survives_the_old_deadline() -> None:
    """A key forgotten and re-added with a longer lifetime outlives its stale first deadline."""
    store = KeyStore()
    first = put(store, SECRET, now=0.0, lifetime=10.0)
    store.discard(first.digest)
    again = put(store, SECRET, now=1.0, lifetime=100.0)
    assert store.reap(10.0) == ([], 101.0)
    assert store.newest(50.0) is again
    assert store.reap(101.0) == ([again], None)


def test_forget_then_readd_with_shorter_lifetime_expires_at_the_new_deadline() -> None:
    """A key re-added with a shorter lifetime expires at the new deadline, not the stale one."""
    store = KeyStore()
    first = put(store, SECRET, now=0.0, lifetime=100.0)
    store.discard(first.digest)
    again = put(store, SECRET, now=1.0, lifetime=5.0)
    expired, next_deadline = store.reap(6.0)
    assert expired == [again]
    # The stale deadline may still be reported: an early wake-up, never a late one.
    assert next_deadline in (None, 100.0)
    assert store.reap(100.0) == ([], None)


def test_readd_same_deadline_twice_reaps_once() -> None:
    """Two puts giving the same deadline leave two heap entries but reap the key only once."""
    store = KeyStore()
    held = put(store, SECRET, now=0.0, lifetime=10.0)
    put(store, SECRET, now=0.0, lifetime=10.0)
    assert store.reap(10.0) == ([held], None)


def test_tiny_lifetime_is_due_at_once() -> None:
    """A lifetime too small to move the deadline past now means the key is already dead."""
    store = KeyStore()
    put(store, SECRET, now=1e6, lifetime=1e-300)
    assert list(store.matching(1e6)) == []
    assert len(store.reap(1e6)[0]) == 1


# --- property: no key outlives its deadline ---------------------------------------------------

SECRETS = [f"secret-{index}" for index in range(5)]

lifetimes = st.one_of(st.none(), st.floats(min_value=0.001, max_value=100.0))
advances = st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=60.0))
actions = st.one_of(
    st.tuples(st.just("put"), st.sampled_from(SECRETS), lifetimes, advances),
    st.tuples(st.just("discard"), st.sampled_from(SECRETS), st.none(), advances),
    st.tuples(st.just("reap"), st.just(""), st.none(), advances),
    st.tuples(st.just("clear"), st.just(""), st.none(), advances),
)
Action = tuple[str, str, float | None, float]


@dataclass
class Model:
    """What the store should hold: key id -> deadline (None for no lifetime)."""

    deadlines: dict[str, float | None] = field(default_factory=dict)
    pushed: set[float] = field(default_factory=set)

    def live(self, now: float) -> set[str]:
        return {k for k, d in self.deadlines.items() if d is None or now < d}


def check_invariants(store: KeyStore, model: Model, now: float) -> None:
    found = list(store.matching(now))
    for held in found:
        assert held.deadline is None or now < held.deadline
    assert {held.digest for held in found} == model.live(now)
    if found:
        newest = store.newest(now)
        assert newest.alive(now)
    for secret in SECRETS:
        key_id = digest_of(secret)
        for selector in (key_id, key_id[:12], key_id[:4]):
            try:
                held = store.newest(now, key_id=selector)
            except NotFound:
                assert key_id not in model.live(now)
            else:
                assert held.alive(now)
                assert held.digest == key_id


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(actions, max_size=30))
def test_no_key_is_ever_returned_after_its_deadline(steps: list[Action]) -> None:
    """For any put/discard/reap/clear sequence, lookups never return a key past its deadline."""
    store, model, now = KeyStore(), Model(), 0.0
    for kind, secret, lifetime, advance in steps:
        now += advance
        key_id = digest_of(secret) if secret else ""
        if kind == "put":
            held = put(store, secret, now=now, lifetime=lifetime)
            model.deadlines[key_id] = None if lifetime is None else now + lifetime
            if held.deadline is not None:
                model.pushed.add(held.deadline)
        elif kind == "discard":
            dropped = store.discard(key_id)
            assert (dropped is not None) == (key_id in model.deadlines)
            model.deadlines.pop(key_id, None)
        elif kind == "clear":
            assert {held.digest for held in store.clear()} == set(model.deadlines)
            model.deadlines.clear()
        else:
            expired, next_deadline = store.reap(now)
            due = {k for k, d in model.deadlines.items() if d is not None and d <= now}
            assert {held.digest for held in expired} == due
            assert len(expired) == len(due)
            for k in due:
                del model.deadlines[k]
            remaining = [d for d in model.deadlines.values() if d is not None]
            assert not any(d <= now for d in remaining)
            if remaining:
                # Never later than the earliest live deadline (a stale one may come first).
                assert next_deadline is not None
                assert next_deadline <= min(remaining)
            if next_deadline is not None:
                assert next_deadline > now
                assert next_deadline in model.pushed
            assert len(store) == len(model.deadlines)
        check_invariants(store, model, now)


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.booleans(), st.floats(min_value=0.001, max_value=100.0), advances),
        max_size=30,
    )
)
def test_reap_returns_the_minimum_remaining_deadline(
    steps: list[tuple[bool, float, float]],
) -> None:
    """With only fresh keys and reaps, reap returns exactly the earliest remaining deadline."""
    store, now = KeyStore(), 0.0
    deadlines: dict[str, float] = {}
    for index, (is_put, lifetime, advance) in enumerate(steps):
        now += advance
        if is_put:
            held = put(store, f"fresh-{index}", now=now, lifetime=lifetime)
            assert held.deadline is not None
            deadlines[held.key_id] = held.deadline
        else:
            expired, next_deadline = store.reap(now)
            assert all(held.deadline is not None and held.deadline <= now for held in expired)
            for held in expired:
                del deadlines[held.key_id]
            assert all(d > now for d in deadlines.values())
            assert next_deadline == (min(deadlines.values()) if deadlines else None)
            assert len(store) == len(deadlines)


# --- the lock --------------------------------------------------------------------------------

SALT = b"\x01" * 16
OTHER_SALT = b"\x02" * 16


@pytest.fixture(scope="module")
def digest() -> bytes:
    return derive("correct horse", SALT)


def test_derive_is_deterministic_per_salt(digest: bytes) -> None:
    """derive gives the same 32-byte hash for the same passphrase and salt."""
    assert derive("correct horse", SALT) == digest
    assert isinstance(digest, bytes)
    assert len(digest) == SCRYPT_LEN == 32


def test_derive_differs_across_salts_and_passphrases(digest: bytes) -> None:
    """A different salt or a different passphrase gives a different hash."""
    assert derive("correct horse", OTHER_SALT) != digest
    assert derive("correct horsf", SALT) != digest


def test_derive_is_scrypt_with_the_documented_parameters() -> None:
    """derive is scrypt with n=2**14, r=8, p=1 (docs/protocol.md): it reproduces RFC 7914's
    test vector for those parameters (the first 32 of its 64 bytes: scrypt's output is a
    PBKDF2 stream, so a shorter dkLen is a prefix)."""
    rfc_7914 = "7023bdcb3afd7348461c06cd81fd38ebfda8fbba904f8e3ea9b543f6545da1f2"
    assert derive("pleaseletmein", b"SodiumChloride").hex() == rfc_7914


def test_derive_hashes_the_utf8_passphrase_as_it_always_has() -> None:
    """A non-ASCII passphrase is hashed as its UTF-8 bytes, to the digest a persisted lock holds.

    A lock is kept in the OS keyring across restarts: any change of encoding or parameters
    would leave it impossible to unlock. The vector was recorded from this implementation.
    """
    recorded = "f4d04462c2f7ffb7f0e505d6e1d18723a4cb30c2057bb2d6853d0f943c218bf3"
    assert derive("p\u00e4ssw\u00f6rd \u2713", SALT).hex() == recorded


def test_new_salt_is_sixteen_random_bytes() -> None:
    """new_salt returns 16 bytes, different each time."""
    salts = {new_salt() for _ in range(8)}
    assert len(salts) == 8
    assert all(len(salt) == 16 for salt in salts)


def test_lock_starts_unlocked() -> None:
    """A new Lock is unlocked, with no salt, no digest and no failures."""
    lock = Lock()
    assert lock.locked is False
    assert lock.salt is None
    assert lock.digest is None
    assert lock.failures == 0


def test_engage_locks_and_stores_salt_and_digest(digest: bytes) -> None:
    """engage() locks and keeps the salt and the hash, never a passphrase."""
    lock = Lock()
    lock.engage(SALT, digest)
    assert lock.locked is True
    assert lock.salt == SALT
    assert lock.digest == digest


def test_engage_twice_raises_locked(digest: bytes) -> None:
    """Locking a locked Lock raises Locked and keeps the first salt and hash."""
    lock = Lock()
    lock.engage(SALT, digest)
    with pytest.raises(Locked, match="already locked"):
        lock.engage(OTHER_SALT, b"x" * 32)
    assert lock.salt == SALT
    assert lock.digest == digest


def test_try_release_when_not_locked_raises_not_locked() -> None:
    """Releasing an unlocked Lock raises NotLocked."""
    with pytest.raises(NotLocked):
        Lock().try_release(b"x" * 32)


def test_try_release_with_the_right_hash_unlocks(digest: bytes) -> None:
    """The hash of the right passphrase with the stored salt unlocks and clears everything."""
    lock = Lock()
    lock.engage(SALT, digest)
    salt = lock.salt
    assert salt is not None
    assert lock.try_release(derive("correct horse", salt)) is True
    assert lock.locked is False
    assert lock.salt is None
    assert lock.digest is None
    assert lock.failures == 0


def test_try_release_compares_with_the_stored_digest(digest: bytes) -> None:
    """A hash of the right passphrase under another salt does not unlock: the digest decides."""
    lock = Lock()
    lock.engage(SALT, digest)
    assert lock.try_release(derive("correct horse", OTHER_SALT)) is False
    assert lock.try_release(b"") is False
    assert lock.try_release(digest[:-1]) is False
    assert lock.locked is True
    assert lock.failures == 3


def test_failure_delay_doubles_from_a_tenth_and_caps_at_ten() -> None:
    """The delay is 0.1 s for the first failure, doubles with each one, and stops at 10 s."""
    lock = Lock()
    lock.engage(SALT, b"d" * 32)
    assert lock.failure_delay() == pytest.approx(0.1)
    delays = []
    for _ in range(12):
        assert lock.try_release(b"wrong") is False
        delays.append(lock.failure_delay())
    expected = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 10.0, 10.0, 10.0]
    assert delays == pytest.approx(expected)
    assert lock.failures == 12


def test_success_resets_the_failure_count() -> None:
    """A successful unlock resets failures, so the next failure waits 0.1 s again."""
    lock = Lock()
    lock.engage(SALT, b"d" * 32)
    for _ in range(5):
        lock.try_release(b"wrong")
    assert lock.failure_delay() == pytest.approx(1.6)
    assert lock.try_release(b"d" * 32) is True
    assert lock.failures == 0
    lock.engage(SALT, b"e" * 32)
    lock.try_release(b"wrong")
    assert lock.failure_delay() == pytest.approx(0.1)


def test_engage_resets_the_failure_count() -> None:
    """Engaging the lock starts a fresh failure count."""
    lock = Lock(failures=7)
    lock.engage(SALT, b"d" * 32)
    assert lock.failures == 0


def test_failure_delay_stays_capped_after_many_failures() -> None:
    """However many failures pile up, the delay stays at the 10 s cap instead of overflowing."""
    lock = Lock()
    lock.engage(SALT, b"d" * 32)
    for _ in range(1100):
        lock.try_release(b"wrong")
    assert lock.failure_delay() == 10.0


def test_lock_repr_hides_salt_and_digest(digest: bytes) -> None:
    """A Lock's repr shows its failure count but neither the salt nor the hash."""
    lock = Lock()
    lock.engage(SALT, digest)
    text = repr(lock)
    assert "failures=0" in text
    assert repr(digest) not in text
    assert repr(SALT) not in text
    assert "digest" not in text


def test_lifetime_survives_the_deadline_heap_being_compacted() -> None:
    """Re-adding a key many times (which compacts the deadline heap) keeps its expiry."""
    store = KeyStore()
    for n in range(200):
        store.put(
            host="h", user="u", secret="same-secret", now=float(n), wall=float(n), lifetime=10.0
        )
    assert store.next_deadline() <= 199.0 + 10.0  # never later than the live deadline
    assert store.reap(208.5)[0] == []  # only stale entries were due
    assert len(store) == 1
    expired, _ = store.reap(209.0)
    assert [held.secret for held in expired] == ["same-secret"]
    assert len(store) == 0


# --- keys whose short ids collide ------------------------------------------------------------

COLLIDING = COLLIDING_KEYS  # two secrets whose SHA-256 share their first 48 bits


def test_the_colliding_pair_shares_its_shown_id() -> None:
    """The fixture is what it claims: same 12-digit id, different digests."""
    first, second = COLLIDING
    assert key_id_for(first) == key_id_for(second) == "55d74bcc33ef"
    assert digest_of(first) != digest_of(second)


def test_colliding_ids_are_two_keys_each_for_its_own_host() -> None:
    """Keys whose 12-digit ids agree are held apart: neither moves to the other's host."""
    store = KeyStore()
    victim, hostile = COLLIDING
    store.put(host="a.example", user="ada@example.com", secret=victim, now=0.0, wall=WALL)
    store.put(host="b.example", user="ada@example.com", secret=hostile, now=0.0, wall=WALL)
    assert len(store) == 2
    assert store.newest(1.0, host="a.example").secret == victim
    assert store.newest(1.0, host="b.example").secret == hostile
    assert [held.secret for held in store.matching(1.0, host="b.example")] == [hostile]


@pytest.mark.parametrize("prefix", ["55d7", "55d74bcc33ef"])
def test_a_prefix_of_both_colliding_ids_is_ambiguous(prefix: str) -> None:
    """Selecting by a prefix both digests share answers ambiguous and asks for more digits."""
    store = KeyStore()
    for secret in COLLIDING:
        store.put(host="h.example", user="u@example.com", secret=secret, now=0.0, wall=WALL)
    with pytest.raises(Ambiguous, match="more of its characters"):
        store.newest(1.0, key_id=prefix)


@pytest.mark.parametrize("digits", [13, 20, 64])
def test_a_longer_prefix_tells_colliding_keys_apart(digits: int) -> None:
    """13 to 64 digits of the digest name one of two keys whose 12-digit ids agree."""
    store = KeyStore()
    for secret in COLLIDING:
        store.put(host="h.example", user="u@example.com", secret=secret, now=0.0, wall=WALL)
    for secret in COLLIDING:
        assert store.newest(1.0, key_id=digest_of(secret)[:digits]).secret == secret


def test_discarding_one_colliding_key_keeps_the_other() -> None:
    """discard() takes the full digest: the other key with the same short id stays."""
    store = KeyStore()
    first, second = COLLIDING
    for secret in COLLIDING:
        store.put(host="h.example", user="u@example.com", secret=secret, now=0.0, wall=WALL)
    assert store.discard(key_id_for(first)) is None
    assert store.discard(digest_of(first)) is not None
    assert [held.secret for held in store.matching(1.0)] == [second]


# --- the cap on held keys --------------------------------------------------------------------


def test_past_the_cap_put_raises_too_many_and_changes_nothing() -> None:
    """A full store refuses a new key with too_many; re-adding a held key still works."""
    store = KeyStore(max_keys=2)
    for secret in ("one", "two"):
        store.put(host="h.example", user="u@example.com", secret=secret, now=0.0, wall=WALL)
    version = store.version
    with pytest.raises(TooMany, match="--max-keys"):
        store.put(host="h.example", user="u@example.com", secret="three", now=0.0, wall=WALL)
    assert store.version == version
    assert sorted(held.secret for held in store.matching(0.0)) == ["one", "two"]
    store.put(host="h.example", user="u@example.com", secret="one", now=0.0, wall=WALL)
    assert len(store) == 2
