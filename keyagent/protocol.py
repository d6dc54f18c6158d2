"""Protocol v1: one UTF-8 JSON object per line, both ways. No I/O here.

A request line becomes a validated :class:`Request`; a result or an error becomes a reply
line. Every argument of every operation is checked here, before the agent sees it, so the
agent can trust types and ranges. Error messages name the argument and the expected shape but
never echo a value: values may be secrets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from keyagent._record import Frozen, set_field
from keyagent.errors import BadRequest, KeyagentError, TooLarge, UnknownOp
from keyagent.wire import Reply, decode_text, encode_request, encoder, parse_reply, scanner

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see _record.py)
if TYPE_CHECKING:
    from typing import Any, Final

PROTOCOL_VERSION: Final = 1
MAX_LINE: Final = 64 * 1024
"""The longest request line the agent reads, in bytes, without its newline."""

MAX_LIFETIME: Final = 10 * 365 * 24 * 3600.0
"""Ten years: longer than any sane lifetime, short enough for datetime arithmetic."""

Scalar = str | int | float | bool | None

__all__ = [
    "MAX_LIFETIME",
    "MAX_LINE",
    "OPS",
    "PROTOCOL_VERSION",
    "InvalidRequest",
    "Reply",
    "Request",
    "encode_error",
    "encode_request",
    "encode_result",
    "parse_reply",
    "parse_request",
]


class Request(Frozen):
    """A validated request: its echoed ``id``, its ``op`` and its typed arguments."""

    __slots__ = ("id", "op", "args")

    id: Scalar
    op: str
    args: Mapping[str, Any]

    def __init__(self, id: Scalar, op: str, args: Mapping[str, Any]) -> None:
        set_field(self, "id", id)
        set_field(self, "op", op)
        set_field(self, "args", args)

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


def _forbidding(chars: str) -> Callable[[str], bool]:
    """A test for "contains one of ``chars`` or a lone surrogate", in C loops (no ``re``)."""
    deleted = dict.fromkeys(map(ord, chars))

    def found(value: str) -> bool:
        if len(value.translate(deleted)) != len(value):
            return True
        try:
            value.encode("utf-8")  # only a surrogate (\ud800-\udfff) cannot be encoded
        except UnicodeEncodeError:
            return True
        return False

    return found


def _span(first: str, last: str) -> str:
    return "".join(map(chr, range(ord(first), ord(last) + 1)))


# Control characters, lone surrogates, and the bidirectional overrides that can make a
# quoted name display as something else in a terminal.
_C0, _C1 = _span("\x00", "\x1f"), _span("\x7f", "\x9f")
_BIDI = "\u200e\u200f" + _span("\u202a", "\u202e") + _span("\u2066", "\u2069")
has_control_characters = _forbidding(_C0 + _C1 + _BIDI)
"""True if text holds what USER, DESCRIPTION and names must not (config checks the same)."""
_TOKEN = _forbidding(_C0 + " " + _C1)  # no whitespace either
KEY_ID_DIGITS = "0123456789abcdef"
"""A key id is the first 12 of these of a key's SHA-256 (see keyagent.store.key_id_for)."""
HOST_PATTERN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?"
"""A DNS name or IPv4 address, or a bracketed IPv6 address, with an optional port: anything
else (a scheme, a path, user info, whitespace) would let a URL built from it point somewhere
the user did not name. A string, for re.fullmatch (this module does not import re)."""


def is_key_id_prefix(text: str) -> bool:
    """4 to 12 hex digits, either case: the start of a key id, as ``get`` and ``remove`` take."""
    return 4 <= len(text) <= 12 and not text.lower().strip(KEY_ID_DIGITS)


def _text(
    max_len: int, *, min_len: int = 1, forbid: Callable[[str], bool] = has_control_characters
) -> Validator:
    def check(name: str, value: object) -> object:
        if not isinstance(value, str):
            raise BadRequest(f"argument '{name}' must be a string")
        if not min_len <= len(value) <= max_len:
            raise BadRequest(f"argument '{name}' must be {min_len} to {max_len} characters long")
        if forbid(value):
            raise BadRequest(f"argument '{name}' must not contain control characters")
        return value

    return check


def _key_id(name: str, value: object) -> object:
    if not isinstance(value, str) or not is_key_id_prefix(value):
        raise BadRequest(f"argument '{name}' must be 4 to 12 hex characters of a key id")
    return value.lower()


def _boolean(name: str, value: object) -> object:
    if not isinstance(value, bool):
        raise BadRequest(f"argument '{name}' must be true or false")
    return value


def _lifetime(name: str, value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"argument '{name}' must be a number of seconds")
    try:
        seconds = float(value)
    except OverflowError:  # an integer with hundreds of digits
        seconds = math.inf
    if not math.isfinite(seconds) or seconds <= 0 or seconds > MAX_LIFETIME:
        raise BadRequest(
            f"argument '{name}' must be a positive number of seconds, at most ten years"
        )
    return seconds


HOST = _text(255, forbid=_TOKEN)
USER = _text(320)
KEY = _text(8192, forbid=_TOKEN)
DESCRIPTION = _text(1024, min_len=0)
PASSPHRASE = _text(1024)
PASSWORD = _text(4096, forbid=_forbidding("\x00"))

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
    },
    "get": {"host": (HOST, False), "user": (USER, False), "key_id": (_key_id, False)},
    "list": {"host": (HOST, False), "user": (USER, False), "remote": (_boolean, False)},
    "forget": {"key_id": (_key_id, False), "all": (_boolean, False), "persist": (_boolean, False)},
    "lock": {"passphrase": (PASSPHRASE, True)},
    "unlock": {"passphrase": (PASSPHRASE, True)},
    "stop": {},
    "login": {"host": (HOST, True), "user": (USER, True), "password": (PASSWORD, True)},
    "logout": {"host": (HOST, True), "user": (USER, True)},
    "create": {
        "host": (HOST, True),
        "user": (USER, True),
        "description": (DESCRIPTION, False),
        "lifetime": (_lifetime, False),
        "reveal": (_boolean, False),
        "persist": (_boolean, False),
    },
    "remove": {
        "key_id": (_key_id, False),
        "key": (KEY, False),
        "host": (HOST, False),
        "user": (USER, False),
    },
}


# --- decoding --------------------------------------------------------------------------------


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two parsers that disagree on which duplicate wins are a classic smuggling vector;
    # refusing duplicates removes the question.
    members = dict(pairs)
    if len(members) != len(pairs):
        raise ValueError("duplicate member name")
    return members


_scan = scanner(_unique_members)  # NaN and Infinity are refused too


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
    except (ValueError, RecursionError):
        raise InvalidRequest(
            BadRequest("the request is not valid JSON; send one JSON object per line")
        ) from None
    if not isinstance(message, dict):
        raise InvalidRequest(BadRequest('the request must be a JSON object with an "op" member'))
    request_id = message.pop("id", None)
    if not _is_scalar(request_id):
        raise InvalidRequest(BadRequest('the request "id" must be a JSON scalar'))
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


def encode_error(request_id: Scalar, error: KeyagentError) -> bytes:
    """The reply line for a failed request."""
    return (_encode({"id": request_id, "ok": False, "error": error.to_wire()}) + "\n").encode()
