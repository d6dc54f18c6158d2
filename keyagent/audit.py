"""The audit log: who used which key, and what changed, kept in a ring and written to the log.

Every use of a secret and every change (``get``, ``exec``, ``add``, ``create``, ``remove``,
``forget``, ``login``, ``logout``, ``lock``, ``unlock``, ``stop``, a proxied request) and every
refusal with ``denied``, ``forbidden`` or ``locked`` becomes one :class:`AuditEntry`; so does
each deletion of an ephemeral key the agent makes on its own on the service (``delete``, at
expiry, after ``forget``, at stop), with no pid: the agent itself asked; and each check of
a credential after the service refused a proxied request with it (``check``).
:class:`AuditLog` keeps the newest ones in memory (a ring of ``audit_entries``, default
10,000), writes each as one line to the agent's log at info level, and hands each to the
followers of ``keyagent-ctl log --follow``.

No secret can get into an entry, by construction: an entry has a field for each thing it
records (an operation name, a key *id*, a host, a user, a pid, a uid, a program's path, an
error code, an HTTP method, a path without its query string, a status) and none that could
carry a key, a password, a passphrase, a query value or a body. The agent builds entries from
the validated request's named arguments and the result's named members only
(:meth:`keyagent.agent.Agent.audit`), never from the request as a whole.
"""

from __future__ import annotations

import collections
import contextlib
import json
import time
from collections import namedtuple

from keyagent.log import INFO, get_logger
from keyagent.rules import MAX_AUDIT_ENTRIES

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Final

__all__ = ["DEFAULT_AUDIT_ENTRIES", "MAX_AUDIT_ENTRIES", "AuditEntry", "AuditLog", "timestamp"]

DEFAULT_AUDIT_ENTRIES: Final = 10_000
"""Entries kept in memory unless ``audit_entries`` says otherwise (a few MiB at most)."""

# The audit trail goes to the log at info level even when the agent logs only warnings
# (a background agent's syslog): that is where it outlives the agent.
log = get_logger("keyagent.audit", floor=INFO)


_second: list[object] = [None, ""]
"""The last whole second :func:`timestamp` formatted, and its text: entries come in bursts."""


def timestamp(wall: float) -> str:
    """``wall`` (POSIX seconds) as ISO 8601 in UTC with milliseconds: 2026-11-30T01:16:51.042Z."""
    whole = int(wall)
    millis = min(999, int((wall - whole) * 1000))
    if _second[0] != whole:
        _second[:] = [whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))]
    return f"{_second[1]}.{millis:03d}Z"


class AuditEntry(
    namedtuple(
        "AuditEntry",
        [
            "time",
            "op",
            "outcome",
            "key_id",
            "host",
            "user",
            "pid",
            "uid",
            "exe",
            "method",
            "path",
            "status",
        ],
    )
):
    """One audited request: when (wall time), what (``op``), how it ended (``outcome``: "ok"
    or the error code), which key and account, who asked (pid, uid, executable), and for a
    proxied request its method, its path without the query string and the upstream status.

    Immutable, with a field per fact and none for anything else: see the module docstring.
    """

    __slots__ = ()

    time: float
    op: str
    outcome: str
    key_id: str | None
    host: str | None
    user: str | None
    pid: int | None
    uid: int | None
    exe: str | None
    method: str | None
    path: str | None
    status: int | None

    def to_json(self) -> dict[str, object]:
        """The entry as ``log`` sends it: every field, ``time`` as ISO 8601 UTC with ms."""
        entry = self._asdict()
        entry["time"] = timestamp(self.time)
        return entry

    def log_line(self) -> str:
        """One line for the agent's log: ``audit time=... op=get outcome=ok key_id=...``.

        Fields without a value are left out; a value that is not plain printable ASCII
        without spaces, quotes or ``=`` (a path or a user name may hold anything the rules
        allow) is written as a JSON string, so one entry is always one line and a reader can
        split it back into fields.
        """
        return f"audit time={timestamp(self.time)} {self.log_fields()}"

    def log_fields(self) -> str:
        """:meth:`log_line` without its time: ``op=get outcome=ok ...``."""
        values: tuple[object, ...] = tuple(self)[1:]
        texts = [value for value in values if isinstance(value, str)]
        joined = "".join(texts)
        if (
            all(texts)
            and joined.isascii()
            and joined.isprintable()
            and " " not in joined
            and '"' not in joined
            and "=" not in joined
            and "\\" not in joined
        ):  # the usual case, checked at once: every value goes as it is
            fields = [
                f"{name}={value}"
                for name, value in zip(_NAMES, values, strict=True)
                if value is not None
            ]
        else:
            fields = [
                f"{name}={_quoted(value)}"
                for name, value in zip(_NAMES, values, strict=True)
                if value is not None
            ]
        return " ".join(fields)


_NAMES: Final = AuditEntry._fields[1:]


def _quoted(value: object) -> str:
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if (
        text.isascii()
        and text.isprintable()
        and " " not in text
        and '"' not in text
        and "=" not in text
        and "\\" not in text
        and text
    ):
        return text
    return json.dumps(text)  # ASCII only: controls, quotes, spaces and non-ASCII escaped


class AuditLog:
    """The newest entries (a ring of ``size``), each also logged and sent to every follower.

    ``size`` 0 keeps none in memory: entries are still logged and followed.
    """

    __slots__ = (
        "_entries", "_followers", "_newest", "_unlogged", "deferred", "on_pending", "recorded"
    )  # fmt: skip

    def __init__(self, size: int = DEFAULT_AUDIT_ENTRIES) -> None:
        if not 0 <= size <= MAX_AUDIT_ENTRIES:
            raise ValueError(f"the audit log keeps 0 to {MAX_AUDIT_ENTRIES} entries")
        self._entries: collections.deque[AuditEntry] = collections.deque(maxlen=size)
        self._followers: list[Callable[[AuditEntry], None]] = []
        self._newest: AuditEntry | None = None
        self.recorded = 0
        """Entries recorded since start, kept or not (the server tells a request's own by it)."""
        self.deferred = False
        """Whether entries reach the agent's log at :meth:`flush` rather than at once. The
        server sets it and flushes at most ``keyagent.server.AUDIT_FLUSH_DELAY`` after an
        entry is recorded: no reply waits for the log, one write carries every entry of that
        time, and the same request repeated (a tool's get in a loop) is formatted once per
        flush."""
        self.on_pending: Callable[[], None] | None = None
        """Called when an entry waits for a flush and none did before (the server arms its
        flush timer)."""
        self._unlogged: list[AuditEntry] = []

    def __repr__(self) -> str:
        return f"AuditLog(size={self.size}, held={len(self._entries)})"

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        maxlen = self._entries.maxlen
        return 0 if maxlen is None else maxlen

    @property
    def newest(self) -> AuditEntry | None:
        """The entry recorded last, if any is recorded (even with size 0)."""
        return self._newest

    def record(self, entry: AuditEntry) -> None:
        """Keep ``entry``, log it, and hand it to each follower."""
        self._entries.append(entry)
        self.recorded += 1
        self._newest = entry
        if self.deferred:
            self._unlogged.append(entry)
            if len(self._unlogged) == 1 and self.on_pending is not None:
                self.on_pending()
        elif log.isEnabledFor(INFO):
            log.info("%s", entry.log_line())
        if self._followers:
            # A follower may stop following (its client gone) while entries are handed out.
            for follower in tuple(self._followers):
                follower(entry)

    def flush(self) -> None:
        """Write the entries recorded since the last flush to the agent's log, at once."""
        if not self._unlogged:
            return
        unlogged, self._unlogged = self._unlogged, []
        if not log.isEnabledFor(INFO):
            return
        fields: dict[tuple[object, ...], str] = {}  # the same request again: formatted once
        lines = []
        for entry in unlogged:
            rest = entry[1:]
            text = fields.get(rest)
            if text is None:
                text = fields[rest] = entry.log_fields()
            lines.append(f"audit time={timestamp(entry.time)} {text}")
        log.log_many(INFO, lines)

    def last(self, count: int | None = None) -> list[AuditEntry]:
        """The newest ``count`` entries (all kept, without ``count``), oldest first."""
        entries = self._entries
        if count is None or count >= len(entries):
            return list(entries)
        if count <= 0:
            return []
        return list(entries)[-count:]

    def follow(self, follower: Callable[[AuditEntry], None]) -> None:
        """Call ``follower(entry)`` for each entry recorded from now on."""
        self._followers.append(follower)

    def unfollow(self, follower: Callable[[AuditEntry], None]) -> None:
        """Stop calling ``follower``; nothing if it does not follow."""
        with contextlib.suppress(ValueError):
            self._followers.remove(follower)

    @property
    def followers(self) -> int:
        return len(self._followers)
