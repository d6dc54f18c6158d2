"""Whether a file the agent trusts (the configuration file, a CA bundle) is safe to read.

Whoever can change such a file decides which hosts the agent talks to and which CAs it
believes, and so gets to read the password at the next ``login``. A file is trusted only
if no other user can change it, or change what its path leads to:

* every entry on the way to it — each directory from ``/`` down, each symbolic link met
  (and everything on the way to the link's target), and the file itself — belongs to the
  user running keyagent or to root;
* neither the file nor any of those directories is writable by its group or by others,
  with one exception: a directory with the sticky bit (``/tmp``, mode ``1777``, owned by
  root). In a sticky directory others may add entries, but only an entry's owner (or the
  directory's, who is the user or root here) may rename, replace or delete it; since the
  next entry on the path is itself required to belong to the user or root, nobody else
  can swap it.

The path is resolved component by component, as the kernel does, so every directory and
link that takes part in finding the file is checked, not only those of its final
location. Symbolic links themselves carry no permissions worth checking (their mode is
always ``0777`` and their target cannot be changed in place), only their owner.

The checks run on the path and the file is then opened and compared with what was checked
(device and inode), so what is read is what was checked.
"""

from __future__ import annotations

import os
import stat
from typing import Final

from keyagent.errors import BadConfig

__all__ = ["UntrustedFile", "check_trusted", "read_ca_bundle", "read_trusted"]

_MAX_LINKS: Final = 40  # as the kernel's MAXSYMLINKS: a loop is reported, not followed forever


class UntrustedFile(BadConfig):
    """A trusted file is missing, unreadable, or could be changed by another user."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


def _owner(uid: int) -> str:
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def _writers(mode: int) -> tuple[str, str] | None:
    """Who besides the owner may write (as words), and the chmod that stops them."""
    group, other = bool(mode & stat.S_IWGRP), bool(mode & stat.S_IWOTH)
    if group and other:
        return "its group and every user", "go-w"
    if other:
        return "every user", "o-w"
    if group:
        return "its group", "g-w"
    return None


def _check_entry(
    path: str, entry: str, info: os.stat_result, *, harm: str, uid: int, is_target: bool
) -> None:
    """Refuse ``entry`` (met on the way to ``path``) if another user could change it."""
    if stat.S_ISLNK(info.st_mode):
        what = f"the symbolic link {entry} on its path"
    elif is_target:
        what = ""
    else:
        what = f"the directory {entry} on its path"
    if info.st_uid not in (uid, 0):
        if is_target:
            raise UntrustedFile(
                f"{path}: belongs to another user ({_owner(info.st_uid)}), who could {harm};"
                " use a file of your own",
                path=path,
            )
        raise UntrustedFile(
            f"{path}: {what} belongs to another user ({_owner(info.st_uid)}), who could"
            f" replace the file and {harm}; move the file to a directory of your own",
            path=path,
        )
    if stat.S_ISLNK(info.st_mode):
        return
    writers = _writers(info.st_mode)
    if writers is None:
        return
    whom, fix = writers
    if is_target:
        raise UntrustedFile(
            f"{path}: is writable by {whom}, who could {harm}; run chmod {fix} {path}",
            path=path,
        )
    if stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX:
        return  # sticky: others may add entries but not replace ours (see the module doc)
    raise UntrustedFile(
        f"{path}: {what} is writable by {whom}, who could replace the file and {harm};"
        f" run chmod {fix} {entry}, or move the file to a directory of your own",
        path=path,
    )


def check_trusted(path: str, *, harm: str = "change what the agent trusts") -> os.stat_result:
    """Check ``path`` and everything on the way to it (see the module doc); return the
    ``stat`` of the file it leads to. ``harm`` says, in the message, what another user
    could do with the file (e.g. "point ca_bundle at their own CA").

    Raises :class:`UntrustedFile` whose message names the file, the entry at fault and the
    command that fixes it; or, when the path cannot be followed, the OS's reason.
    """
    uid = os.geteuid()
    absolute = os.path.abspath(path)
    pending = [part for part in absolute.split("/") if part]
    pending.reverse()  # a stack: the next component is at the end
    current = "/"
    links = 0
    try:
        _check_entry(path, current, os.lstat(current), harm=harm, uid=uid, is_target=False)
        while pending:
            name = pending.pop()
            if name == ".":
                continue
            if name == "..":
                current = os.path.dirname(current)  # current is already a resolved directory
                continue
            candidate = os.path.join(current, name)
            info = os.lstat(candidate)
            if stat.S_ISLNK(info.st_mode):
                _check_entry(path, candidate, info, harm=harm, uid=uid, is_target=False)
                links += 1
                if links > _MAX_LINKS:
                    raise UntrustedFile(
                        f"{path}: too many symbolic links on its path (a loop?); name the file"
                        " itself",
                        path=path,
                    )
                target = os.readlink(candidate)
                if target.startswith("/"):
                    current = "/"
                pending.extend(reversed([part for part in target.split("/") if part]))
                continue
            last = not pending
            if not last and not stat.S_ISDIR(info.st_mode):
                raise NotADirectoryError(20, os.strerror(20))
            _check_entry(path, candidate, info, harm=harm, uid=uid, is_target=last)
            current = candidate
    except OSError as error:
        raise UntrustedFile(
            f"{path}: cannot be read ({os.strerror(error.errno or 0)}); fix the path",
            path=path,
        ) from None
    return os.stat(current)


def read_trusted(
    path: str, *, harm: str = "change what the agent trusts", limit: int = 16 * 1024 * 1024
) -> bytes:
    """The contents of ``path``, read once, after :func:`check_trusted` passed; at most
    ``limit`` bytes (a longer file is refused)."""
    checked = check_trusted(path, harm=harm)
    if not stat.S_ISREG(checked.st_mode):
        raise UntrustedFile(f"{path}: is not a regular file; name a file", path=path)
    try:
        # O_NONBLOCK: a FIFO swapped in would not hang; it is refused by the comparison below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise UntrustedFile(
            f"{path}: cannot be read ({os.strerror(error.errno or 0)}); fix the path",
            path=path,
        ) from None
    try:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (checked.st_dev, checked.st_ino):
            raise UntrustedFile(f"{path}: changed while it was checked; try again", path=path)
        if opened.st_size > limit:
            raise UntrustedFile(
                f"{path}: is larger than {limit // (1024 * 1024)} MiB; name the right file",
                path=path,
            )
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 1024 * 1024):
            size += len(chunk)
            if size > limit:
                raise UntrustedFile(
                    f"{path}: is larger than {limit // (1024 * 1024)} MiB; name the right file",
                    path=path,
                )
            chunks.append(chunk)
    except OSError as error:
        raise UntrustedFile(
            f"{path}: cannot be read ({os.strerror(error.errno or 0)}); fix the path",
            path=path,
        ) from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def read_ca_bundle(path: str) -> str:
    """The PEM text of the CA bundle at ``path``: checked like any trusted file (a bundle
    someone else can write would make their CA trusted), read once, and refused unless it
    holds at least one certificate that OpenSSL accepts.

    The caller keeps the text (or an ``ssl.SSLContext`` made from it) and never opens the
    path again: a file replaced later must not change whom the agent trusts.
    """
    data = read_trusted(path, harm="make the agent trust their own CA")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise UntrustedFile(
            f"{path}: holds no PEM certificate (-----BEGIN CERTIFICATE-----); name a PEM CA bundle",
            path=path,
        )
    import ssl  # only where a bundle is loaded

    try:
        ssl.create_default_context(cadata=text)
    except (ssl.SSLError, ValueError):
        failed = True
    else:
        failed = False
    if failed:  # raised outside the except block: the OpenSSL detail says nothing useful
        raise UntrustedFile(
            f"{path}: is not a valid PEM CA bundle (OpenSSL refused it); name a PEM CA bundle",
            path=path,
        )
    return text
