"""What a valid setting or argument is: one definition for every place that checks one.

The protocol (:mod:`keyagent.protocol`, what a request may carry), the configuration file
and environment (:mod:`keyagent.config`, exit 78), the command lines (``keyagent`` and
``keyagent-ctl``, through :mod:`keyagent._argparse`, exit 64), the hand-off to the serving
process (:mod:`keyagent.handoff`) and the Conduce client (:class:`keyagent.conduce.HttpSettings`,
:class:`keyagent.conduce.ConduceAccount`) all call the functions here. Each ``*_problem``
function returns None for a good value, else the reason it is not one; the caller adds
where the value came from (an argument name, a file and line, a flag) and its own error
type. A reason describes the rule, never the value: a value may be a pasted secret.

The serving process imports this module, so it imports nothing beyond ``math`` and ``os``
(no ``re``, ``typing``, ``dataclasses`` or ``enum``): the rules are plain string and number
checks.
"""

from __future__ import annotations

import math
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = [
    "MAX_ALLOWED_EXES",
    "MAX_AUDIT_ENTRIES",
    "MAX_EXE_PATH",
    "MAX_HOST",
    "MAX_LIFETIME",
    "MAX_USER",
    "MIN_ROTATE_EVERY",
    "NOT_AN_ENTRY_COUNT",
    "NOT_A_COUNT",
    "NOT_POSITIVE",
    "NOT_SECONDS",
    "TOO_LONG",
    "TOO_SHORT_ROTATION",
    "count_problem",
    "duration_problem",
    "entry_count_problem",
    "exe_list_problem",
    "exe_path_problem",
    "has_control_characters",
    "host_problem",
    "is_token",
    "is_valid_host",
    "path_problem",
    "rotate_every_problem",
    "shared_directory",
    "user_problem",
]

# --- durations: lifetimes, timeouts, intervals -----------------------------------------------

MAX_LIFETIME: Final = 10 * 365 * 24 * 3600.0
"""Ten years: longer than any sane lifetime or timeout, short enough for datetime arithmetic."""

# What a duration must be, as phrases that follow "must be". Callers may compare a problem
# with these (``is``) to word their own message, as the configuration file does.
NOT_SECONDS: Final = "a number of seconds"
NOT_POSITIVE: Final = "a positive duration"
TOO_LONG: Final = "at most ten years (315360000 seconds)"


def is_finite_number(value: object) -> bool:
    """Whether ``value`` is an ``int`` or ``float`` (not a ``bool``) that a float can hold:
    not NaN, not infinite, and not an integer of hundreds of digits (which ``math.isfinite``
    would raise OverflowError for). For numbers read from files and other outside records."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def duration_problem(seconds: object) -> str | None:
    """What ``seconds`` must be to serve as a key lifetime, a timeout or an interval, or None
    if it is fine: an ``int`` or ``float`` (not a ``bool``), not NaN, positive, and at most
    :data:`MAX_LIFETIME` (so never infinite).

    Text such as ``"8h"`` is turned into seconds first, by
    :func:`keyagent.duration.parse_duration`; the same rule then applies.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return NOT_SECONDS
    try:
        value = float(seconds)
    except OverflowError:  # an integer with hundreds of digits
        return NOT_POSITIVE if seconds < 0 else TOO_LONG
    if math.isnan(value):
        return NOT_SECONDS
    if value <= 0:
        return NOT_POSITIVE
    if value > MAX_LIFETIME:
        return TOO_LONG
    return None


MIN_ROTATE_EVERY: Final = 60.0
"""The shortest rotation interval (``create --rotate-every``): each rotation is two calls to
the service, and a key replaced more often than every minute helps no one."""
TOO_SHORT_ROTATION: Final = "at least 60 seconds (1m)"


def rotate_every_problem(seconds: object) -> str | None:
    """What a rotation interval must be, or None if ``seconds`` is fine: a duration
    (:func:`duration_problem`) of at least :data:`MIN_ROTATE_EVERY`."""
    problem = duration_problem(seconds)
    if problem is not None:
        return problem
    if float(seconds) < MIN_ROTATE_EVERY:  # type: ignore[arg-type]  # a number: checked above
        return TOO_SHORT_ROTATION
    return None


# --- counts: max_connections, max_keys -------------------------------------------------------

NOT_A_COUNT: Final = "a whole number of at least 1"


def count_problem(value: object) -> str | None:
    """What ``value`` must be to serve as a limit such as ``max_connections``, or None if it
    is fine: an ``int`` (not a ``bool``) of at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return NOT_A_COUNT
    return None


# --- the audit log ---------------------------------------------------------------------------

MAX_AUDIT_ENTRIES: Final = 1_000_000
"""The most audit entries the agent keeps in memory (``audit_entries``) or ``log`` returns
(``n``): at a few hundred bytes each, a bound on the memory the audit ring can take."""
NOT_AN_ENTRY_COUNT: Final = f"a whole number from 0 to {MAX_AUDIT_ENTRIES}"


def entry_count_problem(value: object) -> str | None:
    """What ``value`` must be to count audit entries (``audit_entries``, ``log``'s ``n``), or
    None if it is fine: an ``int`` (not a ``bool``) from 0 to :data:`MAX_AUDIT_ENTRIES`. Zero
    keeps no entry in memory (they are still logged and followed), or asks for none."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_AUDIT_ENTRIES:
        return NOT_AN_ENTRY_COUNT
    return None


# --- the HTTP socket's workers ---------------------------------------------------------------

MAX_HTTP_WORKERS: Final = 32
"""The most HTTP worker processes (``http_workers``) the agent may be told to run at once:
each is an interpreter of its own, about 24 MiB resident."""
DEFAULT_HTTP_WORKERS: Final = max(2, min(8, 2 * (os.cpu_count() or 1)))
"""Most HTTP workers at once unless ``http_workers`` says: two per core (a worker waits on
the network much of the time), at least two and at most eight (docs/performance.md measures
the choice)."""
NOT_A_WORKER_COUNT: Final = f"a whole number from 1 to {MAX_HTTP_WORKERS}"


def worker_count_problem(value: object) -> str | None:
    """What ``value`` must be to bound the HTTP workers (``http_workers``), or None if it is
    fine: an ``int`` (not a ``bool``) from 1 to :data:`MAX_HTTP_WORKERS`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_HTTP_WORKERS:
        return NOT_A_WORKER_COUNT
    return None


# --- text: users, paths ----------------------------------------------------------------------


def _span(first: str, last: str) -> str:
    return "".join(map(chr, range(ord(first), ord(last) + 1)))


# Space separators (Unicode category Zs). Descriptions may hold them; names may not.
_SPACES = dict.fromkeys(
    map(ord, " \u00a0\u1680" + _span("\u2000", "\u200a") + "\u202f\u205f\u3000")
)


def has_control_characters(value: str) -> bool:
    """True if ``value`` holds a character of Unicode category C* (controls, format
    characters such as the bidirectional overrides, surrogates, private use, unassigned)
    or a line or paragraph separator (Zl, Zp). Spaces are allowed.

    Users, descriptions, paths and names must not. ``str.isprintable`` is false exactly for
    categories C* and Z* other than the ASCII space, in C.
    """
    return not value.translate(_SPACES).isprintable()


def is_token(value: str) -> bool:
    """True if ``value`` holds no character of Unicode category C* or Z* (no space of any
    kind, no separator, no control or format character): what a host, a user or a key must
    be."""
    return value.isprintable() and " " not in value


MAX_USER: Final = 320
"""The longest account name (an e-mail address is at most 320 characters)."""


def user_problem(user: object) -> str | None:
    """Why ``user`` is not an account name, or None if it is one: 1 to :data:`MAX_USER`
    characters, none of them a space, separator or control character."""
    if not isinstance(user, str):
        return "the user is not a string"
    if not 1 <= len(user) <= MAX_USER:
        return f"a user is 1 to {MAX_USER} characters long"
    if not is_token(user):
        return "a user has no spaces or control characters"
    return None


def path_problem(path: object) -> str | None:
    """Why ``path`` is not a file path keyagent takes, or None if it is one: not empty, and
    without control characters (they would let a printed path rewrite the terminal line,
    and NUL breaks ``open``)."""
    if not isinstance(path, str):
        return "the path is not a string"
    if not path:
        return "the path is empty"
    if has_control_characters(path):
        return "a path has no control characters"
    return None


# --- programs allowed to use a key (add --allow-exe) -----------------------------------------

MAX_EXE_PATH: Final = 4095
"""The longest executable path (Linux's PATH_MAX, 4096, less its NUL)."""
MAX_ALLOWED_EXES: Final = 32
"""How many programs one key may name as allowed."""
DELETED: Final = " (deleted)"
"""What Linux appends to ``/proc/PID/exe`` when the program's file was deleted or replaced."""


def exe_path_problem(path: object) -> str | None:
    """Why ``path`` cannot name a program allowed to use a key, or None if it can: absolute
    and normalised (no ``.``, ``..``, empty or trailing components: it is compared as text
    with ``/proc/PID/exe``, which is always in that form), at most :data:`MAX_EXE_PATH`
    characters, without control characters (NUL included), and not ending in
    :data:`DELETED`."""
    problem = path_problem(path)
    if problem is not None:
        return problem
    assert isinstance(path, str)  # noqa: S101  # path_problem checked it
    if len(path) > MAX_EXE_PATH:
        return f"a program's path is at most {MAX_EXE_PATH} characters long"
    if not path.startswith("/"):
        return "a program's path is absolute (starts with /)"
    if any(part in ("", ".", "..") for part in path[1:].split("/")):
        return (
            "a program's path is normalised: no '.', '..', doubled or trailing slashes "
            "(the client resolves it with realpath)"
        )
    if path.endswith(DELETED):
        # /proc/PID/exe reads "PATH (deleted)" for a program whose file is gone: such a
        # path would let a deleted (replaced) program pass for a real file of that name.
        return (
            f"a program's path may not end in '{DELETED}', which is how Linux shows a "
            "program whose file was deleted; rename the program"
        )
    return None


def exe_list_problem(paths: object) -> str | None:
    """Why ``paths`` is not a list of programs allowed to use a key, or None: a list of at
    most :data:`MAX_ALLOWED_EXES` paths, each one as :func:`exe_path_problem` wants."""
    if not isinstance(paths, list | tuple):
        return "the allowed programs are a list of paths"
    if len(paths) > MAX_ALLOWED_EXES:
        return f"a key allows at most {MAX_ALLOWED_EXES} programs"
    for path in paths:
        problem = exe_path_problem(path)
        if problem is not None:
            return problem
    return None


# --- hosts -----------------------------------------------------------------------------------
# A DNS name, an IPv4 literal or a bracketed IPv6 literal, with an optional port. Anything
# else (a scheme, a path, user info, whitespace, an empty label) would let a URL built from
# it point somewhere the user did not name, or make the URL parser fail.

MAX_HOST: Final = 253 + 1 + 2 + 6  # the longest name, or a bracketed IPv6 literal, and ":65535"
_LABEL_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-"
_DIGITS = "0123456789"


def _name_problem(name: str) -> str | None:
    if not name:
        return "the host name is empty"
    if len(name) > 253:
        return "a host name is at most 253 characters long"
    labels = name.split(".")
    for label in labels:
        if not label:
            return "a host name has no empty labels (no leading, trailing or doubled dots)"
        if len(label) > 63:
            return "each label of a host name is at most 63 characters long"
        if label.strip(_LABEL_CHARS):
            return "a host name has only letters, digits, hyphens and dots"
        if label[0] == "-" or label[-1] == "-":
            return "a label of a host name neither starts nor ends with a hyphen"
    if not labels[-1].strip(_DIGITS):  # all digits: only an IPv4 address ends like that
        parts = labels
        if len(parts) != 4 or any(
            not part
            or part.strip(_DIGITS)
            or len(part) > 3
            or int(part) > 255
            or (len(part) > 1 and part[0] == "0")  # 010 is octal 8 to inet_aton: ambiguous
            for part in parts
        ):
            return "an IPv4 address is four numbers from 0 to 255, without leading zeros"
    return None


def _ipv6_problem(literal: str) -> str | None:
    if not literal or literal.strip("0123456789abcdefABCDEF:."):
        return "an IPv6 address has only hex digits, colons and dots"
    import ipaddress  # rare: only for bracketed literals

    try:
        ipaddress.IPv6Address(literal)
    except ValueError:
        return "the text in brackets is not an IPv6 address"
    return None


def host_problem(host: object) -> str | None:
    """Why ``host`` is not a host this agent will contact, or None if it is fine."""
    if not isinstance(host, str) or not host:
        return "the host is empty"
    if len(host) > MAX_HOST:
        return "the host is too long"
    if "/" in host or "@" in host:
        return "write the host alone (app.conduce.com), without https://, a path or user@"
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return "an IPv6 address in brackets needs its closing bracket"
        problem = _ipv6_problem(host[1:end])
        rest = host[end + 1 :]
    else:
        name, colon, port_text = host.partition(":")
        problem = _name_problem(name)
        rest = colon + port_text
    if problem is not None:
        return problem
    if rest:
        port = rest[1:]
        if rest[0] != ":" or not port or port.strip(_DIGITS) or len(port) > 5:
            return "a port is written :N with N from 1 to 65535"
        if not 1 <= int(port) <= 65535:
            return "a port is a number from 1 to 65535"
    return None


def is_valid_host(host: str) -> bool:
    """Whether ``host`` follows the host grammar (see :func:`host_problem`)."""
    return host_problem(host) is None


def shared_directory(info: os.stat_result) -> bool:
    """Whether a directory is one many users write to (open to all, and sticky like /tmp or
    someone else's): advice to close it or remove it would do harm. A directory of one's
    own that is sticky but closed to others (the XDG spec suggests the bit) is not."""
    sticky, open_to_all = 0o1000, 0o002
    return bool(info.st_mode & open_to_all) and (
        bool(info.st_mode & sticky) or info.st_uid != os.geteuid()
    )
