"""An HTTP worker: a process of the agent's own that serves connections of the HTTP socket.

The agent accepts each connection on ``http.sock`` itself (it checks the peer's uid and
reads its program, as for ``agent.sock``), numbers it, and passes the descriptor to a worker
over the worker's control socket. The worker parses the tool's HTTP and forwards the request
(:mod:`keyagent.proxy`), and asks the agent for credentials when it needs them. So:

* the work of proxying (two HTTP parsers, TLS, streaming bodies) takes neither the agent's
  interpreter lock nor its event loop's CPU: a ``get`` on ``agent.sock`` is answered at once
  while downloads run, and the workers together may use more than one core;
* a worker holds only the credentials it was lent, never the agent's other keys, and a
  crash in one (a bug in parsing a tool's HTTP, say) leaves the agent and its keys alone;
* the agent decides every request for credentials with what it knows of the connection
  (see :class:`keyagent.proxy.Lender`), never with what a worker claims about the peer.

The control socket is a ``SOCK_SEQPACKET`` pair: one JSON object per message, plus the
descriptor of a new connection. The agent sends ``conn`` (a connection: its number and its
descriptor), ``answer`` (to an ``authorize``, ``session_refused`` or ``key_refused``) and,
as it stops, ``stop``; a worker sends those three questions, ``audit`` entries, ``closed``
(a connection ended) and ``stopped`` (after an entry for each request still under way at
``stop``).
Whether a grant lent earlier is still good is read from a generation number the agent
keeps in a shared memfd (:class:`keyagent.proxy_pool.ProxyPool` writes it before any reply
that follows a change), so a keep-alive connection's requests do not each cost a round
trip to the agent.

Started by :class:`keyagent.proxy_pool.ProxyPool` as ``python -I -S .../_http_worker.py FD``,
where descriptor FD is a memfd with the worker's settings (:func:`main`). It exits when the
agent closes the control socket (the agent stopped or died).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import struct
import sys
import threading
import time

from keyagent.errors import Internal, from_code
from keyagent.grant import Grant
from keyagent.hardening import harden
from keyagent.log import DEBUG, INFO, WARNING, get_logger, to_stderr, to_syslog

TYPE_CHECKING = False
if TYPE_CHECKING:
    import mmap
    from collections.abc import Iterator
    from typing import Any, Final

    from keyagent.proxy import Proxy

__all__ = [
    "BOARD_SLOT", "BOARD_SLOTS", "GENERATION", "MAX_MESSAGE", "AgentLink", "FlightBoard",
    "main", "read_board",
]  # fmt: skip

log = get_logger("keyagent.proxy")

MAX_MESSAGE: Final = 64 * 1024
"""Largest control message either side reads (a grant or a question is well under 2 KiB)."""
GENERATION: Final = struct.Struct("=Q")
"""The shared generation number: bumped by the agent whenever lent credentials go stale."""
BOARD_SLOT: Final = 4096
"""Bytes of a worker's flight board per request under way: a length, then the JSON of the
request's audit entry in UTF-8 (at most about 2.5 KiB, by the audit fields' own limits)."""
BOARD_SLOTS: Final = 1024
"""The most slots a flight board has (one per connection, up to this): a request beyond
them is still recorded when it ends, only not if the worker dies first."""
_LENGTH: Final = struct.Struct("=I")
WORKER_NICE: Final = 19
"""How much a worker lowers its CPU priority below the agent's: to the lowest there is.
Proxying is bulk work, and ``get`` on the agent socket is on every tool's path; measured
on 2 cores during 16 proxied downloads, get's p99 was 36x idle at the agent's priority,
4.7x at +10 and 1.1x at +19, with proxied throughput the same (docs/performance.md)."""
ASK_TIMEOUT: Final = 600.0
"""Longest wait for the agent's answer (credentials, which may wait for askpass): a
backstop, the agent's own deadlines end each wait long before."""


class FlightBoard:
    """The requests a worker has under way, each as the audit entry it would get if cut, in
    memory the agent can read (a memfd it made): if the worker dies (killed, or a crash)
    before it sends an entry, the agent finds it here and records it. One slot per request,
    written as the request leaves and emptied once its own entry is sent. Used under the
    :class:`keyagent.proxy.Proxy`'s audit lock."""

    def __init__(self, memory: mmap.mmap) -> None:
        self.memory = memory
        self._free = list(reversed(range(len(memory) // BOARD_SLOT)))
        self._warned = False

    def post(self, entry: dict[str, Any]) -> int | None:
        """Write ``entry``; its slot, or None if no slot is free (or it would not fit)."""
        data = json.dumps(entry, ensure_ascii=False).encode()
        if not self._free or len(data) > BOARD_SLOT - _LENGTH.size:
            if not self._warned:  # once: the cause lasts (many connections, say)
                self._warned = True
                log.warning(
                    "HTTP worker %d: a request is not on its flight board (%s): were this "
                    "worker to die, it would not be in the audit log",
                    os.getpid(), "full" if not self._free else "too long an entry",
                )  # fmt: skip
            return None
        return self._write(data)

    def replace(self, slot: int, entry: dict[str, Any]) -> int:
        """``entry`` in place of what ``slot`` holds; the slot that holds it now. Written to
        a free slot before ``slot`` is emptied: a worker killed in between leaves both, so
        the agent records the request twice rather than not at all. With no free slot (or
        too long an entry), ``slot`` stays as it was."""
        data = json.dumps(entry, ensure_ascii=False).encode()
        if not self._free or len(data) > BOARD_SLOT - _LENGTH.size:
            return slot
        new = self._write(data)
        self.clear(slot)
        return new

    def _write(self, data: bytes) -> int:
        slot = self._free.pop()
        start = slot * BOARD_SLOT + _LENGTH.size
        self.memory[start : start + len(data)] = data
        _LENGTH.pack_into(self.memory, slot * BOARD_SLOT, len(data))
        return slot

    def clear(self, slot: int) -> None:
        _LENGTH.pack_into(self.memory, slot * BOARD_SLOT, 0)
        self._free.append(slot)


def read_board(memory: mmap.mmap) -> Iterator[object]:
    """What a flight board holds (the agent's side): each entry as JSON decodes it, None for
    a slot that does not decode. A worker wrote it: check each before using it."""
    for offset in range(0, len(memory) - BOARD_SLOT + 1, BOARD_SLOT):
        (length,) = _LENGTH.unpack_from(memory, offset)
        if length == 0:
            continue
        if length > BOARD_SLOT - _LENGTH.size:
            yield None
            continue
        try:
            yield json.loads(memory[offset + _LENGTH.size : offset + _LENGTH.size + length])
        except (ValueError, RecursionError):
            yield None


class _Waiter:
    __slots__ = ("answer", "done")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.answer: dict[str, Any] | None = None


class AgentLink:
    """The worker's side of the control socket: a :class:`keyagent.proxy.Lender`."""

    def __init__(self, control: socket.socket, generation: mmap.mmap) -> None:
        self.control = control
        self.generation = generation
        self._ids = itertools.count(1)
        self._waiting: dict[int, _Waiter] = {}
        self._guard = threading.Lock()

    # --- Lender ----------------------------------------------------------------------

    def authorize(self, conn: int, host: str, user: str | None, key_id: str | None) -> Grant:
        grant = self._ask("authorize", conn, host, user, key_id)
        if grant is None:
            raise Internal()
        return grant

    def session_refused(
        self, conn: int, host: str, user: str, key_id: str | None, *, retry: bool = True
    ) -> Grant | None:
        return self._ask("session_refused", conn, host, user, key_id, retry=retry)

    def key_refused(
        self, conn: int, host: str, user: str, refused: list[str], *, retry: bool = True
    ) -> Grant | None:
        return self._ask("key_refused", conn, host, user, None, refused=refused, retry=retry)

    def still_good(self, grant: Grant) -> bool:
        if grant.token != GENERATION.unpack_from(self.generation)[0]:
            return False
        return grant.deadline is None or time.monotonic() < grant.deadline

    def audit(self, conn: int, outcome: str, **fields: str | int | None) -> None:
        self._send({"t": "audit", "conn": conn, "outcome": outcome, **fields})

    # --- the control socket ----------------------------------------------------------

    def _ask(
        self,
        kind: str,
        conn: int,
        host: str,
        user: str | None,
        key_id: str | None,
        *,
        refused: list[str] | None = None,
        retry: bool = True,
    ) -> Grant | None:
        waiter = _Waiter()
        with self._guard:
            ask = next(self._ids)
            self._waiting[ask] = waiter
        question = {
            "t": kind, "ask": ask, "conn": conn, "host": host, "user": user, "key_id": key_id
        }  # fmt: skip
        if refused is not None:
            question["refused"] = refused
        if not retry:
            question["retry"] = False
        try:
            self._send(question)
            if not waiter.done.wait(ASK_TIMEOUT) or waiter.answer is None:
                raise from_code("timeout", "the agent did not answer in time; try again")
        finally:
            with self._guard:
                self._waiting.pop(ask, None)
        answer = waiter.answer
        error = answer.get("error")
        if error is not None:
            refusal = from_code(str(error[0]), str(error[1]))
            subject = answer.get("subject")
            if subject is not None:
                key_id, host, user = subject  # the agent's own words: a session has no key id
                refusal.subject = (None if key_id is None else str(key_id), str(host), str(user))
            raise refusal
        return None if answer.get("grant") is None else Grant.from_wire(answer["grant"])

    def _send(self, message: dict[str, Any]) -> None:
        # One datagram per message: threads may send at once without interleaving.
        self.control.send(json.dumps(message).encode())

    def ready(self) -> None:
        """Tell the agent this worker is started and may be given connections."""
        self._send({"t": "ready"})

    def run(self, proxy: Proxy) -> None:
        """Serve what the agent sends until it closes the control socket."""
        while True:
            data, fds, _, _ = socket.recv_fds(self.control, MAX_MESSAGE, 1)
            if not data:
                for fd in fds:
                    os.close(fd)
                return
            message = json.loads(data)
            if message["t"] == "conn":
                (fd,) = fds
                sock = socket.socket(fileno=fd)
                threading.Thread(
                    target=self._serve, args=(proxy, sock, message["conn"]), daemon=True,
                    name="keyagent-http",
                ).start()  # fmt: skip
            elif message["t"] == "stop":  # the agent is stopping: it reads until "stopped"
                proxy.cut_all()
                self._send({"t": "stopped"})
            elif message["t"] == "answer":
                with self._guard:
                    waiter = self._waiting.get(message["ask"])
                if waiter is not None:
                    waiter.answer = message
                    waiter.done.set()

    def _serve(self, proxy: Proxy, sock: socket.socket, conn: int) -> None:
        try:
            sock.setblocking(True)
            proxy.serve(sock, conn)
        finally:
            sock.close()
            # If the agent is gone, this process is about to end too.
            with contextlib.suppress(OSError):
                self._send({"t": "closed", "conn": conn})


def main(argv: list[str]) -> int:
    """``_http_worker.py FD``: read the settings from memfd FD, then serve."""
    with os.fdopen(int(argv[0]), "rb") as source:
        hello = json.loads(source.read())
    sys.path[:] = hello["sys_path"]
    if hello["foreground"]:
        to_stderr(DEBUG if hello["debug"] else INFO)
    else:
        to_syslog(WARNING)
    harden(hello["max_connections"], b"keyagent-http")
    # The agent's signals are for the agent (a terminal's Ctrl-C reaches its whole process
    # group, systemd's stop its whole cgroup): a worker ends when the agent closes its
    # control socket, after the agent's own stop, so calls under way may finish.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    try:
        # Proxying is bulk work: the agent's own answers (get, on the same cores) go first.
        os.nice(WORKER_NICE)
    except OSError:  # a sandbox that filters setpriority (the systemd unit): no matter
        log.debug("HTTP worker %d keeps its priority", os.getpid())

    import mmap

    import keyagent.forward  # noqa: F401  # loaded now: a broken install fails before ready
    from keyagent.proxy import Proxy
    from keyagent.tls import HttpSettings

    control = socket.socket(fileno=hello["control_fd"])
    os.set_inheritable(control.fileno(), False)
    generation = mmap.mmap(hello["generation_fd"], GENERATION.size, prot=mmap.PROT_READ)
    os.close(hello["generation_fd"])
    board = mmap.mmap(hello["board_fd"], hello["board_slots"] * BOARD_SLOT)
    os.close(hello["board_fd"])
    link = AgentLink(control, generation)
    proxy = Proxy(
        link,
        HttpSettings(**hello["http"]),
        head_timeout=hello["head_timeout"],
        idle_timeout=hello["idle_timeout"],
        board=FlightBoard(board),
    )
    log.debug("HTTP worker %d serving", os.getpid())
    try:
        link.ready()
        link.run(proxy)
    except (OSError, ValueError, KeyError, TypeError) as error:
        # A bug, or the agent died mid-message: either way this worker has nobody to serve.
        log.warning(
            "HTTP worker %d: the agent's control socket failed (%s)",
            os.getpid(), type(error).__name__,
        )  # fmt: skip
    # Threads still serving die with the process, as they would with the agent.
    sys.stderr.flush()
    os._exit(0)
