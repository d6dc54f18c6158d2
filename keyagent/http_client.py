"""``requests`` through the agent's HTTP socket: a tool uses a key without ever holding it.

::

    import keyagent
    session = keyagent.http_session("app.conduce.com")
    teams = session.get("https://app.conduce.com/conduce/api/v1/user/list-teams").json()

The session sends every ``https://HOST/...`` request as plain HTTP/1.1 to the agent's
``http.sock`` (``$KEYAGENT_HTTP_SOCK``, else the one beside the agent socket), with the
``Host`` header naming HOST; the agent adds the credentials and makes the HTTPS call. The
socket is checked before anything is sent: it must be served by this user (SO_PEERCRED),
as the JSON-lines client checks the agent socket. Requests to other hosts are left to
requests' usual transport.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

import requests
import requests.adapters
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool

from keyagent import paths
from keyagent.client import _checked_timeout, shown
from keyagent.errors import AgentUnreachable, BadRequest
from keyagent.rules import host_problem, user_problem

__all__ = ["http_session", "http_socket_path"]


def http_socket_path(agent_socket: str | None = None) -> str:
    """The agent's HTTP socket: ``$KEYAGENT_HTTP_SOCK``, else the one beside the agent socket
    (``agent_socket``, ``$KEYAGENT_SOCK`` or the default)."""
    explicit = os.environ.get(paths.HTTP_SOCKET_ENV)
    if explicit and agent_socket is None:
        return explicit
    agent = paths.socket_path(agent_socket)
    if agent is None:
        raise AgentUnreachable(f"no agent: {paths.NO_SOCKET_HINT}")
    return paths.http_socket_path(agent)


class _UnixConnection(HTTPConnection):
    """An HTTP connection to the agent's HTTP socket, whatever host the URL names."""

    def __init__(self, *args: Any, socket_path: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout if isinstance(self.timeout, (int, float)) else None)
        try:
            sock.connect(self._socket_path)
        except OSError as error:
            sock.close()
            reason = os.strerror(error.errno) if error.errno else type(error).__name__
            raise AgentUnreachable(
                f"no agent HTTP socket at {shown(self._socket_path)} ({reason}); "
                'start an agent with eval "$(keyagent)" or set KEYAGENT_HTTP_SOCK'
            ) from None
        credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        uid = int.from_bytes(credentials[4:8], sys.byteorder)
        if uid != os.geteuid():
            sock.close()
            raise AgentUnreachable(
                f"the socket {shown(self._socket_path)} is served by uid {uid}, not by you; "
                "nothing was sent: set KEYAGENT_HTTP_SOCK to your own agent's"
            )
        self.sock = sock


class _UnixPool(HTTPConnectionPool):
    ConnectionCls = _UnixConnection


class _AgentAdapter(requests.adapters.HTTPAdapter):
    """Sends ``https://HOST/...`` as ``http`` over the agent's socket, Host: HOST, with the
    account and key asked for (only there: never to another host, nor after a redirect to
    one); ``timeout`` for each request that names none."""

    def __init__(
        self, host: str, socket_path: str, timeout: float | None, choice: dict[str, bytes]
    ) -> None:
        super().__init__()
        self._host = host
        self._choice = choice
        self._socket_path = socket_path
        self._timeout = timeout
        self._pool = self._new_pool()

    def _new_pool(self) -> _UnixPool:
        # The pool's own host is never connected to (see _UnixConnection) nor sent (the Host
        # header is set per request below).
        self._pid = os.getpid()
        return _UnixPool(
            "localhost", maxsize=4, socket_path=self._socket_path, timeout=self._timeout
        )

    def get_connection_with_tls_context(
        self, request: requests.PreparedRequest, verify: Any, proxies: Any = None, cert: Any = None
    ) -> HTTPConnectionPool:
        return self._pool

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        pass  # the agent verifies the service; the socket is checked in _UnixConnection

    def request_url(self, request: requests.PreparedRequest, proxies: Any) -> str:
        return request.path_url

    def send(
        self, request: requests.PreparedRequest, *args: Any, **kwargs: Any
    ) -> requests.Response:
        # A copy: requests builds a redirect's request from the one it sent, and the Host
        # and the account choice are for the agent, never for the host a redirect names.
        request = request.copy()
        request.headers["Host"] = self._host
        request.headers.update(self._choice)  # type: ignore[arg-type]  # bytes go out as they are
        if self._pid != os.getpid():
            # Forked: the pooled connections are the parent's, which goes on using them.
            # Closing them here closes this process's descriptors only (no shutdown()).
            inherited, self._pool = self._pool, self._new_pool()
            inherited.close()
        # requests has no session-wide timeout: each request without one of its own (as
        # Session.request passes it: a keyword, None when not given) gets the session's.
        if kwargs.get("timeout") is None and len(args) < 2:
            kwargs["timeout"] = self._timeout
        return super().send(request, *args, **kwargs)

    def close(self) -> None:
        self._pool.close()
        super().close()


def http_session(
    host: str,
    user: str | None = None,
    *,
    key_id: str | None = None,
    socket_path: str | None = None,
    timeout: float | None = None,
) -> requests.Session:
    """A ``requests.Session`` whose ``https://HOST/...`` calls the agent makes with its
    credentials for ``host`` (``user``'s, when the agent holds several accounts there;
    ``key_id`` to pick a held key). ``timeout`` bounds connecting to and each read from the
    agent (seconds, finite and above 0; None: no limit), as requests' own ``timeout=`` does,
    for every call through the agent that passes no ``timeout=`` of its own. (requests
    cannot tell ``timeout=None`` from no ``timeout=``: a call that must wait without limit
    on a session with a timeout passes ``timeout=(None, None)``.)

    The session may be used after ``os.fork()``: the child opens connections of its own.
    """
    timeout = _checked_timeout(timeout)
    problem = host_problem(host)
    if problem is not None:
        raise BadRequest(f"the host is not valid: {problem}")
    if user is not None and user_problem(user) is not None:
        raise BadRequest(f"the user is not valid: {user_problem(user)}")
    path = socket_path or http_socket_path()
    # As UTF-8 bytes, which the agent reads: requests would send a str as latin-1.
    choice = {}
    if user is not None:
        choice["X-Keyagent-User"] = user.encode()
    if key_id is not None:
        choice["X-Keyagent-Key-Id"] = key_id.encode()
    session = requests.Session()
    session.trust_env = False  # no proxy, no .netrc: this goes to a local socket
    adapter = _AgentAdapter(host, path, timeout, choice)
    session.mount(f"https://{host}/", adapter)
    twin = _port_443_twin(host)
    if twin is not None:
        session.mount(f"https://{twin}/", adapter)
    return session


def _port_443_twin(host: str) -> str | None:
    """The other spelling of ``host`` on the default port (``name`` for ``name:443``, and
    the reverse), whose URLs go to the same service; None if ``host`` names another port."""
    if host.endswith(":443"):
        return host.removesuffix(":443")
    if ":" in host.rpartition("]")[2]:  # a port, after an IPv6 literal's brackets if any
        return None
    return f"{host}:443"
