"""The keys the agent holds, their lifetimes, and the lock. No I/O, no clock of its own.

Time comes in as arguments: ``now`` is a monotonic reading (for deadlines), ``wall`` a
POSIX timestamp (for the ISO dates shown to people). Expiry follows OpenSSH's reaper:
:meth:`KeyStore.reap` drops what is due and returns the next deadline, which the server
turns into its poll timeout. Lookups also skip keys already past their deadline, so a key
never outlives its lifetime even if the loop wakes late.
"""

from __future__ import annotations

import heapq
import itertools
import os
import sys
import time
from collections.abc import Callable, Iterator

from keyagent.errors import Ambiguous, BadRequest, Locked, NotFound, NotLocked, TooMany
from keyagent.protocol import KEY_ID_MAX, KEY_ID_SHOWN

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Literal

    Source = Literal["added", "created", "keyring"]


def digest_of(secret: str) -> str:
    """The full hex SHA-256 of a key: what the agent and the keyring know a key by."""
    import hashlib  # OpenSSL's libcrypto (about 3.8 MiB) loads with the first key, not before

    return hashlib.sha256(secret.encode()).hexdigest()


def key_id_for(secret: str) -> str:
    """The name a key is shown by: the first 12 hex characters of its SHA-256.

    Only a name for people: 48 bits collide by brute force in a minute, so two held keys may
    share it. Nothing is stored or selected by it alone (see :class:`KeyStore`).
    """
    return digest_of(secret)[:KEY_ID_SHOWN]


def iso(timestamp: float | None) -> str | None:
    """A POSIX timestamp as ISO 8601 in UTC, to the second."""
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


class HeldKey:
    """One API key in memory. Its ``secret`` is left out of ``repr`` and of :meth:`listing`."""

    __slots__ = (
        "digest", "host", "user", "secret", "description", "created", "added", "deadline",
        "expires", "source", "persisted", "exportable", "confirm", "allowed_exes", "ephemeral",
        "rotate_every", "rotate_at", "next_rotation", "refused", "mark",
    )  # fmt: skip

    holdings = 0
    """Counts the keys held in the process's life: each one's :attr:`mark` is its own."""

    def __init__(
        self,
        *,
        digest: str,
        host: str,
        user: str,
        secret: str,
        added: float,
        description: str = "",
        created: str | None = None,
        deadline: float | None = None,
        expires: float | None = None,
        source: Source = "added",
        persisted: bool = False,
        exportable: bool = True,
        confirm: bool = False,
        allowed_exes: tuple[str, ...] = (),
        ephemeral: bool = False,
    ) -> None:
        self.digest = digest
        """The key's full hex SHA-256: its identity in the store and the keyring."""
        self.host = host
        self.user = user
        self.secret = secret
        self.description = description
        self.created = created
        self.added = added
        self.deadline = deadline
        """Monotonic time at which the key expires, or None to keep it until forgotten."""
        self.expires = expires
        """The same moment as a POSIX timestamp, for display."""
        self.source: Source = source
        self.persisted = persisted
        self.exportable = exportable
        """False: the secret never leaves the agent (no ``get``, no ``exec``)."""
        self.confirm = confirm
        """Each use first asks the user through the askpass program."""
        self.allowed_exes = allowed_exes
        """The programs (executable paths) that may use the key; empty: any program."""
        self.ephemeral = ephemeral
        """The agent deletes the key on the service when it expires or is forgotten (a key
        ``create`` made with a lifetime and without ``keep``); never one that ``add`` gave."""
        self.rotate_every: float | None = None
        """Seconds between two rotations the agent makes on its own (``create
        --rotate-every``), or None; see :meth:`keyagent.agent.Agent.rotate_due`."""
        self.rotate_at: float | None = None
        """Monotonic time of the next scheduled rotation (a retry's, after a failure)."""
        self.next_rotation: float | None = None
        """The same moment as a POSIX timestamp, for display."""
        self.mark = ""
        """This holding of the key, as a connection remembers the user's "yes" to it
        (``--confirm``): a key forgotten (or expired) and added again is asked about
        again."""
        self.new_holding()
        self.refused = False
        """The service refused the key when the agent last checked it (revoked, say): it is
        picked only when no other key matches (see :meth:`KeyStore.mark_refused`)."""

    def __repr__(self) -> str:
        return (
            f"HeldKey(digest={self.digest!r}, host={self.host!r}, user={self.user!r}, "
            f"description={self.description!r}, created={self.created!r}, "
            f"added={self.added!r}, deadline={self.deadline!r}, expires={self.expires!r}, "
            f"source={self.source!r}, persisted={self.persisted!r}, "
            f"exportable={self.exportable!r}, confirm={self.confirm!r}, "
            f"allowed_exes={self.allowed_exes!r}, ephemeral={self.ephemeral!r}, "
            f"rotate_every={self.rotate_every!r})"
        )

    @property
    def restricted(self) -> bool:
        """Whether a use of the key depends on who asks (its programs, a confirmation): a
        reply that hands it out is then never remembered for another client."""
        return self.confirm or bool(self.allowed_exes)

    @property
    def key_id(self) -> str:
        """The short name shown to people (a prefix of :attr:`digest`); may be shared with
        another key. Computed, not stored: a string per key would cost 61 bytes each."""
        return self.digest[:KEY_ID_SHOWN]

    def listing(self) -> dict[str, Any]:
        """The key as ``list`` shows it: everything but the secret."""
        return {
            "key_id": self.key_id,
            "fingerprint": self.digest,
            "host": self.host,
            "user": self.user,
            "description": self.description,
            "created": self.created,
            "added": iso(self.added),
            "expires": iso(self.expires),
            "source": self.source,
            "persisted": self.persisted,
            "exportable": self.exportable,
            "confirm": self.confirm,
            "allowed_exes": list(self.allowed_exes),
            "ephemeral": self.ephemeral,
            "rotate_every": self.rotate_every,
            "next_rotation": iso(self.next_rotation),
            "refused": self.refused,
        }

    def new_holding(self) -> None:
        """Give the key a :attr:`mark` no holding of any key had before."""
        HeldKey.holdings += 1
        self.mark = f"key {HeldKey.holdings}"

    def alive(self, now: float) -> bool:
        return self.deadline is None or now < self.deadline


class KeyStore:
    """Held keys by the full SHA-256 of their secret, newest last, with a heap of deadlines.

    Keys are stored and deleted by their full digest, never by the 12-digit id people see:
    two different secrets are two keys even when their short ids agree, and selecting by an
    id prefix that fits both answers ``ambiguous``.
    """

    def __init__(self, max_keys: int | None = None) -> None:
        # Insertion order is "added" order: re-adding a key moves it to the end, so the
        # newest match is found by walking backwards, usually in one step.
        self._keys: dict[str, HeldKey] = {}
        self._deadlines: list[tuple[float, str]] = []
        self.max_keys = max_keys
        """How many keys may be held at once; None for no limit."""
        self.version = 0
        """Changes whenever what a lookup could return changes (for memoised replies)."""

    def __len__(self) -> int:
        return len(self._keys)

    def everything(self) -> list[HeldKey]:
        """Every key held, expired ones not yet reaped included, oldest first."""
        return list(self._keys.values())

    def holding(self, digest: str) -> HeldKey | None:
        """The key whose secret has this full digest, if held (expired or not)."""
        return self._keys.get(digest)

    def put(
        self,
        *,
        host: str,
        user: str,
        secret: str,
        now: float,
        wall: float,
        lifetime: float | None = None,
        description: str | None = None,
        created: str | None = None,
        source: Source = "added",
        persisted: bool = False,
        exportable: bool = True,
        confirm: bool = False,
        allowed_exes: tuple[str, ...] = (),
        ephemeral: bool = False,
    ) -> HeldKey:
        """Hold ``secret``; holding the same secret again updates its entry in place, its
        flags merged to the stricter of old and new (see :func:`stricter`).

        Raises :class:`~keyagent.errors.TooMany`, changing nothing, if the store is full, and
        :class:`~keyagent.errors.BadRequest`, changing nothing, if the merged programs would
        leave none.
        """
        digest = digest_of(secret)
        held = self._keys.get(digest)
        if held is not None:
            exportable, confirm, allowed_exes = stricter(
                held, exportable=exportable, confirm=confirm, allowed_exes=allowed_exes
            )
        # Hosts and users repeat across keys: keep one copy of each (about 130 bytes a key).
        host, user = sys.intern(host), sys.intern(user)
        # Keys past their deadline count until reaped, which the server does before each
        # wait: their keyring copies must be deleted too, so they are not dropped here.
        if held is None and self.max_keys is not None and len(self._keys) >= self.max_keys:
            raise TooMany(
                f"the agent holds {self.max_keys} keys, its limit; forget some "
                "(keyagent-ctl forget) or start it with a larger --max-keys"
            )
        self.version += 1
        self._keys.pop(digest, None)
        if held is None:
            held = HeldKey(
                digest=digest, host=host, user=user, secret=secret, added=wall, source=source
            )
        else:
            if not held.alive(now):  # expired, not yet reaped: held anew, asked about anew
                held.new_holding()
            held.host, held.user, held.added = host, user, wall
            # The source says where a key came from; only a restored key takes a new one.
            if held.source == "keyring":
                held.source = source
        if description is not None:
            held.description = description
        if created is not None:
            held.created = created
        held.persisted = held.persisted or persisted
        # Once the agent means to delete a key on the service, holding it again does not
        # make it forget that: the copy on the service would outlive its lifetime.
        held.ephemeral = held.ephemeral or ephemeral
        held.exportable, held.confirm, held.allowed_exes = exportable, confirm, allowed_exes
        held.refused = False  # handed over again: the service is asked afresh
        if lifetime is None:
            held.deadline = held.expires = None
        else:
            held.deadline, held.expires = now + lifetime, wall + lifetime
            heapq.heappush(self._deadlines, (held.deadline, digest))
        self._keys[digest] = held  # before compacting, which rebuilds the heap from _keys
        if len(self._deadlines) > 2 * len(self._keys) + 64:
            self._compact()
        return held

    def matching(
        self,
        now: float,
        host: str | None = None,
        user: str | None = None,
        key_id: str | None = None,
    ) -> Iterator[HeldKey]:
        """Live keys that match every given selector, newest first.

        ``key_id`` is any prefix of a key's hex SHA-256 (lower case).
        """
        if key_id is not None and len(key_id) == KEY_ID_MAX:
            exact = self._keys.get(key_id)
            candidates: Iterator[HeldKey] = iter([exact] if exact else [])
        else:
            candidates = reversed(self._keys.values())
        for held in candidates:
            if (
                (host is None or held.host == host)
                and (user is None or held.user == user)
                and (key_id is None or held.digest.startswith(key_id))
                and held.alive(now)
            ):
                yield held

    def newest(
        self,
        now: float,
        host: str | None = None,
        user: str | None = None,
        key_id: str | None = None,
        *,
        usable: Callable[[HeldKey], bool] | None = None,
    ) -> HeldKey:
        """The one key a ``get`` means: the single one a key id names, else the newest match
        that the asker may use (``usable``: any key if None) and the service has not refused
        (:attr:`HeldKey.refused`).

        Keys are passed over only within the account of the newest match (a get without a
        host may be meant for that host), and only for another one: with no usable key
        the service accepts, the newest usable one; with no usable one at all, the newest
        match, whose own rules then refuse the asker.
        """
        found = self.matching(now, host, user, key_id)
        first = next(found, None)
        if first is None:
            raise NotFound(_not_found_message(host, user, key_id))
        if key_id is not None:
            if next(found, None) is not None:
                raise Ambiguous(
                    f"key id '{key_id}' matches several keys; give more of its characters (up "
                    f"to {KEY_ID_MAX}, see keyagent-ctl list --json for each key's fingerprint)"
                )
            return first
        if not first.refused and (usable is None or usable(first)):
            return first
        fallback: HeldKey | None = None  # the newest usable key, though refused
        account = (first.host, first.user)
        for held in itertools.chain([first], found):
            if (held.host, held.user) != account or not (usable is None or usable(held)):
                continue
            if not held.refused:
                return held
            fallback = fallback or held
        return fallback or first

    def mark_refused(self, held: HeldKey, refused: bool) -> None:
        """Note what the service said of ``held`` when the agent checked it: refused (it is
        then passed over while another key matches), or accepted."""
        if held.refused != refused:
            held.refused = refused
            self.version += 1  # what newest() picks may differ: memos and grants are stale

    def discard(self, digest: str) -> HeldKey | None:
        """Drop one key by its full digest; returns it, or None if it was not held."""
        self.version += 1
        return self._keys.pop(digest, None)

    def clear(self) -> list[HeldKey]:
        """Drop every key (expired ones not yet reaped included); returns them."""
        self.version += 1
        dropped = list(self._keys.values())
        self._keys.clear()
        self._deadlines.clear()
        return dropped

    def next_deadline(self) -> float:
        """The earliest deadline of any held key (maybe one since forgotten: never later)."""
        return self._deadlines[0][0] if self._deadlines else float("inf")

    def _compact(self) -> None:
        """Drop heap entries of forgotten or re-timed keys (re-adding leaves one behind)."""
        self._deadlines = [
            (held.deadline, digest)
            for digest, held in self._keys.items()
            if held.deadline is not None
        ]
        heapq.heapify(self._deadlines)

    def reap(self, now: float) -> tuple[list[HeldKey], float | None]:
        """Drop the keys whose deadline has passed; return them and the next deadline."""
        expired: list[HeldKey] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            deadline, digest = heapq.heappop(heap)
            held = self._keys.get(digest)
            # A stale heap entry: the key was forgotten, or re-added with another lifetime.
            if held is not None and held.deadline == deadline:
                del self._keys[digest]
                expired.append(held)
                self.version += 1
        return expired, (heap[0][0] if heap else None)


def stricter(
    held: HeldKey, *, exportable: bool, confirm: bool, allowed_exes: tuple[str, ...]
) -> tuple[bool, bool, tuple[str, ...]]:
    """The flags of ``held`` merged with new ones, never looser than either: a key once not
    exportable stays so, a confirmation once asked for stays, and the allowed programs are
    those both name (or one side's, when the other allows any program).

    Nothing can loosen a key: re-adding its secret is the only way to change its flags, and
    anyone who holds the secret could otherwise lift the rules someone else set. Raises
    :class:`~keyagent.errors.BadRequest` if both sides name programs and none in common,
    which would leave a key no program may use (an empty list means any).
    """
    if not held.allowed_exes:
        merged = allowed_exes
    elif not allowed_exes:
        merged = held.allowed_exes
    else:
        wanted = set(allowed_exes)
        merged = tuple(exe for exe in held.allowed_exes if exe in wanted)
        if not merged:
            raise BadRequest(
                f"key {held.key_id} is held already, allowed to other programs than those "
                "given; give --allow-exe with one of its programs (keyagent-ctl list shows "
                "them), or forget the key first"
            )
    return held.exportable and exportable, held.confirm or confirm, merged


def _not_found_message(host: str | None, user: str | None, key_id: str | None) -> str:
    wanted = [
        f"{name} {value}"
        for name, value in (("key id", key_id), ("host", host), ("user", user))
        if value is not None
    ]
    scope = f" for {', '.join(wanted)}" if wanted else ""
    return f"no key is held{scope}; add one with keyagent-ctl add or keyagent-ctl create"


# --- the lock --------------------------------------------------------------------------------

# scrypt with n=2**14, r=8, p=1 costs ~16 MiB and tens of milliseconds: enough to make
# guessing slow, cheap enough to run on a worker thread for each attempt.
SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_LEN = 2**14, 8, 1, 32


def derive(passphrase: str, salt: bytes) -> bytes:
    """The salted scrypt hash of a lock passphrase. Slow on purpose: run it off the loop."""
    import hashlib  # libcrypto loads when the lock is first used

    return hashlib.scrypt(
        passphrase.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=SCRYPT_LEN
    )


def new_salt() -> bytes:
    return os.urandom(16)


class Lock:
    """Whether the agent is locked, and the salted hash that unlocks it (never the passphrase)."""

    __slots__ = ("salt", "digest", "failures", "not_before", "engaged")

    def __init__(
        self,
        salt: bytes | None = None,
        digest: bytes | None = None,
        failures: int = 0,
        not_before: float = 0.0,
    ) -> None:
        self.salt = salt
        self.digest = digest
        self.failures = failures
        self.not_before = not_before
        """time.monotonic() before which no further unlock attempt is checked, whichever
        client makes it: the growing delay holds across parallel connections."""
        self.engaged = 0
        """How many times the agent was locked: what a user allowed before a lock (a
        confirmation) is not taken as allowed after it."""

    def __repr__(self) -> str:
        # Neither the salt nor the hash: they would help a guesser offline.
        return f"Lock(failures={self.failures!r}, not_before={self.not_before!r})"

    @property
    def locked(self) -> bool:
        return self.digest is not None

    def engage(self, salt: bytes, digest: bytes) -> None:
        if self.locked:
            raise Locked("the agent is already locked; run keyagent-ctl unlock first")
        self.salt, self.digest, self.failures = salt, digest, 0
        self.engaged += 1

    def try_release(self, candidate: bytes) -> bool:
        """Unlock if ``candidate`` is the stored hash (constant-time); count failures."""
        if self.digest is None:
            raise NotLocked()
        import hmac  # with hashlib, which derived the candidate

        if hmac.compare_digest(candidate, self.digest):
            self.salt = self.digest = None
            self.failures = 0
            return True
        self.failures += 1
        return False

    def failure_delay(self) -> float:
        """How long to hold back the reply to a failed unlock: doubling from 0.1 s, cap 10 s."""
        return min(10.0, 0.1 * 2.0 ** min(max(0, self.failures - 1), 10))
