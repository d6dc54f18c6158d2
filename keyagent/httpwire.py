"""HTTP/1.1 on the HTTP socket's connections, framed by h11 over blocking sockets.

This module owns h11, as :mod:`keyagent.protocol` owns the JSON-lines format. On a tool's
connection (:class:`HttpConnection`, h11 as the server) it turns bytes into request heads
and body chunks, and responses into bytes; on a connection to the service
(:class:`ServiceConnection`, h11 as the client, over the TLS socket
:mod:`keyagent.forward` made) the reverse. It knows nothing of Conduce or credentials (that
is :mod:`keyagent.proxy`). h11 does the parsing, which is where hand-written HTTP goes
wrong (request smuggling through conflicting lengths, header folding, which h11 joins into
one value as RFC 9112 allows, oversized heads); the heads passed on are written anew, never
as received. This module adds the deadlines a slow or idle tool is cut by:

* a request head must arrive whole within ``head_timeout`` of its first byte;
* between requests a keep-alive connection may idle for ``idle_timeout``;
* any single read of a body, or write of an answer, must progress within ``io_timeout``.

Each connection is served by a thread of its own (in an HTTP worker process, see
:mod:`keyagent.proxy_worker`), so blocking here blocks that tool only.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from typing import Final

import h11

__all__ = [
    "BadAnswer", "ClientGone", "Head", "HttpConnection", "Malformed", "RequestHead",
    "ServiceConnection", "Stalled",
]  # fmt: skip

RECV: Final = 64 * 1024
"""Bytes read at a time, from a tool or from the service."""
MAX_HEAD: Final = 16 * 1024
"""Largest request head (request line and headers): a larger one is answered 431 and the
connection closed, whether it is still incomplete (h11 stops waiting for it) or arrived
whole in one read (measured once parsed)."""
LINGER: Final = 30.0
"""Longest a connection closed before its request's end is drained (see
:meth:`HttpConnection.close`)."""
MAX_ANSWER_HEAD: Final = 64 * 1024
"""Largest status line and headers accepted from the service (http.client's limit)."""


_PLAIN: Final = (
    ("Missing mandatory Host", "the request has no Host header; it names the Conduce host"),
    ("Found multiple Host", "the request has more than one Host header; send one"),
    (
        "illegal request line",
        "the request line is not METHOD TARGET HTTP/1.1 (the target must be ASCII, without"
        " spaces: escape them)",
    ),
    ("illegal header line", "a header line is not NAME: VALUE"),
    ("continuation line", "the first header line starts with a space; remove it"),
    ("illegal chunk header", "a chunk of the request body is malformed"),
    ("conflicting Content-Length", "the request has Content-Length headers that disagree"),
    ("Content-Length", "the Content-Length header is not one decimal number"),
    ("Transfer-Encoding", "only Transfer-Encoding: chunked is accepted"),
)
"""h11's words for what went wrong, and the agent's: h11's may quote the tool's bytes (a
header line with its credential, say), which are never echoed back or logged. An error not
listed here (another h11 version's words) gets a general message."""


MAX_INTERIM: Final = 16
"""Interim (1xx) answers taken before the final one; past them, the answer is refused."""
MAX_EMPTY_LINES: Final = 64
"""Bytes of empty lines (CR, LF) ignored before a request line; past them, a 400."""
TOO_LARGE_HEAD: Final = (
    f"the request head is larger than {MAX_HEAD // 1024} KiB; send fewer headers"
)


def _plain(error: h11.RemoteProtocolError) -> str:
    """What the tool is told about ``error``."""
    if error.error_status_hint == 431:
        return TOO_LARGE_HEAD
    text = str(error)
    for words, message in _PLAIN:
        if words in text:
            return message
    return "the request is not valid HTTP/1.1; fix the client"


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


class ClientGone(Exception):
    """The tool closed the connection, reset it, or was too slow: nothing more is sent."""


class Stalled(ClientGone):
    """The tool stopped sending part way through a request, for longer than it may: it may
    be waiting for an answer all the same (a body shorter than its Content-Length, say),
    so it is told (408) when nothing was answered yet. The message is the agent's words."""


class Malformed(Exception):
    """The tool sent something that is not HTTP/1.1. ``status`` is the answer's: 400, 431
    for a head too long, 501 for a transfer coding other than chunked, 505 for another
    HTTP version (the code is ``bad_request`` in each case). ``message`` is the agent's
    own words, never the tool's bytes."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Head:
    """A request line and its headers (names lower-case, values as sent)."""

    __slots__ = ("chunked", "content_length", "headers", "method", "target")

    def __init__(self, event: h11.Request) -> None:
        self.method: str = event.method.decode("ascii")
        self.target: str = event.target.decode("ascii", "replace")
        self.headers: list[tuple[str, str]] = [
            (name.decode("ascii"), value.decode("latin-1")) for name, value in event.headers
        ]
        self.content_length: int | None = None
        self.chunked = False
        for name, value in self.headers:
            if name == "content-length":
                self.content_length = int(value)  # h11 checked it is one decimal number
            elif name == "transfer-encoding":
                self.chunked = True  # h11 accepts "chunked" only

    def get(self, name: str) -> str | None:
        """The value of header ``name`` (lower-case); None if absent."""
        for header, value in self.headers:
            if header == name:
                return value
        return None

    def __repr__(self) -> str:  # headers may carry credentials: never shown
        return f"Head({self.method} {self.target.split('?', 1)[0]!r})"


class HttpConnection:
    """One tool's connection: read requests, stream bodies, write answers."""

    def __init__(
        self, sock: socket.socket, *, head_timeout: float, idle_timeout: float, io_timeout: float
    ) -> None:
        self.sock = sock
        self.head_timeout = head_timeout
        self.idle_timeout = idle_timeout
        self.io_timeout = io_timeout
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._head_only = False
        """Whether the request being answered is a HEAD: its answer has a head only."""

    # --- reading ---------------------------------------------------------------------------

    def next_request(self) -> Head | None:
        """The next request's head; None once the tool is done (closed, or idle too long)."""
        conn = self._h11
        self._head_only = False  # until this request says it is a HEAD
        skipped = 0  # bytes of empty lines before it
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            pending, closed = conn.trailing_data
            if pending[:1] in (b"\r", b"\n"):
                # Empty lines that came with the last body (a CRLF after it): h11 keeps
                # them as this request's start, so a parser of its own gets the rest.
                stripped = pending.lstrip(b"\r\n")
                skipped = len(pending) - len(stripped)
                conn = self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
                conn.receive_data(stripped)
                if closed:
                    conn.receive_data(b"")
        if skipped > MAX_EMPTY_LINES:
            raise Malformed(400, "too many empty lines before the request line")
        deadline: float | None = None  # set once the head's first byte is here
        while True:
            event = self._next_event()
            if isinstance(event, h11.Request):
                self._head_only = event.method == b"HEAD"  # a refusal below is a head too
                if event.http_version not in (b"1.1", b"1.0"):  # h11 takes any 1.x or 2.0
                    raise Malformed(505, "only HTTP/1.1 (and 1.0) is spoken here")
                # The request line, and a name, ": ", a value and CRLF per header.
                size = len(event.method) + len(event.target) + 12
                size += sum(len(name) + len(value) + 4 for name, value in event.headers)
                if size > MAX_HEAD:
                    raise Malformed(431, TOO_LARGE_HEAD)
                head = Head(event)
                if head.chunked and head.content_length is not None:
                    # Legal (chunked wins), but the classic request-smuggling shape: refused.
                    raise Malformed(400, "a request may not have both Content-Length and chunks")
                return head
            if isinstance(event, h11.ConnectionClosed):
                return None
            if event is not h11.NEED_DATA:
                raise Malformed(400, "expected a request")
            if deadline is None and conn.trailing_data[0]:
                deadline = time.monotonic() + self.head_timeout
            if deadline is None:
                timeout = self.idle_timeout
            else:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    raise Stalled(self._stalled(in_body=False))
            try:
                data = self._recv(timeout, in_body=False)
            except ClientGone:
                if deadline is None:
                    return None  # idle between requests: an orderly end
                raise
            if deadline is None and data:
                # Empty lines before a request line are ignored (RFC 9112, 2.2: some clients
                # send CRLF after a body); h11 would call them a missing request line.
                stripped = data.lstrip(b"\r\n")
                skipped += len(data) - len(stripped)
                if skipped > MAX_EMPTY_LINES:
                    raise Malformed(400, "too many empty lines before the request line")
                data = stripped
                if not data:
                    continue  # nothing but empty lines yet: still waiting for a request
            if deadline is None and data:
                deadline = time.monotonic() + self.head_timeout
            self._h11.receive_data(data)

    def body(self) -> Iterator[bytes]:
        """The request body, a chunk at a time (nothing for a request without one).

        A tool that sent ``Expect: 100-continue`` is told to go on here, so calling this
        means the request was accepted: a refused one never uploads its body.
        """
        conn = self._h11
        if conn.they_are_waiting_for_100_continue:
            self._write([self._bytes(h11.InformationalResponse(status_code=100, headers=[]))])
        while True:
            event = self._next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            elif event is h11.NEED_DATA:
                data = self._recv(self.io_timeout, in_body=True)
                if not data:
                    raise ClientGone("closed mid-body")
                conn.receive_data(data)
            else:
                raise Malformed(400, "the request body is malformed")

    def finish_request(self) -> None:
        """Read the end of a request that has no body (h11 needs it to see the request end
        before another may follow); nothing to do once its body was read."""
        if self._h11.their_state is h11.SEND_BODY:
            for _ in self.body():
                pass

    def _next_event(self) -> object:
        try:
            return self._h11.next_event()
        except h11.RemoteProtocolError as error:
            raise Malformed(error.error_status_hint, _plain(error)) from None

    def _stalled(self, *, in_body: bool) -> str:
        """What a tool that stopped sending its request's head, or its body, is told."""
        if in_body:
            return (
                f"no more of the request's body came for {self.io_timeout:g} s; send all of "
                "the body its head announces"
            )
        return (
            f"the request's head did not arrive whole within {self.head_timeout:g} s; send "
            "each request's head at once"
        )

    def _recv(self, timeout: float, *, in_body: bool) -> bytes:
        """What the tool sent next (of a request's body, or of what precedes it);
        :class:`Stalled` if nothing came within ``timeout``."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            return self.sock.recv(RECV)
        except TimeoutError:
            raise Stalled(self._stalled(in_body=in_body)) from None
        except OSError:
            raise ClientGone("connection lost") from None

    # --- writing ---------------------------------------------------------------------------

    @property
    def answered(self) -> bool:
        """Whether an answer (or its head) has been sent for the current request."""
        return self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE)

    @property
    def reusable(self) -> bool:
        """Whether another request may follow on this connection."""
        return self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE

    def respond(
        self,
        status: int,
        headers: Iterable[tuple[str, str]],
        body: bytes | Iterable[bytes] = b"",
        *,
        close: bool = False,
        before_end: Callable[[], object] | None = None,
    ) -> None:
        """Send an answer; an iterable body is streamed (chunked unless a Content-Length is
        among ``headers``), a ``bytes`` one is left out after a HEAD. An error raised by
        ``body`` mid-way propagates after the connection is marked unusable: the tool sees
        a cut answer, never a wrong one.
        ValueError if ``status`` and ``headers`` are not a valid answer (nothing is sent).
        With ``close``, or before the request's body was read to its end (the service
        answered early), the answer says ``Connection: close``: no request follows it.
        ``before_end`` is called once the whole body is in hand, before its last bytes are
        written: what it records is there by the time the tool has the answer.

        What is ready leaves in one write: the head with the body's first chunk, and the
        last chunk with the end, so a small answer costs the tool one read, not two. An
        empty chunk from ``body`` means its source is about to wait: what is held goes out
        first, as does anything beyond :data:`RECV` bytes."""
        encoded = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
        if close or self._h11.their_state is h11.SEND_BODY:
            encoded.append((b"Connection", b"close"))
        try:
            response = h11.Response(status_code=status, headers=encoded, reason=_reason(status))
        except h11.LocalProtocolError as error:
            raise ValueError(f"not a valid HTTP/1.1 answer: {error}") from None
        held = [self._bytes(response)]
        try:
            if isinstance(body, bytes):
                # A HEAD's answer is the head alone, whose Content-Length is the body's
                # that a GET would get (the agent's own answers; the service's has none).
                if body and not self._head_only:
                    held.append(self._bytes(h11.Data(data=body)))
            else:
                size = 0
                for chunk in body:
                    if chunk:
                        held.append(self._bytes(h11.Data(data=chunk)))
                        size += len(chunk)
                    if held and (not chunk or size >= RECV):
                        # Let go before writing: bytes a failed write may have partly sent
                        # are never sent again (the tool would get a whole, wrong body).
                        ready, held, size = held, [], 0
                        self._write(ready)
            held.append(self._bytes(h11.EndOfMessage()))
            if before_end is not None:
                before_end()
        except BaseException:
            with contextlib.suppress(ClientGone):
                self._write(held)  # what was ready and not yet written reaches the tool, cut
            raise
        self._write(held)

    def refuse(self, status: int, headers: Iterable[tuple[str, str]], body: bytes) -> None:
        """Answer a request whose body was not read, and close after it."""
        self.respond(status, headers, body, close=True)

    def _bytes(self, event: h11.Event) -> bytes:
        try:
            return self._h11.send(event) or b""
        except h11.LocalProtocolError as error:
            raise ClientGone(f"cannot send: {error}") from None

    def _write(self, pieces: list[bytes]) -> None:
        data = b"".join(pieces)
        if data:
            self.sock.settimeout(self.io_timeout)
            try:
                self.sock.sendall(data)
            except OSError:
                raise ClientGone("connection lost while answering") from None

    def close(self) -> None:
        """Close the connection. If the request's body was left unread (answered before
        its end), what the tool still sends is first read and dropped until it stops, for
        up to :data:`LINGER` seconds, and no longer than the head's timeout without a byte
        (a lingering close, as front ends do): a tool that uploads the whole body before it
        reads would otherwise get a reset, not the answer."""
        # An OSError (the tool gone, or quiet past the timeout) ends this: it is closing.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
            # Answered mid-request, or refused as malformed: unread bytes would reset it.
            if self._h11.their_state in (h11.SEND_BODY, h11.ERROR) and self.answered:
                deadline = time.monotonic() + LINGER
                while (left := deadline - time.monotonic()) > 0:
                    self.sock.settimeout(min(left, self.head_timeout))
                    if not self.sock.recv(RECV):
                        break
        self.sock.close()


# --- the service's side ---------------------------------------------------------------------


TOO_LARGE_ANSWER_HEAD: Final = f"an answer head larger than {MAX_ANSWER_HEAD // 1024} KiB"


class BadAnswer(Exception):
    """The service sent something that is not an HTTP/1.1 answer; the message says what,
    as the object of "the service sent ...", and never quotes the service's bytes."""


class RequestHead:
    """A request line and headers, checked and ready to send (:meth:`RequestHead.make`)."""

    __slots__ = ("event",)

    def __init__(self, event: h11.Request) -> None:
        self.event = event

    @classmethod
    def make(
        cls, method: str, target: str, headers: Iterable[tuple[str, str]], *, chunked: bool
    ) -> RequestHead:
        """The head of a request with these headers (plus Transfer-Encoding if ``chunked``);
        ValueError if HTTP/1.1 does not allow them. The error's text never holds a value:
        a header may carry a credential."""
        encoded = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
        if chunked:
            encoded.append((b"Transfer-Encoding", b"chunked"))
        try:
            return cls(h11.Request(method=method, target=target, headers=encoded))
        except h11.LocalProtocolError:
            raise ValueError("not a valid HTTP/1.1 request head") from None


class ServiceConnection:
    """One connection to the service: a request at a time, another after it if
    :meth:`reusable`. The socket's errors (OSError, TimeoutError) pass through as they are;
    what the service sends that h11 refuses is :class:`BadAnswer`."""

    __slots__ = ("_early", "_h11", "_held", "heard", "sock")

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_ANSWER_HEAD)
        self._held = b""  # a request head, sent with what follows it
        self._early: h11.Response | None = None  # an answer's head read while sending
        self.heard = False
        """Whether any byte of the current request's answer has come."""

    def send_head(self, head: RequestHead, *, hold: bool) -> None:
        """Send ``head``; with ``hold``, when the body is in hand, it leaves with the body or
        the request's end instead, so a small request is one TLS record, not two. (A
        streamed body's first chunk may be long in coming: its head, and the credential
        checked with it, go at once.)"""
        self.heard = False
        self._held = b""
        self._early = None
        data = self._h11.send(head.event) or b""
        if hold:
            self._held = data
        else:
            self.sock.sendall(data)

    def send_body(self, data: bytes) -> None:
        if data:
            self._send(h11.Data(data=data))

    def end_request(self) -> None:
        self._send(h11.EndOfMessage())

    def answered_early(self) -> bool:
        """Whether the service refused the request while it is still being sent: a final
        answer of 300 or more (a 413 or a 401 to an upload, say), on which a client stops
        sending (RFC 9112, 9.5; curl stops on the same). Reads only what is there, never
        waits; a 1xx is passed over, and an early 2xx is kept while the body goes on. If
        True, the rest of the request is not sent, :meth:`read_head` returns that answer's
        head, and the connection closes after it (it is not :meth:`reusable`)."""
        while self._early is None:
            event = self._next_event(wait=False)
            if isinstance(event, h11.Response):
                self._early = event
            elif isinstance(event, h11.InformationalResponse):
                continue
            elif event is not h11.NEED_DATA or not self._read_ready():
                return False  # nothing yet; or the connection closed, which sending will say
        return self._early.status_code >= 300

    def _read_ready(self) -> bool:
        """Read what the socket holds, without waiting; False if nothing was there."""
        if not self.sock.pending() and not self._readable():
            return False
        timeout = self.sock.gettimeout()
        self.sock.settimeout(0.0)
        try:
            data = self.sock.recv(RECV)
        except (ssl.SSLWantReadError, BlockingIOError):
            return False  # a TLS record not yet whole, or a record with no data in it
        except OSError:
            return False  # the sending that follows meets the same failure and reports it
        finally:
            self.sock.settimeout(timeout)
        self.heard = self.heard or bool(data)
        self._h11.receive_data(data)
        return True

    def read_head(self) -> tuple[int, list[tuple[str, str]]]:
        """The answer's status and headers (names as sent), after any 1xx (at most
        :data:`MAX_INTERIM` of them); an answer cut before its head ends is
        ConnectionResetError, as the socket would say."""
        for _ in range(MAX_INTERIM + 1):
            event: object = self._early or self._next_event()
            self._early = None
            if isinstance(event, h11.Response):
                headers = [
                    (name.decode("latin-1"), value.decode("latin-1"))
                    for name, value in event.headers.raw_items()
                ]
                # h11 bounds only a head still incomplete; one that came whole is measured.
                if sum(len(name) + len(value) + 4 for name, value in headers) > MAX_ANSWER_HEAD:
                    raise BadAnswer(TOO_LARGE_ANSWER_HEAD)
                framing = {name.lower() for name, _ in headers}
                if {"content-length", "transfer-encoding"} <= framing:
                    # Legal (chunks win), and the shape of response splitting: RFC 9112
                    # says to treat it as an error, and a tool could be told either length.
                    raise BadAnswer("an answer with both Content-Length and Transfer-Encoding")
                return event.status_code, headers
            if isinstance(event, h11.ConnectionClosed):
                raise ConnectionResetError("closed before a whole answer head")
            if not isinstance(event, h11.InformationalResponse):
                raise BadAnswer("something other than an answer")
        # A service that sends interim answers without end would hold the tool (and this
        # thread) for as long as it keeps on, each one arriving within the read timeout.
        raise BadAnswer(f"more than {MAX_INTERIM} interim (1xx) answers")

    def read_body(self) -> Iterator[bytes]:
        """The answer's body, a chunk at a time as it arrives; BadAnswer if it ends before
        its framing says. An empty chunk comes before each wait for the service: the
        reader may send on what it holds (:meth:`HttpConnection.respond`)."""
        while True:
            event = self._next_event(wait=False)
            if event is h11.NEED_DATA:
                if not self.sock.pending():  # else the next read returns at once
                    yield b""
                event = self._next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:  # h11 ends a body with EndOfMessage or an error, nothing else
                raise BadAnswer("the answer ended early")

    def reusable(self) -> bool:
        """Whether another request may follow: the answer ended where its framing said, the
        service keeps the connection open, and nothing came past the answer's end (a next
        request would take such bytes for its own answer)."""
        state = self._h11
        return (
            state.our_state is h11.DONE
            and state.their_state is h11.DONE
            and not state.trailing_data[0]
            and not self.sock.pending()
        )

    def next_cycle(self) -> None:
        """Ready for the next request (only when :meth:`reusable`)."""
        self._h11.start_next_cycle()

    def dropped(self) -> bool:
        """Whether the service closed it (or sent something unasked) while it sat idle."""
        return bool(self.sock.pending()) or self._readable()

    def _readable(self) -> bool:
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(0))

    def close(self) -> None:
        self.sock.close()

    def _send(self, event: h11.Event) -> None:
        data = self._held + (self._h11.send(event) or b"")
        self._held = b""
        if data:
            self.sock.sendall(data)

    def _next_event(self, *, wait: bool = True) -> object:
        """The next event; with ``wait`` false, NEED_DATA rather than reading the socket."""
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as error:
                # h11's text may quote what the service sent: not kept, in case it echoes a
                # credential.
                if error.error_status_hint == 431:
                    raise BadAnswer(TOO_LARGE_ANSWER_HEAD) from None
                raise BadAnswer("an answer that is not HTTP/1.1") from None
            if event is not h11.NEED_DATA or not wait:
                return event
            data = self.sock.recv(RECV)
            self.heard = self.heard or bool(data)
            self._h11.receive_data(data)
