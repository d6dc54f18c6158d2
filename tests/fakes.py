"""Small fakes shared by the unit tests of the agent: a Conduce account, a clock."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from keyagent import errors
from keyagent.agent import Agent, Clock, Deferred, Peer
from keyagent.protocol import Request

if TYPE_CHECKING:
    from keyagent.agent import Outcome
    from keyagent.sessions import ListedKey

PEER = Peer(pid=1, uid=0, gid=0)


@dataclass
class Listed:
    key: str
    description: str = ""
    created: str | None = None

    def masked(self) -> str:
        return f"{self.key[:4]}…{self.key[-4:]}"


@dataclass
class FakeAccount:
    """An in-memory Conduce account; ``session_alive`` decides what the cookie can do."""

    password: str = "pw"
    session: bool = False
    session_alive: bool = True
    keys: list[str] = field(default_factory=list)
    calls: list[tuple[str, str | None]] = field(default_factory=list)
    fail_next: errors.KeyagentError | None = None
    issue: list[str] = field(default_factory=list)
    """Keys ``create_key`` hands out next, in order, before making up its own."""

    def _auth(self, name: str, api_key: str | None) -> None:
        self.calls.append((name, api_key))
        if self.fail_next is not None:
            failure, self.fail_next = self.fail_next, None
            raise failure
        if api_key is None:
            if not self.session:
                raise errors.LoginRequired()
            if not self.session_alive:
                self.session = False
                raise errors.SessionExpired()
        elif api_key not in self.keys:
            raise errors.BadCredentials("the service rejected the API key")

    def login(self, password: str) -> None:
        self.calls.append(("login", None))
        if password != self.password:
            raise errors.BadCredentials()
        self.session, self.session_alive = True, True

    def logout(self) -> None:
        self.session = False

    def validate(self) -> bool:
        self.calls.append(("validate", None))
        if not self.session_alive:
            self.session = False
        return self.session and self.session_alive

    def list_keys(self, api_key: str | None = None) -> Sequence[ListedKey]:
        self._auth("list", api_key)
        return [Listed(key) for key in self.keys]

    def create_key(self, description: str, api_key: str | None = None) -> str:
        self._auth("create", api_key)
        key = self.issue.pop(0) if self.issue else f"created-key-{len(self.keys):04d}-abcdefgh"
        self.keys.append(key)
        return key

    def delete_key(self, key: str, api_key: str | None = None) -> None:
        self._auth("delete", api_key)
        if key not in self.keys:
            raise errors.NotFound()
        self.keys.remove(key)

    def close(self) -> None:
        self.session = False


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def clock(self) -> Clock:
        return Clock(monotonic=lambda: self.now, wall=lambda: 1_700_000_000.0 + self.now)


def complete(outcome: Outcome) -> Outcome:
    """Finish deferred work inline, as the server would (without deadlines)."""
    while isinstance(outcome, Deferred):
        try:
            value = outcome.work()
        except errors.KeyagentError as error:
            if outcome.fail is None:
                raise
            outcome = outcome.fail(error)
        else:
            outcome = outcome.finish(value)
    return outcome


def run(agent: Agent, op: str, **args: Any) -> dict[str, Any]:
    """Handle one request, completing deferred work inline; return its result."""
    outcome = complete(agent.handle(Request(1, op, args), PEER))
    assert isinstance(outcome, dict)
    return outcome
