"""The leftovers file: ephemeral keys a SIGKILLed agent could not delete on the service.

An ephemeral key that is not persisted lives only in the agent's memory; an agent killed
with SIGKILL (or by a crash, or the OOM killer) cannot delete it on the service at expiry.
So the agent keeps, in a small file, what it needs to find the key again at its next start
without ever holding its secret there: for each ephemeral key it holds or is still deleting
and that the OS keyring does not hold, the key's fingerprint (the full hex SHA-256 of the
secret, which keyagent uses as the key's id), account (host, user) and expiry::

    {"v":1,"keys":[{"fingerprint":"<64 hex>","host":"app.conduce.com",
                    "user":"ada@example.com","expires":1714567890.0}]}

The next agent on the same socket reads it at start (see :func:`keyagent.paths.leftovers_path`:
one file per socket), finds each key that it does not hold again in the account's
``apikeys/list`` by its fingerprint, and deletes it (:meth:`keyagent.agent.Agent.adopt_leftovers`).

Writing is atomic: a temporary file in the same directory, created 0600 with ``O_EXCL`` and
``O_NOFOLLOW``, written and fsynced, renamed over the file, then the directory fsynced; a
crash at any point leaves either the old file or the new one, and at most a stale temporary
file, which the reader ignores and removes. With nothing to record the file is removed.
The directory (the platformdirs state directory, ``~/.local/state/keyagent``) is made 0700
and must be the user's alone, as the socket's directory must (:mod:`keyagent.sockets`): the
writer and the reader apply the same rule, to the directory opened once without following a
symlink, and do everything else through that descriptor (see
:meth:`LeftoversFile._opened_directory` for why the directories above it are not checked).

Reading is reading untrusted input: a file that is not a regular file of the user's own with
mode 0600 or stricter, a symlink, bad JSON or wrong types give a warning that names the file
and what to do, never an error; entries that do not parse are skipped. Every function here
blocks (fsync), so the agent calls :meth:`LeftoversFile.write` on a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections import namedtuple

from keyagent.log import get_logger
from keyagent.protocol import KEY_ID_DIGITS, KEY_ID_MAX, KEY_ID_SHOWN
from keyagent.rules import host_problem, is_finite_number, shared_directory, user_problem

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from typing import Any, Final

__all__ = ["FORMAT", "Leftover", "LeftoversFile"]

log = get_logger("keyagent.leftovers")

FORMAT: Final = 1
MAX_BYTES: Final = 4 * 1024 * 1024
"""A file larger than this is not read (some 20 000 keys; an agent holds far fewer)."""
TEMP_SUFFIX: Final = ".tmp"
IGNORED_SUFFIX: Final = ".ignored"
"""Added to the name of a file that was ignored (untrusted or unreadable), which is kept
for the user to check rather than replaced."""
_DIRECTORY_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Leftover(namedtuple("Leftover", ["fingerprint", "host", "user", "expires"])):
    """One ephemeral key as the leftovers file names it: never its secret.

    ``fingerprint``: the full hex SHA-256 of the secret. ``expires``: POSIX wall time at which
    the key expires (None if unknown)."""

    __slots__ = ()

    fingerprint: str
    host: str
    user: str
    expires: float | None

    def __repr__(self) -> str:
        return (
            f"Leftover(key_id={self.fingerprint[:KEY_ID_SHOWN]!r}, host={self.host!r}, "
            f"user={self.user!r}, expires={self.expires!r})"
        )


def _is_fingerprint(value: object) -> bool:
    return isinstance(value, str) and len(value) == KEY_ID_MAX and not value.strip(KEY_ID_DIGITS)


def _is_expiry(value: object) -> bool:
    if value is None:
        return True
    return is_finite_number(value)


class LeftoversFile:
    """The leftovers file at ``path`` (see the module docstring)."""

    __slots__ = ("path", "directory", "name")

    def __init__(self, path: str) -> None:
        self.path = path
        self.directory, self.name = os.path.split(path)

    def __repr__(self) -> str:
        return f"LeftoversFile({self.path!r})"

    # --- the directory ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _opened_directory(self, *, create: bool) -> Iterator[int | None]:
        """The directory, opened and checked (:func:`_directory_problem`); None if it does not
        exist and ``create`` is false. Raises :class:`_Unusable` for a directory that is not
        the user's alone, or a symlink.

        Every later operation on the file, its temporaries and the directory itself goes
        through the descriptor (``dir_fd=``), never through the path again, so it acts on the
        directory that was checked even if the path is changed in between.

        Only this directory is checked, not those above it. Someone who can write to a
        directory above it (a non-sticky shared directory holding ``$XDG_STATE_HOME``, a
        symlink of theirs on the way) can change which directory the path leads to, but not
        what passes the check: the last component is opened with ``O_NOFOLLOW`` (a symlink
        is refused), and what was opened must be owned by the user, with no access for group
        or others. Nobody else can make a directory that belongs to the user; so whatever
        they swap in is one of the user's own private directories, in which nobody else can
        add, replace or remove a file (root aside, who needs no swap). The agent then reads
        at most a file of the user's own (an older leftovers file: the keys it names are
        looked up by fingerprint in the account's own key list, so at worst a key an agent
        of the user recorded for deletion is deleted), or none (its keys wait for
        ``keyagent-ctl prune``), and writes a 0600 file they cannot read, which never holds
        a secret. What such a user can always do, moving the directory away, only
        makes the agent warn and retry, and no check here could prevent it. So directories
        above are not refused: refusing them would protect nothing more.
        """
        if create:
            parent = os.path.dirname(self.directory)
            if parent and not os.path.isdir(parent):
                os.makedirs(parent, 0o700, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.directory, 0o700)
        directory: int | None
        try:
            directory = os.open(self.directory, _DIRECTORY_FLAGS)
        except FileNotFoundError:
            if create:
                raise
            directory = None
        except OSError as error:
            # O_NOFOLLOW|O_DIRECTORY on a symlink fails with ENOTDIR (Linux) or ELOOP.
            if error.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            try:
                info = os.lstat(self.directory)
            except OSError:
                raise error from None
            problem = _directory_problem(self.directory, info)
            if problem is None:
                raise
            raise _Unusable(problem) from None
        if directory is None:
            yield None
            return
        try:
            problem = _directory_problem(self.directory, os.fstat(directory))
            if problem is not None:
                raise _Unusable(problem)
            yield directory
        finally:
            os.close(directory)

    # --- writing -------------------------------------------------------------------------

    def write(self, entries: Iterable[Leftover]) -> bool:
        """Replace the file with ``entries`` (remove it if there are none), atomically.
        Never raises: a failure is logged, naming the path and the fix; returns success."""
        keys = [
            {"fingerprint": e.fingerprint, "host": e.host, "user": e.user, "expires": e.expires}
            for e in entries
        ]
        try:
            with self._opened_directory(create=bool(keys)) as directory:
                if directory is None:
                    return True  # no directory: no file to remove
                if keys:
                    data = json.dumps({"v": FORMAT, "keys": keys}, separators=(",", ":"))
                    self._replace(directory, data.encode())
                else:
                    try:
                        os.unlink(self.name, dir_fd=directory)
                    except FileNotFoundError:
                        pass
                    else:
                        os.fsync(directory)
        except _Unusable as unusable:
            log.warning("cannot record ephemeral keys in %s: %s", self.path, unusable)
            return False
        except OSError as error:
            log.warning(
                "cannot record ephemeral keys in %s (%s); if the agent is killed, delete its "
                "ephemeral keys on the service yourself (keyagent-ctl list --remote)",
                self.path, os.strerror(error.errno or 0) if error.errno else error,
            )  # fmt: skip
            return False
        return True

    def _replace(self, directory: int, data: bytes) -> None:
        temporary = f".{self.name}.{os.getpid()}.{os.urandom(4).hex()}{TEMP_SUFFIX}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temporary, flags, 0o600, dir_fd=directory)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, self.name, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=directory)
            raise
        os.fsync(directory)

    # --- reading -------------------------------------------------------------------------

    def read(self) -> list[Leftover]:
        """The entries of the file (none if there is no file); stale temporary files of an
        interrupted write are removed. Never raises: a file that cannot be trusted or read
        is reported in the log and read as empty."""
        try:
            with self._opened_directory(create=False) as directory:
                if directory is None:
                    return []
                self._remove_stale_temporaries(directory)
                try:
                    document = self._load(directory)
                except _Unusable as unusable:
                    # Moved aside, not left for this agent's first write to replace: what
                    # it names is the user's to check.
                    self._warn(str(unusable), self._set_aside(directory))
                    return []
        except OSError as error:
            self._warn(f"it cannot be read ({os.strerror(error.errno or 0)})")
            return []
        except _Unusable as unusable:
            self._warn(str(unusable))
            return []
        if document is None:
            return []
        return self._entries(document)

    def _set_aside(self, directory: int) -> str | None:
        """Rename an ignored file to ``NAME.ignored`` (``NAME.ignored.2`` and so on if that
        is taken: an earlier one may not have been looked at yet); its new path, or None
        if it could not be renamed. A hard link, then an unlink: unlike a rename, a link
        never replaces what is there."""
        for number in range(1, 100):
            aside = f"{self.name}{IGNORED_SUFFIX}" + (f".{number}" if number > 1 else "")
            try:
                os.link(
                    self.name, aside, src_dir_fd=directory, dst_dir_fd=directory,
                    follow_symlinks=False,
                )  # fmt: skip
            except FileExistsError:
                continue
            except OSError:
                return None
            with contextlib.suppress(OSError):
                os.unlink(self.name, dir_fd=directory)
            return os.path.join(self.directory, aside)
        return None

    def _warn(self, problem: str, aside: str | None = None) -> None:
        where = f"; it is now {aside}" if aside else ""
        log.warning(
            "ignoring the leftovers file %s: %s%s. Ephemeral keys of an earlier agent it may "
            "name are not deleted on the service: check with keyagent-ctl list --remote and "
            "remove them (or prune), then delete %s",
            self.path, problem, where, aside or "the file",
        )  # fmt: skip

    def _load(self, directory: int) -> Any:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.name, flags, dir_fd=directory)
        except FileNotFoundError:
            return None
        except OSError as error:
            try:
                info = os.stat(self.name, dir_fd=directory, follow_symlinks=False)
            except OSError:
                raise error from None
            if stat.S_ISLNK(info.st_mode):
                raise _Unusable("it is a symbolic link") from None
            raise
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise _Unusable("it is not a regular file")
            if info.st_uid != os.geteuid():
                raise _Unusable(f"it is owned by uid {info.st_uid}, not by you")
            if info.st_mode & 0o077:
                raise _Unusable(
                    f"it is readable or writable by others (mode {stat.S_IMODE(info.st_mode):04o})"
                )
            if info.st_size > MAX_BYTES:
                raise _Unusable(f"it is larger than {MAX_BYTES} bytes")
            chunks, size = [], 0
            while chunk := os.read(fd, 65536):  # it may grow after fstat: read, and count
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_BYTES:
                    raise _Unusable(f"it is larger than {MAX_BYTES} bytes")
        finally:
            os.close(fd)
        try:
            document = json.loads(b"".join(chunks))
        except (ValueError, RecursionError):
            raise _Unusable("it is not valid JSON") from None
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise _Unusable('it is not a JSON object with a "keys" list')
        version = document.get("v")
        if version != FORMAT or isinstance(version, bool):
            raise _Unusable(f"its format {version!r} is not {FORMAT} (another keyagent version)")
        return document

    def _entries(self, document: dict[str, Any]) -> list[Leftover]:
        found: dict[str, Leftover] = {}
        skipped = 0
        for entry in document["keys"]:
            if (
                not isinstance(entry, dict)
                or not _is_fingerprint(entry.get("fingerprint"))
                or not isinstance(entry.get("host"), str)
                or host_problem(entry["host"]) is not None
                or not isinstance(entry.get("user"), str)
                or user_problem(entry["user"]) is not None
                or not _is_expiry(entry.get("expires"))
            ):
                skipped += 1
                continue
            expires = entry.get("expires")
            found.setdefault(
                entry["fingerprint"],
                Leftover(
                    entry["fingerprint"],
                    entry["host"],
                    entry["user"],
                    None if expires is None else float(expires),
                ),
            )
        if skipped:
            log.warning("skipped %d unreadable entries of %s", skipped, self.path)
        return list(found.values())

    def _remove_stale_temporaries(self, directory: int) -> None:
        """Temporary files a write interrupted by a crash left behind: this file's alone (the
        agent on this socket is the only writer), regular and the user's."""
        prefix = f".{self.name}."
        for name in os.listdir(directory):
            if not (name.startswith(prefix) and name.endswith(TEMP_SUFFIX)):
                continue
            try:
                info = os.stat(name, dir_fd=directory, follow_symlinks=False)
                if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid():
                    os.unlink(name, dir_fd=directory)
                    log.info(
                        "removed %s, left by an interrupted write",
                        os.path.join(self.directory, name),
                    )
            except OSError:
                continue


def _directory_problem(directory: str, info: os.stat_result) -> str | None:
    """What is wrong with ``directory`` (``info`` from ``fstat`` of it, opened without
    following a symlink, or ``lstat``) as the leftovers file's directory, if anything: it
    must be a directory, owned by the user, with no access at all for group or others (as
    the socket's directory). The one rule, for the writer and the reader alike, so that the
    agent never writes a file its successor refuses to read, nor reads one from a directory
    it would not have written to."""
    if stat.S_ISLNK(info.st_mode):
        return (
            f"the directory {directory} is a symbolic link; remove it (the agent makes the "
            "directory itself), or set XDG_STATE_HOME to a directory of your own"
        )
    if not stat.S_ISDIR(info.st_mode):
        return f"{directory} is not a directory; remove it"
    if shared_directory(info):  # /tmp, say: never to be removed or closed
        return (
            f"{directory} is a shared directory (mode {stat.S_IMODE(info.st_mode):04o}); set"
            " XDG_STATE_HOME to a directory of your own"
        )
    if info.st_uid != os.geteuid():
        return (
            f"the directory {directory} is owned by uid {info.st_uid}, not by you (uid "
            f"{os.geteuid()}); remove it"
        )
    if info.st_mode & 0o077:
        return (
            f"the directory {directory} is accessible to group or others (mode "
            f"{stat.S_IMODE(info.st_mode):04o}); run chmod 700 {directory}"
        )
    return None


class _Unusable(Exception):
    """The leftovers file cannot be trusted or parsed; the message says why."""
