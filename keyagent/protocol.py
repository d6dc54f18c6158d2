"""Protocol v1: one UTF-8 JSON object per line, both ways. No I/O here.

A request line becomes a validated :class:`Request`; a result or an error becomes a reply
line. Every argument of every operation is checked here, before the agent sees it, so the
agent can trust types and ranges. Error messages name the argument and the expected shape but
never echo a value: values may be secrets.
"""

from __future__ import annotations

import math
from collections import namedtuple
from collections.abc import Callable, Mapping

from keyagent.errors import BadRequest, KeyagentError, TooLarge, UnknownOp

# The rules themselves (host grammar, durations, users) are keyagent.rules', shared with
# the configuration, the command lines and the Conduce client; re-exported here for them.
from keyagent.rules import (
    MAX_LIFETIME,
    MIN_ROTATE_EVERY,
    NOT_AN_ENTRY_COUNT,
    NOT_SECONDS,
    duration_problem,
    entry_count_problem,
    exe_list_problem,
    has_control_characters,
    host_problem,
    is_token,
    is_valid_host,
    rotate_every_problem,
    user_problem,
)
from keyagent.wire import Reply, decode_text, encode_request, encoder, parse_reply, scanner

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Final

PROTOCOL_VERSION: Final = 1
MAX_LINE: Final = 64 * 1024
"""The longest request line the agent reads, in bytes, without its newline."""

Scalar = str | int | float | bool | None

__all__ = [
    "MAX_LIFETIME",
    "MAX_LINE",
    "OPS",
    "PROTOCOL_VERSION",
    "InvalidRequest",
    "Reply",
    "Request",
    "encode_entry",
    "encode_error",
    "encode_request",
    "encode_result",
    "has_control_characters",
    "host_problem",
    "is_token",
    "is_valid_host",
    "parse_reply",
    "parse_request",
    "unique_members",
]


class Request(namedtuple("Request", ["id", "op", "args"])):
    """A validated request (immutable): its echoed ``id``, its ``op`` and its typed arguments."""

    __slots__ = ()

    id: Scalar
    op: str
    args: Mapping[str, Any]

    def __repr__(self) -> str:
        # Arguments may hold a key, a password or a passphrase: show only their names.
        return f"Request(id={self.id!r}, op={self.op!r}, args={sorted(self.args)!r})"


class InvalidRequest(Exception):
    """A line that is not a valid request; carries the error and whatever ``id`` was readable."""

    def __init__(self, error: KeyagentError, request_id: Scalar = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.request_id = request_id


# --- argument validators ---------------------------------------------------------------------

Validator = Callable[[str, object], object]


def _not_token(value: str) -> bool:
    return not is_token(value)


def _not_key(value: str) -> bool:
    # A key goes out in an HTTP header (Authorization: Bearer KEY), which carries ASCII: one
    # with another character could be held, but never sent.
    return not value.isascii() or not is_token(value)


def _has_nul(value: str) -> bool:
    # A password may hold any character but NUL (which no C string carries) or a lone
    # surrogate (which no UTF-8 body carries).
    return "\x00" in value or not _encodable(value)


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


KEY_ID_DIGITS = "0123456789abcdef"
"""A key id is a prefix of the hex SHA-256 of a key (see keyagent.store.digest_of)."""
KEY_ID_SHOWN = 12
"""How many hex digits of a key's SHA-256 are shown as its id by default."""
KEY_ID_MIN, KEY_ID_MAX = 4, 64


def remove_command(host: str, user: str, key: str) -> str:
    """The ``keyagent-ctl remove`` line that deletes ``key`` (an id, or a fingerprint) of
    ``user`` on ``host`` on the service: what logs and advice name, quoted for a POSIX shell,
    with ``--opt=value`` so that a value starting with "-" stays a value."""
    import shlex  # only when a key needs naming: the serving process does not load it

    return shlex.join(["keyagent-ctl", "remove", f"--host={host}", f"--user={user}", key])


def is_key_id_prefix(text: str) -> bool:
    """4 to 64 hex digits, either case: a prefix of a key's SHA-256, as ``get`` and
    ``remove`` take. 12 are shown by default; more tell apart keys whose 12 agree."""
    return KEY_ID_MIN <= len(text) <= KEY_ID_MAX and not text.lower().strip(KEY_ID_DIGITS)


def _text(
    max_len: int, *, min_len: int = 1, forbid: Callable[[str], bool] = has_control_characters
) -> Validator:
    def check(name: str, value: object) -> object:
        if not isinstance(value, str):
            raise BadRequest(f"argument '{name}' must be a string")
        if not min_len <= len(value) <= max_len:
            raise BadRequest(f"argument '{name}' must be {min_len} to {max_len} characters long")
        if forbid(value):
            if forbid is _not_key:
                what = "spaces, control characters or characters other than ASCII"
            elif forbid is _not_token:
                what = "spaces or control characters"
            else:
                what = "control characters"
            raise BadRequest(f"argument '{name}' must not contain {what}")
        return value

    return check


def _key_id(name: str, value: object) -> object:
    if not isinstance(value, str) or not is_key_id_prefix(value):
        raise BadRequest(
            f"argument '{name}' must be {KEY_ID_MIN} to {KEY_ID_MAX} hex characters of a key id"
        )
    return value.lower()


def _boolean(name: str, value: object) -> object:
    if not isinstance(value, bool):
        raise BadRequest(f"argument '{name}' must be true or false")
    return value


def _lifetime(name: str, value: object) -> object:
    problem = duration_problem(value)
    if problem is NOT_SECONDS:
        raise BadRequest(f"argument '{name}' must be a number of seconds")
    if problem is not None:
        raise BadRequest(
            f"argument '{name}' must be a positive number of seconds, at most ten years"
        )
    return float(value)  # type: ignore[arg-type]  # duration_problem checked it is a number


def _rotate_every(name: str, value: object) -> object:
    problem = rotate_every_problem(value)
    if problem is NOT_SECONDS:
        raise BadRequest(f"argument '{name}' must be a number of seconds")
    if problem is not None:
        raise BadRequest(
            f"argument '{name}' must be a number of seconds from {MIN_ROTATE_EVERY:g} (1m) to"
            " ten years"
        )
    return float(value)  # type: ignore[arg-type]  # rotate_every_problem checked it is a number


GET_PURPOSES: Final = ("exec",)
"""What a ``get`` may say its key is for, for the audit log (``keyagent-ctl exec``: "exec")."""


def _purpose(name: str, value: object) -> object:
    if value not in GET_PURPOSES:
        raise BadRequest(f"argument '{name}' must be one of: {', '.join(GET_PURPOSES)}")
    return value


def _entry_count(name: str, value: object) -> object:
    if entry_count_problem(value) is not None:
        raise BadRequest(f"argument '{name}' must be {NOT_AN_ENTRY_COUNT}")
    return value


def _by_rule(what: str, problem_of: Callable[[str], str | None]) -> Validator:
    """A validator for text that a rule of keyagent.rules judges (host, user)."""

    def check(name: str, value: object) -> object:
        if not isinstance(value, str):
            raise BadRequest(f"argument '{name}' must be a string")
        problem = problem_of(value)
        if problem is not None:
            # The reason describes the rule, never the value: a value may be a pasted secret.
            raise BadRequest(f"argument '{name}' is not a {what}: {problem}")
        return value

    return check


def _exe_list(name: str, value: object) -> object:
    """Programs allowed to use a key: absolute, normalised paths (see keyagent.rules), as a
    tuple without repeats."""
    problem = exe_list_problem(value)
    if problem is not None:
        raise BadRequest(f"argument '{name}' is not a list of program paths: {problem}")
    assert isinstance(value, list | tuple)  # noqa: S101  # exe_list_problem checked it
    return tuple(dict.fromkeys(value))


HOST = _by_rule("host", host_problem)
USER = _by_rule("user", user_problem)
KEY = _text(8192, forbid=_not_key)
DESCRIPTION_MAX: Final = 1024
"""The longest description of a key, in characters."""
DESCRIPTION = _text(DESCRIPTION_MAX, min_len=0)
PASSPHRASE = _text(1024)
PASSWORD = _text(4096, forbid=_has_nul)

# name -> (validator, required)
Spec = Mapping[str, tuple[Validator, bool]]

OPS: Final[Mapping[str, Spec]] = {
    "hello": {},
    "status": {},
    "add": {
        "host": (HOST, True),
        "user": (USER, True),
        "key": (KEY, True),
        "description": (DESCRIPTION, False),
        "lifetime": (_lifetime, False),
        "persist": (_boolean, False),
        "export": (_boolean, False),
        "confirm": (_boolean, False),
        "allow_exe": (_exe_list, False),
    },
    "get": {
        "host": (HOST, False),
        "user": (USER, False),
        "key_id": (_key_id, False),
        "purpose": (_purpose, False),
    },
    "list": {"host": (HOST, False), "user": (USER, False), "remote": (_boolean, False)},
    "forget": {
        "key_id": (_key_id, False),
        "all": (_boolean, False),
        "persist": (_boolean, False),
        "local": (_boolean, False),
    },
    "lock": {"passphrase": (PASSPHRASE, True)},
    "unlock": {"passphrase": (PASSPHRASE, True)},
    "stop": {},
    "login": {
        "host": (HOST, True),
        "user": (USER, True),
        "password": (PASSWORD, True),
        "confirm": (_boolean, False),
        "allow_exe": (_exe_list, False),
    },
    "logout": {"host": (HOST, True), "user": (USER, True)},
    "create": {
        "host": (HOST, True),
        "user": (USER, True),
        "description": (DESCRIPTION, False),
        "lifetime": (_lifetime, False),
        "reveal": (_boolean, False),
        "persist": (_boolean, False),
        "keep": (_boolean, False),
        "export": (_boolean, False),
        "confirm": (_boolean, False),
        "allow_exe": (_exe_list, False),
        "rotate_every": (_rotate_every, False),
    },
    "remove": {
        "key_id": (_key_id, False),
        "key": (KEY, False),
        "host": (HOST, False),
        "user": (USER, False),
    },
    "log": {"n": (_entry_count, False), "follow": (_boolean, False)},
    "prune": {"host": (HOST, True), "user": (USER, True), "delete": (_boolean, False)},
    "rotate": {
        "key_id": (_key_id, False),
        "all": (_boolean, False),
        "host": (HOST, False),
        "user": (USER, False),
    },
}


# --- decoding --------------------------------------------------------------------------------


def unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json`` ``object_pairs_hook``: an object whose names are all different, else
    ValueError(:data:`DUPLICATE`). Two parsers that disagree on which duplicate wins are a
    classic smuggling vector; refusing duplicates removes the question. Used for clients'
    requests here and for the service's answers (:mod:`keyagent.conduce`)."""
    members = dict(pairs)
    if len(members) != len(pairs):
        raise ValueError(DUPLICATE)
    return members


DUPLICATE: Final = "duplicate member name"


_scan = scanner(unique_members)  # NaN and Infinity are refused too


def _printable(name: str) -> str:
    """An op or argument name fit to quote back: short and without control characters."""
    return name if len(name) <= 32 and not has_control_characters(name) else "?"


def _is_scalar(value: object) -> bool:
    # 1e400 parses as infinity, which no reply could echo back as JSON.
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, str | int | bool)


def parse_request(line: bytes) -> Request:
    """Turn one request line (without its newline) into a validated :class:`Request`.

    Raises :class:`InvalidRequest` carrying ``too_large``, ``bad_request`` or ``unknown_op``.
    """
    if len(line) > MAX_LINE:
        raise InvalidRequest(TooLarge())
    try:
        text = line.decode("utf-8")
        message = decode_text(text, _scan)
    except UnicodeDecodeError:
        raise InvalidRequest(
            BadRequest("the request is not valid UTF-8; send UTF-8 JSON")
        ) from None
    except (ValueError, RecursionError) as error:
        if str(error) == DUPLICATE:  # valid JSON, whose meaning parsers disagree on
            raise InvalidRequest(
                BadRequest("the request names a member twice; send each member once")
            ) from None
        raise InvalidRequest(
            BadRequest("the request is not valid JSON; send one JSON object per line")
        ) from None
    if not isinstance(message, dict):
        raise InvalidRequest(BadRequest('the request must be a JSON object with an "op" member'))
    request_id = message.pop("id", None)
    if not _is_scalar(request_id):
        raise InvalidRequest(
            BadRequest('the request "id" must be a string, a finite number, a boolean or null')
        )
    op = message.pop("op", None)
    if not isinstance(op, str):
        raise InvalidRequest(
            BadRequest('the request needs an "op" string; send {"op": "hello"} to list them'),
            request_id,
        )
    spec = OPS.get(op)
    if spec is None:
        shown = _printable(op)
        raise InvalidRequest(
            UnknownOp(f'unknown operation \'{shown}\'; send {{"op": "hello"}} to list them'),
            request_id,
        )
    try:
        args = _validate(op, spec, message)
    except BadRequest as error:
        raise InvalidRequest(error, request_id) from None
    return Request(request_id, op, args)


def _validate(op: str, spec: Spec, given: dict[str, Any]) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for name, value in given.items():
        entry = spec.get(name)
        if entry is None:
            shown = _printable(name)
            raise BadRequest(f"operation '{op}' takes no argument '{shown}'; see docs/protocol.md")
        args[name] = entry[0](name, value)
    for name, (_, required) in spec.items():
        if required and name not in args:
            raise BadRequest(f"operation '{op}' needs the argument '{name}'")
    return args


# --- encoding --------------------------------------------------------------------------------

_encode = encoder()


def encode_result(request_id: Scalar, result: Mapping[str, Any]) -> bytes:
    """The reply line for a successful request."""
    return (_encode({"id": request_id, "ok": True, "result": result}) + "\n").encode()


def encode_entry(request_id: Scalar, entry: Mapping[str, Any]) -> bytes:
    """A line that follows a ``log`` request with ``follow``: one new audit entry."""
    return (_encode({"id": request_id, "entry": entry}) + "\n").encode()


def encode_error(request_id: Scalar, error: KeyagentError) -> bytes:
    """The reply line for a failed request."""
    return (_encode({"id": request_id, "ok": False, "error": error.to_wire()}) + "\n").encode()
