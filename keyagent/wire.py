"""The client's side of the line format: encode one request, decode one reply.

The agent's side, with full validation, is :mod:`keyagent.protocol`; it parses and writes
JSON with the :func:`scanner` and :func:`encoder` made here, so both sides read the format
the same way: strict JSON, no NaN or Infinity.
"""

from __future__ import annotations

import json

from keyagent.errors import KeyagentError, from_code

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from typing import Any

    Scalar = str | int | float | bool | None
    Scanner = Callable[[str, int], tuple[object, int]]


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def scanner(object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Scanner:
    """A strict decoder's ``raw_decode``: the JSON value that starts at an index of a text,
    and where it ends. NaN and Infinity are refused; ``object_pairs_hook`` builds objects."""
    decoder = json.JSONDecoder(object_pairs_hook=object_pairs_hook, parse_constant=_reject_constant)
    return decoder.raw_decode


def encoder() -> Callable[[object], str]:
    """Compact ASCII JSON without NaN or Infinity. No check for circular references:
    replies are built by the agent and never circular."""
    return json.JSONEncoder(separators=(",", ":"), allow_nan=False, check_circular=False).encode


_scan = scanner()
_WHITESPACE = " \t\n\r"
# Requests go out as UTF-8, not \\u escapes: an escaped emoji takes 12 bytes, and a valid
# long key would no longer fit in a line. Only a lone surrogate, which UTF-8 cannot carry,
# needs the escapes.
_UTF8 = json.JSONEncoder(ensure_ascii=False)
_ASCII = json.JSONEncoder()


def _scalar(value: Scalar | Sequence[str], quote: json.JSONEncoder) -> str:
    if value is None or isinstance(value, str | int):  # bool is an int
        return quote.encode(value)
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        # A list of strings (add --allow-exe): the one argument that is not a scalar.
        return "[" + ",".join(quote.encode(item) for item in value) + "]"
    if isinstance(value, float):
        from math import isfinite  # no request of keyagent-ctl get has a float

        if isfinite(value):
            return quote.encode(value)
    raise TypeError(
        f"a request argument must be a JSON scalar or a list of strings, not {type(value).__name__}"
    )


def encode_request(
    op: str, request_id: Scalar, args: Mapping[str, Scalar | Sequence[str]]
) -> bytes:
    """One request line: ``{"id": ..., "op": ..., ...args}`` and a newline."""
    try:
        return _encode(op, request_id, args, _UTF8).encode("utf-8")
    except UnicodeEncodeError:
        return _encode(op, request_id, args, _ASCII).encode("ascii")


def _encode(
    op: str, request_id: Scalar, args: Mapping[str, Scalar | Sequence[str]], quote: json.JSONEncoder
) -> str:
    # Member by member, in this order, so that "id" and "op" come first.
    members = [f'"id":{_scalar(request_id, quote)}', f'"op":{_scalar(op, quote)}']
    members.extend(
        f"{_scalar(name, quote)}:{_scalar(value, quote)}" for name, value in args.items()
    )
    return "{" + ",".join(members) + "}\n"


def decode(line: bytes) -> object:
    """Parse one JSON document; raises ``ValueError`` if it is not exactly one."""
    try:
        text = line.decode("utf-8")
        return decode_text(text, _scan)
    except (UnicodeDecodeError, RecursionError):
        raise ValueError("not a JSON document") from None


def decode_text(text: str, scan: Scanner) -> object:
    """Parse ``text`` as exactly one JSON document with ``scan``; else ``ValueError``.

    ``RecursionError`` (nesting deeper than the interpreter allows) is left to the caller.
    """
    value, end = scan(text, len(text) - len(text.lstrip(_WHITESPACE)))
    if text[end:].strip(_WHITESPACE):
        raise ValueError("extra data after the JSON document")
    return value


class Reply:
    """A decoded reply: ``result`` when ``ok``, else ``error`` (the agent's error, rebuilt)."""

    __slots__ = ("error", "id", "ok", "result")

    def __init__(
        self, id: Scalar, ok: bool, result: Mapping[str, Any], error: KeyagentError | None
    ) -> None:
        self.id, self.ok, self.result, self.error = id, ok, result, error

    def __repr__(self) -> str:
        # The result may hold a key: show its member names only.
        return f"Reply(id={self.id!r}, ok={self.ok!r}, result={sorted(self.result)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Reply):
            return NotImplemented
        return (self.id, self.ok, self.result, repr(self.error)) == (
            other.id,
            other.ok,
            other.result,
            repr(other.error),
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaces


def parse_reply(line: bytes) -> Reply:
    """Decode one reply line; raises ``ValueError`` when it is not a protocol v1 reply."""
    message = decode(line)
    if not isinstance(message, dict) or not isinstance(message.get("ok"), bool):
        raise ValueError("not a protocol v1 reply")
    request_id = message.get("id")
    if message["ok"]:
        result = message.get("result")
        if not isinstance(result, dict):
            raise ValueError("reply without a result object")
        return Reply(request_id, True, result, None)
    error = message.get("error")
    if not isinstance(error, dict) or not isinstance(error.get("code"), str):
        raise ValueError("error reply without a code")
    text = error.get("message")
    return Reply(
        request_id, False, {}, from_code(error["code"], text if isinstance(text, str) else None)
    )
