"""Small fakes shared by the unit tests of the agent: a Conduce account, a clock, and the
way to run a request through the agent with the effects driver's inline mode."""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import GeneratorType
from typing import TYPE_CHECKING, Any

import pytest

from keyagent import errors
from keyagent.agent import Agent, Clock, Follow, Peer, Stop
from keyagent.effects import InlineDriver, Job, perform
from keyagent.protocol import Request, encode_request, parse_request

if TYPE_CHECKING:
    from keyagent.agent import Outcome
    from keyagent.effects import Steps
    from keyagent.sessions import ListedKey

PEER = Peer(pid=1, uid=0, gid=0)

VALID_ARGS: dict[str, dict[str, Any]] = {
    "hello": {},
    "status": {},
    "add": {"host": "app.conduce.com", "user": "ada@example.com", "key": "k-123"},
    "get": {},
    "list": {},
    "forget": {"all": True},
    "lock": {"passphrase": "correct horse battery"},
    "unlock": {"passphrase": "correct horse battery"},
    "stop": {},
    "login": {"host": "app.conduce.com", "user": "ada@example.com", "password": "pw"},
    "logout": {"host": "app.conduce.com", "user": "ada@example.com"},
    "create": {"host": "app.conduce.com", "user": "ada@example.com"},
    "remove": {},
    "log": {},
    "prune": {"host": "app.conduce.com", "user": "ada@example.com"},
    "rotate": {},
}
"""For each op, arguments that pass the protocol's validation (the agent and protocol tests)."""
WALL = 1_700_000_000.0
"""FakeTime's wall clock at its start (2023-11-14T22:13:20Z)."""


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
    descriptions: dict[str, str] = field(default_factory=dict)
    created: int = 0
    issue: list[str] = field(default_factory=list)
    """Keys ``create_key`` hands out next, in order, before making up its own."""
    failures: list[errors.KeyagentError] = field(default_factory=list)
    """Errors the next calls raise, one each, in order (after ``fail_next``)."""

    def _auth(self, name: str, api_key: str | None) -> None:
        self.calls.append((name, api_key))
        if self.fail_next is not None:
            failure, self.fail_next = self.fail_next, None
            raise failure
        if self.failures:
            raise self.failures.pop(0)
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
        if not password:
            raise errors.BadRequest("the password must not be empty; enter it again")
        if password != self.password:
            raise errors.BadCredentials()
        self.session, self.session_alive = True, True

    def logout(self) -> None:
        self.session = False

    def validate(self) -> bool:
        self.calls.append(("validate", None))
        if self.fail_next is not None:
            failure, self.fail_next = self.fail_next, None
            raise failure
        if not self.session_alive:
            self.session = False
        return self.session and self.session_alive

    def list_keys(self, api_key: str | None = None) -> Sequence[ListedKey]:
        self._auth("list", api_key)
        return [Listed(key, self.descriptions.get(key, "")) for key in self.keys]

    def create_key(self, description: str, api_key: str | None = None) -> str:
        self._auth("create", api_key)
        self.created += 1
        key = self.issue.pop(0) if self.issue else f"created-key-{self.created:04d}-abcdefgh"
        self.keys.append(key)
        self.descriptions[key] = description
        return key

    def delete_key(self, key: str, api_key: str | None = None) -> None:
        self._auth("delete", api_key)
        if key not in self.keys:
            raise errors.NotFound()
        self.keys.remove(key)

    def close(self) -> None:
        self.session = False

    def session_cookie(self) -> str | None:
        return "session=fake-session-cookie" if self.session else None


class FakeTime:
    """A clock that only moves when told to; monotonic and wall time move together."""

    def __init__(self) -> None:
        self.monotonic = 1000.0
        self.wall = WALL

    def advance(self, seconds: float) -> None:
        self.monotonic += seconds
        self.wall += seconds

    def clock(self) -> Clock:
        return Clock(monotonic=self._monotonic, wall=self._wall)

    def _monotonic(self) -> float:
        return self.monotonic

    def _wall(self) -> float:
        return self.wall


class HeldWorkDriver(InlineDriver):
    """The inline driver, except that work waits in ``held`` until the test ends it with
    :meth:`end`: so a deadline can pass before the work ends."""

    def __init__(self, time: FakeTime) -> None:
        super().__init__(time.clock().monotonic, time.advance)
        self.held: list[Job] = []

    def run_job(self, job: Job) -> None:
        self.held.append(job)

    def end(self, job: Job) -> None:
        """Do the held job's work now, and hand its outcome back."""
        self.held.remove(job)
        value, error = perform(job.work)
        self.job_ended(job, value, error)


_drivers: weakref.WeakKeyDictionary[Agent, InlineDriver] = weakref.WeakKeyDictionary()


def driver_for(agent: Agent) -> InlineDriver:
    """The agent's inline driver (the server's stepping, with work done inline), made on first
    use; it runs the agent's background work too. A wait moves the agent's FakeTime."""
    driver = _drivers.get(agent)
    if driver is None:
        fake = getattr(agent.clock.monotonic, "__self__", None)
        # On the real clock a wait (a wrong passphrase's delay) is really waited out.
        advance = fake.advance if isinstance(fake, FakeTime) else time.sleep
        driver = _drivers[agent] = InlineDriver(agent.clock.monotonic, advance)
        agent.driven_by(driver.start_background)
    return driver


def settle(agent: Agent, outcome: Outcome) -> dict[str, Any] | Stop:
    """What a handler's outcome comes to: a generator is driven to its end, inline."""
    if isinstance(outcome, dict | Stop):
        return outcome
    if isinstance(outcome, Follow):  # the entries so far; following needs a server
        return outcome.result
    result: dict[str, Any] | Stop = driver_for(agent).run(outcome)
    return result


def run(agent: Agent, op: str, **args: Any) -> dict[str, Any]:
    """Handle one request (as the server hands it over: validated), waiting inline; its result."""
    outcome = settle(agent, agent.handle(request(op, **args), PEER))
    assert isinstance(outcome, dict)
    return outcome


def fails(agent: Agent, op: str, **args: Any) -> errors.KeyagentError:
    """Handle one request that must fail; its error."""
    with pytest.raises(errors.KeyagentError) as caught:
        settle(agent, agent.handle(request(op, **args), PEER))
    assert not isinstance(caught.value, errors.Internal), "a bug, not a refusal"
    return caught.value


def steps(agent: Agent, op: str, **args: Any) -> Steps:
    """The generator of a handler that waits, not started: to step it by hand."""
    outcome = agent.handle(request(op, **args), PEER)
    assert isinstance(outcome, GeneratorType), op
    return outcome


def request(op: str, request_id: int = 1, **args: Any) -> Request:
    """A request as the server hands it to the agent: encoded, then parsed and validated."""
    return parse_request(encode_request(op, request_id, args)[:-1])
