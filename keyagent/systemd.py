"""systemd integration with the standard library only: socket activation and readiness.

* :func:`listen_fds` — the listening sockets a socket unit passed in (``sd_listen_fds``):
  ``LISTEN_PID`` must name this process, ``LISTEN_FDS`` counts descriptors from 3 on, and
  ``LISTEN_FDNAMES`` optionally names them. Each must be a listening ``AF_UNIX``
  ``SOCK_STREAM`` socket: anything else is :class:`ListenFdsError`, never a silent fallback
  to binding a socket of our own.
* :class:`Notifier` — ``sd_notify``: ``READY=1`` and ``STOPPING=1`` datagrams, each with
  an optional one-line ``STATUS=...``, to ``$NOTIFY_SOCKET``. Without that variable every call does
  nothing, and a failed send is logged at debug level, never raised: readiness reporting
  must not take the agent down.

Both remove their variables from the environment by default, so that a process the agent
starts is not mistaken for the agent by systemd.

The units in ``contrib/systemd/`` use both: ``keyagent.socket`` owns
``%t/keyagent/agent.sock`` and ``keyagent.service`` (``Type=notify``) runs ``keyagent -D``.
"""

from __future__ import annotations

import fcntl
import os
import socket

from keyagent.log import get_logger

log = get_logger("keyagent.systemd")

SD_LISTEN_FDS_START = 3
"""The first descriptor passed by socket activation."""

LISTEN_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
NOTIFY_ENV = "NOTIFY_SOCKET"

_SEND_TIMEOUT = 2.0
"""Seconds a notification may block on a full receive queue before it is given up."""


class ListenFdsError(Exception):
    """The socket-activation variables are malformed, or name a socket we cannot serve."""


def _parse_count(name: str, text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ListenFdsError(f"{name}={text!r} is not a whole number")
    return int(text)


def _kind(sock: socket.socket, listening: bool) -> str:
    family = getattr(sock.family, "name", str(sock.family))
    kind = getattr(sock.type, "name", str(sock.type))
    return f"{family} {kind}{'' if listening else ', not listening'}"


def _adopt(fd: int, name: str) -> socket.socket:
    """Mark ``fd`` close-on-exec and wrap it, if it is a listening Unix stream socket."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    except OSError as error:
        raise ListenFdsError(
            f"descriptor {fd} ({name}) passed by systemd is not open: "
            f"{os.strerror(error.errno or 0)}"
        ) from None
    try:
        sock = socket.socket(fileno=fd)
    except OSError as error:
        raise ListenFdsError(
            f"descriptor {fd} ({name}) passed by systemd is not a socket: "
            f"{os.strerror(error.errno or 0)}"
        ) from None
    try:
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 0
        except OSError as error:
            raise ListenFdsError(
                f"descriptor {fd} ({name}) passed by systemd cannot be inspected: "
                f"{os.strerror(error.errno or 0)}"
            ) from None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
            raise ListenFdsError(
                f"descriptor {fd} ({name}) passed by systemd is {_kind(sock, listening)};"
                " keyagent serves only a listening AF_UNIX SOCK_STREAM socket"
                " (ListenStream=PATH, Accept=no)"
            )
    except BaseException:
        sock.detach()  # not ours to close
        raise
    return sock


def listen_fds_with_names(unset_environment: bool = True) -> list[tuple[str, socket.socket]]:
    """Like :func:`listen_fds`, with each socket's name from ``LISTEN_FDNAMES``.

    A socket without a name is called ``"unknown"``, as ``sd_listen_fds_with_names`` does.
    """
    environ = os.environ
    try:
        pid_text = environ.get("LISTEN_PID")
        if pid_text is None:
            return []
        pid = _parse_count("LISTEN_PID", pid_text)
        if pid != os.getpid():
            return []  # meant for another process (our parent, or a process that exec'd us)
        count = _parse_count("LISTEN_FDS", environ.get("LISTEN_FDS", "0"))
        if count == 0:
            return []
        names_text = environ.get("LISTEN_FDNAMES")
        if names_text is None:
            names = ["unknown"] * count
        else:
            names = names_text.split(":")
            if len(names) != count:
                raise ListenFdsError(
                    f"LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS={count} descriptors"
                )
        adopted: list[tuple[str, socket.socket]] = []
        try:
            for offset, name in enumerate(names):
                adopted.append((name, _adopt(SD_LISTEN_FDS_START + offset, name)))
        except BaseException:
            for _, sock in adopted:
                sock.detach()
            raise
        return adopted
    finally:
        if unset_environment:
            for variable in LISTEN_ENV:
                environ.pop(variable, None)


def listen_fds(unset_environment: bool = True) -> list[socket.socket]:
    """The listening sockets passed by socket activation, in order; ``[]`` if none.

    Follows ``sd_listen_fds``: the variables count only when ``LISTEN_PID`` is this
    process; descriptors start at 3 and are made close-on-exec. With
    ``unset_environment`` (the default) ``LISTEN_PID``, ``LISTEN_FDS`` and
    ``LISTEN_FDNAMES`` are removed whatever the outcome.

    Raises :class:`ListenFdsError` if the variables are malformed or a descriptor is not a
    listening ``AF_UNIX`` ``SOCK_STREAM`` socket (the descriptors are then left open).
    """
    return [sock for _, sock in listen_fds_with_names(unset_environment)]


def _notify_address(value: str) -> str | None:
    """The ``AF_UNIX`` address for a ``$NOTIFY_SOCKET`` value; None if unsupported."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]  # abstract namespace
    return None


def _one_line(text: str) -> str:
    """Keep a value on one line: a newline would start another assignment."""
    return " ".join(text.splitlines())


class Notifier:
    """Send ``sd_notify`` state changes to the service manager; a no-op without one.

    ``Notifier()`` reads (and by default unsets) ``$NOTIFY_SOCKET``; pass ``address`` to
    name the socket directly (a path, or ``@name`` for the abstract namespace).
    """

    def __init__(self, address: str | None = None, *, unset_environment: bool = True) -> None:
        if address is None:
            address = os.environ.get(NOTIFY_ENV)
            if unset_environment:
                os.environ.pop(NOTIFY_ENV, None)
        self.address = address or None
        self._target = _notify_address(address) if address else None
        if address and self._target is None:
            log.debug("ignoring unsupported %s=%r", NOTIFY_ENV, address)
        self._sock: socket.socket | None = None

    def __repr__(self) -> str:
        return f"Notifier({self.address!r})"

    def notify(self, *assignments: str) -> bool:
        """Send ``VAR=value`` lines in one datagram; True if it was sent."""
        if self._target is None or not assignments:
            return False
        message = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.settimeout(_SEND_TIMEOUT)
            self._sock.sendto(message, self._target)
        except OSError as error:
            log.debug("could not notify %s: %s", self.address, error)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: start-up is complete (``Type=notify`` services become active)."""
        return self.notify("READY=1", *self._status(status))

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: the service is shutting down."""
        return self.notify("STOPPING=1", *self._status(status))

    @staticmethod
    def _status(text: str | None) -> tuple[str, ...]:
        return () if text is None else (f"STATUS={_one_line(text)}",)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
