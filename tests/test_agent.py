"""Unit tests for keyagent.agent: every operation through Agent.handle, with a fake clock.

Handlers that wait are driven by the effects driver's inline mode (tests/fakes.py), the same
stepping the server uses; a few tests step a handler by hand to see what it waits for.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import TYPE_CHECKING, Any

import pytest

from keyagent import __version__
from keyagent.agent import Agent, Stop
from keyagent.effects import InlineDriver, Sleep, Work
from keyagent.errors import (
    Ambiguous,
    BadPassphrase,
    BadRequest,
    Internal,
    KeyagentError,
    Locked,
    NotFound,
    NotLocked,
    UnknownOp,
)
from keyagent.protocol import MAX_LIFETIME, OPS, PROTOCOL_VERSION
from keyagent.store import derive, digest_of, iso, key_id_for

from .fakes import PEER, VALID_ARGS, WALL, FakeTime, driver_for, request, settle, steps

if TYPE_CHECKING:
    from keyagent.agent import Outcome
    from keyagent.effects import Steps

SECRET = "zebra-quokka-7781-S3CR3T"
PASSPHRASE = "correct horse battery"
SALT = b"\x07" * 16
HOST = "app.conduce.com"
USER = "ada@example.com"

CORE_OPS = ["hello", "status", "add", "get", "list", "forget", "lock", "unlock", "stop", "log"]

# Valid arguments for every protocol op, to build requests that pass validation.


def call(agent: Agent, op: str, **args: Any) -> Outcome:
    return agent.handle(request(op, **args), PEER)


def result(agent: Agent, op: str, **args: Any) -> dict[str, Any]:
    """The result of a request, waited for (inline) if its handler waits."""
    outcome = settle(agent, call(agent, op, **args))
    assert isinstance(outcome, dict)
    return outcome


def fails(agent: Agent, op: str, **args: Any) -> KeyagentError:
    """The error a request ends with, waited for (inline) if its handler waits."""
    with pytest.raises(KeyagentError) as caught:
        settle(agent, call(agent, op, **args))
    assert not isinstance(caught.value, Internal), "a bug, not a refusal"
    return caught.value


def work_of(handler: Steps) -> Work:
    """Start a waiting handler; the Work it yields first."""
    effect = next(handler)
    assert isinstance(effect, Work)
    return effect


def finish(handler: Steps, value: object) -> object:
    """Resume a handler with its work's value; what it returns, or the error it raises."""
    with pytest.raises(StopIteration) as stop:
        handler.send(value)
    return stop.value.value


def is_locked(agent: Agent) -> bool:
    """The lock state, read through a call so mypy does not narrow it across steps."""
    return agent.lock.locked


def add(agent: Agent, key: str = SECRET, **args: Any) -> dict[str, Any]:
    return result(
        agent, "add", host=args.pop("host", HOST), user=args.pop("user", USER), key=key, **args
    )


def colliding_keys() -> tuple[str, str, str]:
    """Two keys whose key ids share their first four characters, and that prefix."""
    seen: dict[str, str] = {}
    for index in itertools.count():
        key = f"collide-{index}"
        prefix = key_id_for(key)[:4]
        if prefix in seen:
            return seen[prefix], key, prefix
        seen[prefix] = key
    raise AssertionError("unreachable")  # pragma: no cover


@pytest.fixture
def time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def agent(time: FakeTime) -> Agent:
    return Agent(socket_path="/run/user/1000/keyagent/socket", clock=time.clock())


@pytest.fixture(scope="module")
def digest() -> bytes:
    return derive(PASSPHRASE, SALT)


@pytest.fixture
def locked(agent: Agent, digest: bytes) -> Agent:
    """The agent, holding one key, locked with PASSPHRASE (engaged directly, to skip scrypt)."""
    add(agent)
    agent.lock.engage(SALT, digest)
    return agent


# --- dispatch --------------------------------------------------------------------------------


def test_agent_serves_the_core_ops_in_protocol_order(agent: Agent) -> None:
    """agent.ops lists the core ops it has handlers for, in the order OPS defines them."""
    assert set(CORE_OPS) <= set(agent.ops)
    assert set(agent.ops) <= set(OPS)
    assert agent.ops == [op for op in OPS if op in agent.ops]


# What each core op comes to on a fresh, unlocked agent: its result's keys or its error.
FRESH_OUTCOMES: dict[str, set[str] | type[KeyagentError]] = {
    "hello": {"protocol", "version", "ops"},
    "status": {"pid", "socket", "http_socket", "http_workers", "http_workers_max", "version",
               "uptime", "locked", "keys", "default_lifetime", "sessions", "pending_deletions",
               "leftovers"},
    "add": {"key_id", "fingerprint", "host", "user", "description", "created", "added",
            "expires", "source", "persisted", "exportable", "confirm", "allowed_exes",
            "ephemeral", "rotate_every", "next_rotation", "refused"},
    "get": NotFound,
    "list": {"keys"},
    "forget": {"forgotten"},
    "lock": {"locked"},
    "unlock": NotLocked,
    "stop": {"stopping"},
    "log": {"entries"},
}  # fmt: skip


@pytest.mark.parametrize("op", list(OPS))
def test_each_protocol_op_is_served_or_unknown(agent: Agent, op: str) -> None:
    """Each op the bare agent serves comes to its own result or error; any other op known to
    the protocol raises UnknownOp naming it."""
    if op in agent.ops:
        expected = FRESH_OUTCOMES[op]
        if isinstance(expected, set):
            outcome = settle(agent, call(agent, op, **VALID_ARGS[op]))
            assert set(outcome.result if isinstance(outcome, Stop) else outcome) == expected
        else:
            assert type(fails(agent, op, **VALID_ARGS[op])) is expected
    else:
        with pytest.raises(UnknownOp) as caught:
            call(agent, op, **VALID_ARGS[op])
        assert f"'{op}'" in caught.value.message
        assert "not available" in caught.value.message


def test_login_is_not_served_by_the_bare_agent(agent: Agent) -> None:
    """The Conduce ops (login, logout, create, remove) have no handler in the bare agent."""
    for op in ("login", "logout", "create", "remove"):
        assert op not in agent.ops
        with pytest.raises(UnknownOp):
            call(agent, op, **VALID_ARGS[op])


def test_handle_uses_the_validated_args(agent: Agent) -> None:
    """handle passes the request's validated arguments (a lowercased key id) to the handler."""
    added = add(agent)
    got = result(agent, "get", key_id=added["key_id"][:6].upper())
    assert got["key"] == SECRET


# --- hello and status --------------------------------------------------------------------------


def test_hello_lists_protocol_version_and_ops(agent: Agent) -> None:
    """hello answers with the protocol version, the package version and the served ops."""
    assert result(agent, "hello") == {
        "protocol": PROTOCOL_VERSION,
        "version": __version__,
        "ops": agent.ops,
    }


def test_status_fields(agent: Agent, time: FakeTime) -> None:
    """status reports pid, socket, version, uptime, lock state, key count and settings."""
    time.advance(12.3456)
    assert result(agent, "status") == {
        "pid": os.getpid(),
        "socket": "/run/user/1000/keyagent/socket",
        "http_socket": None,
        "http_workers": [],
        "http_workers_max": None,
        "version": __version__,
        "uptime": 12.346,
        "locked": False,
        "keys": 0,
        "default_lifetime": None,
        "sessions": [],
        "pending_deletions": [],
        "leftovers": None,  # an agent with no leftovers file records nothing for a crash
    }


def test_status_reports_the_default_lifetime(time: FakeTime) -> None:
    """status shows the default lifetime the agent was started with."""
    agent = Agent(default_lifetime=900.0, clock=time.clock())
    assert result(agent, "status")["default_lifetime"] == 900.0


def test_status_counts_only_live_keys(agent: Agent, time: FakeTime) -> None:
    """status counts held keys, leaving out those past their deadline even before reaping."""
    add(agent, "k1", lifetime=10)
    add(agent, "k2")
    assert result(agent, "status")["keys"] == 2
    time.advance(10)
    assert result(agent, "status")["keys"] == 1


def test_agent_with_real_clock_reports_uptime() -> None:
    """Without a fake, the agent uses the real clocks and reports a small, non-negative uptime."""
    status = result(Agent(), "status")
    assert 0 <= status["uptime"] < 60
    assert status["socket"] == ""


# --- add -------------------------------------------------------------------------------------


def test_add_returns_the_listing_without_the_secret(agent: Agent) -> None:
    """add answers with the key's listing: its id, host, user and dates, never the key."""
    added = add(agent, description="laptop")
    assert added == {
        "key_id": key_id_for(SECRET),
        "fingerprint": digest_of(SECRET),
        "host": HOST,
        "user": USER,
        "description": "laptop",
        "created": None,
        "added": iso(WALL),
        "expires": None,
        "source": "added",
        "persisted": False,
        "exportable": True,
        "confirm": False,
        "allowed_exes": [],
        "ephemeral": False,
        "rotate_every": None,
        "next_rotation": None,
        "refused": False,
    }
    assert SECRET not in json.dumps(added)


def test_add_with_lifetime_sets_expiry(agent: Agent) -> None:
    """add with a lifetime lists the wall-clock moment the key expires."""
    assert add(agent, lifetime=90)["expires"] == iso(WALL + 90)


def test_add_same_key_twice_keeps_one(agent: Agent, time: FakeTime) -> None:
    """Adding the same key again updates its entry instead of holding it twice."""
    add(agent, description="first")
    time.advance(5)
    again = add(agent, description="second")
    assert (again["added"], again["description"]) == (iso(WALL + 5), "second")
    keys = result(agent, "list")["keys"]
    assert [entry["description"] for entry in keys] == ["second"]


def test_adding_a_held_key_again_neither_moves_it_nor_lengthens_its_life(
    agent: Agent, time: FakeTime
) -> None:
    """A key goes only to the account it was added for: adding it for another is refused,
    changing nothing, until it is forgotten (or has expired). Added again, it keeps the
    earlier of its deadline and the new one."""
    add(agent, lifetime=60)
    for other in ({"host": "new.example"}, {"user": "someone@example.com"}):
        error = fails(agent, "add", **{"host": HOST, "user": USER, "key": SECRET, **other})
        assert type(error) is BadRequest
        assert f"forget {key_id_for(SECRET)}" in error.message
    assert [(k["host"], k["user"]) for k in result(agent, "list")["keys"]] == [(HOST, USER)]
    time.advance(10)
    assert add(agent)["expires"] == iso(WALL + 60)  # no lifetime given: still its own
    assert add(agent, lifetime=3600)["expires"] == iso(WALL + 60)
    assert add(agent, lifetime=20)["expires"] == iso(WALL + 30)  # a shorter one is taken
    time.advance(25)  # expired: held no more, so it may be added anew, for anyone
    assert add(agent, host="new.example")["host"] == "new.example"


def test_default_lifetime_applies_when_none_given(time: FakeTime) -> None:
    """With a default lifetime, a key added without one expires after the default."""
    agent = Agent(default_lifetime=30.0, clock=time.clock())
    assert add(agent)["expires"] == iso(WALL + 30)
    time.advance(29.999)
    assert result(agent, "get")["key"] == SECRET
    time.advance(0.001)
    with pytest.raises(NotFound):
        call(agent, "get")


def test_explicit_lifetime_overrides_the_default(time: FakeTime) -> None:
    """A lifetime given with add wins over the agent's default lifetime."""
    agent = Agent(default_lifetime=30.0, clock=time.clock())
    assert add(agent, lifetime=120)["expires"] == iso(WALL + 120)
    time.advance(60)
    assert result(agent, "get")["key"] == SECRET


def test_without_default_lifetime_keys_are_kept(agent: Agent, time: FakeTime) -> None:
    """Without a default or a given lifetime, a key is held until forgotten."""
    add(agent)
    time.advance(10 * 365 * 86400)
    assert agent.reap() is None
    assert result(agent, "get")["key"] == SECRET


@pytest.mark.parametrize("lifetime", [1e12, MAX_LIFETIME + 1, 0.0, -1.0])
def test_out_of_range_default_lifetime_is_refused(time: FakeTime, lifetime: float) -> None:
    """A default lifetime that is not positive or is longer than the protocol allows is
    refused when the agent is made, with a message naming the bounds."""
    with pytest.raises(ValueError, match="positive and at most ten years"):
        Agent(default_lifetime=lifetime, clock=time.clock())


def test_the_longest_default_lifetime_is_accepted(time: FakeTime) -> None:
    """The protocol's longest lifetime is a valid default, and keys added get it."""
    agent = Agent(default_lifetime=MAX_LIFETIME, clock=time.clock())
    assert add(agent)["expires"] == iso(WALL + MAX_LIFETIME)


# --- expiry ----------------------------------------------------------------------------------


def test_key_is_served_just_before_its_deadline_and_not_at_it(agent: Agent, time: FakeTime) -> None:
    """A key with a lifetime is served until just before its deadline, and gone at it."""
    added = add(agent, lifetime=60)
    time.advance(59.999)
    assert result(agent, "get")["key"] == SECRET
    assert len(result(agent, "list")["keys"]) == 1
    time.advance(0.001)
    with pytest.raises(NotFound):
        call(agent, "get")
    with pytest.raises(NotFound):
        call(agent, "get", key_id=added["key_id"])
    assert result(agent, "list") == {"keys": []}


def test_reap_drops_expired_keys_and_returns_the_next_deadline(
    agent: Agent, time: FakeTime
) -> None:
    """agent.reap drops what is due and returns the next monotonic deadline, or None."""
    add(agent, "k1", lifetime=10)
    add(agent, "k2", lifetime=20)
    assert agent.reap() == time.monotonic + 10
    time.advance(10)
    assert agent.reap() == time.monotonic + 10
    assert len(agent.held_keys) == 1
    time.advance(10)
    assert agent.reap() is None
    assert len(agent.held_keys) == 0


# --- get -------------------------------------------------------------------------------------


def test_get_returns_the_newest_key_and_its_id(agent: Agent) -> None:
    """get with no selector returns the most recently added key and its key id."""
    add(agent, "older")
    add(agent, "newer")
    assert result(agent, "get") == {"key": "newer", "key_id": key_id_for("newer")}


def test_get_by_host_user_and_key_id(agent: Agent) -> None:
    """get narrows by host, by user and by key id prefix."""
    add(agent, "k1", host="a.example", user="ada")
    add(agent, "k2", host="b.example", user="ada")
    add(agent, "k3", host="a.example", user="bob")
    assert result(agent, "get", host="b.example")["key"] == "k2"
    assert result(agent, "get", user="ada")["key"] == "k2"
    assert result(agent, "get", host="a.example", user="ada")["key"] == "k1"
    assert result(agent, "get", key_id=key_id_for("k1")[:5])["key"] == "k1"


def test_get_without_a_match_is_not_found(agent: Agent) -> None:
    """get with nothing matching raises NotFound naming the selectors, with no secret."""
    add(agent)
    with pytest.raises(NotFound) as caught:
        call(agent, "get", host="other.example")
    assert "host other.example" in caught.value.message
    assert SECRET not in caught.value.message


def test_get_with_ambiguous_prefix(agent: Agent) -> None:
    """get with a key id prefix shared by two keys raises Ambiguous."""
    first, second, prefix = colliding_keys()
    add(agent, first)
    add(agent, second)
    with pytest.raises(Ambiguous):
        call(agent, "get", key_id=prefix)


# --- list ------------------------------------------------------------------------------------


def test_list_shows_keys_oldest_first_without_secrets(agent: Agent, time: FakeTime) -> None:
    """list shows every live key's listing, oldest first, and never a key."""
    add(agent, SECRET)
    time.advance(1)
    add(agent, "k2", description="second")
    listed = result(agent, "list")
    assert [entry["key_id"] for entry in listed["keys"]] == [key_id_for(SECRET), key_id_for("k2")]
    assert listed["keys"][1]["description"] == "second"
    assert listed["keys"][1]["added"] == iso(WALL + 1)
    assert SECRET not in json.dumps(listed)
    assert all("key" not in entry for entry in listed["keys"])


def test_list_filters_by_host_and_user(agent: Agent) -> None:
    """list narrows by host and by user."""
    add(agent, "k1", host="a.example", user="ada")
    add(agent, "k2", host="b.example", user="bob")
    assert [k["host"] for k in result(agent, "list", host="b.example")["keys"]] == ["b.example"]
    assert [k["user"] for k in result(agent, "list", user="ada")["keys"]] == ["ada"]
    assert result(agent, "list", host="a.example", user="bob") == {"keys": []}


def test_list_accepts_remote_flag(agent: Agent) -> None:
    """list accepts the remote flag and still lists held keys."""
    add(agent)
    assert len(result(agent, "list", remote=False)["keys"]) == 1


def test_readded_key_lists_last(agent: Agent) -> None:
    """Re-adding an older key moves it to the end of the list."""
    add(agent, "k1")
    add(agent, "k2")
    add(agent, "k1")
    listed = result(agent, "list")["keys"]
    assert [entry["key_id"] for entry in listed] == [key_id_for("k2"), key_id_for("k1")]


# --- forget ----------------------------------------------------------------------------------


def test_forget_by_key_id(agent: Agent) -> None:
    """forget with a key id drops that key only and reports one forgotten."""
    add(agent, "k1")
    add(agent, "k2")
    assert result(agent, "forget", key_id=key_id_for("k1"))["forgotten"] == 1
    with pytest.raises(NotFound):
        call(agent, "get", key_id=key_id_for("k1"))
    assert result(agent, "get")["key"] == "k2"


def test_forget_by_key_id_prefix(agent: Agent) -> None:
    """forget accepts a unique key id prefix, and names the key it forgot in full."""
    add(agent, "k1")
    assert result(agent, "forget", key_id=key_id_for("k1")[:4]) == {
        "forgotten": 1, "key_id": key_id_for("k1"), "host": HOST, "user": USER,
    }  # fmt: skip
    assert len(agent.held_keys) == 0


def test_forget_with_all_false_and_a_key_id(agent: Agent) -> None:
    """forget with all false and a key id forgets by key id."""
    add(agent, "k1")
    assert result(agent, "forget", key_id=key_id_for("k1"), all=False)["forgotten"] == 1


def test_forget_all(agent: Agent) -> None:
    """forget all drops every key and reports how many."""
    for key in ("k1", "k2", "k3"):
        add(agent, key)
    assert result(agent, "forget", all=True) == {"forgotten": 3}
    assert result(agent, "list") == {"keys": []}
    assert result(agent, "forget", all=True) == {"forgotten": 0}


@pytest.mark.parametrize(
    "args",
    [{}, {"all": False}, {"all": True, "key_id": "abcd"}],
    ids=["neither", "all-false-alone", "both"],
)
def test_forget_needs_exactly_one_of_key_id_and_all(agent: Agent, args: dict[str, Any]) -> None:
    """forget with neither or both of key_id and all is a bad request that forgets nothing."""
    add(agent)
    with pytest.raises(BadRequest, match="either 'key_id' or 'all'"):
        call(agent, "forget", **args)
    assert len(agent.held_keys) == 1


def test_forget_unknown_key_id_is_not_found(agent: Agent) -> None:
    """forget of a key id nobody holds raises NotFound and forgets nothing."""
    add(agent)
    with pytest.raises(NotFound):
        call(agent, "forget", key_id=key_id_for("not held"))
    assert len(agent.held_keys) == 1


def test_forget_ambiguous_prefix_forgets_nothing(agent: Agent) -> None:
    """forget with a prefix shared by two keys raises Ambiguous and keeps both."""
    first, second, prefix = colliding_keys()
    add(agent, first)
    add(agent, second)
    with pytest.raises(Ambiguous):
        call(agent, "forget", key_id=prefix)
    assert len(agent.held_keys) == 2


def test_forget_of_an_expired_key_is_not_found(agent: Agent, time: FakeTime) -> None:
    """A key past its deadline cannot be forgotten by id: it is already gone."""
    added = add(agent, lifetime=5)
    time.advance(5)
    with pytest.raises(NotFound):
        call(agent, "forget", key_id=added["key_id"])


def test_forget_all_counts_only_live_keys(agent: Agent, time: FakeTime) -> None:
    """forget all reports only keys that were still live, matching what list showed."""
    add(agent, "k1", lifetime=5)
    add(agent, "k2")
    time.advance(5)
    assert len(result(agent, "list")["keys"]) == 1
    assert result(agent, "forget", all=True) == {"forgotten": 1}


# --- lock ------------------------------------------------------------------------------------


def test_lock_waits_for_the_derivation_on_the_lock_queue_and_engages_after(agent: Agent) -> None:
    """lock yields the key derivation as Work on the lock queue; the agent locks only once the
    derived hash is sent back in, with the salt it was derived with."""
    handler = steps(agent, "lock", passphrase=PASSPHRASE)
    work = work_of(handler)
    assert (work.queue, work.timeout, work.start_at) == ("lock", None, None)
    assert is_locked(agent) is False
    derived = work.fn()
    assert isinstance(derived, bytes)
    assert len(derived) == 32
    assert is_locked(agent) is False
    assert finish(handler, derived) == {"locked": True}
    assert is_locked(agent) is True
    assert agent.lock.digest == derived
    salt = agent.lock.salt
    assert salt is not None
    assert derive(PASSPHRASE, salt) == derived
    assert result(agent, "status")["locked"] is True


def test_the_work_a_lock_yields_hides_the_passphrase(agent: Agent) -> None:
    """The Work a lock yields does not show the passphrase in its repr."""
    work = work_of(steps(agent, "lock", passphrase=PASSPHRASE))
    assert PASSPHRASE not in repr(work)
    assert repr(work) == "Work(queue='lock', timeout=None)"


def test_lock_uses_a_fresh_salt_each_time(agent: Agent) -> None:
    """Two locks of the same passphrase use different salts."""
    first = steps(agent, "lock", passphrase=PASSPHRASE)
    work_of(first)
    finish(first, b"\x01" * 32)
    first_salt = agent.lock.salt
    agent.lock.try_release(b"\x01" * 32)
    second = steps(agent, "lock", passphrase=PASSPHRASE)
    work_of(second)
    finish(second, b"\x02" * 32)
    assert agent.lock.salt != first_salt


def test_lock_when_locked_is_refused(locked: Agent) -> None:
    """A lock request while locked raises Locked."""
    with pytest.raises(Locked):
        call(locked, "lock", passphrase="another one")


def test_second_lock_finishing_later_is_refused(agent: Agent) -> None:
    """Of two locks started together, the one that finishes second raises Locked."""
    first = steps(agent, "lock", passphrase=PASSPHRASE)
    second = steps(agent, "lock", passphrase="other passphrase")
    work_of(first)
    work_of(second)
    assert finish(first, b"\x01" * 32) == {"locked": True}
    with pytest.raises(Locked, match="already locked"):
        second.send(b"\x02" * 32)
    assert agent.lock.digest == b"\x01" * 32


@pytest.mark.parametrize("op", list(OPS))
def test_while_locked_only_hello_status_unlock_and_stop_are_served(locked: Agent, op: str) -> None:
    """While locked, every served op but hello, status, unlock and stop raises Locked."""
    if op not in locked.ops:
        with pytest.raises(UnknownOp):
            call(locked, op, **VALID_ARGS[op])
    elif op in {"hello", "status", "unlock", "stop"}:
        call(locked, op, **VALID_ARGS[op])  # served: not refused as locked
    else:
        with pytest.raises(Locked) as caught:
            call(locked, op, **VALID_ARGS[op])
        assert caught.value.message == Locked.default_message
    assert locked.lock.locked
    assert len(locked.held_keys) == 1


def test_locked_get_refuses_even_a_missing_key(locked: Agent) -> None:
    """The lock check comes first: a get that would be NotFound raises Locked instead."""
    with pytest.raises(Locked):
        call(locked, "get", host="nowhere.example")


def test_stop_while_locked_stops(locked: Agent) -> None:
    """stop is served while locked: stopping reveals nothing (ssh-agent can be killed too)."""
    assert call(locked, "stop") == Stop({"stopping": True, "locked": True})


def test_status_while_locked_tells_nothing_about_keys_or_sessions(locked: Agent) -> None:
    """A locked agent's status says it is locked and nothing of keys, hosts or users."""
    status = call(locked, "status")
    assert isinstance(status, dict)
    assert status["locked"] is True
    assert not {"keys", "sessions", "default_lifetime"} & set(status)
    assert "@" not in repr(status)


# --- unlock ----------------------------------------------------------------------------------


def test_unlock_when_not_locked_is_not_locked(agent: Agent) -> None:
    """unlock on an unlocked agent raises NotLocked at its first step, before any work."""
    with pytest.raises(NotLocked):
        next(steps(agent, "unlock", passphrase=PASSPHRASE))


def test_unlock_with_the_right_passphrase(locked: Agent) -> None:
    """unlock with the right passphrase derives on the lock queue and unlocks the agent."""
    work = work_of(steps(locked, "unlock", passphrase=PASSPHRASE))
    assert work.queue == "lock"
    assert PASSPHRASE not in repr(work)
    assert result(locked, "unlock", passphrase=PASSPHRASE) == {"locked": False}
    assert locked.lock.locked is False
    assert result(locked, "get")["key"] == SECRET
    assert result(locked, "status")["locked"] is False


def test_wrong_passphrase_is_answered_after_growing_delays(locked: Agent, time: FakeTime) -> None:
    """Each wrong unlock raises BadPassphrase after a delay on the agent's clock: 0.1 s, then
    0.2 s, then 0.4 s (a fake clock: the test does not wait them out)."""
    delays = []
    for _ in range(3):
        started = time.monotonic
        assert isinstance(fails(locked, "unlock", passphrase="wrong horse"), BadPassphrase)
        delays.append(time.monotonic - started)
        assert locked.lock.locked
    assert delays == pytest.approx([0.1, 0.2, 0.4])
    assert locked.lock.failures == 3


def test_a_wrong_passphrase_yields_a_sleep_of_the_delay(locked: Agent) -> None:
    """After a wrong passphrase the handler yields Sleep(delay), then raises BadPassphrase."""
    handler = steps(locked, "unlock", passphrase="wrong horse")
    work_of(handler)
    pause = handler.send(b"\x06" * 32)
    assert isinstance(pause, Sleep)
    assert pause.seconds == pytest.approx(0.1)
    with pytest.raises(BadPassphrase):
        handler.send(None)


def test_a_guess_made_during_the_delay_starts_after_it(locked: Agent, time: FakeTime) -> None:
    """A second unlock sent while a wrong one's reply is held back does not derive until the
    delay is over: its own answer comes 0.1 s + 0.2 s after both were sent, not 0.2 s."""
    driver = driver_for(locked)
    start = time.monotonic
    answered: dict[str, float] = {}

    def first_answered(_result: object, _error: KeyagentError | None) -> None:
        answered["first"] = time.monotonic - start

    driver.start(steps(locked, "unlock", passphrase="wrong horse"), first_answered)
    with pytest.raises(BadPassphrase):
        driver.run(steps(locked, "unlock", passphrase="wrong again"))
    assert answered["first"] == pytest.approx(0.1)
    assert time.monotonic - start == pytest.approx(0.3)


def test_the_next_guess_waits_for_the_delay_on_the_agent_clock(
    locked: Agent, time: FakeTime
) -> None:
    """The Work of an unlock starts no earlier than the last failure's delay allows, read on
    the agent's clock when it reaches the head of the lock queue."""
    assert type(fails(locked, "unlock", passphrase="wrong horse")) is BadPassphrase
    work = work_of(steps(locked, "unlock", passphrase=PASSPHRASE))
    assert work.start_at is not None
    assert work.start_at() == pytest.approx(time.monotonic)
    locked.lock.not_before = time.monotonic + 5
    assert work.start_at() == time.monotonic + 5


def test_right_passphrase_after_failures_resets_the_delay(locked: Agent) -> None:
    """After a successful unlock the failure count starts over at the next lock."""
    for _ in range(2):
        assert type(fails(locked, "unlock", passphrase="wrong horse")) is BadPassphrase
    assert result(locked, "unlock", passphrase=PASSPHRASE) == {"locked": False}
    assert locked.lock.failures == 0
    relock = steps(locked, "lock", passphrase="new passphrase")
    work_of(relock)
    finish(relock, b"\x05" * 32)
    handler = steps(locked, "unlock", passphrase="anything")
    work_of(handler)
    pause = handler.send(b"\x06" * 32)
    assert isinstance(pause, Sleep)
    assert pause.seconds == pytest.approx(0.1)


def test_wrong_passphrase_error_never_contains_it(locked: Agent) -> None:
    """The BadPassphrase a wrong unlock raises does not repeat the passphrase tried."""
    error = fails(locked, "unlock", passphrase=SECRET)
    assert isinstance(error, BadPassphrase)
    assert SECRET not in error.message
    assert SECRET not in repr(error)


def test_unlock_raced_by_another_unlock_is_not_locked(locked: Agent, digest: bytes) -> None:
    """Of two unlocks in flight, the one finishing after the agent unlocked raises NotLocked."""
    first = steps(locked, "unlock", passphrase=PASSPHRASE)
    second = steps(locked, "unlock", passphrase=PASSPHRASE)
    work_of(first)
    work_of(second)
    assert finish(first, digest) == {"locked": False}
    with pytest.raises(NotLocked, match="meanwhile"):
        second.send(digest)


def test_unlock_started_before_a_relock_is_not_locked(locked: Agent, digest: bytes) -> None:
    """An unlock that began under an earlier lock cannot release a newer lock."""
    stale = steps(locked, "unlock", passphrase=PASSPHRASE)
    work_of(stale)
    assert result(locked, "unlock", passphrase=PASSPHRASE) == {"locked": False}
    relock = steps(locked, "lock", passphrase=PASSPHRASE)
    work_of(relock)
    finish(relock, b"\x09" * 32)
    with pytest.raises(NotLocked, match="meanwhile"):
        stale.send(digest)
    assert locked.lock.locked
    assert locked.lock.failures == 0


# --- stop ------------------------------------------------------------------------------------


def test_stop_returns_stop(agent: Agent) -> None:
    """stop returns at once a Stop outcome whose result says the agent is stopping."""
    assert call(agent, "stop") == Stop({"stopping": True})


def test_stop_is_immutable() -> None:
    """A Stop outcome cannot be changed once made."""
    with pytest.raises(AttributeError):
        Stop({}).result = {"x": 1}


# --- the inline driver ---------------------------------------------------------------------


def test_the_inline_driver_throws_work_errors_into_the_handler(time: FakeTime) -> None:
    """A KeyagentError raised by Work is thrown into the generator, which may catch it; an
    exception of any other kind comes back as internal, never as itself."""

    def failing() -> None:
        raise NotFound("gone")

    def broken() -> None:
        raise ValueError("a secret may be in here")

    def handler() -> Steps:
        try:
            yield Work(failing)
        except NotFound as error:
            caught = error.message
        try:
            yield Work(broken)
        except KeyagentError as error:
            return {"caught": caught, "then": error.code}
        return {}

    driver = InlineDriver(time.clock().monotonic, time.advance)
    assert driver.run(handler()) == {"caught": "gone", "then": "internal"}
