"""Conduce sessions as the agent tracks them, and how a remote call picks its credentials.

No ``requests`` here: an account is anything shaped like :class:`RemoteAccount`
(:class:`keyagent.conduce.ConduceAccount` in the daemon, a fake in unit tests).

A remote call prefers the session cookie. A session idle for longer than the validation
interval is checked first (``user/validate-session``). If the session is missing or turns
out expired and the agent holds an API key for the account, the key authenticates the call
instead (``Authorization: Bearer``): any Conduce request accepts one. Only when neither
works does the caller get ``login_required`` or ``session_expired``.
"""

from __future__ import annotations

from collections import namedtuple

from keyagent.errors import BadCredentials, LoginRequired, SessionExpired
from keyagent.store import iso

TYPE_CHECKING = False
if TYPE_CHECKING:
    # Interfaces for the type checker only: the agent's core never imports typing.
    from collections.abc import Callable, Sequence
    from typing import Any, Protocol

    class ListedKey(Protocol):
        """A key as the service lists it (see :class:`keyagent.conduce.RemoteKey`)."""

        @property
        def key(self) -> str: ...
        @property
        def description(self) -> str: ...
        @property
        def created(self) -> str | None: ...
        def masked(self) -> str: ...

    class RemoteAccount(Protocol):
        """One Conduce account (host + user); its methods block and run on worker threads."""

        def login(self, password: str) -> None: ...
        def logout(self) -> None: ...
        def validate(self) -> bool: ...
        def list_keys(self, api_key: str | None = None) -> Sequence[ListedKey]: ...
        def create_key(self, description: str, api_key: str | None = None) -> str: ...
        def delete_key(self, key: str, api_key: str | None = None) -> None: ...
        def close(self) -> None: ...
        def session_cookie(self) -> str | None: ...

    AccountFactory = Callable[[str, str], RemoteAccount]


class LazyAccount:
    """Builds the real account on its first call, on the worker thread that makes the call.

    Keeps ``requests`` (tens of milliseconds and megabytes to import) out of the agent until
    a Conduce operation is actually used, and off the event loop when it is.
    """

    def __init__(self, host: str, user: str, factory: AccountFactory) -> None:
        self.host, self.user = host, user
        self._factory = factory
        self._account: RemoteAccount | None = None

    def __repr__(self) -> str:
        return f"LazyAccount(host={self.host!r}, user={self.user!r})"

    def _real(self) -> RemoteAccount:
        if self._account is None:
            self._account = self._factory(self.host, self.user)
        return self._account

    def login(self, password: str) -> None:
        self._real().login(password)

    def logout(self) -> None:
        if self._account is not None:
            self._account.logout()

    def validate(self) -> bool:
        return self._real().validate()

    def list_keys(self, api_key: str | None = None) -> Sequence[ListedKey]:
        return self._real().list_keys(api_key)

    def create_key(self, description: str, api_key: str | None = None) -> str:
        return self._real().create_key(description, api_key)

    def delete_key(self, key: str, api_key: str | None = None) -> None:
        self._real().delete_key(key, api_key)

    def close(self) -> None:
        if self._account is not None:
            self._account.close()

    def session_cookie(self) -> str | None:
        return None if self._account is None else self._account.session_cookie()


class Session:
    """What the agent knows of one account's session. The cookie itself stays in ``account``."""

    changes: int = 0
    """Counts every session of the process going live or ending: a credential lent through
    the HTTP socket is reused on its connection only while this, the keys and the lock are
    as they were (see :meth:`keyagent.agent.Agent.credentials_token`)."""

    logins: int = 0
    """Counts logins of the process: each session's :attr:`mark` is its own."""

    __slots__ = (
        "host", "user", "account", "logged_in", "expired", "since", "checked", "checked_wall",
        "confirm", "allowed_exes", "mark", "renewing", "tentative",
    )  # fmt: skip

    def __init__(
        self,
        host: str,
        user: str,
        account: RemoteAccount,
        *,
        logged_in: bool = False,
        expired: bool = False,
        since: float | None = None,
        checked: float | None = None,
        checked_wall: float | None = None,
    ) -> None:
        self.host = host
        self.user = user
        self.account = account
        self.logged_in = logged_in
        self.expired = expired
        self.since = since
        """Wall time of the login."""
        self.checked = checked
        """Monotonic time the session last proved alive (login, validation or a call)."""
        self.checked_wall = checked_wall
        self.confirm = False
        """Each proxied use asks the user first (``login --confirm``), as for a held key."""
        self.allowed_exes: tuple[str, ...] = ()
        """The only programs whose proxied requests it is lent for (``login --allow-exe``)."""
        self.mark = ""
        """Names this login (not the account) in a connection's record of what the user
        confirmed on it: a later login asks again."""
        self.tentative = False
        """Made by a login for an account the agent did not know, which has not succeeded
        yet: dropped if every such login fails (status would list it for good)."""
        self.renewing = 0
        """Logins under way (they wait in line on :attr:`queue`): the account's cookie may be
        a new login's already while the rules and mark are still the old one's, so the
        session is not lent meanwhile."""

    def __repr__(self) -> str:
        # Not the account: it holds the session cookie.
        return (
            f"Session(host={self.host!r}, user={self.user!r}, logged_in={self.logged_in!r}, "
            f"expired={self.expired!r}, since={self.since!r}, checked={self.checked!r}, "
            f"checked_wall={self.checked_wall!r}, confirm={self.confirm!r}, "
            f"allowed_exes={self.allowed_exes!r})"
        )

    @property
    def queue(self) -> str:
        """Serialisation domain: one remote call at a time per account."""
        return f"account\0{self.host}\0{self.user}"

    @property
    def live(self) -> bool:
        return self.logged_in and not self.expired

    def state(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "user": self.user,
            "logged_in": self.logged_in,
            "expired": self.expired,
            "since": iso(self.since),
            "last_validated": iso(self.checked_wall),
            "confirm": self.confirm,
            "allowed_exes": list(self.allowed_exes),
        }

    def began(
        self, now: float, wall: float, *, confirm: bool = False, allowed_exes: tuple[str, ...] = ()
    ) -> None:
        """Logged in, perhaps again: a new cookie, so what was lent with any earlier one (a
        grant of the HTTP socket) is stale, even if a session was live before. The rules
        are this login's: those of an earlier one do not carry over."""
        if self.live:  # proved_alive counts only a session going live
            Session.changes += 1
        self.proved_alive(now, wall)
        self.since = wall
        self.tentative = False
        self.confirm, self.allowed_exes = confirm, allowed_exes
        Session.logins += 1
        self.mark = f"session {Session.logins}"

    def proved_alive(self, now: float, wall: float) -> None:
        if not self.live:
            Session.changes += 1
        self.logged_in, self.expired = True, False
        self.checked, self.checked_wall = now, wall

    def mark_expired(self) -> None:
        if self.logged_in:
            Session.changes += 1
            self.expired = True

    def end(self) -> None:
        """Logged out: no session any more."""
        Session.changes += 1
        self.logged_in = self.expired = False
        self.since = self.checked = self.checked_wall = None
        self.confirm, self.allowed_exes, self.mark = False, (), ""


class Plan(namedtuple("Plan", ["use_session", "validate_first", "api_keys"], defaults=[()])):
    """The credentials a remote call may use, decided on the event loop.

    ``api_keys``: held keys of the account, newest first; tried in turn when the service
    rejects one.
    """

    __slots__ = ()

    use_session: bool
    validate_first: bool
    api_keys: tuple[str, ...]

    def __repr__(self) -> str:
        return f"Plan(use_session={self.use_session!r}, validate_first={self.validate_first!r})"


class RemoteResult(namedtuple("RemoteResult", ["value", "session_alive", "session_expired"])):
    """What a remote call returned, and what it learnt about the session."""

    __slots__ = ()

    value: Any
    session_alive: bool
    session_expired: bool

    def __repr__(self) -> str:
        # Not the value: a created key, for one.
        return (
            f"RemoteResult(session_alive={self.session_alive!r}, "
            f"session_expired={self.session_expired!r})"
        )


def run_remote(
    account: RemoteAccount, plan: Plan, call: Callable[[str | None], Any], *, host: str, user: str
) -> RemoteResult:
    """Run ``call`` (given an API key, or None for the session) with the best credentials.

    Runs on a worker thread. A 401 means the service did not act on the request, so trying
    again with an API key is safe even for create and delete.
    """
    expired = False
    if plan.use_session:
        if plan.validate_first and not account.validate():
            expired = True
        else:
            try:
                return RemoteResult(call(None), session_alive=True, session_expired=False)
            except SessionExpired:
                if not plan.api_keys:
                    raise
                expired = True
    for position, api_key in enumerate(plan.api_keys):
        try:
            return RemoteResult(call(api_key), session_alive=False, session_expired=expired)
        except BadCredentials:
            # A revoked key held here: the service did not act, so the next one may try.
            if position == len(plan.api_keys) - 1:
                raise
    if expired:
        raise SessionExpired(
            f"the session of {user} on {host} has expired; run keyagent-ctl login again"
        )
    raise LoginRequired(f"no session and no API key for {user} on {host}; run keyagent-ctl login")
