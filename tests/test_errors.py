"""Unit tests for keyagent.errors: the exception tree, wire codes and from_code."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyagent import errors
from keyagent.errors import (
    WIRE_CODES,
    AgentUnreachable,
    Internal,
    KeyagentError,
    ProtocolError,
    from_code,
)


def _all_error_classes() -> list[type[KeyagentError]]:
    found: list[type[KeyagentError]] = []
    pending: list[type[KeyagentError]] = [KeyagentError]
    while pending:
        cls = pending.pop()
        if cls.__module__ == errors.__name__:
            found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


LEAVES = [cls for cls in _all_error_classes() if cls is not KeyagentError]
EXPORTED = [
    getattr(errors, name)
    for name in errors.__all__
    if isinstance(getattr(errors, name), type) and issubclass(getattr(errors, name), Exception)
]


def test_every_leaf_has_its_own_code() -> None:
    """No two leaf classes share a wire code, so from_code is unambiguous."""
    codes = [cls.code for cls in LEAVES]
    assert len(codes) == len(set(codes))


def test_every_exported_exception_is_a_keyagent_error() -> None:
    """Every exception class in __all__ derives from the single root KeyagentError."""
    assert EXPORTED
    for cls in EXPORTED:
        assert issubclass(cls, KeyagentError)


def test_every_leaf_is_exported() -> None:
    """Every leaf defined in keyagent.errors is part of the public API."""
    assert set(LEAVES) <= set(EXPORTED)


def test_wire_codes_are_unique_and_exclude_client_side_codes() -> None:
    """WIRE_CODES lists each code once and leaves out the client-only codes."""
    assert len(WIRE_CODES) == len(set(WIRE_CODES))
    assert AgentUnreachable.code not in WIRE_CODES
    assert ProtocolError.code not in WIRE_CODES
    assert {cls.code for cls in LEAVES} - set(WIRE_CODES) == {
        AgentUnreachable.code,
        ProtocolError.code,
        errors.BadConfig.code,
    }


def test_wire_codes_include_the_protocol_v1_codes() -> None:
    """The codes protocol v1 promises never to rename are all present."""
    expected = {
        "bad_request",
        "unknown_op",
        "too_large",
        "not_found",
        "ambiguous",
        "locked",
        "not_locked",
        "bad_passphrase",
        "forbidden",
        "busy",
        "timeout",
        "internal",
        "login_required",
        "bad_credentials",
        "session_expired",
        "remote_error",
        "remote_unreachable",
        "tls_error",
        "keyring_unavailable",
    }
    assert expected <= set(WIRE_CODES)


@pytest.mark.parametrize("code", WIRE_CODES)
def test_from_code_round_trips_every_wire_code(code: str) -> None:
    """from_code rebuilds, for every wire code, a leaf whose class carries that same code."""
    error = from_code(code, "a message")
    assert type(error) is not KeyagentError
    assert type(error).code == code
    assert error.code == code
    assert error.message == "a message"


@pytest.mark.parametrize("cls", LEAVES, ids=lambda cls: cls.__name__)
def test_to_wire_then_from_code_gives_back_the_same_class(cls: type[KeyagentError]) -> None:
    """An error sent with to_wire comes back from from_code as the same class and message."""
    original = cls("what went wrong; do this next")
    wire = original.to_wire()
    assert wire == {"code": cls.code, "message": "what went wrong; do this next"}
    rebuilt = from_code(wire["code"], wire["message"])
    assert type(rebuilt) is cls
    assert rebuilt.message == original.message


def test_internal_code_maps_to_the_internal_leaf_not_the_root() -> None:
    """The internal code, shared by the root and Internal, rebuilds as Internal."""
    error = from_code("internal")
    assert type(error) is Internal
    assert error.message == KeyagentError.default_message


def test_from_code_keeps_an_unknown_code_verbatim() -> None:
    """An unknown code from a newer agent becomes a root error that keeps the code."""
    error = from_code("brand_new_code", "something new happened")
    assert type(error) is KeyagentError
    assert error.code == "brand_new_code"
    assert error.message == "something new happened"
    assert error.to_wire() == {"code": "brand_new_code", "message": "something new happened"}


def test_from_code_unknown_code_does_not_change_the_class_code() -> None:
    """Keeping an unknown code sets it on the instance only, never on KeyagentError itself."""
    from_code("another_new_code")
    assert KeyagentError.code == "internal"
    assert KeyagentError().code == "internal"


def test_from_code_without_message_uses_the_default_message() -> None:
    """A reply without a message rebuilds with the class's default message."""
    for code in WIRE_CODES:
        error = from_code(code)
        assert error.message == type(error).default_message


def test_from_code_still_knows_client_side_codes() -> None:
    """The client-only codes rebuild as their own classes too."""
    assert type(from_code("no_agent")) is AgentUnreachable
    assert type(from_code("bad_reply")) is ProtocolError


@settings(max_examples=100)
@given(code=st.text(max_size=40), message=st.text(min_size=1, max_size=80))
def test_from_code_always_returns_an_error_with_the_given_code(code: str, message: str) -> None:
    """For any code string, from_code returns a KeyagentError carrying that code and message."""
    error = from_code(code, message)
    assert isinstance(error, KeyagentError)
    assert error.code == code
    assert error.message == message


@pytest.mark.parametrize("cls", [KeyagentError, *LEAVES], ids=lambda cls: cls.__name__)
def test_default_message_is_one_nonempty_line(cls: type[KeyagentError]) -> None:
    """Every default message is a single non-empty line that names a next step after a ';'."""
    message = cls.default_message
    assert message
    assert "\n" not in message
    assert message == message.strip()
    assert ";" in message


@pytest.mark.parametrize("cls", [KeyagentError, *LEAVES], ids=lambda cls: cls.__name__)
def test_message_defaults_and_str(cls: type[KeyagentError]) -> None:
    """Without a message an error uses its default, and str() is the message."""
    error = cls()
    assert error.message == cls.default_message
    assert str(error) == cls.default_message
    assert error.args == (cls.default_message,)


def test_empty_message_falls_back_to_the_default() -> None:
    """An empty message is treated like no message: the default message is used."""
    assert errors.NotFound("").message == errors.NotFound.default_message


def test_explicit_message_wins_over_the_default() -> None:
    """A given message replaces the default and is what str() shows."""
    error = errors.NotFound("no key for host example.com; add one")
    assert error.message == "no key for host example.com; add one"
    assert str(error) == "no key for host example.com; add one"


def test_repr_names_the_class_and_message() -> None:
    """repr shows the leaf class and its message, not the root class."""
    assert repr(errors.Locked("the agent is locked")) == "Locked('the agent is locked')"


def test_leaves_are_catchable_as_the_root() -> None:
    """Every leaf can be caught with except KeyagentError."""
    for cls in LEAVES:
        with pytest.raises(KeyagentError):
            raise cls()
