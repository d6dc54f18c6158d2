"""Unit tests for keyagent.protocol: parsing and validating requests, encoding replies."""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyagent import errors, protocol
from keyagent.errors import BadRequest, KeyagentError, TooLarge, UnknownOp
from keyagent.protocol import (
    MAX_LIFETIME,
    MAX_LINE,
    OPS,
    InvalidRequest,
    Reply,
    Request,
    Scalar,
    encode_error,
    encode_request,
    encode_result,
    parse_reply,
    parse_request,
)

from .fakes import VALID_ARGS

SECRET = "zebra-quokka-7781-S3CR3T"


STRING_ARGS = {"host", "user", "key", "description", "passphrase", "password"}
BOOL_ARGS = {"persist", "all", "remote", "reveal", "export", "confirm", "follow", "keep", "local"}
BOOL_ARGS |= {"delete"}
SECRET_ARGS = ("key", "password", "passphrase")

WRONG_TYPES: dict[str, list[object]] = {
    "string": [None, 0, 1.5, True, [], {}, ["x"], {"x": "y"}],
    "bool": [None, 0, 1, 1.0, "true", "", [], {}],
    "key_id": [None, 1234, 1.5, True, [], {}, ["abcd"]],
    "lifetime": [None, True, False, "60", "", [], {}, [60], {"s": 60}],
    "allow_exe": [None, True, "/usr/bin/curl", 1, {}, [1], [None], [["/bin/sh"]]],
    "n": [None, True, False, "10", 1.5, -1, 1_000_001, [], {}, [10]],
    "purpose": [None, True, 1, "", "EXEC", "get", [], {}, ["exec"]],
    "rotate_every": [None, True, False, "3600", "1h", "", [], {}, [3600]],
}


def kind_of(name: str) -> str:
    if name in STRING_ARGS:
        return "string"
    if name in BOOL_ARGS:
        return "bool"
    return name


def outcome_of(raw: bytes) -> Request | InvalidRequest:
    """The Request parse_request returns, or the InvalidRequest it raises."""
    try:
        return parse_request(raw)
    except InvalidRequest as invalid:
        return invalid


def strict_json(line: bytes) -> Any:
    """``line`` as JSON, refusing NaN and Infinity (which no other JSON reader takes)."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(line, parse_constant=refuse)


def encode(message: object) -> bytes:
    """A request line (without newline) as a client might send it."""
    return json.dumps(message).encode()


def rejected_raw(raw: bytes) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        parse_request(raw)
    return caught.value


def rejected(message: object) -> InvalidRequest:
    return rejected_raw(encode(message))


def with_arg(op: str, name: str, value: object) -> dict[str, object]:
    return {"op": op, **VALID_ARGS[op], name: value}


def assert_bad_request(invalid: InvalidRequest, *fragments: str) -> None:
    assert type(invalid.error) is BadRequest
    assert invalid.error.code == "bad_request"
    assert str(invalid) == invalid.error.message
    for fragment in fragments:
        assert fragment in invalid.error.message


# --- constants -------------------------------------------------------------------------------


def test_a_line_of_64_kib_is_read_and_one_byte_more_is_too_large() -> None:
    """A request line of exactly 65536 bytes is parsed; at 65537 bytes it is too_large."""
    body = b'{"id":5,"op":"hello"}'
    request = parse_request(body + b" " * (65536 - len(body)))
    assert (request.id, request.op) == (5, "hello")
    assert type(rejected_raw(body + b" " * (65537 - len(body))).error) is TooLarge


def test_a_lifetime_of_ten_years_is_taken_and_one_second_more_is_not() -> None:
    """lifetime 315360000 (365-day years) is accepted as is; 315360001 is bad_request."""
    request = parse_request(encode(with_arg("add", "lifetime", 315360000)))
    assert request.args["lifetime"] == 315360000.0
    assert_bad_request(rejected(with_arg("add", "lifetime", 315360001)), "at most ten years")


def test_every_argument_has_a_known_kind() -> None:
    """Every argument name in OPS is one this test module knows how to mistype."""
    names = {name for spec in OPS.values() for name in spec}
    assert names <= STRING_ARGS | BOOL_ARGS | {
        "key_id",
        "lifetime",
        "allow_exe",
        "n",
        "purpose",
        "rotate_every",
    }
    assert set(VALID_ARGS) == set(OPS)


# --- valid requests --------------------------------------------------------------------------


@pytest.mark.parametrize("op", list(OPS))
def test_every_op_parses_with_its_required_arguments(op: str) -> None:
    """Each op with exactly its required arguments parses into a Request with those args."""
    request = parse_request(encode({"id": 7, "op": op, **VALID_ARGS[op]}))
    assert request == Request(7, op, VALID_ARGS[op])
    required = {name for name, (_, needed) in OPS[op].items() if needed}
    assert required == set(VALID_ARGS[op]) - ({"all"} if op == "forget" else set())


def test_add_with_every_optional_argument() -> None:
    """add accepts description, lifetime and persist alongside its required arguments."""
    request = parse_request(
        encode(
            {
                "op": "add",
                **VALID_ARGS["add"],
                "description": "",
                "lifetime": 60,
                "persist": False,
            }
        )
    )
    assert request.args == {
        **VALID_ARGS["add"],
        "description": "",
        "lifetime": 60.0,
        "persist": False,
    }


def test_missing_id_is_none() -> None:
    """A request without an id gets the id None."""
    assert parse_request(b'{"op":"hello"}').id is None


@pytest.mark.parametrize("request_id", [None, 0, -1, 2**80, 1.5, "abc", "", True, False])
def test_scalar_ids_are_kept(request_id: Scalar) -> None:
    """Any JSON scalar id is returned as is, with its type."""
    request = parse_request(encode({"id": request_id, "op": "hello"}))
    assert request.id == request_id
    assert type(request.id) is type(request_id)


def test_whitespace_around_the_object_is_allowed() -> None:
    """JSON whitespace around the object, including a CR before the newline, is fine."""
    assert parse_request(b' \t{"op" : "hello"} \r').op == "hello"


def test_a_line_of_exactly_max_line_bytes_is_accepted() -> None:
    """A valid request padded to exactly MAX_LINE bytes is parsed."""
    body = b'{"op":"hello"}'
    line = body + b" " * (MAX_LINE - len(body))
    assert len(line) == MAX_LINE
    assert parse_request(line).op == "hello"


def test_request_args_exclude_id_and_op() -> None:
    """The id and op members are not part of args."""
    request = parse_request(b'{"id":1,"op":"get","host":"h"}')
    assert dict(request.args) == {"host": "h"}


def test_request_repr_hides_argument_values() -> None:
    """Request's repr shows id, op and argument names, never argument values."""
    request = parse_request(encode({"id": 3, "op": "add", "host": "h", "user": "u", "key": SECRET}))
    text = repr(request)
    assert text == "Request(id=3, op='add', args=['host', 'key', 'user'])"
    assert SECRET not in text


def test_request_is_frozen() -> None:
    """A Request cannot be changed after validation."""
    request = parse_request(b'{"op":"hello"}')
    with pytest.raises(AttributeError):
        request.op = "stop"


# --- malformed lines -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [b"\xff", b'{"op":"hello\xff"}', b'{"op":"\xc0\xaf"}', b'{"op":"\xed\xa0\x80"}', b"\x80"],
    ids=["ff", "ff-in-string", "overlong", "encoded-surrogate", "continuation"],
)
def test_invalid_utf8_is_bad_request(raw: bytes) -> None:
    """Bytes that are not valid UTF-8 are rejected as bad_request naming UTF-8."""
    invalid = rejected_raw(raw)
    assert_bad_request(invalid, "UTF-8")
    assert invalid.request_id is None


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b" ",
        b"{",
        b"}",
        b'{"op":"hello"}}',
        b'{"op":"hello"} {}',
        b"{'op':'hello'}",
        b'{op:"hello"}',
        b'{"op":"hello",}',
        b'{"op":"hello"}\n{"op":"hello"}',
        b'{"op":"hello"}\x00',
        b'{"op":"he\nllo"}',
        b'{"id":0' + b"1" * 5000 + b',"op":"hello"}',
    ],
    ids=[
        "empty",
        "blank",
        "open",
        "close",
        "trailing-brace",
        "two-objects",
        "single-quotes",
        "bare-key",
        "trailing-comma",
        "two-lines",
        "nul",
        "raw-newline-in-string",
        "int-too-long",
    ],
)
def test_invalid_json_is_bad_request(raw: bytes) -> None:
    """Anything that is not exactly one JSON value is rejected as not valid JSON."""
    invalid = rejected_raw(raw)
    assert_bad_request(invalid, "not valid JSON")
    assert invalid.request_id is None


@pytest.mark.parametrize(
    "raw", [b"null", b"[]", b"3", b'"x"', b"true", b"1.5", b'[{"op":"hello"}]']
)
def test_non_object_json_is_bad_request(raw: bytes) -> None:
    """A JSON value that is not an object is rejected as needing an object with an op."""
    invalid = rejected_raw(raw)
    assert_bad_request(invalid, "JSON object")
    assert invalid.request_id is None


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 60000,
        b"{" * 30000,
        b'{"op":"hello","id":' + b"[" * 60000,
        b'{"op":"hello","x":' + b'{"a":' * 10000 + b"1" + b"}" * 10000 + b"}",
    ],
    ids=["brackets", "braces", "nested-id", "nested-arg"],
)
def test_deep_nesting_is_bad_request(raw: bytes) -> None:
    """Deeply nested JSON under MAX_LINE is rejected as bad_request, not a RecursionError."""
    assert len(raw) <= MAX_LINE
    invalid = rejected_raw(raw)
    assert type(invalid.error) is BadRequest


def test_deep_nesting_over_max_line_is_too_large() -> None:
    """100000 '[' exceed MAX_LINE and are refused as too_large before any parsing."""
    invalid = rejected_raw(b"[" * 100000)
    assert type(invalid.error) is TooLarge


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
@pytest.mark.parametrize("member", [b"lifetime", b"id"])
def test_nan_and_infinity_constants_are_not_json(constant: bytes, member: bytes) -> None:
    """The non-standard constants NaN, Infinity and -Infinity are refused wherever they appear."""
    raw = b'{"op":"add","host":"h","user":"u","key":"k","' + member + b'":' + constant + b"}"
    assert_bad_request(rejected_raw(raw), "not valid JSON")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"op":"hello","op":"hello"}',
        b'{"op":"hello","op":"stop"}',
        b'{"id":1,"id":2,"op":"hello"}',
        b'{"op":"get","host":"a","host":"b"}',
        b'{"op":"hello","id":{"a":1,"a":1}}',
    ],
)
def test_duplicate_member_names_are_refused(raw: bytes) -> None:
    """An object with a repeated member name, at any depth, is rejected, saying so."""
    invalid = rejected_raw(raw)
    assert_bad_request(invalid, "names a member twice")
    assert invalid.request_id is None


@pytest.mark.parametrize(
    "size", [MAX_LINE + 1, MAX_LINE + 2, 10 * MAX_LINE], ids=["max+1", "max+2", "10x"]
)
def test_line_over_max_line_is_too_large(size: int) -> None:
    """A line longer than MAX_LINE is too_large, even if it would be a valid request."""
    body = b'{"id":5,"op":"hello"}'
    invalid = rejected_raw(body + b" " * (size - len(body)))
    assert type(invalid.error) is TooLarge
    assert invalid.error.code == "too_large"
    assert invalid.request_id is None


# --- id, op and argument names ----------------------------------------------------------------


@pytest.mark.parametrize("request_id", [[], [1], {}, {"a": 1}])
def test_non_scalar_id_is_bad_request(request_id: object) -> None:
    """An id that is an array or object is refused, and no id is echoed."""
    invalid = rejected({"id": request_id, "op": "hello"})
    assert_bad_request(invalid, '"id" must be a string, a finite number')
    assert invalid.request_id is None


def test_an_infinite_id_is_bad_request_saying_so() -> None:
    """1e400 is JSON, but it reads as infinity, which no reply could echo: refused, and the
    reason says what an id may be rather than call it something other than a scalar."""
    invalid = rejected_raw(b'{"id": 1e400, "op": "hello"}')
    assert_bad_request(invalid, "a finite number")
    assert invalid.request_id is None


@pytest.mark.parametrize("message", [{}, {"id": 9}, {"id": 9, "host": "h"}])
def test_missing_op_is_bad_request(message: dict[str, object]) -> None:
    """A request without op is refused, asking for an op string and echoing the id."""
    invalid = rejected(message)
    assert_bad_request(invalid, '"op" string')
    assert invalid.request_id == message.get("id")


@pytest.mark.parametrize("op", [None, 1, 1.5, True, [], ["hello"], {}, {"op": "hello"}])
def test_non_string_op_is_bad_request(op: object) -> None:
    """An op that is not a string is refused as bad_request, with the id echoed."""
    invalid = rejected({"id": "r1", "op": op})
    assert_bad_request(invalid, '"op" string')
    assert invalid.request_id == "r1"


def test_unknown_op_is_named_in_the_message() -> None:
    """A short printable unknown op is quoted back in an unknown_op error, with the id."""
    invalid = rejected({"id": 4, "op": "frobnicate"})
    assert type(invalid.error) is UnknownOp
    assert invalid.error.code == "unknown_op"
    assert "'frobnicate'" in invalid.error.message
    assert '{"op": "hello"}' in invalid.error.message
    assert invalid.request_id == 4


@pytest.mark.parametrize("op", ["", "HELLO", "Hello", " hello", "hello ", "add\u200b"])
def test_op_names_are_exact(op: str) -> None:
    """Op names are matched exactly: case, whitespace and invisible characters matter."""
    assert type(rejected({"op": op}).error) is UnknownOp


def test_unknown_op_of_32_characters_is_echoed() -> None:
    """An unknown op of up to 32 characters is short enough to quote back."""
    op = "x" * 32
    assert f"'{op}'" in rejected({"op": op}).error.message


@pytest.mark.parametrize(
    "op",
    ["x" * 33, SECRET * 10, "\x1b[31mred", "a\nb", "a\x00b", "a\x7fb", "a\x85b", "a\ud800b"],
    ids=["33", "long", "escape", "newline", "nul", "del", "c1", "surrogate"],
)
def test_unknown_op_that_is_long_or_has_control_characters_is_not_echoed(op: str) -> None:
    """A long op or one with control characters is replaced by '?' in the message."""
    invalid = rejected({"id": 1, "op": op})
    assert type(invalid.error) is UnknownOp
    assert "'?'" in invalid.error.message
    assert op not in invalid.error.message
    assert not re.search(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]", invalid.error.message)
    assert invalid.request_id == 1


@pytest.mark.parametrize("op", list(OPS))
def test_unknown_argument_is_named(op: str) -> None:
    """Every op refuses an argument it does not take, naming the op and the argument."""
    invalid = rejected({"id": 2, **with_arg(op, "colour", "blue")})
    assert_bad_request(invalid, f"operation '{op}'", "'colour'")
    assert "blue" not in invalid.error.message
    assert invalid.request_id == 2


@pytest.mark.parametrize("name", ["y" * 33, "a\x1bb", "a\nb"], ids=["long", "escape", "newline"])
def test_unknown_argument_with_unprintable_name_is_not_echoed(name: str) -> None:
    """An unknown argument name that is long or has control characters shows as '?'."""
    invalid = rejected({"op": "hello", name: 1})
    assert_bad_request(invalid, "'?'")
    assert name not in invalid.error.message


def test_argument_of_another_op_is_unknown() -> None:
    """An argument valid for one op is refused by an op that does not take it."""
    assert_bad_request(rejected({"op": "get", "passphrase": "p"}), "'passphrase'")


REQUIRED = [(op, name) for op, spec in OPS.items() for name, (_, needed) in spec.items() if needed]


@pytest.mark.parametrize(("op", "name"), REQUIRED)
def test_missing_required_argument_is_named(op: str, name: str) -> None:
    """Leaving out any required argument is refused, naming the op and the argument."""
    message = {"id": 8, "op": op, **VALID_ARGS[op]}
    del message[name]
    invalid = rejected(message)
    assert_bad_request(invalid, f"operation '{op}' needs the argument '{name}'")
    assert invalid.request_id == 8


WRONG_TYPE_CASES = [
    (op, name, value)
    for op, spec in OPS.items()
    for name in spec
    for value in WRONG_TYPES[kind_of(name)]
]


@pytest.mark.parametrize(("op", "name", "value"), WRONG_TYPE_CASES)
def test_every_argument_of_every_op_refuses_wrong_types(op: str, name: str, value: object) -> None:
    """Each argument of each op refuses values of the wrong JSON type, naming the argument."""
    invalid = rejected({"id": 11, **with_arg(op, name, value)})
    assert_bad_request(invalid, f"'{name}'")
    assert invalid.request_id == 11


# --- bounds of each validator ------------------------------------------------------------------

BOUNDS: list[tuple[str, str, object, bool]] = [
    # host: the one host grammar (a DNS name, an IPv4 or bracketed IPv6 literal, a port)
    ("add", "host", ".".join(["h" * 63] * 3 + ["h" * 61]), True),
    ("add", "host", ".".join(["h" * 63] * 3 + ["h" * 62]), False),
    ("add", "host", "h" * 63, True),
    ("add", "host", "h" * 64, False),
    ("add", "host", "app.conduce.com:65535", True),
    ("add", "host", "app.conduce.com:65536", False),
    ("add", "host", "app.conduce.com:99999", False),
    ("add", "host", "app.conduce.com:0", False),
    ("add", "host", "app..conduce.com", False),
    ("add", "host", "app.conduce.com.", False),
    ("add", "host", "-app.conduce.com", False),
    ("add", "host", "app-.conduce.com", False),
    ("add", "host", "127.0.0.1:8443", True),
    ("add", "host", "256.0.0.1", False),
    ("add", "host", "é" * 10, False),
    ("add", "host", "", False),
    ("add", "host", "a b", False),
    ("add", "host", "a\tb", False),
    ("add", "host", "a\x00b", False),
    ("add", "host", "a\x7fb", False),
    ("add", "host", "a\x9fb", False),
    ("add", "host", "a\ud800b", False),
    ("add", "host", "h\u2028x", False),
    ("add", "host", "[::1]:8443", True),
    ("add", "host", "[::1", False),
    ("add", "host", "[1::2::3]", False),
    ("add", "host", "https://app.conduce.com", False),
    ("add", "host", "user@app.conduce.com", False),
    # user: 1..320 characters, no character of Unicode categories C* or Z*
    ("add", "user", "u" * 320, True),
    ("add", "user", "u" * 321, False),
    ("add", "user", "", False),
    ("add", "user", "Ada Lovelace", False),
    ("add", "user", "u\u2028", False),
    ("add", "user", "u\u00a0v", False),
    ("add", "user", "ada\n", False),
    ("add", "user", "ada\x1b", False),
    ("add", "user", "ada\x85", False),
    ("add", "user", "ada\u202e", False),
    ("add", "user", "adé@exämple.com", True),
    # key: 1..8192 characters, no whitespace or control characters
    ("add", "key", "k" * 8192, True),
    ("add", "key", "k" * 8193, False),
    ("add", "key", "", False),
    ("add", "key", "k k", False),
    ("add", "key", "k\r", False),
    ("add", "key", "k\udfff", False),
    ("add", "key", "ключ-ключ-ключ-ключ", False),  # never sendable in an HTTP header
    ("add", "key", "k\xe9", False),
    ("add", "key", "k\u00a0k", False),
    ("add", "key", "k\u2028k", False),
    ("add", "key", "k\u200bk", False),
    # description: 0..1024 characters, no control characters
    ("add", "description", "", True),
    ("add", "description", "d" * 1024, True),
    ("add", "description", "d" * 1025, False),
    ("add", "description", "two words", True),
    ("add", "description", "line\nbreak", False),
    ("add", "description", "no\u00a0break space", True),
    ("add", "description", "line\u2028separator", False),
    ("add", "description", "bidi\u202eoverride", False),
    ("add", "description", "esc\x1b[2J", False),
    # passphrase: 1..1024 characters, no control characters
    ("lock", "passphrase", "p" * 1024, True),
    ("lock", "passphrase", "p" * 1025, False),
    ("lock", "passphrase", "", False),
    ("unlock", "passphrase", "with spaces", True),
    ("unlock", "passphrase", "tab\there", False),
    # password: 1..4096 characters; only NUL and lone surrogates are refused
    ("login", "password", "p" * 4096, True),
    ("login", "password", "p" * 4097, False),
    ("login", "password", "", False),
    ("login", "password", "tab\tand space", True),
    ("login", "password", "esc\x1b", True),
    ("login", "password", "nul\x00", False),
    ("login", "password", "half\ud83d", False),
    # key_id: 4..64 hex characters (a prefix of the key's SHA-256), any case
    ("get", "key_id", "abcd", True),
    ("get", "key_id", "0123456789ab", True),
    ("get", "key_id", "0123456789abc", True),
    ("get", "key_id", "0123456789abcdef" * 4, True),
    ("get", "key_id", "0123456789abcdef" * 4 + "0", False),
    ("get", "key_id", "abc", False),
    ("get", "key_id", "", False),
    ("get", "key_id", "ghij", False),
    ("get", "key_id", " abcd", False),
    ("get", "key_id", "abcd\n", False),
    ("get", "key_id", "\uff10\uff11\uff12\uff13", False),
    # lifetime: positive seconds, at most ten years
    ("add", "lifetime", 1, True),
    ("add", "lifetime", 0.001, True),
    ("add", "lifetime", 5e-324, True),
    ("add", "lifetime", MAX_LIFETIME, True),
    ("add", "lifetime", int(MAX_LIFETIME), True),
    ("add", "lifetime", MAX_LIFETIME + 1, False),
    ("add", "lifetime", 10**300, False),
    ("add", "lifetime", 0, False),
    ("add", "lifetime", 0.0, False),
    ("add", "lifetime", -0.0, False),
    ("add", "lifetime", -1, False),
    ("create", "lifetime", 60, True),
    ("create", "lifetime", -60.5, False),
    # rotate_every: at least a minute, at most ten years
    ("create", "rotate_every", 60, True),
    ("create", "rotate_every", 59.999, False),
    ("create", "rotate_every", 0, False),
    ("create", "rotate_every", MAX_LIFETIME, True),
    ("create", "rotate_every", MAX_LIFETIME + 1, False),
    ("rotate", "key_id", "abcd", True),
    ("rotate", "key_id", "abc", False),
]


@pytest.mark.parametrize(("op", "name", "value", "ok"), BOUNDS)
def test_validator_bounds(op: str, name: str, value: object, ok: bool) -> None:
    """Each validator accepts values at its bounds and refuses values just outside them."""
    message = with_arg(op, name, value)
    if ok:
        request = parse_request(encode(message))
        assert name in request.args
    else:
        assert_bad_request(rejected(message), f"'{name}'")


def test_lengths_count_characters_not_bytes() -> None:
    """A 320-character user of two-byte characters (640 bytes) is within the 320 limit."""
    user = "é" * 320
    assert len(user.encode()) == 640
    assert parse_request(encode(with_arg("add", "user", user))).args["user"] == user


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("app..conduce.com", "empty labels"),
        ("a" * 255, "at most 253"),
        ("app.conduce.com:99999", "1 to 65535"),
        ("app.conduce.com:http", ":N"),
        ("a_b.com", "letters, digits, hyphens"),
        ("1.2.3", "IPv4"),
        ("12w.0.0.1:8443", "IPv4"),  # found by the atheris harness: int('12w') escaped
        ("010.0.0.1", "leading zeros"),  # inet_aton reads 010 as octal: 8.0.0.1
        ("https://app.conduce.com/", "without https://"),
        ("ada@app.conduce.com", "user@"),
        ("[fe80::1%eth0]", "IPv6"),
    ],
)
def test_host_problem_names_the_rule_broken(host: str, reason: str) -> None:
    """host_problem explains which rule of the host grammar a host breaks."""
    problem = protocol.host_problem(host)
    assert problem is not None
    assert reason in problem


@pytest.mark.parametrize(
    "host", ["app.conduce.com", "localhost", "10.0.0.1:8443", "[::1]", "[2001:db8::1]:443", "x1"]
)
def test_host_problem_accepts_the_grammar(host: str) -> None:
    """Names, IPv4 and bracketed IPv6 literals, each with an optional port, are hosts."""
    assert protocol.host_problem(host) is None
    assert protocol.is_valid_host(host)


@pytest.mark.parametrize(
    ("op", "given", "expected"),
    [
        ("get", "ABCD", "abcd"),
        ("forget", "AbCdEf012345", "abcdef012345"),
        ("remove", "ab12", "ab12"),
    ],
)
def test_key_id_is_lowercased(op: str, given: str, expected: str) -> None:
    """A key id in any case is accepted and handed on in lower case."""
    message = {"op": op, "key_id": given}
    assert parse_request(encode(message)).args["key_id"] == expected


@pytest.mark.parametrize(("given", "seconds"), [(60, 60.0), (1.5, 1.5), (True, None), ("60", None)])
def test_lifetime_becomes_float_seconds(given: object, seconds: float | None) -> None:
    """A numeric lifetime is handed on as float seconds; booleans and strings are refused."""
    message = with_arg("add", "lifetime", given)
    if seconds is None:
        assert_bad_request(rejected(message), "number of seconds")
    else:
        value = parse_request(encode(message)).args["lifetime"]
        assert value == seconds
        assert type(value) is float


def test_lifetime_overflowing_to_infinity_is_refused() -> None:
    """1e400 parses as infinity and is refused as lifetime (NaN cannot come through JSON)."""
    raw = b'{"op":"add","host":"h","user":"u","key":"k","lifetime":1e400}'
    assert_bad_request(rejected_raw(raw), "'lifetime'", "ten years")


def test_lifetime_over_ten_years_is_refused() -> None:
    """A lifetime one second over ten years is refused with the limit in the message."""
    invalid = rejected(with_arg("add", "lifetime", MAX_LIFETIME + 1))
    assert_bad_request(invalid, "at most ten years")


def test_lifetime_integer_too_large_for_a_float_is_bad_request() -> None:
    """An integer lifetime too large for a float is refused as bad_request like any too long."""
    raw = b'{"op":"add","host":"h","user":"u","key":"k","lifetime":1' + b"0" * 400 + b"}"
    assert_bad_request(rejected_raw(raw), "'lifetime'")


@pytest.mark.parametrize("name", ["persist", "all", "remote", "reveal"])
def test_booleans_accept_true_and_false(name: str) -> None:
    """Boolean arguments accept JSON true and false and keep them as bools."""
    op = next(op for op, spec in OPS.items() if name in spec)
    for value in (True, False):
        assert parse_request(encode(with_arg(op, name, value))).args[name] is value


def test_optional_arguments_are_not_filled_in() -> None:
    """Optional arguments left out are absent from args, not defaulted."""
    request = parse_request(encode({"op": "add", **VALID_ARGS["add"]}))
    assert set(request.args) == {"host", "user", "key"}


# --- secrets never leak into errors ----------------------------------------------------------

LEAK_CASES: list[dict[str, object]] = [
    {"op": "add", "host": "h", "user": "u", "key": SECRET + " "},
    {"op": "add", "host": "h", "user": "u", "key": SECRET + "\x00"},
    {"op": "add", "host": "h", "user": "u", "key": SECRET * 400},
    {"op": "add", "host": "h", "user": "u", "key": [SECRET]},
    {"op": "add", "host": "h", "user": "u", "key": {SECRET: SECRET}},
    {"op": "add", "host": "h", "key": SECRET},
    {"op": "add", "host": "h h", "user": "u", "key": SECRET},
    {"op": "add", "host": "h", "user": "u", "key": SECRET, "lifetime": -1},
    {"op": "add", "host": "h", "user": "u", "key": SECRET, "extra": SECRET},
    {"op": "remove", "key": SECRET + "\n"},
    {"op": "lock", "passphrase": SECRET + "\n"},
    {"op": "lock", "passphrase": SECRET * 50},
    {"op": "unlock", "passphrase": SECRET, "all": True},
    {"op": "unlock", "passphrase": {"p": SECRET}},
    {"op": "login", "host": "h", "user": "u", "password": SECRET + "\x00"},
    {"op": "login", "host": "h", "user": "u", "password": SECRET * 200},
    {"op": "login", "host": "h", "password": SECRET},
    {"op": "login", "host": "h", "user": "u\n", "password": SECRET},
    {"op": "nope", "key": SECRET, "password": SECRET, "passphrase": SECRET},
    {"op": 5, "key": SECRET},
    {"id": [SECRET], "op": "add", "key": SECRET},
]


@pytest.mark.parametrize("message", LEAK_CASES)
def test_errors_never_contain_secret_argument_values(message: dict[str, object]) -> None:
    """No rejection of a request carrying a key, password or passphrase repeats that value."""
    invalid = rejected(message)
    for text in (str(invalid), invalid.error.message, repr(invalid.error)):
        assert SECRET not in text
    reply = encode_error(invalid.request_id, invalid.error)
    assert SECRET.encode() not in reply


def test_duplicate_secret_member_does_not_leak() -> None:
    """A duplicated secret member is refused without repeating either value."""
    raw = b'{"op":"lock","passphrase":"' + SECRET.encode() + b'","passphrase":"other"}'
    invalid = rejected_raw(raw)
    assert SECRET not in invalid.error.message


secret_values = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=0, max_size=20
).map(lambda tail: "zqx-SECRET-" + tail)


@settings(max_examples=200, deadline=None)
@given(
    op=st.sampled_from(list(OPS)),
    name=st.sampled_from(SECRET_ARGS),
    secret=secret_values,
    extra=st.dictionaries(
        st.sampled_from(["host", "user", "key_id", "lifetime", "all", "bogus", "id"]),
        st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=5), st.booleans()),
        max_size=3,
    ),
)
def test_secret_values_never_appear_in_any_error(
    op: str, name: str, secret: str, extra: dict[str, object]
) -> None:
    """For any op and any mix of other arguments, an error never contains a secret value."""
    message = {"op": op, **extra, name: secret}
    outcome = outcome_of(encode(message))
    if isinstance(outcome, InvalidRequest):
        assert secret not in outcome.error.message
        assert "zqx-SECRET" not in outcome.error.message
        assert "zqx-SECRET" not in str(outcome)
    else:
        assert secret not in repr(outcome)


# --- properties: parse_request never fails with anything but InvalidRequest ------------------


def parses_or_rejects(raw: bytes) -> Request | InvalidRequest:
    """parse_request's outcome; any exception other than InvalidRequest fails the test."""
    outcome = outcome_of(raw)
    if isinstance(outcome, InvalidRequest):
        assert isinstance(outcome.error, BadRequest | UnknownOp | TooLarge)
        assert outcome.request_id is None or isinstance(outcome.request_id, str | int | float)
        assert str(outcome) == outcome.error.message
    else:
        assert isinstance(outcome, Request)
        assert outcome.op in OPS
        assert set(outcome.args) <= set(OPS[outcome.op])
    return outcome


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
    ),
    max_leaves=12,
)
strict_json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
    ),
    max_leaves=12,
)
"""JSON values without NaN or infinities, so json.dumps writes standard JSON."""
arg_names = st.one_of(
    st.sampled_from(sorted({name for spec in OPS.values() for name in spec} | {"id", "op"})),
    st.text(max_size=10),
)


@settings(max_examples=500, deadline=None)
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_parse_or_are_rejected(raw: bytes) -> None:
    """Arbitrary bytes give a Request or an InvalidRequest, never any other exception."""
    parses_or_rejects(raw)


@settings(max_examples=300, deadline=None)
@given(value=json_values)
def test_arbitrary_json_values_parse_or_are_rejected(value: object) -> None:
    """Any JSON value as a line gives a Request or an InvalidRequest, never anything else."""
    outcome = parses_or_rejects(json.dumps(value).encode())
    if not isinstance(value, dict):
        assert isinstance(outcome, InvalidRequest)


@settings(max_examples=200, deadline=None)
@given(
    op=st.one_of(st.sampled_from(list(OPS)), json_values),
    request_id=json_values,
    args=st.dictionaries(arg_names, json_values, max_size=5),
)
def test_random_arguments_to_every_op_parse_or_are_rejected(
    op: object, request_id: object, args: dict[str, object]
) -> None:
    """Any op with any arguments of any type gives a Request or an InvalidRequest."""
    message = {**args, "id": request_id, "op": op}
    outcome = parses_or_rejects(json.dumps(message).encode())
    readable = isinstance(request_id, str | int | None) or (
        isinstance(request_id, float) and math.isfinite(request_id)
    )
    if isinstance(outcome, InvalidRequest) and readable:
        # A readable scalar id is echoed unless the line itself was unreadable.
        assert outcome.request_id in (request_id, None)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_wrong_argument_types_are_always_bad_request(data: st.DataObject) -> None:
    """Any argument given a value of the wrong JSON type is refused, naming the argument."""
    op = data.draw(st.sampled_from([op for op, spec in OPS.items() if spec]))
    name = data.draw(st.sampled_from(sorted(OPS[op])))
    kind = kind_of(name)
    value = data.draw(strict_json_values)
    wrong = {
        "string": not isinstance(value, str),
        "bool": not isinstance(value, bool),
        "key_id": not isinstance(value, str),
        "lifetime": isinstance(value, bool) or not isinstance(value, int | float),
        "allow_exe": not isinstance(value, list) or not all(isinstance(v, str) for v in value),
        "n": isinstance(value, bool) or not isinstance(value, int),
        "purpose": not isinstance(value, str),
        "rotate_every": isinstance(value, bool) or not isinstance(value, int | float),
    }[kind]
    outcome = parses_or_rejects(json.dumps(with_arg(op, name, value), allow_nan=False).encode())
    if wrong:
        assert isinstance(outcome, InvalidRequest)
        assert type(outcome.error) is BadRequest
        assert f"'{name}'" in outcome.error.message


# --- valid requests, generated -----------------------------------------------------------------

_no_controls = st.characters(
    codec="utf-8", exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")
)
_token_chars = st.characters(codec="utf-8", exclude_categories=("C", "Z"))
_key_chars = st.characters(codec="ascii", exclude_categories=("C", "Z"))  # a header's ASCII
_labels = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20).filter(
    lambda label: not label.startswith("-") and not label.endswith("-")
)
_hosts = st.builds(
    lambda labels, tld, port: ".".join([*labels, tld]) + port,
    st.lists(_labels, max_size=3),
    st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=6),
    st.one_of(st.just(""), st.integers(1, 65535).map(lambda port: f":{port}")),
)
ARG_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "host": _hosts,
    "user": st.text(_token_chars, min_size=1, max_size=40),
    "key": st.text(_key_chars, min_size=1, max_size=60),
    "description": st.text(_no_controls, max_size=40),
    "passphrase": st.text(_no_controls, min_size=1, max_size=40),
    "password": st.text(
        st.characters(codec="utf-8", exclude_categories=["Cs"], exclude_characters="\x00"),
        min_size=1,
        max_size=40,
    ),
    "key_id": st.text("0123456789abcdefABCDEF", min_size=4, max_size=64),
    "lifetime": st.one_of(
        st.integers(min_value=1, max_value=int(MAX_LIFETIME)),
        st.floats(min_value=0, max_value=MAX_LIFETIME, exclude_min=True),
    ),
    "persist": st.booleans(),
    "keep": st.booleans(),
    "local": st.booleans(),
    "delete": st.booleans(),
    "all": st.booleans(),
    "remote": st.booleans(),
    "reveal": st.booleans(),
    "export": st.booleans(),
    "confirm": st.booleans(),
    "allow_exe": st.lists(
        st.lists(st.text("abcdefghij-_", min_size=1, max_size=8), min_size=1, max_size=4).map(
            lambda parts: "/" + "/".join(parts)
        ),
        max_size=4,
    ),
    "follow": st.booleans(),
    "n": st.integers(min_value=0, max_value=1_000_000),
    "purpose": st.just("exec"),
    "rotate_every": st.one_of(
        st.integers(min_value=60, max_value=int(MAX_LIFETIME)),
        st.floats(min_value=60, max_value=MAX_LIFETIME),
    ),
}


def _valid_args(op: str) -> st.SearchStrategy[dict[str, Any]]:
    spec = OPS[op]
    return st.fixed_dictionaries(
        {name: ARG_VALUES[name] for name, (_, needed) in spec.items() if needed},
        optional={name: ARG_VALUES[name] for name, (_, needed) in spec.items() if not needed},
    )


valid_requests = st.sampled_from(list(OPS)).flatmap(
    lambda op: st.tuples(st.just(op), _valid_args(op))
)
scalar_ids = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)


def _expected_args(args: Mapping[str, Any]) -> dict[str, Any]:
    expected = dict(args)
    if "key_id" in expected:
        expected["key_id"] = expected["key_id"].lower()
    if "lifetime" in expected:
        expected["lifetime"] = float(expected["lifetime"])
    if "allow_exe" in expected:
        expected["allow_exe"] = tuple(dict.fromkeys(expected["allow_exe"]))
    return expected


@settings(max_examples=300, deadline=None)
@given(op_args=valid_requests, request_id=scalar_ids)
def test_encode_request_then_parse_request_round_trips(
    op_args: tuple[str, dict[str, Any]], request_id: Scalar
) -> None:
    """A valid request encoded by encode_request parses back to the same id, op and args."""
    op, args = op_args
    line = encode_request(op, request_id, args)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    request = parse_request(line[:-1])
    assert request.op == op
    assert request.id == request_id
    assert type(request.id) is type(request_id)
    assert dict(request.args) == _expected_args(args)


@settings(max_examples=300, deadline=None)
@given(
    op_args=valid_requests,
    request_id=scalar_ids,
    mutations=st.lists(
        st.tuples(
            st.sampled_from(["flip", "insert", "delete"]),
            st.integers(0, 10**6),
            st.binary(min_size=1, max_size=3),
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_mutated_valid_requests_parse_or_are_rejected(
    op_args: tuple[str, dict[str, Any]],
    request_id: Scalar,
    mutations: list[tuple[str, int, bytes]],
) -> None:
    """A valid request with bytes flipped, inserted or deleted still parses or is rejected."""
    op, args = op_args
    line = bytearray(encode_request(op, request_id, args)[:-1])
    for kind, position, chunk in mutations:
        index = position % (len(line) + 1)
        if kind == "insert":
            line[index:index] = chunk
        elif line and kind == "delete":
            del line[index % len(line)]
        elif line:
            line[index % len(line)] ^= chunk[0] or 1
    parses_or_rejects(bytes(line))


@pytest.mark.parametrize(
    ("raw", "echoed"),
    [
        (b'{"id":1e400,"op":"hello"}', None),  # out of range: no id to echo
        (b'{"id":-1e400,"op":"nope"}', None),
        (b'{"id":2.5,"op":"hello"}', 2.5),
        (b'{"id":"x\\u2028y","op":"nope"}', "x\u2028y"),
    ],
    ids=["valid-huge", "invalid-huge", "valid-float", "invalid-string"],
)
def test_every_readable_id_can_be_echoed(raw: bytes, echoed: object) -> None:
    """Whatever id parse_request hands on, valid or rejected, the reply encoders echo it in
    strict JSON (an id out of range as null)."""
    try:
        request_id = parse_request(raw).id
    except InvalidRequest as invalid:
        request_id = invalid.request_id
    for line in (encode_result(request_id, {}), encode_error(request_id, UnknownOp())):
        assert line.index(b"\n") == len(line) - 1
        assert strict_json(line)["id"] == echoed


# --- encoding replies --------------------------------------------------------------------------


def test_encode_result_is_compact_json_with_newline() -> None:
    """encode_result writes id, ok true and result compactly, ending in one newline."""
    assert encode_result(1, {"a": [1, 2]}) == b'{"id":1,"ok":true,"result":{"a":[1,2]}}\n'


def test_encode_error_carries_code_and_message() -> None:
    """encode_error writes id, ok false and the error's code and message."""
    line = encode_error("r", errors.NotFound("no key; add one"))
    assert line == (
        b'{"id":"r","ok":false,"error":{"code":"not_found","message":"no key; add one"}}\n'
    )


def test_encode_request_puts_id_and_op_first() -> None:
    """encode_request writes id, op, then the arguments, compactly with a newline."""
    line = encode_request("get", 3, {"host": "h"})
    assert line == b'{"id":3,"op":"get","host":"h"}\n'


def test_encoders_escape_newlines_and_non_ascii() -> None:
    """Messages with newlines or non-ASCII stay on one ASCII line."""
    line = encode_error(1, errors.BadRequest("two\nlines é \u2028"))
    assert line.count(b"\n") == 1
    assert line.isascii()
    assert json.loads(line)["error"]["message"] == "two\nlines é \u2028"


def test_encode_result_refuses_nan() -> None:
    """A result with NaN cannot be encoded: the encoder never emits non-JSON constants."""
    with pytest.raises(ValueError, match="not JSON compliant"):
        encode_result(1, {"x": math.nan})


wire_errors = st.sampled_from(errors.WIRE_CODES).map(errors.from_code)


@settings(max_examples=300, deadline=None)
@given(
    request_id=scalar_ids,
    result=st.dictionaries(
        st.text(max_size=8),
        st.recursive(
            st.one_of(
                st.none(),
                st.booleans(),
                st.integers(),
                st.floats(allow_nan=False, allow_infinity=False),
                st.text(max_size=20),
            ),
            lambda children: (
                st.lists(children, max_size=3)
                | st.dictionaries(st.text(max_size=5), children, max_size=3)
            ),
            max_leaves=10,
        ),
        max_size=4,
    ),
    error=wire_errors,
    message=st.text(max_size=40),
)
def test_replies_are_one_line_of_json_for_any_scalar_id(
    request_id: Scalar, result: dict[str, Any], error: KeyagentError, message: str
) -> None:
    """encode_result and encode_error give one ASCII line of JSON, ending in \\n, echoing the id."""
    if message:
        error = errors.from_code(error.code, message)
    for line in (encode_result(request_id, result), encode_error(request_id, error)):
        assert line.endswith(b"\n")
        assert line.count(b"\n") == 1
        assert line.isascii()
        decoded = json.loads(line)
        assert decoded["id"] == request_id
        assert type(decoded["id"]) is type(request_id)
    ok = json.loads(encode_result(request_id, result))
    assert ok == {"id": request_id, "ok": True, "result": result}
    reply = parse_reply(encode_error(request_id, error))
    assert reply.ok is False
    assert reply.id == request_id
    assert type(reply.error) is type(error)
    assert reply.error is not None
    assert reply.error.message == error.message


# --- decoding replies --------------------------------------------------------------------------


def test_parse_reply_ok() -> None:
    """An ok reply gives its id and result and no error."""
    reply = parse_reply(b'{"id":4,"ok":true,"result":{"key":"k"}}\n')
    assert reply == Reply(4, True, {"key": "k"}, None)


def test_parse_reply_ok_without_id() -> None:
    """A reply without id gets the id None."""
    assert parse_reply(b'{"ok":true,"result":{}}').id is None


@pytest.mark.parametrize("code", errors.WIRE_CODES)
def test_parse_reply_error_rebuilds_the_leaf(code: str) -> None:
    """An error reply for each wire code rebuilds that code's leaf with the sent message."""
    line = json.dumps({"id": 1, "ok": False, "error": {"code": code, "message": "m; do x"}})
    reply = parse_reply(line.encode())
    assert reply.ok is False
    assert reply.result == {}
    assert reply.error is not None
    assert type(reply.error) is type(errors.from_code(code))
    assert reply.error.code == code
    assert reply.error.message == "m; do x"


def test_parse_reply_unknown_error_code_is_kept() -> None:
    """An error code this client does not know is kept on a root KeyagentError."""
    reply = parse_reply(b'{"id":1,"ok":false,"error":{"code":"future","message":"later"}}')
    assert reply.error is not None
    assert type(reply.error) is KeyagentError
    assert reply.error.code == "future"
    assert reply.error.message == "later"


@pytest.mark.parametrize("message", [None, 5, [], "<missing>"])
def test_parse_reply_error_without_usable_message_uses_default(message: object) -> None:
    """An error reply whose message is missing or not a string gets the leaf's default message."""
    error: dict[str, object] = {"code": "locked"}
    if message != "<missing>":
        error["message"] = message
    reply = parse_reply(json.dumps({"id": 1, "ok": False, "error": error}).encode())
    assert reply.error is not None
    assert type(reply.error) is errors.Locked
    assert reply.error.message == errors.Locked.default_message


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"\xff",
        b"null",
        b"[]",
        b'"ok"',
        b"{}",
        b'{"ok":1,"result":{}}',
        b'{"ok":"true","result":{}}',
        b'{"ok":null}',
        b'{"ok":true}',
        b'{"ok":true,"result":[]}',
        b'{"ok":true,"result":null}',
        b'{"ok":false}',
        b'{"ok":false,"error":"locked"}',
        b'{"ok":false,"error":{}}',
        b'{"ok":false,"error":{"code":5}}',
        b'{"ok":false,"error":{"code":null,"message":"m"}}',
    ],
)
def test_parse_reply_refuses_malformed_replies(raw: bytes) -> None:
    """Anything that is not a protocol v1 reply raises ValueError."""
    with pytest.raises(ValueError):  # noqa: PT011  # the contract is only "ValueError"
        parse_reply(raw)


def test_parse_reply_refuses_deep_nesting_with_value_error() -> None:
    """A deeply nested reply line raises ValueError like any other malformed reply."""
    with pytest.raises(ValueError):  # noqa: PT011
        parse_reply(b"[" * 100000)


@settings(max_examples=300, deadline=None)
@given(raw=st.one_of(st.binary(max_size=100), json_values.map(lambda v: json.dumps(v).encode())))
def test_parse_reply_only_raises_value_error(raw: bytes) -> None:
    """For arbitrary (shallow) input, parse_reply returns a Reply or raises ValueError."""
    try:
        reply = parse_reply(raw)
    except ValueError:
        return
    assert isinstance(reply.ok, bool)
    assert (reply.error is None) == reply.ok


# --- the character checks against their definition --------------------------------------------


# What the protocol forbids, written as the regular expressions docs/protocol.md describes;
# the agent checks the same sets without importing re.
def _spec_control(text: str) -> bool:
    """Unicode categories C* (and the separators Zl, Zp), as docs/protocol.md says."""
    return any(unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp")
               for c in text)  # fmt: skip


def _spec_not_token(text: str) -> bool:
    """Unicode categories C* and Z*, as docs/protocol.md says."""
    return any(unicodedata.category(c)[0] in "CZ" for c in text)


_EDGES = (
    "\x00\x1f\x20\x7e\x7f\x9f\xa0\u200d\u200e\u200f\u2029\u202a\u202e\u202f"
    "\u2065\u2066\u2069\u206a\ud7ff\ud800\udfff\ue000"
)


@settings(max_examples=500, deadline=None)
@given(st.text(st.one_of(st.characters(), st.sampled_from(_EDGES)), max_size=12))
def test_character_checks_match_their_definition(text: str) -> None:
    """The text checks reject exactly the characters their regular expressions name."""
    assert protocol.has_control_characters(text) == _spec_control(text)
    assert protocol.is_token(text) == (not _spec_not_token(text))


@pytest.mark.parametrize("char", list(_EDGES))
def test_each_edge_character_is_judged_as_defined(char: str) -> None:
    """Every boundary character, alone and inside other text, is judged by its definition."""
    for text in (char, f"ab{char}cd"):
        assert protocol.has_control_characters(text) == _spec_control(text)
        assert protocol.is_token(text) == (not _spec_not_token(text))


def test_rotate_every_becomes_float_seconds_and_names_its_bounds() -> None:
    """create's rotate_every is handed on as float seconds; one under a minute is refused
    with a message that names the bounds."""
    request = parse_request(encode(with_arg("create", "rotate_every", 3600)))
    assert request.args["rotate_every"] == 3600.0
    assert type(request.args["rotate_every"]) is float
    assert_bad_request(
        rejected(with_arg("create", "rotate_every", 30)), "from 60 (1m) to ten years"
    )
