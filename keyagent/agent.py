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

import collections
import os
import time
from collections.abc import Callable, Iterable, Mapping

from keyagent import __version__
from keyagent._record import Frozen, Record, set_field
from keyagent.errors import (
    Ambiguous,
    BadPassphrase,
    BadRequest,
    KeyagentError,
    KeyringUnavailable,
    Locked,
    NotFound,
    NotLocked,
    RemoteError,
    SessionExpired,
    TooMany,
    UnknownOp,
)
from keyagent.log import get_logger
from keyagent.persist import KeyringStore, PersistedKey
from keyagent.protocol import KEY_ID_MAX, KEY_ID_SHOWN, MAX_LIFETIME, OPS, PROTOCOL_VERSION, Request
from keyagent.sessions import Plan, RemoteResult, Session, run_remote
from keyagent.store import HeldKey, KeyStore, Lock, derive, digest_of, iso, new_salt

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see _record.py)
if TYPE_CHECKING:
    from typing import Any, Final

    from keyagent.sessions import AccountFactory

    Result = dict[str, Any]

log = get_logger("keyagent.agent")


class Deferred(Frozen):
    """Run ``work`` on a worker thread, then ``finish(value)`` on the event loop.

    ``queue`` names a serialisation domain: jobs with the same queue run one at a time, in
    order (one Conduce account, the lock passphrase). ``finish`` runs even if the client has
    gone, so a key created remotely is never lost because its requester hung up.

    ``timeout``: answer with ``timeout_error()`` if the work has not finished this many
    seconds after it was submitted (queued time included); a result that comes later is
    discarded. ``late`` is then called on the loop with that result, to bring the agent in
    line with what the work did (the client was told it failed).
    """

    __slots__ = ("work", "finish", "queue", "fail", "timeout", "timeout_error", "late")
    _hidden = frozenset({"work", "finish", "fail", "timeout_error", "late"})

    work: Callable[[], Any]
    finish: Callable[[Any], Outcome]
    queue: str | None
    fail: Callable[[KeyagentError], Outcome] | None
    timeout: float | None
    timeout_error: Callable[[], KeyagentError] | None
    late: Callable[[Any], object] | None

    def __init__(
        self,
        work: Callable[[], Any],
        finish: Callable[[Any], Outcome],
        *,
        queue: str | None = None,
        fail: Callable[[KeyagentError], Outcome] | None = None,
        timeout: float | None = None,
        timeout_error: Callable[[], KeyagentError] | None = None,
        late: Callable[[Any], object] | None = None,
    ) -> None:
        set_field(self, "work", work)
        set_field(self, "finish", finish)
        set_field(self, "queue", queue)
        set_field(self, "fail", fail)
        set_field(self, "timeout", timeout)
        set_field(self, "timeout_error", timeout_error)
        set_field(self, "late", late)


class Delayed(Frozen):
    """Send ``then`` (a result or an error) after ``seconds``."""

    __slots__ = ("seconds", "then")

    seconds: float
    then: Result | KeyagentError

    def __init__(self, seconds: float, then: Result | KeyagentError) -> None:
        set_field(self, "seconds", seconds)
        set_field(self, "then", then)


class Stop(Frozen):
    """Send ``result``, then stop the agent."""

    __slots__ = ("result",)

    result: Result

    def __init__(self, result: Result) -> None:
        set_field(self, "result", result)


if TYPE_CHECKING:
    Outcome = Result | Deferred | Delayed | Stop

ALLOWED_WHILE_LOCKED: Final = frozenset({"hello", "status", "unlock", "stop"})
"""Stopping reveals nothing (ssh-agent can be killed while locked too)."""
MEMOIZABLE: Final = frozenset({"get", "hello"})
"""Operations whose reply depends only on :meth:`Agent.state_token` and the clock."""
MAX_ACCOUNTS: Final = 64
"""Conduce accounts tracked at once; logged-out ones are forgotten first."""
MAX_KEY_ATTEMPTS: Final = 3
"""Held keys a remote call may try in turn after the service rejects one (e.g. revoked)."""


class Peer(Frozen):
    """Who is asking: from SO_PEERCRED."""

    __slots__ = ("pid", "uid", "gid")

    pid: int
    uid: int
    gid: int

    def __init__(self, pid: int, uid: int, gid: int) -> None:
        set_field(self, "pid", pid)
        set_field(self, "uid", uid)
        set_field(self, "gid", gid)


class Clock(Record):
    """Monotonic time for deadlines, wall time for dates. Tests pass a fake."""

    __slots__ = ("monotonic", "wall")

    def __init__(
        self,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.monotonic = monotonic
        self.wall = wall


class Agent:
    """The agent's state and its request handlers."""

    def __init__(
        self,
        *,
        socket_path: str = "",
        default_lifetime: float | None = None,
        default_persist: bool = False,
        clock: Clock | None = None,
        accounts: AccountFactory | None = None,
        validate_after: float = 300.0,
        keyring: KeyringStore | None = None,
        keyring_timeout: float = 10.0,
        max_keys: int | None = None,
    ) -> None:
        if default_lifetime is not None and not 0 < default_lifetime <= MAX_LIFETIME:
            raise ValueError("the default lifetime must be positive and at most ten years")
        self.clock = clock or Clock()
        self.socket_path = socket_path
        self.default_lifetime = default_lifetime
        self.default_persist = default_persist
        self.held_keys = KeyStore(max_keys)
        self.lock = Lock()
        self.lock_in_keyring = False
        """Whether the OS keyring may hold this lock's hash (see :meth:`process_lock`)."""
        self.started = self.clock.monotonic()
        self.sessions: dict[tuple[str, str], Session] = {}
        self.background: collections.deque[Deferred] = collections.deque()
        """Work the agent starts on its own; the server runs it with no client waiting."""
        self._accounts = accounts
        self.validate_after = validate_after
        self.keyring = keyring
        self.keyring_timeout = keyring_timeout
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
        if accounts is not None:
            self._handlers.update(
                login=self.process_login,
                logout=self.process_logout,
                create=self.process_create,
                remove=self.process_remove,
            )

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

    def state_token(self) -> tuple[int, bool]:
        """Changes whenever a ``get`` or ``hello`` could be answered differently."""
        return self.held_keys.version, self.lock.locked

    def reap(self) -> float | None:
        """Drop expired keys; return the next monotonic deadline, if any."""
        expired, next_deadline = self.held_keys.reap(self.clock.monotonic())
        for held in expired:
            log.info("key %s expired", held.key_id)
            if held.persisted and self.keyring is not None:
                # Lifetimes bind the keyring copy too: delete it, with no client waiting.
                self.background.append(self._keyring(_deleter(held.digest), _ignore))
        return next_deadline

    def restore(self, keys: Iterable[PersistedKey], lock: tuple[bytes, bytes] | None = None) -> int:
        """Hold keys read back from the OS keyring (at start-up); returns how many.

        ``lock``: the salt and hash of the lock the agent had when it stopped; the agent
        starts locked if any key came back, so a restart does not unlock persisted keys.
        """
        now, wall = self.clock.monotonic(), self.clock.wall()
        count = 0
        for key in keys:
            lifetime = None if key.expires is None else key.expires - wall
            if lifetime is not None and lifetime <= 0:
                continue
            try:
                self.held_keys.put(
                    host=key.host, user=key.user, secret=key.secret, now=now, wall=wall,
                    lifetime=min(lifetime, MAX_LIFETIME) if lifetime is not None else None,
                    description=key.description, created=key.created, source="keyring",
                    persisted=True,
                )  # fmt: skip
            except TooMany as error:
                log.warning("not every persisted key was restored: %s", error.message)
                break
            count += 1
        log.info("restored %d key(s) from the OS keyring", count)
        if lock is not None:
            self.lock_in_keyring = True
            if count:
                self.lock.engage(*lock)
                log.info("the agent was locked when it stopped: it starts locked")
            else:  # nothing to protect: a stale record must not lock an empty agent
                self._forget_stored_lock()
        return count

    # --- the OS keyring ------------------------------------------------------------------

    def _record(
        self,
        secret: str,
        *,
        host: str,
        user: str,
        description: str,
        created: str | None,
        lifetime: float | None,
    ) -> PersistedKey:
        expires = None if lifetime is None else self.clock.wall() + lifetime
        return PersistedKey(
            digest=digest_of(secret), host=host, user=user, secret=secret,
            description=description, created=created, expires=expires,
        )  # fmt: skip

    def _keyring(
        self,
        work: Callable[[KeyringStore], Any],
        finish: Callable[[Any], Outcome],
        fail: Callable[[KeyagentError], Outcome] | None = None,
        *,
        late: Callable[[Any], object] | None = None,
    ) -> Deferred:
        """Run ``work`` on the OS keyring, off the loop, one call at a time, with a deadline."""
        keyring = self.keyring
        if keyring is None:
            raise KeyringUnavailable(
                "this agent has no OS keyring configured; start it without --no-keyring"
            )
        return Deferred(
            work=lambda: work(keyring),
            finish=finish,
            queue="keyring",
            fail=fail,
            timeout=self.keyring_timeout,
            late=late,
            timeout_error=lambda: KeyringUnavailable(
                f"the OS keyring did not answer within {self.keyring_timeout:g} s; it may be "
                "locked and prompting: unlock it and retry"
            ),
        )

    # --- operations ----------------------------------------------------------------------

    def process_hello(self, args: Mapping[str, Any]) -> Result:
        return {"protocol": PROTOCOL_VERSION, "version": __version__, "ops": self.ops}

    def process_status(self, args: Mapping[str, Any]) -> Result:
        now = self.clock.monotonic()
        if self.lock.locked:
            # Like ssh-agent's empty identity list: a locked agent says nothing about what
            # it holds, not even how many keys or which accounts.
            return {
                "pid": os.getpid(),
                "socket": self.socket_path,
                "version": __version__,
                "uptime": round(now - self.started, 3),
                "locked": True,
            }
        return {
            "pid": os.getpid(),
            "socket": self.socket_path,
            "version": __version__,
            "uptime": round(now - self.started, 3),
            "locked": self.lock.locked,
            "keys": sum(1 for _ in self.held_keys.matching(now)),
            "default_lifetime": self.default_lifetime,
            "sessions": [session.state() for session in self.sessions.values()],
        }

    def process_add(self, args: Mapping[str, Any]) -> Outcome:
        lifetime = args.get("lifetime", self.default_lifetime)

        def hold(persisted: bool = False) -> Result:
            held = self.held_keys.put(
                host=args["host"], user=args["user"], secret=args["key"],
                now=self.clock.monotonic(), wall=self.clock.wall(), lifetime=lifetime,
                description=args.get("description"), persisted=persisted,
            )  # fmt: skip
            log.info("added key %s for %s@%s", held.key_id, held.user, held.host)
            return held.listing()

        if not args.get("persist", self.default_persist):
            return hold()
        if self.held_keys.holding(digest_of(args["key"])) is None:
            self._room_for_one()
        # Keyring first, memory second: if the keyring refuses, nothing has changed.
        record = self._record(
            args["key"], host=args["host"], user=args["user"],
            description=args.get("description", ""), created=None, lifetime=lifetime,
        )  # fmt: skip
        # A save that completes after its deadline is undone: the client was told it failed.
        return self._keyring(
            lambda keyring: keyring.save(record),
            lambda _: hold(persisted=True),
            late=lambda _: self.background.append(self._keyring(_deleter(record.digest), _ignore)),
        )

    def process_get(self, args: Mapping[str, Any]) -> Result:
        held = self.held_keys.newest(
            self.clock.monotonic(), args.get("host"), args.get("user"), args.get("key_id")
        )
        log.debug("served key %s", held.key_id)
        return {"key": held.secret, "key_id": held.key_id}

    def process_list(self, args: Mapping[str, Any]) -> Outcome:
        if args.get("remote"):
            return self._list_remote(args)
        found = self.held_keys.matching(self.clock.monotonic(), args.get("host"), args.get("user"))
        keys = [held.listing() for held in found]
        keys.reverse()  # oldest first reads best in a table
        return {"keys": keys}

    def process_forget(self, args: Mapping[str, Any]) -> Outcome:
        everything, key_id = args.get("all", False), args.get("key_id")
        if everything == (key_id is not None):
            raise BadRequest("forget needs either 'key_id' or 'all': true, not both")
        now = self.clock.monotonic()
        if everything:
            targets = None
        else:
            try:
                targets = [self.held_keys.newest(now, key_id=key_id).digest]
            except NotFound:
                # With persist, a full key id may name a keyring entry the agent no longer
                # holds (forgotten without --persist, or left over by a failed remove).
                if not (args.get("persist") and key_id and len(key_id) == KEY_ID_MAX):
                    raise
                targets = [key_id]

        def forget(_: object = None) -> Result:
            if targets is None:
                forgotten = sum(held.alive(now) for held in self.held_keys.clear())
            else:
                forgotten = sum(self.held_keys.discard(target) is not None for target in targets)
            log.info("forgot %d key(s)", forgotten)
            return {"forgotten": forgotten}

        if not args.get("persist"):
            return forget()

        def unpersist(keyring: KeyringStore) -> int:
            if targets is None:
                return keyring.delete_all()
            return sum(keyring.delete(target) for target in targets)

        def finish(removed: int) -> Result:
            result = forget()
            result["unpersisted"] = removed
            return result

        # Keyring first: if it refuses, the keys stay held and the error says so. If it
        # deletes after its deadline, memory follows the keyring.
        return self._keyring(unpersist, finish, late=lambda _: forget())

    def process_lock(self, args: Mapping[str, Any]) -> Outcome:
        if self.lock.locked:
            raise Locked("the agent is already locked; run keyagent-ctl unlock first")
        passphrase: str = args["passphrase"]
        salt = new_salt()

        def finish(digest: bytes) -> Result:
            self.lock.engage(salt, digest)
            log.info("agent locked")
            if self.keyring is not None and any(
                held.persisted for held in self.held_keys.matching(self.clock.monotonic())
            ):
                # Persisted keys come back after a restart: so does the lock, as its salted
                # hash in the keyring. Best effort, with no client waiting: the lock in
                # memory holds whatever the keyring does.
                self.lock_in_keyring = True
                self.background.append(self._keyring(lambda k: k.save_lock(salt, digest), _ignore))
            return {"locked": True}

        return Deferred(work=lambda: derive(passphrase, salt), finish=finish, queue="lock")

    def process_unlock(self, args: Mapping[str, Any]) -> Outcome:
        salt = self.lock.salt
        if salt is None:
            raise NotLocked()
        passphrase: str = args["passphrase"]

        def attempt() -> bytes:  # on a worker, one attempt at a time (the "lock" queue)
            wait = self.lock.not_before - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # a worker thread: only further guesses wait
            return derive(passphrase, salt)

        def finish(candidate: bytes) -> Outcome:
            if self.lock.salt != salt:  # unlocked (and maybe re-locked) meanwhile
                raise NotLocked("the agent was unlocked by another client meanwhile")
            if self.lock.try_release(candidate):
                self.lock.not_before = 0.0
                log.info("agent unlocked")
                self._forget_stored_lock()
                return {"locked": False}
            delay = self.lock.failure_delay()
            self.lock.not_before = time.monotonic() + delay
            log.warning("failed unlock attempt %d; reply held %.1fs", self.lock.failures, delay)
            return Delayed(delay, BadPassphrase())

        return Deferred(work=attempt, finish=finish, queue="lock")

    def _forget_stored_lock(self) -> None:
        if self.lock_in_keyring and self.keyring is not None:
            self.lock_in_keyring = False
            self.background.append(self._keyring(lambda k: k.delete_lock(), _ignore))

    def process_stop(self, args: Mapping[str, Any]) -> Outcome:
        log.info("stop requested")
        return Stop({"stopping": True})

    # --- Conduce operations --------------------------------------------------------------
    # Each runs its network call as a Deferred on the account's queue (one call at a time
    # per account) and applies the outcome to the store and session on the loop.

    def process_login(self, args: Mapping[str, Any]) -> Outcome:
        session = self.session_for(args["host"], args["user"])
        password: str = args["password"]

        def finish(_: None) -> Result:
            session.proved_alive(self.clock.monotonic(), self.clock.wall())
            session.since = self.clock.wall()
            log.info("logged in %s on %s", session.user, session.host)
            return {"host": session.host, "user": session.user, "session": True}

        return Deferred(
            work=lambda: session.account.login(password), finish=finish, queue=session.queue
        )

    def process_logout(self, args: Mapping[str, Any]) -> Outcome:
        if (args["host"], args["user"]) not in self.sessions:  # nothing to drop: track nothing
            return {
                "host": args["host"],
                "user": args["user"],
                "session": False,
                "was_logged_in": False,
            }
        session = self.session_for(args["host"], args["user"])

        def finish(_: None) -> Result:
            had_session = session.logged_in
            session.logged_in = session.expired = False
            session.since = session.checked = session.checked_wall = None
            log.info("logged out %s on %s", session.user, session.host)
            return {
                "host": session.host,
                "user": session.user,
                "session": False,
                "was_logged_in": had_session,
            }

        return Deferred(work=session.account.logout, finish=finish, queue=session.queue)

    def process_create(self, args: Mapping[str, Any]) -> Outcome:
        session = self.session_for(args["host"], args["user"])
        description: str = args.get("description", "created by keyagent")
        lifetime = args.get("lifetime", self.default_lifetime)
        self._room_for_one()  # before the service makes a key the agent could not hold
        plan = self._plan(session)

        def finish(result: RemoteResult) -> Outcome:
            self._learn(session, result)
            already = self.held_keys.holding(digest_of(result.value))
            if already is not None and (already.host, already.user) != (session.host, session.user):
                # A service that answers with a key the agent holds for another account is
                # hostile or broken: holding it here would send that key to this host.
                raise RemoteError(
                    f"the service at {session.host} answered create with a key the agent holds "
                    "for another account; the key was not taken: check the --host you use"
                )
            created = iso(self.clock.wall())
            held = self.held_keys.put(
                host=session.host, user=session.user, secret=result.value,
                now=self.clock.monotonic(), wall=self.clock.wall(), lifetime=lifetime,
                description=description, created=created, source="created",
            )  # fmt: skip
            log.info("created key %s for %s on %s", held.key_id, session.user, session.host)

            def reply(_: object = None) -> Result:
                listing = held.listing()
                if args.get("reveal"):
                    listing["key"] = held.secret
                return listing

            if not args.get("persist", self.default_persist):
                return reply()
            # The key exists on the service and is held now; only its persistence can fail.
            record = self._record(
                held.secret, host=held.host, user=held.user, description=description,
                created=created, lifetime=lifetime,
            )  # fmt: skip

            def persisted(_: object) -> Result:
                held.persisted = True
                return reply()

            def not_persisted(error: KeyagentError) -> Outcome:
                raise KeyringUnavailable(
                    f"created key {held.key_id} and the agent holds it, but it is not in the "
                    f"OS keyring: {error.message}"
                )

            return self._keyring(lambda k: k.save(record), persisted, not_persisted, late=persisted)

        return self._remote(
            session,
            plan,
            lambda key: session.account.create_key(description, api_key=key),
            finish,
        )

    def _list_remote(self, args: Mapping[str, Any]) -> Outcome:
        host, user = args.get("host"), args.get("user")
        if host is None or user is None:
            raise BadRequest("list with remote: true needs both 'host' and 'user'")
        session = self.session_for(host, user)
        plan = self._plan(session)

        def finish(result: RemoteResult) -> Result:
            self._learn(session, result)
            on_service = {digest_of(listed.key): listed for listed in result.value}
            mine = list(self.held_keys.matching(self.clock.monotonic(), host, user))
            held_digests = {held.digest for held in mine}
            keys = [
                {**held.listing(), "stale": held.digest not in on_service}
                for held in reversed(mine)
            ]
            remote = [
                {"key_id": digest[:KEY_ID_SHOWN], "fingerprint": digest,
                 "masked": listed.masked(), "description": listed.description,
                 "created": listed.created, "held": digest in held_digests}
                for digest, listed in on_service.items()
            ]  # fmt: skip
            return {"keys": keys, "remote": remote}

        return self._remote(
            session, plan, lambda key: session.account.list_keys(api_key=key), finish
        )

    def process_remove(self, args: Mapping[str, Any]) -> Outcome:
        key_id, secret = args.get("key_id"), args.get("key")
        if (key_id is None) == (secret is None):
            raise BadRequest("remove needs either 'key_id' or 'key', not both")
        host, user = args.get("host"), args.get("user")
        now = self.clock.monotonic()
        held: HeldKey | None
        if secret is not None:
            held = next(self.held_keys.matching(now, key_id=digest_of(secret)), None)
        else:
            try:
                held = self.held_keys.newest(now, host, user, key_id)
            except NotFound:
                held = None
        if held is not None:
            secret, host, user = held.secret, held.host, held.user
        if host is None or user is None:
            raise NotFound(
                "the agent does not hold that key; give --host and --user to remove a key "
                "it does not hold"
            )
        session = self.session_for(host, user)
        plan = self._plan(session, avoid=held.digest if held else None)
        account = session.account

        def delete(api_key: str | None) -> str:
            target = secret
            if target is None:  # a key id the agent does not hold: find it on the service
                matches = [
                    listed.key
                    for listed in account.list_keys(api_key=api_key)
                    if digest_of(listed.key).startswith(key_id or "")
                ]
                if not matches:
                    raise NotFound(
                        f"no API key with id {key_id} on the service for {user}; "
                        "run keyagent-ctl list --remote"
                    )
                if len(matches) > 1:
                    raise Ambiguous(
                        f"key id {key_id} matches several keys on the service; give more of it"
                    )
                target = matches[0]
            account.delete_key(target, api_key=api_key)
            return digest_of(target)

        def finish(result: RemoteResult) -> Outcome:
            self._learn(session, result)
            digest: str = result.value
            removed = self.held_keys.discard(digest)
            log.info("removed key %s on %s", digest[:KEY_ID_SHOWN], session.host)
            reply = {
                "key_id": digest[:KEY_ID_SHOWN],
                "fingerprint": digest,
                "host": session.host,
                "user": session.user,
                "removed": True,
                "forgotten": 1 if removed else 0,
            }
            if removed is None or not removed.persisted:
                return reply

            def left_behind(error: KeyagentError) -> Outcome:
                raise KeyringUnavailable(
                    f"removed key {digest[:KEY_ID_SHOWN]} on the service and from memory, but "
                    f"its OS keyring entry remains ({error.message}); then run keyagent-ctl "
                    f"forget --persist {digest}"
                )

            return self._keyring(lambda k: k.delete(digest), lambda _: reply, left_behind)

        return self._remote(session, plan, delete, finish)

    # --- helpers for remote operations ---------------------------------------------------

    def _room_for_one(self) -> None:
        limit = self.held_keys.max_keys
        if limit is not None and len(self.held_keys) >= limit:
            raise TooMany(
                f"the agent holds {limit} keys, its limit; forget some (keyagent-ctl forget) "
                "or start it with a larger --max-keys"
            )

    def session_for(self, host: str, user: str) -> Session:
        """The account's session record, created (logged out) on first use."""
        session = self.sessions.get((host, user))
        if session is None:
            assert self._accounts is not None  # noqa: S101  # only remote ops get here
            if len(self.sessions) >= MAX_ACCOUNTS:
                # Forget the oldest account without a session; a client cannot make the
                # agent track any number of accounts it names.
                idle = next((key for key, old in self.sessions.items() if not old.logged_in), None)
                if idle is None:
                    raise BadRequest(
                        f"the agent already has {MAX_ACCOUNTS} accounts logged in; log out of one"
                    )
                del self.sessions[idle]
            session = Session(host, user, self._accounts(host, user))
            self.sessions[(host, user)] = session
        return session

    def _plan(self, session: Session, *, avoid: str | None = None) -> Plan:
        """Pick credentials on the loop: the live session, else a held key of the account."""
        now = self.clock.monotonic()
        held = list(self.held_keys.matching(now, session.host, session.user))
        # The key being removed comes last: it may still authenticate its own removal.
        held.sort(key=lambda candidate: candidate.digest == avoid)
        api_keys = tuple(candidate.secret for candidate in held[:MAX_KEY_ATTEMPTS])
        stale = session.checked is None or now - session.checked > self.validate_after
        return Plan(
            use_session=session.live, validate_first=session.live and stale, api_keys=api_keys
        )

    def _remote(
        self,
        session: Session,
        plan: Plan,
        call: Callable[[str | None], Any],
        finish: Callable[[Any], Outcome],
    ) -> Deferred:
        def work() -> RemoteResult:
            return run_remote(session.account, plan, call, host=session.host, user=session.user)

        def fail(error: KeyagentError) -> Outcome:
            if isinstance(error, SessionExpired):
                session.mark_expired()
                log.info("session of %s on %s expired", session.user, session.host)
            raise error

        return Deferred(work=work, finish=finish, queue=session.queue, fail=fail)

    def _learn(self, session: Session, result: RemoteResult) -> None:
        if result.session_alive:
            session.proved_alive(self.clock.monotonic(), self.clock.wall())
        elif result.session_expired:
            session.mark_expired()


def _ignore(_: object) -> Result:
    return {}


def _deleter(digest: str) -> Callable[[KeyringStore], bool]:
    return lambda keyring: keyring.delete(digest)
