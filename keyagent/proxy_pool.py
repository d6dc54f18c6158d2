"""The agent's side of its HTTP workers (:mod:`keyagent.proxy_worker`): start them, hand them
connections, answer their questions on the event loop.

Workers start on demand: the first connection of the HTTP socket starts one, and a new
connection starts another while every worker is busy and there are fewer than
``max_workers`` (the ``http_workers`` setting, by default
:data:`keyagent.rules.DEFAULT_HTTP_WORKERS`); each
connection goes to the worker with the fewest. An agent never used over HTTP starts none.
The first worker stays (its warm TLS connections are what makes a one-shot tool fast); any
other ends once it has had no connection for :data:`WORKER_IDLE` seconds, so a burst of
connections does not leave the agent large for the rest of the session. A worker that dies
(or stops reading its control socket, or sends what no worker sends) is let go: its
connections are closed with it, and the next connection starts a new one. Connections wait
in the agent until their worker says it is ready; one that fails to start makes the HTTP
socket answer ``busy`` for a while (:data:`START_BACKOFF`) rather than start an interpreter
per connection.

A worker is trusted with the credentials it is lent, nothing more: what it sends is checked
here, who is on the other end of a connection is what the agent recorded, and which keys (and
logins) the user already confirmed on a connection is the agent's record too.

Everything here runs on the agent's event loop, which owns the control sockets (non-blocking,
watched by :class:`keyagent.server.Server`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import signal
import socket
import sys
import time

from keyagent.agent import MAX_KEY_ATTEMPTS
from keyagent.effects import log_internal
from keyagent.errors import Busy, KeyagentError
from keyagent.log import get_logger
from keyagent.protocol import KEY_ID_DIGITS, KEY_ID_MAX
from keyagent.proxy_worker import BOARD_SLOT, BOARD_SLOTS, GENERATION, MAX_MESSAGE, read_board
from keyagent.rules import DEFAULT_HTTP_WORKERS, MAX_HOST, MAX_USER

TYPE_CHECKING = False
if TYPE_CHECKING:
    import mmap
    import subprocess
    from collections.abc import Callable, Mapping
    from typing import Any, Final

    from keyagent.agent import Agent, Peer
    from keyagent.grant import Grant

    Done = Callable[[Any, KeyagentError | None], None]

__all__ = ["BadMessage", "ProxyPool", "audit_fields"]

log = get_logger("keyagent.proxy")

WORKER_IDLE: Final = 60.0
"""Seconds without a connection after which a worker other than the first ends."""
MFD_NOEXEC_SEAL: Final = 0x0008  # os.MFD_NOEXEC_SEAL from Python 3.12 on
F_SEAL_FUTURE_WRITE: Final = 0x0010  # Linux's, which Python's fcntl does not name
START_BACKOFF: Final = (10.0, 300.0)
"""After a worker fails to start: seconds of answering ``busy``, doubling up to the second
figure while starts keep failing."""
AUDIT_FIELDS: Final = {
    "key_id": 64, "host": MAX_HOST, "user": MAX_USER, "method": 32, "path": 600, "outcome": 40,
}  # fmt: skip
"""The text fields of a worker's audit entry, and the most of each the agent records."""
STOP_AUDITS: Final = 1.0
"""At stop, the longest the agent waits for its workers' last audit entries (each request
still under way, recorded as ``cut``) before it exits without them."""
BUSY_ASKING: Final = "the agent is still answering this connection's last request; retry"
WORKER_SCRIPT: Final = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_http_worker.py")


class BadMessage(Exception):
    """A worker sent what no worker sends: a bug, or a worker no longer to be trusted."""


def audit_fields(message: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """A worker's ``audit`` message as the agent records it: its fields (each a string or
    None, cut to :data:`AUDIT_FIELDS`' lengths) and the service's status; BadMessage if it
    is not what a worker sends."""
    fields: dict[str, Any] = {}
    for name, longest in AUDIT_FIELDS.items():
        value = message.get(name)
        if value is not None and not isinstance(value, str):
            raise BadMessage(f"audit field {name}")
        # Longer than any the worker means to send: recorded cut, not refused.
        fields[name] = value[:longest] if value is not None else None
    status = message.get("status")
    if status is not None and (type(status) is not int or not 100 <= status <= 999):
        raise BadMessage("audit status")
    if fields["outcome"] is None:
        raise BadMessage("audit outcome")
    return fields, status


class _Worker:
    __slots__ = ("board", "conns", "control", "idle_since", "process", "ready", "waiting")

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        control: socket.socket,
        board: mmap.mmap | None = None,
    ) -> None:
        self.process = process
        self.control = control
        self.board = board
        """Its flight board, read-only (:class:`keyagent.proxy_worker.FlightBoard`)."""
        self.conns: set[int] = set()
        self.idle_since: float | None = None
        """When its last connection closed (the agent's clock); None while it has one."""
        self.ready = False
        """Whether it said it is ready (started, hardened, modules loaded)."""
        self.waiting: list[tuple[int, socket.socket]] = []
        """Connections handed to it before it was ready, held here until it is."""


class ProxyPool:
    """Hands the HTTP socket's connections to worker processes (see the module doc).

    ``watch(fd, handler)`` and ``unwatch(fd)`` put a control socket on the event loop;
    ``start_call(call, done)`` runs ``call`` there as the server runs a request (a value, an
    error, or a generator for its driver) and calls ``done(value, error)``; ``call_at(when,
    callback)`` runs ``callback`` at ``when`` on ``clock``. ``busy`` is what a connection no
    worker can take is sent before it is closed.
    """

    def __init__(
        self,
        agent: Agent,
        hello: Mapping[str, Any],
        *,
        watch: Callable[[int, Callable[[], None]], None],
        unwatch: Callable[[int], None],
        start_call: Callable[[Callable[[], Any], Done], None],
        call_at: Callable[[float, Callable[[], None]], None],
        clock: Callable[[], float],
        busy: bytes = b"",
        max_workers: int = DEFAULT_HTTP_WORKERS,
        worker_idle: float = WORKER_IDLE,
    ) -> None:
        self.agent = agent
        self.hello = dict(hello)
        self.watch, self.unwatch, self.start_call = watch, unwatch, start_call
        self.call_at, self.clock = call_at, clock
        self.busy = busy
        self.max_workers = max_workers
        self.worker_idle = worker_idle
        self.workers: list[_Worker] = []
        self.peers: dict[int, Peer] = {}
        """Who is at the other end of each open connection, by its number."""
        self.confirmed: dict[int, set[str]] = {}
        """Digests of the keys the user allowed on each open connection (ssh-add -c: once
        per connection), kept here: a worker's word for it is not taken."""
        self.asking: set[int] = set()
        """Connections with a question being answered: a connection's requests come one
        after another, so a second question at once is answered busy, not queued (a worker
        gone wrong cannot pile up askpass prompts or work on the loop)."""
        self._numbers = itertools.count(1)
        self._token: object = agent.credentials_token()
        self._generation = 0
        self._shared: mmap.mmap | None = None
        self._shared_fd: int | None = None
        self._ending: list[subprocess.Popen[bytes]] = []
        """Workers told to end (their control socket closed), not yet reaped."""
        self._failed_until = 0.0
        self._backoff = START_BACKOFF[0]

    @property
    def open_connections(self) -> int:
        return len(self.peers)

    @property
    def pids(self) -> list[int]:
        return [worker.process.pid for worker in self.workers]

    # --- credentials' generation -----------------------------------------------------

    def publish(self) -> None:
        """Bump the shared generation if the credentials a request would get may have
        changed: workers then stop reusing what they were lent. Called (while there are
        workers) before every reply the agent sends and after every turn of its loop, so a
        client told "locked" (say) can never have a proxied request sent with a grant from
        before (a worker checks just before it sends; a streamed body's request, once under
        way, is finished). Without workers there is nobody to tell: the first grant
        publishes first."""
        token = self.agent.credentials_token()
        if token != self._token:
            self._token = token
            self._generation += 1
            if self._shared is not None:
                GENERATION.pack_into(self._shared, 0, self._generation)

    def shared_generation(self) -> mmap.mmap:
        """The memory the generation is published in (a memfd, made with the first worker).
        Workers map it through a read-only descriptor: none can turn the number back."""
        if self._shared is None:
            import mmap

            self._shared_fd = _memfd("keyagent-generation", GENERATION.size)
            self._shared = mmap.mmap(self._shared_fd, GENERATION.size)
            GENERATION.pack_into(self._shared, 0, self._generation)
            # Reopened through /proc, a read-only descriptor becomes a writable one: the
            # seals, not the descriptor, keep a worker from writing the number (only this
            # mapping, made before, may) or from shrinking it under the agent (SIGBUS).
            _seal(self._shared_fd, future_write=True)
        return self._shared

    # --- connections -------------------------------------------------------------------

    def admit(self, sock: socket.socket, peer: Peer) -> bool:
        """Take ``sock`` for a worker: True if the pool now owns it (handed over, or held
        until its worker is ready). False if no worker can take it (none starts, or one
        failed to start a moment ago): the caller answers busy and closes it."""
        worker = min(self.workers, key=lambda w: len(w.conns), default=None)
        wanted = worker is None or (worker.conns and len(self.workers) < self.max_workers)
        if wanted and self.clock() >= self._failed_until:  # not while starts fail
            worker = self._start() or worker
        if worker is None:
            return False
        number = next(self._numbers)
        worker.conns.add(number)
        worker.idle_since = None
        self.peers[number] = peer
        if worker.ready:
            self._hand(worker, number, sock)
        else:
            worker.waiting.append((number, sock))
        return True

    def _hand(self, worker: _Worker, number: int, sock: socket.socket) -> None:
        try:
            self._send(worker, {"t": "conn", "conn": number}, sock.fileno())
        finally:
            sock.close()  # the worker has its own descriptor now (or is gone)

    def _start(self) -> _Worker | None:
        # Loaded by the first worker's start: an agent never used over HTTP has no need.
        import mmap
        import subprocess

        self._reap()
        read_only = hello_fd = board_fd = None
        slots = min(self.hello.get("max_connections", BOARD_SLOTS), BOARD_SLOTS)
        try:
            self.shared_generation()
            # Its own read-only descriptor of the generation: a writable one (or a mapping
            # of one, made writable with mprotect) would let a worker wind it back.
            read_only = os.open(f"/proc/self/fd/{self._shared_fd}", os.O_RDONLY | os.O_CLOEXEC)
            board_fd = _memfd("keyagent-flights", slots * BOARD_SLOT)  # pages only as used
            _seal(board_fd, future_write=False)  # its size fixed: the agent reads it whole
            board = mmap.mmap(board_fd, slots * BOARD_SLOT, prot=mmap.PROT_READ)
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as error:
            for fd in (read_only, board_fd):
                if fd is not None:
                    os.close(fd)
            log.warning("could not start an HTTP worker: %s", os.strerror(error.errno or 0))
            return None
        hello = {
            **self.hello, "sys_path": sys.path, "control_fd": theirs.fileno(),
            "generation_fd": read_only, "board_fd": board_fd, "board_slots": slots,
        }  # fmt: skip
        try:
            hello_fd = _memfd("keyagent-http-hello", 0)
            os.write(hello_fd, json.dumps(hello).encode())
            os.lseek(hello_fd, 0, os.SEEK_SET)
            # In the agent's session and process group: the same scheduling group, where
            # the worker's lower priority (it lowers it itself) lets the agent answer first.
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", WORKER_SCRIPT, str(hello_fd)],
                stdin=subprocess.DEVNULL,
                pass_fds=(hello_fd, theirs.fileno(), read_only, board_fd),
            )
        except OSError as error:
            log.warning("could not start an HTTP worker: %s", os.strerror(error.errno or 0))
            ours.close()
            board.close()
            return None
        finally:
            theirs.close()
            os.close(read_only)
            os.close(board_fd)
            if hello_fd is not None:
                os.close(hello_fd)
        ours.setblocking(False)
        worker = _Worker(process, ours, board)
        self.workers.append(worker)
        self.watch(ours.fileno(), lambda: self._readable(worker))
        log.info("started HTTP worker %d", process.pid)
        return worker

    def _send(self, worker: _Worker, message: dict[str, Any], fd: int | None = None) -> bool:
        data = json.dumps(message).encode()
        try:
            if fd is None:
                worker.control.send(data)
            else:
                socket.send_fds(worker.control, [data], [fd])
        except BlockingIOError:
            # Its control socket is full: the worker has stopped reading. Waiting would
            # stall the agent's loop, so the worker goes, and its connections with it.
            self._let_go(worker, "stopped reading its control socket")
            return False
        except OSError:
            self._let_go(worker, "closed its control socket")
            return False
        return True

    # --- what workers send ---------------------------------------------------------------

    def _readable(self, worker: _Worker) -> None:
        for _ in range(64):  # bounded, so one busy worker cannot starve the loop
            if worker not in self.workers:
                return
            try:
                data = worker.control.recv(MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._let_go(worker, "exited")
                return
            try:
                self._handle(worker, data)
            except BadMessage as problem:
                log.warning("HTTP worker %d sent a bad message (%s)", worker.process.pid, problem)
                self._let_go(worker, "sent a bad message")
                return
            except Exception as error:  # noqa: BLE001  # whatever it sent, the agent goes on
                log_internal(error)
                self._let_go(worker, "sent a message the agent could not handle")
                return

    def _handle(self, worker: _Worker, data: bytes) -> None:
        try:
            message = json.loads(data)
            kind = message["t"]
        except (ValueError, TypeError, KeyError, RecursionError):
            raise BadMessage("not a message") from None
        if kind == "ready" and not worker.ready:
            self._ready(worker)
            return
        conn = message.get("conn")
        if type(conn) is not int or conn not in worker.conns:
            raise BadMessage("a connection it does not serve")
        peer = self.peers[conn]
        if kind == "closed":
            self._forget(conn)
            worker.conns.discard(conn)
            if not worker.conns:
                self._idle(worker)
        elif kind == "audit":
            self._audit(peer, message)
        elif kind in ("authorize", "session_refused", "key_refused"):
            self._question(worker, conn, kind, message)
        else:
            raise BadMessage(f"unknown kind {str(kind)[:20]!r}")

    def _ready(self, worker: _Worker) -> None:
        worker.ready = True
        self._backoff = START_BACKOFF[0]
        waiting, worker.waiting = worker.waiting, []
        for number, sock in waiting:
            if worker in self.workers:
                self._hand(worker, number, sock)
            else:  # it went while handing the others
                self._refuse(sock)

    def _audit(self, peer: Peer, message: dict[str, Any]) -> None:
        fields, status = audit_fields(message)
        self.agent.audit("proxy", peer, status=status, **fields)

    def _question(self, worker: _Worker, conn: int, kind: str, message: dict[str, Any]) -> None:
        ask, host, user = message.get("ask"), message.get("host"), message.get("user")
        key_id, refused = message.get("key_id"), message.get("refused", [])
        retry = message.get("retry", True)
        if (
            type(ask) is not int
            or not isinstance(host, str)
            or not isinstance(user, str | None)
            or (kind != "authorize" and user is None)
            or not isinstance(key_id, str | None)
            or not isinstance(refused, list)
            or (kind == "key_refused") != bool(refused)
            or len(refused) > MAX_KEY_ATTEMPTS
            or not all(_is_digest(digest) for digest in refused)
            or type(retry) is not bool
            or (kind == "authorize" and not retry)
        ):
            raise BadMessage(f"a bad {kind} question")
        if conn in self.asking:
            self._send(worker, {"t": "answer", "ask": ask, "error": [Busy.code, BUSY_ASKING]})
            return
        self.asking.add(conn)
        agent, peer = self.agent, self.peers[conn]
        confirmed = frozenset(self.confirmed.get(conn, ()))

        def call() -> Any:
            if kind == "authorize":
                return agent.authorize_proxy(peer, host, user, key_id, confirmed)
            assert user is not None  # noqa: S101  # checked above
            if kind == "key_refused":
                return agent.proxy_key_refused(
                    peer, host, user, tuple(refused), confirmed, retry=retry
                )
            return agent.proxy_session_refused(peer, host, user, key_id, confirmed, retry=retry)

        def done(grant: Grant | None, error: KeyagentError | None) -> None:
            self.asking.discard(conn)
            if worker not in self.workers or conn not in self.peers:
                return  # it, or the connection, went meanwhile: nobody to answer
            answer: dict[str, Any] = {"t": "answer", "ask": ask}
            if error is not None:
                answer["error"] = [error.code, error.message]
                if error.subject is not None:  # the key or session whose rules refused: audit
                    answer["subject"] = list(error.subject)
            elif grant is None:
                answer["grant"] = None
            else:
                if grant.confirmed and grant.mark is not None:
                    self.confirmed.setdefault(conn, set()).add(grant.mark)
                self.publish()
                # A grant lent before a change the loop has since seen is never reused.
                current = grant.token == self._token
                answer["grant"] = grant.to_wire(self._generation if current else -1)
            self._send(worker, answer)

        self.start_call(call, done)

    # --- ending ------------------------------------------------------------------------

    def _forget(self, conn: int) -> None:
        self.peers.pop(conn, None)
        self.confirmed.pop(conn, None)
        self.asking.discard(conn)

    def _refuse(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.setblocking(False)
            sock.send(self.busy)
        sock.close()

    def _idle(self, worker: _Worker) -> None:
        """``worker`` has no connection left: end it after a while unless it gets one."""
        since = worker.idle_since = self.clock()

        def end_if_still_idle() -> None:
            if (
                worker in self.workers
                and worker is not self.workers[0]
                and not worker.conns
                and worker.idle_since == since
            ):
                self._end(worker)

        self.call_at(since + self.worker_idle, end_if_still_idle)

    def _end(self, worker: _Worker) -> None:
        """Tell an idle worker to end: it exits when its control socket closes, and is
        reaped by a later start or at :meth:`close` (the loop never waits for it)."""
        self.workers.remove(worker)
        self.unwatch(worker.control.fileno())
        worker.control.close()
        self._ending.append(worker.process)
        self._reap()
        log.info(
            "ended HTTP worker %d: no connection for %g s", worker.process.pid, self.worker_idle
        )

    def _reap(self) -> None:
        self._ending = [process for process in self._ending if process.poll() is None]

    def _let_go(self, worker: _Worker, why: str) -> None:
        if worker not in self.workers:
            return
        self.workers.remove(worker)
        # Killed before its control socket closes: it must not serve on after the agent
        # gave up on it (it would end by itself on the close, but not at once).
        self.unwatch(worker.control.fileno())
        self._kill(worker)
        for conn in worker.conns:
            self._forget(conn)
        for _, sock in worker.waiting:
            self._refuse(sock)
        if worker.ready:
            log.warning(
                "HTTP worker %d %s (exit status %s); its %d connection(s) were closed; the "
                "next connection starts another", worker.process.pid, why,
                worker.process.returncode, len(worker.conns),
            )  # fmt: skip
            return
        self._failed_until = self.clock() + self._backoff
        log.error(
            "HTTP worker %d %s before it was ready (exit status %s): the HTTP socket answers "
            "busy for %g s; see the messages above, and check the keyagent installation",
            worker.process.pid, why, worker.process.returncode, self._backoff,
        )  # fmt: skip
        self._backoff = min(self._backoff * 2, START_BACKOFF[1])

    def _kill(self, worker: _Worker) -> None:
        """Kill ``worker`` and record what it left unrecorded: the entries it sent that the
        agent had not read, then what is still on its flight board; close its control
        socket."""
        import subprocess  # loaded already: a worker was started

        with contextlib.suppress(ProcessLookupError):
            worker.process.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.process.wait(1.0)
        self._last_words(worker)
        worker.control.close()
        self._recover(worker)

    def _recover(self, worker: _Worker) -> None:
        """Record as ``cut`` each request ``worker`` had under way and did not record (it
        died, was killed, or missed the stop's deadline), from its flight board. The board
        is the worker's word: an entry that is not one of its connections, or not a valid
        entry, is dropped with a warning."""
        if worker.board is None:
            return
        board, worker.board = worker.board, None
        bad = 0
        with board:
            for entry in read_board(board):
                conn = entry.get("conn") if isinstance(entry, dict) else None
                if not isinstance(entry, dict) or type(conn) is not int or conn not in worker.conns:
                    bad += 1
                    continue
                try:
                    self._audit(self.peers[conn], {**entry, "outcome": "cut"})
                except BadMessage:
                    bad += 1
        if bad:
            log.warning(
                "HTTP worker %d left %d unreadable request(s) under way: not in the audit log",
                worker.process.pid, bad,
            )  # fmt: skip

    def _last_audits(self, worker: _Worker, deadline: float) -> bool:
        """Record the audit entries a worker sends until it says ``stopped`` (True), or until
        ``deadline`` (on ``time.monotonic``; False): the agent is stopping, questions go
        unanswered, and the worker was told ``stop`` (it sends an entry for each request
        still under way)."""
        poller = select.poll()
        poller.register(worker.control, select.POLLIN)
        for _ in range(4096):  # bounded: a worker still sending cannot hold up the exit
            try:
                data = worker.control.recv(MAX_MESSAGE)
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0 or not poller.poll(left * 1000):
                    log.warning(
                        "HTTP worker %d did not list its requests under way within %g s: "
                        "they are recorded from its flight board",
                        worker.process.pid, STOP_AUDITS,
                    )  # fmt: skip
                    return False
                continue
            except OSError:
                return False
            if not data:
                return False
            if self._closing_message(worker, data) == "stopped":
                return True
        return False

    def _last_words(self, worker: _Worker) -> None:
        """Record the audit entries ``worker``, dead now, sent and the agent had not read
        (their slots on its board are empty already)."""
        for _ in range(4096):  # bounded by the socket's buffer, and here too
            try:
                data = worker.control.recv(MAX_MESSAGE)
            except OSError:  # BlockingIOError: nothing left
                return
            if not data:
                return
            self._closing_message(worker, data)

    def _closing_message(self, worker: _Worker, data: bytes) -> object:
        """One message from a worker being stopped or let go: an audit entry is recorded,
        if it is a valid one for a connection of the worker's; anything else is dropped.
        Returns the message's kind (``stopped``, say)."""
        try:
            message = json.loads(data)
        except (ValueError, RecursionError):
            return None
        if not isinstance(message, dict):
            return None
        conn = message.get("conn")
        if message.get("t") == "audit" and type(conn) is int and conn in worker.conns:
            try:
                self._audit(self.peers[conn], message)
            except BadMessage as error:
                log.warning(
                    "HTTP worker %d sent a bad audit entry as it ended (%s): not recorded",
                    worker.process.pid, error,
                )  # fmt: skip
        return message.get("t")

    def close(self) -> None:
        """At the agent's exit: tell each worker to stop and record what it audits last (a
        request still under way is recorded as ``cut``), close every control socket; each
        worker then ends (its open connections with it, as they would with the agent) and
        is reaped."""
        import subprocess  # cheap now if a worker was started, and only needed then

        workers, self.workers = self.workers, []
        told = [worker for worker in workers if worker.ready and self._send(worker, {"t": "stop"})]
        deadline = time.monotonic() + STOP_AUDITS
        for worker in workers:
            self.unwatch(worker.control.fileno())
            if worker in told and self._last_audits(worker, deadline):
                worker.control.close()  # it recorded its requests itself, and now ends
                if worker.board is not None:
                    worker.board.close()
            else:  # it could not, or did not in time: killed, and what it left recorded
                self._kill(worker)
            for _, sock in worker.waiting:
                self._refuse(sock)
        for process in [worker.process for worker in workers] + self._ending:
            try:
                process.wait(1.0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._ending = []
        self.peers.clear()
        self.confirmed.clear()
        if self._shared is not None:
            self._shared.close()
            self._shared = None
        if self._shared_fd is not None:
            os.close(self._shared_fd)
            self._shared_fd = None


def _memfd(name: str, size: int) -> int:
    flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    try:  # sealed non-executable where the kernel knows the flag (Linux 6.3+)
        fd = os.memfd_create(name, flags | MFD_NOEXEC_SEAL)
    except OSError:
        fd = os.memfd_create(name, flags)
    if size:
        os.ftruncate(fd, size)
    return fd


def _seal(fd: int, *, future_write: bool) -> None:
    """Fix memfd ``fd``'s size for good, so that no process can shrink it under a mapping
    of the agent's (reading past the end of a file kills the reader with SIGBUS); with
    ``future_write``, allow no write either but through mappings already made (Linux 5.1+;
    an older kernel gets the size seals only, and the agent logs it)."""
    import fcntl

    seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
    if future_write:
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals | F_SEAL_FUTURE_WRITE)
            return
        except OSError:
            log.warning("this kernel cannot seal the shared generation against writes")
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)


def _is_digest(value: object) -> bool:
    """A held key's digest as the agent names keys: 64 lower-case hex digits."""
    return isinstance(value, str) and len(value) == KEY_ID_MAX and not value.strip(KEY_ID_DIGITS)
