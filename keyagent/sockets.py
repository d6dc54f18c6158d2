"""The socket file: a private directory, a 0600 socket, and no stealing a live agent's path.

The daemon binds here before it forks and execs the serving process; the serving process
only needs :func:`remove_socket` at exit.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable

from keyagent import protocol
from keyagent.log import get_logger
from keyagent.rules import path_problem, shared_directory

log = get_logger("keyagent.sockets")

MAX_SOCKET_PATH = 107
"""The longest path Linux binds a Unix socket at, in bytes (``sun_path`` holds 108 with
the final NUL)."""


class SocketSetupError(Exception):
    """The socket cannot be set up safely; the message says why and what to do."""


class AgentRunning(SocketSetupError):
    """An agent already answers on the path (:func:`bind_listener`)."""


def check_private_dir(directory: str) -> None:
    """Create ``directory`` 0700 if missing; refuse one that is not ours alone."""
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except OSError as error:
        raise SocketSetupError(
            f"cannot create {directory}: {os.strerror(error.errno or 0)}; "
            "create it (mode 0700) or choose another path with -a"
        ) from None
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode):
        if stat.S_ISLNK(info.st_mode):  # its target may be swapped: name the real one
            raise SocketSetupError(
                f"{directory} is a symbolic link, and the socket's directory must be one"
                f" itself: use -a with the path it leads to, {os.path.realpath(directory)}"
            )
        raise SocketSetupError(f"{directory} is not a directory; remove it or use -a PATH")
    if shared_directory(info):  # /tmp, say: never to be removed or closed, whoever owns it
        raise SocketSetupError(
            f"{directory} is a shared directory (mode {stat.S_IMODE(info.st_mode):04o}); the"
            " socket needs a directory of your own: use -a PATH in a new directory (mkdir -m"
            " 700 DIR)"
        )
    if info.st_uid != os.geteuid():
        raise SocketSetupError(
            f"{directory} is owned by uid {info.st_uid}, not by you (uid {os.geteuid()}); "
            "another user may be intercepting the agent: remove it or use -a PATH"
        )
    if info.st_mode & 0o077:
        raise SocketSetupError(
            f"{directory} is accessible to group or others (mode {stat.S_IMODE(info.st_mode):04o});"
            f" run chmod 700 {directory} or use -a PATH in a private directory"
        )


MAX_LINKS = 40
"""Symbolic links followed on the way to a socket directory before giving up (Linux's own
limit for one path)."""


def check_ancestors(directory: str) -> None:
    """Refuse a socket directory that another user could move aside and replace.

    Whoever may write to a directory's parent may rename the directory and put one of their
    own in its place, socket and all: tools that do not check who answers (curl on the HTTP
    socket) would then talk to them. So each directory on the way to ``directory`` must be
    owned by root or by us, and closed to writes by group and others unless sticky (as /tmp
    is: there only an entry's owner may rename it). The path is walked one name at a time as
    the kernel resolves it: a symbolic link met must be root's or ours, and the path it
    holds is walked in turn, so every directory any link leads through is checked too.
    OpenSSH checks the path to a user's keys alike.
    """
    _check_ancestor("/", directory)
    _walk(os.path.dirname(os.path.abspath(directory)), "/", directory, [0])


def _walk(path: str, start: str, directory: str, links: list[int]) -> str:
    """Resolve ``path`` from the resolved directory ``start`` (checked), checking each name
    met (:func:`_check_ancestor`) and following links; the resolved path."""
    current = start
    for name in path.split("/"):
        if name in ("", "."):
            continue
        if name == "..":  # of a resolved directory: its real parent
            current = os.path.dirname(current)
            continue
        here = os.path.join(current, name)
        if not stat.S_ISLNK(_check_ancestor(here, directory).st_mode):
            current = here
            continue
        links[0] += 1
        if links[0] > MAX_LINKS:
            raise SocketSetupError(
                f"more than {MAX_LINKS} symbolic links lead to {directory}; use -a PATH"
                " with a plain path"
            )
        try:
            target = os.readlink(here)
        except OSError as error:  # changed since it was checked
            raise SocketSetupError(
                f"cannot read the link {here}: {os.strerror(error.errno or 0)}; use -a PATH"
                " with a plain path"
            ) from None
        current = _walk(target, "/" if target.startswith("/") else current, directory, links)
    return current


def _check_ancestor(ancestor: str, directory: str) -> os.stat_result:
    """``ancestor``'s lstat, if neither it nor (for a directory) what it holds can be
    changed by another user; a link is changed through its own directory, which the walk
    checked before it."""
    me = os.geteuid()
    try:
        info = os.lstat(ancestor)
    except OSError as error:
        raise SocketSetupError(
            f"cannot check {ancestor}: {os.strerror(error.errno or 0)}; use -a PATH in a"
            " directory of your own"
        ) from None
    if info.st_uid not in (0, me):
        problem = f"owned by uid {info.st_uid}"
    elif stat.S_ISLNK(info.st_mode) or info.st_mode & stat.S_ISVTX:
        return info  # sticky: only an entry's owner may rename it (see check_ancestors)
    elif info.st_mode & 0o022:
        problem = f"writable by group or others (mode {stat.S_IMODE(info.st_mode):04o})"
    else:
        return info
    raise SocketSetupError(
        f"{ancestor} is {problem}, so another user could replace {directory} and answer in"
        " the agent's place; use -a PATH under directories only you and root can change"
    )


def agent_answers(path: str, timeout: float = 2.0) -> bool:
    """True if an agent answers ``hello`` on ``path``; False if the socket is dead."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(timeout)
    try:
        probe.connect(path)
        probe.sendall(protocol.encode_request("hello", 0, {}))
        return probe.recv(4096).startswith(b"{")
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        # Connected but no answer (hung, or not ours): not safe to take the path over.
        return True
    finally:
        probe.close()


def accepts_connections(path: str) -> bool:
    """True if something listens on ``path`` (the HTTP socket's liveness test: it does not
    speak the JSON-lines protocol that :func:`agent_answers` tries)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True  # not safe to take the path over
    finally:
        probe.close()
    return True


def socket_path_problem(path: str) -> str | None:
    """Why ``path`` (or the directory a socket path is made in) cannot be used, shown
    escaped; None if it can. It goes into eval lines and onto terminals."""
    problem = path_problem(path.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
    if problem is None:
        return None
    return (
        f"the socket path {path!a} is not usable: {problem} (it comes from -a, else from"
        " XDG_RUNTIME_DIR, else from TMPDIR): use -a PATH with a plain path"
    )


def bind_listener(
    path: str, backlog: int = 1024, *, alive: Callable[[str], bool] | None = None
) -> socket.socket:
    """Bind a 0600 listening socket at ``path`` in a private directory.

    A live agent at ``path`` is an error; a dead socket left by a crashed agent is replaced.
    The umask is set before ``bind`` so the socket never exists with looser permissions.
    """
    problem = socket_path_problem(path)
    if problem is not None:
        raise SocketSetupError(problem)
    directory = os.path.dirname(os.path.abspath(path))
    check_private_dir(directory)
    check_ancestors(directory)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(info.st_mode):
            raise SocketSetupError(f"{path} exists and is not a socket; remove it or use -a")
        if (alive or agent_answers)(path):
            raise AgentRunning(
                f"an agent is already running on {path}; use it, or stop it with"
                ' eval "$(keyagent -k)"'
            )
        log.info("replacing stale socket %s", path)
        os.unlink(path)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:  # bind would say only "path too long"
        raise SocketSetupError(
            f"{path} is longer than a Unix socket path may be ({MAX_SOCKET_PATH} bytes); "
            "use a shorter one with -a"
        )
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(path)
    except OSError as error:
        listener.close()
        why = os.strerror(error.errno) if error.errno else str(error)
        raise SocketSetupError(f"cannot bind {path}: {why}") from None
    finally:
        os.umask(old_umask)
    listener.listen(backlog)
    return listener


FileIdentity = tuple[int, int, int]
"""A file's device, inode and change time in nanoseconds (:func:`file_identity`)."""


def remove_socket(path: str, bound: FileIdentity | None) -> None:
    """Remove the socket file at ``path`` if it is still the one we bound (``bound``, from
    :func:`file_identity`): a newer agent may have replaced a socket it found unanswered."""
    if bound is None or file_identity(path) != bound:
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        log.warning("could not remove the socket %s: %s", path, os.strerror(error.errno or 0))


def file_identity(path: str) -> FileIdentity | None:
    """(device, inode, change time) of ``path``, to tell at exit whether the socket file is
    still ours. The inode alone is not enough: a file system may give a new agent's socket
    the inode of ours, freed when it replaced it; a socket made later has a later change
    time (to the file system's clock, which may tick only every few milliseconds: the
    stopping agent removes its files before a successor can start, see keyagent.core)."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino, info.st_ctime_ns


def sees_peer_executables() -> bool:
    """Whether this process can read ``/proc/PID/exe`` of the programs that connect to it.

    Not from a user namespace of its own (systemd's ``PrivateUsers=``, which the shipped
    unit needs for its sandbox under an ordinary user's manager): the kernel lets a process
    read another's executable only from the same user namespace, so every peer's would be
    unknown. The initial namespace maps every uid (``0 0 4294967295``); a nested one maps a
    few.
    """
    try:
        with open("/proc/self/uid_map", encoding="ascii") as uid_map:
            lines = uid_map.read().split("\n")
    except OSError:
        return True  # no /proc to tell: peer_exe will find out per peer
    fields = lines[0].split() if lines else []
    return fields == ["0", "0", "4294967295"]


def peer_exe(pid: int) -> str | None:
    """The executable of process ``pid`` as ``/proc/PID/exe`` names it, or None if it cannot
    be read (the process has exited, or /proc is not mounted).

    Read when a connection is accepted, from the SO_PEERCRED pid: the pid could be reused
    only after the peer exited, and by then its connection is closed. A path ending in
    ``" (deleted)"`` means the file was replaced or removed after the program started; it is
    kept as it is, so it never equals an allowed program's path.

    The name is the one the peer sees, in its own mount namespace: a process of the user can
    bind-mount any program over an allowed path in a namespace of its own (``unshare -Urm``).
    So the name counts only if it names, here, the very file the process runs (the same
    device and inode); else the executable is unknown (None), as it is when the name was
    renamed over since the program started.
    """
    if pid <= 0:
        return None
    try:
        path = os.readlink(f"/proc/{pid}/exe")
        running = os.stat(f"/proc/{pid}/exe")  # the file itself, whatever its name
    except (OSError, ValueError):
        return None
    if path.endswith(" (deleted)"):
        return path
    try:
        named = os.stat(path)
    except (OSError, ValueError):
        return None
    if (named.st_dev, named.st_ino) != (running.st_dev, running.st_ino):
        return None
    return path
