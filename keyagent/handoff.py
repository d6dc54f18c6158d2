"""What the daemon hands the serving process: one typed value, written and read here.

:func:`keyagent.daemon.exec_core` builds a :class:`Handoff` and writes :meth:`Handoff.to_json`
into a memfd; :func:`keyagent.core.main` reads it back with :meth:`Handoff.from_json`, which
checks every field (the settings by the rules of :mod:`keyagent.rules`) before anything is
served. Both sides name the same fields, so neither can add, drop or misspell one alone.

Nothing in the hand-off is secret. The serving process imports this module, so it uses plain
``__slots__`` classes (``dataclasses`` would load ``inspect`` and ``ast``, about 1.6 MiB).
"""

from __future__ import annotations

import json

from keyagent.rules import (
    DEFAULT_HTTP_WORKERS,
    count_problem,
    duration_problem,
    entry_count_problem,
    exe_list_problem,
    path_problem,
    worker_count_problem,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from keyagent.sockets import FileIdentity

    Rule = Callable[[object], str | None]

__all__ = ["Handoff", "HandoffError", "Settings"]


class HandoffError(ValueError):
    """The hand-off cannot be used; the message names the field and what it must be."""


# --- the rules for each field ----------------------------------------------------------------


def _boolean(value: object) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def _descriptor(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return "a descriptor number"
    return None


def _text(value: object) -> str | None:
    return None if isinstance(value, str) else "a string"


def _path(value: object) -> str | None:
    problem = path_problem(value)
    return None if problem is None else f"a path ({problem})"


def _optional(rule: Rule) -> Rule:
    def check(value: object) -> str | None:
        return None if value is None else rule(value)

    return check


def _identity(value: object) -> str | None:
    # (device, inode, ctime) of the socket file, as keyagent.sockets.file_identity has it.
    if (
        isinstance(value, list)
        and len(value) == 3
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value)
    ):
        return None
    return "a [device, inode, change time] triple"


def _search_path(value: object) -> str | None:
    if isinstance(value, list) and all(isinstance(entry, str) for entry in value):
        return None
    return "a list of directories"


def _hex(value: object) -> str | None:
    if isinstance(value, str):
        try:
            bytes.fromhex(value)
        except ValueError:
            pass
        else:
            return None
    return "hex digits"


def _checked(data: object, rules: Mapping[str, Rule], where: str) -> dict[str, object]:
    """``data`` as a dict holding exactly the fields in ``rules``, each following its rule."""
    if not isinstance(data, dict):
        raise HandoffError(f"{where} is not a JSON object")
    missing = sorted(set(rules) - set(data))
    unknown = sorted(set(data) - set(rules))
    if missing or unknown:
        raise HandoffError(
            f"{where} lacks {missing} and has unknown {unknown}: the daemon and the serving"
            " process come from different keyagent versions; restart the agent"
        )
    for name, rule in rules.items():
        problem = rule(data[name])
        if problem is not None:
            raise HandoffError(f"{where}: '{name}' must be {problem}")
    return data


# --- the values ------------------------------------------------------------------------------

_SETTING_RULES: Mapping[str, Rule] = {
    "lifetime": _optional(duration_problem),
    "ca_bundle": _optional(_path),
    "connect_timeout": duration_problem,
    "read_timeout": duration_problem,
    "validate_after": duration_problem,
    "idle_timeout": duration_problem,
    "line_timeout": duration_problem,
    "max_connections": count_problem,
    "max_keys": count_problem,
    "audit_entries": entry_count_problem,
    "http_workers": worker_count_problem,
    "insecure": _boolean,
    "persist": _boolean,
    "no_keyring": _boolean,
    "ca_certificates": _optional(_text),
    "export": _boolean,
    "allow_exe": exe_list_problem,
    "askpass": _optional(_path),
    "confirm_timeout": duration_problem,
    "stop_timeout": duration_problem,
    "keep_created_keys": _boolean,
}


class Settings:
    """The agent's settings as the daemon resolved them (flags > environment > file >
    defaults; see :mod:`keyagent.config`), plus the CA bundle's text, read once at start."""

    __slots__ = tuple(_SETTING_RULES)

    lifetime: float | None
    ca_bundle: str | None
    connect_timeout: float
    read_timeout: float
    validate_after: float
    idle_timeout: float
    line_timeout: float
    max_connections: int
    max_keys: int
    audit_entries: int
    http_workers: int
    insecure: bool
    persist: bool
    no_keyring: bool
    ca_certificates: str | None
    export: bool
    allow_exe: tuple[str, ...]
    askpass: str | None
    confirm_timeout: float
    stop_timeout: float
    keep_created_keys: bool

    def __init__(
        self,
        *,
        lifetime: float | None,
        ca_bundle: str | None,
        connect_timeout: float,
        read_timeout: float,
        validate_after: float,
        idle_timeout: float,
        line_timeout: float,
        max_connections: int,
        max_keys: int,
        audit_entries: int = 10_000,
        http_workers: int = DEFAULT_HTTP_WORKERS,
        insecure: bool,
        persist: bool,
        no_keyring: bool,
        ca_certificates: str | None,
        export: bool = True,
        allow_exe: tuple[str, ...] = (),
        askpass: str | None = None,
        confirm_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        keep_created_keys: bool = False,
    ) -> None:
        self.lifetime = lifetime
        self.ca_bundle = ca_bundle
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.validate_after = validate_after
        self.idle_timeout = idle_timeout
        self.line_timeout = line_timeout
        self.max_connections = max_connections
        self.max_keys = max_keys
        self.audit_entries = audit_entries
        self.http_workers = http_workers
        self.insecure = insecure
        self.persist = persist
        self.no_keyring = no_keyring
        self.ca_certificates = ca_certificates
        self.export = export
        self.allow_exe = tuple(allow_exe)
        self.askpass = askpass
        self.confirm_timeout = confirm_timeout
        self.stop_timeout = stop_timeout
        self.keep_created_keys = keep_created_keys

    def __repr__(self) -> str:
        shown = self.as_dict()
        # The CA text is long and says nothing at a glance: only whether there is one.
        shown["ca_certificates"] = "..." if self.ca_certificates else None
        return f"Settings({', '.join(f'{name}={value!r}' for name, value in shown.items())})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Settings):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable fields, compared by value

    def as_dict(self) -> dict[str, object]:
        """Every setting by name."""
        shown = {name: getattr(self, name) for name in self.__slots__}
        shown["allow_exe"] = list(self.allow_exe)  # as JSON has it, so a round trip compares
        return shown

    @classmethod
    def from_dict(cls, data: object) -> Settings:
        """The settings in ``data``, checked field by field; :class:`HandoffError` if not."""
        fields = _checked(data, _SETTING_RULES, "the settings")
        # Every field has passed its rule above, so it has the type its parameter names.
        return cls(**fields)  # type: ignore[arg-type]


_HANDOFF_RULES: Mapping[str, Rule] = {
    "sys_path": _search_path,
    "socket_path": _text,
    "bound": _optional(_identity),
    "listener_fd": _descriptor,
    "foreground": _boolean,
    "debug": _boolean,
    "notify": _optional(_text),
    "private_dir": _optional(_text),
    "announce_fd": _optional(_descriptor),
    "announce": _hex,
    "ready_fd": _optional(_descriptor),
    "http_socket_path": _optional(_text),
    "http_bound": _optional(_identity),
    "http_listener_fd": _optional(_descriptor),
    "settings": lambda value: None,  # checked by Settings.from_dict
    "leftovers_path": _optional(_path),
    "errors_to_stderr": _boolean,
}


class Handoff:
    """Everything the serving process needs from the daemon that started it.

    ``listener_fd``, ``announce_fd`` and ``ready_fd`` are descriptors the serving process
    inherits: the listening socket, where to write ``announce`` (the shell lines, as bytes)
    once serving, and the pipe on which to say "ready" to a waiting parent. ``bound`` is
    the socket file's (device, inode), so that only that file is removed at exit (None for
    a socket systemd made); ``private_dir`` is a directory made for this agent alone, to
    remove at exit; ``notify`` is systemd's ``NOTIFY_SOCKET`` (None without a manager).
    ``http_socket_path``, ``http_bound`` and ``http_listener_fd`` are the same for the HTTP
    socket (:mod:`keyagent.proxy`); all None when the agent has none. ``leftovers_path``:
    the leftovers file of this socket (:mod:`keyagent.leftovers`), None for none.
    ``errors_to_stderr``: a background agent keeps a copy of its stderr for its errors
    alone (``keyagent CMD``: a key it could not delete at stop is told where CMD ran).
    """

    __slots__ = tuple(_HANDOFF_RULES)

    sys_path: list[str]
    socket_path: str
    bound: FileIdentity | None
    listener_fd: int
    foreground: bool
    debug: bool
    notify: str | None
    private_dir: str | None
    announce_fd: int | None
    announce: bytes
    ready_fd: int | None
    http_socket_path: str | None
    http_bound: FileIdentity | None
    http_listener_fd: int | None
    settings: Settings
    leftovers_path: str | None
    errors_to_stderr: bool

    def __init__(
        self,
        *,
        sys_path: list[str],
        socket_path: str,
        bound: FileIdentity | None,
        listener_fd: int,
        foreground: bool,
        debug: bool,
        notify: str | None,
        private_dir: str | None,
        settings: Settings,
        announce_fd: int | None = None,
        announce: bytes = b"",
        ready_fd: int | None = None,
        http_socket_path: str | None = None,
        http_bound: FileIdentity | None = None,
        http_listener_fd: int | None = None,
        leftovers_path: str | None = None,
        errors_to_stderr: bool = False,
    ) -> None:
        self.sys_path = sys_path
        self.socket_path = socket_path
        self.bound = bound
        self.listener_fd = listener_fd
        self.foreground = foreground
        self.debug = debug
        self.notify = notify
        self.private_dir = private_dir
        self.announce_fd = announce_fd
        self.announce = announce
        self.ready_fd = ready_fd
        self.http_socket_path = http_socket_path
        self.http_bound = http_bound
        self.http_listener_fd = http_listener_fd
        self.settings = settings
        self.leftovers_path = leftovers_path
        self.errors_to_stderr = errors_to_stderr

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"Handoff({shown})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Handoff):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__slots__)

    __hash__ = None  # type: ignore[assignment]  # mutable fields, compared by value

    def to_json(self) -> bytes:
        """The hand-off as the serving process reads it back with :meth:`from_json`."""
        document = {name: getattr(self, name) for name in self.__slots__}
        document["bound"] = list(self.bound) if self.bound is not None else None
        document["http_bound"] = list(self.http_bound) if self.http_bound is not None else None
        document["announce"] = self.announce.hex()
        document["settings"] = self.settings.as_dict()
        return json.dumps(document).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Handoff:
        """The hand-off in ``data``, every field checked; :class:`HandoffError` if it is not
        one (not JSON, a field missing, unknown or of the wrong kind)."""
        try:
            document = json.loads(data)
        except (ValueError, RecursionError):
            raise HandoffError("the hand-off is not JSON") from None
        fields = _checked(document, _HANDOFF_RULES, "the hand-off")
        bound = fields["bound"]
        fields["bound"] = (bound[0], bound[1], bound[2]) if isinstance(bound, list) else None
        bound = fields["http_bound"]
        fields["http_bound"] = (bound[0], bound[1], bound[2]) if isinstance(bound, list) else None
        fields["announce"] = bytes.fromhex(str(fields["announce"]))
        fields["settings"] = Settings.from_dict(fields["settings"])
        # Every field has passed its rule above, so it has the type its parameter names.
        return cls(**fields)  # type: ignore[arg-type]
