"""The Conduce REST API, as keyagent needs it: log in, check a session, list/create/delete keys.

The agent's own Conduce calls go through here and nowhere else (the HTTP socket forwards
tools' calls through :mod:`keyagent.forward`, with the same :class:`HttpSettings`; the client
side's :func:`keyagent.http_session` lives in :mod:`keyagent.http_client`); everything else
sees :class:`ConduceAccount`, :class:`RemoteKey` and the errors of :mod:`keyagent.errors`.

Security rules this module keeps:

* TLS verification is always on, unless :attr:`HttpSettings.insecure` is set explicitly, and
  then every single request logs a warning.
* The password is sent once, in the login body, and kept nowhere: no attribute, no log record,
  no exception.
* Nothing that came back from the service or went to it beyond method, path, status and timing
  reaches a log record or an exception message: bodies may echo secrets, headers carry them.
* Every exception raised here is raised outside the ``except`` block that caught the
  :mod:`requests` failure, so it has neither ``__cause__`` nor ``__context__``: a traceback
  cannot drag along a request object holding headers, cookies or the login body.
* No more than :data:`MAX_ANSWER` bytes of an answer are ever read: a wrong or hostile host
  cannot fill the agent's memory.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.cookiejar import Cookie, CookieJar, DefaultCookiePolicy
from types import MappingProxyType, TracebackType
from typing import Any, Final, Literal

import requests
from requests.cookies import RequestsCookieJar
from urllib3.connection import HTTPSConnection
from urllib3.connectionpool import HTTPSConnectionPool
from urllib3.exceptions import (
    InvalidChunkLength,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)
from urllib3.util import Retry

from keyagent.errors import (
    BadCredentials,
    BadRequest,
    Forbidden,
    KeyagentError,
    LoginRequired,
    NotFound,
    RemoteError,
    RemoteUnreachable,
    SessionExpired,
    TLSError,
)
from keyagent.log import get_logger
from keyagent.protocol import DESCRIPTION, KEY, unique_members
from keyagent.rules import (
    has_control_characters,
    host_problem,
    user_problem,
)
from keyagent.tls import HttpSettings, is_certificate_failure

__all__ = [
    "API_PREFIX", "CREATE_UNSURE", "MAX_ANSWER", "ConduceAccount", "HttpSettings", "RemoteKey",
]  # fmt: skip

log = get_logger("keyagent.conduce")

API_PREFIX: Final = "/conduce/api/v1/"
# The API answers with small JSON documents (a key list is a few hundred bytes a key); a
# longer answer comes from the wrong host or a hostile one, and is refused before it is
# read whole. The cap applies to the decoded body, so a compressed answer cannot slip past.
MAX_ANSWER: Final = 1024 * 1024
_READ_CHUNK: Final = 64 * 1024
CREATE_UNSURE: Final = (
    "the key may have been made all the same (a create is never sent twice): see "
    "keyagent-ctl list --remote, and delete it with keyagent-ctl remove KEY_ID (prune "
    "deletes it too, unless it was made with --print or --keep)"
)
"""The next step after a create that got no answer: retrying could make a second key."""

# The listed-key object is documented only as "the key and its creation date": accept the
# spellings a service is likely to use, in order of preference.
_KEY_FIELDS: Final = ("apikey", "key", "api_key")
_CREATED_FIELDS: Final = ("created", "created_at", "date")

# Retrying is only ever worth it when a gateway or the service itself says "try again".
_RETRY_STATUSES: Final = frozenset({502, 503, 504})
# The backoff grows exponentially; cap a single wait so a large retries setting cannot stall
# a worker thread for minutes.
_MAX_BACKOFF: Final = 10.0
# requests' own policy when no retries are configured: nothing is sent twice, and the
# errors are raised as requests expects them (see _SafeCallRetry.increment).
_NO_RETRY: Final = Retry(0, read=False)


@dataclass(frozen=True)
class RemoteKey:
    """One API key as the service listed it."""

    key: str = field(repr=False)
    description: str
    created: str | None
    # Unknown fields are kept for callers that know better, but never shown: a field we do
    # not understand may well hold another secret. Not hashed either: values may be dicts.
    extra: Mapping[str, object] = field(default_factory=dict, repr=False, hash=False)

    def masked(self) -> str:
        """The key with all but its first and last four characters hidden.

        Keys shorter than 16 characters are hidden entirely, so that at least half of
        any key we show stays secret and a short key's length is not revealed either.
        """
        if len(self.key) < 16:
            return "****"
        return f"{self.key[:4]}…{self.key[-4:]}"


class _SafeCallRetry(Retry):
    """urllib3's :class:`~urllib3.util.Retry` as keyagent's safe calls use it: a GET
    (validate-session, apikeys/list) is sent again after a connection failure or a 502, 503
    or 504, up to :attr:`HttpSettings.retries` times, with exponential backoff and jitter.
    After the last 5xx its answer is returned, to be reported like any other.

    Two narrowings of urllib3's rules, each a promise of this module:

    * Any other method (login, create, delete) is never sent twice, not even after a failed
      connection, which urllib3 would repeat for every method: a retried create could make
      a second key.
    * A read timeout is not retried: a service that hangs would hold a worker thread for
      ``(retries + 1) x read_timeout``.

    Both go to requests' own no-retry policy, so they fail exactly as without retries.
    ``Retry-After`` is not obeyed (a hostile service could ask for hours), and the waits go
    through ``sleep``, which tests replace.
    """

    def __init__(self, *args: Any, sleep: Callable[[float], None] = time.sleep, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._pause = sleep

    @classmethod
    def for_settings(
        cls, settings: HttpSettings, *, sleep: Callable[[float], None] = time.sleep
    ) -> _SafeCallRetry:
        return cls(
            total=settings.retries,
            other=0,  # TLS and other failures are never retried
            allowed_methods=frozenset({"GET"}),
            status_forcelist=_RETRY_STATUSES,
            backoff_factor=settings.backoff,
            backoff_jitter=settings.backoff,
            backoff_max=_MAX_BACKOFF,
            raise_on_status=False,
            respect_retry_after_header=False,
            sleep=sleep,
        )

    def new(self, **kw: Any) -> _SafeCallRetry:
        retry = super().new(**kw)
        retry._pause = self._pause
        return retry

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: Any = None,
        error: Exception | None = None,
        _pool: Any = None,
        _stacktrace: TracebackType | None = None,
    ) -> _SafeCallRetry:
        if error is not None and (method != "GET" or isinstance(error, ReadTimeoutError)):
            # requests' default policy raises for every error (MaxRetryError, or the error
            # itself for a read error), so the caller sees what it would without retries.
            _NO_RETRY.increment(method, url, response, error, _pool, _stacktrace)
            raise error  # not reached
        retry = super().increment(method, url, response, error, _pool, _stacktrace)
        # The URL holds the path only, never a key: keys travel in headers and bodies.
        reason = type(error).__name__ if error is not None else f"status {response.status}"
        log.info("%s %s: %s, retry %d", method, url, reason, len(retry.history))
        return retry

    def sleep(self, response: Any = None) -> None:
        self._pause(self.get_backoff_time())


_CALL = threading.local()
"""The :class:`_Watch` of the call this thread is making, if any."""


class _Watch:
    """A whole call's deadline. ``--read-timeout`` bounds each wait for the service's next
    bytes, so a service that sends its answer a byte at a time (or interim answers without
    end) would hold a call for as long as it kept on; when this deadline passes, the call's
    socket is shut down, which ends any read or write under way on it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self.connecting = False
        """Whether the call is making a connection (TCP, any proxy's tunnel, the TLS
        handshake) and has not made it: a failure now sent nothing."""
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.name = "keyagent-call-deadline"
        self._timer.daemon = True

    def __enter__(self) -> _Watch:
        _CALL.watch = self
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()
        self._timer.join()  # at once, once cancelled: no thread outlives the call
        _CALL.watch = None

    def watch(self, sock: socket.socket) -> None:
        """``sock`` carries the call now (a new connection, or a pooled one reused)."""
        with self._lock:
            self._sock = sock
            self.connecting = False
            if self.expired:
                _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            if self._sock is not None:
                _shut(self._sock)


def _shut(sock: socket.socket) -> None:
    # The plain socket's shutdown, not SSLSocket's: that one also drops the TLS state, under
    # the feet of the thread still reading it.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _watched(sock: socket.socket | None) -> None:
    watch: _Watch | None = getattr(_CALL, "watch", None)
    if watch is not None and sock is not None:
        watch.watch(sock)


class _WatchedConnection(HTTPSConnection):
    """An HTTPS connection that tells the call's :class:`_Watch` which socket it uses."""

    def connect(self) -> None:
        watch: _Watch | None = getattr(_CALL, "watch", None)
        if watch is not None:
            watch.connecting = True
        super().connect()
        _watched(self.sock)

    def request(self, *args: Any, **kwargs: Any) -> None:
        _watched(self.sock)  # a pooled connection's (None before a new one connects)
        super().request(*args, **kwargs)


class _WatchedPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedConnection


class _WatchedAdapter(requests.adapters.HTTPAdapter):
    """An adapter whose HTTPS connections, direct or through ``HTTPS_PROXY``, are
    :class:`_WatchedConnection`."""

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        _watch_pools(self.poolmanager)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        _watch_pools(manager)
        return manager


def _watch_pools(manager: Any) -> None:
    manager.pool_classes_by_scheme = {**manager.pool_classes_by_scheme, "https": _WatchedPool}


class _PinnedTLSAdapter(_WatchedAdapter):
    """An adapter whose every TLS connection, direct or through ``HTTPS_PROXY``, verifies
    the server against one loaded :class:`ssl.SSLContext`, and nothing else.

    By itself requests hands urllib3 a CA *path* (the ``verify=`` path, or
    ``REQUESTS_CA_BUNDLE``, or certifi's) that is read again for every new connection, and
    which urllib3 would add to any context we gave it. This adapter sets no path at all.
    """

    def __init__(self, context: ssl.SSLContext, retry: Retry) -> None:
        self._context = context
        super().__init__(max_retries=retry)

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        pool_kwargs["ssl_context"] = self._context
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        proxy_kwargs["ssl_context"] = self._context
        return super().proxy_manager_for(proxy, **proxy_kwargs)

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: bool | str, cert: Any = None
    ) -> Any:
        # True, whatever was asked: a path here would become urllib3's ca_certs.
        return super().build_connection_pool_key_attributes(request, True, cert)

    def cert_verify(self, conn: Any, url: str, verify: bool | str, cert: Any) -> None:
        # The context holds the trust anchors; no file is named for urllib3 to load.
        conn.cert_reqs = "CERT_REQUIRED"
        conn.ca_certs = None
        conn.ca_cert_dir = None


class _RefuseAllCookies(DefaultCookiePolicy):
    """A policy for the Session's own jar: store nothing, send nothing.

    The session cookie lives in :attr:`ConduceAccount._cookies` and is passed explicitly on
    cookie-authenticated calls only. Were it kept in the Session's jar, requests would also
    send it alongside ``Authorization: Bearer`` on API-key calls, and any cookie the service
    sets on an API-key call would silently join the account's session.
    """

    def set_ok(self, cookie: Cookie, request: object) -> bool:
        return False

    def return_ok(self, cookie: Cookie, request: object) -> bool:
        return False


class _NoAuth(requests.auth.AuthBase):
    """A do-nothing auth that stops requests from reading ``~/.netrc``.

    With ``trust_env`` on, requests fills in Basic auth from ``~/.netrc`` for any request
    without auth, which would overwrite our ``Authorization: Bearer`` header and send a
    password we were never given to the service.
    """

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        return r


_Auth = Literal["password", "cookie", "bearer"]


class ConduceAccount:
    """One requests.Session per account (host + user).

    Not thread-safe: the agent makes one call at a time per account, from a worker thread.
    """

    def __init__(
        self,
        host: str,
        user: str,
        settings: HttpSettings,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        # The one host grammar of keyagent.rules: anything else could make the URL built
        # below point somewhere the user did not name, or make urllib3 fail to parse it.
        problem = host_problem(host) if isinstance(host, str) else "the host is not a string"
        if problem is not None:
            raise BadRequest(f"the host is not valid: {problem}; fix --host")
        problem = user_problem(user)
        if problem is not None:
            raise BadRequest(f"the user is not valid: {problem}; fix --user")
        self.host: Final = host
        self.user: Final = user
        self.settings: Final = settings
        self._base = f"https://{host}{API_PREFIX}"
        self._cookies = RequestsCookieJar()
        self._session = requests.Session()
        # trust_env stays on, on purpose: it is what makes HTTPS_PROXY / NO_PROXY work, which
        # users behind a corporate proxy need. Its two other effects are neutralised:
        # - REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE: with an explicit bundle (--ca-bundle), every
        #   https:// request goes through _PinnedTLSAdapter, which trusts only the bundle
        #   loaded at start and ignores whatever verify= requests works out from the
        #   environment; so the explicit bundle wins. Under --insecure, _send passes
        #   verify=False explicitly, which the environment cannot override. Without either,
        #   requests reads REQUESTS_CA_BUNDLE (else certifi), as curl honours its bundle.
        # - ~/.netrc Basic auth is blocked by a non-empty Session.auth (see _NoAuth).
        self._session.trust_env = True
        # Safe calls (the GETs) are retried by urllib3 under this policy; see _SafeCallRetry.
        retry = _SafeCallRetry.for_settings(settings, sleep=sleep)
        if settings.ssl_context is not None:
            self._session.mount("https://", _PinnedTLSAdapter(settings.ssl_context, retry))
        else:
            self._session.mount("https://", _WatchedAdapter(max_retries=retry))
        self._session.verify = settings.effective_verify
        self._session.auth = _NoAuth()
        self._session.cookies = RequestsCookieJar(policy=_RefuseAllCookies())
        self._session.headers["User-Agent"] = "keyagent"
        self._session.headers["Accept"] = "application/json"

    def __repr__(self) -> str:
        return (
            f"ConduceAccount(host={self.host!r}, user={self.user!r}, "
            f"has_session={self.has_session})"
        )

    def __enter__(self) -> ConduceAccount:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- session ---------------------------------------------------------------------------

    def login(self, password: str) -> None:
        """Start a session with the password; keep only the cookies the service sets.

        Never retried: a login is not idempotent as far as lockout counters are concerned.
        On failure an existing session is left as it was.
        """
        if not isinstance(password, str) or not password:
            raise BadRequest("the password must not be empty; enter it again")
        body = {"email": self.user, "password": password, "keep": False}
        response = self._request("POST", "user/login", auth="password", json_body=body)
        self._check(response, "log in", auth="password")
        cookies = self._sendable(response.cookies)
        if not cookies:
            raise RemoteError(
                f"the service at {self.host} accepted the login but sent no session cookie "
                "(none, or none that can be sent back); check the host"
            )
        if not _cookies_fit(cookies):
            raise RemoteError(
                f"the service at {self.host} answered the login with more cookies than a "
                f"session can carry (over {MAX_COOKIES} or {MAX_COOKIE_BYTES // 1024} KiB); "
                "check the host"
            )
        self._cookies = cookies

    def logout(self) -> None:
        """Forget the session locally.

        The API documents no logout endpoint, so no remote call is made: the session simply
        ages out on the service's side.
        """
        self._cookies.clear()

    @property
    def has_session(self) -> bool:
        return len(self._cookies) > 0

    def session_cookie(self) -> str | None:
        """The session as a ``Cookie`` header value, for the agent's own calls and for a
        request it makes for a tool through its HTTP socket (:mod:`keyagent.proxy`); None
        without a session.

        Every cookie the service set on the session goes with every call, whatever its
        ``Path`` or ``Domain``: the agent talks to this one host's API only, and a cookie
        that cookie matching left off would make a login that seems to work and a session
        that is never sent."""
        pairs = [
            cookie.name if cookie.value is None else f"{cookie.name}={cookie.value}"
            for cookie in self._cookies
        ]
        return "; ".join(pairs) or None

    def _sendable(self, jar: CookieJar) -> RequestsCookieJar:
        """The cookies of ``jar`` that can go back in a ``Cookie`` header: a name of visible
        ASCII without ``=`` or ``;``, a value of printable ASCII without ``;``. Others (a
        control character would break the header, or be refused by the HTTP socket's framing)
        are dropped, and logged without their value."""
        kept = RequestsCookieJar()
        for cookie in jar:
            if _COOKIE_NAME.fullmatch(cookie.name) and _COOKIE_VALUE.fullmatch(cookie.value or ""):
                kept.set_cookie(cookie)
            else:
                log.warning(
                    "%s set a cookie that cannot be sent back (characters a Cookie header "
                    "cannot carry): not kept", self.host,
                )  # fmt: skip
        return kept

    def validate(self) -> bool:
        """Whether the session is still alive: True on 200, False on 401 (session dropped).

        Returns False without any network call when there is no session. Raises on every
        other failure. Retried like any safe call.
        """
        if not self.has_session:
            return False
        response = self._request("GET", "user/validate-session", auth="cookie")
        if response.status_code == 401:
            self._cookies.clear()
            log.info("session of %s at %s has expired", self.user, self.host)
            return False
        self._check(response, "check the session", auth="cookie")
        return True

    # --- keys ------------------------------------------------------------------------------

    def list_keys(self, api_key: str | None = None) -> list[RemoteKey]:
        """The account's API keys, skipping entries that carry no key. Retried when safe."""
        auth = self._auth_for(api_key)
        response = self._request("GET", "apikeys/list", auth=auth, api_key=api_key)
        self._check(response, "list API keys", auth=auth)
        document = self._json(response)
        entries: object = document
        if isinstance(document, dict):
            # Not what the docs describe, but a wrapped list is a common API shape and
            # costs nothing to accept.
            entries = document.get("apikeys", document.get("keys"))
        if not isinstance(entries, list):
            raise self._unexpected()
        parsed = _parse_keys(entries)
        if isinstance(parsed, _Invalid):
            raise RemoteError(
                f"the service at {self.host} sent an apikeys/list answer with an invalid"
                f" '{parsed.field}' in entry {parsed.entry}; check the host, or retry later"
            )
        if entries and not parsed:
            # Not "no keys": that would print an empty list and make every held key look
            # stale. Only the shape is named; values may be keys.
            raise RemoteError(
                f"the service at {self.host} sent an apikeys/list answer this agent does not"
                f" understand ({_shape(entries)}, none with a key field:"
                f" {', '.join(_KEY_FIELDS)}); check the host, or upgrade keyagent"
            )
        return parsed

    def create_key(self, description: str, api_key: str | None = None) -> str:
        """Create a key and return it. Never retried: a retry could create a second key."""
        auth = self._auth_for(api_key)
        response = self._request(
            "POST", "apikeys/create", auth=auth, api_key=api_key,
            json_body={"description": description}, if_unsure=CREATE_UNSURE,
        )  # fmt: skip
        self._check(response, "create an API key", auth=auth)
        document = self._json(response)
        if isinstance(document, dict):
            name = next((n for n in _KEY_FIELDS if isinstance(document.get(n), str)), None)
            if name is not None:
                value = document[name]
                if _valid(KEY, value):
                    return str(value)
                # Checked like a key a client adds: a key with a newline, a space or a
                # control character would later corrupt a header, a keyring entry or a screen.
                raise RemoteError(
                    f"the service at {self.host} sent an apikeys/create answer with an invalid"
                    f" '{name}'; check the host, or retry later"
                )
        raise self._unexpected()

    def delete_key(self, key: str, api_key: str | None = None) -> None:
        """Revoke a key for good. Never retried: the first attempt may have succeeded.

        A 404 is reported as :class:`~keyagent.errors.NotFound`: the service knows no such
        key for this account, which the caller may want to tell apart from a failure.
        """
        if not isinstance(key, str) or not key:
            raise BadRequest("the key to delete must be a non-empty string")
        auth = self._auth_for(api_key)
        response = self._request(
            "POST", "apikeys/delete", auth=auth, api_key=api_key, json_body={"apikey": key}
        )
        if response.status_code == 404:
            raise NotFound(
                f"the service at {self.host} has no such API key for {self.user}; "
                "list the keys to pick another"
            )
        self._check(response, "delete an API key", auth=auth)

    def close(self) -> None:
        """Forget the session and close pooled connections; the account is then unusable."""
        self._cookies.clear()
        self._session.close()

    # --- plumbing --------------------------------------------------------------------------

    def _auth_for(self, api_key: str | None) -> _Auth:
        if api_key is not None:
            if not isinstance(api_key, str) or not api_key or any(c in api_key for c in "\r\n"):
                raise BadRequest("the API key must be a non-empty single-line string")
            return "bearer"
        if not self.has_session:
            # Checked before any network traffic: without credentials the call cannot succeed.
            raise LoginRequired(
                f"no session for {self.user} at {self.host}; run keyagent-ctl login"
            )
        return "cookie"

    def _request(
        self,
        method: str,
        path: str,
        *,
        auth: _Auth,
        api_key: str | None = None,
        json_body: Mapping[str, object] | None = None,
        if_unsure: str | None = None,
    ) -> _Answer:
        """Send a request and read its answer; raise the error a failure maps to.

        A GET is retried by the session's :class:`_SafeCallRetry` (connection failures and
        502/503/504); any other method is sent once. ``if_unsure``: the next step to name
        when the request may have reached the service though no answer came (for a call
        that must not simply be retried), instead of the failure's own.
        """
        outcome = self._send(method, path, auth=auth, api_key=api_key, json_body=json_body)
        if isinstance(outcome, _Failure):
            # Raised here, outside the except block that caught the requests exception, so
            # that it is neither the __cause__ nor the __context__ of what the caller sees.
            if outcome.unsure is not None and if_unsure is not None:
                raise type(outcome.error)(f"{outcome.unsure}; {if_unsure}") from None
            raise outcome.error from None
        return outcome

    def _send(
        self,
        method: str,
        path: str,
        *,
        auth: _Auth,
        api_key: str | None = None,
        json_body: Mapping[str, object] | None = None,
    ) -> _Answer | _Failure:
        """Send one request and read its answer (up to :data:`MAX_ANSWER` bytes); return it,
        or the keyagent error a failure maps to."""
        headers: dict[str, str] = {}
        if auth == "bearer":
            headers["Authorization"] = f"Bearer {api_key}"
        elif auth == "cookie":
            session = self.session_cookie()
            if session is not None:  # else the service answers 401, as for an expired one
                headers["Cookie"] = session
        if self.settings.insecure:
            # On every request, not once: a log reader must see that this very call was
            # open to interception.
            log.warning(
                "TLS verification is off (--insecure): %s %s%s to %s can be intercepted",
                method, API_PREFIX, path, self.host,
            )  # fmt: skip
        started = time.monotonic()
        settings = self.settings
        watch = _Watch(settings.connect_timeout + 2 * settings.read_timeout)
        try:
            with watch:
                response = self._session.request(
                    method,
                    self._base + path,
                    headers=headers,
                    json=json_body,
                    timeout=(settings.connect_timeout, settings.read_timeout),
                    # Explicit on every request, see __init__: --insecure beats
                    # REQUESTS_CA_BUNDLE.
                    verify=settings.effective_verify,
                    # A redirect could carry the Authorization header or the login body to a
                    # place the user never named; the API documents none, so none is
                    # followed.
                    allow_redirects=False,
                    # Streamed, so that _read_capped decides how much of the body is read.
                    stream=True,
                )
                body = _read_capped(response)
        except requests.exceptions.RequestException as error:
            # Only the exception's class is logged: its text names URLs and pools, and
            # its attributes hold the request with headers and body.
            log.warning(
                "%s %s%s to %s failed after %.3fs: %s",
                method, API_PREFIX, path, self.host, time.monotonic() - started,
                "its deadline passed" if watch.expired else type(error).__name__,
            )  # fmt: skip
            if watch.expired:
                late = f"{self.host} did not finish answering within {watch.seconds:g}s"
                return _Failure(RemoteUnreachable(f"{late}; retry later"), unsure=late)
            return self._transport_failure(error, connecting=watch.connecting)
        except OSError as error:
            # requests raises a bare OSError, outside its own hierarchy, when the CA
            # bundle it would read (REQUESTS_CA_BUNDLE, say) does not exist.
            log.warning(
                "%s %s%s to %s failed: %s", method, API_PREFIX, path, self.host,
                type(error).__name__,
            )  # fmt: skip
            return self._local_failure()
        if body is None:
            log.warning(
                "%s %s%s to %s: %d with an answer over %d bytes, refused after %.3fs",
                method, API_PREFIX, path, self.host, response.status_code, MAX_ANSWER,
                time.monotonic() - started,
            )  # fmt: skip
            # Refused whatever the status: not even a session cookie is taken from it.
            return _Failure(
                RemoteError(
                    f"the service at {self.host} sent an oversized answer (over "
                    f"{MAX_ANSWER // 1024} KiB); check the host, or retry later"
                )
            )
        if auth == "cookie" and len(response.cookies) > 0:
            # The service may refresh or rotate the session cookie on any call; the
            # Session's own jar refuses it (see _RefuseAllCookies), so keep it here, unless
            # the session would grow past what it can carry.
            merged = self._cookies.copy()
            merged.update(self._sendable(response.cookies))
            if _cookies_fit(merged):
                self._cookies = merged
            else:
                log.warning(
                    "%s set cookies past %d or %d KiB in all: not kept",
                    self.host, MAX_COOKIES, MAX_COOKIE_BYTES // 1024,
                )  # fmt: skip
        log.debug(
            "%s %s%s to %s: %d in %.3fs",
            method, API_PREFIX, path, self.host, response.status_code,
            time.monotonic() - started,
        )  # fmt: skip
        return _Answer(response.status_code, response.cookies, body)

    def _transport_failure(
        self, error: requests.exceptions.RequestException, *, connecting: bool = False
    ) -> _Failure:
        """The keyagent error for a call that got no answer; ``connecting``: it failed while
        making its connection (see :attr:`_Watch.connecting`), so nothing was sent."""
        # SSLError is a ConnectionError subclass, so it is tested first.
        if isinstance(error, requests.exceptions.SSLError):
            if is_certificate_failure(error):
                return _Failure(
                    TLSError(
                        f"the TLS certificate of {self.host} could not be verified; "
                        "check the host or pass --ca-bundle"
                    )
                )
            return _Failure(
                TLSError(f"the TLS connection to {self.host} failed; check the host and any proxy")
            )
        if isinstance(error, requests.exceptions.ConnectTimeout):
            # Nothing reached the service, so even a non-idempotent call could be retried,
            # but only safe calls are (see _SafeCallRetry).
            return _Failure(
                RemoteUnreachable(
                    f"{self.host} did not accept a connection within "
                    f"{self.settings.connect_timeout:g}s; check the host and network"
                ),
            )
        if isinstance(error, requests.exceptions.Timeout) and connecting:
            # The TCP connection was made, but the TLS handshake (which urllib3 reports as a
            # read timeout) or a proxy's tunnel did not end in time: nothing was sent.
            return _Failure(
                RemoteUnreachable(
                    f"{self.host} accepted a connection but did not complete the TLS "
                    f"handshake within {self.settings.connect_timeout:g}s; check that the "
                    "host serves HTTPS on that port, and the network"
                ),
            )
        if isinstance(error, requests.exceptions.Timeout):
            late = f"{self.host} did not answer within {self.settings.read_timeout:g}s"
            return _Failure(
                RemoteUnreachable(f"{late}; retry later or raise the read timeout"), unsure=late
            )
        if _not_http(error):
            bad = f"{self.host} sent an answer that breaks HTTP's rules"
            return _Failure(
                RemoteError(f"{bad}; check the host (something other than Conduce may answer)"),
                unsure=bad,
            )
        if isinstance(error, requests.exceptions.ConnectionError):
            # Refused (nothing sent), or dropped once the request was sent: the service may
            # have acted on it.
            lost = f"{self.host} could not be reached or dropped the connection"
            return _Failure(
                RemoteUnreachable(f"{lost}; check the host and network"),
                unsure=None if _never_sent(error) else lost,
            )
        if isinstance(error, requests.exceptions.ChunkedEncodingError):
            cut = f"{self.host} dropped the connection mid-answer"
            return _Failure(RemoteUnreachable(f"{cut}; retry later"), unsure=cut)
        return _Failure(
            RemoteError(
                f"the request to {self.host} failed ({type(error).__name__}); "
                "see the agent log and retry"
            )
        )

    def _local_failure(self) -> _Failure:
        return _Failure(
            RemoteUnreachable(f"the request to {self.host} failed locally; see the agent log")
        )

    def _check(self, response: _Answer, operation: str, *, auth: _Auth) -> None:
        """Raise the keyagent error for a non-2xx answer."""
        status = response.status_code
        if 200 <= status < 300:
            return
        if status == 401:
            if auth == "password":
                raise BadCredentials(
                    f"{self.host} rejected the password for {self.user}; "
                    "check them and log in again"
                )
            if auth == "bearer":
                # BadCredentials, not SessionExpired: logging in again would not make the
                # service accept this key, it was revoked or never existed.
                raise BadCredentials(
                    f"{self.host} rejected the API key; use another key or log in with a password"
                )
            # The cookie is dead; keeping it would only make every later call fail the same way.
            self._cookies.clear()
            raise SessionExpired(
                f"the session of {self.user} at {self.host} has expired; "
                "run keyagent-ctl login again"
            )
        if status == 403:
            raise Forbidden(
                f"{self.host} does not allow {self.user} to {operation}; "
                "ask the account's administrator"
            )
        # The standard phrase, not response.reason: the reason phrase is free text chosen by
        # the server, and like the body it could echo something it should not.
        phrase = _reason_phrase(status)
        raise RemoteError(
            f"{self.host} answered {status}{' ' + phrase if phrase else ''} "
            f"when asked to {operation}; retry later"
        )

    def _json(self, response: _Answer) -> object:
        try:
            document: object = json.loads(
                response.body, object_pairs_hook=unique_members, parse_constant=_not_json
            )
        except (ValueError, RecursionError):
            pass  # raised below, outside the except block, for a context-free exception
        else:
            return document
        raise self._unexpected()

    def _unexpected(self) -> RemoteError:
        return RemoteError(
            f"the service at {self.host} sent an unexpected answer; check the host, or retry later"
        )


def _not_json(constant: str) -> object:
    """``json``'s ``parse_constant``: NaN and Infinity are Python's extensions, not JSON."""
    raise ValueError(f"{constant} is not JSON")


@dataclass(frozen=True)
class _Answer:
    """What is kept of a response: its body is read (under the cap) and the connection is
    back in the pool, so no caller can read an uncapped body by accident."""

    status_code: int
    cookies: RequestsCookieJar = field(repr=False)
    body: bytes = field(repr=False)


def _never_sent(error: requests.exceptions.ConnectionError) -> bool:
    """Whether the request failed before it could leave: no connection was made (refused,
    an unknown host, a proxy that failed), so the service cannot have acted on it."""
    if isinstance(error, requests.exceptions.ProxyError):
        return True
    return isinstance(_urllib3_cause(error), NewConnectionError)


def _urllib3_cause(error: requests.exceptions.RequestException) -> object:
    """What urllib3 raised under a requests exception (its first argument), unwrapped from
    the MaxRetryError that carries it after retries; None if there is none."""
    cause = error.args[0] if error.args else None
    return getattr(cause, "reason", cause)


_COOKIE_NAME: Final = re.compile(r"[!#-'*+\-.0-9A-Z^-z|~]+")
"""A cookie name: an HTTP token (RFC 9110), so no ``=``, ``;``, space or control character."""
_COOKIE_VALUE: Final = re.compile(r"[ -:<-~]*")
"""A cookie value the agent sends back: printable ASCII without ``;``. Wider than RFC 6265's
cookie-octet (services do set spaces, commas and quotes), narrower than what a
``Set-Cookie`` line can hold."""
MAX_COOKIES: Final = 50
MAX_COOKIE_BYTES: Final = 16 * 1024
"""The most cookies, and bytes of them, a session keeps: a hostile service could otherwise
grow the agent's memory and every request's Cookie header call by call, and a session too
large to lend would fail the HTTP socket's requests (front ends refuse a Cookie header of
more than 8 to 16 KiB anyway)."""


def _cookies_fit(jar: CookieJar) -> bool:
    cookies = list(jar)
    size = sum(len(cookie.name) + len(cookie.value or "") + 2 for cookie in cookies)
    return len(cookies) <= MAX_COOKIES and size <= MAX_COOKIE_BYTES


def _not_http(error: requests.exceptions.RequestException) -> bool:
    """Whether the service answered, but not in HTTP: too many headers, a line too long, a
    status line or a chunk size that does not parse. requests reports these as a lost
    connection (ConnectionError) or a cut body (ChunkedEncodingError), which they are not:
    the request was sent, and something answered."""
    cause = _urllib3_cause(error)
    if isinstance(cause, ProtocolError) and len(cause.args) > 1:
        cause = cause.args[1]  # ("Connection aborted.", what http.client raised)
    if isinstance(cause, InvalidChunkLength):  # an IncompleteRead, yet not a cut...
        return bool(cause.length)  # ...unless empty: urllib3 1.26's word for a cut there
    # A connection closed early is an HTTPException too (RemoteDisconnected, IncompleteRead).
    return isinstance(cause, http.client.HTTPException) and not isinstance(
        cause, ConnectionError | http.client.IncompleteRead
    )


@dataclass(frozen=True)
class _Failure:
    """A transport failure already mapped to the error the caller will see."""

    error: KeyagentError
    unsure: str | None = None
    """What went wrong, when the request may have reached the service all the same (no
    answer, or a cut one): a call that is not safe to repeat says so instead of "retry"."""


def _read_capped(response: requests.Response) -> bytes | None:
    """The decoded body, or None if it is longer than :data:`MAX_ANSWER`.

    The response is closed either way: after a complete read that returns the connection
    to the pool; when the cap is hit, it drops the connection with the unread rest.
    """
    chunks: list[bytes] = []
    size = 0
    with response:
        for chunk in response.iter_content(_READ_CHUNK):
            size += len(chunk)
            if size > MAX_ANSWER:
                return None
            chunks.append(chunk)
    return b"".join(chunks)


@dataclass(frozen=True)
class _Invalid:
    """Where a listed entry holds a value that fails validation (never the value itself)."""

    field: str
    entry: int


# A date as a service writes it is some 20 to 35 characters; anything much longer is not one.
_MAX_CREATED: Final = 64


def _valid(validator: Callable[[str, object], object], value: object) -> bool:
    try:
        validator("value", value)
    except BadRequest:
        return False
    return True


def _parse_keys(entries: list[object]) -> list[RemoteKey] | _Invalid:
    """The entries understood, or where the first invalid value is.

    Partly understood entries keep working: an entry that is not an object, or has no key
    field holding a string, is skipped; a description that is missing or not a string is
    empty; a date that is missing or not a string is unknown. But a string that is present
    and fails the checks a client's input gets (:data:`keyagent.protocol.KEY`,
    :data:`keyagent.protocol.DESCRIPTION`, a date of at most 64 characters without control
    characters) is hostile or broken, and fails the whole answer: one entry's terminal
    escape must not reach a screen, nor its malformed key a header or a keyring.
    """
    keys: list[RemoteKey] = []
    for number, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            continue
        key_field = next((n for n in _KEY_FIELDS if isinstance(entry.get(n), str)), None)
        if key_field is None:
            continue
        if not _valid(KEY, entry[key_field]):
            return _Invalid(key_field, number)
        description = entry.get("description")
        if isinstance(description, str) and not _valid(DESCRIPTION, description):
            return _Invalid("description", number)
        created_field = next((n for n in _CREATED_FIELDS if isinstance(entry.get(n), str)), None)
        created: str | None = None
        if created_field is not None:
            created = str(entry[created_field])
            if len(created) > _MAX_CREATED or has_control_characters(created):
                return _Invalid(created_field, number)
        used = {key_field, created_field, "description"}
        extra = {str(name): value for name, value in entry.items() if name not in used}
        keys.append(
            RemoteKey(
                key=entry[key_field],
                description=description if isinstance(description, str) else "",
                created=created,
                extra=MappingProxyType(extra),
            )
        )
    return keys


def _shape(entries: list[object]) -> str:
    """What a list holds, described by kinds and field names only (no values)."""
    kinds: list[str] = []
    names: list[str] = []
    for entry in entries:
        if isinstance(entry, dict):
            kind = "objects"
            for name in entry:
                # Names are the service's too: show only plain short ones.
                shown = (
                    name
                    if isinstance(name, str)
                    and 0 < len(name) <= 32
                    and name.isascii()
                    and name.replace("_", "").replace("-", "").isalnum()
                    else "?"
                )
                if shown not in names and len(names) < 8:
                    names.append(shown)
        elif isinstance(entry, str):
            kind = "strings"
        elif isinstance(entry, bool):
            kind = "booleans"
        elif isinstance(entry, int | float):
            kind = "numbers"
        elif isinstance(entry, list):
            kind = "lists"
        else:
            kind = "nulls"
        if kind not in kinds:
            kinds.append(kind)
    count = f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
    described = " and ".join(kinds)
    if names:
        described += f" with the fields {', '.join(names)}"
    return f"{count}: {described}"


def _reason_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""
