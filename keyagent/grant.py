"""What the agent lends one proxied request: the credential header and whose it is.

Made on the agent's event loop (:meth:`keyagent.agent.Agent.authorize_proxy`) and used by
an HTTP worker process (:mod:`keyagent.proxy_worker`), so it crosses a socket: :meth:`Grant.
to_wire` and :meth:`Grant.from_wire` are its only encoding. Kept apart from
:mod:`keyagent.agent` so that a worker never loads the agent's code.
"""

from __future__ import annotations

from keyagent.errors import Internal

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from keyagent.store import HeldKey

__all__ = ["MIN_COOKIE_SECRET", "Grant"]

MIN_COOKIE_SECRET = 8
"""The shortest session cookie value taken for a credential (a session token is longer)."""


class Grant:
    """Credentials lent to one proxied request (:mod:`keyagent.proxy`): the header to send
    and whose they are. Lives in a worker for that request, or for the requests of one
    keep-alive connection while :attr:`token` says nothing changed."""

    __slots__ = (
        "confirmed", "deadline", "digest", "header", "host", "key_id", "mark", "session",
        "token", "user", "value",
    )  # fmt: skip

    def __init__(
        self,
        host: str,
        user: str,
        *,
        header: str,
        value: str,
        digest: str | None = None,
        key_id: str | None = None,
        deadline: float | None = None,
        confirmed: bool = False,
        token: object = None,
        mark: str | None = None,
    ) -> None:
        self.host, self.user = host, user
        self.header, self.value = header, value
        self.digest = digest
        """The held key's digest; None for the account's session (cookie)."""
        self.key_id = key_id
        self.deadline = deadline
        """When the held key expires (the agent's monotonic clock), if it does."""
        self.session = digest is None
        """Whether this is the account's session (cookie) rather than a held key."""
        self.confirmed = confirmed
        """Whether the user was asked and allowed it: the connection need not ask again."""
        self.mark = mark
        """What the agent remembers as confirmed on the connection (see :meth:`keyagent.
        agent.Agent.use_mark`); None for a grant that was not asked about. Not sent to a
        worker."""
        self.token = token
        """What the agent's credentials looked like when lent (:meth:`keyagent.agent.Agent.
        credentials_token` on the loop; a generation number in a worker): while it is
        unchanged, and the key's deadline has not passed, the same request on the same
        connection would get the same grant, so the connection may reuse it."""

    @classmethod
    def of_key(cls, held: HeldKey, *, confirmed: bool, token: object, mark: str) -> Grant:
        """A held key lent as a bearer token."""
        return cls(
            held.host, held.user, header="Authorization", value=f"Bearer {held.secret}",
            digest=held.digest, key_id=held.key_id, deadline=held.deadline,
            confirmed=confirmed, token=token, mark=mark,
        )  # fmt: skip

    def secrets(self) -> list[str]:
        """What must never reach the tool: the key, or each cookie value of the session that
        could be a credential. A shorter cookie (``seen=1``, ``lang=en``, an empty one)
        is no secret, and looking for it would strip every header that happens to hold
        it (a ``Content-Length: 1234``, say)."""
        if self.header == "Authorization":
            return [self.value.removeprefix("Bearer ")]
        values = (part.partition("=")[2] for part in self.value.split("; ") if "=" in part)
        return [value for value in values if len(value) >= MIN_COOKIE_SECRET]

    def to_wire(self, token: int) -> dict[str, Any]:
        """As sent to a worker, with ``token`` (a generation number) in place of the loop's."""
        return {
            "host": self.host, "user": self.user, "header": self.header, "value": self.value,
            "session": self.session, "digest": self.digest, "key_id": self.key_id,
            "confirmed": self.confirmed, "token": token, "deadline": self.deadline,
        }  # fmt: skip

    @classmethod
    def from_wire(cls, data: Any) -> Grant:
        """A grant as :meth:`to_wire` sent it; :class:`~keyagent.errors.Internal` if it is
        not one (the agent and its workers are one program: a bad grant is a bug)."""
        try:
            host, user, header, value = data["host"], data["user"], data["header"], data["value"]
            digest, key_id, deadline = data["digest"], data["key_id"], data["deadline"]
            session, confirmed, token = data["session"], data["confirmed"], data["token"]
        except (KeyError, TypeError):
            raise Internal() from None
        if not (
            all(isinstance(text, str) for text in (host, user, value))
            and header in ("Authorization", "Cookie")
            and all(isinstance(text, str | None) for text in (digest, key_id))
            and (deadline is None or type(deadline) in (int, float))
            and type(token) is int
            and session is (digest is None)
            and type(confirmed) is bool
        ):
            raise Internal()
        return cls(
            host, user, header=header, value=value, digest=digest, key_id=key_id,
            deadline=deadline, confirmed=confirmed, token=token,
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"Grant(host={self.host!r}, user={self.user!r}, key_id={self.key_id!r})"
