"""Request logic: one ``process_<op>`` per operation, like OpenSSH's ssh-agent. No sockets.

A handler returns the reply's result, raises a :class:`~keyagent.errors.KeyagentError`, or
returns an outcome that the server completes later:

* :class:`Deferred` — slow or blocking work (scrypt, a Conduce call, the OS keyring) that
  runs on a worker thread; its ``finish`` step runs back on the event loop, the only place
  that touches the store, so no lock is ever held across slow work.
* :class:`Delayed` — a reply held back (a failed unlock) without stalling other clients.
* :class:`Stop` — reply, then shut the agent down.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from keyagent import __version__
from keyagent.errors import (
    BadPassphrase,
    BadRequest,
    KeyagentError,
    Locked,
    NotLocked,
    UnknownOp,
)
from keyagent.protocol import MAX_LIFETIME, OPS, PROTOCOL_VERSION, Request
from keyagent.store import KeyStore, Lock, derive, new_salt

log = logging.getLogger("keyagent.agent")

Result = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Deferred:
    """Run ``work`` on a worker thread, then ``finish(value)`` on the event loop.

    ``queue`` names a serialisation domain: jobs with the same queue run one at a time, in
    order (one Conduce account, the lock passphrase). ``finish`` runs even if the client has
    gone, so a key created remotely is never lost because its requester hung up.
    """

    work: Callable[[], Any] = field(repr=False)
    finish: Callable[[Any], Outcome] = field(repr=False)
    queue: str | None = None
    fail: Callable[[KeyagentError], Outcome] | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Delayed:
    """Send ``then`` (a result or an error) after ``seconds``."""

    seconds: float
    then: Result | KeyagentError


@dataclass(frozen=True, slots=True)
class Stop:
    """Send ``result``, then stop the agent."""

    result: Result


Outcome = Result | Deferred | Delayed | Stop

ALLOWED_WHILE_LOCKED: Final = frozenset({"hello", "status", "unlock"})


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is asking: from SO_PEERCRED."""

    pid: int
    uid: int
    gid: int


@dataclass(slots=True)
class Clock:
    """Monotonic time for deadlines, wall time for dates. Tests pass a fake."""

    monotonic: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time


class Agent:
    """The agent's state and its request handlers."""

    def __init__(
        self,
        *,
        socket_path: str = "",
        default_lifetime: float | None = None,
        clock: Clock | None = None,
    ) -> None:
        if default_lifetime is not None and not 0 < default_lifetime <= MAX_LIFETIME:
            raise ValueError("the default lifetime must be positive and at most ten years")
        self.clock = clock or Clock()
        self.socket_path = socket_path
        self.default_lifetime = default_lifetime
        self.held_keys = KeyStore()
        self.lock = Lock()
        self.started = self.clock.monotonic()
        self._handlers: dict[str, Callable[[Mapping[str, Any]], Outcome]] = {
            "hello": self.process_hello,
            "status": self.process_status,
            "add": self.process_add,
            "get": self.process_get,
            "list": self.process_list,
            "forget": self.process_forget,
            "lock": self.process_lock,
            "unlock": self.process_unlock,
            "stop": self.process_stop,
        }

    @property
    def ops(self) -> list[str]:
        return [op for op in OPS if op in self._handlers]

    # --- dispatch ------------------------------------------------------------------------

    def handle(self, request: Request, peer: Peer) -> Outcome:
        """Dispatch one validated request; the locked check comes before any handler."""
        handler = self._handlers.get(request.op)
        if handler is None:
            # Known to the protocol, not served by this agent's configuration.
            raise UnknownOp(
                f"operation '{request.op}' is not available in this agent; upgrade keyagent"
            )
        if self.lock.locked and request.op not in ALLOWED_WHILE_LOCKED:
            raise Locked()
        log.debug("op=%s id=%r pid=%d", request.op, request.id, peer.pid)
        return handler(request.args)

    def reap(self) -> float | None:
        """Drop expired keys; return the next monotonic deadline, if any."""
        expired, next_deadline = self.held_keys.reap(self.clock.monotonic())
        for held in expired:
            log.info("key %s expired", held.key_id)
        return next_deadline

    # --- operations ----------------------------------------------------------------------

    def process_hello(self, args: Mapping[str, Any]) -> Result:
        return {"protocol": PROTOCOL_VERSION, "version": __version__, "ops": self.ops}

    def process_status(self, args: Mapping[str, Any]) -> Result:
        now = self.clock.monotonic()
        return {
            "pid": os.getpid(),
            "socket": self.socket_path,
            "version": __version__,
            "uptime": round(now - self.started, 3),
            "locked": self.lock.locked,
            "keys": sum(1 for _ in self.held_keys.matching(now)),
            "default_lifetime": self.default_lifetime,
            "sessions": [],
        }

    def process_add(self, args: Mapping[str, Any]) -> Result:
        held = self.held_keys.put(
            host=args["host"],
            user=args["user"],
            secret=args["key"],
            now=self.clock.monotonic(),
            wall=self.clock.wall(),
            lifetime=args.get("lifetime", self.default_lifetime),
            description=args.get("description"),
        )
        log.info("added key %s for %s@%s", held.key_id, held.user, held.host)
        return held.listing()

    def process_get(self, args: Mapping[str, Any]) -> Result:
        held = self.held_keys.newest(
            self.clock.monotonic(), args.get("host"), args.get("user"), args.get("key_id")
        )
        log.debug("served key %s", held.key_id)
        return {"key": held.secret, "key_id": held.key_id}

    def process_list(self, args: Mapping[str, Any]) -> Result:
        found = self.held_keys.matching(self.clock.monotonic(), args.get("host"), args.get("user"))
        keys = [held.listing() for held in found]
        keys.reverse()  # oldest first reads best in a table
        return {"keys": keys}

    def process_forget(self, args: Mapping[str, Any]) -> Result:
        everything, key_id = args.get("all", False), args.get("key_id")
        if everything == (key_id is not None):
            raise BadRequest("forget needs either 'key_id' or 'all': true, not both")
        if everything:
            now = self.clock.monotonic()
            forgotten = sum(held.alive(now) for held in self.held_keys.clear())
        else:
            held = self.held_keys.newest(self.clock.monotonic(), key_id=key_id)
            self.held_keys.discard(held.key_id)
            forgotten = 1
        log.info("forgot %d key(s)", forgotten)
        return {"forgotten": forgotten}

    def process_lock(self, args: Mapping[str, Any]) -> Outcome:
        if self.lock.locked:
            raise Locked("the agent is already locked; run keyagent-ctl unlock first")
        passphrase: str = args["passphrase"]
        salt = new_salt()

        def finish(digest: bytes) -> Result:
            self.lock.engage(salt, digest)
            log.info("agent locked")
            return {"locked": True}

        return Deferred(work=lambda: derive(passphrase, salt), finish=finish, queue="lock")

    def process_unlock(self, args: Mapping[str, Any]) -> Outcome:
        salt = self.lock.salt
        if salt is None:
            raise NotLocked()
        passphrase: str = args["passphrase"]

        def finish(candidate: bytes) -> Outcome:
            if self.lock.salt != salt:  # unlocked (and maybe re-locked) meanwhile
                raise NotLocked("the agent was unlocked by another client meanwhile")
            if self.lock.try_release(candidate):
                log.info("agent unlocked")
                return {"locked": False}
            delay = self.lock.failure_delay()
            log.warning("failed unlock attempt %d; reply held %.1fs", self.lock.failures, delay)
            return Delayed(delay, BadPassphrase())

        return Deferred(work=lambda: derive(passphrase, salt), finish=finish, queue="lock")

    def process_stop(self, args: Mapping[str, Any]) -> Outcome:
        log.info("stop requested")
        return Stop({"stopping": True})
