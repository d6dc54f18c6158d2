"""The client's side of the line format: encode one request, decode one reply.

Uses the C halves of the standard library's ``json`` directly (``_json``), because the
``json`` package imports ``re`` and, through it, ``enum``: together most of a client's
start-up time, and over 1 MiB resident in the agent. ``keyagent-ctl get`` runs in other
tools' hot paths, so it pays only for what it uses. The agent's side, with full
validation, is :mod:`keyagent.protocol`, which uses :func:`scanner` and :func:`encoder`.
(On Python 3.11 the first malformed document loads ``json.decoder``, whose error class
``_json`` raises: see :func:`_scan_from`.)
"""

from __future__ import annotations

from _json import encode_basestring, encode_basestring_ascii, make_encoder, make_scanner

from keyagent.errors import KeyagentError, from_code

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

    Scalar = str | int | float | bool | None
    Scanner = Callable[[str, int], tuple[object, int]]


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


class _Context:
    """The settings ``_json.make_scanner`` reads from a ``JSONDecoder``: strict JSON, no
    NaN or Infinity, and ``object_pairs_hook`` if given."""

    strict = True
    object_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_reject_constant)

    def __init__(self, object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None) -> None:
        self.object_pairs_hook = object_pairs_hook


def scanner(object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Scanner:
    """``json.JSONDecoder(...).scan_once`` without the ``json`` package."""
    return make_scanner(_Context(object_pairs_hook))  # type: ignore[arg-type]  # the stub wants a JSONDecoder; any object with its settings will do


def _unserialisable(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def encoder() -> Callable[[object], str]:
    """``json.JSONEncoder(separators=(",", ":"), allow_nan=False, check_circular=False)``'s
    ``encode``, ASCII output. Replies are built by the agent and never circular."""
    iterencode = make_encoder(
        None, _unserialisable, encode_basestring_ascii, None, ":", ",", False, False, False
    )

    def encode(value: object) -> str:
        return "".join(iterencode(value, 0))

    return encode


_scan = scanner()
_WHITESPACE = " \t\n\r"


def _scalar(value: Scalar, quote: Callable[[str], str] = encode_basestring) -> str:
    if isinstance(value, str):
        return str(quote(value))
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        from math import isfinite  # no request of keyagent-ctl get has a float

        if isfinite(value):
            return float.__repr__(value)
    raise TypeError(f"a request argument must be a JSON scalar, not {type(value).__name__}")


def encode_request(op: str, request_id: Scalar, args: Mapping[str, Scalar]) -> bytes:
    """One request line: ``{"id": ..., "op": ..., ...args}`` and a newline."""
    # UTF-8, not \\u escapes: an escaped emoji takes 12 bytes, and a valid long key would no
    # longer fit in a line. Only a lone surrogate, which UTF-8 cannot carry, needs escapes.
    try:
        return _encode(op, request_id, args, encode_basestring).encode("utf-8")
    except UnicodeEncodeError:
        return _encode(op, request_id, args, encode_basestring_ascii).encode("ascii")


def _encode(
    op: str, request_id: Scalar, args: Mapping[str, Scalar], quote: Callable[[str], str]
) -> str:
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
    value, end = _scan_from(scan, text, len(text) - len(text.lstrip(_WHITESPACE)))
    if text[end:].strip(_WHITESPACE):
        raise ValueError("extra data after the JSON document")
    return value


def _scan_from(scan: Scanner, text: str, start: int) -> tuple[object, int]:
    """``scan(text, start)``, with every malformed document reported as ``ValueError``."""
    try:
        return scan(text, start)
    except StopIteration:  # no value where one was due
        raise ValueError("not a JSON document") from None
    except SystemError:
        # Python 3.11's _json raises json.decoder's error class for malformed input but does
        # not import it, and fails with SystemError instead. Import it (re and enum come
        # with it, once) and scan again to get the real error.
        import json.decoder  # noqa: F401
    try:
        return scan(text, start)
    except (StopIteration, SystemError):
        raise ValueError("not a JSON document (the scanner failed to say why)") from None


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
