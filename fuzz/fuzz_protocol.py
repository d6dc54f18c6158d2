"""Coverage-guided fuzzing of keyagent's wire protocol with atheris (libFuzzer for Python).

Usage (see fuzz/README.md)::

    python fuzz/fuzz_protocol.py [libFuzzer flags] WORK_CORPUS_DIR fuzz/corpus

Each input is used three ways:

1. as a request line: ``parse_request`` returns a :class:`Request` or raises
   :class:`InvalidRequest` carrying ``bad_request``, ``unknown_op`` or ``too_large``; the
   reply the server would send for it encodes to one line that ``parse_reply`` reads back
   with the same id, and a valid request re-encoded by the client's encoder parses to the
   same request;
2. as a reply line: ``parse_reply`` returns a :class:`Reply` or raises ``ValueError``;
3. as a recipe (``FuzzedDataProvider``) for a structured request: an op and arguments of
   every JSON type, encoded as JSON, so that the argument validators see values of every
   type rather than only what random bytes manage to make of JSON syntax.

Any other exception, or a broken invariant (raised as :class:`FuzzCrash`), is a crash:
libFuzzer stops and writes the input to ``crash-<sha1>`` in the working directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from typing import Any

import atheris

with atheris.instrument_imports():
    from keyagent import protocol
    from keyagent.protocol import InvalidRequest, Request

REQUEST_ERROR_CODES = frozenset({"bad_request", "unknown_op", "too_large"})
ARGUMENT_NAMES = sorted({name for spec in protocol.OPS.values() for name in spec})
OP_NAMES = sorted(protocol.OPS)


class FuzzCrash(Exception):
    """An invariant of the protocol module does not hold for this input."""


def same_id(left: object, right: object) -> bool:
    """Equal ids of the same JSON type (1, 1.0 and true are different ids on the wire)."""
    return type(left) is type(right) and left == right


def check_reply_line(line: bytes, request_id: protocol.Scalar, *, ok: bool) -> None:
    """A reply the server would send is one line that parse_reply reads back as sent."""
    if not line.endswith(b"\n") or line.count(b"\n") != 1:
        raise FuzzCrash("a reply is not exactly one newline-terminated line")
    reply = protocol.parse_reply(line[:-1])
    if reply.ok is not ok or not same_id(reply.id, request_id):
        raise FuzzCrash("a reply does not read back with its id and outcome")


def check_request(line: bytes) -> None:
    try:
        request = protocol.parse_request(line)
    except InvalidRequest as invalid:
        if invalid.error.code not in REQUEST_ERROR_CODES:
            raise FuzzCrash(f"parse_request refused with {invalid.error.code}") from None
        if str(invalid) != invalid.error.message:
            raise FuzzCrash("InvalidRequest's text is not its error's message") from None
        check_reply_line(
            protocol.encode_error(invalid.request_id, invalid.error), invalid.request_id, ok=False
        )
        return
    check_valid(request)


def check_valid(request: Request) -> None:
    spec = protocol.OPS.get(request.op)
    if spec is None:
        raise FuzzCrash("parse_request accepted an unknown op")
    if not set(request.args) <= set(spec):
        raise FuzzCrash("parse_request accepted an unknown argument")
    if any(needed and name not in request.args for name, (_, needed) in spec.items()):
        raise FuzzCrash("parse_request accepted a request without a required argument")
    lifetime = request.args.get("lifetime")
    if lifetime is not None and not (
        isinstance(lifetime, float) and 0 < lifetime <= protocol.MAX_LIFETIME
    ):
        raise FuzzCrash("parse_request accepted a lifetime out of range")
    check_reply_line(protocol.encode_result(request.id, {"op": request.op}), request.id, ok=True)
    again = protocol.encode_request(request.op, request.id, request.args)
    if len(again) - 1 > protocol.MAX_LINE:
        # Re-encoding can lengthen a request that fitted (1e2 becomes 100.0, whitespace and
        # member order aside): such a line is not one a client would send.
        return
    if protocol.parse_request(again[:-1]) != request:
        raise FuzzCrash("a valid request does not survive encode_request and parse_request")


def check_reply(line: bytes) -> None:
    with contextlib.suppress(ValueError):
        protocol.parse_reply(line)


def json_value(data: Any, depth: int) -> object:
    """A JSON value of any type, drawn from ``data`` (an atheris.FuzzedDataProvider)."""
    kind = int(data.ConsumeIntInRange(0, 9 if depth < 4 else 7))
    if kind == 0:
        return None
    if kind == 1:
        return bool(data.ConsumeBool())
    if kind == 2:
        return int(data.ConsumeInt(int(data.ConsumeIntInRange(1, 48))))
    if kind == 3:
        return float(data.ConsumeFloat())  # NaN and infinities included
    if kind == 4:
        return str(data.ConsumeUnicode(int(data.ConsumeIntInRange(0, 40))))
    if kind == 5:  # long strings, around the argument length limits
        length = int(data.ConsumeIntInRange(0, 9000))
        return str(data.ConsumeUnicode(1) or "x") * length
    if kind == 6:
        return "".join("0123456789abcdefABCDEF"[b % 22] for b in data.ConsumeBytes(14))
    if kind == 7:
        return math.ldexp(1.0, int(data.ConsumeIntInRange(-1074, 1023)))  # subnormal to huge
    if kind == 8:
        return [json_value(data, depth + 1) for _ in range(int(data.ConsumeIntInRange(0, 4)))]
    return {
        str(data.ConsumeUnicode(8)): json_value(data, depth + 1)
        for _ in range(int(data.ConsumeIntInRange(0, 4)))
    }


def check_structured(raw: bytes) -> None:
    data = atheris.FuzzedDataProvider(raw)
    message: dict[str, object] = {}
    if data.ConsumeBool():
        message["id"] = json_value(data, 2)
    if data.ConsumeIntInRange(0, 7):
        op = OP_NAMES[int(data.ConsumeIntInRange(0, len(OP_NAMES) - 1))]
        message["op"] = op
        names = sorted(protocol.OPS[op]) or ARGUMENT_NAMES
    else:
        message["op"] = json_value(data, 3)
        names = ARGUMENT_NAMES
    for _ in range(int(data.ConsumeIntInRange(0, 6))):
        choice = int(data.ConsumeIntInRange(0, 9))
        if choice < 7:
            name = names[int(data.ConsumeIntInRange(0, len(names) - 1))]
        elif choice < 9:
            name = ARGUMENT_NAMES[int(data.ConsumeIntInRange(0, len(ARGUMENT_NAMES) - 1))]
        else:
            name = str(data.ConsumeUnicode(12))
        message[name] = json_value(data, 0)
    text = json.dumps(message, allow_nan=True, ensure_ascii=bool(data.ConsumeBool()))
    # surrogatepass: a lone surrogate becomes bytes that are not UTF-8, as a hostile client
    # might send them.
    check_request(text.encode("utf-8", "surrogatepass"))


def test_one_input(raw: bytes) -> None:
    check_request(raw)
    check_reply(raw)
    check_structured(raw)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
