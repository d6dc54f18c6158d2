"""The HTTP socket: Conduce calls made *for* tools, with credentials they never see.

A tool sends plain HTTP/1.1 to ``http.sock`` (``curl --unix-socket``, or
:func:`keyagent.http_session`); the ``Host`` header names the Conduce host. For each request,
top to bottom:

1. :func:`route` decides whether the path may be forwarded at all: only the API
   (``/conduce/api/...`` and ``/api/...``), never the endpoints that make, list or end
   credentials (those are the agent's own business: ``keyagent-ctl`` does them);
2. the agent picks credentials on its event loop (:meth:`Agent.authorize_proxy`, which may
   ask the user through askpass first) and lends a :class:`~keyagent.grant.Grant`;
3. the request goes to ``https://HOST`` with the tool's ``Authorization``/``Cookie`` headers
   replaced by the grant's (:mod:`keyagent.forward`), bodies streaming both ways;
4. the answer comes back with ``Set-Cookie`` and anything carrying a credential removed.

Errors the agent itself produces are JSON ``{"error": {"code", "message"}}`` with an
``X-Keyagent-Error: CODE`` header, so a tool can tell them from the service's answers.

This runs in the agent's HTTP workers (:mod:`keyagent.proxy_worker`), processes of their
own: parsing tools' HTTP and streaming bodies never takes the agent's interpreter lock or
CPU from its event loop, and a worker holds only the credentials it was lent. Each
connection runs on a thread of its own (:meth:`Proxy.serve`); whatever needs the agent's
state goes through a :class:`Lender`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus
from typing import TYPE_CHECKING, Final, Protocol
from urllib.parse import unquote, urlsplit

from keyagent.effects import log_internal
from keyagent.errors import (
    BadRequest,
    Busy,
    Forbidden,
    Internal,
    KeyagentError,
    NotFound,
    RemoteError,
    Timeout,
)
from keyagent.httpwire import ClientGone, Head, HttpConnection, Malformed, Stalled
from keyagent.log import get_logger
from keyagent.rules import has_control_characters, host_problem, user_problem

if TYPE_CHECKING:
    from keyagent.forward import Answer, Upstream
    from keyagent.grant import Grant
    from keyagent.proxy_worker import FlightBoard
    from keyagent.tls import HttpSettings

__all__ = ["METHODS", "Lender", "Proxy", "Route", "error_answer", "route"]

log = get_logger("keyagent.proxy")

METHODS: Final = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"})
BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
"""Methods whose request is sent with a Content-Length even when the tool sent no body."""
NO_BODY_METHODS: Final = frozenset({"GET", "HEAD"})
"""Methods whose request may not carry a body here. A body means nothing to them (RFC 9110,
9.3.1-2), so a service may leave it unread and take it for the next request on the pooled
connection: the next request the agent sends there, with its credential, would then become
the body or the headers of one the tool wrote (request smuggling)."""
FORBIDDEN_IN_TARGET: Final = frozenset("# \t")
ONCE_ONLY: Final = frozenset({"x-keyagent-user", "x-keyagent-key-id", "expect"})
"""Headers a request may carry once: the agent does not guess which of two was meant."""
MAX_AUDITED_PATH: Final = 512
"""Characters of a path kept in an audit entry; a longer one is cut, and says so."""
REPLAYABLE: Final = 64 * 1024
"""Request bodies up to this size are read before sending, so that a request the service
refuses because the session just expired can be sent again with an API key. Longer bodies
stream, and such a request is answered as the service answered it."""
STATUS: Final = {
    "bad_request": 400,
    "login_required": 401,
    "session_expired": 401,
    "forbidden": 403,
    "denied": 403,
    "not_found": 404,
    "ambiguous": 409,
    "too_large": 413,
    "locked": 423,
    "remote_error": 502,
    "remote_unreachable": 502,
    "tls_error": 502,
    "busy": 503,
    "timeout": 504,
}
"""The HTTP status of each error code the agent answers with; any other code is 500."""
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "host",
        "content-length",
    }
)
"""Headers about one connection, not the message: each side sets its own."""
TOOL_CREDENTIALS: Final = frozenset({"authorization", "cookie", "proxy-authorization"})
"""Dropped from every request: the only credentials sent are the agent's."""
REROUTING: Final = frozenset(
    {
        "x-original-url",
        "x-rewrite-url",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-server",
        "x-original-host",
        "x-host",
        "x-real-ip",
    }
)
"""Dropped from every request: front ends that honour them route a request by them rather
than by its line (IIS's URL Rewrite, some frameworks' method overrides), which would let a
tool reach a credential endpoint the path check refused, with the agent's credential."""
ANSWER_CREDENTIALS: Final = frozenset(
    {"set-cookie", "set-cookie2", "authorization", "proxy-authorization", "www-authenticate"}
    | {"proxy-authenticate", "authentication-info", "proxy-authentication-info"}
)
"""Dropped from every answer: a tool must not learn a session from the service either."""
CREDENTIAL_ENDPOINTS: Final = {
    ("user", "login"): "keyagent-ctl login",
    ("user", "logout"): "keyagent-ctl logout",
    ("apikeys", "create"): "keyagent-ctl create",
    ("apikeys", "list"): "keyagent-ctl list --remote",
    ("apikeys", "delete"): "keyagent-ctl remove",
}


_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""An HTTP header name (RFC 9110's token)."""
_BAD_ESCAPE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})|%25(?:2[eEfF]|5[cC]|25)")
"""A % that starts no escape, or an escaped % that escapes a dot, a slash, a backslash or a
% again."""
_BARE: Final = re.compile(r"\.[^.]*$|[. ]+$")
"""What some servers ignore at the end of a path segment: a ".format" suffix, dots, spaces."""


class OutsideApi(NotFound):
    """The path is not one the HTTP socket forwards (``not_found``, answered with 404)."""


class UnmetExpectation(BadRequest):
    """An ``Expect`` other than ``100-continue`` (``bad_request``, answered with 417)."""


class Route:
    """Where a request goes: host, the target as the tool wrote it, and the account asked
    for (``X-Keyagent-User``) and key (``X-Keyagent-Key-Id``)."""

    __slots__ = ("host", "key_id", "path", "target", "user")

    def __init__(
        self, host: str, target: str, path: str, user: str | None, key_id: str | None
    ) -> None:
        self.host = host
        self.target = target
        self.path = path  # without the query string: what the audit log shows
        self.user = user
        self.key_id = key_id


MAX_TRIES: Final = 4
"""Most times a request is sent: after a 401, the agent lends an expired session's
replacement, then up to three held keys in all (keyagent.agent.MAX_KEY_ATTEMPTS)."""


class _Flight:
    """A request on its way to the service or back, until its audit entry is sent: if the
    agent stops first, :meth:`Proxy.cut_all` records it instead."""

    __slots__ = ("grant", "head", "peer", "slot", "started", "status", "where")

    def __init__(self, peer: int, head: Head, where: Route, grant: Grant) -> None:
        self.started = time.monotonic()
        self.peer = peer
        self.head = head
        self.where = where
        self.grant = grant
        self.status: int | None = None
        """The service's status, once its answer's head is here."""
        self.slot: int | None = None
        """Its slot on the worker's flight board, if it has one."""

    def entry(self) -> dict[str, str | int | None]:
        """Its audit fields, as they stand (see :func:`_fields`)."""
        return _fields(self.head, self.where, self.status, self.grant)


def route(head: Head) -> Route:
    """Check a request head; raise the error a tool gets if it cannot be forwarded."""
    if head.method not in METHODS:
        # Named when it is short (TRACE, CONNECT): never kilobytes of the tool's bytes back.
        method = head.method if len(head.method) <= 16 else "this long"
        raise BadRequest(f"method {method} is not forwarded; use one of {_methods()}")
    target = head.target
    if not target.isascii() or any(char in target for char in FORBIDDEN_IN_TARGET):
        # A fragment is never part of a request target: refused rather than guessed at, as
        # are characters h11 would refuse to send.
        raise BadRequest("the request target holds '#', spaces or non-ASCII; escape them")
    host_header = head.get("host")
    if target.lower().startswith(("http://", "https://")):  # absolute form: its path counts
        try:
            parts = urlsplit(target)
        except ValueError:
            raise BadRequest("the request target is not a valid URL") from None
        if parts.username is not None or parts.password is not None:
            raise BadRequest("the request target may not carry a user or password")
        if host_header is not None and parts.netloc.lower() != host_header.lower():
            raise BadRequest("the Host header and the request target name different hosts")
        host_header = parts.netloc
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if host_header is None or not host_header:
        raise BadRequest("the request has no Host header; it names the Conduce host")
    once = [name for name, _ in head.headers if name in ONCE_ONLY]  # one pass: usually none
    for name in set(once):
        if once.count(name) > 1:
            raise BadRequest(f"the request has more than one {_titled(name)} header; send one")
    expect = head.get("expect")
    if expect is not None and expect.strip().lower() != "100-continue":
        raise UnmetExpectation("Expect: 100-continue is the only expectation met here")
    if head.method in NO_BODY_METHODS and (head.chunked or head.content_length):
        raise BadRequest(
            f"a {head.method} request may not have a body here (a service may leave it"
            " unread, and take it for the next request); send it without one"
        )
    host = host_header.lower()
    problem = host_problem(host)
    if problem is not None:
        raise BadRequest(f"the Host header is not a Conduce host: {problem}")
    path = target.split("?", 1)[0]
    _check_path(path)  # and the target goes out as it is (keyagent.forward)
    user = head.get("x-keyagent-user")
    if user is not None:
        try:  # the header's bytes, read as Latin-1 as HTTP has it: an account is UTF-8
            user = user.encode("latin-1").decode()
        except UnicodeDecodeError:
            raise BadRequest(
                "X-Keyagent-User is not valid UTF-8; send the account as UTF-8"
            ) from None
        if user_problem(user) is not None:
            raise BadRequest(f"X-Keyagent-User is not valid: {user_problem(user)}")
    key_id = head.get("x-keyagent-key-id")
    if key_id is not None:
        key_id = key_id.strip().lower()
        if not 4 <= len(key_id) <= 64 or key_id.strip("0123456789abcdef"):
            raise BadRequest("X-Keyagent-Key-Id must be 4 to 64 hex characters of a key id")
    return Route(host, target, path, user, key_id)


def _check_path(path: str) -> None:
    if not path.startswith("/"):
        raise OutsideApi("only paths under /conduce/api/ and /api/ are forwarded")
    if _BAD_ESCAPE.search(path):
        # A % not followed by two hex digits, or an escaped %, ., / or \ escaped again:
        # servers differ on what they make of these, so none is guessed at.
        raise BadRequest("the path holds a bad or doubly escaped %; escape it once, as %XX")
    try:
        decoded = unquote(path, errors="strict")
    except UnicodeDecodeError:  # overlong forms of "." and "/" among them
        raise BadRequest("the path's escapes are not UTF-8; escape UTF-8 bytes") from None
    if has_control_characters(decoded) or "\\" in decoded:
        raise BadRequest("the path holds control characters or a backslash")
    # Compare as a server would resolve it: empty segments (the client's //api/v2/...)
    # collapse, ";parameters" are ignored, case does not matter; dot segments are refused
    # outright rather than resolved.
    segments = [segment.split(";", 1)[0].lower() for segment in decoded.split("/") if segment]
    if any(segment in (".", "..") for segment in segments):
        raise OutsideApi("paths with . or .. segments are not forwarded")
    if segments[:2] == ["conduce", "api"] and len(segments) > 2:
        rest = segments[2:]
    elif segments[:1] == ["api"] and len(segments) > 1:
        rest = segments[1:]
    else:
        raise OutsideApi(
            "only paths under /conduce/api/ and /api/ are forwarded; this is not a Conduce API path"
        )
    # Some servers also take "login.json" for "login" (a format suffix) and ignore trailing
    # dots and spaces; some route past a segment they do not know (a second version, say).
    # So each segment is compared as the first would, and an endpoint anywhere after the
    # prefix is refused.
    rest = [_BARE.sub("", segment) for segment in rest]
    for pair in itertools.pairwise(rest):
        if pair in CREDENTIAL_ENDPOINTS:
            raise _credential_endpoint(CREDENTIAL_ENDPOINTS[pair])
    if "apikeys" in rest:
        raise _credential_endpoint("keyagent-ctl")


def _credential_endpoint(command: str) -> Forbidden:
    return Forbidden(
        "credentials are the agent's business and this endpoint is not forwarded; "
        f"use {command} instead"
    )


def _audited_path(target: str) -> str | None:
    """The path of a refused request's target, for the audit log: never a query, and never
    the user, password or host of an absolute-form target."""
    if target.startswith("/"):
        return target.split("?", 1)[0].split("#", 1)[0]
    try:
        return urlsplit(target).path or None
    except ValueError:
        return None


def _titled(name: str) -> str:
    """A lower-case header name as it is usually written: X-Keyagent-Key-Id."""
    return "-".join(part.capitalize() for part in name.split("-"))


def _methods() -> str:
    return ", ".join(sorted(METHODS))


def error_answer(error: KeyagentError) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers and body of an error the agent itself answers with."""
    body = json.dumps({"error": {"code": error.code, "message": error.message}}).encode()
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("X-Keyagent-Error", error.code),
        ("Cache-Control", "no-store"),
    ]
    status = 417 if isinstance(error, UnmetExpectation) else STATUS.get(error.code, 500)
    return status, headers, body


def _named_by_connection(headers: list[tuple[str, str]]) -> set[str]:
    """The headers a ``Connection`` header names, lower-case: like it, they are about that
    connection only (RFC 9110, 7.6.1), and go no further."""
    return {
        token.strip().lower()
        for name, value in headers
        if name.lower() == "connection"
        for token in value.split(",")
    }


def request_headers(head: Head, grant: Grant) -> list[tuple[str, str]]:
    """The tool's headers without its credentials or connection headers, plus the grant's."""
    named = _named_by_connection(head.headers)
    headers = [
        (name, value)
        for name, value in head.headers
        if name not in HOP_BY_HOP
        and name not in TOOL_CREDENTIALS
        and name not in named
        and name not in REROUTING
        and not name.startswith("x-keyagent-")
    ]
    headers.append(("Host", grant.host))
    if head.content_length is not None:
        headers.append(("Content-Length", str(head.content_length)))
    elif not head.chunked and head.method in BODY_METHODS:
        # An empty body said outright: some front ends answer 411 to a POST without framing.
        headers.append(("Content-Length", "0"))
    headers.append((grant.header, grant.value))
    return headers


def answer_headers(headers: list[tuple[str, str]], grant: Grant) -> list[tuple[str, str]]:
    """The service's headers without credentials or connection headers (Content-Length is
    kept: it describes the body, which passes unchanged), nor ``X-Keyagent-*``: only the
    agent's own errors carry those, so a tool can tell them from the service's answers."""
    secrets = [secret.lower() for secret in grant.secrets()]  # matched case-blind
    named = _named_by_connection(headers)
    kept = []
    for name, raw in headers:
        lower, value = name.lower(), raw.strip(" \t")
        if not _TOKEN.fullmatch(name) or has_control_characters(value):
            continue  # not something HTTP/1.1 lets us pass on
        if lower in ANSWER_CREDENTIALS or (lower in HOP_BY_HOP and lower != "content-length"):
            continue
        if (lower in named and lower != "content-length") or lower.startswith("x-keyagent-"):
            continue
        folded = value.lower()
        if any(secret in folded or secret in lower for secret in secrets):
            continue  # a service echoing the credential back must not hand it to the tool
        kept.append((name, value))
    return kept


class Lender(Protocol):
    """What a :class:`Proxy` asks of the agent, which holds the credentials: in the agent's
    HTTP workers, :class:`keyagent.proxy_worker.AgentLink` asks it over a socket.

    ``conn`` names the tool's connection, as the agent numbered it when it accepted it: the
    agent knows who is at the other end (its pid, uid and program), the worker need not.
    """

    def authorize(self, conn: int, host: str, user: str | None, key_id: str | None) -> Grant:
        """Credentials for one request (:meth:`keyagent.agent.Agent.authorize_proxy`); the
        agent remembers which keys (and logins) the user confirmed on the connection."""

    def session_refused(
        self, conn: int, host: str, user: str, key_id: str | None, *, retry: bool = True
    ) -> Grant | None:
        """The service refused the session: :meth:`keyagent.agent.Agent.proxy_session_refused`
        (without ``retry``, only checked)."""

    def key_refused(
        self, conn: int, host: str, user: str, refused: list[str], *, retry: bool = True
    ) -> Grant | None:
        """The service refused held keys ``refused`` (digests, the last just now):
        :meth:`keyagent.agent.Agent.proxy_key_refused` (without ``retry``, only checked)."""

    def still_good(self, grant: Grant) -> bool:
        """Whether a grant lent earlier would be lent again now, without asking the agent."""

    def audit(self, conn: int, outcome: str, **fields: str | int | None) -> None:
        """Record a proxied request in the agent's audit log (no answer awaited)."""


class Proxy:
    """Serves connections of the HTTP socket, one thread each (see the module doc)."""

    def __init__(
        self,
        lender: Lender,
        settings: HttpSettings,
        *,
        head_timeout: float,
        idle_timeout: float,
        board: FlightBoard | None = None,
    ) -> None:
        self.lender = lender
        self.settings = settings
        self.head_timeout = head_timeout
        self.idle_timeout = idle_timeout
        self.board = board
        """Where each request under way is also posted, for the agent to record if this
        worker dies before it can (see :class:`keyagent.proxy_worker.FlightBoard`)."""
        self._upstream: Upstream | None = None
        self._upstream_made = threading.Lock()
        self._flights: set[_Flight] = set()
        self._stopping = False
        """Set by :meth:`cut_all`: no request leaves after it, as none could be recorded."""
        self._audits = threading.Lock()
        """Held while an entry is sent, so that :meth:`cut_all` and a request ending at
        that moment never both record it, nor neither."""

    @property
    def upstream(self) -> Upstream:
        with self._upstream_made:
            if self._upstream is None:
                from keyagent.forward import Upstream

                self._upstream = Upstream(self.settings)
            return self._upstream

    def serve(self, sock: socket.socket, peer: int) -> None:
        """Answer the requests of one connection until it closes, idles or misbehaves."""
        http = HttpConnection(
            sock,
            head_timeout=self.head_timeout,
            idle_timeout=self.idle_timeout,
            io_timeout=max(self.head_timeout, self.settings.read_timeout),
        )
        lent: dict[tuple[str, str | None, str | None], Grant] = {}
        try:
            while True:
                try:
                    head = http.next_request()
                except (Malformed, Stalled) as error:  # no request to name: an entry all the same
                    code = Timeout.code if isinstance(error, Stalled) else BadRequest.code
                    with self._audits:
                        self.lender.audit(peer, code, **_fields(None, None, None, None))
                    raise
                if head is None or not self._exchange(http, head, peer, lent):
                    break
                if not http.reusable:
                    break
        except Malformed as error:
            if not http.answered:
                _, headers, body = error_answer(BadRequest(error.message))
                with contextlib.suppress(ClientGone):
                    http.refuse(error.status, headers, body)
        except Stalled as stalled:  # it may be waiting for an answer: it is told why not
            if not http.answered:
                _, headers, body = error_answer(Timeout(str(stalled)))
                with contextlib.suppress(ClientGone):
                    http.refuse(HTTPStatus.REQUEST_TIMEOUT, headers, body)
        except ClientGone:
            pass
        except Exception as error:  # noqa: BLE001  # a bug: logged, answered, the agent goes on
            log_internal(error)
            if not http.answered:
                status, headers, body = error_answer(Internal())
                with contextlib.suppress(ClientGone, ValueError):
                    http.refuse(status, headers, body)
        finally:
            http.close()

    def _exchange(
        self,
        http: HttpConnection,
        head: Head,
        peer: int,
        lent: dict[tuple[str, str | None, str | None], Grant],
    ) -> bool:
        """One request and its answer; False if the connection must close after it.

        ``lent``: grants already lent on this connection, by account and key asked for."""
        try:
            where = route(head)
        except KeyagentError as error:
            self._audit(peer, head, None, error)
            return self._refuse(http, head, error)
        try:
            grant = self._grant(peer, where, lent)
        except KeyagentError as error:
            self._audit(peer, head, where, error)
            return self._refuse(http, head, error)
        body: bytes | Iterator[bytes]
        replayable = not head.chunked and (head.content_length or 0) <= REPLAYABLE
        # A streamed body is read from the tool as it is sent; a tool that vanishes mid-upload
        # raises ClientGone, which keyagent.forward lets through: not the service failing.
        body = self._read_whole(http, peer, head, where, grant) if replayable else http.body()
        if replayable and not self.lender.still_good(grant):
            # The tool took its time sending the body, and the agent was locked (say) in
            # the meantime: what goes out is what the agent lends now. (A streamed body's
            # request leaves with the head, so it is checked once, before.)
            try:
                grant = self._grant(peer, where, lent)
            except KeyagentError as error:
                self._audit(peer, head, where, error)
                return self._refuse(http, head, error, body_read=True)
        try:
            flight = self._take_off(peer, head, where, grant)
        except Busy as error:
            self._audit(peer, head, where, error)
            return self._refuse(http, head, error, body_read=replayable)
        try:
            return self._forward(http, flight, body, lent, replayable=replayable)
        except ClientGone as gone:
            # The tool left (or stalled) mid-way; its request may have reached the service:
            # the key was used all the same.
            self._land(flight, _outcome(gone))
            raise
        except Malformed:  # a streamed body went wrong mid-way: serve answers 400
            self._land(flight, BadRequest.code)
            raise
        except BaseException:
            self._land(flight, Internal.code)  # a bug (logged by serve): still recorded
            raise

    def _read_whole(
        self, http: HttpConnection, peer: int, head: Head, where: Route, grant: Grant
    ) -> bytes:
        """A body small enough to keep, read before the request leaves. A tool that leaves
        (or sends a malformed body) first is recorded all the same, with the credential
        the request was to use: ``cut`` (or ``bad_request``), and no status."""
        try:
            return b"".join(http.body())
        except (ClientGone, Malformed) as error:
            outcome = _outcome(error) if isinstance(error, ClientGone) else BadRequest.code
            with self._audits:
                self.lender.audit(peer, outcome, **_fields(head, where, None, grant))
            raise

    def _forward(
        self,
        http: HttpConnection,
        flight: _Flight,
        body: bytes | Iterator[bytes],
        lent: dict[tuple[str, str | None, str | None], Grant],
        *,
        replayable: bool,
    ) -> bool:
        """Send ``flight``'s request with its grant; pass the answer on."""
        head, where = flight.head, flight.where
        try:
            answer = self.upstream.send(
                head.method, where.host, where.target, request_headers(head, flight.grant),
                body, chunked=head.chunked,
            )  # fmt: skip
            self._answered(flight, answer.status)
            if answer.status == 401 and replayable:
                answer = self._try_again(flight, answer, body, lent)
            elif answer.status == 401:  # its body is gone: the next request gains from a check
                self._check_refused(flight)
        except KeyagentError as error:
            if flight.status is None:  # the service was not reached, or did not answer
                self._land(flight, error.code)
            else:  # it answered a try; another was then refused: an entry each
                self._land(flight, "ok")
                self._audit(flight.peer, head, where, error)
            if http.answered:
                return False
            return self._refuse(http, head, error, body_read=replayable)
        complete = False
        try:
            headers = answer_headers(answer.headers, flight.grant)
            # Recorded before the answer's last bytes leave: a tool that has its answer
            # finds the entry in the log (keyagent-ctl log right after curl, say).
            http.respond(
                answer.status, headers, answer.body(where.host),
                before_end=lambda: self._land(flight, "ok"),
            )  # fmt: skip
            complete = True
        except ValueError:  # headers h11 will not send, though filtered: answer 502
            self._land(flight, "remote_error")
            return self._refuse(
                http, head, RemoteError(f"{where.host} sent an answer that cannot be passed on")
            )
        except KeyagentError as error:  # the service dropped the answer mid-way
            self._land(flight, error.code)
            return False
        finally:
            answer.finish(complete)
        log.debug(
            "proxied %s %s to %s: %d in %.3fs",
            head.method, where.path, where.host, answer.status,
            time.monotonic() - flight.started,
        )  # fmt: skip
        return True

    def _try_again(
        self,
        flight: _Flight,
        answer: Answer,
        body: bytes | Iterator[bytes],
        lent: dict[tuple[str, str | None, str | None], Grant],
    ) -> Answer:
        """The service answered 401 to ``flight``: perhaps the session expired, or the key
        was revoked. The agent checks, and if so lends what it would now (the next held
        key, or login_required) for another try, as its own calls do. Each try is an
        audit entry of its own, naming what it used. Returns the last answer: a 401 is
        passed on as it is once the agent lends nothing else."""
        head, where = flight.head, flight.where
        refused: list[str] = []
        for _ in range(MAX_TRIES - 1):  # the agent ends it sooner; a bound all the same
            if answer.status != 401:
                break
            try:
                renewed = self._renewed(flight, refused)
            except BaseException:
                answer.finish(complete=False)  # its connection is closed, not left open
                raise
            if renewed is None or not self.lender.still_good(renewed):
                # Nothing else to try; or the agent changed since it lent this (a lock, a
                # key forgotten): the tool gets the 401, and its next request what the
                # agent lends then.
                return answer
            answer.finish(complete=False)
            self._relaunch(flight, renewed)
            lent[(where.host, where.user, where.key_id)] = renewed
            answer = self.upstream.send(
                head.method, where.host, where.target, request_headers(head, renewed), body,
                chunked=False,
            )  # fmt: skip
            self._answered(flight, answer.status)
        return answer

    def _check_refused(self, flight: _Flight) -> None:
        """Have the agent check the credential the service refused for ``flight`` (noting a
        key refused, or the session expired) without lending another: the request cannot
        be sent again. Whatever the check comes to, the tool gets the service's 401."""
        grant, where = flight.grant, flight.where
        with contextlib.suppress(KeyagentError):
            if grant.session:
                self.lender.session_refused(
                    flight.peer, where.host, grant.user, where.key_id, retry=False
                )
            elif grant.digest is not None:
                self.lender.key_refused(
                    flight.peer, where.host, grant.user, [grant.digest], retry=False
                )

    def _renewed(self, flight: _Flight, refused: list[str]) -> Grant | None:
        """What to try again with after the service answered 401 to ``flight``'s grant:
        the agent's answer (None: pass the 401 on). A key the tool named
        (``X-Keyagent-Key-Id``) is never swapped for another; ``refused`` gathers the keys
        refused so far for this request."""
        grant, where = flight.grant, flight.where
        if grant.session:
            return self.lender.session_refused(flight.peer, where.host, grant.user, where.key_id)
        if grant.digest is None:
            return None
        if where.key_id is not None:  # checked (and noted), never swapped
            self._check_refused(flight)
            return None
        refused.append(grant.digest)
        return self.lender.key_refused(flight.peer, where.host, grant.user, refused)

    def _grant(
        self, peer: int, where: Route, lent: dict[tuple[str, str | None, str | None], Grant]
    ) -> Grant:
        """What the connection lent for this account and key before, while still good; else
        what the agent lends now (remembered for the connection's next requests)."""
        asked = (where.host, where.user, where.key_id)
        grant = lent.get(asked)
        if grant is None or not self.lender.still_good(grant):
            grant = lent[asked] = self.lender.authorize(peer, where.host, where.user, where.key_id)
        return grant

    @staticmethod
    def _refuse(
        http: HttpConnection, head: Head, error: KeyagentError, *, body_read: bool = False
    ) -> bool:
        status, headers, body = error_answer(error)
        has_body = head.chunked or bool(head.content_length)
        # An unmet expectation says the tool and the agent disagree on the exchange itself.
        if (has_body and not body_read) or isinstance(error, UnmetExpectation):
            http.refuse(status, headers, body)  # its body is never read: close after
            return False
        if not has_body:
            http.finish_request()  # h11 sees the request end: the connection stays usable
        http.respond(status, headers, body)
        return True

    def _take_off(self, peer: int, head: Head, where: Route, grant: Grant) -> _Flight:
        """``head``'s request, about to leave with ``grant``; Busy if the agent is stopping."""
        flight = _Flight(peer, head, where, grant)
        with self._audits:
            if self._stopping:
                raise Busy("the agent is stopping; retry once it runs again")
            self._flights.add(flight)
            self._post(flight)
        return flight

    def _relaunch(self, flight: _Flight, grant: Grant) -> None:
        """``flight`` goes again with ``grant`` after a 401: the try made is recorded (with
        the credential it used and the status it got), and the flight goes on with the new
        grant. Busy if the agent is stopping (:meth:`cut_all` recorded the flight)."""
        with self._audits:
            if flight not in self._flights:
                raise Busy("the agent is stopping; retry once it runs again")
            self._record(flight, "ok")
            flight.grant, flight.status = grant, None
            self._post(flight)

    def _answered(self, flight: _Flight, status: int) -> None:
        """The service answered ``flight`` with ``status``: its board slot says so too, so
        a worker killed mid-answer leaves the status for the agent."""
        with self._audits:
            flight.status = status
            if flight.slot is not None and self.board is not None and flight in self._flights:
                flight.slot = self.board.replace(
                    flight.slot, {"conn": flight.peer, **flight.entry()}
                )

    def _land(self, flight: _Flight, outcome: str) -> None:
        """Record how ``flight`` ended, unless :meth:`cut_all` recorded it already."""
        with self._audits:
            if flight not in self._flights:
                return
            self._flights.discard(flight)
            self._record(flight, outcome)

    def cut_all(self) -> None:
        """The agent is stopping, and with it this worker: record each request still on
        its way as ``cut`` (what the service answered, if it has). Requests that end
        afterwards are not recorded again."""
        with self._audits:
            self._stopping = True
            flights, self._flights = self._flights, set()
            for flight in flights:
                self._record(flight, "cut")

    def _post(self, flight: _Flight) -> None:
        """Put ``flight`` on the board, as the entry it would get if cut."""
        if self.board is not None:
            flight.slot = self.board.post({"conn": flight.peer, **flight.entry()})

    def _record(self, flight: _Flight, outcome: str) -> None:
        """Send ``flight``'s entry, then take it off the board (were this worker killed in
        between, the agent would record it twice rather than not at all)."""
        self.lender.audit(flight.peer, outcome, **flight.entry())
        if flight.slot is not None and self.board is not None:
            self.board.clear(flight.slot)
            flight.slot = None

    def _audit(self, peer: int, head: Head, where: Route | None, error: KeyagentError) -> None:
        """Record a request refused before it was sent (no grant was used); a refusal by a
        key's rules names the key."""
        fields = _fields(head, where, None, None)
        if error.subject is not None:
            fields["key_id"], fields["host"], fields["user"] = error.subject
        with self._audits:
            self.lender.audit(peer, error.code, **fields)


def _outcome(gone: ClientGone) -> str:
    """A request's audit outcome when its tool went away mid-way: ``timeout`` if it stalled
    (and was told so), else ``cut``."""
    return Timeout.code if isinstance(gone, Stalled) else "cut"


def _fields(
    head: Head | None, where: Route | None, status: int | None, grant: Grant | None
) -> dict[str, str | int | None]:
    """A proxied request's audit fields: never the query string or a header. No ``head``:
    what the tool sent was not a request (malformed HTTP)."""
    if where is not None:
        path: str | None = where.path
    else:
        path = None if head is None else _audited_path(head.target)
    if path is not None and len(path) > MAX_AUDITED_PATH:
        path = path[:MAX_AUDITED_PATH] + "...(cut)"
    return {
        "method": None if head is None else head.method,
        "path": path,
        "status": status,
        "host": where.host if where is not None else None,
        "key_id": grant.key_id if grant is not None else None,
        "user": grant.user if grant is not None else (where.user if where is not None else None),
    }
