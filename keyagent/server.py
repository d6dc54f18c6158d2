"""The event loop: one thread, one ``epoll``, non-blocking sockets.

Bytes in, framing, limits and the peer check live here; meaning lives in :mod:`agent`.
A request's line is parsed (:mod:`protocol`) and dispatched (:meth:`Agent.handle`); a quick
handler's result is encoded and sent at once. A handler that waits is a generator, driven by
this module's :class:`~keyagent.effects.Driver`: the ``Work`` it yields runs on a few daemon
worker threads, whose results come back through a wake-up socket and are sent into the
generator on the loop, so the loop never blocks on a network, a keyring or a key
derivation; local work has threads of its own, so it never waits for the network either.
Deadlines — key expiry, idle connections, half-sent lines, work deadlines, ``Sleep`` —
sit in one heap whose earliest entry is the poll timeout: nothing polls, nothing sleeps.

Defensive defaults sit where data enters: the peer uid is checked on accept, before a
single byte is read; a line is capped at 64 KiB before it is parsed; a client that stops
reading its replies stops being read from; a connection beyond the cap gets one ``busy``
line and is closed.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import heapq
import itertools
import os
import queue
import select
import signal
import socket
import struct
import threading
from collections import namedtuple
from collections.abc import Callable
from types import FrameType, GeneratorType

from keyagent import protocol
from keyagent.agent import MEMOIZABLE, SIGNAL_PEER, Agent, Follow, Peer, Stop
from keyagent.effects import Driver, Job, log_internal, perform
from keyagent.errors import (
    BadRequest,
    Busy,
    Forbidden,
    Internal,
    KeyagentError,
    Locked,
    Timeout,
    TooLarge,
)
from keyagent.log import DEBUG, get_logger
from keyagent.sockets import peer_exe

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Final

    from keyagent.audit import AuditEntry
    from keyagent.effects import Steps
    from keyagent.proxy_pool import ProxyPool

__all__ = ["AGENT_SOCKET_RESERVE", "LOCAL_QUEUES", "Limits", "Server", "log_internal"]

log = get_logger("keyagent.server")

_UCRED = struct.Struct("3i")
_HANGUP = select.EPOLLHUP | select.EPOLLERR
# Below glibc's mmap threshold (128 KiB): a larger buffer makes every recv() an mmap and a
# munmap with their page faults, which measured as a 2-5x slower request.
_RECV_SIZE = 64 * 1024
_SIGNAL_NAMES: dict[int, str] = {
    signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT", signal.SIGHUP: "SIGHUP",
    signal.SIGUSR1: "SIGUSR1",
}  # fmt: skip
"""The signals the agent handles, by number."""
_SECRET_MEMBER = b'"key":'
"""How a reply carrying a key starts its member, as protocol.encode_result writes it (JSON
escapes quotes inside strings, so no value can contain these bytes)."""
MEMO_SIZE = 256
LOCAL_QUEUES = frozenset({"lock", "keyring", "confirm"})
"""Queues of work done on this machine (key derivation, the OS keyring, the askpass program
that confirms a use of a key). They run on workers of their own, one per queue, so Conduce
calls hung until their timeout can never make lock, unlock, forget, a keyring write or a
confirmation wait for a thread, and a confirmation left unanswered never holds up the
others."""
AUDIT_FLUSH_DELAY = 0.05
"""Seconds an audit entry may wait before it is written to the agent's log (see
keyagent.audit.AuditLog.deferred); it is in the ring and sent to followers at once."""
AGENT_SOCKET_RESERVE = 16
"""Places of the shared ``max_connections`` cap that HTTP connections never take (at most
a quarter of it): a tool that leaks connections to the HTTP socket cannot keep
``keyagent-ctl lock`` or ``stop`` out of the agent."""
MAX_POLL_WAIT = 86400.0
"""The longest single wait, in seconds. ``epoll.poll`` refuses a timeout past 2**31 ms
(about 24.9 days), and keys may live ten years: a farther deadline is reached by waking once
a day and working out the wait again."""


_LimitFields = namedtuple(
    "_LimitFields",
    ["max_connections", "idle_timeout", "line_timeout", "max_pending_output", "stop_grace",
     "workers", "stop_timeout"],
    defaults=[1024, 300.0, 10.0, 1024 * 1024, 2.0, 32, 10.0],
)  # fmt: skip


class Limits(_LimitFields):
    """Resource limits; each one bounds what a single client can cost everyone else.

    * ``max_connections``: served at once; more are answered ``busy``.
    * ``idle_timeout``: a connection with no request for this long is closed.
    * ``line_timeout``: a request line must be complete this long after its first byte
      (slowloris).
    * ``max_pending_output``: stop reading a client whose unread replies exceed this many
      bytes.
    * ``stop_grace``: how long ``stop`` waits for its own reply to drain before exiting.
    * ``workers``: threads for Conduce calls, at most. Local work (key derivation, the OS
      keyring) has its own threads besides these, one per :data:`LOCAL_QUEUES` queue.
    * ``stop_timeout``: how long a stopping agent waits for its ephemeral keys to be deleted
      on the service (:meth:`~keyagent.agent.Agent.begin_stop`) before it exits anyway; below
      systemd's ``TimeoutStopSec`` in the shipped unit, so the agent logs what it could not
      delete before systemd would kill it.
    """

    __slots__ = ()

    max_connections: int
    idle_timeout: float
    line_timeout: float
    max_pending_output: int
    stop_grace: float
    workers: int
    stop_timeout: float


class Connection:
    """One client: its socket, buffers and state."""

    __slots__ = (
        "busy",
        "closed",
        "cut",
        "discarded",
        "eof",
        "events",
        "finishing",
        "gone",
        "inbuf",
        "last_active",
        "line_started",
        "outbuf",
        "peer",
        "sock",
    )

    def __init__(self, sock: socket.socket, peer: Peer, now: float) -> None:
        self.sock = sock
        self.peer = peer
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.busy = False  # a reply is owed (deferred or delayed); later lines wait
        self.closed = False
        self.eof = False
        # The client ended its sending mid-line: once what came before has run, it is
        # told that line was not (see Server._settle).
        self.cut = False
        # The peer hung up: nothing reaches it any more, but the complete lines it sent
        # still run, in order, their replies counted in ``discarded`` and dropped.
        self.gone = False
        self.discarded = 0
        # A fatal error line is queued (see Server._fatal): nothing more is read or run;
        # closed once the replies before it, and it, have been sent.
        self.finishing = False
        self.events = 0
        self.last_active = now
        self.line_started = now

    def __repr__(self) -> str:
        return f"<Connection pid={self.peer.pid} fd={self.sock.fileno()}>"


class _Workers:
    """Daemon threads for blocking work, started on demand up to ``limit``.

    A thread is added whenever no idle one is left, so a Conduce call hung until its
    timeout never makes another account's call wait behind it while threads remain; past
    ``limit`` a job waits for one to come free, which is why local work has a pool of its own
    (:data:`LOCAL_QUEUES`). Daemon threads, so a hung call never delays exit.
    """

    def __init__(self, limit: int, name: str = "keyagent-worker") -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._limit = limit
        self._name = name
        self._guard = threading.Lock()
        self._threads = 0
        self._idle = 0

    def submit(self, job: Callable[[], None]) -> None:
        with self._guard:
            start = self._idle == 0 and self._threads < self._limit
            if start:
                self._threads += 1
            else:
                self._idle -= 1 if self._idle else 0
        if start:
            threading.Thread(target=self._run, args=(job,), name=self._name, daemon=True).start()
        else:
            self._jobs.put(job)

    def _run(self, job: Callable[[], None] | None) -> None:
        while job is not None:
            job()
            with self._guard:
                self._idle += 1
            job = self._jobs.get()

    def stop(self) -> None:
        with self._guard:
            count = self._threads
        for _ in range(count):
            self._jobs.put(None)


class Server:
    """Serve ``agent`` on ``listener`` until stopped by a signal or a ``stop`` request."""

    def __init__(
        self,
        agent: Agent,
        listener: socket.socket,
        *,
        limits: Limits | None = None,
        http_listener: socket.socket | None = None,
    ) -> None:
        self.agent = agent
        self.listener = listener
        self.http_listener = http_listener
        self.proxy_pool: ProxyPool | None = None
        """Serves the connections of ``http_listener`` in worker processes (keyagent.proxy)."""
        self.http_busy: bytes = b""
        """What an HTTP connection past the cap is sent before it is closed."""
        self._watched: dict[int, Callable[[], None]] = {}
        """Other descriptors the loop watches (the HTTP workers' control sockets)."""
        self.limits = limits or Limits()
        # The agent's clock: key deadlines (poll timeout, memo validity) are on it.
        self.clock = clock = agent.clock.monotonic
        self.uid = os.geteuid()
        self.connections: dict[int, Connection] = {}
        self._epoll = select.epoll()
        # Replies to idempotent reads (get, hello), by request line, valid while the agent's
        # state and the earliest key deadline are unchanged. A repeated request then costs a
        # dictionary lookup instead of parsing, dispatching and encoding.
        # With each reply, the audit entry its request made (a get's), recorded again for
        # each request the memo answers: a remembered reply is still a use of the key.
        self._memo: dict[bytes, tuple[bytes, AuditEntry | None]] = {}
        self._memo_state: object = None
        self._memo_until = 0.0
        self._memo_enabled = False  # decided in serve_forever, once logging is configured
        self._seen_locked = False  # as of the last reply: see _withhold_queued_secrets
        self._now = clock()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        # Connections in order of last activity, and those holding half a line in order of
        # when it started: the first of each is the next idle or line deadline. Dicts keep
        # order and remove in O(1), so a closed connection leaves nothing behind.
        self._by_activity: dict[Connection, None] = {}
        self._half_lines: dict[Connection, None] = {}
        self._seq = itertools.count()
        self._driver = _LoopDriver(self)
        self._completed: collections.deque[Callable[[], None]] = collections.deque()
        # Work for the next turn of the loop, after the events at hand (a vanished client's
        # remaining lines): run once per turn, so it never starves the other clients.
        self._soon: collections.deque[Callable[[], None]] = collections.deque()
        # Connections following the audit log (log with follow), and what each follows with.
        self._followers: dict[Connection, tuple[Callable[[AuditEntry], None], Any]] = {}
        self._wake_r, self._wake_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._signals: collections.deque[int] = collections.deque()
        self._workers: _Workers | None = None
        self._local_workers: _Workers | None = None
        self._running = False
        self._stop_deadline: float | None = None
        self._stop_waiting: Connection | None = None
        self._deletions_until: float | None = None
        """While stopping: when the server stops waiting for deletions on the service."""
        self._stop_signalled = False
        self._cut_short = False
        """A second stop signal ended the wait for deletions."""
        self.on_stopping: Callable[[], None] | None = None
        """Called once when the agent begins to stop (systemd's STOPPING=1)."""
        self._reserve_fd: int | None = None
        self.on_ready: Callable[[], None] | None = None
        self._wakes_on_signals = False
        """Signals write to the wake-up pipe (install_signal_handlers): undone at exit."""
        self._under_way = 0
        """Requests being driven (a client's, or an HTTP worker's question): a stopping agent
        waits for them as for its deletions, up to ``stop_timeout``."""

    # --- life cycle ----------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """TERM, INT and HUP stop the agent cleanly; USR1 forgets every key."""
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        self._wakes_on_signals = True
        for signum in _SIGNAL_NAMES:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)

    def serve_forever(self) -> None:
        self.listener.setblocking(False)
        self._epoll.register(self.listener.fileno(), select.EPOLLIN)
        self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)
        if self.http_listener is not None:
            self.http_listener.setblocking(False)
            self._epoll.register(self.http_listener.fileno(), select.EPOLLIN)
        self._memo_enabled = not log.isEnabledFor(DEBUG)  # debug logs every request
        self._reserve_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._workers = _Workers(self.limits.workers)
        self._local_workers = _Workers(len(LOCAL_QUEUES), "keyagent-local")
        self._running = True
        audit_log = self.agent.audit_log
        audit_log.deferred = True
        audit_log.on_pending = lambda: self.call_at(
            self.clock() + AUDIT_FLUSH_DELAY, audit_log.flush
        )
        self.agent.driven_by(self._driver.start_background)
        if self.on_ready is not None:
            self.on_ready()
        log.info("serving on %s (pid %d)", self.agent.socket_path, os.getpid())
        try:
            self._loop()
        finally:
            self._shutdown()

    def _loop(self) -> None:
        poll, clock = self._epoll.poll, self.clock
        listener, wake = self.listener.fileno(), self._wake_r.fileno()
        http = -1 if self.http_listener is None else self.http_listener.fileno()
        connections = self.connections
        while self._running:
            events = poll(self._poll_timeout())
            self._now = clock()
            for fd, mask in events:
                if fd == listener:
                    self._accept()
                elif fd == http:
                    self._accept_http()
                elif fd == wake:
                    self._drain_wakeups()
                else:
                    conn = connections.get(fd)
                    if conn is None:
                        self._run_watched(fd)
                        continue
                    if mask & _HANGUP:  # gone: nobody to answer, but what it sent runs
                        self._lose_peer(conn)
                        continue
                    if mask & select.EPOLLOUT:
                        self._flush(conn)
                    if mask & select.EPOLLIN and not conn.closed:
                        self._read(conn)
            self._run_timers()
            if self.proxy_pool is not None and self.proxy_pool.workers:
                self.proxy_pool.publish()  # a timer or a signal may have dropped keys
            if self._stop_deadline is not None:
                # The listeners are closed: their numbers may be reused for other files.
                listener = http = -1

    def _poll_timeout(self) -> float | None:
        now = self.clock()
        candidates = []
        next_expiry = self.agent.reap()
        next_rotation = self.agent.rotate_due()
        if self._memo:
            self._drop_stale_memo(now)
        if self._soon:
            return 0.0
        if next_expiry is not None:
            candidates.append(next_expiry)
        if next_rotation is not None:
            candidates.append(next_rotation)
        if self._timers:
            candidates.append(self._timers[0][0])
        if self._by_activity:
            candidates.append(next(iter(self._by_activity)).last_active + self.limits.idle_timeout)
        if self._half_lines:
            candidates.append(next(iter(self._half_lines)).line_started + self.limits.line_timeout)
        if self._stop_deadline is not None:
            candidates.append(self._stop_deadline)
        if self._deletions_until is not None:
            candidates.append(self._deletions_until)
        if not candidates:
            return None
        return min(MAX_POLL_WAIT, max(0.0, min(candidates) - now))

    def _shutdown(self) -> None:
        # What is recorded now (deletions that did not end, requests the workers had under
        # way) reaches the followers of the audit log before their connections close.
        if self._deletions_until is not None and self.agent.end_stop(
            "a signal cut the wait short"
            if self._cut_short
            else f"not done within stop_timeout, {self.limits.stop_timeout:g} s"
        ):
            log.warning("exiting with keys not deleted on the service (see above)")
        if self.proxy_pool is not None:
            self.proxy_pool.close()  # first: it records the workers' last audit entries
        for conn in list(self.connections.values()):
            self._close(conn)
        self.agent.audit_log.flush()
        for workers in (self._workers, self._local_workers):
            if workers is not None:
                workers.stop()
        self._epoll.close()
        if self._reserve_fd is not None:
            os.close(self._reserve_fd)
        if self._wakes_on_signals:
            # Before the pipe closes: a signal after it (a second SIGTERM sent to the whole
            # process group) would otherwise be written to a closed descriptor, or to
            # whatever file reuses its number, and Python prints a traceback for it.
            signal.set_wakeup_fd(-1)
            self._wakes_on_signals = False
        self._wake_r.close()
        self._wake_w.close()
        log.info("stopped")

    def call_at(self, deadline: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the loop at ``deadline`` (on :attr:`clock`)."""
        heapq.heappush(self._timers, (deadline, next(self._seq), callback))

    def _run_timers(self) -> None:
        timers = self._timers
        if self._stop_deadline is not None:
            waiting = self._stop_waiting
            if (
                self.clock() >= self._stop_deadline
                or waiting is None
                or waiting.closed
                or (not waiting.outbuf)
            ) and self._deletions_done():
                self._running = False
        now = self.clock()
        while timers and timers[0][0] <= now:
            _, _, callback = heapq.heappop(timers)
            callback()
        for _ in range(len(self._soon)):  # what these add waits for the next turn
            self._soon.popleft()()
        self._expire_connections(now)

    # --- wake-ups: signals and finished work ---------------------------------------------

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while self._signals:
            self._handle_signal(self._signals.popleft())
        while self._completed:
            self._completed.popleft()()

    def _handle_signal(self, signum: int) -> None:
        name = _SIGNAL_NAMES.get(signum, str(signum))
        if signum == signal.SIGUSR1:
            # Memory only, like forget --all: persisted copies stay in the OS keyring.
            if self._request_for_signal(protocol.Request(None, "forget", {"all": True})):
                log.info("%s: forgot every held key", name)
            return
        if self._stop_signalled:  # a second one (Ctrl-C twice): the user will not wait
            log.info("%s while stopping: exiting now", name)
            self._cut_short = True
            self._running = False
            return
        self._stop_signalled = True
        log.info("%s: stopping", name)
        self._begin_stop(None)

    def _request_for_signal(self, request: protocol.Request) -> bool:
        """Dispatch a request the agent's user made by signal, with no one to answer; False
        if it failed (logged). One that waits goes on with no client, like background work."""
        try:
            outcome = self.agent.handle(request, SIGNAL_PEER)
        except KeyagentError as error:
            log.warning("%s on a signal failed: %s", request.op, error.message)
            return False
        except Exception as error:  # noqa: BLE001  # a bug must not stop the agent
            log_internal(error)
            return False
        finally:
            if self._memo:  # it may have forgotten keys: drop the replies that hold them
                self._drop_stale_memo(self.clock())
        if isinstance(outcome, GeneratorType):
            self._driver.start_background(outcome)
        return True

    def _deliver(self, callback: Callable[[], None]) -> None:
        """Hand a callback from a worker thread to the loop (thread-safe)."""
        self._completed.append(callback)
        # If the wake-up socket is full, the loop is already awake: nothing is lost.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def start_call(
        self, call: Callable[[], Any], done: Callable[[Any, KeyagentError | None], None]
    ) -> None:
        """Run ``call`` on the loop now, as a request is run: it returns a value, raises, or
        returns a generator for the driver; ``done(value, error)`` gets the outcome (an HTTP
        worker's question, from :class:`keyagent.proxy_pool.ProxyPool`)."""
        try:
            outcome = call()
        except KeyagentError as error:
            done(None, error)
        except Exception as error:  # noqa: BLE001  # a bug must not stop the agent
            log_internal(error)
            done(None, Internal())
        else:
            if isinstance(outcome, GeneratorType):
                self._under_way += 1

                def ended(value: Any, error: KeyagentError | None) -> None:
                    self._under_way -= 1
                    done(value, error)

                self._driver.start(outcome, ended)
            else:
                done(outcome, None)

    def watch(self, fd: int, handler: Callable[[], None]) -> None:
        """Call ``handler`` on the loop whenever ``fd`` is readable (or closed)."""
        self._watched[fd] = handler
        self._epoll.register(fd, select.EPOLLIN)

    def _run_watched(self, fd: int) -> None:
        handler = self._watched.get(fd)
        if handler is None:
            return
        try:
            handler()
        except Exception as error:  # noqa: BLE001  # a bug must not stop the agent
            log_internal(error)
            self.unwatch(fd)  # or the loop would call it again at once, for ever

    def unwatch(self, fd: int) -> None:
        if self._watched.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    # --- accepting -----------------------------------------------------------------------

    def _accept(self) -> None:
        if self._stop_deadline is not None:  # closed by a stop earlier in the same batch
            return
        for _ in range(64):  # bounded, so a connect storm cannot starve existing clients
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE):
                    self._shed_one()
                    continue
                log.warning("accept failed: %s", os.strerror(error.errno or 0))
                return
            self._admit(sock)  # reads the client's first request at once: it may be stop
            if self.listener.fileno() < 0:  # it was: the listener is closed now
                return

    def _accept_http(self) -> None:
        assert self.http_listener is not None  # noqa: S101  # registered only when set
        if self._stop_deadline is not None:  # closed by a stop earlier in the same batch
            return
        for _ in range(64):
            try:
                sock, _ = self.http_listener.accept()
            except BlockingIOError:
                return
            except OSError as error:
                log.warning("accept on the HTTP socket failed: %s", os.strerror(error.errno or 0))
                return
            self._admit_http(sock)

    def _admit_http(self, sock: socket.socket) -> None:
        """Check the peer as for the agent socket, then hand it to an HTTP worker process
        (:mod:`keyagent.proxy_pool`). Another user's connection is closed unanswered; one
        past the shared connection cap, or that no worker can take, is answered busy."""
        credentials = _peer_credentials(sock)
        if credentials is None:
            return
        pid, uid, gid = credentials
        if uid != self.uid:
            log.warning("refused HTTP connection from uid %d (pid %d)", uid, pid)
            self.agent.audit("connect", Peer(pid, uid, gid), outcome=Forbidden.code)
            sock.close()
            return
        pool = self.proxy_pool
        if (
            pool is not None
            and len(self.connections) + pool.open_connections < self._http_cap()
            and self._running
            and self._stop_deadline is None
            and pool.admit(sock, Peer(pid, uid, gid, peer_exe(pid)))
        ):
            return  # the pool owns it now
        log.warning("refused HTTP connection from pid %d: busy", pid)
        with contextlib.suppress(OSError):
            sock.setblocking(False)
            sock.send(self.http_busy)
            # Discard what the tool already sent: closing with unread input would make it
            # see a reset instead of the answer.
            sock.recv(_RECV_SIZE)
        sock.close()

    def _http_connections(self) -> int:
        return 0 if self.proxy_pool is None else self.proxy_pool.open_connections

    def _http_cap(self) -> int:
        """How many connections there may be, at most, when an HTTP one is admitted: the
        shared cap less the places kept for the agent socket."""
        cap = self.limits.max_connections
        return cap - min(AGENT_SOCKET_RESERVE, cap // 4)

    def _shed_one(self) -> None:
        """Out of file descriptors: free the reserve, answer one client ``busy``, re-arm."""
        if self._reserve_fd is None:
            return
        os.close(self._reserve_fd)
        self._reserve_fd = None
        try:
            sock, _ = self.listener.accept()
        except OSError:
            pass
        else:
            self._refuse(sock, Busy())
            log.warning("out of file descriptors; refused a client")
        try:
            self._reserve_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            log.warning("could not re-open the reserve descriptor")

    def _admit(self, sock: socket.socket) -> None:
        credentials = _peer_credentials(sock)
        if credentials is None:
            return
        pid, uid, gid = credentials
        # The socket's mode and its directory already keep others out; this check is the
        # one that holds even if they are loosened. Root is not exempt: an agent started
        # by one user serves that user only.
        if uid != self.uid:
            log.warning("refused connection from uid %d (pid %d)", uid, pid)
            self.agent.audit("connect", Peer(pid, uid, gid), outcome=Forbidden.code)
            self._refuse(sock, Forbidden())
            return
        if (
            len(self.connections) + self._http_connections() >= self.limits.max_connections
            or not self._running
            or (self._stop_deadline is not None)
        ):
            log.warning(
                "refused connection from pid %d: busy (%d connections open, %d of them HTTP)",
                pid, len(self.connections) + self._http_connections(), self._http_connections(),
            )  # fmt: skip
            self._refuse(sock, Busy())
            return
        sock.setblocking(False)
        now = self.clock()
        # The program on the other end, for keys that allow only some (add --allow-exe).
        conn = Connection(sock, Peer(pid, uid, gid, peer_exe(pid)), now)
        self.connections[sock.fileno()] = conn
        conn.events = select.EPOLLIN
        self._epoll.register(sock.fileno(), select.EPOLLIN)
        self._by_activity[conn] = None
        log.debug("connection from pid %d", pid)
        # A client usually writes its request right after connecting: read it now rather
        # than on the next wake-up (an empty socket just raises BlockingIOError).
        self._read(conn)

    @staticmethod
    def _refuse(sock: socket.socket, error: KeyagentError) -> None:
        """Send one error line and close, without reading a request from this peer."""
        try:
            sock.setblocking(False)
            sock.send(protocol.encode_error(None, error))
            # Discard what the peer already sent: closing with unread input makes the peer
            # see a reset instead of an orderly end after our line.
            sock.recv(protocol.MAX_LINE)
        except OSError:
            pass  # the refused client is gone or not reading; nothing more is owed
        finally:
            sock.close()

    # --- reading and framing -------------------------------------------------------------

    def _read(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            self._lose_peer(conn)
            return
        if not data:
            conn.eof = True
            end = conn.inbuf.rfind(b"\n") + 1
            conn.cut = end < len(conn.inbuf)
            del conn.inbuf[end:]  # a half line at the end is no request
            self._half_lines.pop(conn, None)
            self._settle(conn)
            return
        self._touch(conn)
        if self._memo and not conn.inbuf and not conn.busy and data.find(b"\n") == len(data) - 1:
            # The hot path: one whole line that may be a repeated read. Kept flat on purpose.
            if self._memo_state != self.agent.state_token() or self._now >= self._memo_until:
                self._memo.clear()
            else:
                remembered = self._memo.get(data[:-1])
                if remembered is not None:
                    reply, audited = remembered
                    if audited is not None:
                        self.agent.audit_again(audited, conn.peer)
                    self._send(conn, reply)
                    if conn.outbuf:  # not all sent (a closed connection has none)
                        self._settle(conn)
                    return
        conn.inbuf += data
        self._process(conn)

    def _lose_peer(self, conn: Connection, *, later: bool = False) -> None:
        """The client hung up (or its socket failed): nothing reaches it any more.

        What it sent still counts: a client may write ``lock`` or ``forget`` and close at
        once, and the hang-up can be seen before the line is read. So the connection leaves
        the poll set and its deadlines, and every complete line still unread or unanswered
        runs, in order, replies dropped; then it is closed (:meth:`_process`). Work already
        started for it finishes as usual.

        The lines run now, before other clients' events of this turn (what it sent came
        first); ``later``: on the next turn, for a caller that may be inside :meth:`_process`.
        """
        if conn.closed or conn.gone:
            return
        if conn in self._followers or conn.finishing:  # nothing it sent is left to run
            self._close(conn)
            return
        conn.gone = True
        conn.outbuf.clear()
        if conn.events:
            self._epoll.unregister(conn.sock.fileno())
            conn.events = 0
        self._by_activity.pop(conn, None)
        self._half_lines.pop(conn, None)
        if later:
            self._soon.append(lambda: self._process(conn))
        elif not conn.busy:  # else the (dropped) reply it waits for resumes it
            self._process(conn)

    @staticmethod
    def _read_rest(conn: Connection) -> bool:
        """Read more of what a vanished client sent; False once there is no more."""
        try:
            data = conn.sock.recv(_RECV_SIZE)
        except OSError:  # drained (or, if it only stopped reading, not sending now), or reset
            return False
        conn.inbuf += data
        return bool(data)

    def _drop_stale_memo(self, now: float) -> None:
        """Drop the remembered replies once they may be wrong (a ``forget``, a ``lock``, an
        expiry): they hold key secrets, which must not outlive the key in memory."""
        if self._memo_state != self.agent.state_token() or now >= self._memo_until:
            self._memo.clear()

    def _remember(self, line: bytes, reply: bytes, state: object) -> None:
        """Remember ``reply`` to ``line``; ``state``: the agent's state token and the count of
        audit entries, both as they were before the request."""
        if not isinstance(state, tuple):
            return
        token: object = state[0]
        recorded: int = state[1]
        if token != self.agent.state_token():  # the read changed what reads return
            return
        audit = self.agent.audit_log
        made = audit.recorded - recorded
        if made > 1:  # which entry was the request's own cannot be told: do not remember
            return
        if self._memo_state != token or len(self._memo) >= MEMO_SIZE:
            self._memo.clear()
        self._memo_state = token
        self._memo_until = self.agent.held_keys.next_deadline()
        self._memo[line] = (reply, audit.newest if made else None)

    def _touch(self, conn: Connection, now: float | None = None) -> None:
        if conn.closed or conn.gone:  # e.g. the send before this found the client gone
            return
        conn.last_active = self._now if now is None else now
        del self._by_activity[conn]
        self._by_activity[conn] = None

    def _process(self, conn: Connection) -> None:
        """Answer each complete line in turn, until one must wait or the client must read.

        For a client that has gone, run what it sent until nothing is left, then close;
        a reply budget's worth per turn, like a client that reads its replies.
        """
        if conn.finishing:
            return
        inbuf = conn.inbuf
        limit = self.limits.max_pending_output
        while not conn.busy and not conn.closed and len(conn.outbuf) + conn.discarded < limit:
            end = inbuf.find(b"\n")
            if end < 0:
                if len(inbuf) > protocol.MAX_LINE:
                    self._fatal(conn, TooLarge())
                    return
                if conn.gone and self._read_rest(conn):
                    continue
                break
            if end > protocol.MAX_LINE:
                self._fatal(conn, TooLarge())
                return
            line = bytes(inbuf[:end])
            del inbuf[: end + 1]
            self._half_lines.pop(conn, None)
            self._handle_line(conn, line)
        if conn.closed:
            return
        if conn.gone:
            if conn.busy:  # its (dropped) reply resumes it
                return
            if conn.discarded >= limit:
                conn.discarded = 0
                self._soon.append(lambda: self._process(conn))
            else:  # every line it sent has run
                self._close(conn)
            return
        if inbuf and b"\n" not in inbuf and conn not in self._half_lines:
            conn.line_started = self.clock()
            self._half_lines[conn] = None
        self._settle(conn)

    def _handle_line(self, conn: Connection, line: bytes) -> None:
        try:
            request = protocol.parse_request(line)
        except protocol.InvalidRequest as invalid:
            self._send(conn, protocol.encode_error(invalid.request_id, invalid.error))
            return
        except Exception as error:  # noqa: BLE001  # a parser bug must not stop the agent
            log_internal(error)
            self._send(conn, protocol.encode_error(None, Internal()))
            return
        remember = line if self._memo_enabled and request.op in MEMOIZABLE else None
        state = (
            None if remember is None else (self.agent.state_token(), self.agent.audit_log.recorded)
        )
        try:
            outcome = self.agent.handle(request, conn.peer)
        except KeyagentError as error:
            self._answer(conn, request.id, None, error, remember=remember, state=state)
            return
        except Exception as error:  # noqa: BLE001  # one bad request must not stop the agent
            log_internal(error)
            self._answer(conn, request.id, None, Internal())
            return
        if isinstance(outcome, dict | Stop):
            self._answer(conn, request.id, outcome, None, remember=remember, state=state)
        elif isinstance(outcome, Follow):
            self._follow(conn, request.id, outcome.result)
        else:  # a generator: the driver answers when it has ended
            self._wait_for(conn, request.id, outcome)

    def _wait_for(self, conn: Connection, request_id: protocol.Scalar, steps: Steps) -> None:
        """Drive a handler that waits; the connection's later lines wait for its answer.

        A handler may end at its first step (refused before any work): it is answered at once,
        like a quick one, and :meth:`_process` goes on with the next line, never re-entered.
        """
        ended = False
        self._under_way += 1

        def answer(result: dict[str, Any] | Stop | None, error: KeyagentError | None) -> None:
            nonlocal ended
            ended = True
            self._under_way -= 1
            self._answer(conn, request_id, result, error)

        self._driver.start(steps, answer)
        if not ended:
            conn.busy = True  # its answer resumes the connection (_reply)

    def _answer(
        self,
        conn: Connection,
        request_id: protocol.Scalar,
        result: dict[str, Any] | Stop | None,
        error: KeyagentError | None,
        *,
        remember: bytes | None = None,
        state: object = None,
    ) -> None:
        """Send what a request came to: its result, its error, or a :class:`Stop`'s result.

        ``remember``: the line of an idempotent read, whose answer goes to the reply memo,
        with ``state``, the agent's state token before the read.
        """
        if self._memo:  # the request may have been a forget or a lock: drop secrets now
            self._drop_stale_memo(self.clock())
        self._withhold_queued_secrets()
        if error is not None:
            reply = protocol.encode_error(request_id, error)
        elif isinstance(result, Stop):
            self._reply(conn, self._result_line(request_id, result.result))
            self._begin_stop(conn)
            return
        else:
            assert result is not None  # noqa: S101  # a handler returns a result or raises
            reply = self._result_line(request_id, result)
        if remember is not None:
            self._remember(remember, reply, state)
        self._reply(conn, reply)

    def _withhold_queued_secrets(self) -> None:
        """When the agent has just been locked, close every connection whose unsent replies
        hold a key: a client that stopped reading would otherwise get keys after ``lock`` said
        ``locked: true``. Its lines are framed, so they cannot be edited out; the connection
        goes (the client reconnects and is answered ``locked``). Followers of the audit log
        get a last ``locked`` line."""
        locked = self.agent.lock.locked
        if locked == self._seen_locked:
            return
        self._seen_locked = locked
        if not locked:
            return
        # A locked agent tells nobody how it is used: followers of the audit log stop too.
        for conn in list(self._followers):
            self._end_following(conn, Locked(_LOCKED_FOLLOWING))
        for conn in list(self.connections.values()):
            if _SECRET_MEMBER in conn.outbuf:
                log.warning(
                    "locked: closing the connection of pid %d, whose unread replies hold keys",
                    conn.peer.pid,
                )
                self._close(conn)

    def _result_line(self, request_id: protocol.Scalar, result: dict[str, Any]) -> bytes:
        """The reply line for ``result``; one carrying a secret only while the agent is unlocked.

        The locked check before dispatch is not enough: a create with reveal may start, wait on
        the service, and finish after a ``lock`` was answered ``locked: true``. So the lock is
        checked here, as the reply is made. The key stays held; the error says how to get it.
        """
        if "key" in result and self.agent.lock.locked:
            return protocol.encode_error(request_id, _withheld(result))
        return protocol.encode_result(request_id, result)

    def _reply(self, conn: Connection, line: bytes) -> None:
        """Send a reply; if it ends a wait, go on with the lines that queued behind it."""
        if conn.closed:
            return
        self._send(conn, line)
        if conn.busy and not conn.closed:
            conn.busy = False
            self._touch(conn)
            self._process(conn)

    # --- followers of the audit log (log with follow) ----------------------------------------
    # After the reply with the entries so far, a follower's connection carries one line per
    # new entry, {"id": ID, "entry": {...}}, until the client closes it or shuts down its
    # sending side. It stays "busy" (no later request of it is answered, and it is never
    # idle: it waits on the agent). What it has not read is bounded like any client's, by
    # max_pending_output: a follower that falls that far behind is dropped rather than
    # buffered for. Being dropped, or a lock, ends it with a last line (a ``busy`` or
    # ``locked`` error); it closes once that line is sent.

    def _follow(
        self, conn: Connection, request_id: protocol.Scalar, result: dict[str, Any]
    ) -> None:
        self._answer(conn, request_id, result, None)
        if conn.closed or conn.gone:
            return
        conn.busy = True

        def follower(entry: AuditEntry) -> None:
            self._send_entry(conn, request_id, entry)

        self._followers[conn] = (follower, request_id)
        self.agent.audit_log.follow(follower)

    def _send_entry(self, conn: Connection, request_id: protocol.Scalar, entry: AuditEntry) -> None:
        limit = self.limits.max_pending_output
        if len(conn.outbuf) >= limit:
            self._end_following(
                conn,
                Busy(
                    f"this follower of the audit log fell {limit} bytes behind, so the agent "
                    "stopped sending to it and entries were dropped; run keyagent-ctl log to "
                    "see them, and read faster when following"
                ),
            )
            return
        self._send(conn, protocol.encode_entry(request_id, entry.to_json()))
        self._settle(conn)

    def _end_following(self, conn: Connection, error: KeyagentError) -> None:
        """Stop sending entries to ``conn``: queue ``error`` as its last line, then close."""
        follower, request_id = self._followers.pop(conn)
        self.agent.audit_log.unfollow(follower)
        log.info("stopped following the audit log for pid %d: %s", conn.peer.pid, error.code)
        conn.busy = False
        conn.eof = True  # nothing more is read: _settle closes it once the line is sent
        conn.inbuf.clear()
        self._half_lines.pop(conn, None)
        # It was never idle while it followed; from now its client has a whole idle
        # timeout to read what is queued, this last line included, before it is closed.
        self._touch(conn, self.clock())
        self._send(conn, protocol.encode_error(request_id, error))
        self._settle(conn)

    # --- work for the driver ---------------------------------------------------------------

    def _run_job(self, job: Job) -> None:
        """Run a job's work on a thread (local work on its own pool, everything else on the
        shared one); its outcome goes back to the driver on the loop."""

        def run() -> None:  # on a worker thread
            value, error = perform(job.work)
            self._deliver(lambda: self._driver.job_ended(job, value, error))

        workers = self._local_workers if job.work.queue in LOCAL_QUEUES else self._workers
        assert workers is not None  # noqa: S101  # set before the loop starts
        workers.submit(run)

    # --- writing -------------------------------------------------------------------------

    def _send(self, conn: Connection, data: bytes) -> None:
        if conn.closed:
            return
        if self.proxy_pool is not None and self.proxy_pool.workers:
            # Before the client can read (say) "locked": no worker reuses a grant after it.
            self.proxy_pool.publish()
        if conn.gone:
            conn.discarded += len(data)
            return
        if not conn.outbuf:
            try:
                sent = conn.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._lose_peer(conn, later=True)
                return
            if sent == len(data):
                return
            data = data[sent:]
        conn.outbuf += data

    def _flush(self, conn: Connection) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except BlockingIOError:
            return
        except OSError:
            self._lose_peer(conn)
            return
        del conn.outbuf[:sent]
        self._touch(conn)
        if not conn.outbuf and conn.inbuf and not conn.busy:
            self._process(conn)  # reading resumed: answer what waited behind the backlog
        else:
            self._settle(conn)

    def _settle(self, conn: Connection) -> None:
        """Close a finished connection, or register exactly the events it now needs."""
        if conn.closed or conn.gone:  # a gone one is polled no more; _process closes it
            return
        if conn.eof and conn in self._followers:  # its client is done: so is following
            self._close(conn)
            return
        if conn.eof and conn.cut and not conn.busy and b"\n" not in conn.inbuf:
            conn.cut = False  # every line before it has run: the client, still reading,
            self._send(conn, protocol.encode_error(None, BadRequest(CUT_LINE)))  # hears why
        if conn.eof and not conn.busy and not conn.outbuf and b"\n" not in conn.inbuf:
            self._close(conn)
            return
        want = 0
        if (
            not conn.eof
            and len(conn.outbuf) < self.limits.max_pending_output
            and (not conn.busy or len(conn.inbuf) <= protocol.MAX_LINE)
        ):
            want |= select.EPOLLIN
        if conn.outbuf:
            want |= select.EPOLLOUT
        if want != conn.events:
            if want == 0:
                self._epoll.unregister(conn.sock.fileno())
            elif conn.events == 0:
                self._epoll.register(conn.sock.fileno(), want)
            else:
                self._epoll.modify(conn.sock.fileno(), want)
            conn.events = want

    def _fatal(self, conn: Connection, error: KeyagentError) -> None:
        """Send one error line and close: the stream can no longer be framed, so nothing
        more is read. Replies to earlier lines that the client has not read yet (a long
        ``log``, say) are sent first, whole, then the error: the connection closes once the
        client has read them (or at its idle deadline)."""
        log.warning("closing connection from pid %d: %s", conn.peer.pid, error.code)
        self._send(conn, protocol.encode_error(None, error))
        if not conn.outbuf:
            self._close(conn)
            return
        conn.finishing = conn.eof = True  # read no more; _settle closes it once sent
        conn.cut = False
        conn.inbuf.clear()
        self._half_lines.pop(conn, None)
        self._settle(conn)

    def _close(self, conn: Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        if conn.events:
            self._epoll.unregister(conn.sock.fileno())
            conn.events = 0
        self.connections.pop(conn.sock.fileno(), None)
        following = self._followers.pop(conn, None)
        if following is not None:
            self.agent.audit_log.unfollow(following[0])
        self._by_activity.pop(conn, None)
        self._half_lines.pop(conn, None)
        conn.sock.close()
        conn.inbuf.clear()
        conn.outbuf.clear()

    def _expire_connections(self, now: float) -> None:
        """Close connections past their idle or half-line deadline (oldest first)."""
        line_cutoff = now - self.limits.line_timeout
        while self._half_lines:
            conn = next(iter(self._half_lines))
            if conn.line_started > line_cutoff:
                break
            self._fatal(conn, Timeout())
        idle_cutoff = now - self.limits.idle_timeout
        while self._by_activity:
            conn = next(iter(self._by_activity))
            if conn.last_active > idle_cutoff:
                break
            if conn.busy:  # the client is waiting on us, not idle
                self._touch(conn, now)
                continue
            log.debug("closing idle connection from pid %d", conn.peer.pid)
            self._close(conn)

    # --- stopping ------------------------------------------------------------------------

    def _begin_stop(self, conn: Connection | None) -> None:
        """Stop accepting; leave once ``conn`` (the client of ``stop``; None for a signal)
        has its reply, or after the grace period, and the agent's deletions on the service
        have ended, or after ``stop_timeout``.

        The listening sockets are closed, not just left unwatched: a client that connects
        now is refused at once (no agent) instead of waiting in the backlog until the exit,
        and a new agent may take the path meanwhile (``on_stopping`` removes this agent's
        socket files now, not at exit, when the files there may be the new agent's).
        Connections already open are still answered while the agent waits.
        """
        if self._stop_deadline is not None:  # a second stop: the first one's deadlines hold
            return
        now = self.clock()
        self._stop_deadline = now + self.limits.stop_grace
        self._stop_waiting = conn
        for listener in (self.listener, self.http_listener):
            if listener is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._epoll.unregister(listener.fileno())
                listener.close()
        if self.on_stopping is not None:
            self.on_stopping()
        # Always set: a create answered while stopping makes one more key to delete.
        self._deletions_until = now + self.limits.stop_timeout
        deleting = self.agent.begin_stop()
        if self._memo:  # keys were dropped: so are the replies that held them
            self._drop_stale_memo(now)
        if deleting:
            log.info(
                "waiting up to %g s for %d deletion(s) on the service before exiting",
                self.limits.stop_timeout, deleting,
            )  # fmt: skip

    def _deletions_done(self) -> bool:
        """Whether the agent's deletions at stop have ended (or their time is up)."""
        until = self._deletions_until
        if until is None:
            return True
        if self.clock() >= until:
            return True
        # Requests under way end first (a remove, a login, a confirmation the stop refused):
        # each is answered and recorded in the audit log, not cut off unrecorded.
        return not self.agent.deletions_at_stop() and self._under_way == 0


def _peer_credentials(sock: socket.socket) -> tuple[int, int, int] | None:
    """The peer's pid, uid and gid (SO_PEERCRED); None, with the socket closed, if the
    kernel cannot say (the peer is already gone)."""
    try:
        pid, uid, gid = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
    except OSError:
        sock.close()
        return None
    return pid, uid, gid


CUT_LINE: Final = (
    "the connection ended in the middle of a request line, which was not run; end each "
    "request with a newline (\\n)"
)
"""The ``bad_request`` message for a line cut short by the client's end of sending."""
_LOCKED_FOLLOWING = (
    "the agent was locked, which ends following its audit log; run keyagent-ctl unlock, then "
    "keyagent-ctl log --follow again"
)


def _withheld(result: dict[str, Any]) -> Locked:
    """The error sent instead of a secret that became locked before its reply was sent."""
    key_id = result.get("key_id")
    if not isinstance(key_id, str):
        return Locked(
            "the agent was locked before this reply was sent, so the key is not in it; "
            "run keyagent-ctl unlock, then ask again"
        )
    return Locked(
        f"the agent was locked before this reply was sent, so the key is not in it; the agent "
        f"holds key {key_id}: run keyagent-ctl unlock, then fetch it with "
        f"keyagent-ctl get --key-id {key_id}"
    )


class _LoopDriver(Driver):
    """The effects driver of a :class:`Server`: work on its threads, timers on its heap."""

    def __init__(self, server: Server) -> None:
        super().__init__(server.clock)
        self.server = server

    def run_job(self, job: Job) -> None:
        self.server._run_job(job)

    def call_at(self, deadline: float, callback: Callable[[], None]) -> None:
        self.server.call_at(deadline, callback)

    def after_step(self) -> None:
        # The step may have been a forget or a lock: remembered replies hold secrets.
        if self.server._memo:
            self.server._drop_stale_memo(self.clock())
