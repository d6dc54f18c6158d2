"""The configuration file, the environment and the command line, merged into one :class:`Config`.

Where the file is
-----------------

``config.toml`` in the user's configuration directory (``~/.config/keyagent/config.toml`` on
Linux, see :func:`keyagent.paths.config_file`), or the file named by ``$KEYAGENT_CONFIG``, or
the ``path`` given to :func:`load`. A missing file at the default location means "use the
defaults"; a file named explicitly (argument or ``$KEYAGENT_CONFIG``) must exist, because a
typo there would otherwise silently drop every setting. ``KEYAGENT_CONFIG=/dev/null`` says
"no file". Whoever can edit the file can point ``host`` and ``ca_bundle`` at their own
server and CA and harvest the password at the next login, so the file, every directory on
its path and every symbolic link followed must belong to the user or root, and neither the
file nor those directories may be writable by group or others (a sticky directory such as
``/tmp`` excepted); :mod:`keyagent.trust` states the rule exactly. The same holds for
``ca_bundle``, which the daemon checks.

Schema
------

Flat: every setting is a top-level key (the names are the daemon's long options with ``_``
for ``-``). Durations are a number of seconds (``90``, ``0.5``) or a string that
:func:`keyagent.duration.parse_duration` reads (``"15m"``, ``"8h"``, ``"1h30m"``); every
duration must be positive and at most ten years.

=================== ============ ========= ======================= ==========================
key                 type         default   environment             used by
=================== ============ ========= ======================= ==========================
``host``            string       none      ``KEYAGENT_HOST``       keyagent-ctl: the Conduce
                                                                   host (name or address,
                                                                   optional ``:port``)
``user``            string       none      ``KEYAGENT_USER``       keyagent-ctl: account
                                                                   e-mail
``lifetime``        duration     none      ``KEYAGENT_LIFETIME``   keyagent ``-t``: default
                                 (never                            key lifetime
                                 expire)
``persist``         boolean      false     -                       keyagent-ctl add/create:
                                                                   also keep keys in the OS
                                                                   keyring
``ca_bundle``       path         none      ``KEYAGENT_CA_BUNDLE``  keyagent ``--ca-bundle``
``connect_timeout`` duration     5         -                       keyagent
``read_timeout``    duration     30        -                       keyagent
``validate_after``  duration     300       -                       keyagent
``idle_timeout``    duration     300       -                       keyagent
``line_timeout``    duration     10        -                       keyagent
``max_connections`` integer >= 1 1024      -                       keyagent
``max_keys``        integer >= 1 100000    -                       keyagent: keys held at once
``audit_entries``   integer 0 to 10000     -                       keyagent: audit entries
                    1000000                                        kept in memory (0: none;
                                                                   still logged)
``http_workers``    integer 1 to automatic -                       keyagent: HTTP worker
                    32           (2 per                            processes at once (each
                                 core, 2                           about 24 MiB)
                                 to 8)
``export``          boolean      true      -                       keyagent: whether new keys
                                                                   may be taken out (get,
                                                                   exec) unless add/create
                                                                   says
``allow_exe``       array of     [] (any   -                       keyagent: the programs new
                    paths        program)                          keys and sessions allow
                                                                   unless add/create/login
                                                                   names some
``askpass``         path         none      ``KEYAGENT_ASKPASS``    keyagent: the program that
                                                                   confirms each use of a
                                                                   ``--confirm`` key or
                                                                   session
``confirm_timeout`` duration     30        -                       keyagent: how long it waits
                                                                   for that answer
=================== ============ ========= ======================= ==========================

``keep_created_keys`` (boolean, default false; keyagent): whether a key that ``create`` makes
with a lifetime stays on the service when it expires. By default the agent deletes it there
(an ephemeral key) unless ``create --keep``; with true it keeps it unless ``create --no-keep``.

``stop_timeout`` (duration, default 10; keyagent ``--stop-timeout``): how long a stopping
agent waits for its ephemeral keys to be deleted on the service before it exits anyway,
logging each key it could not delete. Under systemd keep it below the unit's
``TimeoutStopSec`` (15 s in the shipped keyagent.service), or systemd kills the agent first.

``askpass`` and each ``allow_exe`` path expand a leading ``~`` and are made absolute like
``ca_bundle``; ``allow_exe`` paths are then resolved (symbolic links followed), because they
are compared with ``/proc/PID/exe``, which always is. The daemon checks the askpass program
as it checks the CA bundle (:mod:`keyagent.trust`): a program another user could replace
would answer the agent's questions for them.

``insecure`` (default false) exists on the command line only. In a file it is refused: a
file outlives the moment it was written for, so a switch that turns off TLS verification
would keep applying, unseen, to every later start of the agent, including starts by login
scripts and service managers, and to anyone who copies the file. ``--insecure`` has to be
typed, and shows in ``ps``, each time. For a private CA, set ``ca_bundle`` instead. For the
same reason there is no ``KEYAGENT_INSECURE``: the environment is inherited just as unseen.

``ca_bundle`` expands a leading ``~``; a relative path in the file is relative to the file's
directory (so the file and its bundle can move together), one from the environment or the
command line is relative to the current directory. The bundle's existence is checked by the
daemon, not here: ``keyagent-ctl`` reads the same file but never uses the bundle, and must not
fail because it is missing.

Secrets never come from the file: a key that looks like one (``password``, ``token``,
``api_key``, ``key``, ...), at any depth, is refused with a pointer to ``keyagent-ctl add``
and ``keyagent-ctl login``.

Precedence
----------

Command line (``flags``) > environment > file > built-in default. An empty environment
variable counts as unset, as ``keyagent-ctl`` has always treated ``KEYAGENT_HOST``. Every
value present in a layer is checked even when a higher layer overrides it, so an error in
the file does not come and go with the flags used.

Errors are :class:`ConfigError`, whose message is one sentence that names the file, the line,
the key and what is expected.
"""

from __future__ import annotations

import datetime
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final, cast

from keyagent import paths
from keyagent.duration import parse_duration
from keyagent.errors import BadConfig
from keyagent.rules import (
    DEFAULT_HTTP_WORKERS,
    MAX_ALLOWED_EXES,
    MAX_USER,
    NOT_A_COUNT,
    NOT_A_WORKER_COUNT,
    NOT_AN_ENTRY_COUNT,
    NOT_POSITIVE,
    NOT_SECONDS,
    count_problem,
    duration_problem,
    entry_count_problem,
    exe_list_problem,
    exe_path_problem,
    host_problem,
    path_problem,
    user_problem,
    worker_count_problem,
)
from keyagent.trust import UntrustedFile, check_trusted

__all__ = [
    "CONFIG_ENV",
    "DEFAULTS",
    "ENV_VARS",
    "SETTINGS",
    "Config",
    "ConfigError",
    "Setting",
    "format_duration",
    "load",
    "render",
]

CONFIG_ENV: Final = "KEYAGENT_CONFIG"


@dataclass(frozen=True)
class Setting:
    """One effective setting: its name, its value and where that value came from.

    ``source`` is ``"flag"``, ``"env KEYAGENT_X"``, ``"file /path:LINE"`` (``"file /path"``
    if the line could not be found) or ``"default"``.
    """

    name: str
    value: object
    source: str


class ConfigError(BadConfig):
    """A setting (or the whole file) is unusable; ``message`` says where, what and why."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        key: str | None = None,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.key = key
        self.line = line
        self.column = column

    def __repr__(self) -> str:
        return f"ConfigError({self.message!r})"


@dataclass(frozen=True)
class Config:
    """The effective configuration; every field has passed the same checks as the flags."""

    host: str | None = None
    user: str | None = None
    lifetime: float | None = None
    persist: bool = False
    ca_bundle: str | None = None
    insecure: bool = False
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    validate_after: float = 300.0
    idle_timeout: float = 300.0
    line_timeout: float = 10.0
    max_connections: int = 1024
    max_keys: int = 100_000
    export: bool = True
    allow_exe: tuple[str, ...] = ()
    askpass: str | None = None
    confirm_timeout: float = 30.0
    audit_entries: int = 10_000
    http_workers: int = DEFAULT_HTTP_WORKERS
    keep_created_keys: bool = False
    stop_timeout: float = 10.0
    path: str = ""
    """The configuration file that was consulted (absolute)."""
    path_source: str = "default"
    """How that file was chosen: ``"argument"``, ``"env KEYAGENT_CONFIG"`` or ``"default"``."""
    file_found: bool = False
    _sources: Mapping[str, Setting] = field(default_factory=dict, repr=False, compare=False)

    def sources(self) -> dict[str, Setting]:
        """Every setting, in schema order, with its value and origin."""
        return {
            name: self._sources.get(name) or Setting(name, getattr(self, name), "default")
            for name in SETTINGS
        }


# --- values ----------------------------------------------------------------------------------


class _Invalid(Exception):
    """A value is unusable: what it ``must`` be, and what it ``got`` (described, not dumped)."""

    def __init__(self, must: str, got: str) -> None:
        super().__init__(must)
        self.must = must
        self.got = got


@dataclass(frozen=True)
class _Context:
    """What resolving a path needs: the directory relative paths start from, and ``~``."""

    base: str
    home: str


def _printable(text: str, limit: int = 40) -> str:
    """``text`` made safe for one terminal line: escapes instead of control and bidi chars."""
    shown = text if len(text) <= limit else text[:limit] + "..."
    out = []
    for char in shown:
        if char in '"\\':
            out.append("\\" + char)
        elif char.isprintable():
            out.append(char)
        else:
            out.append(f"\\u{ord(char):04x}")
    return "".join(out)


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime.datetime):  # before date: a datetime is a date too
        return "a date-time"
    if isinstance(value, datetime.date):
        return "a date"
    if isinstance(value, datetime.time):
        return "a time"
    return f"a {type(value).__name__}"


def _show(value: object) -> str:
    """The value itself for strings and numbers (config values are not secrets), else its kind."""
    if isinstance(value, str):
        return f'"{_printable(value)}"'
    if isinstance(value, int | float) and not isinstance(value, bool):
        text = repr(value)
        return text if len(text) <= 40 else text[:40] + "..."
    return _kind(value)


_DURATION = 'a duration such as 3600 or "8h"'


def _duration(value: object, _: _Context) -> float:
    # Text is read as keyagent-ctl and keyagent read their flags; the number then follows
    # the one rule for durations (keyagent.rules), as the agent applies it.
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _Invalid(_DURATION, _kind(value))
    if isinstance(value, str):
        try:
            seconds: int | float = parse_duration(value)
        except ValueError as error:
            reason = str(error)  # names the value typed, never a secret: this is a duration
            if "must be positive" in reason:
                raise _Invalid(NOT_POSITIVE, _show(value)) from None
            hint = reason.partition("did you mean ")[2]
            must = f"{_DURATION} (did you mean {hint})" if hint else _DURATION
            raise _Invalid(must, _show(value)) from None
    else:
        seconds = value
    problem = duration_problem(seconds)
    if problem is not None:
        raise _Invalid(_DURATION if problem is NOT_SECONDS else problem, _show(value))
    return float(seconds)


def _host(value: object, _: _Context) -> str:
    # The one host grammar of keyagent.rules, as the agent and keyagent.conduce apply it.
    must = 'a host name or address with an optional :port, such as "conduce.example.com"'
    if not isinstance(value, str):
        raise _Invalid(must, _kind(value))
    problem = host_problem(value)
    if problem is not None:
        raise _Invalid(must, f"{_show(value)} ({problem})")
    return value


def _user(value: object, _: _Context) -> str:
    # The one rule for users of keyagent.rules, as the agent and keyagent.conduce apply it.
    must = (
        f'an account name such as "me@example.com", 1 to {MAX_USER} characters,'
        " no spaces or control characters"
    )
    if not isinstance(value, str):
        raise _Invalid(must, _kind(value))
    if user_problem(value) is not None:
        raise _Invalid(must, _show(value))
    return value


def _path(value: object, context: _Context) -> str:
    must = 'a file path such as "~/certs/ca.pem"'
    if not isinstance(value, str):
        raise _Invalid(must, _kind(value))
    if path_problem(value) is not None:
        raise _Invalid(must, _show(value))
    if value == "~" or value.startswith("~/"):
        expanded = context.home + value[1:]
    elif value.startswith("~"):
        expanded = os.path.expanduser(value)
        if expanded.startswith("~"):
            raise _Invalid("a file path whose ~user names an existing user", _show(value))
    else:
        expanded = value
    return os.path.normpath(os.path.join(context.base, expanded))


def _programs(value: object, context: _Context) -> tuple[str, ...]:
    must = f'an array of at most {MAX_ALLOWED_EXES} program paths, such as ["/usr/bin/curl"]'
    if not isinstance(value, list):
        raise _Invalid(must, _kind(value))
    programs: list[str] = []
    for item in value:
        # Resolved as /proc/PID/exe names a running program: symbolic links followed.
        path = os.path.realpath(_path(item, context))
        if exe_path_problem(path) is not None:
            raise _Invalid(must, _show(item))
        programs.append(path)
    if exe_list_problem(programs) is not None:
        raise _Invalid(must, f"{len(programs)} paths")
    return tuple(dict.fromkeys(programs))


def _boolean(value: object, _: _Context) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("true or false (unquoted)", _show(value))
    return value


def _positive_int(value: object, _: _Context) -> int:
    return _whole_number(value, count_problem, NOT_A_COUNT)


def _entry_count(value: object, _: _Context) -> int:
    return _whole_number(value, entry_count_problem, NOT_AN_ENTRY_COUNT)


def _worker_count(value: object, _: _Context) -> int:
    return _whole_number(value, worker_count_problem, NOT_A_WORKER_COUNT)


def _whole_number(value: object, problem: Callable[[object], str | None], what: str) -> int:
    """``value`` if ``problem`` finds none; else _Invalid showing a number, or the kind of
    anything else (a boolean is not a number here, though Python counts it as one)."""
    found = problem(value)
    if found is None and isinstance(value, int):
        return value
    number = isinstance(value, int) and not isinstance(value, bool)
    raise _Invalid(found or what, _show(value) if number else _kind(value))


@dataclass(frozen=True)
class _Spec:
    parse: Callable[[object, _Context], object]
    default: object
    env: str | None = None
    in_file: bool = True


_SPECS: Final[Mapping[str, _Spec]] = {
    "host": _Spec(_host, None, env="KEYAGENT_HOST"),
    "user": _Spec(_user, None, env="KEYAGENT_USER"),
    "lifetime": _Spec(_duration, None, env="KEYAGENT_LIFETIME"),
    "persist": _Spec(_boolean, False),
    "ca_bundle": _Spec(_path, None, env="KEYAGENT_CA_BUNDLE"),
    "insecure": _Spec(_boolean, False, in_file=False),
    "connect_timeout": _Spec(_duration, 5.0),
    "read_timeout": _Spec(_duration, 30.0),
    "validate_after": _Spec(_duration, 300.0),
    "idle_timeout": _Spec(_duration, 300.0),
    "line_timeout": _Spec(_duration, 10.0),
    "max_connections": _Spec(_positive_int, 1024),
    "max_keys": _Spec(_positive_int, 100_000),
    "export": _Spec(_boolean, True),
    "allow_exe": _Spec(_programs, ()),
    "askpass": _Spec(_path, None, env="KEYAGENT_ASKPASS"),
    "confirm_timeout": _Spec(_duration, 30.0),
    "audit_entries": _Spec(_entry_count, 10_000),
    "http_workers": _Spec(_worker_count, DEFAULT_HTTP_WORKERS),
    "keep_created_keys": _Spec(_boolean, False),
    "stop_timeout": _Spec(_duration, 10.0),
}

SETTINGS: Final[tuple[str, ...]] = tuple(_SPECS)
"""Every setting's name, in the order :func:`render` prints them."""
DEFAULTS: Final[Mapping[str, object]] = {name: spec.default for name, spec in _SPECS.items()}
ENV_VARS: Final[Mapping[str, str]] = {
    name: spec.env for name, spec in _SPECS.items() if spec.env is not None
}
"""Setting name -> the environment variable that sets it."""
_FILE_KEYS: Final = tuple(name for name, spec in _SPECS.items() if spec.in_file)
_DURATIONS: Final = frozenset(name for name, spec in _SPECS.items() if spec.parse is _duration)

# Whole words that name a secret, and fragments that do even inside a longer word.
_SECRET_WORDS: Final = frozenset({"key", "pass", "pwd", "pin", "secret", "token", "cookie"})
_SECRET_PARTS: Final = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "apikey",
    "privatekey",
    "credential",
)


def _looks_secret(key: str) -> bool:
    words = [word for word in re.split(r"[^a-z0-9]+", key.lower()) if word]
    joined = "".join(words)
    if any(part in joined for part in _SECRET_PARTS):
        return True
    # "key_id" names a key without being one; it gets the ordinary unknown-setting message.
    return words[-1:] != ["id"] and any(word in _SECRET_WORDS for word in words)


# --- locating keys in the text ---------------------------------------------------------------

# One part of a dotted key: bare, "basic" or 'literal', with the blanks around it.
_KEY_PART: Final = re.compile(
    r"[ \t]*(?:(?P<bare>[A-Za-z0-9_-]+)"
    r'|"(?P<basic>(?:[^"\\\n]|\\.)*)"'
    r"|'(?P<literal>[^'\n]*)')[ \t]*"
)


def _unescape(text: str) -> str:
    import json

    # TOML's basic-string escapes are JSON's plus \U and \e; those rare two stay as written.
    try:
        return str(json.loads(f'"{text}"'))
    except ValueError:
        return text


def _dotted_key(line: str, position: int) -> tuple[tuple[str, ...], int] | None:
    """The dotted key at ``line[position:]`` and where it ends, or None if none starts there."""
    parts: list[str] = []
    while True:
        match = _KEY_PART.match(line, position)
        if match is None:
            return None
        if match["bare"] is not None:
            parts.append(match["bare"])
        elif match["basic"] is not None:
            parts.append(_unescape(match["basic"]))
        else:
            parts.append(match["literal"])
        position = match.end()
        if not line.startswith(".", position):
            return tuple(parts), position
        position += 1


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """The first line of each key path the text defines, tables and their prefixes included.

    tomllib keeps no positions, so this is a line-by-line scan of headers and ``key =`` lines.
    It does not parse values; it only skips the inside of multi-line strings, where a line may
    look like ``key = value``. Anything it misreads merely costs a line number.
    """
    found: dict[tuple[str, ...], int] = {}

    def record(path: tuple[str, ...], number: int) -> None:
        for end in range(1, len(path) + 1):
            found.setdefault(path[:end], number)

    table: tuple[str, ...] = ()
    open_quote: str | None = None  # the delimiter of a multi-line string still open
    # split("\n"), not splitlines(): TOML allows U+2028 and friends inside strings, and
    # counting them as line breaks would shift every later line number.
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        if open_quote is not None:
            if line.count(open_quote) % 2 == 1:
                open_quote = None
            continue
        stripped = line.lstrip(" \t")
        if stripped.startswith("["):
            array = stripped.startswith("[[")
            header = _dotted_key(stripped, 2 if array else 1)
            if header is not None and stripped.startswith("]]" if array else "]", header[1]):
                table = header[0]
                record(table, number)
            continue
        pair = _dotted_key(line, 0)
        if pair is None or not line.startswith("=", pair[1]):
            continue
        record(table + pair[0], number)
        rest = line[pair[1] + 1 :]
        for quote in ('"""', "'''"):
            if rest.count(quote) % 2 == 1:
                open_quote = quote
                break
    return found


def _line_of(lines: Mapping[tuple[str, ...], int], path: tuple[str, ...]) -> int | None:
    """The line of ``path``, else of its nearest enclosing table (e.g. an inline table)."""
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def _walk(table: Mapping[str, object], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every key path in a parsed document, depth first, in file order."""
    for key, value in table.items():
        path = (*prefix, key)
        yield path
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, dict):
                yield from _walk(item, path)


# --- reading the file ------------------------------------------------------------------------


@dataclass
class _File:
    path: str
    text: str
    document: dict[str, object]
    _lines: dict[tuple[str, ...], int] | None = None

    def line(self, *path: str) -> int | None:
        if self._lines is None:
            self._lines = _key_lines(self.text)
        return _line_of(self._lines, path)

    def error(self, body: str, *path: str) -> ConfigError:
        line = self.line(*path) if path else None
        where = self.path if line is None else f"{self.path}:{line}"
        key = ".".join(path) if path else None
        return ConfigError(f"{where}: {body}", path=self.path, key=key, line=line)


def _read(path: str, *, required: bool, how: str) -> _File | None:
    """The file's text and document; None if it is optional and absent."""
    if path == os.devnull:
        return _File(path, "", {})
    try:
        # O_NONBLOCK: a FIFO named by mistake must not hang the command; it is refused below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        if not required:
            return None
        raise ConfigError(
            f"{path}: no such configuration file; create it, or fix or unset {CONFIG_ENV}"
            if how.startswith("env")
            else f"{path}: no such configuration file; create it or name another one",
            path=path,
        ) from None
    except OSError as error:
        raise ConfigError(
            f"{path}: the configuration file cannot be read ({os.strerror(error.errno or 0)})",
            path=path,
        ) from None
    try:
        # Checked on the open descriptor, so what is checked is what is read.
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"{path}: is a directory, not a configuration file", path=path)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path}: is not a regular file; name a TOML file", path=path)
        # The file, and every directory and link on the way to it, must be safe from other
        # users (see keyagent.trust); the walk is compared with the open descriptor, so
        # what was checked is what is read.
        try:
            checked = check_trusted(path, harm="point ca_bundle at their own CA")
        except UntrustedFile as error:
            raise ConfigError(error.message, path=path) from None
        if (checked.st_dev, checked.st_ino) != (info.st_dev, info.st_ino):
            raise ConfigError(f"{path}: changed while it was being read; try again", path=path)
        with open(fd, "rb", closefd=False) as stream:
            data = stream.read()
    except OSError as error:
        raise ConfigError(
            f"{path}: the configuration file cannot be read ({os.strerror(error.errno or 0)})",
            path=path,
        ) from None
    finally:
        os.close(fd)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ConfigError(
            f"{path}:{line}: is not UTF-8 text, which TOML requires; re-save it as UTF-8",
            path=path,
            line=line,
        ) from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise _toml_error(path, text, error) from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise ConfigError(
            f"{path}: arrays or inline tables are nested too deeply to read; remove the"
            " nesting (keyagent's settings are strings, numbers, booleans and lists of"
            " strings)",
            path=path,
        ) from None
    return _File(path, text, document)


_TOML_POSITION: Final = re.compile(r"(?P<what>.*) \(at line (?P<line>\d+), column (?P<col>\d+)\)")


def _toml_error(path: str, text: str, error: tomllib.TOMLDecodeError) -> ConfigError:
    detail = str(error)
    match = _TOML_POSITION.fullmatch(detail)
    if match is not None:
        line, column = int(match["line"]), int(match["col"])
        what = match["what"]
        return ConfigError(
            f"{path}:{line}: not valid TOML at column {column}: {what[:1].lower()}{what[1:]}",
            path=path,
            line=line,
            column=column,
        )
    if detail.endswith(" (at end of document)"):
        what = detail.removesuffix(" (at end of document)")
        line = text.count("\n") + 1
        return ConfigError(
            f"{path}:{line}: not valid TOML at the end of the file: {what[:1].lower()}{what[1:]}",
            path=path,
            line=line,
        )
    return ConfigError(f"{path}: not valid TOML: {detail}", path=path)


def _unknown_key(key: str, value: object) -> str:
    import difflib

    shown = _printable(key)
    if isinstance(value, dict):
        # TOML puts every key after a [header] into that table, so settings written below a
        # header (say [keyagent]) end up here; say so rather than only "unknown".
        inner = [name for name in value if name in _FILE_KEYS]
        if inner:
            return (
                f"'{shown}' is not a setting, and settings are top-level keys, so move"
                f" '{inner[0]}' above the first [table] header"
            )
    normal = key.lower().replace("-", "_")
    guesses = [normal] if normal in _FILE_KEYS else []
    guesses = guesses or difflib.get_close_matches(normal, _FILE_KEYS, n=1, cutoff=0.6)
    if guesses:
        return f"unknown setting '{shown}'; did you mean '{guesses[0]}'?"
    return f"unknown setting '{shown}'; the settings are {', '.join(_FILE_KEYS)}"


def _file_values(file: _File, context: _Context) -> dict[str, tuple[object, str]]:
    """Each setting in the file, checked, with its source label."""
    # Secrets first, anywhere in the document: whatever else is wrong, a secret on disk is
    # the thing to fix now.
    for key_path in _walk(file.document):
        if _looks_secret(key_path[-1]):
            dotted = ".".join(_printable(part) for part in key_path)
            raise file.error(
                f"'{dotted}' looks like a secret, and secrets do not belong in files; give API"
                " keys to the agent with keyagent-ctl add and passwords with keyagent-ctl login",
                *key_path,
            )
    values: dict[str, tuple[object, str]] = {}
    for key, raw in file.document.items():
        if key == "insecure":
            raise file.error(
                "'insecure' is refused in a file, because turning off TLS verification must be"
                " asked for at each start: pass --insecure, or set ca_bundle for a private CA",
                key,
            )
        if key not in _FILE_KEYS:
            raise file.error(_unknown_key(key, raw), key)
        try:
            value = _SPECS[key].parse(raw, context)
        except _Invalid as invalid:
            raise file.error(f"'{key}' must be {invalid.must}; got {invalid.got}", key) from None
        line = file.line(key)
        values[key] = (value, f"file {file.path}" if line is None else f"file {file.path}:{line}")
    return values


# --- load and render -------------------------------------------------------------------------


def load(
    path: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, object] | None = None,
) -> Config:
    """The effective configuration: ``flags`` > ``env`` > the file > the defaults.

    ``path`` is the configuration file (else ``$KEYAGENT_CONFIG``, else the default
    location); ``env`` replaces :data:`os.environ` entirely (``HOME`` included, for ``~``);
    ``flags`` maps setting names to values given on the command line, already converted by
    argparse or not (strings are parsed like the environment's). A ``None`` flag counts as
    not given. Raises :class:`ConfigError` for any unusable value, and ``ValueError`` for a
    flag name that is no setting (a caller's bug, not a user's).
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    given = {name: value for name, value in (flags or {}).items() if value is not None}
    strangers = sorted(set(given) - set(_SPECS))
    if strangers:
        raise ValueError(f"not settings: {', '.join(strangers)}")
    home = environ.get("HOME") or os.path.expanduser("~")
    here = _Context(base=os.getcwd(), home=home)

    if path:
        file_path, how = path, "argument"
    elif environ.get(CONFIG_ENV):
        file_path, how = environ[CONFIG_ENV], f"env {CONFIG_ENV}"
    else:
        file_path, how = paths.config_file(), "default"
    if file_path == "~" or file_path.startswith("~/"):
        file_path = home + file_path[1:]
    file_path = os.path.abspath(os.path.expanduser(file_path))

    file = _read(file_path, required=how != "default", how=how)
    layers: list[dict[str, tuple[object, str]]] = []
    if file is not None:
        # Relative paths in the file start at its directory, so the two can move together.
        layers.append(_file_values(file, _Context(base=os.path.dirname(file.path), home=home)))
    layers.append(_env_values(environ, here))
    layers.append(_flag_values(given, here))

    chosen: dict[str, Setting] = {}
    for name, spec in _SPECS.items():
        chosen[name] = Setting(name, spec.default, "default")
        for layer in layers:  # lowest precedence first; later layers win
            if name in layer:
                value, source = layer[name]
                chosen[name] = Setting(name, value, source)

    def pick(name: str) -> object:
        return chosen[name].value

    return Config(
        host=cast("str | None", pick("host")),
        user=cast("str | None", pick("user")),
        lifetime=cast("float | None", pick("lifetime")),
        persist=cast("bool", pick("persist")),
        ca_bundle=cast("str | None", pick("ca_bundle")),
        insecure=cast("bool", pick("insecure")),
        connect_timeout=cast("float", pick("connect_timeout")),
        read_timeout=cast("float", pick("read_timeout")),
        validate_after=cast("float", pick("validate_after")),
        idle_timeout=cast("float", pick("idle_timeout")),
        line_timeout=cast("float", pick("line_timeout")),
        max_connections=cast("int", pick("max_connections")),
        max_keys=cast("int", pick("max_keys")),
        export=cast("bool", pick("export")),
        allow_exe=cast("tuple[str, ...]", pick("allow_exe")),
        askpass=cast("str | None", pick("askpass")),
        confirm_timeout=cast("float", pick("confirm_timeout")),
        audit_entries=cast("int", pick("audit_entries")),
        http_workers=cast("int", pick("http_workers")),
        keep_created_keys=cast("bool", pick("keep_created_keys")),
        stop_timeout=cast("float", pick("stop_timeout")),
        path=file_path,
        path_source=how,
        file_found=file is not None,
        _sources=chosen,
    )


def _env_values(environ: Mapping[str, str], context: _Context) -> dict[str, tuple[object, str]]:
    values: dict[str, tuple[object, str]] = {}
    for name, variable in ENV_VARS.items():
        raw = environ.get(variable)
        if not raw:
            continue
        try:
            values[name] = (_SPECS[name].parse(raw, context), f"env {variable}")
        except _Invalid as invalid:
            raise ConfigError(
                f"environment variable {variable}: '{name}' must be {invalid.must};"
                f" got {invalid.got}",
                key=name,
            ) from None
    return values


def _flag_values(flags: Mapping[str, object], context: _Context) -> dict[str, tuple[object, str]]:
    values: dict[str, tuple[object, str]] = {}
    for name, raw in flags.items():
        try:
            values[name] = (_SPECS[name].parse(raw, context), "flag")
        except _Invalid as invalid:
            raise ConfigError(
                f"command line: '{name}' must be {invalid.must}; got {invalid.got}", key=name
            ) from None
    return values


def format_duration(seconds: float) -> str:
    """``seconds`` as :func:`~keyagent.duration.parse_duration` reads it back: ``8h``, ``1m30s``."""
    from decimal import Decimal

    # Decimal(repr()) is the shortest exact decimal form, so 90.5 prints as 1m30.5s, never
    # as 1m30.499999s, nor with an exponent, which parse_duration could not read.
    exact = Decimal(repr(seconds))
    rest = int(exact)
    fraction = exact - rest
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    remainder = (rest + fraction).normalize()
    if remainder or not parts:
        parts.append(f"{remainder:f}s")
    return "".join(parts)


def _format_value(name: str, value: object) -> str:
    if value is None:
        return "(not set)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if name in _DURATIONS and isinstance(value, int | float):
        return format_duration(value)
    if isinstance(value, tuple):
        return " ".join(value) if value else "(any program)"
    return str(value)


def render(config: Config) -> str:
    """What ``keyagent-ctl config`` prints: the file, then each setting, its value and origin.

    One aligned line each, e.g. ``lifetime  8h  file /home/u/.config/keyagent/config.toml:3``.
    """
    found = "" if config.file_found else " (not found)"
    rows = [["config", f"{config.path}{found}", config.path_source]]
    for name, setting in config.sources().items():
        rows.append([name, _format_value(name, setting.value), setting.source])
    widths = [max(len(row[column]) for row in rows) for column in range(2)]
    return "".join(
        f"{row[0].ljust(widths[0])}  {row[1].ljust(widths[1])}  {row[2]}\n" for row in rows
    )
