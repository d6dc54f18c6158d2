"""What the agent lends a proxied request crosses to the HTTP worker as JSON (keyagent.grant):
every field survives the trip, and anything that is not a grant is refused as a bug."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from keyagent.errors import Internal
from keyagent.grant import Grant
from keyagent.store import HeldKey

SECRET = "grant-secret-key-0001-abcdefgh"


def key_grant() -> Grant:
    digest = hashlib.sha256(SECRET.encode()).hexdigest()
    held = HeldKey(
        digest=digest, host="app.conduce.com", user="ada@example.com", secret=SECRET,
        added=0.0, deadline=100.0,
    )  # fmt: skip
    return Grant.of_key(held, confirmed=True, token=None, mark="key 1, lock 0")


def test_a_key_grant_and_a_session_grant_survive_the_wire() -> None:
    """from_wire(to_wire) gives back every field, with the generation as the token; the
    mark (what the agent remembers the user allowed) is the agent's and stays with it."""
    session = Grant(
        "h:8443", "bob@example.com", header="Cookie", value="session=s; x=y", mark="session 1"
    )
    for grant in (key_grant(), session):
        back = Grant.from_wire(json.loads(json.dumps(grant.to_wire(7))))
        for name in Grant.__slots__:
            expected = {"token": 7, "mark": None}.get(name, getattr(grant, name))
            assert getattr(back, name) == expected, name
    assert key_grant().session is False
    assert session.session is True
    assert key_grant().value == f"Bearer {SECRET}"


@pytest.mark.parametrize(
    "change",
    [
        {"header": "X-Api-Key"},
        {"value": None},
        {"host": 1},
        {"digest": 5},
        {"session": True},  # a key's grant claiming to be the session
        {"confirmed": "yes"},
        {"token": "7"},
        {"token": True},
        {"deadline": "soon"},
    ],
)
def test_anything_else_is_refused_as_internal(change: dict[str, Any]) -> None:
    """A field of the wrong kind, or a grant that contradicts itself, is not a grant."""
    data = {**key_grant().to_wire(7), **change}
    with pytest.raises(Internal):
        Grant.from_wire(data)


@pytest.mark.parametrize("data", [None, [], "grant", {"host": "h"}])
def test_a_missing_field_or_no_object_is_refused(data: object) -> None:
    with pytest.raises(Internal):
        Grant.from_wire(data)


def test_a_refusal_never_carries_the_secret() -> None:
    data = {**key_grant().to_wire(7), "token": "bad"}
    with pytest.raises(Internal) as caught:
        Grant.from_wire(data)
    assert SECRET not in str(caught.value)
    assert caught.value.__cause__ is None
    assert SECRET not in repr(key_grant())
