"""The blocking client: what ``keyagent-ctl`` and other tools use to talk to the agent.

Imports ``socket`` and ``json`` (and ``platformdirs`` when no socket path is given and
``KEYAGENT_SOCK`` is unset), nothing heavier, so fetching a key stays cheap.

Errors come back as the same :mod:`keyagent.errors` leaf the agent raised; a missing or
dead agent is :class:`~keyagent.errors.AgentUnreachable`, with the path and the reason.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import sys

from keyagent import paths, wire
from keyagent.errors import AgentUnreachable, Forbidden, KeyagentError, ProtocolError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import builtins
    from collections.abc import Generator, Sequence
    from typing import Any

DEFAULT_TIMEOUT = 60.0
"""Seconds to wait for a reply: a login or a held-back unlock can take a while."""


class Client:
    """A connection to the agent. Reuse one for many requests; close it (or use ``with``)."""

    def __init__(self, socket_path: str | None = None, *, timeout: float | None = DEFAULT_TIMEOUT):
        # "" when there is no socket to try (no KEYAGENT_SOCK, no runtime directory): the
        # first request says so. On the default path, failures may point to systemd.
        self._default_path = not (socket_path or os.environ.get(paths.SOCKET_ENV))
        self.socket_path = paths.socket_path(socket_path) or ""
        self.timeout = timeout
        self.peer_pid: int | None = None
        """The pid of the process that listens on the socket (SO_PEERCRED), once connected."""
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._next_id = 0

    def __repr__(self) -> str:
        return f"Client({self.socket_path!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer = b""

    # --- transport -----------------------------------------------------------------------

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
            raise AgentUnreachable(f"no agent at {self.socket_path} ({reason}); {hint}") from None
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
                f"the socket {self.socket_path} is served by uid {uid}, not by you; "
                "nothing was sent: set KEYAGENT_SOCK to your own agent"
            )
        return sock

    def _live_socket(self) -> socket.socket:
        """The open connection, or a new one if the agent closed the old one (idle timeout)."""
        sock = self._sock
        if sock is not None and not self._buffer:
            # Readable with nothing buffered can only mean EOF (or a stray byte): peek.
            try:
                readable, _, _ = select.select([sock], [], [], 0)
                closed = bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                closed = True
            if closed:
                self.close()
                sock = None
        if sock is None:
            sock = self._sock = self._connect()
        return sock

    def _read_line(self, sock: socket.socket) -> bytes:
        while b"\n" not in self._buffer:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                self.close()
                raise AgentUnreachable(
                    f"the agent at {self.socket_path} did not answer within {self.timeout:g}s;"
                    " check it with keyagent-ctl status"
                ) from None
            except OSError as error:
                self.close()
                raise AgentUnreachable(
                    f"lost the connection to {self.socket_path} ({os.strerror(error.errno or 0)});"
                    f" retry{self._systemd_hint()}"
                ) from None
            if not chunk:
                self.close()
                raise AgentUnreachable(
                    f"the agent at {self.socket_path} closed the connection;"
                    f" retry{self._systemd_hint()}"
                )
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request and return its result; raise the agent's error as its leaf."""
        request_id = self._send(op, args)
        return self._reply_to(request_id)

    def _send(self, op: str, args: dict[str, Any]) -> int:
        """Send one request; its id."""
        sock = self._live_socket()
        self._next_id += 1
        request_id = self._next_id
        message = wire.encode_request(
            op, request_id, {k: v for k, v in args.items() if v is not None}
        )
        try:
            sock.sendall(message)
        except OSError as error:
            refusal = self._refusal_left(sock)
            self.close()
            if refusal is not None:
                raise refusal from None
            raise AgentUnreachable(
                f"could not send to {self.socket_path} ({os.strerror(error.errno or 0)});"
                f" retry{self._systemd_hint()}"
            ) from None
        return request_id

    def _refusal_left(self, sock: socket.socket) -> KeyagentError | None:
        """What the agent said before it closed a connection the request could not be sent
        on: a refusal (``busy`` when it is full, say) is a line with no id, sent as it
        accepted the connection; None if there is none to read."""
        try:
            sock.setblocking(False)
            data = self._buffer + sock.recv(65536)
        except OSError:
            return None
        try:
            reply = wire.parse_reply(data.partition(b"\n")[0])
        except ValueError:
            return None
        return reply.error if reply.id is None else None

    def _reply_to(self, request_id: int) -> dict[str, Any]:
        """Read the reply to ``request_id``: its result, or the agent's error raised."""
        sock = self._sock
        assert sock is not None  # noqa: S101  # _send connected
        try:
            reply = wire.parse_reply(self._read_line(sock))
        except ValueError:
            self.close()
            raise ProtocolError() from None
        if reply.id != request_id:
            # A refusal (busy, forbidden, too_large) carries no id; anything else is a bug.
            if reply.error is not None and reply.id is None:
                self.close()
                raise reply.error
            self.close()
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
        without a timeout; the connection is given to following, and closed when the
        iteration ends.

        The agent ends following by an error, raised here: ``busy`` if this client fell too
        far behind (entries were dropped), ``locked`` when the agent is locked.
        """
        request_id = self._send("log", {"n": n, "follow": True})
        return self._following(request_id)

    def _following(self, request_id: int) -> Generator[dict[str, Any], None, None]:
        try:
            entries = self._reply_to(request_id).get("entries")
            if not isinstance(entries, list):
                raise ProtocolError()
            yield from entries
            sock = self._sock
            assert sock is not None  # noqa: S101  # the reply came on it
            sock.settimeout(None)  # entries come when something happens, however late
            while True:
                line = self._read_line(sock)
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
        finally:
            self.close()

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
