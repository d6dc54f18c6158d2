"""A loopback HTTPS emulator of the Conduce service, for tests (as moto is for AWS).

It speaks the part of the API described in ``conduce-rest-api.md`` over real TLS, with a
throw-away CA made by ``trustme``, so a client under test runs its real TLS verification::

    with ConduceEmulator() as emu:
        emu.add_user("alice@example.com", "s3cret")
        account = ConduceAccount(emu.host, "alice@example.com", HttpSettings(verify=emu.ca_path))
        emu.inject(Fault.status(503), path="apikeys/list", count=1)

Behaviour chosen where the API documentation is silent:

* ``POST user/login`` answers 200 ``{"email": E}`` with ``Set-Cookie: conduce_session=...;
  Path=/; Secure; HttpOnly; SameSite=Strict``; 401 on an unknown user or a wrong password,
  400 on a malformed body.
* Every other endpoint authenticates with ``Authorization: Bearer <key>`` when that header is
  present (the cookie is then ignored, even if valid), else with the session cookie; 401 when
  neither authenticates.
* 403: :meth:`ConduceEmulator.forbid` restricts a user, or a single API key, so that their
  ``apikeys/*`` calls answer 403 once authenticated. Logging in and ``user/validate-session``
  stay allowed: they are authentication, not authorisation.
* ``apikeys/delete`` answers 404 for a key that is not the caller's (or does not exist);
  a deleted key is revoked for good.
* Keys are random UUIDs (``3f2b...-....``), as the Conduce documentation shows them.
* Listed key objects carry ``apikey``, ``description``, ``created`` (ISO 8601, UTC) and an
  extra ``expires: null`` field, so clients get to exercise unknown fields.
* Unknown paths answer 404, a known path with the wrong method 405.

Data endpoints, a few calls of the real API beyond the key calls, for tools that make their
Conduce calls through keyagent's HTTP socket (issue 12). All of them authenticate as above
(401 without a valid key or session cookie), accept GET, POST, PUT, PATCH, DELETE and HEAD
where the list below allows, answer HEAD with the head GET would get, keep the connection
alive, and are logged in :attr:`ConduceEmulator.requests` like the key calls (the path with
one leading slash, relative to ``/conduce/api/v1/`` when under it). A leading ``//`` (the
Conduce Python client sends ``//api/v2/...``) is taken as ``/``. Their request bodies are
read in pieces as they arrive, with ``Content-Length`` or chunked framing, and never held
whole (except ``datasets/create``'s, at most 64 KiB); a body with broken framing gets 400
and the connection is closed.

* ``GET /conduce/api/v1/user/list-teams``: ``[{"id": UUID, "name": EMAIL, "role":
  "owner"}]``, one team per account, its id fixed by the e-mail.
* ``POST /conduce/api/v1/datasets/create`` with ``{"name": NAME}`` (optional): ``{"id":
  UUID}``; :meth:`ConduceEmulator.add_dataset` does the same from the test.
* ``GET /conduce/api/v1/datasets/metadata/<ID>``: ``{"id", "name", "owner", "created"}``;
  404 for an unknown id or another account's dataset.
* Echo, any method, on ``/conduce/api/v1/echo[/...]``, everything under
  ``/conduce/api/v2/resources`` and everything under ``/api/v2/data/`` not named below:
  ``{"method", "path" (as sent, doubled slash included), "query" (the raw query string),
  "headers" (names lowercased, repeated ones joined with ", "), "body_length",
  "body_sha256"}``. ``authorization`` shows ``{"auth": "bearer", "key_id": the first 12 hex
  digits of the key's SHA-256 (:func:`key_id`), "valid": whether it is a live key}`` (or
  ``{"auth": "other"}`` for another scheme); ``cookie`` shows ``{"auth": "cookie", "names":
  [...], "session": whether the session cookie is live, or null}``; a repeated
  Authorization or Cookie header shows as a list of those: never a secret. The answer also
  carries ``Set-Cookie: tracking=1; Path=/`` and ``X-Echo: 1``, for a proxy to strip the
  one and keep the other.
* ``GET /api/v2/data/blob/<N>``: N bytes of ``application/octet-stream``, the content of
  :func:`blob_chunks` (SHA-256: :func:`blob_sha256`), streamed 1 MiB at a time with a
  ``Content-Length``, or chunked with ``?chunked=1``. N is at most 2**40; others are 404.
* ``POST`` or ``PUT /api/v2/data/upload``: reads a body of any size and answers
  ``{"length": n, "sha256": HEX}``.
* ``/api/v2/data/redirect``, any method: 302 to :data:`REDIRECT_LOCATION`, an absolute URL
  on another host, for checking that a proxy does not follow redirects.

Faults are injected per path or for all paths with :meth:`ConduceEmulator.inject`; each
request gets at most one fault: the first matching rule, in injection order.

With ``control=True`` the emulator also serves a control API, so that a test can steer an
emulator running in another process (see :mod:`keyagent.testing.emulator_process`). It
listens on a Unix socket in the emulator's private temporary directory, not on the HTTPS
port, because:

* it must keep working while TLS is broken on purpose (``wrong_certificate``), and it must
  never be subject to faults or show up in :attr:`ConduceEmulator.requests`: a second
  listener with its own handler gets all of that by construction, with no path special-cased
  in the emulated API;
* the directory is ``0700`` and the socket ``0600``, so only the emulator's own user can
  connect, which no loopback TCP port offers; and no second port can collide or linger.

On top of that, every call needs ``Authorization: Bearer <token>``, a random token made at
start and written to the ``0600`` file :attr:`ConduceEmulator.control_token_path` (compared
in constant time; 401 without it). Calls are ``POST /_emulator/<method>`` with a JSON object
of the method's keyword arguments; the answer is ``{"result": ...}``, or, with status 400,
``{"error": "ValueError" | "KeyError" | "TypeError", "message": ...}`` for what the
in-process method would have raised. Faults travel as :meth:`Fault.to_json` objects, request
records as :meth:`RequestRecord.to_json` objects.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import http
import json
import logging
import os
import secrets
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.message import Message
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from socketserver import TCPServer, ThreadingUnixStreamServer
from types import TracebackType
from typing import Any, Final, Literal, NoReturn, cast, get_args
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "API_PREFIX",
    "BLOB_BLOCK_SIZE",
    "CONTROL_PREFIX",
    "DATA_PREFIX",
    "REDIRECT_LOCATION",
    "RESOURCES_PREFIX",
    "SESSION_COOKIE",
    "ConduceEmulator",
    "Fault",
    "FaultKind",
    "RequestRecord",
    "blob_chunks",
    "blob_sha256",
    "key_id",
]

log = logging.getLogger("keyagent.testing.emulator")

API_PREFIX: Final = "/conduce/api/v1/"
SESSION_COOKIE: Final = "conduce_session"
MAX_BODY: Final = 64 * 1024
CONTROL_PREFIX: Final = "/_emulator/"
# Control calls carry a fault body at most; a megabyte leaves room and still bounds memory.
_MAX_CONTROL_BODY: Final = 1024 * 1024

FaultKind = Literal["delay", "hang", "status", "reset", "malformed_json", "wrong_certificate"]
AuthKind = Literal["none", "password", "cookie", "bearer"]
# idle: between requests; busy: a request is being handled (perhaps hung by a fault);
# answered: the answer is being written, the connection turns idle right after.
_ConnectionState = Literal["idle", "busy", "answered"]

# path -> allowed method
_ROUTES: Final[dict[str, str]] = {
    "user/login": "POST",
    "user/validate-session": "GET",
    "apikeys/list": "GET",
    "apikeys/create": "POST",
    "apikeys/delete": "POST",
}

_MALFORMED_BODY: Final = b"<html><body>502 Bad Gateway</body></html>{not json"

# The data endpoints (see _data_route): a few calls of the real API beyond the key calls,
# for tools that make their Conduce calls through the agent's HTTP socket.
DATA_PREFIX: Final = "/api/v2/data/"
RESOURCES_PREFIX: Final = "/conduce/api/v2/resources"
REDIRECT_LOCATION: Final = "https://redirected.invalid/conduce/api/v1/elsewhere"
BLOB_BLOCK_SIZE: Final = 1 << 20
# Streamed bodies move in pieces of this size: large socket reads and writes keep a
# 100 MiB transfer fast, and memory stays bounded by it whatever the body's size.
_STREAM_PIECE: Final = 1 << 20
_MAX_CHUNK_LINE: Final = 1024
_MAX_TRAILER_LINES: Final = 64
# blob/<N> answers at most a tebibyte: enough for any test, and N stays a sane number.
_MAX_BLOB: Final = 1 << 40

_DataRoute = Literal["list-teams", "metadata", "create", "echo", "blob", "upload", "redirect"]


@functools.cache
def _blob_block() -> bytes:
    # Pseudo-random, so that a misplaced or repeated piece changes the digest; made once.
    return hashlib.shake_128(b"keyagent conduce emulator blob").digest(BLOB_BLOCK_SIZE)


def blob_chunks(size: int) -> Iterator[bytes]:
    """The content ``GET /api/v2/data/blob/<size>`` streams, in pieces of at most 1 MiB.

    A fixed pseudo-random block of :data:`BLOB_BLOCK_SIZE` bytes, repeated and cut at
    ``size``; never more than one block in memory.
    """
    block = _blob_block()
    remaining = size
    while remaining > 0:
        piece = block if remaining >= len(block) else block[:remaining]
        remaining -= len(piece)
        yield piece


def blob_sha256(size: int) -> str:
    """The SHA-256 (hex) of ``blob/<size>``'s content, computed without holding it."""
    digest = hashlib.sha256()
    for piece in blob_chunks(size):
        digest.update(piece)
    return digest.hexdigest()


def key_id(api_key: str) -> str:
    """What the echo endpoint shows for a bearer key: the first 12 hex digits of its
    SHA-256, as keyagent shows key ids."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:12]


def _data_route(path: str) -> tuple[_DataRoute, str] | None:
    """The data endpoint a (normalised) path names and its argument, or None."""
    if path == API_PREFIX + "user/list-teams":
        return "list-teams", ""
    if path.startswith(API_PREFIX + "datasets/metadata/"):
        return "metadata", path.removeprefix(API_PREFIX + "datasets/metadata/")
    if path == API_PREFIX + "datasets/create":
        return "create", ""
    if path == API_PREFIX + "echo" or path.startswith(API_PREFIX + "echo/"):
        return "echo", ""
    if path.startswith(RESOURCES_PREFIX) or path == DATA_PREFIX.rstrip("/"):
        return "echo", ""
    if path.startswith(DATA_PREFIX):
        rest = path.removeprefix(DATA_PREFIX)
        if rest.startswith("blob/"):
            return "blob", rest.removeprefix("blob/")
        if rest == "upload":
            return "upload", ""
        if rest == "redirect":
            return "redirect", ""
        return "echo", ""
    return None


class _BadBody(Exception):
    """The request body's framing is broken: answer 400 and close the connection."""


class _BodyReader:
    """Reads one request body in pieces, with Content-Length or chunked framing."""

    def __init__(self, rfile: Any, headers: Message) -> None:
        self._rfile = rfile
        self._done = False
        self._in_chunk = False
        encoding = headers.get("Transfer-Encoding")
        self._chunked = encoding is not None
        self._remaining = 0
        if encoding is not None:
            if str(encoding).strip().lower() != "chunked":
                raise _BadBody("only the chunked transfer coding is understood")
            return
        text = str(headers.get("Content-Length") or "0").strip()
        if not text.isdigit():
            raise _BadBody("a bad Content-Length")
        self._remaining = int(text)

    def read(self) -> bytes:
        """The next piece of the body, at most 1 MiB; ``b""`` once it is all read."""
        if self._done:
            return b""
        if not self._chunked:
            if self._remaining == 0:
                self._done = True
                return b""
            return self._take()
        while self._remaining == 0:
            if self._in_chunk:
                if self._rfile.readline(_MAX_CHUNK_LINE) not in (b"\r\n", b"\n"):
                    raise _BadBody("a chunk does not end with CRLF")
                self._in_chunk = False
            line = self._rfile.readline(_MAX_CHUNK_LINE + 1)
            size_text = line.split(b";", 1)[0].strip()
            if (
                not line.endswith(b"\n")
                or not size_text
                or size_text.strip(b"0123456789abcdefABCDEF")
            ):
                raise _BadBody("a bad chunk size line")
            size = int(size_text, 16)
            if size == 0:
                self._skip_trailers()
                self._done = True
                return b""
            self._remaining, self._in_chunk = size, True
        return self._take()

    def _take(self) -> bytes:
        piece: bytes = self._rfile.read(min(self._remaining, _STREAM_PIECE))
        if not piece:
            raise _BadBody("the body ended early")
        self._remaining -= len(piece)
        return piece

    def _skip_trailers(self) -> None:
        for _ in range(_MAX_TRAILER_LINES):
            line = self._rfile.readline(_MAX_CHUNK_LINE + 1)
            if line in (b"\r\n", b"\n"):
                return
            if not line.endswith(b"\n"):
                raise _BadBody("a bad trailer line")
        raise _BadBody("too many trailer lines")

    def drain(self) -> None:
        """Read and drop the rest of the body, so the connection can carry the next request."""
        while self.read():
            pass

    def digest(self) -> tuple[int, str]:
        """Read the rest of the body; its length and SHA-256 (hex)."""
        length, digest = 0, hashlib.sha256()
        while piece := self.read():
            length += len(piece)
            digest.update(piece)
        return length, digest.hexdigest()

    def read_all(self, limit: int) -> bytes | None:
        """The rest of the body, or None (the rest unread) if it exceeds ``limit`` bytes."""
        pieces: list[bytes] = []
        size = 0
        while piece := self.read():
            size += len(piece)
            if size > limit:
                return None
            pieces.append(piece)
        return b"".join(pieces)


@dataclass(frozen=True)
class Fault:
    """One misbehaviour; build it with the class methods."""

    kind: FaultKind
    seconds: float = 0.0
    code: int = 0
    body: str | None = None
    certificate: Literal["untrusted", "wrong_host"] = "untrusted"

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        """Wait this long, then answer normally. close() cuts the wait short."""
        if seconds < 0:
            raise ValueError("a delay must not be negative")
        return cls("delay", seconds=seconds)

    @classmethod
    def hang(cls) -> Fault:
        """Block until release() or close(); after release() the request is answered
        normally, after close() the connection is dropped without an answer."""
        return cls("hang")

    @classmethod
    def status(cls, code: int, body: str | None = None) -> Fault:
        """Answer with this status and body (default: a small JSON error object).

        A 2xx code with a custom body makes a well-formed answer of unexpected shape.
        """
        if not 200 <= code <= 599:
            raise ValueError("a status fault needs a final status code, 200 to 599")
        return cls("status", code=code, body=body)

    @classmethod
    def reset(cls) -> Fault:
        """Read the request, then close the TCP connection with a RST and no answer."""
        return cls("reset")

    @classmethod
    def malformed_json(cls) -> Fault:
        """Answer 200 with ``Content-Type: application/json`` and a body that is not JSON."""
        return cls("malformed_json")

    @classmethod
    def wrong_certificate(
        cls, certificate: Literal["untrusted", "wrong_host"] = "untrusted"
    ) -> Fault:
        """Present a bad certificate on new TLS connections.

        ``untrusted``: a certificate for the right host from another CA; ``wrong_host``: one
        from the right CA for another host name. The handshake happens before the request
        path is known, so this fault applies to all paths and counts connections, not
        requests; injecting it disconnects idle keep-alive connections so that the next
        request of any client needs a new handshake.
        """
        return cls("wrong_certificate", certificate=certificate)

    def to_json(self) -> dict[str, object]:
        """This fault as a JSON object, for the control API; :meth:`from_json` reverses it."""
        return {
            "kind": self.kind,
            "seconds": self.seconds,
            "code": self.code,
            "body": self.body,
            "certificate": self.certificate,
        }

    @classmethod
    def from_json(cls, document: Mapping[str, object]) -> Fault:
        """Build a fault from :meth:`to_json`'s object; ValueError if it makes no fault.

        Goes through the class methods, so a fault from the wire is checked like any other.
        Fields the kind does not use may be left out.
        """
        unknown = document.keys() - {"kind", "seconds", "code", "body", "certificate"}
        if unknown:
            raise ValueError(f"unknown fault field(s): {', '.join(sorted(unknown))}")
        kind = document.get("kind")
        if kind == "delay":
            seconds = document.get("seconds", 0.0)
            if isinstance(seconds, bool) or not isinstance(seconds, int | float):
                raise ValueError("a delay fault needs a number of seconds")
            return cls.delay(float(seconds))
        if kind == "hang":
            return cls.hang()
        if kind == "status":
            code, body = document.get("code"), document.get("body")
            if isinstance(code, bool) or not isinstance(code, int):
                raise ValueError("a status fault needs an integer code")
            if body is not None and not isinstance(body, str):
                raise ValueError("a status fault's body must be a string or null")
            return cls.status(code, body)
        if kind == "reset":
            return cls.reset()
        if kind == "malformed_json":
            return cls.malformed_json()
        if kind == "wrong_certificate":
            certificate = document.get("certificate", "untrusted")
            if certificate not in ("untrusted", "wrong_host"):
                raise ValueError("a certificate fault is 'untrusted' or 'wrong_host'")
            return cls.wrong_certificate(certificate)
        raise ValueError(f"unknown fault kind {kind!r}")


@dataclass(frozen=True)
class RequestRecord:
    """One request as the emulator saw it. Never holds a password, key or cookie value."""

    method: str
    path: str
    """Relative to ``/conduce/api/v1/`` (``"apikeys/list"``); the full path if outside it."""
    auth: AuthKind
    """What the request tried to authenticate with: ``bearer`` whenever an Authorization
    header was sent, ``password`` for a login, else ``cookie`` if a session cookie was sent."""
    sent_cookie: bool
    """Whether a session cookie was sent, whatever authenticated the request."""
    fault: FaultKind | None = None
    status: int | None = None
    """None while in progress, and for requests that got no answer (reset, dropped)."""
    user: str | None = None
    """The account the request authenticated as, if it did."""

    def to_json(self) -> dict[str, object]:
        """This record as a JSON object, for the control API; :meth:`from_json` reverses it."""
        return {
            "method": self.method,
            "path": self.path,
            "auth": self.auth,
            "sent_cookie": self.sent_cookie,
            "fault": self.fault,
            "status": self.status,
            "user": self.user,
        }

    @classmethod
    def from_json(cls, document: Mapping[str, object]) -> RequestRecord:
        """Build a record from :meth:`to_json`'s object; ValueError if it is not one."""
        method, path, auth = document.get("method"), document.get("path"), document.get("auth")
        sent_cookie, fault = document.get("sent_cookie"), document.get("fault")
        status, user = document.get("status"), document.get("user")
        if not isinstance(method, str) or not isinstance(path, str):
            raise ValueError("a request record needs a method and a path")
        if auth not in get_args(AuthKind) or not isinstance(sent_cookie, bool):
            raise ValueError("a request record needs auth and sent_cookie")
        if fault is not None and fault not in get_args(FaultKind):
            raise ValueError(f"unknown fault kind {fault!r}")
        if status is not None and (isinstance(status, bool) or not isinstance(status, int)):
            raise ValueError("a request record's status is an integer or null")
        if user is not None and not isinstance(user, str):
            raise ValueError("a request record's user is a string or null")
        return cls(
            method,
            path,
            cast(AuthKind, auth),
            sent_cookie,
            cast(FaultKind | None, fault),
            status,
            user,
        )


@dataclass
class _Rule:
    fault: Fault
    path: str | None
    remaining: int | None


@dataclass
class _Key:
    email: str
    description: str
    created: str


@dataclass
class _Reply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    stream: Iterable[bytes] | None = None
    """Sent instead of ``body`` when set: ``length`` bytes, or chunked if length is None."""
    length: int | None = None
    early: bool = False
    """Sent before the rest of the request's body is read (which is then dropped)."""


@dataclass
class _Dataset:
    email: str
    name: str
    created: str


def _json_reply(
    status: int, document: object, *, user: str | None = None, **headers: str
) -> _Reply:
    return _Reply(status, json.dumps(document).encode(), dict(headers), user)


def _error_reply(status: int, user: str | None = None) -> _Reply:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "error"
    return _json_reply(status, {"error": phrase}, user=user)


class _Abort(Exception):
    """Raised by a handler that has already closed its connection (the reset fault)."""


class ConduceEmulator:
    """A fake Conduce service on ``https://127.0.0.1:PORT``, served from a daemon thread.

    Use it as a context manager, or call :meth:`start` and :meth:`close`. All public methods
    are thread-safe.
    """

    def __init__(
        self,
        port: int = 0,
        *,
        session_lifetime: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        io_timeout: float = 60.0,
        control: bool = False,
    ) -> None:
        """
        :param port: TCP port on 127.0.0.1; 0 picks a free one.
        :param session_lifetime: seconds a session lives after login, by ``clock``;
            None for sessions that only end with :meth:`expire_sessions`.
        :param clock: monotonic seconds; inject a fake one to expire sessions without waiting.
        :param io_timeout: how long a connection may sit silent before the emulator drops it.
        :param control: also serve the control API (see the module documentation) on
            :attr:`control_path`; off by default, as an in-process emulator has no use for it.
        """
        self._port = port
        self._session_lifetime = session_lifetime
        self._clock = clock
        self._io_timeout = io_timeout
        self._control = control
        # One lock guards all state below. It is never held while a handler waits (hang,
        # delay) or does socket I/O other than a non-blocking shutdown().
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._users: dict[str, bytes] = {}
        self._sessions: dict[str, tuple[str, float | None]] = {}
        self._keys: dict[str, _Key] = {}
        self._datasets: dict[str, _Dataset] = {}
        self._revoked: set[str] = set()
        self._forbidden_users: set[str] = set()
        self._forbidden_keys: set[str] = set()
        self._rules: list[_Rule] = []
        self._requests: list[RequestRecord] = []
        self._forgotten = 0  # records dropped by clear_requests(): sequence number offset
        self._hung: set[threading.Event] = set()
        self._connections: dict[ssl.SSLSocket, _ConnectionState] = {}
        self._threads: set[threading.Thread] = set()
        self._stopping = False
        self._closing = threading.Event()  # set once the listening socket is closed
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._tmpdir: Path | None = None
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._control_server: _ControlServer | None = None
        self._control_thread: threading.Thread | None = None
        self._control_token: str | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> ConduceEmulator:
        """Make the CAs, bind the port and start serving. Returns self."""
        if self._server is not None or self._stopping:
            raise RuntimeError("an emulator can only be started once")
        # Imported here: only running emulators need it, not importers of keyagent.testing.
        import trustme

        ca = trustme.CA()
        other_ca = trustme.CA()
        certificates = {
            "good": ca.issue_cert("127.0.0.1", "localhost"),
            "untrusted": other_ca.issue_cert("127.0.0.1", "localhost"),
            "wrong_host": ca.issue_cert("not-the-conduce-host.invalid"),
        }
        for name, certificate in certificates.items():
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            certificate.configure_cert(context)
            self._contexts[name] = context
        # mkdtemp makes the directory 0700: the CA, the control socket and its token are
        # for this user only.
        self._tmpdir = Path(tempfile.mkdtemp(prefix="conduce-emulator-"))
        ca.cert_pem.write_to_path(str(self._tmpdir / "ca.pem"))
        try:
            self._server = _Server(("127.0.0.1", self._port), self)
            if self._control:
                self._start_control(self._tmpdir)
        except BaseException:
            # Nothing is serving yet (the control thread starts last), so closing the
            # sockets is all the undoing there is.
            for listener in (self._server, self._control_server):
                if listener is not None:
                    listener.server_close()
            self._server = self._control_server = None
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            raise
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            # The poll interval bounds how long close() waits for the accept loop to notice.
            kwargs={"poll_interval": 0.05},
            name=f"conduce-emulator-{self._server.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        return self

    def _start_control(self, directory: Path) -> None:
        token = secrets.token_urlsafe(32)
        # O_EXCL and an explicit 0600 mode: the token file is never readable by others,
        # not even for a moment between creating it and a chmod.
        descriptor = os.open(
            directory / "control.token", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600
        )
        with os.fdopen(descriptor, "w") as token_file:
            token_file.write(token + "\n")
        self._control_token = token
        self._control_server = _ControlServer(str(directory / "control.sock"), self)
        self._control_thread = threading.Thread(
            target=self._control_server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="conduce-emulator-control",
            daemon=True,
        )
        self._control_thread.start()

    def close(self) -> None:
        """Stop serving, release hung requests, drop connections, remove the CA file.

        Idempotent and prompt: nothing waits on a client or on a fault.
        """
        with self._lock:
            if self._stopping:
                return
            self._stopping = True  # new connections are refused from here on
        server, thread = self._server, self._thread
        if server is not None:
            # The listening socket goes first, so that a client whose request is cut short
            # below and who retries meets a refused connection, as with a real dead server,
            # rather than a half-served handshake.
            server.shutdown()  # returns once serve_forever has left its loop
            server.server_close()
        control = self._control_server
        if control is not None:
            # Its handler threads are not joined: they only touch state under the lock, and
            # one waiting in wait_for_* is woken by _closing below.
            control.shutdown()
            control.server_close()
        with self._lock:
            self._closing.set()  # wakes delayed handlers
            for event in self._hung:
                event.set()
            self._hung.clear()
            self._disconnect_locked(idle_only=False)
            self._changed.notify_all()
            threads = list(self._threads)
        deadline = time.monotonic() + 5.0
        for worker in [thread, self._control_thread, *threads]:
            if worker is not None and worker is not threading.current_thread():
                # Daemon threads: should one still be stuck, it cannot keep the process alive.
                worker.join(max(0.0, deadline - time.monotonic()))
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    stop = close

    def __enter__(self) -> ConduceEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, as ``--host`` takes it."""
        if self._server is None:
            raise RuntimeError("the emulator is not started")
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the emulator is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """``https://127.0.0.1:PORT`` (no trailing slash; API paths start with /conduce)."""
        return f"https://{self.host}"

    @property
    def ca_path(self) -> str:
        """A PEM file with the CA that signed the emulator's (good) certificate."""
        if self._tmpdir is None:
            raise RuntimeError("the emulator is not started")
        return str(self._tmpdir / "ca.pem")

    @property
    def control_path(self) -> str:
        """The Unix socket of the control API (only with ``control=True``)."""
        if self._control_server is None or self._tmpdir is None:
            raise RuntimeError("the emulator serves no control API; start it with control=True")
        return str(self._tmpdir / "control.sock")

    @property
    def control_token_path(self) -> str:
        """A 0600 file holding the control API's bearer token and a newline."""
        if self._control_server is None or self._tmpdir is None:
            raise RuntimeError("the emulator serves no control API; start it with control=True")
        return str(self._tmpdir / "control.token")

    # --- accounts and sessions --------------------------------------------------------------

    def add_user(self, email: str, password: str) -> None:
        """Create (or reset the password of) an account."""
        with self._lock:
            self._users[email] = password.encode()

    def add_key(self, email: str, description: str = "") -> str:
        """Give an existing account an API key without going through the API; returns it."""
        with self._lock:
            if email not in self._users:
                raise KeyError(email)
            return self._new_key_locked(email, description)

    def add_dataset(self, email: str, name: str = "") -> str:
        """Give an existing account a dataset, as ``datasets/create`` would; returns its id."""
        with self._lock:
            if email not in self._users:
                raise KeyError(email)
            return self._new_dataset_locked(email, name)

    def api_keys(self, email: str) -> list[str]:
        """The live API keys of an account, oldest first."""
        with self._lock:
            return [key for key, entry in self._keys.items() if entry.email == email]

    def expire_sessions(self, email: str | None = None) -> int:
        """End the sessions of one account, or of all; returns how many ended."""
        with self._lock:
            ended = [
                token
                for token, (owner, _) in self._sessions.items()
                if email is None or owner == email
            ]
            for token in ended:
                del self._sessions[token]
            return len(ended)

    def session_count(self, email: str | None = None) -> int:
        """Live (not yet expired) sessions of one account, or of all."""
        return len(self.session_tokens(email))

    def session_tokens(self, email: str | None = None) -> list[str]:
        """The cookie values of the live sessions of one account, or of all, oldest first.

        For tests that check a session never leaks into a log or a message.
        """
        with self._lock:
            now = self._clock()
            return [
                token
                for token, (owner, expires) in self._sessions.items()
                if (email is None or owner == email) and (expires is None or now < expires)
            ]

    def forbid(self, email: str | None = None, *, api_key: str | None = None) -> None:
        """Make a user's (or one API key's) ``apikeys/*`` calls answer 403."""
        if (email is None) == (api_key is None):
            raise ValueError("forbid takes exactly one of email and api_key")
        with self._lock:
            if email is not None:
                self._forbidden_users.add(email)
            if api_key is not None:
                self._forbidden_keys.add(api_key)

    def unforbid(self, email: str | None = None, *, api_key: str | None = None) -> None:
        """Undo :meth:`forbid`."""
        with self._lock:
            self._forbidden_users.discard(email or "")
            self._forbidden_keys.discard(api_key or "")

    # --- faults and observation -------------------------------------------------------------

    def inject(self, fault: Fault, *, path: str | None = None, count: int | None = None) -> None:
        """Apply ``fault`` to the next ``count`` requests (None: until cleared) to ``path``
        (relative to /conduce/api/v1/, or the full path, e.g. ``/api/v2/data/blob/10``, with
        one leading slash whatever the request sent; None: every path)."""
        if count is not None and count < 1:
            raise ValueError("count must be at least 1, or None for 'until cleared'")
        if path is not None:
            path = path.removeprefix(API_PREFIX)
            if path.startswith("/") and not path.startswith(("/api/", "/conduce/api/v2/")):
                raise ValueError(
                    f"fault paths live under {API_PREFIX} (give e.g. 'apikeys/list'), "
                    "or are full paths under /api/ or /conduce/api/v2/"
                )
            if fault.kind == "wrong_certificate":
                raise ValueError("a wrong certificate is served before any path is known")
        with self._changed:
            self._rules.append(_Rule(fault, path, count))
            if fault.kind == "wrong_certificate":
                # A client that has just read an answer may find its connection still
                # marked busy for a moment, while the handler finishes its loop. Wait for
                # those (briefly: they only have a flush left) so that they are dropped too.
                self._changed.wait_for(
                    lambda: "answered" not in self._connections.values(), timeout=2.0
                )
                self._disconnect_locked(idle_only=True)

    def clear_faults(self) -> None:
        """Remove all fault rules. Requests already hanging stay hung until release()."""
        with self._lock:
            self._rules.clear()

    def release(self) -> int:
        """Let every hanging request go on; returns how many there were."""
        with self._lock:
            hung = list(self._hung)
            self._hung.clear()
            for event in hung:
                event.set()
            return len(hung)

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of the request log, oldest first."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        """Empty the request log; requests in progress are not logged further."""
        with self._lock:
            self._forgotten += len(self._requests)
            self._requests.clear()

    def wait_for_hung(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Wait until at least ``count`` requests are hanging; False on timeout or close()."""
        return self._wait_for(lambda: len(self._hung) >= count, timeout)

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> bool:
        """Wait until the log holds at least ``count`` requests; False on timeout or close()."""
        return self._wait_for(lambda: len(self._requests) >= count, timeout)

    def _wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self._changed:
            # Also woken by close(), so that a control-API thread waiting on behalf of another
            # process does not outlive the emulator by up to its timeout.
            self._changed.wait_for(lambda: predicate() or self._closing.is_set(), timeout)
            return predicate()

    # --- connection plumbing (handler threads) ---------------------------------------------

    def _serve_connection(self, raw: socket.socket, address: Any, server: _Server) -> None:
        # The TLS handshake happens here, in the connection's own thread: done in the accept
        # loop (as wrapping the listening socket would), one silent client would stall it.
        raw.settimeout(self._io_timeout)
        # http.server writes the head and the body of an answer separately; without
        # TCP_NODELAY, Nagle and delayed ACKs add ~40 ms to every request on loopback.
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            context = self._contexts[self._certificate_for_next_connection_locked()]
        connection = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        with self._lock:
            if self._stopping:
                connection.close()
                return
            self._connections[connection] = "idle"
            self._threads.add(threading.current_thread())
        try:
            try:
                connection.do_handshake()
            except OSError as error:  # ssl.SSLError included: e.g. the client refused our cert
                log.debug("TLS handshake with %s failed: %s", address, error)
                return
            _Handler(connection, address, server)
        except _Abort:
            pass
        except OSError as error:
            # Clients vanish, faults reset connections, close() shuts them down.
            log.debug("connection from %s ended: %s", address, error)
        finally:
            with self._lock:
                # Forgotten before closing, under the lock: _disconnect_locked must never
                # shut down a file descriptor number that a new socket may have reused.
                self._connections.pop(connection, None)
                self._threads.discard(threading.current_thread())
            connection.close()

    def _certificate_for_next_connection_locked(self) -> str:
        for rule in self._rules:
            if rule.fault.kind == "wrong_certificate":
                self._consume_locked(rule)
                return rule.fault.certificate
        return "good"

    def _disconnect_locked(self, *, idle_only: bool) -> None:
        for connection, state in self._connections.items():
            if idle_only and state != "idle":
                continue
            # The plain-socket shutdown, not SSLSocket.shutdown, which would also tear down
            # the TLS object under the feet of the thread that is using it. The owning
            # thread sees end-of-file, or an error on write, and ends.
            with contextlib.suppress(OSError):  # already gone
                socket.socket.shutdown(connection, socket.SHUT_RDWR)

    def _set_state(self, connection: ssl.SSLSocket, state: _ConnectionState) -> None:
        with self._lock:
            if connection in self._connections:
                self._connections[connection] = state
                self._changed.notify_all()

    def _consume_locked(self, rule: _Rule) -> None:
        if rule.remaining is not None:
            rule.remaining -= 1
            if rule.remaining <= 0:
                self._rules.remove(rule)

    def _admit(self, record: RequestRecord) -> tuple[Fault | None, int]:
        """Log a request and pick its fault; returns the fault and the request's sequence
        number (its index in the log had clear_requests() never been called)."""
        with self._lock:
            fault: Fault | None = None
            for rule in self._rules:
                if rule.fault.kind != "wrong_certificate" and rule.path in (None, record.path):
                    fault = rule.fault
                    self._consume_locked(rule)
                    break
            self._requests.append(replace(record, fault=fault.kind if fault else None))
            self._changed.notify_all()
            return fault, self._forgotten + len(self._requests) - 1

    def _finish(self, sequence: int, status: int | None, user: str | None) -> None:
        with self._lock:
            index = sequence - self._forgotten
            if 0 <= index < len(self._requests):  # else clear_requests() dropped it
                self._requests[index] = replace(self._requests[index], status=status, user=user)

    def _pause(self, seconds: float) -> bool:
        """Wait, interruptibly by close(); False if the emulator is closing."""
        return not self._closing.wait(seconds)

    def _hang(self) -> bool:
        """Wait for release() or close(); False if the emulator is closing."""
        event = threading.Event()
        with self._lock:
            if self._closing.is_set():
                return False
            self._hung.add(event)
            self._changed.notify_all()
        event.wait()  # no timeout on purpose: release() and close() always set it
        return not self._closing.is_set()

    # --- the API ------------------------------------------------------------------------------

    def _dispatch(self, method: str, path: str, headers: Message, body: bytes) -> _Reply:
        allowed = _ROUTES.get(path)
        if allowed is None:
            return _error_reply(404)
        if method != allowed:
            reply = _error_reply(405)
            reply.headers["Allow"] = allowed
            return reply
        document: dict[str, object] = {}
        if method == "POST":
            try:
                parsed: object = json.loads(body)
            except (ValueError, RecursionError):
                return _error_reply(400)
            if not isinstance(parsed, dict):
                return _error_reply(400)
            document = parsed
        with self._lock:
            if path == "user/login":
                return self._login_locked(document)
            principal = self._authenticate_locked(headers)
            if principal is None:
                return _error_reply(401)
            email, key = principal
            if path == "user/validate-session":
                return _json_reply(200, {"email": email}, user=email)
            if email in self._forbidden_users or (key is not None and key in self._forbidden_keys):
                return _error_reply(403, email)
            if path == "apikeys/list":
                listed = [
                    {
                        "apikey": api_key,
                        "description": entry.description,
                        "created": entry.created,
                        "expires": None,
                    }
                    for api_key, entry in self._keys.items()
                    if entry.email == email
                ]
                return _json_reply(200, listed, user=email)
            if path == "apikeys/create":
                description = document.get("description", "")
                if not isinstance(description, str):
                    return _error_reply(400, email)
                return _json_reply(
                    200, {"apikey": self._new_key_locked(email, description)}, user=email
                )
            # apikeys/delete
            target = document.get("apikey")
            if not isinstance(target, str):
                return _error_reply(400, email)
            entry = self._keys.get(target)
            if entry is None or entry.email != email:
                return _error_reply(404, email)
            del self._keys[target]
            self._revoked.add(target)
            return _json_reply(200, {}, user=email)

    def _login_locked(self, document: dict[str, object]) -> _Reply:
        email, password = document.get("email"), document.get("password")
        if not isinstance(email, str) or not isinstance(password, str):
            return _error_reply(400)
        expected = self._users.get(email)
        # compare_digest: no timing hint about the password, even in a fake.
        if expected is None or not hmac.compare_digest(expected, password.encode()):
            return _error_reply(401)
        token = secrets.token_urlsafe(32)
        lifetime = self._session_lifetime
        self._sessions[token] = (email, None if lifetime is None else self._clock() + lifetime)
        cookie = f"{SESSION_COOKIE}={token}; Path=/; Secure; HttpOnly; SameSite=Strict"
        return _json_reply(200, {"email": email}, user=email, **{"Set-Cookie": cookie})

    def _authenticate_locked(self, headers: Message) -> tuple[str, str | None] | None:
        """The (email, api key or None) a request authenticates as, or None."""
        authorization = headers.get("Authorization")
        if authorization is not None:
            scheme, _, key = str(authorization).partition(" ")
            entry = self._keys.get(key.strip())
            if scheme.lower() != "bearer" or entry is None or key.strip() in self._revoked:
                return None
            return entry.email, key.strip()
        token = _session_token(headers)
        if token is None or token not in self._sessions:
            return None
        email, expires = self._sessions[token]
        if expires is not None and self._clock() >= expires:
            del self._sessions[token]
            return None
        return email, None

    def _new_dataset_locked(self, email: str, name: str) -> str:
        dataset = str(uuid.uuid4())
        created = datetime.now(UTC).isoformat(timespec="seconds")
        self._datasets[dataset] = _Dataset(email, name, created)
        return dataset

    def _principal(self, headers: Message) -> tuple[str, str | None] | None:
        """The (email, api key or None) a request authenticates as, or None."""
        with self._lock:
            return self._authenticate_locked(headers)

    def _session_valid(self, token: str) -> bool:
        with self._lock:
            entry = self._sessions.get(token)
            return entry is not None and (entry[1] is None or self._clock() < entry[1])

    def _dataset(self, email: str, dataset: str) -> dict[str, object] | None:
        with self._lock:
            entry = self._datasets.get(dataset)
            if entry is None or entry.email != email:
                return None
            return {"id": dataset, "name": entry.name, "owner": email, "created": entry.created}

    def _create_dataset(self, email: str, name: str) -> str:
        with self._lock:
            return self._new_dataset_locked(email, name)

    def _new_key_locked(self, email: str, description: str) -> str:
        # A random (version 4) UUID, as the Conduce docs show keys: with its hyphens it can
        # never be mistaken for a hex key id prefix.
        key = str(uuid.uuid4())
        created = datetime.now(UTC).isoformat(timespec="seconds")
        self._keys[key] = _Key(email, description, created)
        return key


def _session_token(headers: Message) -> str | None:
    raw = headers.get("Cookie")
    if raw is None:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(str(raw))
    except CookieError:
        return None
    morsel = jar.get(SESSION_COOKIE)
    return None if morsel is None else morsel.value


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 drops connections when 64 clients connect at once.
    request_queue_size = 128
    # The emulator joins its own handler threads with a deadline in close(); the standard
    # unbounded join would wait on whatever a handler is blocked on.
    block_on_close = False

    def __init__(self, address: tuple[str, int], emulator: ConduceEmulator) -> None:
        self.emulator = emulator
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn) that can stall for
        # seconds in a sandbox; the name is known.
        TCPServer.server_bind(self)
        self.server_name = "127.0.0.1"
        self.server_port = int(self.server_address[1])

    def finish_request(self, request: Any, client_address: Any) -> None:
        self.emulator._serve_connection(request, client_address, self)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Instead of a traceback on stderr; a bug here still shows in the log.
        log.warning("emulator handler for %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real service and requests' pool do
    server_version = "ConduceEmulator/1"
    sys_version = ""
    # Writes are buffered and sent when an answer is whole (http.server flushes after each
    # request), so a small answer leaves in one TLS record as from a real front end, not
    # a record for its head and another for its body. Streamed pieces are flushed each.
    wbufsize = 64 * 1024
    server: _Server
    connection: ssl.SSLSocket

    def log_message(self, format: str, *args: Any) -> None:
        # The request line holds method and path only; still debug, not stderr.
        log.debug("%s " + format, self.address_string(), *args)

    def handle_expect_100(self) -> bool:
        # Written through the buffer like any head: sent now, not with the final answer.
        go_on = super().handle_expect_100()
        self.wfile.flush()
        return go_on

    def parse_request(self) -> bool:
        # Called once a request line has arrived: from here on the connection is busy.
        self.server.emulator._set_state(self.connection, "busy")
        return super().parse_request()

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        finally:
            self.server.emulator._set_state(self.connection, "idle")

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def _serve(self) -> None:
        # The target as sent: http.server folds a leading "//" of self.path into "/", and
        # the echo endpoint shows what the client really sent.
        words = self.requestline.split()
        raw_path, _, query = (words[1] if len(words) >= 2 else self.path).partition("?")
        raw_path = raw_path.partition("#")[0]
        full_path = "/" + raw_path.lstrip("/")
        route = _data_route(full_path)
        path = full_path.removeprefix(API_PREFIX) if full_path.startswith(API_PREFIX) else full_path
        if route is not None:
            self._serve_data(route, path, raw_path, query)
            return
        body = self._read_body()
        if body is None:
            return
        begun = self._begin(path)
        if begun is None:
            return
        index, reply = begun
        if reply is None:
            reply = self.server.emulator._dispatch(self.command, path, self.headers, body)
        self._answer(index, reply)

    def _begin(self, path: str) -> tuple[int, _Reply | None] | None:
        """Log the request and apply its fault. Returns its sequence number and the fault's
        answer (None: answer normally), or None if the fault has ended the request."""
        emulator = self.server.emulator
        sent_cookie = _session_token(self.headers) is not None
        auth: AuthKind = "none"
        if self.headers.get("Authorization") is not None:
            auth = "bearer"
        elif path == "user/login":
            auth = "password"
        elif sent_cookie:
            auth = "cookie"
        fault, index = emulator._admit(RequestRecord(self.command, path, auth, sent_cookie))
        reply: _Reply | None = None
        if fault is None:
            pass
        elif fault.kind == "delay":
            if not emulator._pause(fault.seconds):
                self._drop(index)
                return None
        elif fault.kind == "hang":
            if not emulator._hang():
                self._drop(index)
                return None
        elif fault.kind == "status":
            if fault.body is None:
                reply = _error_reply(fault.code)
            else:
                reply = _Reply(fault.code, fault.body.encode())
        elif fault.kind == "reset":
            self._reset(index)
        elif fault.kind == "malformed_json":
            reply = _Reply(200, _MALFORMED_BODY)
        return index, reply

    # --- the data endpoints: bodies stream, in both directions ---------------------------

    def _serve_data(
        self, route: tuple[_DataRoute, str], path: str, raw_path: str, query: str
    ) -> None:
        begun = self._begin(path)
        if begun is None:
            return
        index, reply = begun
        try:
            body = _BodyReader(self.rfile, self.headers)
            if reply is None:
                reply = self._data_reply(route, raw_path, query, body)
            if reply.early:
                # Refused mid-body (too large): answered at once, as a front end does, and
                # what the client still sends is read and dropped until it stops (a
                # lingering close), so no reset can destroy the answer before it is read.
                self._answer(index, reply)
                self.wfile.flush()
                with contextlib.suppress(_BadBody, OSError):
                    body.drain()
                return
            # Whatever the answer, the rest of the body goes, so the connection stays usable.
            body.drain()
        except _BadBody:
            self.close_connection = True
            reply = _error_reply(400, reply.user if reply is not None else None)
        self._answer(index, reply)

    def _data_reply(
        self, route: tuple[_DataRoute, str], raw_path: str, query: str, body: _BodyReader
    ) -> _Reply:
        emulator = self.server.emulator
        name, argument = route
        allowed = {
            "list-teams": ("GET", "HEAD"),
            "metadata": ("GET", "HEAD"),
            "blob": ("GET", "HEAD"),
            "create": ("POST",),
            "upload": ("POST", "PUT"),
        }.get(name)
        if allowed is not None and self.command not in allowed:
            reply = _error_reply(405)
            reply.headers["Allow"] = ", ".join(allowed)
            return reply
        principal = emulator._principal(self.headers)
        if principal is None:
            return _error_reply(401)
        email, _ = principal
        if name == "list-teams":
            team = str(uuid.uuid5(uuid.NAMESPACE_URL, f"conduce-team:{email}"))
            return _json_reply(200, [{"id": team, "name": email, "role": "owner"}], user=email)
        if name == "metadata":
            dataset = emulator._dataset(email, argument)
            if dataset is None:
                return _error_reply(404, email)
            return _json_reply(200, dataset, user=email)
        if name == "create":
            raw = body.read_all(MAX_BODY)
            if raw is None:
                self.close_connection = True  # the unread rest would be taken for a request
                reply = _error_reply(413, email)
                reply.early = True
                return reply
            try:
                document: object = json.loads(raw or b"{}")
            except (ValueError, RecursionError):
                document = None
            if not isinstance(document, dict) or not isinstance(document.get("name", ""), str):
                return _error_reply(400, email)
            dataset_id = emulator._create_dataset(email, document.get("name", ""))
            return _json_reply(200, {"id": dataset_id}, user=email)
        if name == "blob":
            if not argument.isdigit() or int(argument) > _MAX_BLOB:
                return _error_reply(404, email)
            size = int(argument)
            chunked = parse_qs(query).get("chunked", ["0"])[-1].lower() in ("1", "true", "yes")
            return _Reply(
                200,
                b"",
                {"Content-Type": "application/octet-stream"},
                email,
                stream=blob_chunks(size),
                length=None if chunked else size,
            )
        if name == "upload":
            length, sha256 = body.digest()
            return _json_reply(200, {"length": length, "sha256": sha256}, user=email)
        if name == "redirect":
            return _json_reply(
                302, {"location": REDIRECT_LOCATION}, user=email, Location=REDIRECT_LOCATION
            )
        # echo
        length, sha256 = body.digest()
        echoed = {
            "method": self.command,
            "path": raw_path,
            "query": query,
            "headers": self._echoed_headers(),
            "body_length": length,
            "body_sha256": sha256,
        }
        return _json_reply(
            200, echoed, user=email, **{"Set-Cookie": "tracking=1; Path=/", "X-Echo": "1"}
        )

    def _echoed_headers(self) -> dict[str, object]:
        """The request headers, names lowercased; credentials replaced by what they are.

        A repeated Authorization or Cookie header shows as a list, one entry each, so that a
        test sees a credential a proxy failed to drop even when another one authenticated.
        """
        echoed: dict[str, object] = {}
        credentials: dict[str, list[dict[str, object]]] = {}
        for name, value in self.headers.items():
            lower = name.lower()
            if lower == "authorization":
                credentials.setdefault(lower, []).append(self._echoed_authorization(str(value)))
            elif lower == "cookie":
                credentials.setdefault(lower, []).append(self._echoed_cookie(str(value)))
            elif isinstance(echoed.get(lower), str):
                echoed[lower] = f"{echoed[lower]}, {value}"
            else:
                echoed[lower] = str(value)
        for lower, entries in credentials.items():
            echoed[lower] = entries[0] if len(entries) == 1 else entries
        return echoed

    def _echoed_authorization(self, value: str) -> dict[str, object]:
        scheme, _, credential = value.partition(" ")
        if scheme.lower() != "bearer":
            return {"auth": "other"}
        with self.server.emulator._lock:
            key = credential.strip()
            valid = key in self.server.emulator._keys
        return {"auth": "bearer", "key_id": key_id(key), "valid": valid}

    def _echoed_cookie(self, value: str) -> dict[str, object]:
        jar: SimpleCookie = SimpleCookie()
        with contextlib.suppress(CookieError):
            jar.load(value)
        morsel = jar.get(SESSION_COOKIE)
        token = None if morsel is None else morsel.value
        return {
            "auth": "cookie",
            "names": sorted(jar.keys()),
            "session": None if token is None else self.server.emulator._session_valid(token),
        }

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding") is not None:
            # requests sends a Content-Length for JSON bodies; chunked is not worth emulating.
            self.close_connection = True
            self.send_error(411)
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True  # the unread body would be taken for a request
            self.send_error(413 if length > MAX_BODY else 400)
            return None
        return self.rfile.read(length) if length else b""

    def _answer(self, index: int, reply: _Reply) -> None:
        # Logged before the bytes leave, so a client that got the answer finds it logged.
        self.server.emulator._finish(index, reply.status, reply.user)
        self.server.emulator._set_state(self.connection, "answered")
        self.send_response(reply.status)
        headers = {"Content-Type": "application/json", "Cache-Control": "no-store"}
        if reply.stream is None:
            headers["Content-Length"] = str(len(reply.body))
        elif reply.length is None:
            headers["Transfer-Encoding"] = "chunked"
        else:
            headers["Content-Length"] = str(reply.length)
        if self.close_connection:
            headers["Connection"] = "close"  # so the client does not send another request
        # A reply's own headers win (a blob's Content-Type), in the order above.
        for name, value in {**headers, **reply.headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return  # the head of what GET would answer, no body
        if reply.stream is None:
            self.wfile.write(reply.body)
            return
        for piece in reply.stream:
            if reply.length is None:
                self.wfile.write(b"%x\r\n" % len(piece))
                self.wfile.write(piece)
                self.wfile.write(b"\r\n")
            else:
                self.wfile.write(piece)
            self.wfile.flush()
        if reply.length is None:
            self.wfile.write(b"0\r\n\r\n")

    def _drop(self, index: int) -> None:
        self.server.emulator._finish(index, None, None)
        self.close_connection = True

    def _reset(self, index: int) -> NoReturn:
        self.server.emulator._finish(index, None, None)
        self.close_connection = True
        emulator = self.server.emulator
        with emulator._lock:
            # Forgotten first, under the lock, for the same reason as in _serve_connection.
            emulator._connections.pop(self.connection, None)
        # SO_LINGER on with a zero timeout turns close() into a RST instead of a FIN (and
        # skips the TLS close_notify too): the client sees "connection reset by peer".
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The makefile() objects hold references that would keep the descriptor open.
        self.rfile.close()
        self.connection.close()
        # Unwind out of http.server's loop, which would otherwise flush the dead socket.
        raise _Abort


# --- the control API ---------------------------------------------------------------------------


class _Arguments:
    """The keyword arguments of one control call, type-checked as they are taken."""

    def __init__(self, document: Mapping[str, object], allowed: tuple[str, ...]) -> None:
        # Checked before anything runs: a misspelt argument must not quietly become a default.
        unknown = document.keys() - set(allowed)
        if unknown:
            raise TypeError(f"unexpected argument(s): {', '.join(sorted(unknown))}")
        self._document = document

    def text(self, name: str, default: str | None = None) -> str:
        """A string argument; required unless it has a default."""
        value = self._document.get(name, default)
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string")
        return value

    def optional_text(self, name: str, default: str | None = None) -> str | None:
        value = self._document.get(name, default)
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be a string or null")
        return value

    def integer(self, name: str, default: int | None = None) -> int:
        """An integer argument; required unless it has a default."""
        value = self._document.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer")
        return value

    def optional_integer(self, name: str) -> int | None:
        value = self._document.get(name)
        return None if value is None else self.integer(name)

    def number(self, name: str, default: float) -> float:
        value = self._document.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name} must be a number")
        return float(value)

    def fault(self, name: str) -> Fault:
        value = self._document.get(name)
        if not isinstance(value, dict):
            raise TypeError(f"{name} must be a fault object")
        return Fault.from_json(value)


_ControlCall = Callable[[ConduceEmulator, _Arguments], object]

# name -> (argument names, call); each mirrors the ConduceEmulator method of the same name.
_CONTROL_CALLS: Final[dict[str, tuple[tuple[str, ...], _ControlCall]]] = {
    "add_user": (
        ("email", "password"),
        lambda emu, args: emu.add_user(args.text("email"), args.text("password")),
    ),
    "add_key": (
        ("email", "description"),
        lambda emu, args: emu.add_key(args.text("email"), args.text("description", "")),
    ),
    "add_dataset": (
        ("email", "name"),
        lambda emu, args: emu.add_dataset(args.text("email"), args.text("name", "")),
    ),
    "api_keys": (("email",), lambda emu, args: emu.api_keys(args.text("email"))),
    "expire_sessions": (
        ("email",),
        lambda emu, args: emu.expire_sessions(args.optional_text("email")),
    ),
    "session_count": (
        ("email",),
        lambda emu, args: emu.session_count(args.optional_text("email")),
    ),
    "session_tokens": (
        ("email",),
        lambda emu, args: emu.session_tokens(args.optional_text("email")),
    ),
    "forbid": (
        ("email", "api_key"),
        lambda emu, args: emu.forbid(
            args.optional_text("email"), api_key=args.optional_text("api_key")
        ),
    ),
    "unforbid": (
        ("email", "api_key"),
        lambda emu, args: emu.unforbid(
            args.optional_text("email"), api_key=args.optional_text("api_key")
        ),
    ),
    "inject": (
        ("fault", "path", "count"),
        lambda emu, args: emu.inject(
            args.fault("fault"),
            path=args.optional_text("path"),
            count=args.optional_integer("count"),
        ),
    ),
    "clear_faults": ((), lambda emu, args: emu.clear_faults()),
    "release": ((), lambda emu, args: emu.release()),
    "requests": ((), lambda emu, args: [record.to_json() for record in emu.requests]),
    "clear_requests": ((), lambda emu, args: emu.clear_requests()),
    "wait_for_hung": (
        ("count", "timeout"),
        lambda emu, args: emu.wait_for_hung(args.integer("count", 1), args.number("timeout", 5.0)),
    ),
    "wait_for_requests": (
        ("count", "timeout"),
        lambda emu, args: emu.wait_for_requests(args.integer("count"), args.number("timeout", 5.0)),
    ),
}


class _ControlServer(ThreadingUnixStreamServer):
    daemon_threads = True
    # Not joined on close: see ConduceEmulator.close.
    block_on_close = False

    def __init__(self, path: str, emulator: ConduceEmulator) -> None:
        self.emulator = emulator
        self.path = path
        super().__init__(path, _ControlHandler)

    def server_bind(self) -> None:
        super().server_bind()
        # The directory (0700) already keeps others out; this keeps the socket private
        # should it ever be moved or the directory's mode be loosened.
        os.chmod(self.path, 0o600)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("emulator control handler failed", exc_info=True)


class _ControlHandler(BaseHTTPRequestHandler):
    # HTTP/1.0: one call per connection, so that a call blocked in wait_for_* never holds
    # up another; connecting to a Unix socket costs next to nothing.
    server_version = "ConduceEmulatorControl/1"
    sys_version = ""
    server: _ControlServer

    def setup(self) -> None:
        super().setup()
        # A client that connects and goes silent must not pin a thread forever.
        self.connection.settimeout(self.server.emulator._io_timeout)

    def log_message(self, format: str, *args: Any) -> None:
        # Not address_string(): a Unix socket peer has no address tuple. The request line
        # carries method and path only; the token travels in a header and is never logged.
        log.debug("control: " + format, *args)

    def do_POST(self) -> None:
        self._serve()

    def do_GET(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def _serve(self) -> None:
        # The body is read first, whatever the answer: closing a Unix socket with unread
        # data makes the peer's next read fail with ECONNRESET instead of seeing our answer.
        body = self._read_body()
        if body is None:
            return
        if not self._authorised():
            self._reply(
                401,
                {"error": "Unauthorized", "message": "send Authorization: Bearer <control token>"},
                **{"WWW-Authenticate": "Bearer"},
            )
            return
        if self.command != "POST":
            self._reply(405, {"error": "MethodNotAllowed", "message": "use POST"}, Allow="POST")
            return
        full_path = urlsplit(self.path).path
        name = (
            full_path.removeprefix(CONTROL_PREFIX) if full_path.startswith(CONTROL_PREFIX) else ""
        )
        entry = _CONTROL_CALLS.get(name)
        if entry is None:
            self._reply(404, {"error": "NotFound", "message": f"no control call {full_path}"})
            return
        try:
            document: object = json.loads(body or b"{}")
        except (ValueError, RecursionError):
            document = None
        if not isinstance(document, dict):
            self._reply(400, {"error": "ValueError", "message": "the body must be a JSON object"})
            return
        allowed, call = entry
        try:
            result = call(self.server.emulator, _Arguments(document, allowed))
        except (ValueError, KeyError, TypeError) as error:
            # What the in-process method would have raised, so the remote caller can raise
            # the same type. args[0], not str(): str() of a KeyError adds quotes.
            message = str(error.args[0]) if error.args else ""
            self._reply(400, {"error": type(error).__name__, "message": message})
            return
        self._reply(200, {"result": result})

    def _authorised(self) -> bool:
        expected = self.server.emulator._control_token
        scheme, _, token = str(self.headers.get("Authorization") or "").partition(" ")
        # compare_digest: no timing hint about the token. Bytes, as it refuses non-ASCII str.
        return (
            expected is not None
            and scheme.lower() == "bearer"
            and hmac.compare_digest(token.strip().encode(), expected.encode())
        )

    def _read_body(self) -> bytes | None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= _MAX_CONTROL_BODY:
            self._reply(400, {"error": "ValueError", "message": "bad or oversized body"})
            return None
        return self.rfile.read(length) if length else b""

    def _reply(self, status: int, document: object, **headers: str) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
