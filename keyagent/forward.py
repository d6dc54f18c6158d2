"""Upstream calls for the HTTP socket: warm TLS connections per host.

This module owns the proxy's connections to the service: TLS connections made with the
agent's :class:`~keyagent.tls.HttpSettings` (the CA bundle read once at start,
``--insecure`` only when asked), kept in a pool per host, each framed by
:class:`keyagent.httpwire.ServiceConnection` (h11 as the client), and the errors a tool
gets when the service fails. Bodies stream both ways: a request body is an iterator of
chunks read from the tool as they are sent, and an answer is read a chunk at a time as the
tool takes it, so a 100 MiB transfer holds one chunk in memory, not 100 MiB. No redirect
is followed and nothing the service answered is retried: the tool sees exactly what the
service answered.

The one retry: a pooled connection the service closed while it sat idle fails before a
byte of the answer arrives. An idempotent request whose body is in hand (GET, HEAD, PUT,
DELETE) is then sent once more on a new connection, as browsers do; any other gets
``remote_unreachable``.

h11 (through :mod:`keyagent.httpwire`) rather than urllib3, which an earlier version used:
the bytes a request puts on the wire are exactly the target :func:`keyagent.proxy.route`
checked (urllib3 normalised it first), and a proxied request costs about a quarter less
CPU without http.client's and the email package's header parsing (docs/performance.md).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Final

from keyagent.errors import RemoteError, RemoteUnreachable, Timeout, TLSError
from keyagent.httpwire import BadAnswer, RequestHead, ServiceConnection
from keyagent.log import get_logger
from keyagent.tls import HttpSettings, is_certificate_failure

__all__ = ["Answer", "Upstream", "split_host"]

log = get_logger("keyagent.forward")

POOL_SIZE: Final = 64
"""Idle connections kept per host; more may be open at once, the surplus is closed."""
POOL_IDLE: Final = 50.0
"""Seconds a connection may sit unused in the pool; one idle longer is closed, not used: a
firewall may have dropped it without a word, and a request on it would wait out the read
timeout."""
POOL_HOSTS: Final = 16
"""Hosts whose idle connections are kept; the one used longest ago is let go first."""
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "PUT", "DELETE"})
"""Methods sent again when a pooled connection turns out closed (RFC 9110, 9.2.2)."""


def split_host(host: str) -> tuple[str, int]:
    """``name[:port]`` or ``[v6]:port`` (checked by :func:`keyagent.rules.host_problem`) as
    the name to connect to and verify, and the port (443 if none)."""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name, int(rest[1:]) if rest else 443
    name, _, port = host.partition(":")
    return name, int(port) if port else 443


class _Stale(Exception):
    """A pooled connection failed before any byte of the answer came back."""


class _Connection:
    """One TLS connection to a host, as pooled: its HTTP framing and its history."""

    __slots__ = ("host", "idle_since", "pooled", "wire")

    def __init__(self, host: str, sock: ssl.SSLSocket) -> None:
        self.host = host
        self.wire = ServiceConnection(sock)
        self.pooled = False
        """Whether it served a request before: if it fails at once, it may just be stale."""
        self.idle_since = 0.0


class Answer:
    """The service's answer: status and headers at once, the body as it is read."""

    __slots__ = ("_conn", "_upstream", "headers", "status")

    def __init__(
        self, upstream: Upstream, conn: _Connection, status: int, headers: list[tuple[str, str]]
    ) -> None:
        self._upstream = upstream
        self._conn = conn
        self.status = status
        self.headers = headers

    def body(self, host: str) -> Iterator[bytes]:
        """The body, a chunk at a time, undecoded (Content-Encoding passes through)."""
        try:
            yield from self._conn.wire.read_body()
        except TimeoutError:
            raise Timeout(f"{host} stopped sending its answer; retry later") from None
        except (OSError, BadAnswer) as error:
            log.warning("reading the answer of %s failed: %s", host, type(error).__name__)
            raise RemoteUnreachable(
                f"{host} dropped the connection mid-answer; retry later"
            ) from None

    def finish(self, complete: bool) -> None:
        """Give the connection back to the pool if the body was read to its end and the
        service keeps it open; else close it (an unread rest must never reach the next
        request on that connection)."""
        conn = self._conn
        if complete and conn.wire.reusable():
            conn.wire.next_cycle()
            self._upstream.give_back(conn)
        else:
            conn.wire.close()


class Upstream:
    """Pools of TLS connections to Conduce hosts, shared by every HTTP-socket connection of
    a worker (one lock guards the pools; a connection serves one request at a time)."""

    def __init__(
        self, settings: HttpSettings, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self._clock = clock
        """When a connection went idle, and whether it has been idle too long."""
        context = settings.ssl_context
        if settings.insecure:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif context is None:
            # The same trust as the agent's own calls without --ca-bundle: requests' bundle.
            import certifi

            context = ssl.create_default_context(cafile=certifi.where())
        self._context: ssl.SSLContext = context
        self._idle: dict[str, list[_Connection]] = {}  # by host, used longest ago first
        self._guard = threading.Lock()

    def send(
        self,
        method: str,
        host: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | Iterable[bytes],
        *,
        chunked: bool,
    ) -> Answer:
        """Send one request to ``https://host`` + ``target`` and return the answer's head.

        ``target`` goes on the wire as it is; ``headers`` must hold Host and the body's
        framing (Content-Length), bar ``chunked``, which adds Transfer-Encoding here."""
        if self.settings.insecure:
            log.warning(
                "TLS verification is off (--insecure): a proxied %s to %s can be intercepted",
                method, host,
            )  # fmt: skip
        request = self._request(method, host, target, headers, chunked)
        conn = self._pooled(host)
        if conn is not None:
            try:
                return self._exchange(conn, request, body)
            except _Stale:
                if not (isinstance(body, bytes) and method in IDEMPOTENT):
                    raise RemoteUnreachable(
                        f"{host} closed the connection before answering; retry later"
                    ) from None
                log.debug("a pooled connection to %s was closed; sending again", host)
        # A new connection is never stale: _exchange raises _Stale for pooled ones only.
        return self._exchange(self._connect(host), request, body)

    @staticmethod
    def _request(
        method: str, host: str, target: str, headers: list[tuple[str, str]], chunked: bool
    ) -> RequestHead:
        try:
            return RequestHead.make(method, target, headers, chunked=chunked)
        except ValueError:
            # The tool's method, target and headers passed the same checks on the way in
            # (keyagent.httpwire): what fails is the agent's own value, a session cookie
            # the service set.
            log.warning("a proxied %s to %s: the credential is not a valid header", method, host)
            raise RemoteError(
                f"the session held for {host} cannot be sent in an HTTP header; "
                "log in again, or add an API key"
            ) from None

    def _exchange(
        self, conn: _Connection, request: RequestHead, body: bytes | Iterable[bytes]
    ) -> Answer:
        """Send ``request`` and its body on ``conn``; read the answer's head. Whatever fails
        closes ``conn``: it may be mid-request."""
        host, wire = conn.host, conn.wire
        try:
            try:
                wire.send_head(request, hold=isinstance(body, bytes))
                if isinstance(body, bytes):
                    wire.send_body(body)
                    wire.end_request()
                else:
                    self._stream(wire, body)
                status, headers = wire.read_head()
                return Answer(self, conn, status, headers)
            except TimeoutError:
                raise Timeout(
                    f"{host} did not answer within {self.settings.read_timeout:g}s; retry later"
                ) from None
            except BadAnswer as error:
                if not wire.heard:  # the connection ended before a byte of answer
                    if conn.pooled:
                        raise _Stale() from None
                    raise RemoteUnreachable(
                        f"{host} closed the connection without answering; retry later"
                    ) from None
                log.warning("proxied call to %s: %s", host, error)
                raise RemoteError(f"{host} sent {error}; check the host") from None
            except OSError as error:
                if conn.pooled and not wire.heard:
                    raise _Stale() from None
                log.warning("proxied call to %s failed: %s", host, type(error).__name__)
                raise RemoteUnreachable(
                    f"{host} could not be reached or dropped the connection; retry later"
                ) from None
        except BaseException:
            wire.close()
            raise

    @staticmethod
    def _stream(wire: ServiceConnection, body: Iterable[bytes]) -> None:
        """Send a streamed body as the tool sends it, unless the service answers first (a
        413 or a 401 to an upload, say): the rest is then neither read from the tool nor
        sent, and the tool gets that answer at once, not after its whole upload. The
        tool's failures (ClientGone...) pass through."""
        for chunk in body:
            if wire.answered_early():
                return
            try:
                wire.send_body(chunk)
            except OSError:
                # A service that answers and closes at once (no lingering close) makes the
                # send fail; its answer may still be there to read.
                if wire.answered_early():
                    return
                raise
        wire.end_request()

    def _pooled(self, host: str) -> _Connection | None:
        """An idle connection to ``host`` still open, the one used last; None if none."""
        oldest = self._clock() - POOL_IDLE
        with self._guard:
            idle = self._idle.get(host)
            while idle:
                conn = idle.pop()
                if conn.idle_since >= oldest and not conn.wire.dropped():
                    return conn
                conn.wire.close()
        return None

    def give_back(self, conn: _Connection) -> None:
        """Keep ``conn`` for the next request to its host, unless the pool is full."""
        conn.pooled = True
        conn.idle_since = self._clock()
        with self._guard:
            idle = self._idle.pop(conn.host, None)
            if idle is None:
                idle = []
                if len(self._idle) >= POOL_HOSTS:
                    oldest = next(iter(self._idle))
                    for stale in self._idle.pop(oldest):
                        stale.wire.close()
            self._idle[conn.host] = idle  # now the host used last
            if len(idle) < POOL_SIZE:
                idle.append(conn)
                return
        conn.wire.close()

    def _connect(self, host: str) -> _Connection:
        """A new TLS connection to ``host``, verified as the settings say."""
        name, port = split_host(host)
        limit = self.settings.connect_timeout
        try:
            raw = socket.create_connection((name, port), timeout=limit)
        except TimeoutError:
            log.warning("proxied call to %s: no connection within %gs", host, limit)
            raise Timeout(
                f"{host} did not accept a connection within {limit:g}s; check the host and network"
            ) from None
        except OSError as error:
            log.warning("proxied call to %s: cannot connect: %s", host, type(error).__name__)
            raise RemoteUnreachable(
                f"{host} could not be reached; check the host and network"
            ) from None
        try:
            sock = self._context.wrap_socket(raw, server_hostname=name)  # handshake, in `limit`
        except ssl.SSLError as error:
            raw.close()
            log.warning("proxied call to %s: TLS failed: %s", host, type(error).__name__)
            if is_certificate_failure(error):
                raise TLSError(
                    f"the TLS certificate of {host} could not be verified; "
                    "check the host or start the agent with --ca-bundle"
                ) from None
            raise TLSError(f"the TLS connection to {host} failed; check the host") from None
        except TimeoutError:
            raw.close()
            raise Timeout(
                f"{host} did not finish the TLS handshake within {limit:g}s; "
                "check the host and network"
            ) from None
        except OSError as error:
            raw.close()
            log.warning("proxied call to %s: TLS failed: %s", host, type(error).__name__)
            raise RemoteUnreachable(
                f"{host} dropped the connection during the TLS handshake; check the host"
            ) from None
        sock.settimeout(self.settings.read_timeout)
        return _Connection(host, sock)

    def close(self) -> None:
        """Close every idle connection."""
        with self._guard:
            pools, self._idle = self._idle, {}
        for idle in pools.values():
            for conn in idle:
                conn.wire.close()
