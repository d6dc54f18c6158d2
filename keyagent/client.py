"""The blocking client: what ``keyagent-ctl`` and other tools use to talk to the agent.

Imports ``socket`` and ``json`` (and ``platformdirs`` when no socket path is given and
``KEYAGENT_SOCK`` is unset), nothing heavier, so fetching a key stays cheap.

Errors come back as the same :mod:`keyagent.errors` leaf the agent raised; a missing or
dead agent is :class:`~keyagent.errors.AgentUnreachable`, with the path and the reason.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Generator

from keyagent import paths, wire
from keyagent.errors import AgentUnreachable, Forbidden, KeyagentError, ProtocolError
from keyagent.log import one_line

TYPE_CHECKING = False
if TYPE_CHECKING:
    import builtins
    from collections.abc import Sequence
    from types import TracebackType
    from typing import Any, Final

DEFAULT_TIMEOUT = 60.0
"""Seconds to wait for a reply: a login or a held-back unlock can take a while."""

MAX_REPLY = 1 << 30
"""The longest reply line a :class:`Client` reads (1 GiB), unless given ``max_reply``.

The biggest replies are ``log`` of the whole audit ring (at most a million entries, a few
hundred bytes each) and ``list`` of every held key (100,000 by default, about 500 bytes
each): this leaves room for both, and stops a process answering in the agent's place from
taking all the memory there is."""

_CHUNK = 256 * 1024


def shown(value: object) -> str:
    """``value`` as text safe to put on a terminal (:func:`keyagent.log.one_line`).

    Every human-readable line keyagent-ctl prints goes through here, and the socket paths
    this module names in its errors: a description, a date or a masked key from the Conduce
    service, a message from the agent, or a path from the environment must not be able to
    clear the screen, set the window title or reorder what the user reads.
    """
    return one_line(str(value))


def _checked_timeout(timeout: float | None) -> float | None:
    """``timeout`` if it is None or a finite number of seconds above zero; else ValueError."""
    if timeout is None:
        return None
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not (0 < timeout < float("inf"))
    ):
        raise ValueError(
            f"timeout must be a number of seconds above 0 and finite, or None to wait without"
            f" limit, not {timeout!r}"
        )
    return float(timeout)


_LOST_ANSWER: Final = {
    op: (
        f"the agent may have {made} on the service before it went, and a key no agent holds"
        " stays valid there: look with keyagent-ctl list --remote, and delete it with"
        " keyagent-ctl remove (not a retry, which could make another)"
    )
    for op, made in (("create", "made the key"), ("rotate", "made the new key"))
}
"""What to do when the connection is lost before the answer to a request that makes keys
on the service: not retry it (a second create makes a second key)."""
_LATE_ANSWER: Final = (
    "the agent may still make the key, and then holds it (keyagent-ctl list shows it): do"
    " not retry, which could make another"
)
"""What to do when a request that makes keys is not answered in time: the agent goes on."""


class _Connection:
    """One socket to the agent, what was read from it and not used yet, the last request id
    sent on it, and the process that opened it (a forked child must open its own)."""

    __slots__ = ("buffer", "closing", "next_id", "pid", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.next_id = 0
        self.pid = os.getpid()
        self.closing = False

    def end(self) -> None:
        """Wake a read in progress in another thread (it then sees the end of the stream),
        if this process opened the connection: a forked child's shutdown() would end the
        parent's connection too."""
        self.closing = True
        if self.pid == os.getpid():
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        # close(), never shutdown(): after a fork the parent still uses this connection.
        self.sock.close()
        self.buffer.clear()


class Client:
    """A connection to the agent. Reuse one for many requests; close it (or use ``with``).

    ``timeout``: seconds to connect, and to receive the whole reply to one request (None:
    no limit). ``max_reply``: the longest reply read (:data:`MAX_REPLY` by default).

    One client may be shared by threads: each request and its reply are exchanged under a
    lock, so requests from several threads take turns on the connection. After
    ``os.fork()``, a client used in the child opens a connection of its own at its first
    request (the inherited one stays the parent's). :meth:`follow_log` uses a connection of
    its own too.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_reply: int = MAX_REPLY,
    ):
        # "" when there is no socket to try (no KEYAGENT_SOCK, no runtime directory): the
        # first request says so. On the default path, failures may point to systemd.
        self._default_path = not (socket_path or os.environ.get(paths.SOCKET_ENV))
        self.socket_path = paths.socket_path(socket_path) or ""
        self.timeout = _checked_timeout(timeout)
        if isinstance(max_reply, bool) or not isinstance(max_reply, int) or max_reply < 1:
            raise ValueError(
                f"max_reply must be a whole number of bytes above 0, not {max_reply!r}"
            )
        self.max_reply = max_reply
        self.peer_pid: int | None = None
        """The pid of the process that listens on the socket (SO_PEERCRED), once connected."""
        self._connection: _Connection | None = None
        self._lock = threading.Lock()
        self._lock_pid = os.getpid()

    def __repr__(self) -> str:
        return f"Client({self.socket_path!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (a later request opens a new one). A request another thread
        is waiting on meanwhile ends with :class:`AgentUnreachable`."""
        connection = self._connection
        if connection is not None:
            connection.end()  # else close() would wait for that request's reply
        with self._locked():
            self._drop()

    def _drop(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _locked(self) -> threading.Lock:
        """The lock one request and its reply are exchanged under. In a forked child, a new
        one: another thread of the parent may have held the inherited one as it forked, and
        nothing in the child would ever release it."""
        if self._lock_pid != os.getpid():
            self._lock, self._lock_pid = threading.Lock(), os.getpid()
        return self._lock

    # --- transport -----------------------------------------------------------------------

    def _retry(self) -> str:
        return f"retry{self._systemd_hint()}"

    def _systemd_hint(self) -> str:
        """On the default path with a keyagent unit installed: how to look at the service.

        Only failures get here, so a successful request never pays for the check.
        """
        if self._default_path and paths.systemd_unit_installed():
            return f"; check it with systemctl --user status {paths.SYSTEMD_SERVICE}"
        return ""

    def _connect(self) -> socket.socket:
        if not self.socket_path:
            raise AgentUnreachable(f"no agent: {paths.NO_SOCKET_HINT}")
        where = shown(self.socket_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError as error:
            sock.close()
            reason = os.strerror(error.errno) if error.errno else type(error).__name__
            hint = 'start one with eval "$(keyagent)" or set KEYAGENT_SOCK'
            if self._default_path and paths.systemd_unit_installed():
                hint = (
                    f"the {paths.SYSTEMD_SERVICE} unit is installed: check it with"
                    f" systemctl --user status {paths.SYSTEMD_SERVICE}, or start it with"
                    " systemctl --user start keyagent.socket"
                )
            if error.errno == errno.EACCES:
                hint = "the socket belongs to another user; set KEYAGENT_SOCK to your own agent"
            raise AgentUnreachable(f"no agent at {where} ({reason}); {hint}") from None
        # The agent checks who connects; the client checks who listens, before it sends a
        # key or a password: a socket planted by another user (a predictable runtime path,
        # a wrong KEYAGENT_SOCK) must get nothing. struct ucred is pid, uid, gid.
        try:
            credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        except OSError:
            credentials = b""
        uid = int.from_bytes(credentials[4:8], sys.byteorder) if len(credentials) == 12 else -1
        self.peer_pid = int.from_bytes(credentials[:4], sys.byteorder) if credentials else None
        if uid != os.geteuid():
            sock.close()
            raise AgentUnreachable(
                f"the socket {where} is served by uid {uid}, not by you; "
                "nothing was sent: set KEYAGENT_SOCK to your own agent"
            )
        return sock

    def _live_connection(self) -> _Connection:
        """The open connection, or a new one if the agent closed the old one (idle timeout),
        or if it was opened by the parent of this (forked) process. Under the lock."""
        connection = self._connection
        if connection is not None and connection.pid != os.getpid():
            # Inherited across fork(): the parent's. Closing this process's descriptor
            # leaves the parent's connection as it is.
            self._drop()
            connection = None
        if connection is not None and not connection.buffer:
            # Readable with nothing buffered can only mean EOF (or a stray byte): peek.
            sock = connection.sock
            try:
                readable, _, _ = select.select([sock], [], [], 0)
                closed = bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                closed = True
            if closed:
                self._drop()
                connection = None
        if connection is None:
            connection = self._connection = _Connection(self._connect())
        return connection

    def _discard(self, connection: _Connection) -> None:
        """Close ``connection`` after a failure on it: what is left on it is unusable."""
        connection.close()
        if self._connection is connection:
            self._connection = None

    def _read_line(
        self, connection: _Connection, deadline: float | None, lost: str | None = None
    ) -> bytes:
        """The next line from ``connection``, without its newline, received by ``deadline``
        (``time.monotonic()``; None: no limit) and at most :attr:`max_reply` bytes long.
        ``lost``: what to do if the connection is lost meanwhile (by default, retry).

        Only the newly received bytes are searched for the newline, so a long reply costs
        time in proportion to its length."""
        buffer = connection.buffer
        sock = connection.sock
        end = buffer.find(b"\n")
        while end < 0:
            if len(buffer) > self.max_reply:
                self._discard(connection)
                raise ProtocolError(
                    f"the reply from {shown(self.socket_path)} is longer than {self.max_reply}"
                    " bytes: ask for less (log n=, list host=) or give Client a larger"
                    " max_reply"
                )
            try:
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    sock.settimeout(remaining)
                chunk = sock.recv(_CHUNK)
            except TimeoutError:
                self._discard(connection)
                # A request that makes keys may still make one: the agent goes on with it.
                then = _LATE_ANSWER if lost else "check it with keyagent-ctl status"
                raise AgentUnreachable(
                    f"the agent at {shown(self.socket_path)} did not answer within"
                    f" {self.timeout:g}s; {then}"
                ) from None
            except OSError as error:
                self._discard(connection)
                raise AgentUnreachable(
                    f"lost the connection to {shown(self.socket_path)}"
                    f" ({os.strerror(error.errno or 0)}); {lost or self._retry()}"
                ) from None
            if not chunk:
                self._discard(connection)
                raise AgentUnreachable(
                    f"the agent at {shown(self.socket_path)} closed the connection;"
                    f" {lost or self._retry()}"
                )
            start = len(buffer)
            buffer += chunk
            end = buffer.find(b"\n", start)
        if end > self.max_reply:
            self._discard(connection)
            raise ProtocolError(
                f"the reply from {shown(self.socket_path)} is longer than {self.max_reply}"
                " bytes: ask for less (log n=, list host=) or give Client a larger max_reply"
            )
        line = bytes(buffer[:end])
        del buffer[: end + 1]
        return line

    def _deadline(self) -> float | None:
        """When the reply to a request sent now must have arrived (None: no limit)."""
        return None if self.timeout is None else time.monotonic() + self.timeout

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request and return its result; raise the agent's error as its leaf."""
        with self._locked():
            connection = self._live_connection()
            request_id = self._send(connection, op, args)
            return self._reply_to(connection, request_id, _LOST_ANSWER.get(op))

    def _send(self, connection: _Connection, op: str, args: dict[str, Any]) -> int:
        """Send one request on ``connection``; its id."""
        connection.next_id += 1
        request_id = connection.next_id
        message = wire.encode_request(
            op, request_id, {k: v for k, v in args.items() if v is not None}
        )
        sock = connection.sock
        try:
            sock.settimeout(self.timeout)
            sock.sendall(message)
        except OSError as error:
            refusal = self._refusal_left(connection)
            self._discard(connection)
            if refusal is not None:
                raise refusal from None
            raise AgentUnreachable(
                f"could not send to {shown(self.socket_path)} ({os.strerror(error.errno or 0)});"
                f" retry{self._systemd_hint()}"
            ) from None
        return request_id

    def _refusal_left(self, connection: _Connection) -> KeyagentError | None:
        """What the agent said before it closed a connection the request could not be sent
        on: a refusal (``busy`` when it is full, say) is a line with no id, sent as it
        accepted the connection; None if there is none to read."""
        try:
            connection.sock.setblocking(False)
            data = bytes(connection.buffer) + connection.sock.recv(65536)
        except OSError:
            return None
        try:
            reply = wire.parse_reply(data.partition(b"\n")[0])
        except ValueError:
            return None
        return reply.error if reply.id is None else None

    def _reply_to(
        self, connection: _Connection, request_id: int, lost: str | None = None
    ) -> dict[str, Any]:
        """Read the reply to ``request_id``: its result, or the agent's error raised."""
        try:
            reply = wire.parse_reply(self._read_line(connection, self._deadline(), lost))
        except ValueError:
            self._discard(connection)
            raise ProtocolError() from None
        if reply.id != request_id:
            # A refusal (busy, forbidden, too_large) carries no id; anything else is a bug.
            self._discard(connection)
            if reply.error is not None and reply.id is None:
                raise reply.error
            raise ProtocolError()
        if reply.error is not None:
            raise reply.error
        return dict(reply.result)

    # --- operations ----------------------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        return self.call("hello")

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def add(
        self,
        host: str,
        user: str,
        key: str,
        *,
        description: str | None = None,
        lifetime: float | None = None,
        persist: bool | None = None,
        export: bool | None = None,
        confirm: bool | None = None,
        allow_exe: str | Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Hand a key to the agent; returns it as listed (without the secret).

        ``export``: False keeps the secret in the agent (None: the agent's default);
        ``confirm``: ask the user before each use; ``allow_exe``: the only programs that may
        use it, one path or several (made absolute, links resolved, here: the agent compares
        them with ``/proc/PID/exe``).
        """
        return self.call(
            "add",
            host=host,
            user=user,
            key=key,
            description=description,
            lifetime=lifetime,
            persist=persist,
            export=export,
            confirm=confirm,
            allow_exe=resolve_programs(allow_exe),
        )

    def get(
        self,
        host: str | None = None,
        user: str | None = None,
        key_id: str | None = None,
        *,
        purpose: str | None = None,
    ) -> str:
        """The secret of the newest matching key. ``purpose``: "exec" when the key goes into
        a command's environment (the audit log records the request as ``exec``)."""
        result = self.call("get", host=host, user=user, key_id=key_id, purpose=purpose)
        key = result.get("key")
        if not isinstance(key, str) or not key or not key.isprintable() or " " in key:
            # The agent refuses such keys; a process answering in its place might not. A
            # control character could reach a terminal (get prints the key), a NUL break
            # exec with a traceback.
            raise ProtocolError(
                "the agent answered with an empty key, or one with a NUL, space or control"
                " character, which no API key has: check what listens on the agent's socket"
            )
        return key

    def list(self, host: str | None = None, user: str | None = None) -> list[dict[str, Any]]:
        """The keys the agent holds (``call("list", remote=True)`` for the service's list)."""
        keys = self.call("list", host=host, user=user).get("keys")
        if not isinstance(keys, list):
            raise ProtocolError()
        return keys

    def forget(
        self,
        key_id: str | None = None,
        *,
        all: bool | None = None,
        persist: bool | None = None,
        local: bool | None = None,
    ) -> int:
        result = self.call("forget", key_id=key_id, all=all, persist=persist, local=local)
        return int(result.get("forgotten", 0))

    def lock(self, passphrase: str) -> None:
        self.call("lock", passphrase=passphrase)

    def unlock(self, passphrase: str) -> None:
        self.call("unlock", passphrase=passphrase)

    def stop(self) -> dict[str, Any]:
        """Stop the agent; its reply: ``deleting`` counts the ephemeral keys it deletes on the
        service before it exits (it answers first, so this does not wait for that)."""
        result = self.call("stop")
        self.close()
        return result

    def log(self, n: int | None = None) -> builtins.list[dict[str, Any]]:
        """The audit log's entries, oldest first: the last ``n``, or all the agent keeps."""
        entries = self.call("log", n=n).get("entries")
        if not isinstance(entries, list):
            raise ProtocolError()
        return entries

    def follow_log(self, n: int | None = None) -> Generator[dict[str, Any], None, None]:
        """The last ``n`` audit entries (all kept, without ``n``), then each new one as the
        agent records it, for as long as the caller iterates. The request is sent now, so no
        entry recorded after this call is missed, however late the first ``next()``. Waits
        for new entries without a timeout (the backlog comes within the client's timeout).

        Following has a connection of its own, opened now and closed when the iteration
        ends or the generator is closed (started or not): the client stays usable meanwhile,
        and may follow several times at once.

        The agent ends following by an error, raised here: ``busy`` if this client fell too
        far behind (entries were dropped), ``locked`` when the agent is locked.
        """
        connection = _Connection(self._connect())
        try:
            request_id = self._send(connection, "log", {"n": n, "follow": True})
        except BaseException:
            connection.close()
            raise
        return _Following(connection, self._following(connection, request_id))

    def _following(
        self, connection: _Connection, request_id: int
    ) -> Generator[dict[str, Any], None, None]:
        try:
            entries = self._reply_to(connection, request_id).get("entries")
            if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                raise ProtocolError(
                    "the agent sent a reply this client does not understand ('entries' is not"
                    " a list of objects): check what listens on the agent's socket, or"
                    " upgrade keyagent"
                )
            yield from entries
            connection.sock.settimeout(None)  # entries come when something happens, however late
            while True:
                line = self._read_line(connection, None)
                try:
                    message = wire.decode(line)
                except ValueError:
                    raise ProtocolError() from None
                if isinstance(message, dict) and "entry" in message:
                    entry = message["entry"]
                    if message.get("id") != request_id or not isinstance(entry, dict):
                        raise ProtocolError()
                    yield entry
                    continue
                try:
                    reply = wire.parse_reply(line)
                except ValueError:
                    raise ProtocolError() from None
                raise reply.error or ProtocolError()
        except AgentUnreachable:
            if connection.closing:  # closed from another thread: the end, quietly
                return
            raise
        finally:
            connection.close()

    def login(
        self,
        host: str,
        user: str,
        password: str,
        *,
        confirm: bool | None = None,
        allow_exe: str | Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Log the agent in; it keeps the session cookie, never ``password``. ``confirm``
        (ask before each use) and ``allow_exe`` (the only programs; None: the agent's
        default) are rules for the session's use through the HTTP socket, as for a key
        (:meth:`add`)."""
        return self.call(
            "login",
            host=host,
            user=user,
            password=password,
            confirm=confirm,
            allow_exe=resolve_programs(allow_exe),
        )

    def logout(self, host: str, user: str) -> dict[str, Any]:
        return self.call("logout", host=host, user=user)

    def create(
        self,
        host: str,
        user: str,
        *,
        description: str | None = None,
        lifetime: float | None = None,
        reveal: bool | None = None,
        persist: bool | None = None,
        export: bool | None = None,
        confirm: bool | None = None,
        allow_exe: str | Sequence[str] | None = None,
        keep: bool | None = None,
        rotate_every: float | None = None,
    ) -> dict[str, Any]:
        """Create a key on the service and hold it; the rules as for :meth:`add`. ``keep``:
        whether the key stays on the service when it expires (None: the agent's default).
        ``rotate_every``: seconds between rotations the agent then makes on its own."""
        return self.call(
            "create",
            host=host,
            user=user,
            description=description,
            lifetime=lifetime,
            reveal=reveal,
            persist=persist,
            export=export,
            confirm=confirm,
            allow_exe=resolve_programs(allow_exe),
            keep=keep,
            rotate_every=rotate_every,
        )

    def remove(
        self,
        *,
        key_id: str | None = None,
        key: str | None = None,
        host: str | None = None,
        user: str | None = None,
    ) -> dict[str, Any]:
        return self.call("remove", key_id=key_id, key=key, host=host, user=user)

    def prune(self, host: str, user: str, *, delete: bool | None = None) -> dict[str, Any]:
        """The account's keys on the service that keyagent created and this agent does not
        hold (``orphans``: id, masked key, description, created); with ``delete``, each is
        deleted there too and says whether it was (``deleted``, else ``error``)."""
        result = self.call("prune", host=host, user=user, delete=delete)
        if not isinstance(result.get("orphans"), list):
            raise ProtocolError()
        return result

    def rotate(
        self,
        key_id: str | None = None,
        *,
        all: bool | None = None,
        host: str | None = None,
        user: str | None = None,
    ) -> dict[str, Any]:
        """Replace a held key by a new one made on the service, then delete the old one there.

        With ``key_id``: that key; the reply is the new key's listing with ``old_key_id``,
        ``old_deleted`` and ``pending_deletion``. With ``all`` (and ``host``, ``user``): every
        created key held for the account; the reply lists ``rotated`` and ``failed`` keys.
        """
        return self.call("rotate", key_id=key_id, all=all, host=host, user=user)


class _Following(Generator["dict[str, Any]", None, None]):
    """What :meth:`Client.follow_log` returns: its generator of entries, and the connection
    they come on, which :meth:`close` closes even before the first ``next()`` (when a plain
    generator would run no code at all).

    :meth:`close` may come from another thread while one is inside ``next()``. It then only
    wakes that thread, which finishes the generator and closes the socket itself, once done
    with them: a generator must not be closed while it runs in another thread (CPython 3.11
    can crash), nor its socket closed under a ``recv()`` (the descriptor's number could be
    reused by an unrelated file meanwhile)."""

    def __init__(
        self, connection: _Connection, entries: Generator[dict[str, Any], None, None]
    ) -> None:
        self._connection = connection
        self._entries = entries
        self._lock = threading.Lock()
        self._running = False  # a thread is inside the generator, or finishing it
        self._closed = False

    def send(self, value: None) -> dict[str, Any]:
        return self._step(self._entries.send, value)

    def throw(
        self,
        typ: type[BaseException] | BaseException,
        val: object = None,
        tb: TracebackType | None = None,
    ) -> dict[str, Any]:
        if isinstance(typ, BaseException):
            error = typ
        elif isinstance(val, BaseException):
            error = val
        else:
            error = typ() if val is None else typ(val)
        return self._step(self._entries.throw, error)

    def _step(self, step: Callable[[Any], dict[str, Any]], argument: Any) -> dict[str, Any]:
        self._start_step()
        try:
            return step(argument)
        finally:
            with self._lock:
                self._running = False
                closed = self._closed
            if closed:  # by another thread meanwhile, which left the finishing to this one
                self._finish()

    def _start_step(self) -> None:
        with self._lock:
            if self._closed:
                raise StopIteration
            if self._running:
                raise ValueError("generator already executing")
            self._running = True

    def close(self) -> None:
        """End following; from another thread too, where a ``next()`` waiting for an entry
        then ends the iteration."""
        if self._connection.pid != os.getpid():
            # In a forked child: the parent's thread inside next(), if any, was not copied,
            # and may have held the lock as it forked. Close this process's descriptor only
            # (the parent's connection goes on); the generator is the parent's to finish.
            self._closed = True
            self._connection.close()
            return
        with self._lock:
            first = not self._closed
            self._closed = True
            finish_now = first and not self._running
            self._running = True  # no step from now on, and no second finish
        if first:
            self._connection.end()
        if finish_now:
            self._finish()

    def _finish(self) -> None:
        self._entries.close()
        self._connection.close()

    def __del__(self) -> None:
        # As a generator closes itself when it is dropped unfinished.
        self.close()


def resolve_programs(paths: str | Sequence[str] | None) -> list[str] | None:
    """``paths`` as the agent compares them with ``/proc/PID/exe``: absolute, with symbolic
    links resolved (``python3`` is often a link to ``python3.12``); None stays None. A
    single string is one path (not a sequence of one-letter paths)."""
    if paths is None:
        return None
    if isinstance(paths, str):
        paths = [paths]
    return [os.path.realpath(path) for path in paths]


def get_key(
    host: str | None = None,
    user: str | None = None,
    key_id: str | None = None,
    *,
    socket_path: str | None = None,
) -> str:
    """Fetch the newest matching API key from the running agent."""
    with Client(socket_path) as client:
        return client.get(host, user, key_id)


class AuthTargetRefused(Forbidden, ValueError):
    """:class:`AgentAuth` was asked to authenticate a request it must not send a key with.

    A :class:`~keyagent.errors.Forbidden` (code ``forbidden``, as the agent's HTTP socket
    answers a call it will not make with its credentials), and a ``ValueError`` as well, as
    it was first."""


def _origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of ``url``, as compared by :class:`AgentAuth`: the host in lower
    case without brackets, the port explicit (443 for https when the URL names none)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a port that is not a number, or out of range; a bad IPv6 literal
        raise AuthTargetRefused(
            "AgentAuth: the request URL does not parse; no key was fetched or sent"
        ) from None
    scheme = parts.scheme.lower()
    default = 443 if scheme == "https" else 80 if scheme == "http" else 0
    return scheme, (parts.hostname or ""), port or default


class AgentAuth:
    """A ``requests`` auth callable that asks the agent for the key on every request.

    The tool never stores the key: ``requests.get(url, auth=AgentAuth(host=...))``. It is a
    plain callable, so this module does not import ``requests``.

    A key is attached only to an ``https://`` request for the key's host (and port: a host
    without one means 443). Anything else (``http://``, another host or port) raises
    :class:`AuthTargetRefused` before the agent is asked. Without ``host``, the request's own
    host is the selector, so the agent answers only with a key it holds for that host.
    """

    def __init__(
        self,
        host: str | None = None,
        user: str | None = None,
        key_id: str | None = None,
        *,
        socket_path: str | None = None,
    ) -> None:
        self.host, self.user, self.key_id = host, user, key_id
        self.socket_path = socket_path

    def __repr__(self) -> str:
        return f"AgentAuth(host={self.host!r}, user={self.user!r}, key_id={self.key_id!r})"

    def __call__(self, request: Any) -> Any:
        url = getattr(request, "url", None)
        scheme, hostname, port = _origin(url if isinstance(url, str) else "")
        if scheme != "https" or not hostname:
            raise AuthTargetRefused(
                f"AgentAuth: refusing to send an API key over {scheme or 'a URL without'}"
                " scheme: only https:// requests get one; no key was fetched"
            )
        # The host as the agent knows it: a name or [v6] literal, ":port" unless 443.
        literal = f"[{hostname}]" if ":" in hostname else hostname
        selector = literal if port == 443 else f"{literal}:{port}"
        if self.host is not None:
            expected = _origin(f"https://{self.host}")
            if expected[1:] != (hostname, port):
                raise AuthTargetRefused(
                    f"AgentAuth: the request goes to {selector}, not to {self.host}, the host"
                    " this key is for; no key was fetched or sent"
                )
            selector = self.host
        key = get_key(selector, self.user, self.key_id, socket_path=self.socket_path)
        request.headers["Authorization"] = f"Bearer {key}"
        return request
