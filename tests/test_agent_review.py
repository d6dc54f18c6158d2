"""Regression tests for the review's findings in the agent's request logic (issue 9).

Colliding key ids, keys a hostile service hands out, the cap on held keys, and what a locked
agent tells. Each drives the real :class:`~keyagent.agent.Agent` with fake Conduce accounts.
"""

from __future__ import annotations

import pytest

from keyagent import errors
from keyagent.agent import Agent
from keyagent.effects import Work
from keyagent.store import digest_of, key_id_for

from .conftest import COLLIDING_KEYS
from .fakes import FakeAccount, FakeTime, fails, run, steps

VICTIM_HOST, HOSTILE_HOST, USER = "a.example", "b.example", "ada@example.com"
# Two secrets whose SHA-256 share their first 12 hex digits (55d74bcc33ef).
VICTIM_KEY, HOSTILE_KEY = COLLIDING_KEYS


@pytest.fixture
def accounts() -> dict[str, FakeAccount]:
    return {VICTIM_HOST: FakeAccount(), HOSTILE_HOST: FakeAccount()}


@pytest.fixture
def agent(accounts: dict[str, FakeAccount]) -> Agent:
    agent = Agent(clock=FakeTime().clock(), accounts=lambda host, user: accounts[host])
    run(agent, "login", host=HOSTILE_HOST, user=USER, password="pw")
    return agent


def test_a_key_with_a_colliding_id_from_a_hostile_create_does_not_move_the_victims_key(
    agent: Agent, accounts: dict[str, FakeAccount]
) -> None:
    """A hostile host's create returning a key whose 12-digit id collides with a held key
    leaves the victim's key bound to its own host: it is never served for the hostile one."""
    run(agent, "add", host=VICTIM_HOST, user=USER, key=VICTIM_KEY)
    accounts[HOSTILE_HOST].issue.append(HOSTILE_KEY)
    created = run(agent, "create", host=HOSTILE_HOST, user=USER, reveal=True)
    assert created["key"] == HOSTILE_KEY
    assert run(agent, "get", host=VICTIM_HOST)["key"] == VICTIM_KEY
    assert run(agent, "get", host=HOSTILE_HOST)["key"] == HOSTILE_KEY
    assert len(run(agent, "list")["keys"]) == 2


def test_a_hostile_create_cannot_send_a_held_key_to_itself(
    agent: Agent, accounts: dict[str, FakeAccount]
) -> None:
    """A create whose answer is a key held for another account is refused as remote_error,
    and the key stays bound to its own account only."""
    run(agent, "add", host=VICTIM_HOST, user=USER, key=VICTIM_KEY)
    accounts[HOSTILE_HOST].issue.append(VICTIM_KEY)
    error = fails(agent, "create", host=HOSTILE_HOST, user=USER)
    assert isinstance(error, errors.RemoteError)
    assert VICTIM_KEY not in error.message
    assert isinstance(fails(agent, "get", host=HOSTILE_HOST), errors.NotFound)
    assert run(agent, "get", host=VICTIM_HOST)["key"] == VICTIM_KEY


@pytest.mark.parametrize("op", ["get", "forget"])
def test_the_shared_short_id_is_ambiguous_and_a_longer_one_is_not(agent: Agent, op: str) -> None:
    """Selecting by the 12 digits two keys share is ambiguous; 13 or more name one key."""
    run(agent, "add", host=VICTIM_HOST, user=USER, key=VICTIM_KEY)
    run(agent, "add", host=HOSTILE_HOST, user=USER, key=HOSTILE_KEY)
    shared = key_id_for(VICTIM_KEY)
    assert isinstance(fails(agent, op, key_id=shared), errors.Ambiguous)
    longer = digest_of(HOSTILE_KEY)[:13]
    if op == "get":
        assert run(agent, "get", key_id=longer)["key"] == HOSTILE_KEY
    else:
        assert run(agent, "forget", key_id=longer)["key_id"] == key_id_for(HOSTILE_KEY)
        assert run(agent, "get", key_id=shared)["key"] == VICTIM_KEY


def test_remove_by_a_shared_short_id_is_ambiguous(agent: Agent) -> None:
    """remove by an id prefix two held keys share deletes nothing and says ambiguous."""
    run(agent, "add", host=VICTIM_HOST, user=USER, key=VICTIM_KEY)
    run(agent, "add", host=HOSTILE_HOST, user=USER, key=HOSTILE_KEY)
    error = fails(agent, "remove", key_id=key_id_for(VICTIM_KEY))
    assert isinstance(error, errors.Ambiguous)
    assert len(run(agent, "list")["keys"]) == 2


def test_past_max_keys_add_and_create_answer_too_many_and_nothing_changes(
    accounts: dict[str, FakeAccount],
) -> None:
    """At the cap, add and create answer too_many; create does not even call the service."""
    agent = Agent(clock=FakeTime().clock(), accounts=lambda host, user: accounts[host], max_keys=1)
    run(agent, "add", host=VICTIM_HOST, user=USER, key=VICTIM_KEY)
    assert isinstance(
        fails(agent, "add", host=VICTIM_HOST, user=USER, key=HOSTILE_KEY), errors.TooMany
    )
    calls = list(accounts[HOSTILE_HOST].calls)
    assert isinstance(fails(agent, "create", host=HOSTILE_HOST, user=USER), errors.TooMany)
    assert accounts[HOSTILE_HOST].calls == calls
    assert [key["key_id"] for key in run(agent, "list")["keys"]] == [key_id_for(VICTIM_KEY)]
    # Re-adding a held key is no new key: it still works at the cap.
    run(agent, "add", host=VICTIM_HOST, user=USER, key=VICTIM_KEY, description="again")


def test_the_too_many_code_is_on_the_wire() -> None:
    """too_many is a defined error code, rebuilt as TooMany on the client side."""
    assert errors.TooMany.code == "too_many"
    assert type(errors.from_code("too_many", "full")) is errors.TooMany


def test_two_creates_racing_for_the_last_place_do_not_both_reach_the_service(
    accounts: dict[str, FakeAccount],
) -> None:
    """A create waiting on the service holds the last place: a second create (or an add)
    answers too_many at once, and no key is made on the service that the agent cannot hold."""
    agent = Agent(clock=FakeTime().clock(), accounts=lambda host, user: accounts[host], max_keys=2)
    run(agent, "add", host=VICTIM_HOST, user=USER, key=VICTIM_KEY)
    run(agent, "login", host=HOSTILE_HOST, user=USER, password="pw")
    first = steps(agent, "create", host=HOSTILE_HOST, user=USER)
    work = next(first)  # waiting on the service, as it would on a worker thread
    assert isinstance(work, Work)
    calls = list(accounts[HOSTILE_HOST].calls)
    assert isinstance(fails(agent, "create", host=HOSTILE_HOST, user=USER), errors.TooMany)
    assert isinstance(fails(agent, "add", host=VICTIM_HOST, user=USER, key="k-3"), errors.TooMany)
    assert accounts[HOSTILE_HOST].calls == calls  # the second create never reached it
    with pytest.raises(StopIteration) as finished:
        first.send(work.fn())
    assert finished.value.value["source"] == "created"
    assert len(run(agent, "list")["keys"]) == 2


def test_a_create_that_fails_gives_its_place_back(accounts: dict[str, FakeAccount]) -> None:
    """A place taken by a create is returned when the service refuses: the next add fits."""
    agent = Agent(clock=FakeTime().clock(), accounts=lambda host, user: accounts[host], max_keys=1)
    assert isinstance(fails(agent, "create", host=HOSTILE_HOST, user=USER), errors.LoginRequired)
    run(agent, "add", host=VICTIM_HOST, user=USER, key=VICTIM_KEY)
