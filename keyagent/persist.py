"""API keys kept in the OS keyring across agent restarts, through jaraco's ``keyring``.

This is the only module of keyagent that imports ``keyring``, and it does so on first use:
importing this module stays cheap. Every method of :class:`KeyringStore` blocks (D-Bus, an
unlock prompt, a slow backend), so the agent calls them on worker threads. A store
serialises its own calls; two agents sharing one keyring service are not coordinated.

Storage scheme
--------------
Everything lives under one service name, ``keyagent`` by default, in two kinds of entry:

``key:<digest>``
    One entry per key; ``<digest>`` is :func:`keyagent.store.digest_of` of the secret, its full
    hex SHA-256 (entries written before 0.2 used its first 12 digits; :meth:`load_all` renames
    them). Its
    password is compact JSON (``expires`` is POSIX wall time, or null to keep the key until
    it is forgotten; a monotonic reading would mean nothing after a restart)::

        {"v":1,"key":"<secret>","host":"app.conduce.com","user":"ada@example.com",
         "description":"laptop","created":"2024-05-01T12:00:00Z","expires":1714567890.0}

    A key with rules (``add --no-export``, ``--confirm``, ``--allow-exe``) is written as
    ``"v":2`` with ``"exportable"``, ``"confirm"`` and ``"allowed_exes"`` members besides, so
    that a keyagent too old to know them leaves it alone instead of loading it without them.
    A key the agent rotates on a schedule (``create --rotate-every``) carries
    ``"rotate_every"`` (seconds) in either format: a keyagent that does not know it loads the
    key without its schedule, which loosens nothing.

``index``
    Backends cannot enumerate their entries, so this one names them::

        {"v":1,"keys":["<digest>",...],"pending":["<digest>",...]}

    ``keys`` are the persisted keys, oldest first (re-saving a key moves it last, as
    re-adding does in :class:`keyagent.store.KeyStore`). ``pending`` is a small intent log:
    entries being written or deleted, which must not outlive a crash. When both lists are
    empty the index entry is deleted, so ``delete_all`` leaves the keyring without a trace.

Each keyring write replaces or deletes one entry whole, and the writes are ordered so that a
crash between any two of them leaves a consistent view and no secret that the index does not
name::

    save, new key    index: pending += id -> write entry -> index: pending -= id, keys += id
    save, known key  write entry (-> index, only to move the id last)
    delete           index: keys -= id, pending += id -> delete entry -> index: pending -= id
    delete_all       index: all ids pending -> delete each entry -> delete the index

A reader trusts ``keys`` only: an id gets there after its entry is written and leaves before
its entry is deleted. :meth:`KeyringStore.load_all` finishes whatever a crash interrupted:
it deletes the entries of ``pending`` ids, drops ids whose entry is missing, deletes entries
that do not parse or whose secret does not hash to their id, and deletes expired keys, all
by the delete protocol above (except expired *ephemeral* keys: those are handed back, for the
agent to delete on the service first; an entry may carry ``"ephemeral":true``, absent meaning
false). It logs such repairs by key id only. Entries and an index with
a newer ``"v"`` are left alone for the keyagent that wrote them.

Nothing read back is trusted: an entry whose host, user, key, description or dates would be
refused from a client (see :mod:`keyagent.protocol`) is skipped with a warning naming the
field, and left in the keyring; the other keys load.

Backend choice
--------------
``KeyringStore()`` uses ``keyring.get_keyring()``. keyagent never picks a store on its own:
if keyring's automatic choice is one that keyring itself does not recommend (priority below
1: its ``fail`` backend, the null backend, keyrings.alt's plain-text or password-file
backends), the store reports :class:`~keyagent.errors.KeyringUnavailable`, unless the user
named that backend in ``PYTHON_KEYRING_BACKEND``. A chainer is unwrapped to the backend it
writes to, so reads, writes and deletes all go to one store.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import namedtuple
from collections.abc import Callable, Iterable

from keyagent.errors import BadRequest, KeyringUnavailable
from keyagent.log import get_logger
from keyagent.protocol import (
    DESCRIPTION,
    HOST,
    KEY,
    KEY_ID_DIGITS,
    KEY_ID_MAX,
    KEY_ID_SHOWN,
    USER,
    is_token,
    unique_members,
)
from keyagent.rules import exe_list_problem, is_finite_number, rotate_every_problem
from keyagent.store import digest_of

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Final, Protocol, TypeVar

    T = TypeVar("T")

    class Backend(Protocol):
        """What the store needs of a keyring backend (``keyring.backend.KeyringBackend``)."""

        def get_password(self, service: str, username: str) -> str | None: ...
        def set_password(self, service: str, username: str, password: str) -> None: ...
        def delete_password(self, service: str, username: str) -> None: ...


__all__ = ["FORMAT", "RULES_FORMAT", "KeyringStore", "PersistedKey"]

log = get_logger(__name__)

FORMAT: Final = 1
RULES_FORMAT: Final = 2
"""The ``"v"`` of a key entry that carries rules (not exportable, confirm, allowed programs).
A keyagent that predates them leaves such an entry alone (a newer format) rather than load
the key without its rules; a key without rules is written as format 1, readable by all."""
"""The ``"v"`` this version writes, in entries and in the index."""
INDEX: Final = "index"
LOCK: Final = "lock"
ENTRY_PREFIX: Final = "key:"
ENV_BACKEND: Final = "PYTHON_KEYRING_BACKEND"


def _is_key_id(text: str) -> bool:
    """A full digest (64 lowercase hex digits), or the 12 of an entry written before 0.2."""
    return len(text) in (64, KEY_ID_SHOWN) and not text.strip(KEY_ID_DIGITS)


# Messages: one sentence naming the next step; built from class names and key ids only.
_FIX = (
    "install, start and unlock a Secret Service such as gnome-keyring, "
    f"or choose a keyring backend with {ENV_BACKEND}"
)
_NO_BACKEND = f"no OS keyring backend is available; {_FIX}"
_DISABLED = f"the OS keyring is disabled (keyring's null backend); {_FIX}"
_LOCKED = (
    "the OS keyring is locked or its unlock prompt was dismissed; "
    "unlock your keyring (e.g. log in to gnome-keyring or open it in Seahorse) and try again"
)
_NEWER_INDEX = (
    "the OS keyring holds keyagent data in a newer format; upgrade keyagent to use or change it"
)


BACKEND_ERRORS: Final = (BaseException,)
"""What a keyring backend's call may raise, all of it a failed call. A backend runs on a
worker thread, where ``SystemExit``, ``KeyboardInterrupt`` or an ``asyncio.CancelledError``
(a backend built on asyncio) is no request to stop (signals reach the main thread only):
let through, any of them would end the thread that every later keyring call waits on."""


def _unreadable_index(service: str) -> str:
    return (
        f"the keyring index of service {service} is unreadable, so the keys persisted before"
        " cannot be found, and keyagent neither reads nor writes the keyring until it is"
        f" fixed: restore the entry index of service {service} from a backup, or delete it"
        f" to start anew (keyring del {service} index); the keys' own entries (key:"
        "FINGERPRINT) then stay behind: keyagent-ctl forget --persist FINGERPRINT deletes one"
    )


def is_absent(error: KeyringUnavailable) -> bool:
    """Whether ``error`` says that there is no keyring to use at all (no backend, or the
    null one), as on most servers, rather than that one failed."""
    return error.message in (_NO_BACKEND, _DISABLED)


class PersistedKey(
    namedtuple(
        "PersistedKey",
        [
            "digest",
            "host",
            "user",
            "secret",
            "description",
            "created",
            "expires",
            "exportable",
            "confirm",
            "allowed_exes",
            "ephemeral",
            "rotate_every",
        ],
        defaults=[True, False, (), False, None],
    )
):
    """One key as the keyring keeps it (immutable). Its ``secret`` is left out of ``repr``.

    ``expires``: POSIX wall time at which the key expires, or None to keep it until
    forgotten. ``exportable``, ``confirm``, ``allowed_exes``: the key's rules, as
    :class:`keyagent.store.HeldKey` has them. ``ephemeral``: the agent deletes the key on
    the service when it expires, even if that moment passed while the agent was down.
    ``rotate_every``: seconds between two rotations the agent makes of the key
    (``create --rotate-every``), or None.
    """

    __slots__ = ()

    digest: str
    host: str
    user: str
    secret: str
    description: str
    created: str | None
    expires: float | None
    exportable: bool
    confirm: bool
    allowed_exes: tuple[str, ...]
    ephemeral: bool
    rotate_every: float | None

    def __repr__(self) -> str:
        return (
            f"PersistedKey(digest={self.digest!r}, host={self.host!r}, user={self.user!r}, "
            f"description={self.description!r}, created={self.created!r}, "
            f"expires={self.expires!r}, exportable={self.exportable!r}, "
            f"confirm={self.confirm!r}, allowed_exes={self.allowed_exes!r}, "
            f"ephemeral={self.ephemeral!r}, rotate_every={self.rotate_every!r})"
        )


class _Index:
    """The index entry; ``stored``: whether one exists in the keyring (even unreadable)."""

    __slots__ = ("keys", "pending", "stored")

    def __init__(self, keys: list[str], pending: list[str], stored: bool) -> None:
        self.keys = keys
        self.pending = pending
        self.stored = stored


class UnreadableLock(Exception):
    """The keyring holds a lock entry that does not parse (tampered with, or corrupt)."""


class _NewerFormat(Exception):
    """An entry written by a newer keyagent: neither loaded nor pruned."""


class _Untrusted(Exception):
    """An entry that parses but holds a value the agent would refuse from a client."""

    def __init__(self, field: str) -> None:
        super().__init__(field)
        self.field = field


class KeyringStore:
    """Persisted keys in one keyring service; see the module docstring for the scheme.

    ``backend`` is a ``keyring`` backend instance to use as is (tests pass
    :class:`keyagent.testing.memory_keyring.MemoryKeyring`), or None for
    ``keyring.get_keyring()``, vetted as the module docstring describes. Every failure of the
    keyring, whatever its type, surfaces as :class:`~keyagent.errors.KeyringUnavailable`.
    """

    def __init__(self, backend: object | None = None, *, service: str = "keyagent") -> None:
        self._given = backend
        self.service = service
        self._lock = threading.RLock()
        self._verified: Backend | None = None

    def __repr__(self) -> str:
        return f"KeyringStore(service={self.service!r})"

    # --- public API ---------------------------------------------------------------------

    def save(self, key: PersistedKey) -> None:
        """Persist ``key``, replacing any entry of the same secret."""
        if key.digest != digest_of(key.secret):
            raise ValueError("PersistedKey.digest does not match its secret")
        payload = _encode(key)
        with self._lock:
            self._save(self._ready(), key.digest, payload)

    def _save(self, backend: Backend, digest: str, payload: str) -> None:
        index = self._read_index(backend)
        entry = ENTRY_PREFIX + digest
        subject = f"key {digest[:KEY_ID_SHOWN]}"
        if digest in index.keys:
            self._set(backend, entry, payload, subject)
            if index.keys[-1] != digest:
                index.keys.remove(digest)
                index.keys.append(digest)
                self._store_index(backend, index)
            return
        if digest not in index.pending:
            index.pending.append(digest)
            self._store_index(backend, index)
        self._set(backend, entry, payload, subject)
        index.pending.remove(digest)
        index.keys.append(digest)
        self._store_index(backend, index)

    def fingerprints(self) -> frozenset[str]:
        """The ids of every key the keyring keeps an entry for (full digests; 12-digit ids
        for entries of the old format), whether the agent holds them or not: a key forgotten
        from memory only comes back at the next start. Empty when there is no keyring
        backend at all (nothing can have been persisted)."""
        with self._lock:
            try:
                backend = self._ready()
            except KeyringUnavailable as error:
                if is_absent(error):
                    return frozenset()
                raise
            index = self._read_index(backend)
            return frozenset(index.keys) | frozenset(index.pending)

    def load_all(
        self, now_wall: float, each: Callable[[PersistedKey], object] | None = None
    ) -> tuple[list[PersistedKey], list[str]]:
        """The live persisted keys, oldest first, and the ids of expired ones, now deleted.

        An expired *ephemeral* key is not deleted: it comes back with the live ones (its
        ``expires`` in the past), as the agent must still delete it on the service, and
        deletes its entry itself once that has ended (a crash in between loses nothing).

        ``each`` is called with every live key as soon as it is read, so a caller with a
        deadline keeps what was read before it. Also repairs what an interrupted write left
        behind, and renames entries of the 12-digit format (see the module docstring).
        """
        with self._lock:
            backend = self._ready()
            index = self._read_index(backend)
            live: list[PersistedKey] = []
            expired: list[str] = []
            doomed: list[str] = []
            absent: list[str] = []
            legacy: list[PersistedKey] = []
            for stored_id in list(index.keys):
                shown = stored_id[:KEY_ID_SHOWN]
                raw = self._get(backend, ENTRY_PREFIX + stored_id, f"key {shown}")
                if raw is None:
                    log.warning("key %s is in the keyring index but has no entry; dropped", shown)
                    absent.append(stored_id)
                    continue
                try:
                    key = _decode(stored_id, raw)
                except _NewerFormat:
                    log.warning("key %s was persisted by a newer keyagent; left alone", shown)
                    continue
                except _Untrusted as untrusted:
                    log.warning(
                        "the keyring entry of key %s has an invalid %s; skipped (%s)",
                        shown, untrusted.field, _how_to_forget(stored_id, self.service),
                    )  # fmt: skip
                    continue
                if key is None:  # kept: it may be the only copy of a key, and is the user's
                    log.warning(
                        "the keyring entry of key %s is unreadable; skipped (%s)",
                        shown, _how_to_forget(stored_id, self.service),
                    )  # fmt: skip
                elif key.expires is not None and key.expires <= now_wall and key.ephemeral:
                    # Still to be deleted on the service, which needs the secret: the agent
                    # deletes this entry itself once that deletion has ended.
                    log.info("persisted key %s has expired; to delete on the service", shown)
                    live.append(key)
                    if each is not None:
                        each(key)
                elif key.expires is not None and key.expires <= now_wall:
                    log.info("persisted key %s has expired; deleted", shown)
                    expired.append(stored_id)
                    doomed.append(stored_id)
                else:
                    live.append(key)
                    if each is not None:
                        each(key)
                    if stored_id != key.digest:
                        legacy.append(key)
            if index.pending:
                log.info("finishing %d interrupted keyring write(s)", len(index.pending))
            try:
                if doomed or absent or index.pending:
                    self._retire(backend, index, doomed, absent)
                for key in legacy:  # written before keys were named by their full digest
                    self._save(backend, key.digest, _encode(key))
                    self._retire(backend, self._read_index(backend), [key.digest[:12]], [])
            except KeyringUnavailable:
                # The live keys were read; the repairs are retried on the next load.
                log.warning("could not tidy the keyring index; will retry on the next load")
                return live, []
            return live, expired

    def delete(self, digest: str) -> bool:
        """Delete one persisted key by its full digest; False if it was not persisted."""
        if len(digest) != 64 or not _is_key_id(digest):
            return False
        with self._lock:
            backend = self._ready()
            index = self._read_index(backend)
            # An entry of the 12-digit format not yet renamed goes too.
            targets = [i for i in (digest, digest[:KEY_ID_SHOWN]) if i in index.keys]
            persisted = bool(targets)
            targets += [i for i in (digest, digest[:KEY_ID_SHOWN]) if i in index.pending]
            if targets:
                self._retire(backend, index, targets, [])
            elif self._get(backend, ENTRY_PREFIX + digest, f"key {digest[:KEY_ID_SHOWN]}"):
                # An entry no index names (left by an index that was lost): the user's to
                # delete by its full fingerprint, as the unreadable-index message says.
                self._delete_entry(backend, digest)
                persisted = True
            return persisted

    def save_lock(self, salt: bytes, digest: bytes) -> None:
        """Remember that the agent is locked: the salt and scrypt hash, never the passphrase.

        A restarted agent then comes back locked with the persisted keys, instead of
        unlocked (see :meth:`load_lock`).
        """
        document = {"v": FORMAT, "salt": salt.hex(), "digest": digest.hex()}
        import json  # loads with the keyring, never in an agent that does not use it

        with self._lock:
            self._set(self._ready(), LOCK, json.dumps(document), "the lock")

    def load_lock(self) -> tuple[bytes, bytes] | None:
        """The salt and hash :meth:`save_lock` stored, or None if there is none.

        Raises :class:`UnreadableLock` for an entry that is there but does not parse: the
        agent must not then start unlocked with the keys the lock was guarding.
        """
        with self._lock:
            raw = self._get(self._ready(), LOCK, "the lock")
        if raw is None:
            return None
        try:
            import json  # loads with the keyring, never in an agent that does not use it

            document = json.loads(raw, object_pairs_hook=unique_members)
            salt, digest = bytes.fromhex(document["salt"]), bytes.fromhex(document["digest"])
            if document["v"] != FORMAT or not 8 <= len(salt) <= 64 or len(digest) != 32:
                raise ValueError
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
            raise UnreadableLock from None
        return salt, digest

    def delete_lock(self) -> None:
        """Forget that the agent was locked (after an unlock); fine if nothing was stored."""
        with self._lock:
            self._delete(self._ready(), LOCK, "the lock")

    def delete_all(self) -> int:
        """Delete every persisted key and the index; returns how many keys were persisted."""
        with self._lock:
            backend = self._ready()
            index = self._read_index(backend)
            count = len(index.keys)
            if index.keys or index.pending:
                self._retire(backend, index, index.keys, [])
            elif index.stored:
                self._store_index(backend, index)
            self._delete(backend, LOCK, "the lock")  # no keys left for it to guard
            return count

    # --- the write protocol ---------------------------------------------------------------

    def _retire(
        self, backend: Backend, index: _Index, doomed: Iterable[str], absent: Iterable[str]
    ) -> None:
        """Take ids out of ``keys``, delete their entries (and all pending ones), tidy up.

        ``doomed`` ids have an entry to delete; ``absent`` ones are only dropped from the index.
        """
        doomed, gone = list(doomed), set(absent)
        leaving = gone | set(doomed)
        index.keys = [key_id for key_id in index.keys if key_id not in leaving]
        index.pending = list(dict.fromkeys([*index.pending, *doomed]))
        index.pending = [key_id for key_id in index.pending if key_id not in gone]
        self._store_index(backend, index)
        for key_id in list(index.pending):
            self._delete_entry(backend, key_id)
            index.pending.remove(key_id)
        self._store_index(backend, index)

    def _read_index(self, backend: Backend) -> _Index:
        raw = self._get(backend, INDEX, "the index")
        if raw is None:
            return _Index([], [], stored=False)
        try:
            import json  # loads with the keyring, never in an agent that does not use it

            document = json.loads(raw)  # RecursionError: nested too deeply
            version = document["v"]
            if not isinstance(version, int) or isinstance(version, bool):
                raise TypeError
            if version > FORMAT:
                raise KeyringUnavailable(_NEWER_INDEX)
            if version != FORMAT:
                raise ValueError
            keys = _key_ids(document.get("keys", []))
            pending = _key_ids(document.get("pending", []))
            # This module never lists an id in both; should an edited index do so, ``keys``
            # wins, so that repairs never delete a key the reader was shown.
            return _Index(keys, [key_id for key_id in pending if key_id not in keys], stored=True)
        except (ValueError, TypeError, KeyError, IndexError, RecursionError):
            # Read as empty, the next write would replace it, and the keys it names would
            # stay in the keyring for good, secrets and all, out of every command's reach.
            raise KeyringUnavailable(_unreadable_index(self.service)) from None

    def _store_index(self, backend: Backend, index: _Index) -> None:
        if index.keys or index.pending:
            document = {"v": FORMAT, "keys": index.keys, "pending": index.pending}
            import json  # loads with the keyring, never in an agent that does not use it

            self._set(backend, INDEX, json.dumps(document, separators=(",", ":")), "the index")
            index.stored = True
        elif index.stored:
            self._delete(backend, INDEX, "the index")
            index.stored = False

    def _delete_entry(self, backend: Backend, stored_id: str) -> None:
        self._delete(backend, ENTRY_PREFIX + stored_id, f"key {stored_id[:KEY_ID_SHOWN]}")

    # --- guarded keyring calls ----------------------------------------------------------

    def _guard(self, operation: str, subject: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except KeyringUnavailable:
            raise
        except BACKEND_ERRORS as exc:  # third-party backends raise anything (D-Bus)
            raise _unavailable(operation, subject, exc) from None

    def _get(self, backend: Backend, username: str, subject: str) -> str | None:
        value: object = self._guard(
            "read", subject, lambda: backend.get_password(self.service, username)
        )
        if value is not None and not isinstance(value, str):
            log.warning("the keyring returned a non-string for %s; ignored", subject)
            return ""
        return value

    def _set(self, backend: Backend, username: str, password: str, subject: str) -> None:
        self._guard(
            "write", subject, lambda: backend.set_password(self.service, username, password)
        )

    def _delete(self, backend: Backend, username: str, subject: str) -> None:
        """Delete one entry; one that is already gone is fine."""
        from keyring.errors import PasswordDeleteError

        try:
            backend.delete_password(self.service, username)
        except PasswordDeleteError as exc:
            # Raised both for "no such entry" and "cannot delete": tell them apart by looking.
            if self._get(backend, username, subject) is not None:
                raise _unavailable("delete", subject, exc) from None
        except BACKEND_ERRORS as exc:  # third-party backends raise anything (D-Bus)
            raise _unavailable("delete", subject, exc) from None

    # --- choosing and vetting the backend -------------------------------------------------

    def _ready(self) -> Backend:
        """The vetted backend to use, or KeyringUnavailable naming the fix."""
        if self._verified is None:
            chosen, explicit = self._resolve()
            self._verified = self._vet(chosen, explicit)
        return self._verified

    def _resolve(self) -> tuple[object, bool]:
        """The backend given or chosen by keyring, and whether the user chose it explicitly."""
        if self._given is not None:
            return self._given, True
        import keyring

        try:
            chosen = keyring.get_keyring()
        except BACKEND_ERRORS as exc:  # a bad PYTHON_KEYRING_BACKEND raises anything
            log.warning("keyring could not load a backend: %s", _dotted(type(exc)))
            raise KeyringUnavailable(
                f"keyring could not load its backend ({_dotted(type(exc))}); "
                f"check {ENV_BACKEND} and keyring's keyringrc.cfg"
            ) from None
        return chosen, _named_by_env(chosen)

    def _effective(self, chosen: object) -> object:
        """The backend that actually stores entries: a chainer's first one, else ``chosen``."""
        from keyring.backends.chainer import ChainerBackend

        if not isinstance(chosen, ChainerBackend):
            return chosen
        chain = self._guard("open", "the chained backends", lambda: list(chosen.backends))
        if not chain:
            raise KeyringUnavailable(_NO_BACKEND)
        # The chainer writes to its first backend but reads from all of them in turn, so a
        # stale index in a lower one could be read back; use the one it writes to directly.
        return chain[0]

    def _vet(self, chosen: object, explicit: bool) -> Backend:
        from keyring.backends import fail, null

        backend = self._effective(chosen)
        name = _dotted(type(backend))
        if isinstance(backend, fail.Keyring):
            raise KeyringUnavailable(_NO_BACKEND)
        if isinstance(backend, null.Keyring):
            raise KeyringUnavailable(_DISABLED)
        if not explicit:
            # Never fall back to a plain-text store on our own. keyring ranks the backends it
            # recommends at priority >= 1 (Secret Service, KWallet, macOS, Windows) and picks
            # a lower one (keyrings.alt's PlaintextKeyring at 0.5, its password-prompting
            # EncryptedKeyring, fail, null) only when nothing better exists. Such a choice is
            # accepted only when the user named it in PYTHON_KEYRING_BACKEND, i.e. opted in.
            backend_class: Any = type(backend)
            priority = self._guard("open", name, lambda: float(backend_class.priority))
            if priority < 1 or "plaintext" in type(backend).__name__.lower():
                raise KeyringUnavailable(
                    f"keyring would use {name}, which it does not recommend for secrets; "
                    f"{_FIX}, e.g. {ENV_BACKEND}={name} to accept that one"
                )
        missing = [
            method
            for method in ("get_password", "set_password", "delete_password")
            if not callable(getattr(backend, method, None))
        ]
        if missing:
            raise KeyringUnavailable(f"{name} is not a keyring backend; {_FIX}")
        return backend  # type: ignore[return-value]  # the three methods were checked above


# --- helpers ----------------------------------------------------------------------------------


def _dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _named_by_env(chosen: object) -> bool:
    """Whether PYTHON_KEYRING_BACKEND names the class of ``chosen`` (keyring loaded it so)."""
    name = os.environ.get(ENV_BACKEND, "").strip()
    module_name, _, class_name = name.rpartition(".")
    module = sys.modules.get(module_name) if module_name else None
    return module is not None and getattr(module, class_name, None) is type(chosen)


def _unavailable(operation: str, subject: str, exc: BaseException) -> KeyringUnavailable:
    """The error to raise for a failed keyring call. Logs the exception's class only: its
    message could quote what was being stored."""
    from keyring.errors import InitError, KeyringLocked, NoKeyringError

    kind = _dotted(type(exc))
    log.warning("keyring %s of %s failed: %s", operation, subject, kind)
    if isinstance(exc, KeyringLocked) or "locked" in type(exc).__name__.lower():
        # secretstorage's LockedException can escape keyring's SecretService backend as is.
        return KeyringUnavailable(_LOCKED)
    if isinstance(exc, NoKeyringError):
        return KeyringUnavailable(_NO_BACKEND)
    if isinstance(exc, InitError):
        return KeyringUnavailable(f"the OS keyring could not be opened ({kind}); {_FIX}")
    return KeyringUnavailable(f"the OS keyring failed to {operation} {subject} ({kind}); {_FIX}")


def _key_ids(value: object) -> list[str]:
    if not isinstance(value, list):
        raise TypeError
    ids = [item for item in value if isinstance(item, str) and _is_key_id(item)]
    if len(ids) != len(value):
        log.warning(
            "the keyring index lists %d malformed key id(s); ignored", len(value) - len(ids)
        )
    return list(dict.fromkeys(ids))


def _encode(key: PersistedKey) -> str:
    document: dict[str, Any] = {
        "v": FORMAT,
        "key": key.secret,
        "host": key.host,
        "user": key.user,
        "description": key.description,
        "created": key.created,
        "expires": key.expires,
    }
    if not key.exportable or key.confirm or key.allowed_exes:
        document.update(
            v=RULES_FORMAT,
            exportable=key.exportable,
            confirm=key.confirm,
            allowed_exes=list(key.allowed_exes),
        )
    if key.ephemeral:  # absent means false: entries written before it read as not ephemeral
        document["ephemeral"] = True
    if key.rotate_every is not None:
        # Any format may carry it: a keyagent that does not know it loads the key without
        # its schedule, which loosens nothing.
        document["rotate_every"] = key.rotate_every
    import json  # loads with the keyring, never in an agent that does not use it

    return json.dumps(document, separators=(",", ":"))


def _is_number(value: object) -> bool:
    return is_finite_number(value)


def _how_to_forget(stored_id: str, service: str) -> str:
    """How the user deletes the entry of ``stored_id``, which the agent did not load."""
    if len(stored_id) == KEY_ID_MAX:
        return f"forget it with keyagent-ctl forget --persist {stored_id}"
    # A 12-digit name of the old format: forget takes only a full fingerprint for a key
    # it does not hold.
    return f"delete the entry key:{stored_id} of service {service} from the OS keyring"


def _decode(stored_id: str, raw: str) -> PersistedKey | None:
    """The key an entry holds; None if it is corrupt (not JSON, a member repeated, a
    member missing or of the wrong type, a key that does not match its name). Raises
    _NewerFormat for a newer "v", _Untrusted for a value the protocol would refuse (a
    keyring is outside input too)."""
    try:
        import json  # loads with the keyring, never in an agent that does not use it

        document = json.loads(raw, object_pairs_hook=unique_members)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply
        return None
    if not isinstance(document, dict):
        return None
    version = document.get("v")
    if isinstance(version, int) and not isinstance(version, bool) and version > RULES_FORMAT:
        raise _NewerFormat
    secret, host, user = document.get("key"), document.get("host"), document.get("user")
    description, created = document.get("description", ""), document.get("created")
    expires = document.get("expires")
    # Format 1 has no rules: such a key loads with the defaults (exportable, no confirmation,
    # any program), as it was held when it was written. Rules found in any entry are read:
    # a key is never loaded looser than its entry says.
    exportable = document.get("exportable", True)
    confirm = document.get("confirm", False)
    allowed_exes = document.get("allowed_exes", [])
    ephemeral = document.get("ephemeral", False)
    if (
        version not in (FORMAT, RULES_FORMAT)
        or isinstance(version, bool)
        or not isinstance(exportable, bool)
        or not isinstance(confirm, bool)
        or not isinstance(allowed_exes, list)
        or not isinstance(ephemeral, bool)
        or not isinstance(secret, str)
        or not secret
        or not isinstance(host, str)
        or not isinstance(user, str)
        or not isinstance(description, str)
        or not (created is None or isinstance(created, str))
        or not (expires is None or _is_number(expires))
        or not digest_of(secret).startswith(stored_id)
    ):
        return None
    for field, check, value in (
        ("key", KEY, secret),
        ("host", HOST, host),
        ("user", USER, user),
        ("description", DESCRIPTION, description),
    ):
        try:
            check(field, value)
        except BadRequest:
            raise _Untrusted(field) from None
    if created is not None and not (0 < len(created) <= 64 and is_token(created)):
        raise _Untrusted("created")
    if exe_list_problem(allowed_exes) is not None:
        raise _Untrusted("allowed_exes")
    rotate_every = document.get("rotate_every")
    if rotate_every is not None and rotate_every_problem(rotate_every) is not None:
        raise _Untrusted("rotate_every")
    return PersistedKey(
        digest=digest_of(secret),
        host=host,
        user=user,
        secret=secret,
        description=description,
        created=created,
        expires=None if expires is None else float(expires),
        exportable=exportable,
        confirm=confirm,
        allowed_exes=tuple(dict.fromkeys(allowed_exes)),
        ephemeral=ephemeral,
        rotate_every=None if rotate_every is None else float(rotate_every),
    )
