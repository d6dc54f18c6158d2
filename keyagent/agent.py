"""Request logic: one ``process_<op>`` per operation, like OpenSSH's ssh-agent. No sockets.

A handler that answers at once is a plain function: it returns the reply's result (a dict),
or :class:`Stop`, or raises a :class:`~keyagent.errors.KeyagentError`. A handler that waits —
a key derivation, a Conduce call, the OS keyring, the delay after a wrong passphrase — is a
generator that yields effects (:mod:`keyagent.effects`: ``Work``, ``Sleep``) and reads top to
bottom, for example ``create``: pick credentials, ``yield`` the remote call, hold the key,
``yield`` the keyring save if asked to persist, return the listing. The server's driver
performs each effect and resumes the handler; the handler's code between two yields runs on
the event loop, the only thread that touches the store, so no lock is ever held across slow
work. Work the agent starts on its own (deleting an expired key's keyring copy) is a
generator too, handed to :meth:`Agent.in_background`.
"""

from __future__ import annotations

import heapq
import os
import random
import time
from collections import namedtuple
from collections.abc import Callable, Iterable, Mapping

from keyagent import __version__
from keyagent.askpass import Dialogs, printable
from keyagent.audit import DEFAULT_AUDIT_ENTRIES, AuditEntry, AuditLog
from keyagent.effects import Late, Overdue, Sleep, Work
from keyagent.errors import (
    Ambiguous,
    BadCredentials,
    BadPassphrase,
    BadRequest,
    Busy,
    Denied,
    Forbidden,
    Internal,
    KeyagentError,
    KeyringUnavailable,
    Locked,
    LoginRequired,
    NotFound,
    NotLocked,
    RemoteError,
    SessionExpired,
    Timeout,
    TooMany,
    UnknownOp,
)
from keyagent.grant import Grant
from keyagent.leftovers import Leftover
from keyagent.log import INFO, get_logger
from keyagent.persist import KeyringStore, PersistedKey
from keyagent.protocol import (
    DESCRIPTION_MAX,
    KEY_ID_MAX,
    KEY_ID_SHOWN,
    MAX_LIFETIME,
    OPS,
    PROTOCOL_VERSION,
    Request,
    remove_command,
)
from keyagent.sessions import Plan, RemoteResult, Session, run_remote
from keyagent.store import (
    HeldKey,
    KeyStore,
    Lock,
    derive,
    digest_of,
    iso,
    key_id_for,
    new_salt,
    stricter,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Final

    from keyagent.effects import Steps
    from keyagent.leftovers import LeftoversFile
    from keyagent.sessions import AccountFactory, RemoteAccount

    Result = dict[str, Any]
    Rules = tuple[bool, bool, tuple[str, ...]]
    """A key's (exportable, confirm, allowed_exes)."""

log = get_logger("keyagent.agent")
lending_log = get_logger("keyagent.lending", floor=INFO)
"""What the agent lends for the HTTP socket: at info whatever the log level, as the audit
log is (a background agent logs warnings only), since it is the trace of a use a SIGKILL
leaves (see _lend_session)."""


class Stop(namedtuple("Stop", ["result"])):
    """Send ``result``, then stop the agent."""

    __slots__ = ()

    result: Result


class Follow(namedtuple("Follow", ["result"])):
    """Send ``result`` (the audit entries so far), then keep the connection and send each new
    audit entry on it until the client goes (``log`` with ``follow``; see the server)."""

    __slots__ = ()

    result: Result


if TYPE_CHECKING:
    Outcome = Result | Stop | Follow | Steps
    """What a handler returns: a result, a :class:`Stop` or :class:`Follow`, or a generator
    for the driver."""


class Peer(namedtuple("Peer", ["pid", "uid", "gid", "exe"], defaults=[None])):
    """Who is asking: from SO_PEERCRED, and the executable of its pid
    (:func:`keyagent.sockets.peer_exe`, read on accept; None if unknown)."""

    __slots__ = ()

    pid: int
    uid: int
    gid: int
    exe: str | None


SIGNAL_PEER: Final = Peer(pid=0, uid=-1, gid=-1)
"""The peer of a request the server makes for a signal (SIGUSR1: forget every key). Only the
agent's user or root can signal it, and the lock does not stop such a request (see
:meth:`Agent.handle`): a screen-lock hook must be able to drop keys from a locked agent."""
ALLOWED_WHILE_LOCKED: Final = frozenset({"hello", "status", "unlock", "stop"})
"""Stopping reveals nothing (ssh-agent can be killed while locked too)."""
AUDITED: Final = frozenset(
    {"get", "add", "create", "remove", "forget", "login", "logout", "lock", "unlock", "stop"}
)
"""Operations recorded in the audit log however they end: each use of a secret, each change."""
AUDITED_REFUSALS: Final = frozenset({"locked", "forbidden", "denied"})
"""Error codes recorded for the other operations too (``list`` refused while locked, say)."""
MEMOIZABLE: Final = frozenset({"get", "hello"})
"""Operations whose reply depends only on :meth:`Agent.state_token` and the clock, when
their handler answers at once. A ``get`` of a key whose use depends on who asks (allowed
programs, confirmation) is answered by a generator, which the server never remembers: see
:meth:`Agent.process_get`."""
UNKNOWN_PEER: Final = Peer(pid=0, uid=-1, gid=-1, exe=None)
"""The peer of a request made with no client to name (a program rule then refuses)."""
NO_EXECUTABLES: Final = (
    "this agent cannot tell which program connects (it runs in a user namespace of its own,"
    " e.g. systemd's PrivateUsers=, where /proc/PID/exe of other processes is unreadable),"
    ' so --allow-exe cannot be enforced: start an agent outside it (eval "$(keyagent)")'
    " for keys or sessions with allowed programs"
)
NO_EXECUTABLES_DEFAULT: Final = (
    "this agent cannot tell which program connects (it runs in a user namespace of its own,"
    " e.g. systemd's PrivateUsers=), so the allow_exe setting of its config file, which"
    " applies to every new key and login, cannot be enforced: remove it from the file, or"
    ' start an agent outside that namespace (eval "$(keyagent)")'
)
PRINTED: Final[Rules] = (True, False, ())
"""What a key ``create --print`` hands out is, outside the agent: a key without rules."""
MAX_ACCOUNTS: Final = 64
"""Conduce accounts tracked at once; logged-out ones are forgotten first."""
MAX_KEY_ATTEMPTS: Final = 3
"""Held keys a remote call may try in turn after the service rejects one (e.g. revoked)."""
FIRST_RETRY: Final = 1.0
"""Seconds before the second attempt to delete an ephemeral key on the service; doubling."""
MAX_RETRY: Final = 600.0
"""The longest wait between two attempts to delete an ephemeral key (ten minutes)."""
KEYAGENT_MARK: Final = " [keyagent]"
"""Ends the description of every key the agent creates on the service, so ``prune`` can tell
keyagent's keys from others (the user's description is cut to leave room for it)."""
KEPT_MARK: Final = " [keyagent, kept]"
"""Ends instead the description of a created key meant to outlive the agent (``create
--keep``, or ``--print``: taken out, it may be in use elsewhere): ``prune`` never deletes it."""
LEFTOVERS_TIMEOUT: Final = 10.0
"""Seconds a write of the leftovers file may take before ``create`` replies without it."""
LEFTOVERS_RETRY: Final = 60.0
"""Seconds after a failed write of the leftovers file before it is written again; doubling
(up to :data:`MAX_RETRY`) while writes keep failing."""
RETRY_DELETION_FOR: Final = 24 * 3600.0
"""How long the agent keeps trying to delete an ephemeral key on the service: a service down
for a night still sees the key deleted in the morning."""


def jittered(delay: float) -> float:
    """A retry delay spread over its last quarter, so agents that failed together (a service
    outage) do not all come back in the same second."""
    return delay * random.uniform(0.75, 1.0)  # noqa: S311  # spreading load, not a secret


def marked(description: str, *, kept: bool = False) -> str:
    """The description a key the agent creates carries on the service: ``description``, cut
    so the whole stays within the protocol's limit, then :data:`KEYAGENT_MARK` (or
    :data:`KEPT_MARK` for a key meant to outlive the agent)."""
    mark = KEPT_MARK if kept else KEYAGENT_MARK
    return description[: DESCRIPTION_MAX - len(mark)] + mark


def is_marked(description: str) -> bool:
    """Whether a description on the service says keyagent created its key (kept or not)."""
    return description.endswith((KEYAGENT_MARK, KEPT_MARK))


def is_prunable(description: str) -> bool:
    """Whether a description on the service says keyagent created its key for its own use
    only, so the key is an orphan once no agent holds it (see ``prune``)."""
    return description.endswith(KEYAGENT_MARK)


class _Deletion:
    """A key the agent is to delete on the service: what ``status`` and the leftovers file
    say of it (never a secret)."""

    __slots__ = ("digest", "host", "user", "expires", "since", "attempts")

    def __init__(
        self, digest: str, host: str, user: str, expires: float | None, since: float
    ) -> None:
        self.digest, self.host, self.user = digest, host, user
        self.expires = expires
        """The key's expiry (POSIX time), for the leftovers file."""
        self.since = since
        """Wall time at which this agent took the deletion on."""
        self.attempts = 0

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(key_id={self.digest[:KEY_ID_SHOWN]!r}, attempts={self.attempts})"

    def leftover(self) -> Leftover:
        return Leftover(self.digest, self.host, self.user, self.expires)

    def state(self) -> dict[str, Any]:
        """As ``status`` shows it."""
        return {
            "key_id": self.digest[:KEY_ID_SHOWN],
            "host": self.host,
            "user": self.user,
            "since": iso(self.since),
            "attempts": self.attempts,
        }


class PendingDeletion(_Deletion):
    """An ephemeral key the agent no longer serves, still to be deleted on the service.

    ``secret`` is kept only because the deletion needs it (to name the key, and to
    authenticate with it when there is no session); it is dropped as soon as the key is gone.
    """

    __slots__ = ("secret", "in_keyring")

    def __init__(
        self, held: HeldKey | PersistedKey, since: float, *, in_keyring: bool = False
    ) -> None:
        super().__init__(held.digest, held.host, held.user, held.expires, since)
        self.secret = held.secret
        self.in_keyring = in_keyring
        """Whether the OS keyring still holds the key: its entry is deleted once the deletion
        on the service has ended (so a crash meanwhile loses nothing), and the leftovers file
        need not name it."""


class StopDeletions:
    """The deletions on the service an agent makes on its way out (see
    :meth:`Agent.begin_stop`): one attempt per key, which the server waits for until its
    ``stop_timeout``."""

    __slots__ = ("under_way", "tried", "failed", "swept")

    def __init__(self) -> None:
        self.under_way: dict[str, PendingDeletion] = {}
        """Attempts not ended yet, by digest."""
        self.tried: set[str] = set()
        """Digests of every key attempted at stop (one attempt each)."""
        self.failed: list[tuple[PendingDeletion, str]] = []
        """Keys whose attempt failed, each with why."""
        self.swept = -1
        """The held keys' version when they were last swept for keys to delete."""

    def __repr__(self) -> str:
        return f"StopDeletions(under_way={len(self.under_way)}, failed={len(self.failed)})"


class OrphanDeletion(_Deletion):
    """An ephemeral key an earlier agent on this socket left on the service (it was killed
    before deleting it), named by the leftovers file (:mod:`keyagent.leftovers`): the agent
    finds it in the account's key list by its fingerprint and deletes it. No secret."""

    __slots__ = ("waiting", "running", "give_up_at")

    def __init__(self, leftover: Leftover, since: float) -> None:
        super().__init__(
            leftover.fingerprint, leftover.host, leftover.user, leftover.expires, since
        )
        self.waiting = False
        """Whether the agent has no credentials for the account: the next login resumes it."""
        self.running = False
        """Whether a deletion of it is under way (in the background)."""
        self.give_up_at: float | None = None
        """Monotonic time after which a failure ends the attempts (set by the first one)."""

    def state(self) -> dict[str, Any]:
        """As ``status`` shows it, among the pending deletions."""
        return {**super().state(), "left_over": True, "waiting_for_login": self.waiting}


class Clock:
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
        default_export: bool = True,
        default_allowed_exes: tuple[str, ...] = (),
        sees_executables: bool = True,
        askpass: str | None = None,
        confirm_timeout: float = 30.0,
        confirmer: Callable[[str, str, float], None] | None = None,
        audit_entries: int = DEFAULT_AUDIT_ENTRIES,
        keep_created_keys: bool = False,
        jitter: Callable[[float], float] = jittered,
        leftovers: LeftoversFile | None = None,
    ) -> None:
        if default_lifetime is not None and not 0 < default_lifetime <= MAX_LIFETIME:
            raise ValueError("the default lifetime must be positive and at most ten years")
        self.clock = clock or Clock()
        self.socket_path = socket_path
        self.http_socket_path: str | None = None
        """The HTTP socket (keyagent.proxy), shown by ``status``; None without one."""
        self.http_workers: Callable[[], list[int]] = list
        """The pids of the HTTP socket's worker processes, for ``status`` (set by the server)."""
        self.http_workers_max: int | None = None
        """The most HTTP workers at once (``http_workers``), for ``status``; None without an
        HTTP socket."""
        self.default_lifetime = default_lifetime
        self.default_persist = default_persist
        self.keep_created_keys = keep_created_keys
        """Whether a key ``create`` makes stays on the service after it expires unless the
        request says ``keep: false`` (else it is ephemeral unless it says ``keep: true``)."""
        self._jitter = jitter
        self.pending_deletions: dict[str, PendingDeletion] = {}
        """Ephemeral keys no longer served, by digest, that are still to be deleted on the
        service (see :meth:`delete_on_service`)."""
        self.at_stop: StopDeletions | None = None
        """Set once the agent is stopping: the deletions it makes on its way out."""
        self._persisting: set[str] = set()
        """Digests of held keys whose keyring save is under way (see :meth:`_saving`)."""
        self._adding: set[str] = set()
        """Digests of keys whose ``add`` waits on the keyring: another add of one is busy."""
        self.leftovers = leftovers
        """Where the agent records its ephemeral keys that only its memory holds, so that
        the next agent can delete them if this one is killed; None: nowhere."""
        self.orphans: dict[str, OrphanDeletion] = {}
        """Keys an earlier agent left on the service, by digest, still to be deleted."""
        self._leftovers_written: tuple[Leftover, ...] | None = None
        """What the leftovers file was last asked to hold (None: not yet written)."""
        self._leftovers_retry: float | None = None
        """The wait before the next write after a failed one; None while no retry waits."""
        self.leftovers_failing = False
        """Whether the last write of the leftovers file failed (logged): until one succeeds,
        a crash would leave this agent's ephemeral keys on the service unnamed."""
        self.held_keys = KeyStore(max_keys)
        self.audit_log = AuditLog(audit_entries)
        self._reserved = 0
        """Places for keys that requests still waiting (create, add with persist) will fill."""
        self._creating = 0
        """How many creates are under way (a stop waits for them, and says so)."""
        self._rotations: list[tuple[float, str]] = []
        """Scheduled rotations (monotonic time, digest); see :meth:`rotate_due`."""
        self._rotation_delays: dict[str, float] = {}
        """The next retry delay of keys whose scheduled rotation failed, by digest."""
        self._rotating: set[str] = set()
        """Digests of keys whose successor the service is making."""
        self.lock = Lock()
        self.lock_in_keyring = False
        """Whether the OS keyring may hold this lock's hash (see :meth:`process_lock`)."""
        self.started = self.clock.monotonic()
        self.sessions: dict[tuple[str, str], Session] = {}
        self._start_background: Callable[[Steps], None] | None = None
        self._unstarted: list[Steps] = []
        """Background work begun before a driver serves the agent (restoring at start-up)."""
        self._accounts = accounts
        self.validate_after = validate_after
        self.keyring = keyring
        self.keyring_timeout = keyring_timeout
        self.default_export = default_export
        """Whether a new key may be taken out (``get``, ``exec``) unless its request says."""
        self.default_allowed_exes = default_allowed_exes
        self.sees_executables = sees_executables
        """Whether peers' executables can be known at all (see
        :func:`keyagent.sockets.sees_peer_executables`): without, no key can have allowed
        programs, and one that has them (restored from the keyring) serves no one."""
        """The programs a new key allows unless its request names some; empty: any."""
        self.askpass = askpass
        """The program that asks the user to confirm a use (checked at start-up), or None."""
        self.confirm_timeout = confirm_timeout
        self.dialogs = Dialogs()
        """The askpass programs running, ended when the agent stops."""
        self._confirmer = self.dialogs.ask if confirmer is None else confirmer
        """Runs the askpass program: ``(program, question, timeout)``, raises Denied."""
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
            "log": self.process_log,
        }
        if accounts is not None:
            self._handlers.update(
                login=self.process_login,
                logout=self.process_logout,
                create=self.process_create,
                remove=self.process_remove,
                rotate=self.process_rotate,
            )
            self._handlers.update(prune=self.process_prune)

    @property
    def ops(self) -> list[str]:
        return [op for op in OPS if op in self._handlers]

    # --- dispatch ------------------------------------------------------------------------

    def handle(self, request: Request, peer: Peer) -> Outcome:
        """Dispatch one validated request; the locked check comes before any handler.

        The audit log is written here, for every handler: a request of :data:`AUDITED` (or one
        refused with a code of :data:`AUDITED_REFUSALS`) is recorded once, with how it ended:
        a quick one now, one that waits when its generator has ended.
        """
        try:
            outcome = self._dispatch(request, peer)
        except KeyagentError as error:
            self._audit_request(request, peer, None, error)
            raise
        if isinstance(outcome, dict | Stop | Follow):
            self._audit_request(request, peer, outcome, None)
            return outcome
        return self._audited(request, peer, outcome)

    def _dispatch(self, request: Request, peer: Peer) -> Outcome:
        handler = self._handlers.get(request.op)
        if handler is None:
            # Known to the protocol, not served by this agent's configuration.
            raise UnknownOp(
                f"operation '{request.op}' is not available in this agent; upgrade keyagent"
            )
        if self.lock.locked and request.op not in ALLOWED_WHILE_LOCKED and peer is not SIGNAL_PEER:
            raise Locked()
        log.debug("op=%s id=%r pid=%d", request.op, request.id, peer.pid)
        if request.op == "get":  # the one operation whose answer depends on who asks
            return self.process_get(request.args, peer)
        if request.op == "prune":  # records each deletion in the audit log, for who asked
            return self.process_prune(request.args, peer)
        if request.op == "rotate":  # records who asked with each key it rotates
            return self.process_rotate(request.args, peer)
        return handler(request.args)

    # --- the audit log -------------------------------------------------------------------

    def _audited(self, request: Request, peer: Peer, steps: Steps) -> Steps:
        """``steps``, recorded in the audit log when it ends (its result or its error)."""
        try:
            result = yield from steps
        except KeyagentError as error:
            self._audit_request(request, peer, None, error)
            raise
        except Exception:
            self._audit_request(request, peer, None, Internal())
            raise
        self._audit_request(request, peer, result, None)
        return result

    def _audit_request(
        self,
        request: Request,
        peer: Peer,
        result: Result | Stop | Follow | None,
        error: KeyagentError | None,
    ) -> None:
        op = request.op
        if error is not None:
            outcome = error.to_wire()["code"]  # an Overdue's is the error the client gets
            if op not in AUDITED and outcome not in AUDITED_REFUSALS:
                return
        elif op not in AUDITED:
            return
        else:
            outcome = "ok"
        found: Mapping[str, Any] = {}
        if isinstance(result, Stop | Follow):
            found = result.result
        elif isinstance(result, dict):
            found = result
        args = request.args
        # Named members only: the key, a password or a passphrase is never read here.
        key_id = found.get("key_id") or args.get("key_id")
        if key_id is None and "key" in args:  # add, or remove by key: its id, not the key
            key_id = key_id_for(args["key"])
        host, user = found.get("host") or args.get("host"), found.get("user") or args.get("user")
        if error is not None and error.subject is not None:  # refused by a key's rules
            key_id, host, user = error.subject
        if op == "get":
            if args.get("purpose") == "exec":
                op = "exec"
            secret = found.get("key")
            if secret is not None:
                held = self.held_keys.holding(digest_of(secret))
                if held is not None:  # the account of the key served, not the request's filter
                    host, user = held.host, held.user
                if self.lock.locked:  # the server withholds a key locked before its reply
                    outcome = Locked.code
        self.audit(op, peer, outcome=outcome, key_id=key_id, host=host, user=user)

    def audit(
        self,
        op: str,
        peer: Peer,
        *,
        outcome: str = "ok",
        key_id: str | None = None,
        host: str | None = None,
        user: str | None = None,
        method: str | None = None,
        path: str | None = None,
        status: int | None = None,
    ) -> None:
        """Record one entry in the audit log (on the loop): ``op`` asked by ``peer``, ended
        with ``outcome`` ("ok" or an error code). For a proxied request (``op`` "proxy"),
        ``method``, ``path`` (its query string and fragment are cut off here) and the
        upstream ``status``. Never pass a secret: no field is meant for one."""
        if path is not None:
            path = path.partition("?")[0].partition("#")[0]
        signalled = peer is SIGNAL_PEER  # the agent's own request, on SIGUSR1: no process
        self.audit_log.record(
            AuditEntry(
                self.clock.wall(),
                op,
                outcome,
                key_id,
                host,
                user,
                None if signalled else peer.pid,
                None if signalled else peer.uid,
                getattr(peer, "exe", None),
                method,
                path,
                status,
            )
        )

    def audit_again(self, entry: AuditEntry, peer: Peer) -> None:
        """Record ``entry`` again, now, for ``peer``: a request answered from the server's
        memo of replies is the same request as the one that made ``entry``."""
        self.audit_log.record(
            AuditEntry(
                self.clock.wall(),
                entry.op,
                entry.outcome,
                entry.key_id,
                entry.host,
                entry.user,
                peer.pid,
                peer.uid,
                getattr(peer, "exe", None),
                entry.method,
                entry.path,
                entry.status,
            )
        )

    def credentials_token(self) -> tuple[int, bool, int]:
        """Changes whenever the credentials a proxied request would get could differ: a key
        held or dropped, the lock, a session going live or ending. Plain reads of ints, so
        the HTTP socket's threads may compare it without the loop (see :class:`Grant`)."""
        return self.held_keys.version, self.lock.locked, Session.changes

    def state_token(self) -> tuple[int, bool]:
        """Changes whenever a ``get`` or ``hello`` could be answered differently."""
        return self.held_keys.version, self.lock.locked

    def in_background(self, steps: Steps) -> None:
        """Start work that no client waits for; until a driver serves the agent, it waits."""
        if self._start_background is None:
            self._unstarted.append(steps)
        else:
            self._start_background(steps)

    def driven_by(self, start_background: Callable[[Steps], None]) -> None:
        """Hand background work to a driver from now on, beginning with what waited for one."""
        self._start_background = start_background
        unstarted, self._unstarted = self._unstarted, []
        for steps in unstarted:
            start_background(steps)

    def reap(self) -> float | None:
        """Drop expired keys; return the next monotonic deadline, if any."""
        expired, next_deadline = self.held_keys.reap(self.clock.monotonic())
        for held in expired:
            log.info("key %s expired", held.key_id)
            in_keyring = held.persisted and self.keyring is not None
            if in_keyring and not held.ephemeral:
                # Lifetimes bind the keyring copy too: delete it, with no client waiting.
                # (An ephemeral key's copy goes once it is deleted on the service.)
                self.in_background(self._keyring_chore(_deleter(held.digest)))
            if held.ephemeral:
                self.delete_on_service(held, in_keyring=in_keyring)
        return next_deadline

    # --- ephemeral keys ------------------------------------------------------------------

    def delete_on_service(self, held: HeldKey | PersistedKey, *, in_keyring: bool = False) -> None:
        """Delete ``held``, no longer held, on the service, in the background, until done.
        ``in_keyring``: the OS keyring holds the key; its entry is deleted after that."""
        if held.digest in self.pending_deletions:
            return
        pending = PendingDeletion(held, self.clock.wall(), in_keyring=in_keyring)
        self.pending_deletions[held.digest] = pending
        self._leftovers_changed()  # named there until deleted, unless the keyring keeps it
        self.in_background(self._delete_then_tidy(pending))

    def _delete_then_tidy(self, pending: PendingDeletion) -> Steps:
        """Background: :meth:`_delete_remotely`, then, once it has ended (deleted, gone, or
        given up; not when the agent stops meanwhile), the key's keyring entry if it has one.
        (Its line in the leftovers file goes when the deletion ends: :meth:`_deletion_ended`.)"""
        yield from self._delete_remotely(pending)
        if pending.in_keyring:
            try:
                yield self._keyring(_deleter(pending.digest))
            except KeyagentError as error:
                # The next start finds the expired entry, finds the key gone, deletes it.
                log.warning(
                    "the OS keyring entry of deleted key %s remains (%s)",
                    pending.digest[:KEY_ID_SHOWN], error.message,
                )  # fmt: skip
        return {}

    def _delete_remotely(self, pending: PendingDeletion) -> Steps:
        """Background: delete one ephemeral key on the service, retrying failures with
        exponential backoff for :data:`RETRY_DELETION_FOR`; a key the service does not know
        (any more) counts as deleted, as does one it refuses as credentials with nothing else
        to authenticate with (revoked: it is no use to anyone)."""
        key_id = pending.digest[:KEY_ID_SHOWN]
        give_up_at = self.clock.monotonic() + RETRY_DELETION_FOR
        delay = FIRST_RETRY
        try:
            while True:
                if self.pending_deletions.get(pending.digest) is not pending:
                    return {}  # ended meanwhile, by the attempt made when the agent stopped
                pending.attempts += 1
                try:
                    yield from self._delete_once(pending)
                except NotFound:
                    log.info("key %s was already gone from %s", key_id, pending.host)
                    self._deletion_ended(pending, NotFound.code)
                    return {}
                except BadCredentials:
                    log.info("key %s is no longer valid on %s", key_id, pending.host)
                    self._deletion_ended(pending, BadCredentials.code)
                    return {}
                except KeyagentError as error:
                    if self.clock.monotonic() >= give_up_at:  # tried for a day at least
                        log.error(
                            "gave up deleting key %s on %s after %d attempts (%s); delete it "
                            "with %s",
                            key_id, pending.host, pending.attempts, error.message,
                            remove_command(pending.host, pending.user, pending.digest),
                        )  # fmt: skip
                        self._deletion_ended(pending, error.to_wire()["code"])
                        return {}
                    wait = self._jitter(delay)
                    log.warning(
                        "could not delete key %s on %s (attempt %d: %s); retrying in %.0f s",
                        key_id, pending.host, pending.attempts, error.message, wait,
                    )  # fmt: skip
                    yield Sleep(wait)
                    delay = min(delay * 2, MAX_RETRY)
                    continue
                log.info("deleted key %s on %s", key_id, pending.host)
                self._deletion_ended(pending, "ok")
                return {}
        finally:
            # Deleted, or given up: the secret goes with the record.
            self.pending_deletions.pop(pending.digest, None)

    def _delete_once(self, pending: PendingDeletion) -> Steps:
        """One attempt: the account's live session, else the key itself (valid on the service
        until deleted), else other held keys of the account."""
        session = self.session_for(pending.host, pending.user)
        plan = self._plan(session)
        api_keys = (pending.secret, *plan.api_keys)[:MAX_KEY_ATTEMPTS]
        account, secret = session.account, pending.secret
        yield from self._remote(
            session,
            plan._replace(api_keys=api_keys),
            lambda api_key: account.delete_key(secret, api_key=api_key),
        )

    # --- stopping: ephemeral keys deleted on the way out --------------------------------
    # When the agent stops (stop, SIGTERM, SIGINT, SIGHUP), every ephemeral key it holds
    # that is not persisted, and every deletion still pending, gets one more attempt, on its
    # account's queue (accounts in parallel); the server waits for them until its
    # stop_timeout, then exits whatever is left. A persisted ephemeral key is not deleted:
    # it comes back at the next start with its expiry. Nothing here waits: the server asks.

    def due_at_stop(self) -> int:
        """How many keys :meth:`begin_stop` would delete on the service now."""
        now = self.clock.monotonic()
        held = sum(
            _dies_at_stop(key) and key.digest not in self._persisting  # a save decides those
            for key in self.held_keys.matching(now)
        )
        return held + len(self.pending_deletions)

    def begin_stop(self) -> int:
        """The agent is stopping: stop serving the keys that die with it and start deleting
        them on the service, with the pending deletions; how many are under way."""
        if self.at_stop is None:
            self.at_stop = StopDeletions()
            self.dialogs.close()  # a question left open now is answered by nobody
            due = self.due_at_stop()
            if due:
                log.info("stopping: deleting %d ephemeral key(s) on the service", due)
        return self.deletions_at_stop()

    def deletions_at_stop(self) -> int:
        """How many deletions begun at stop have not ended, plus the work under way that
        decides the fate of a key: a create or rotation the stop came in the middle of (its
        ephemeral key is then deleted too), and keyring saves (a key being persisted is kept;
        one whose save fails is deleted). Keys that became due since the last call (created,
        or expired into a pending deletion, while stopping) begin first."""
        stop = self.at_stop
        if stop is None:
            return 0
        if stop.swept != self.held_keys.version:
            now, wall = self.clock.monotonic(), self.clock.wall()
            dying = [
                key
                for key in self.held_keys.matching(now)
                if _dies_at_stop(key) and key.digest not in self._persisting
            ]
            for held in dying:
                # No longer served (get answers as for a forgotten key); pending until deleted.
                self.held_keys.discard(held.digest)
                self.pending_deletions.setdefault(held.digest, PendingDeletion(held, wall))
            stop.swept = self.held_keys.version
        for pending in list(self.pending_deletions.values()):
            if pending.digest not in stop.tried:
                stop.tried.add(pending.digest)
                stop.under_way[pending.digest] = pending
                self.in_background(self._delete_at_stop(stop, pending))
        return len(stop.under_way) + self._reserved + len(self._rotating) + len(self._persisting)

    def _delete_at_stop(self, stop: StopDeletions, pending: PendingDeletion) -> Steps:
        """Background, at stop: one attempt to delete ``pending`` on the service."""
        key_id = pending.digest[:KEY_ID_SHOWN]
        pending.attempts += 1
        try:
            yield from self._delete_once(pending)
        except (NotFound, BadCredentials) as gone:  # counts as deleted, as at expiry
            log.info("key %s is no longer on %s (%s)", key_id, pending.host, gone.code)
            self._deletion_ended(pending, gone.code)
        except KeyagentError as error:
            if self.pending_deletions.get(pending.digest) is pending:  # else done meanwhile
                stop.failed.append((pending, error.message))
                self.audit(
                    "delete", SIGNAL_PEER, outcome=error.to_wire()["code"], key_id=key_id,
                    host=pending.host, user=pending.user,
                )  # fmt: skip
        else:
            log.info("deleted key %s on %s", key_id, pending.host)
            self._deletion_ended(pending, "ok")
        finally:
            stop.under_way.pop(pending.digest, None)
        return {}

    def end_stop(self, why: str) -> int:
        """The agent exits now. Each deletion begun at stop that has not ended is recorded as
        not deleted (``timeout``; ``why`` says what cut it short), and each key not deleted is
        logged with the command that deletes it; how many were not deleted."""
        stop = self.at_stop
        if stop is None:
            return 0
        making = self._reserved + len(self._rotating)
        if making:
            log.error(
                "%d request(s) making keys on the service had not ended when the agent exited "
                "(%s); keys the service made for them are held by no agent: keyagent-ctl list "
                "--remote shows them, keyagent-ctl remove deletes one", making, why,
            )  # fmt: skip
        now = self.clock.monotonic()
        for held in self.held_keys.matching(now):
            if held.digest in self._persisting:  # kept on the service: prune leaves it
                log.error(
                    "key %s of %s on %s was being saved to the OS keyring when the agent "
                    "exited (%s), and stays valid on the service; if the next agent does not "
                    "hold it, delete it with %s",
                    held.key_id, held.user, held.host, why,
                    remove_command(held.host, held.user, held.digest),
                )  # fmt: skip
            elif held.source == "created" and not held.ephemeral and not held.persisted:
                # Made to outlive the agent: not deleted at stop (a tool may use it), but
                # nobody will hold it: say so where the agent's errors go (keyagent CMD's
                # stderr too).
                log.error(
                    "key %s of %s on %s, made by this agent to outlive it (no lifetime, or "
                    "--keep, or --print), stays valid on the service, held by nobody; delete "
                    "it with %s",
                    held.key_id, held.user, held.host,
                    remove_command(held.host, held.user, held.digest),
                )  # fmt: skip
        not_deleted = list(stop.failed)
        for pending in stop.under_way.values():
            not_deleted.append((pending, why))
            self.audit(
                "delete", SIGNAL_PEER, outcome=Timeout.code, key_id=pending.digest[:KEY_ID_SHOWN],
                host=pending.host, user=pending.user,
            )  # fmt: skip
        stop.under_way.clear()
        for pending, reason in not_deleted:
            log.error(
                "key %s of %s on %s was not deleted on the service (%s) and stays valid there; "
                "delete it with %s",
                pending.digest[:KEY_ID_SHOWN], pending.user, pending.host, reason,
                remove_command(pending.host, pending.user, pending.digest),
            )  # fmt: skip
        return len(not_deleted)

    def _deletion_ended(self, pending: PendingDeletion, outcome: str) -> None:
        """Record how the deletion of ``pending`` on the service ended, once: in the audit
        log (op ``delete``, the agent itself as the peer) and by no longer pending it."""
        if self.pending_deletions.get(pending.digest) is not pending:
            return  # another attempt (at expiry, at stop) ended it first and said so
        del self.pending_deletions[pending.digest]
        self._leftovers_changed()
        self.audit(
            "delete", SIGNAL_PEER, outcome=outcome, key_id=pending.digest[:KEY_ID_SHOWN],
            host=pending.host, user=pending.user,
        )  # fmt: skip

    # --- leftovers of a killed agent (keyagent.leftovers) ----------------------------------

    def adopt_leftovers(self, leftovers: Iterable[Leftover]) -> int:
        """At start-up, after the keyring's keys are held again: take over the deletion of
        each ephemeral key an earlier agent on this socket left on the service (the
        leftovers file names it), unless this agent holds it or deletes it already. Returns
        how many it took over. Each is deleted in the background with whatever credentials
        the agent has for the account; with none, at the account's next ``login``."""
        count = 0
        for leftover in leftovers:
            digest = leftover.fingerprint
            if (
                self.held_keys.holding(digest) is not None
                or digest in self.pending_deletions
                or digest in self.orphans
            ):
                continue
            orphan = OrphanDeletion(leftover, self.clock.wall())
            self.orphans[digest] = orphan
            self.in_background(self._delete_orphan(orphan))
            count += 1
        if count:
            log.info("deleting %d ephemeral key(s) an earlier agent left on the service", count)
        self._leftovers_changed()
        return count

    def _resume_orphans(self, host: str, user: str) -> None:
        """The account has credentials again (a login, or a key added): resume its orphans
        that wait for them. One that is the key added is kept, and no longer pending."""
        for orphan in list(self.orphans.values()):  # a deletion may end (and pop) at once
            if (orphan.host, orphan.user) == (host, user) and not orphan.running:
                self.in_background(self._delete_orphan(orphan))

    def _delete_orphan(self, orphan: OrphanDeletion) -> Steps:
        """Background: find a left-over key in the account's ``apikeys/list`` by its
        fingerprint and delete it, retrying failures with backoff as
        :meth:`_delete_remotely` does, for :data:`RETRY_DELETION_FOR` from the first attempt.
        It is done when deleted or absent from the list; without credentials for the account
        it waits (the next ``login`` calls this again)."""
        key_id = orphan.digest[:KEY_ID_SHOWN]
        orphan.running, orphan.waiting = True, False
        delay = FIRST_RETRY
        try:
            while True:
                if self.held_keys.holding(orphan.digest) is not None:
                    # Added again (by hand, or restored) since: the user wants it, keep it.
                    log.info("key %s, left by an earlier agent, is held again: kept", key_id)
                    break
                session: Session | None = None
                try:
                    session = self.session_for(orphan.host, orphan.user)  # may be refused
                    plan = self._plan(session)
                    if not plan.use_session and not plan.api_keys:
                        raise LoginRequired()
                    if orphan.give_up_at is None:
                        orphan.give_up_at = self.clock.monotonic() + RETRY_DELETION_FOR
                    orphan.attempts += 1
                    deleted = yield from self._remote(
                        session, plan, _listed_deleter(session.account, orphan.digest)
                    )
                except (LoginRequired, SessionExpired):
                    raise
                except KeyagentError as error:
                    if session is None:  # the account could not even be tracked: a try too
                        orphan.attempts += 1
                    if orphan.give_up_at is None:
                        orphan.give_up_at = self.clock.monotonic() + RETRY_DELETION_FOR
                    if self.clock.monotonic() >= orphan.give_up_at:
                        self._orphan_ended(orphan, error.to_wire()["code"])
                        log.error(
                            "gave up deleting key %s, left by an earlier agent, on %s after %d "
                            "attempts (%s); delete it with %s",
                            key_id, orphan.host, orphan.attempts, error.message,
                            remove_command(orphan.host, orphan.user, orphan.digest),
                        )  # fmt: skip
                        break
                    wait = self._jitter(delay)
                    log.warning(
                        "could not delete key %s, left by an earlier agent, on %s (attempt %d:"
                        " %s); retrying in %.0f s",
                        key_id, orphan.host, orphan.attempts, error.message, wait,
                    )  # fmt: skip
                    yield Sleep(wait)
                    delay = min(delay * 2, MAX_RETRY)
                    continue
                log.info(
                    "%s key %s, left by an earlier agent, on %s",
                    "deleted" if deleted else "did not find", key_id, orphan.host,
                )  # fmt: skip
                self._orphan_ended(orphan, "ok" if deleted else NotFound.code)
                break
        except (LoginRequired, SessionExpired):
            orphan.waiting = True
            log.info(
                "key %s, left by an earlier agent, waits to be deleted on %s: the agent has no "
                "credentials for %s; run keyagent-ctl login",
                key_id, orphan.host, orphan.user,
            )  # fmt: skip
            return {}
        finally:
            orphan.running = False
        self.orphans.pop(orphan.digest, None)
        self._leftovers_changed()
        return {}

    def _orphan_ended(self, orphan: OrphanDeletion, outcome: str) -> None:
        """Record in the audit log how the deletion of a key an earlier agent left ended (op
        ``delete``, the agent itself as the peer), as for the agent's own keys."""
        self.audit(
            "delete", SIGNAL_PEER, outcome=outcome, key_id=orphan.digest[:KEY_ID_SHOWN],
            host=orphan.host, user=orphan.user,
        )  # fmt: skip

    def _leftover_entries(self) -> tuple[Leftover, ...]:
        """What the leftovers file must hold now: each ephemeral key that only this agent's
        memory holds (not persisted) or that it is still deleting, and each orphan."""
        entries = {
            held.digest: Leftover(held.digest, held.host, held.user, held.expires)
            for held in self.held_keys.everything()
            if held.ephemeral and not held.persisted
        }
        for pending in self.pending_deletions.values():
            if not pending.in_keyring:
                entries[pending.digest] = pending.leftover()
        for orphan in self.orphans.values():
            entries[orphan.digest] = orphan.leftover()
        return tuple(sorted(entries.values()))

    def _leftovers_write(self) -> Work | None:
        """The write of the leftovers file, if what it must hold changed; else None. Not once
        the agent is stopping: its sockets are closed, so a new agent may be serving the same
        path already, and the file is that agent's now (what this one fails to delete is
        named there still, and the new agent deletes it)."""
        leftovers = self.leftovers
        if leftovers is None or self.at_stop is not None:
            return None
        entries = self._leftover_entries()
        if entries == self._leftovers_written:
            return None
        self._leftovers_written = entries
        return Work(
            lambda: leftovers.write(entries),
            queue="leftovers",  # its own: a slow disk delays no other work
            timeout=LEFTOVERS_TIMEOUT,
            timeout_error=self._leftovers_timed_out,
        )

    def _leftovers_timed_out(self) -> KeyagentError:
        path = self.leftovers.path if self.leftovers is not None else "the leftovers file"
        return Timeout(f"writing {path} took over {LEFTOVERS_TIMEOUT:g} s; check that disk")

    def _leftovers_changed(self) -> None:
        """Rewrite the leftovers file in the background if what it must hold changed."""
        if self.leftovers is not None:
            self.in_background(self._rewrite_leftovers())

    def _rewrite_leftovers(self) -> Steps:
        # What to write is computed when this starts, in the same step as its yield: writes
        # reach their queue in the order of the states they hold, even when they wait for a
        # driver (at start-up), so an older state never lands after a newer one.
        write = self._leftovers_write()
        if write is not None:
            yield from self._wait_for_leftovers(write)
        return {}

    def _record_leftovers(self) -> Steps:
        """Rewrite the leftovers file now if what it must hold changed, and wait for it; a
        failure is logged (the file's module says how), never the caller's."""
        write = self._leftovers_write()
        if write is not None:
            yield from self._wait_for_leftovers(write)

    def _wait_for_leftovers(self, write: Work) -> Steps:
        """Wait for a write of the leftovers file. After a failure (logged) what the file
        holds is unknown, so the next change writes it whole again, even if the state it
        must hold is the one that failed."""
        try:
            written = yield write
        except KeyagentError as error:
            log.warning("the leftovers file was not written in time: %s", error.message)
            written = False
        self.leftovers_failing = not written
        if not written:
            self._leftovers_written = None
            if self._leftovers_retry is None:
                self._leftovers_retry = LEFTOVERS_RETRY
                self.in_background(self._retry_leftovers())

    def _retry_leftovers(self) -> Steps:
        """Background: write the leftovers file again a while after a write failed (a full
        disk may have room again), waiting longer each time until a write succeeds."""
        while self._leftovers_retry is not None:
            wait = self._leftovers_retry
            yield Sleep(wait)
            write = self._leftovers_write()
            if write is None:  # written since, or the agent is stopping
                break
            try:
                written = yield write
            except KeyagentError as error:
                log.warning("the leftovers file was not written in time: %s", error.message)
                written = False
            self.leftovers_failing = not written
            if written:
                break
            self._leftovers_written = None
            self._leftovers_retry = min(wait * 2, MAX_RETRY)
        self._leftovers_retry = None
        return {}

    def restore(
        self,
        keys: Iterable[PersistedKey],
        lock: tuple[bytes, bytes] | None = None,
        *,
        read_through: bool = True,
    ) -> int:
        """Hold keys read back from the OS keyring (at start-up); returns how many.

        ``lock``: the salt and hash of the lock the agent had when it stopped; the agent
        starts locked if any key came back, so a restart does not unlock persisted keys.
        ``read_through``: every key was read (no failure, no deadline); only then does a
        lock with no key behind it count as stale, and is its record deleted. A read that
        failed or was cut short says nothing of the keys still there, which the next
        start, reading them all, must find locked.
        """
        now, wall = self.clock.monotonic(), self.clock.wall()
        count = 0
        for key in keys:
            lifetime = None if key.expires is None else key.expires - wall
            if lifetime is not None and lifetime <= 0:
                if key.ephemeral:  # expired while the agent was down: delete it now
                    log.info("persisted key %s expired meanwhile", key.digest[:KEY_ID_SHOWN])
                    self.delete_on_service(key, in_keyring=True)
                continue
            try:
                held = self.held_keys.put(
                    host=key.host, user=key.user, secret=key.secret, now=now, wall=wall,
                    lifetime=min(lifetime, MAX_LIFETIME) if lifetime is not None else None,
                    description=key.description, created=key.created, source="keyring",
                    persisted=True, exportable=key.exportable, confirm=key.confirm,
                    allowed_exes=tuple(key.allowed_exes), ephemeral=key.ephemeral,
                )  # fmt: skip
            except TooMany as error:
                log.warning("not every persisted key was restored: %s", error.message)
                break
            if key.rotate_every is not None:  # the schedule starts again from now
                self._schedule_rotation(held, key.rotate_every)
            count += 1
        log.info("restored %d key(s) from the OS keyring", count)
        if lock is not None:
            self.lock_in_keyring = True
            if count:
                self.lock.engage(*lock)
                log.info("the agent was locked when it stopped: it starts locked")
            elif read_through:  # nothing to protect: a stale record must not lock an empty agent
                self._forget_stored_lock()
            else:
                log.warning(
                    "the agent was locked when it stopped, and no persisted key could be read:"
                    " the lock stays in the OS keyring, so a later start that reads them"
                    " starts locked"
                )
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
        rules: Rules,
        ephemeral: bool = False,
    ) -> PersistedKey:
        expires = None if lifetime is None else self.clock.wall() + lifetime
        exportable, confirm, allowed_exes = rules
        return PersistedKey(
            digest=digest_of(secret), host=host, user=user, secret=secret,
            description=description, created=created, expires=expires,
            exportable=exportable, confirm=confirm, allowed_exes=allowed_exes,
            ephemeral=ephemeral,
        )  # fmt: skip

    def _keyring(self, call: Callable[[KeyringStore], Any]) -> Work:
        """``call`` on the OS keyring: off the loop, one call at a time, with a deadline."""
        keyring = self.keyring
        if keyring is None:
            raise KeyringUnavailable(
                "this agent has no OS keyring configured; start it without --no-keyring"
            )
        return Work(
            lambda: call(keyring),
            queue="keyring",
            timeout=self.keyring_timeout,
            timeout_error=self._keyring_timed_out,
        )

    def _keyring_timed_out(self) -> KeyagentError:
        return KeyringUnavailable(
            f"the OS keyring did not answer within {self.keyring_timeout:g} s; it may be "
            "locked and prompting: unlock it and retry"
        )

    def _keyring_chore(self, call: Callable[[KeyringStore], Any]) -> Steps:
        """Background: one keyring call, best effort (its failure is logged)."""
        yield self._keyring(call)
        return {}

    def _forget_stored_lock(self) -> None:
        if self.lock_in_keyring and self.keyring is not None:
            self.lock_in_keyring = False
            self.in_background(self._keyring_chore(lambda keyring: keyring.delete_lock()))

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
                "http_socket": self.http_socket_path,
                "http_workers": self.http_workers(),
                "http_workers_max": self.http_workers_max,
                "version": __version__,
                "uptime": round(now - self.started, 3),
                "locked": True,
            }
        return {
            "pid": os.getpid(),
            "socket": self.socket_path,
            "http_socket": self.http_socket_path,
            "http_workers": self.http_workers(),
            "http_workers_max": self.http_workers_max,
            "version": __version__,
            "uptime": round(now - self.started, 3),
            "locked": self.lock.locked,
            "keys": sum(1 for _ in self.held_keys.matching(now)),
            "default_lifetime": self.default_lifetime,
            "sessions": [session.state() for session in self.sessions.values()],
            "pending_deletions": [pending.state() for pending in self.pending_deletions.values()]
            + [orphan.state() for orphan in self.orphans.values()],
            "leftovers": None
            if self.leftovers is None
            else {"path": self.leftovers.path, "failing": self.leftovers_failing},
        }

    def _rules(self, args: Mapping[str, Any], secret: str | None = None) -> Rules:
        """The rules a new key gets from ``args`` (else the agent's defaults), merged with
        those of the key already held under ``secret``, if any: never looser (see
        :func:`keyagent.store.stricter`; it raises BadRequest before anything changes)."""
        rules: Rules = (
            args.get("export", self.default_export),
            self._confirm(args),
            self._allowed_exes(args),
        )
        held = None if secret is None else self.held_keys.holding(digest_of(secret))
        if held is None:
            return rules
        return stricter(held, exportable=rules[0], confirm=rules[1], allowed_exes=rules[2])

    def _confirm(self, args: Mapping[str, Any]) -> bool:
        """Whether a new key or login asks before each use; BadRequest if it would, and this
        agent has no askpass program to ask with (every use would be denied)."""
        confirm: bool = args.get("confirm", False)
        if confirm and self.askpass is None:
            raise BadRequest(
                "--confirm needs an askpass program to ask with, and this agent has none, so"
                " every use would be denied: start it with KEYAGENT_ASKPASS set, or set"
                " askpass in its config"
            )
        return confirm

    def _allowed_exes(self, args: Mapping[str, Any]) -> tuple[str, ...]:
        """The programs a new key or login allows: those ``args`` name, else the agent's
        default; BadRequest if there are some and this agent cannot see programs."""
        asked = "allow_exe" in args
        allowed: tuple[str, ...] = args["allow_exe"] if asked else self.default_allowed_exes
        if allowed and not self.sees_executables:
            raise BadRequest(NO_EXECUTABLES if asked else NO_EXECUTABLES_DEFAULT)
        return allowed

    def process_add(self, args: Mapping[str, Any]) -> Outcome:
        requested = args.get("lifetime", self.default_lifetime)
        until = None if requested is None else self.clock.monotonic() + requested
        self._rules(args, args["key"])  # refuse rules that cannot merge before any work
        self._lifetime(args, until)  # and a re-add for another account
        digest = digest_of(args["key"])
        if digest in self._adding:  # its keyring save is under way: nothing decided yet
            raise Busy("an add of this key is under way; retry once it has ended")
        orphan = self.orphans.get(digest)
        if orphan is not None and orphan.running:  # a waiting one is kept (_resume_orphans)
            raise Busy(
                f"key {digest[:KEY_ID_SHOWN]}, left by an earlier agent, is being deleted on "
                "the service right now; keyagent-ctl status shows it until that ends, after "
                "which the key no longer works if it was deleted"
            )
        if digest in self.pending_deletions:
            # Its deletion was decided (forgotten, expired, rotated out) and goes on in the
            # background: held again, it would be served until that deletion revoked it.
            raise Busy(
                f"key {digest[:KEY_ID_SHOWN]} is being deleted on the service (it was forgotten,"
                " expired or replaced by a rotation), so it is not held again: it stops working"
                " once deleted; keyagent-ctl status shows the deletion until it ends"
            )
        held = self.held_keys.holding(digest)
        if args.get("persist", self.default_persist) or (held is not None and held.persisted):
            # A persisted key's record is written again even without --persist: the rules
            # this add merges in (never looser) must survive a restart too.
            return self._add_persisted(args, until, held)
        if held is None:
            self._check_room()  # places that waiting creates have taken count too
        return self._hold(args, until)

    def _lifetime(self, args: Mapping[str, Any], until: float | None) -> float | None:
        """The lifetime to hold ``args``' key with, now: to ``until`` (the agent's clock;
        None: no end), or to the held key's own deadline if that is earlier. Adding a held
        key again changes neither whom it goes to nor how long it lives, as it loosens none
        of its rules: each would undo a choice made for it. So a key held (and alive) for
        another account is refused. Asked again after any wait, as things may have moved."""
        now = self.clock.monotonic()
        held = self.held_keys.holding(digest_of(args["key"]))
        if held is not None and held.alive(now):
            if (held.host, held.user) != (args["host"], args["user"]):
                forget = "forget --persist" if held.persisted else "forget"
                raise BadRequest(
                    f"key {held.key_id} is held for {held.user} on {held.host}, and a key "
                    f"goes only to the account it was added for: forget it first "
                    f"(keyagent-ctl {forget} {held.key_id}) to add it for another"
                )
            if held.deadline is not None:
                until = held.deadline if until is None else min(until, held.deadline)
        return None if until is None else until - now

    def _add_persisted(
        self, args: Mapping[str, Any], until: float | None, held: HeldKey | None
    ) -> Steps:
        """add with persist: the keyring first, memory second, so a refusal changes nothing.
        The record is the key as it will be held: a key held already keeps what this add
        does not change (its description, creation date, ephemeral flag and rotation). No
        other add of the key starts meanwhile (:attr:`_adding`)."""
        new = held is None
        digest = digest_of(args["key"])
        if new:
            self._reserve_room()
        self._adding.add(digest)
        try:
            record = self._record(
                args["key"], host=args["host"], user=args["user"],
                description=args.get("description", held.description if held else ""),
                created=held.created if held else None, lifetime=self._lifetime(args, until),
                rules=self._rules(args, args["key"]), ephemeral=bool(held and held.ephemeral),
            )._replace(rotate_every=held.rotate_every if held else None)  # fmt: skip
            save = self._keyring(lambda keyring: keyring.save(record))
            try:
                yield save
            except Overdue as overdue:
                # The client is told the save failed: should it complete after all, undo it.
                self.in_background(self._undo_late_save(overdue.late, record.digest))
                raise
        finally:
            self._adding.discard(digest)
            if new:
                self._reserved -= 1
        return self._hold(args, until, persisted=True)

    def _undo_late_save(self, late: Late, digest: str) -> Steps:
        """Background: delete a keyring entry whose save ended after its client gave up."""
        yield late
        yield self._keyring(_deleter(digest))
        return {}

    def _hold(
        self, args: Mapping[str, Any], until: float | None, persisted: bool = False
    ) -> Result:
        exportable, confirm, allowed_exes = self._rules(args)  # put merges with a held key
        lifetime = self._lifetime(args, until)
        held = self.held_keys.put(
            host=args["host"], user=args["user"], secret=args["key"],
            now=self.clock.monotonic(), wall=self.clock.wall(), lifetime=lifetime,
            description=args.get("description"), persisted=persisted,
            exportable=exportable, confirm=confirm, allowed_exes=allowed_exes,
        )  # fmt: skip
        log.info("added key %s for %s@%s", held.key_id, held.user, held.host)
        self._resume_orphans(held.host, held.user)
        return held.listing()

    def process_get(self, args: Mapping[str, Any], peer: Peer = UNKNOWN_PEER) -> Outcome:
        host, user, key_id = args.get("host"), args.get("user"), args.get("key_id")
        op = "exec" if args.get("purpose") else "get"
        now = self.clock.monotonic()
        held = self.held_keys.newest(now, host, user, key_id)
        if key_id is None and (held.restricted or not held.exportable):
            # The newest key has rules: the key meant is the newest one this peer may take
            # out, which may be an older one. The answer depends on who asks: a generator.
            def usable(key: HeldKey) -> bool:
                return self.may_use(key, peer, export=True)

            chosen = self.held_keys.newest(now, host, user, usable=usable)
            return self._get_checked(chosen, peer, op)
        if not held.exportable and not held.allowed_exes:  # the same for every client
            try:
                self._check_export(held)
            except KeyagentError as error:
                _about(error, held)
                raise
        if held.restricted:
            # The answer depends on who asks: a generator, whose reply the server never
            # remembers, so no other client is ever answered from it (see MEMOIZABLE).
            return self._get_checked(held, peer, op)
        log.debug("served key %s", held.key_id)
        return {"key": held.secret, "key_id": held.key_id}

    def _get_checked(self, held: HeldKey, peer: Peer, op: str) -> Steps:
        yield from self.check_use(held, peer, op=op, export=True)
        if self.held_keys.holding(held.digest) is not held or not held.alive(
            self.clock.monotonic()
        ):
            raise NotFound(
                f"key {held.key_id} was forgotten or expired while its use waited for "
                "confirmation; add it again"
            )
        self._check_export(held)  # re-added meanwhile with stricter rules: they hold
        log.debug("served key %s to pid %d", held.key_id, peer.pid)
        return {"key": held.secret, "key_id": held.key_id}

    # --- the rules of a key --------------------------------------------------------------

    def check_use(
        self,
        held: HeldKey | Session,
        peer: Peer,
        *,
        op: str,
        export: bool,
        confirmed: bool = False,
    ) -> Steps:
        """Whether ``peer`` may use ``held`` (a key, or an account's session) for ``op``
        (:meth:`_check_rules`); returns None when allowed. A refusal names ``held`` as its
        subject, for the audit log."""
        try:
            return (yield from self._check_rules(held, peer, op, export, confirmed))
        except KeyagentError as error:
            _about(error, held)
            raise

    def may_use(self, held: HeldKey | Session, peer: Peer, *, export: bool) -> bool:
        """Whether the rules of ``held`` (a key, or an account's session) let ``peer`` use
        it (``export``: take the secret out) without a refusal; a confirmation aside,
        which is part of the use (:meth:`_check_rules` asks). A request that names no key
        is given the newest credential it may use, as ssh-agent offers a client only the
        keys it may use: another program's key never hides an older key of the account."""
        if export and isinstance(held, HeldKey) and not held.exportable:
            return False
        return not held.allowed_exes or (self.sees_executables and peer.exe in held.allowed_exes)

    def _check_rules(
        self, held: HeldKey | Session, peer: Peer, op: str, export: bool, confirmed: bool
    ) -> Steps:
        """Whether ``peer`` may use ``held`` for ``op``; returns None when allowed.

        A key (or session) with allowed programs refuses any other peer executable
        (:class:`~keyagent.errors.Denied`). ``export``: the secret itself would leave the
        agent (``get``, ``exec``), which a key added with ``--no-export`` then refuses
        (:class:`~keyagent.errors.Forbidden`). One with ``--confirm`` then asks the user
        through the askpass program, on a queue of its own, unless ``confirmed`` (a proxied
        connection that was allowed already); no program, a failure, a refusal or no answer
        in time is ``Denied``.
        """
        name = _named(held)
        if held.allowed_exes and not self.sees_executables:
            raise Denied(f"{name} has allowed programs, and {NO_EXECUTABLES}")
        if held.allowed_exes and peer.exe not in held.allowed_exes:
            log.warning(
                "denied %s of %s to pid %d (%s): not one of its allowed programs",
                op, name, peer.pid, peer.exe or "unknown executable",
            )  # fmt: skip
            # A key's rules never loosen when it is added again (a login's are its own).
            again = (
                "log in again with --allow-exe for this program"
                if isinstance(held, Session)
                else "forget the key and add it again with --allow-exe naming this program too"
            )
            raise Denied(
                f"{name} may be used only by {', '.join(held.allowed_exes)}, not by "
                f"{peer.exe or 'a program whose executable is unknown'} (pid {peer.pid}); run "
                f"one of those, or {again}"
            )
        # Only now: a program that may not use the key at all is told that, not a way to
        # use it (the HTTP socket) that would refuse it too.
        if export and isinstance(held, HeldKey):
            self._check_export(held)
        if not held.confirm or confirmed:
            return None
        program = self.askpass
        if program is None:
            raise Denied(
                f"{name} needs each use confirmed, and the agent has no askpass "
                "program: start it with KEYAGENT_ASKPASS set, or set askpass in its config"
            )
        question = self._question(held, peer, op)
        timeout = self.confirm_timeout
        confirmer, expired = self._confirmer, self._confirm_timed_out
        monotonic = self.clock.monotonic
        deadline = monotonic() + timeout

        def ask() -> None:
            # Questions take turns: one whose turn comes after its request was refused
            # (its deadline passed in line) asks nobody, and the rest ask for the time left.
            remaining = deadline - monotonic()
            if remaining <= 0:
                raise expired()
            try:
                confirmer(program, question, remaining)
            except Denied:
                if monotonic() >= deadline:  # the program timed out: said as the agent says it
                    raise expired() from None
                raise

        try:
            yield Work(
                ask,
                queue="confirm",
                timeout=timeout,
                timeout_error=self._confirm_timed_out,
            )
        except Denied as refused:  # say which key (or session) the answer was about
            raise Denied(f"{op} of {name}: {refused.message}") from None
        log.info("confirmed %s of %s for pid %d", op, name, peer.pid)
        return None

    def _check_export(self, held: HeldKey) -> None:
        if not held.exportable:
            raise Forbidden(
                f"key {held.key_id} cannot be taken out of the agent (it is marked "
                "--no-export); use it through the agent's HTTP socket ($KEYAGENT_HTTP_SOCK) "
                "instead"
            )

    def _confirm_timed_out(self) -> KeyagentError:
        return Denied(
            f"no answer to the confirmation within {self.confirm_timeout:g} s; answer the "
            "askpass dialog when it shows, or raise confirm_timeout in the agent's config"
        )

    @staticmethod
    def _question(held: HeldKey | Session, peer: Peer, op: str) -> str:
        """The one line the askpass program shows; no control characters from any part."""
        program = printable(peer.exe) if peer.exe else "an unknown program"
        account = f"{printable(held.user, 80)} on {printable(held.host, 80)}"
        if isinstance(held, Session):
            return (
                f"Allow {program} (pid {peer.pid}) to use the session of {account} "
                f"for {printable(op, 80)}?"
            )
        description = f' "{printable(held.description, 80)}"' if held.description else ""
        return (
            f"Allow {program} (pid {peer.pid}) to use key {held.key_id} of "
            f"{account}{description} for {printable(op, 80)}?"
        )

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
        targets: list[str] | None = None  # None: every key
        if not everything:
            try:
                targets = [self.held_keys.newest(now, key_id=key_id).digest]
            except NotFound:
                # With persist, a full key id may name a keyring entry the agent no longer
                # holds (forgotten without --persist, or left over by a failed remove).
                if not (args.get("persist") and key_id and len(key_id) == KEY_ID_MAX):
                    raise
                targets = [key_id]
        local = bool(args.get("local"))
        if args.get("persist"):
            return self._forget_persisted(targets, now, local)
        return self._forget(targets, now, local)

    def _forget_persisted(self, targets: list[str] | None, now: float, local: bool) -> Steps:
        """forget with persist: the keyring first; if it refuses, the keys stay held."""

        def unpersist(keyring: KeyringStore) -> int:
            if targets is None:
                return keyring.delete_all()
            return sum(keyring.delete(target) for target in targets)

        delete = self._keyring(unpersist)
        try:
            unpersisted = yield delete
        except Overdue as overdue:
            # Should the keyring delete after all, memory follows it.
            self.in_background(self._forget_when_done(overdue.late, targets, now, local))
            raise
        result = self._forget(targets, now, local, unpersisted=True)
        if targets is not None and not unpersisted and not result["forgotten"]:
            # A full key id that named no held key, nor any keyring entry.
            raise NotFound(
                f"no key {targets[0][:KEY_ID_SHOWN]} is held or kept in the OS keyring: check"
                " the id with keyagent-ctl list"
            )
        result["unpersisted"] = unpersisted
        return result

    def _forget_when_done(
        self, late: Late, targets: list[str] | None, now: float, local: bool
    ) -> Steps:
        """Background: forget from memory what a keyring delete removed after its deadline."""
        yield late
        return self._forget(targets, now, local, unpersisted=True)

    def _forget(
        self, targets: list[str] | None, now: float, local: bool = False, unpersisted: bool = False
    ) -> Result:
        """Drop keys from memory; an ephemeral one is deleted on the service too, in the
        background, unless ``local`` (the key then stays valid there), and so is its OS
        keyring entry if it has one (a restart would bring back a key deleted on the service),
        unless ``unpersisted`` (the caller deleted the entries already)."""
        if targets is None:
            dropped = self.held_keys.clear()
            forgotten = sum(held.alive(now) for held in dropped)
        else:
            dropped = [held for held in map(self.held_keys.discard, targets) if held is not None]
            forgotten = len(dropped)
        deleting = 0
        # Keys the agent made that stay valid on the service with nobody to hold them (they
        # are deleted neither now nor at a later start): the reply names them.
        staying = [
            {"key_id": held.key_id, "host": held.host, "user": held.user}
            for held in dropped
            if held.source == "created"
            and (local or not held.ephemeral)
            and not (held.persisted and self.keyring is not None and not unpersisted)
        ]
        if not local:
            for held in dropped:
                if held.ephemeral:
                    if held.persisted and self.keyring is not None and not unpersisted:
                        # Gone from the keyring first; the leftovers file names the key until
                        # it is deleted on the service.
                        self.in_background(self._keyring_chore(_deleter(held.digest)))
                    self.delete_on_service(held)
                    deleting += 1
        log.info("forgot %d key(s); deleting %d on the service", forgotten, deleting)
        self._leftovers_changed()
        result: Result = {"forgotten": forgotten}
        if deleting:  # only with ephemeral keys: the reply of other forgets is unchanged
            result["deleting"] = deleting
        if staying:
            result["staying"] = staying
        if targets is not None and len(dropped) == 1:
            # Which key went, in full: the audit entry names it, not the prefix typed.
            (held,) = dropped
            result.update(key_id=held.key_id, host=held.host, user=held.user)
        return result

    def process_lock(self, args: Mapping[str, Any]) -> Steps:
        if self.lock.locked:
            raise Locked("the agent is already locked; run keyagent-ctl unlock first")
        passphrase: str = args["passphrase"]
        salt = new_salt()
        digest = yield Work(lambda: derive(passphrase, salt), queue="lock")
        self.lock.engage(salt, digest)  # Locked if another lock engaged meanwhile
        log.info("agent locked")
        persisted = sum(held.persisted for held in self.held_keys.matching(self.clock.monotonic()))
        if self.keyring is not None and persisted:
            # Persisted keys come back after a restart: so does the lock, as its salted hash
            # in the keyring. The lock in memory holds already; the reply waits for the
            # keyring, so that a client (a screen-lock hook) learns when a restart would
            # serve those keys unlocked.
            self.lock_in_keyring = True
            try:
                yield self._keyring(lambda keyring: keyring.save_lock(salt, digest))
            except KeyagentError as error:  # an Overdue may still land; busy: never tried
                raise KeyringUnavailable(
                    f"the agent is locked, but the OS keyring has not taken the lock, so a "
                    f"restart could serve the {persisted} persisted key(s) unlocked "
                    f"({error.message}); fix the keyring, then unlock and lock again"
                ) from None
        return {"locked": True}

    def process_unlock(self, args: Mapping[str, Any]) -> Steps:
        salt = self.lock.salt
        if salt is None:
            raise NotLocked()
        passphrase: str = args["passphrase"]
        # One attempt at a time (the "lock" queue), none before the last failure's delay ends.
        candidate = yield Work(
            lambda: derive(passphrase, salt), queue="lock", start_at=self._next_guess_at
        )
        if self.lock.salt != salt:  # unlocked (and maybe re-locked) meanwhile
            raise NotLocked("the agent was unlocked by another client meanwhile")
        if self.lock.try_release(candidate):
            self.lock.not_before = 0.0
            log.info("agent unlocked")
            self._forget_stored_lock()
            return {"locked": False}
        delay = self.lock.failure_delay()
        self.lock.not_before = self.clock.monotonic() + delay
        log.warning("failed unlock attempt %d; reply held %.1fs", self.lock.failures, delay)
        yield Sleep(delay)  # the reply waits, and so does the next guess; nobody else does
        raise BadPassphrase()

    def _next_guess_at(self) -> float:
        return self.lock.not_before

    def process_log(self, args: Mapping[str, Any]) -> Result | Follow:
        entries = [entry.to_json() for entry in self.audit_log.last(args.get("n"))]
        result: Result = {"entries": entries}
        return Follow(result) if args.get("follow") else result

    def process_stop(self, args: Mapping[str, Any]) -> Stop:
        log.info("stop requested")
        result: Result = {"stopping": True}
        if self.lock.locked:  # says nothing status does not: why the counts are missing
            result["locked"] = True
        # Not while locked: a locked agent says nothing of what it holds (see status).
        deleting = 0 if self.lock.locked else self.due_at_stop()
        if deleting:  # the reply goes first; the server then deletes them (begin_stop)
            result["deleting"] = deleting
        # Creates and rotations under way (their keyring saves included) are waited for.
        waiting = self._creating + len(self._rotating)
        if waiting and not self.lock.locked:
            result["waiting"] = waiting
        # Keys it made without a lifetime stay valid on the service, held by nobody.
        staying = [
            {"key_id": held.key_id, "host": held.host, "user": held.user}
            for held in self.held_keys.matching(self.clock.monotonic())
            if held.source == "created"
            and not held.ephemeral
            and not held.persisted
            and held.digest not in self._persisting  # waited for: its save decides
        ]
        if staying and not self.lock.locked:
            result["staying"] = staying
        return Stop(result)

    # --- Conduce operations --------------------------------------------------------------
    # Each runs its network call on the account's queue (one call at a time per account)
    # and applies the outcome to the store and session on the loop.

    def process_login(self, args: Mapping[str, Any]) -> Steps:
        # The session's rules are checked before the password is sent, and are this login's
        # alone: a new cookie, so nothing of an earlier login's rules carries over.
        confirm = self._confirm(args)
        allowed_exes = self._allowed_exes(args)
        account = (args["host"], args["user"])
        known = account in self.sessions
        session = self.session_for(*account)
        if not known:
            session.tentative = True
        password: str = args["password"]
        session.renewing += 1  # a count: another login may wait in line behind this one
        try:
            yield Work(lambda: session.account.login(password), queue=session.queue)
        except KeyagentError:
            # A failed first login leaves no account behind (status would list it for good),
            # once no other login of it is in line.
            idle = session.renewing == 1 and not session.logged_in
            if session.tentative and idle and self.sessions.get(account) is session:
                del self.sessions[account]
            raise
        finally:
            session.renewing -= 1
        session.began(
            self.clock.monotonic(), self.clock.wall(), confirm=confirm, allowed_exes=allowed_exes
        )
        log.info("logged in %s on %s", session.user, session.host)
        self._resume_orphans(session.host, session.user)
        return {"host": session.host, "user": session.user, "session": True}

    def process_logout(self, args: Mapping[str, Any]) -> Outcome:
        if (args["host"], args["user"]) not in self.sessions:  # nothing to drop: track nothing
            return {
                "host": args["host"],
                "user": args["user"],
                "session": False,
                "was_logged_in": False,
            }
        return self._logout(self.session_for(args["host"], args["user"]))

    def _logout(self, session: Session) -> Steps:
        yield Work(session.account.logout, queue=session.queue)
        had_session = session.logged_in
        session.end()
        log.info("logged out %s on %s", session.user, session.host)
        return {
            "host": session.host,
            "user": session.user,
            "session": False,
            "was_logged_in": had_session,
        }

    def _check_not_stopping(self) -> None:
        """Refuse to make a key on the service once the agent is stopping: it would be on its
        way out before the key could be used, and had to delete it again."""
        if self.at_stop is not None:
            raise Busy("the agent is stopping; start it again, then retry")

    def process_create(self, args: Mapping[str, Any]) -> Steps:
        self._check_not_stopping()
        self._creating += 1
        try:
            return (yield from self._create(args))
        finally:
            self._creating -= 1

    def _create(self, args: Mapping[str, Any]) -> Steps:
        session = self.session_for(args["host"], args["user"])
        description: str = args.get("description", "created by keyagent")
        lifetime = args.get("lifetime", self.default_lifetime)
        keep = args.get("keep", self.keep_created_keys)
        ephemeral = lifetime is not None and not keep
        persist = args.get("persist", self.default_persist)
        if persist and self.keyring is None:  # before the service makes a key for nothing
            raise KeyringUnavailable(
                "this agent has no OS keyring configured (--no-keyring), so it cannot persist"
                " a key (asked by --persist, or by persist = true in the config file); nothing"
                " was created: create with --no-persist, or start the agent without"
                " --no-keyring"
            )
        # A key to outlive the agent says so on the service, so prune leaves it alone: a
        # persisted one too, as a prune where the keyring is out of reach (no D-Bus in an
        # SSH login, say) cannot learn that the keyring keeps it.
        kept = not ephemeral and bool(keep or args.get("reveal") or persist)
        rotate_every = self._rotate_every_of(args, lifetime)
        if args.get("reveal") and not args.get("export", self.default_export):
            raise BadRequest(
                "a key that cannot be taken out of the agent cannot be printed either: leave "
                "out --print, or give --export"
            )
        asked = self._rules(args)  # refuses rules this agent cannot keep before any call
        # A printed key keeps none of its rules outside the agent.
        making: Rules = PRINTED if args.get("reveal") else asked
        # Before the service makes a key the agent could not hold; held until the key is, so
        # two creates racing for the last place cannot both reach the service.
        self._reserve_room()
        try:
            secret: str = yield from self._create_on_service(
                session, description, making, kept=kept, printing=bool(args.get("reveal"))
            )
        finally:
            self._reserved -= 1
        created = iso(self.clock.wall())
        # The agent began to stop while the service made the key: it cannot hold the key
        # past its exit, and nobody else will have the secret (neither printed nor
        # persisted). So the key dies at stop with the ephemeral ones, and the client is
        # told that, not that the agent holds it.
        orphan = self.at_stop is not None and not args.get("reveal") and not persist
        exportable, confirm, allowed_exes = self._rules(args)  # put merges with a held key
        held = self.held_keys.put(
            host=session.host, user=session.user, secret=secret,
            now=self.clock.monotonic(), wall=self.clock.wall(), lifetime=lifetime,
            description=description, created=created, source="created",
            exportable=exportable, confirm=confirm, allowed_exes=allowed_exes,
            ephemeral=ephemeral,
        )  # fmt: skip
        if orphan:
            raise _dies_at_stop_now(
                held,
                f"the agent began to stop while the service made key {held.key_id}, and "
                "deletes that key on the service before it exits; start an agent again, then "
                "retry",
            )
        if rotate_every is not None:
            self._schedule_rotation(held, rotate_every)
        log.info("created key %s for %s on %s", held.key_id, session.user, session.host)
        if held.ephemeral:  # recorded before the reply: a crash after it cannot lose the key
            yield from self._record_leftovers()
        unrecorded = held.ephemeral and self.leftovers is not None and self.leftovers_failing
        if persist:
            # The key exists on the service and is held now; only its persistence can fail.
            record = self._record(
                held.secret, host=held.host, user=held.user, description=description,
                created=created, lifetime=lifetime,
                rules=(held.exportable, held.confirm, held.allowed_exes),
                ephemeral=held.ephemeral,
            )._replace(rotate_every=held.rotate_every)  # fmt: skip
            save = self._keyring(lambda keyring: keyring.save(record))
            try:
                yield from self._saving(held.digest, save)
            except KeyagentError as error:
                if self.at_stop is not None and not isinstance(error, Overdue):
                    # Stopping, and not persisted: nobody would hold the key once the agent
                    # exits, with a lifetime or without (see _saving).
                    raise _dies_at_stop_now(
                        held,
                        f"the OS keyring did not take key {held.key_id} ({error.message}) "
                        f"while the agent stops, so it deletes key {held.key_id} on the "
                        "service before it exits; start an agent again, then retry",
                    ) from None
                # Undone: a key asked to outlive the agent that would not (and that its
                # mark keeps out of prune's reach) is worse than none.
                if isinstance(error, Overdue):  # should the save complete after all: undo it
                    self.in_background(self._undo_late_save(error.late, held.digest))
                if self.held_keys.holding(held.digest) is held:
                    self.held_keys.discard(held.digest)
                    self.delete_on_service(held)
                raise KeyringUnavailable(
                    f"the OS keyring did not take the new key {held.key_id} ({error.message}),"
                    " so the agent deletes it on the service and holds nothing: fix the"
                    " keyring, or create without --persist"
                ) from None
            held.persisted = True
            self._leftovers_changed()  # the keyring holds it now
        listing = held.listing()
        if unrecorded:  # the client says so: a crash now would leave the key on the service
            listing["unrecorded"] = True
        if args.get("reveal"):
            self._check_export(held)  # merged with a held key that cannot be taken out
            listing["key"] = held.secret
        return listing

    def _saving(self, digest: str, save: Work) -> Steps:
        """``save``, the keyring save of the key with ``digest`` (held already, or a
        rotation's successor). Meanwhile a stopping agent neither deletes the key (it is
        about to be persisted: it comes back at the next start) nor exits; should the save
        fail, the key dies at stop after all."""
        self._persisting.add(digest)
        try:
            yield save
        except KeyagentError:
            if self.at_stop is not None:
                self.at_stop.swept = -1  # look at the held keys again: this one dies at stop
            raise
        finally:
            self._persisting.discard(digest)

    def _create_on_service(
        self,
        session: Session,
        description: str,
        making: Rules,
        *,
        kept: bool = False,
        printing: bool = False,
    ) -> Steps:
        """Create a key for ``session``'s account on the service; returns its secret. The
        service sees ``description`` :func:`marked` as keyagent's. ``making``: the new key's
        rules, which only a credential no stricter may make it with (:meth:`_plan`). The
        caller holds a place for the key (:meth:`_reserve_room`)."""
        account = session.account
        on_service = marked(description, kept=kept)
        secret: str = yield from self._remote(
            session,
            self._plan(session, making=making, printing=printing),
            lambda api_key: account.create_key(on_service, api_key=api_key),
        )
        digest = digest_of(secret)
        already = self.held_keys.holding(digest)
        if already is not None and (already.host, already.user) != (session.host, session.user):
            # A service that answers with a key the agent holds for another account is
            # hostile or broken: holding it here would send that key to this host.
            raise RemoteError(
                f"the service at {session.host} answered create with a key the agent holds "
                "for another account; the key was not taken: check the --host you use"
            )
        if already is not None:
            # The same account's: a broken service. Taken as new, the key would be merged
            # into the one held (its rules, lifetime, keyring record), and a failure after
            # would delete the user's key.
            raise RemoteError(
                f"the service at {session.host} answered create with a key the agent holds "
                "already; nothing was created: retry later"
            )
        if digest in self.pending_deletions or digest in self.orphans:
            # Held again, it would be handed out until the deletion under way revoked it.
            raise RemoteError(
                f"the service at {session.host} answered create with a key the agent is "
                "deleting; nothing was taken: retry later"
            )
        return secret

    def _list_remote(self, args: Mapping[str, Any]) -> Steps:
        host, user = args.get("host"), args.get("user")
        if host is None or user is None:
            raise BadRequest("list with remote: true needs both 'host' and 'user'")
        session = self.session_for(host, user)
        account = session.account
        listed_keys = yield from self._remote(
            session, self._plan(session), lambda api_key: account.list_keys(api_key=api_key)
        )
        if self.lock.locked:  # locked while the service answered: a locked agent lists nothing
            raise Locked(
                "the agent was locked while the service listed the keys; run keyagent-ctl "
                "unlock, then list again"
            )
        on_service = {digest_of(listed.key): listed for listed in listed_keys}
        mine = list(self.held_keys.matching(self.clock.monotonic(), host, user))
        held_digests = {held.digest for held in mine}
        keys = [
            {**held.listing(), "stale": held.digest not in on_service} for held in reversed(mine)
        ]
        remote = [
            {"key_id": digest[:KEY_ID_SHOWN], "fingerprint": digest,
             "masked": listed.masked(), "description": listed.description,
             "created": listed.created, "held": digest in held_digests,
             "pending_deletion": digest in self.pending_deletions or digest in self.orphans,
             "keyagent": is_marked(listed.description)}
            for digest, listed in on_service.items()
        ]  # fmt: skip
        return {"keys": keys, "remote": remote}

    def process_remove(self, args: Mapping[str, Any]) -> Steps:
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

        def delete(api_key: str | None) -> tuple[str, bool]:  # on a worker: one or two calls
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
                return digest_of(target), False
            try:
                account.delete_key(target, api_key=api_key)
            except NotFound:  # deleted elsewhere (the console, another agent): gone all the same
                return digest_of(target), True
            return digest_of(target), False

        digest, gone = yield from self._remote(session, plan, delete)
        if gone:
            log.info("key %s was already gone from %s", digest[:KEY_ID_SHOWN], session.host)
        removed = self.held_keys.discard(digest)
        log.info("removed key %s on %s", digest[:KEY_ID_SHOWN], session.host)
        self._leftovers_changed()
        if removed is not None and removed.persisted:
            forget_persisted = self._keyring(lambda keyring: keyring.delete(digest))
            try:
                yield forget_persisted
            except KeyagentError as error:
                raise KeyringUnavailable(
                    f"removed key {digest[:KEY_ID_SHOWN]} on the service and from memory, but "
                    f"its OS keyring entry remains ({error.message}); then run keyagent-ctl "
                    f"forget --persist {digest}"
                ) from None
        return {
            "key_id": digest[:KEY_ID_SHOWN],
            "fingerprint": digest,
            "host": session.host,
            "user": session.user,
            "removed": True,
            "forgotten": 1 if removed else 0,
            "already_gone": gone,
        }

    # --- orphans: keyagent's keys on the service that this agent does not hold ------------

    def process_prune(self, args: Mapping[str, Any], peer: Peer = UNKNOWN_PEER) -> Steps:
        """The account's keys on the service that keyagent created (:func:`is_marked`) and
        that this agent neither holds nor is deleting: left by an agent that crashed or was
        stopped. With ``delete``, each is deleted on the service with the account's
        credentials, one call each; one failure does not stop the others, and each deletion
        is recorded in the audit log (op ``prune``).

        Another agent of the same account (another machine) that holds keyagent keys would
        see them deleted: this agent can only know what it holds itself.
        """
        if self.keyring is None:  # --no-keyring: a persisted key would look like an orphan
            raise KeyringUnavailable(
                "prune must know which keys the OS keyring keeps (they come back when an "
                "agent restarts), and this agent does not read it (--no-keyring): run prune "
                "with an agent that does, or remove keys by id (keyagent-ctl remove)"
            )
        session = self.session_for(args["host"], args["user"])
        account = session.account
        listed_keys = yield from self._remote(
            session, self._plan(session), lambda api_key: account.list_keys(api_key=api_key)
        )
        kept = yield from self._kept_in_keyring()
        if self.lock.locked:  # locked meanwhile: neither list nor delete, as list --remote
            raise Locked(
                "the agent was locked while the service listed the keys, so nothing was "
                "pruned; run keyagent-ctl unlock, then prune again"
            )
        # Judged on the loop once the list is back: what the agent holds now.
        orphans = {
            digest_of(listed.key): listed
            for listed in listed_keys
            if is_prunable(listed.description) and self._is_orphan(digest_of(listed.key), kept)
        }
        entries = [
            {"key_id": digest[:KEY_ID_SHOWN], "fingerprint": digest,
             "masked": listed.masked(), "description": listed.description,
             "created": listed.created}
            for digest, listed in orphans.items()
        ]  # fmt: skip
        result: Result = {"host": session.host, "user": session.user, "orphans": entries}
        if not args.get("delete"):
            return result
        deleted = failed = 0
        for entry, (digest, listed) in zip(entries, orphans.items(), strict=True):
            if not self._is_orphan(digest, kept):  # added or restored while others went
                entry.update(deleted=False, held=True)
                continue
            outcome = yield from self._prune_one(session, digest, listed.key)
            if outcome is None:
                entry["deleted"] = True
                deleted += 1
            else:
                entry["deleted"] = False
                entry["error"] = outcome.to_wire()
                failed += 1
            self.audit(
                "prune", peer, outcome="ok" if outcome is None else outcome.code,
                key_id=digest[:KEY_ID_SHOWN], host=session.host, user=session.user,
            )  # fmt: skip
        log.info(
            "pruned %d orphaned key(s) of %s on %s; %d could not be deleted",
            deleted, session.user, session.host, failed,
        )  # fmt: skip
        result.update(deleted=deleted, failed=failed)
        return result

    def _kept_in_keyring(self) -> Steps:
        """The ids of the keys the OS keyring keeps (see :meth:`KeyringStore.fingerprints`):
        a key forgotten from memory but still persisted comes back at the next start, so it
        is no orphan."""
        assert self.keyring is not None  # noqa: S101  # process_prune checked
        try:
            kept: frozenset[str] = yield self._keyring(lambda keyring: keyring.fingerprints())
        except KeyagentError as error:
            raise KeyringUnavailable(
                "prune must know which keys the OS keyring keeps (they come back when the "
                f"agent restarts), and {error.message}"
            ) from None
        return kept

    def _is_orphan(self, digest: str, kept: frozenset[str] = frozenset()) -> bool:
        """Whether a key on the service is none of this agent's: not held (expired or not),
        not kept in the OS keyring (``kept``: ids, full or of 12 digits), and not being
        deleted (:meth:`delete_on_service` and the leftovers of an earlier agent,
        :meth:`adopt_leftovers`, own those)."""
        return (
            self.held_keys.holding(digest) is None
            and digest not in self.pending_deletions
            and digest not in self.orphans
            and digest not in kept
            and digest[:12] not in kept
        )

    def _prune_one(self, session: Session, digest: str, secret: str) -> Steps:
        """Delete one orphan on the service; returns None when it is gone (a key the service
        no longer knows counts as deleted), else the error that stopped it."""
        account = session.account
        try:
            yield from self._remote(
                session,
                self._plan(session),
                lambda api_key: account.delete_key(secret, api_key=api_key),
            )
        except NotFound:
            log.info("orphan %s was already gone from %s", digest[:KEY_ID_SHOWN], session.host)
        except KeyagentError as error:
            log.warning(
                "could not delete orphaned key %s on %s: %s",
                digest[:KEY_ID_SHOWN], session.host, error.message,
            )  # fmt: skip
            return error
        else:
            log.info("deleted orphaned key %s on %s", digest[:KEY_ID_SHOWN], session.host)
        return None

    # --- rotation ------------------------------------------------------------------------
    # A rotation replaces a held key by a new one of the same account, made on the service
    # with the same description, rules, flags and deadline: the new key is held and served
    # in the very step the old one is dropped, then the old one is deleted on the service.

    def process_rotate(self, args: Mapping[str, Any], peer: Peer = UNKNOWN_PEER) -> Steps:
        self._check_not_stopping()
        everything, key_id = args.get("all", False), args.get("key_id")
        if everything == (key_id is not None):
            raise BadRequest(
                "rotate needs either 'key_id' or 'all': true (with 'host' and 'user'), not both"
            )
        host, user = args.get("host"), args.get("user")
        if everything:
            if host is None or user is None:
                raise BadRequest("rotate with all: true needs both 'host' and 'user'")
            return self._rotate_all(host, user, peer)
        held = self.held_keys.newest(self.clock.monotonic(), host, user, key_id)
        self._check_not_rotating(held)
        return self._rotate(held, peer)

    def _check_not_rotating(self, held: HeldKey) -> None:
        if held.digest in self._rotating:
            raise Busy(
                f"key {held.key_id} is being rotated already; wait for that to end, then see "
                "keyagent-ctl list"
            )

    def _rotate_all(self, host: str, user: str, peer: Peer) -> Steps:
        """Rotate every created key held for the account, oldest first, one after another;
        a failure is reported with its key and does not stop the others."""
        now = self.clock.monotonic()
        held_now = list(self.held_keys.matching(now, host, user))
        targets = [held for held in reversed(held_now) if _made_by_agent(held)]
        rotated: list[Result] = []
        failed: list[Result] = []
        for held in targets:
            try:
                if self.held_keys.holding(held.digest) is not held or not held.alive(
                    self.clock.monotonic()
                ):
                    raise NotFound(f"key {held.key_id} was forgotten or expired meanwhile")
                self._check_not_rotating(held)
                rotated.append((yield from self._rotate(held, peer)))
            except KeyagentError as error:
                failed.append(
                    {"key_id": held.key_id, "fingerprint": held.digest, "error": error.to_wire()}
                )
        return {"host": host, "user": user, "rotated": rotated, "failed": failed}

    def _rotate(self, held: HeldKey, peer: Peer) -> Steps:
        """Replace ``held`` by a new key made on the service; returns the new key's listing
        with the old key's id and whether the old key is deleted on the service already
        (else it is pending deletion, retried in the background). If the new key cannot be
        made, nothing changes and the error is the service's.

        Each outcome is recorded in the audit log: ``rotate`` with the new key's id and
        ``rotated`` with the old one's, or ``rotate`` with the old key's id and the error.
        """
        old_id, digest = held.key_id, held.digest
        session = self.session_for(held.host, held.user)
        persisted = held.persisted and self.keyring is not None
        created = iso(self.clock.wall())
        self._rotating.add(digest)
        try:
            rules = (held.exportable, held.confirm, held.allowed_exes)
            # Marked kept as create --persist marks such a key.
            kept = persisted and not held.ephemeral
            secret: str = yield from self._create_on_service(
                session, held.description, rules, kept=kept
            )
            if persisted:
                # The successor's record first, while the old key is still the one held and
                # served: should the keyring refuse it, nothing changes, and a restart
                # brings back a key the service still accepts.
                yield from self._save_successor(held, secret, created)
        except KeyagentError as error:
            self.audit("rotate", peer, outcome=error.to_wire()["code"], key_id=old_id,
                       host=held.host, user=held.user)  # fmt: skip
            raise
        finally:
            self._rotating.discard(digest)
        now, wall = self.clock.monotonic(), self.clock.wall()
        if self.at_stop is not None and not persisted:
            # The agent began to stop while the service made the successor: held, it would
            # outlive the agent with nobody holding it, unnamed by the stop's reply. So the
            # rotation is not made (as a create then is not): the new key is deleted with the
            # ephemeral ones, and the old one is left to the stop like any other.
            self._delete_unheld(held, secret)
            stopped = Busy(
                f"the agent began to stop while the service made the key to replace key "
                f"{old_id}, so the rotation is not made: the new key is deleted on the "
                f"service, and key {old_id} is kept or deleted as the stop does with it; "
                "start an agent again, then retry"
            )
            self.audit("rotate", peer, outcome=stopped.code, key_id=old_id, host=held.host,
                       user=held.user)  # fmt: skip
            raise stopped
        if self.held_keys.holding(digest) is not held or not held.alive(now):
            # Forgotten or expired while the service made its successor: nobody asked for
            # a key of its own, so the new one goes too, and its record.
            self._delete_unheld(held, secret)
            remains = ""
            if persisted:
                try:
                    yield self._keyring(_deleter(digest_of(secret)))
                except KeyagentError as error:
                    remains = (
                        f"; its entry in the OS keyring remains ({error.message}): run"
                        f" keyagent-ctl forget --persist {digest_of(secret)}"
                    )
            gone = NotFound(
                f"key {old_id} was forgotten or expired while it was rotated; the new key is "
                f"deleted on the service{remains}"
            )
            self.audit("rotate", peer, outcome=gone.code, key_id=old_id, host=held.host,
                       user=held.user)  # fmt: skip
            raise gone
        # The same step drops the old key and holds the new one: no request sees neither.
        # The new key needs no free place: it takes the old one's.
        lifetime = None if held.deadline is None else held.deadline - now
        self.held_keys.discard(digest)
        new = self.held_keys.put(
            host=held.host, user=held.user, secret=secret, now=now, wall=wall,
            lifetime=lifetime, description=held.description, created=created,
            source="created", exportable=held.exportable, confirm=held.confirm,
            allowed_exes=held.allowed_exes, ephemeral=held.ephemeral,
        )  # fmt: skip
        new.persisted = persisted
        # From now on the old key is a pending deletion: not served, shown by status, tried
        # by a stopping agent, and named by the leftovers file until it is gone.
        pending = PendingDeletion(held, wall)
        self.pending_deletions[digest] = pending
        self._rotation_delays.pop(digest, None)
        if held.rotate_every is not None:
            self._schedule_rotation(new, held.rotate_every)
        log.info("rotated key %s to %s for %s on %s", old_id, new.key_id, held.user, held.host)
        self.audit("rotate", peer, key_id=new.key_id, host=new.host, user=new.user)
        self.audit("rotated", peer, key_id=old_id, host=held.host, user=held.user)
        # As for create, before the reply: a crash from here on loses neither key.
        yield from self._record_leftovers()
        old_remains = None
        if persisted:
            try:
                yield self._keyring(_deleter(digest))
            except KeyagentError as error:
                old_remains = (
                    f"the entry of key {old_id} remains ({error.message}): run keyagent-ctl "
                    f"forget --persist {digest}"
                )
        # Then the old key goes on the service, ephemeral or not: that is what rotating means.
        old_deleted = True
        try:
            yield from self._delete_once(pending)
        except NotFound:
            pass  # already gone: as good as deleted
        except KeyagentError as error:
            if self.pending_deletions.get(digest) is pending:  # not ended meanwhile (at stop)
                log.warning(
                    "could not delete the rotated key %s on %s (%s); retrying in the background",
                    old_id, held.host, error.message,
                )  # fmt: skip
                self.in_background(self._delete_then_tidy(pending))
                old_deleted = False
        if old_deleted and self.pending_deletions.get(digest) is pending:
            del self.pending_deletions[digest]
            self._leftovers_changed()
        if old_remains is not None:
            raise KeyringUnavailable(
                f"rotated key {old_id} to {new.key_id}, which the agent holds, serves and"
                f" keeps in the OS keyring; but there {old_remains}"
            )
        result = new.listing()
        result.update(
            old_key_id=old_id, old_fingerprint=digest, old_deleted=old_deleted,
            pending_deletion=not old_deleted,
        )  # fmt: skip
        return result

    def _save_successor(self, held: HeldKey, secret: str, created: str | None) -> Steps:
        """Save to the OS keyring the key made to replace ``held``, with ``held``'s account,
        description, rules, lifetime and schedule. If the keyring does not take it, the
        new key is deleted on the service and the rotation fails with nothing changed."""
        lifetime = None if held.deadline is None else held.deadline - self.clock.monotonic()
        record = self._record(
            secret, host=held.host, user=held.user, description=held.description,
            created=created, lifetime=lifetime,
            rules=(held.exportable, held.confirm, held.allowed_exes), ephemeral=held.ephemeral,
        )._replace(rotate_every=held.rotate_every)  # fmt: skip
        new_digest = digest_of(secret)
        try:
            yield from self._saving(new_digest, self._keyring(lambda keyring: keyring.save(record)))
        except KeyagentError as error:
            self._delete_unheld(held, secret)
            if isinstance(error, Overdue):  # should the save complete after all: undo it
                self.in_background(self._undo_late_save(error.late, new_digest))
            raise KeyringUnavailable(
                f"key {held.key_id} was not rotated: the OS keyring did not take the new key"
                f" ({error.message}), so the agent deletes that on the service; key"
                f" {held.key_id} stays as it was, held and in the keyring"
            ) from None

    def _delete_unheld(self, held: HeldKey, secret: str) -> None:
        """Delete on the service, in the background, a key made for ``held``'s account that
        the agent will not hold."""
        orphan = HeldKey(
            digest=digest_of(secret), host=held.host, user=held.user, secret=secret,
            added=self.clock.wall(),
        )  # fmt: skip
        self.delete_on_service(orphan)

    # --- rotation on a schedule ------------------------------------------------------------

    def _rotate_every_of(self, args: Mapping[str, Any], lifetime: float | None) -> float | None:
        """A create's ``rotate_every``, checked against the key's lifetime before any work."""
        every: float | None = args.get("rotate_every")
        if every is not None and lifetime is not None and lifetime <= every:
            raise BadRequest(
                f"a key with a lifetime of {lifetime:g} s would expire before its first "
                f"rotation (every {every:g} s): give a shorter --rotate-every, or a longer "
                "--lifetime"
            )
        return every

    def _schedule_rotation(self, held: HeldKey, every: float, delay: float | None = None) -> None:
        """Rotate ``held`` in ``delay`` seconds (default: ``every``), then every ``every``."""
        now = self.clock.monotonic()
        wait = every if delay is None else delay
        held.rotate_every = every
        held.rotate_at = now + wait
        held.next_rotation = self.clock.wall() + wait
        heapq.heappush(self._rotations, (held.rotate_at, held.digest))

    def rotate_due(self) -> float | None:
        """Start the rotations that are due, in the background; return the next monotonic
        time one is, if any. The server calls it before each wait, as it calls :meth:`reap`."""
        if self.at_stop is not None:  # a stopping agent makes no new keys on the service
            return None
        now = self.clock.monotonic()
        heap = self._rotations
        while heap and heap[0][0] <= now:
            when, digest = heapq.heappop(heap)
            held = self.held_keys.holding(digest)
            if held is None or held.rotate_at != when or not held.alive(now):
                # Forgotten, expired, rotated by hand or rescheduled: a stale entry.
                if held is None:
                    self._rotation_delays.pop(digest, None)
                continue
            self.in_background(self._rotate_on_schedule(held))
        return heap[0][0] if heap else None

    def _rotate_on_schedule(self, held: HeldKey) -> Steps:
        """Background: one scheduled rotation; a failure is logged and retried with backoff
        (doubling from :data:`FIRST_RETRY` to :data:`MAX_RETRY`) while the key is held."""
        try:
            if held.digest in self._rotating:
                raise Busy(f"key {held.key_id} is being rotated by a request")
            result = yield from self._rotate(held, SIGNAL_PEER)
        except KeyagentError as error:
            if self.held_keys.holding(held.digest) is not held or held.rotate_every is None:
                return {}
            delay = self._rotation_delays.get(held.digest, FIRST_RETRY)
            wait = self._jitter(delay)
            self._rotation_delays[held.digest] = min(delay * 2, MAX_RETRY)
            self._schedule_rotation(held, held.rotate_every, wait)
            log.warning(
                "could not rotate key %s on %s (%s); retrying in %.0f s",
                held.key_id, held.host, error.message, wait,
            )  # fmt: skip
            return {}
        return result

    # --- the HTTP socket (keyagent.proxy) ----------------------------------------------------

    def authorize_proxy(
        self,
        peer: Peer,
        host: str,
        user: str | None,
        key_id: str | None,
        confirmed: frozenset[str] = frozenset(),
    ) -> Steps:
        """Credentials for one proxied request to ``host``, as for the agent's own calls: the
        account's live session, else its newest held key; ``key_id`` picks a held key.

        ``user`` may be omitted when the agent holds credentials for one account of ``host``
        only. ``confirmed``: what the user already allowed on this connection (marks of
        keys and logins, :meth:`use_mark`).
        A held key is lent only as its rules allow (:meth:`check_use`: allowed programs,
        confirmation), never refused for being non-exportable: this is what those are for.
        Returns a :class:`Grant`.
        """
        if self.lock.locked:
            raise Locked()
        now = self.clock.monotonic()
        if key_id is not None:
            held = self.held_keys.newest(now, host, user, key_id)
            return (yield from self._lend(held, peer, confirmed))
        accounts = {
            session.user
            for session in self.sessions.values()
            if session.host == host and session.live and (user is None or session.user == user)
        }
        accounts.update(held.user for held in self.held_keys.matching(now, host, user))
        if not accounts:
            who = f"{user} at {host}" if user is not None else host
            raise LoginRequired(
                f"the agent holds no credentials for {who}; run keyagent-ctl login, "
                "or keyagent-ctl add a key for it"
            )
        if len(accounts) > 1:
            raise Ambiguous(
                f"the agent holds credentials for {len(accounts)} accounts on {host}; "
                "name one with an X-Keyagent-User header"
            )
        (user,) = accounts
        session = self.sessions.get((host, user))
        lendable = session is not None and session.live and not session.renewing

        def usable(key: HeldKey) -> bool:
            return self.may_use(key, peer, export=False)

        if (
            session is not None
            and lendable
            and session.account.session_cookie()
            # A session kept for other programs gives way to a key this one may use.
            and (
                self.may_use(session, peer, export=False)
                or not any(map(usable, self.held_keys.matching(now, host, user)))
            )
        ):
            return (yield from self._lend_session(session, peer, confirmed))
        try:
            held = self.held_keys.newest(now, host, user, usable=usable)
        except NotFound:
            if session is not None and session.renewing:
                raise Busy(
                    f"a login of {user} on {host} is under way; retry once it has ended"
                ) from None
            raise LoginRequired(
                f"the session of {user} at {host} has ended and the agent holds no key for it;"
                " run keyagent-ctl login"
            ) from None
        return (yield from self._lend(held, peer, confirmed))

    def proxy_session_refused(
        self,
        peer: Peer,
        host: str,
        user: str,
        key_id: str | None,
        confirmed: frozenset[str] = frozenset(),
        *,
        retry: bool = True,
    ) -> Steps:
        """The service answered 401 to a proxied request made with the session. That may
        mean the session expired, or only that this request was refused (any endpoint may
        answer 401): the agent asks the service (``validate``, on the account's queue) rather
        than take a tool's request for proof. Returns None if the session is alive (or its
        state could not be learnt): the tool gets the service's answer as it is. Else the
        session is marked expired and the grant to try again with is returned (a held key),
        or ``login_required`` raised. Without ``retry`` (the request cannot be sent again:
        its body streamed) the session is only checked, and None returned."""
        if self.lock.locked:
            raise Locked()
        session = self.sessions.get((host, user))
        if session is not None and session.live:
            # The check uses the session for this tool's request: recorded as op "check".
            try:
                alive = yield Work(session.account.validate, queue=session.queue)
            except KeyagentError as error:
                self.audit("check", peer, outcome=error.code, host=host, user=user)
                return None
            if alive:
                self.audit("check", peer, host=host, user=user)
                session.proved_alive(self.clock.monotonic(), self.clock.wall())
                return None
            self.audit("check", peer, outcome=SessionExpired.code, host=host, user=user)
            session.mark_expired()
            log.info("session of %s on %s expired", user, host)
        if not retry:
            return None
        return (yield from self.authorize_proxy(peer, host, user, key_id, confirmed))

    def proxy_key_refused(
        self,
        peer: Peer,
        host: str,
        user: str,
        refused: tuple[str, ...],
        confirmed: frozenset[str] = frozenset(),
        *,
        retry: bool = True,
    ) -> Steps:
        """The service answered 401 to a proxied request made with held keys ``refused``
        (digests, the last one just now). As for the session, a 401 from one endpoint is no
        proof: the agent asks the service whether the key itself is refused (lists the
        account's keys with it, on the account's queue), and notes the answer
        (:meth:`KeyStore.mark_refused`: a refused key is passed over from then on). If it
        is refused, the account's newest other held key the service has not refused is
        lent, as the agent's own calls try the next key; None if the key works (the
        endpoint refused the request), its state could not be learnt, or no other key is
        held: the tool then gets the service's answer as it is. Without ``retry`` (the
        request cannot be sent again, or the tool named the key) the key is only checked,
        and None returned."""
        if self.lock.locked:  # no key is used while locked, not even to check it
            raise Locked()
        now = self.clock.monotonic()
        held = next(self.held_keys.matching(now, host, user, refused[-1]), None)
        if held is None or len(refused) >= MAX_KEY_ATTEMPTS:
            return None
        session = self.session_for(host, user)
        account, secret = session.account, held.secret

        # The check uses the key for this tool's request: recorded as op "check".
        def checked(outcome: str) -> None:
            self.audit("check", peer, outcome=outcome, key_id=held.key_id, host=host, user=user)

        try:
            yield Work(lambda: account.list_keys(api_key=secret), queue=session.queue)
            checked("ok")
            self.held_keys.mark_refused(held, refused=False)
            return None  # the key works: only this request was refused
        except BadCredentials:
            checked(BadCredentials.code)
            self.held_keys.mark_refused(held, refused=True)
            log.info("key %s of %s on %s is refused by the service", held.key_id, user, host)
        except KeyagentError as error:
            checked(error.code)
            return None  # the key's state could not be learnt
        if not retry:
            return None
        if self.lock.locked:
            raise Locked()
        others = self.held_keys.matching(self.clock.monotonic(), host, user)
        following = next(
            (
                key
                for key in others
                if key.digest not in refused
                and not key.refused
                and self.may_use(key, peer, export=False)
            ),
            None,
        )
        if following is None:
            return None
        return (yield from self._lend(following, peer, confirmed))

    def _lend_session(self, session: Session, peer: Peer, confirmed: frozenset[str]) -> Steps:
        """The account's live session, lent as its rules allow (``login --confirm``,
        ``--allow-exe``), as a held key is by :meth:`_lend`."""
        login, mark = session.mark, self.use_mark(session.mark)
        yield from self.check_use(
            session, peer, op="proxy", export=False, confirmed=mark in confirmed
        )
        # Asking the user took time: the agent may have been locked, or the session ended or
        # been replaced by another login (whose rules were not the ones asked about). Then
        # what the agent lends now is decided again: a key, or the new login as its rules say.
        if self.lock.locked:
            raise Locked()
        cookie = session.account.session_cookie()
        if not (session.live and session.mark == login and not session.renewing and cookie):
            return (
                yield from self.authorize_proxy(peer, session.host, session.user, None, confirmed)
            )
        # At info, written at once: the audit entry comes when a request ends, and a SIGKILL
        # of the agent meanwhile (its workers end with it) would leave no trace of the lending.
        lending_log.info(
            "lending the session of %s on %s to pid %d (%s) for proxied requests",
            session.user, session.host, peer.pid, peer.exe or "unknown executable",
        )  # fmt: skip
        return Grant(
            session.host, session.user, header="Cookie", value=cookie, mark=mark,
            confirmed=session.confirm, token=self.credentials_token(),
        )  # fmt: skip

    def _lend(self, held: HeldKey, peer: Peer, confirmed: frozenset[str]) -> Steps:
        mark = self.use_mark(held.mark)
        yield from self.check_use(held, peer, op="proxy", export=False, confirmed=mark in confirmed)
        # Asking the user took time: the key may be gone, or the agent locked, since.
        if self.lock.locked:
            raise Locked()
        now = next(self.held_keys.matching(self.clock.monotonic(), key_id=held.digest), None)
        if now is None or (now.host, now.user) != (held.host, held.user):
            raise NotFound(f"key {held.key_id} was forgotten or expired; add it again")
        if now is not held or self.use_mark(now.mark) != mark:
            # Added again, or the agent locked and unlocked, while the user was asked: the
            # rules and the question were another holding's. Decided (and asked) again.
            return (yield from self._lend(now, peer, confirmed))
        lending_log.info(  # at info, written at once: see _lend_session
            "lending key %s of %s on %s to pid %d (%s) for proxied requests",
            held.key_id, held.user, held.host, peer.pid, peer.exe or "unknown executable",
        )  # fmt: skip
        return Grant.of_key(
            held, confirmed=held.confirm, token=self.credentials_token(), mark=mark
        )  # fmt: skip

    def use_mark(self, mark: str) -> str:
        """What a connection remembers the user's "yes" to a key or login as (its
        :attr:`HeldKey.mark` or :attr:`Session.mark`): a key forgotten and added again, a
        new login, or a lock of the agent, and the question is put again."""
        return f"{mark}, lock {self.lock.engaged}"

    # --- helpers for remote operations ---------------------------------------------------

    def _check_room(self) -> None:
        """Raise TooMany unless one more key fits: places being filled by requests still
        waiting on the service or the keyring (see :meth:`_reserve_room`) count as taken."""
        limit = self.held_keys.max_keys
        if limit is not None and len(self.held_keys) + self._reserved >= limit:
            raise TooMany(
                f"the agent holds {limit} keys, its limit; forget some (keyagent-ctl forget) "
                "or start it with a larger --max-keys"
            )

    def _reserve_room(self) -> None:
        """Take a place for one more key, or raise TooMany. The caller gives it back (in a
        ``finally``) once the key is held or will not be."""
        self._check_room()
        self._reserved += 1

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

    def _plan(
        self,
        session: Session,
        *,
        avoid: str | None = None,
        making: Rules | None = None,
        printing: bool = False,
    ) -> Plan:
        """Pick credentials on the loop: the live session, else a held key of the account.

        ``making``: the call creates a key with these rules, which only credentials no
        stricter may authenticate (:func:`_looser_than`): a key or session with rules never
        makes a key that escapes them. Forbidden if that rules out every credential held
        (``printing``: the key is to be printed, which the message says is why).
        """
        now = self.clock.monotonic()
        held = list(self.held_keys.matching(now, session.host, session.user))
        # Keys the service refused come after the others (it may have changed its mind), and
        # the key being removed comes last: it may still authenticate its own removal.
        held.sort(key=lambda candidate: (candidate.digest == avoid, candidate.refused))
        usable = session.live
        if making is not None:
            # During a login the cookie may be the new login's, under the old one's rules.
            usable = usable and not session.renewing
            candidates: list[HeldKey | Session] = [session] if usable else []
            candidates += held
            why = {id(candidate): _looser_than(candidate, making) for candidate in candidates}
            if candidates and all(why.values()):
                first = candidates[0]
                if printing:
                    raise Forbidden(
                        f"{_named(first)} has rules, and a printed key keeps none outside the "
                        "agent: leave out --print (and give the new key the same rules), or "
                        "log in or add a key without rules"
                    )
                raise Forbidden(
                    f"{_named(first)} {why[id(first)]}; a key made with a credential that has "
                    "rules gets them too: create it with the same rules (--no-export, "
                    "--confirm, --allow-exe), or log in or add a key without them"
                )
            usable = usable and why[id(session)] is None
            held = [candidate for candidate in held if why[id(candidate)] is None]
        api_keys = tuple(candidate.secret for candidate in held[:MAX_KEY_ATTEMPTS])
        stale = session.checked is None or now - session.checked > self.validate_after
        return Plan(use_session=usable, validate_first=usable and stale, api_keys=api_keys)

    def _remote(self, session: Session, plan: Plan, call: Callable[[str | None], Any]) -> Steps:
        """``call`` with the planned credentials, on the account's queue; returns its value.

        What the call showed of the session (alive, expired) is learnt on the way back.
        """
        try:
            result: RemoteResult = yield Work(
                lambda: run_remote(
                    session.account, plan, call, host=session.host, user=session.user
                ),
                queue=session.queue,
            )
        except SessionExpired:
            session.mark_expired()
            log.info("session of %s on %s expired", session.user, session.host)
            raise
        if result.session_alive:
            session.proved_alive(self.clock.monotonic(), self.clock.wall())
        elif result.session_expired:
            session.mark_expired()
        return result.value


def _dies_at_stop_now(held: HeldKey, message: str) -> Busy:
    """For a key made while the agent stops that nobody would hold once it exits: mark it
    to die at stop with the ephemeral keys (the stop's next sweep deletes it on the
    service), and return the refusal that tells the client so, naming the key."""
    held.ephemeral = True
    refusal = Busy(message)
    _about(refusal, held)
    return refusal


def _dies_at_stop(held: HeldKey) -> bool:
    """Whether the agent deletes ``held`` on the service when it stops: an ephemeral key not
    persisted (a persisted one comes back at the next start, with its expiry)."""
    return held.ephemeral and not held.persisted


def _made_by_agent(held: HeldKey) -> bool:
    """Whether ``held`` is a key the agent created: held since ``create`` (or a rotation), or
    restored from the keyring with a creation date (``add`` persists none)."""
    return held.source == "created" or (held.source == "keyring" and held.created is not None)


def _deleter(digest: str) -> Callable[[KeyringStore], bool]:
    return lambda keyring: keyring.delete(digest)


def _listed_deleter(account: RemoteAccount, digest: str) -> Callable[[str | None], bool]:
    """The remote call that deletes the account's key whose secret has ``digest``, found in
    its key list (run on a worker); it returns False if the list has no such key."""

    def delete(api_key: str | None) -> bool:
        for listed in account.list_keys(api_key=api_key):
            if digest_of(listed.key) == digest:
                try:
                    account.delete_key(listed.key, api_key=api_key)
                except NotFound:  # deleted between the two calls
                    return False
                return True
        return False

    return delete


def _about(error: KeyagentError, held: HeldKey | Session) -> None:
    """Name ``held`` as the subject of ``error``, a refusal to use it (for the audit log):
    a key by its id, a session by its account alone."""
    key_id = held.key_id if isinstance(held, HeldKey) else None
    error.subject = (key_id, held.host, held.user)


def _looser_than(credential: HeldKey | Session, new: Rules) -> str | None:
    """Why a key with rules ``new`` would escape ``credential``'s rules (None: it would not):
    such a key is not made with it."""
    exportable, confirm, allowed_exes = new
    # A session is never taken out; one with rules (lent through the HTTP socket alone)
    # must not make a key that can be, or a program it allows would walk away with one.
    if isinstance(credential, HeldKey):
        kept_in = not credential.exportable
    else:
        kept_in = credential.confirm or bool(credential.allowed_exes)
    if kept_in and exportable:
        return "cannot be taken out of the agent, and the new key could be (give --no-export)"
    if credential.confirm and not confirm:
        return "asks before each use (--confirm), and the new key would not"
    if credential.allowed_exes and not (
        allowed_exes and set(allowed_exes) <= set(credential.allowed_exes)
    ):
        return (
            f"may be used only by {', '.join(credential.allowed_exes)}, and the new key "
            "would not be limited to those programs"
        )
    return None


def _named(held: HeldKey | Session) -> str:
    """``held`` as a refusal's message names it."""
    if isinstance(held, HeldKey):
        return f"key {held.key_id}"
    return f"the session of {held.user} on {held.host}"
