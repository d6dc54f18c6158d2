"""Logic that waits, written top to bottom: effect values, and the one driver that performs them.

A request handler in :mod:`keyagent.agent` that answers at once returns its result. One that
must wait — for a key derivation, a Conduce call, the OS keyring, a penalty delay — is a
generator: it *yields* a description of what it waits for, and a driver performs it and
resumes the generator with the outcome, the value sent in or the error thrown in (Twisted's
``inlineCallbacks``; the sans-IO style of h11). The handler ``return``\\ s its result or raises
a :class:`~keyagent.errors.KeyagentError`, so it reads in the order things happen::

    def process_login(self, args):
        session = self.session_for(args["host"], args["user"])
        yield Work(lambda: session.account.login(args["password"]), queue=session.queue)
        session.proved_alive(...)
        return {"host": session.host, "user": session.user, "session": True}

The effects:

* :class:`Work` — call ``fn()`` on a worker thread, never on the loop. Works with the same
  ``queue`` run one at a time, in order (one Conduce call at a time per account; the lock's
  key derivations; the OS keyring), and the next one starts only after the generator has
  taken the previous one's outcome, so it sees what that outcome changed. ``timeout``: a
  deadline counted from the yield, queued time included; ``start_at``: a moment on the
  agent's clock before which the work does not start, read when it reaches the head of its
  queue (the delay after a failed unlock).
* :class:`Sleep` — resume after some seconds; a timer on the loop, so nothing blocks.
* :class:`Late` — resume when work that passed its deadline ends after all (see below).

Deadlines. Work cannot be interrupted: a keyring call that hangs goes on in its thread. When a
``Work``'s deadline passes first, the driver throws :class:`Overdue` into the generator: a
``KeyagentError`` carrying the timeout error (its message; the client is answered with it if
the handler lets it through). A handler whose work has lasting effects catches it, starts
background work that yields ``overdue.late`` and brings the agent in line with what the work
did after all (a keyring save that completes late is deleted: its client was told it failed),
and re-raises. A ``Work`` refused because its queue is full gets its timeout error (or
``busy``) thrown in directly: nothing of it will ever run.

Background work — deleting an expired key's keyring copy, saving the lock — is just another
generator, started with no client waiting; its failures are logged.

:class:`Driver` holds the stepping (send, throw, end) and the queues and deadlines. Its
subclasses say only where work runs and how time passes: the server's runs work on worker
threads and hands results back to its loop, with timers on the loop's heap; the tests' runs
work inline and moves a fake clock to the next timer. Both step generators with this code.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import threading

from keyagent.errors import Busy, Internal, KeyagentError
from keyagent.log import get_logger

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Generator
    from typing import Any, Final

    Steps = Generator["Work | Sleep | Late", Any, Any]
    Done = Callable[[Any, KeyagentError | None], None]

log = get_logger("keyagent.effects")

MAX_QUEUED: Final = 64
"""Works that clients wait for, waiting on one queue (an account, the keyring, the lock),
before more are refused."""


class Work:
    """Call ``fn()`` on a worker thread; its value is sent in, its ``KeyagentError`` thrown in.

    ``queue``: works with the same queue run one at a time, in order. ``timeout``: seconds
    from the yield until ``timeout_error()`` is thrown in (as :class:`Overdue`) if the work
    has not ended. ``start_at``: called when the work reaches the head of its queue; the work
    starts no earlier than the monotonic time it returns.
    """

    __slots__ = ("fn", "queue", "timeout", "timeout_error", "start_at")

    def __init__(
        self,
        fn: Callable[[], Any],
        *,
        queue: str | None = None,
        timeout: float | None = None,
        timeout_error: Callable[[], KeyagentError] | None = None,
        start_at: Callable[[], float] | None = None,
    ) -> None:
        self.fn = fn
        self.queue = queue
        self.timeout = timeout
        self.timeout_error = timeout_error
        self.start_at = start_at

    def __repr__(self) -> str:  # fn may close over a secret: never shown
        return f"Work(queue={self.queue!r}, timeout={self.timeout!r})"


class Sleep:
    """Resume after ``seconds``, on the loop; other clients are served meanwhile."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __repr__(self) -> str:
        return f"Sleep({self.seconds!r})"


class Late:
    """Resume when an overdue work ends after all: its value sent in, its error thrown in."""

    __slots__ = ("job",)

    def __init__(self, job: Job) -> None:
        self.job = job

    def __repr__(self) -> str:
        return f"Late({self.job.work!r})"


class Overdue(KeyagentError):
    """Thrown into a handler whose :class:`Work` passed its deadline; the work goes on.

    ``error`` is what the client is told (the work's ``timeout_error()``), and this error's
    message is its message. ``late``, yielded by background work, waits for the work's end.
    """

    def __init__(self, error: KeyagentError, late: Late) -> None:
        super().__init__(error.message)
        self.error = error
        self.late = late

    def to_wire(self) -> dict[str, str]:
        return self.error.to_wire()


class Task:
    """One generator being driven, and who hears how it ended (``None``: nobody, background)."""

    __slots__ = ("steps", "done")

    def __init__(self, steps: Steps, done: Done | None) -> None:
        self.steps = steps
        self.done = done


class Job:
    """One yielded :class:`Work` on its way: queued, running, ended."""

    __slots__ = ("work", "task", "answered", "ended", "value", "error", "late_task")

    def __init__(self, work: Work, task: Task) -> None:
        self.work = work
        self.task = task
        self.answered = False
        """The task has had its outcome: the work's own, or the deadline's."""
        self.ended = False
        self.value: Any = None
        self.error: KeyagentError | None = None
        self.late_task: Task | None = None
        """Background work waiting (with :class:`Late`) for this overdue job's end."""


def perform(work: Work) -> tuple[Any, KeyagentError | None]:
    """Call ``work.fn`` (on whatever thread runs it): its value, or the error to throw in."""
    try:
        return work.fn(), None
    except KeyagentError as error:
        return None, error
    except BaseException as error:  # reported as internal, never raised
        if (
            isinstance(error, KeyboardInterrupt)
            and threading.current_thread() is threading.main_thread()
        ):
            raise  # inline work, where Ctrl-C means stop
        # SystemExit or asyncio.CancelledError from a library, say: on a worker thread, let
        # through, it would end the thread and leave its queue waiting for ever.
        log_internal(error)
        return None, Internal()


class Driver:
    """Drives generators: performs what they yield, resumes them with the outcome.

    Everything here runs on one thread (the server's loop). Subclasses implement
    :meth:`run_job` (start ``job.work`` and, once it has ended, call :meth:`job_ended` on
    this thread) and :meth:`call_at`; they may override :meth:`after_step`.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._queues: dict[str, collections.deque[Job]] = {}
        self._asked: dict[str, int] = {}
        """Works in each queue that a client waits for: at most :data:`MAX_QUEUED`. The
        agent's own (background) work is not counted or refused: it is bounded by what the
        agent holds (a deletion per key at stop, say), and refusing it would leave keys
        undeleted on the service."""

    # --- what a subclass provides ----------------------------------------------------------

    def run_job(self, job: Job) -> None:
        raise NotImplementedError

    def call_at(self, deadline: float, callback: Callable[[], None]) -> None:
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after each step of a generator (the server drops stale remembered replies)."""

    # --- starting and stepping -------------------------------------------------------------

    def start(self, steps: Steps, done: Done | None) -> None:
        """Drive ``steps``; ``done(result, error)`` is called once, when it has ended."""
        self.resume(Task(steps, done), None, None)

    def start_background(self, steps: Steps) -> None:
        """Drive work that no client waits for; a failure is logged."""
        self.resume(Task(steps, None), None, None)

    def resume(self, task: Task, value: Any, error: KeyagentError | None) -> None:
        """Send ``value`` (or throw ``error``) into the task, then perform what it yields next."""
        try:
            effect = task.steps.send(value) if error is None else task.steps.throw(error)
        except StopIteration as stop:
            self._end(task, stop.value, None)
        except KeyagentError as failure:
            self._end(task, None, failure)
        except Exception as failure:  # noqa: BLE001  # one bad request must not stop the agent
            log_internal(failure)
            self._end(task, None, Internal())
        else:
            self.after_step()
            self._perform(task, effect)

    def _end(self, task: Task, result: Any, error: KeyagentError | None) -> None:
        self.after_step()
        if isinstance(error, Overdue):
            error = error.error
        if task.done is not None:
            task.done(result, error)
        elif error is not None:
            log.warning("background work failed: %s", error.message)

    def _perform(self, task: Task, effect: object) -> None:
        if isinstance(effect, Work):
            self._submit(Job(effect, task))
        elif isinstance(effect, Sleep):
            self.call_at(self.clock() + effect.seconds, lambda: self.resume(task, None, None))
        elif isinstance(effect, Late):
            job = effect.job
            if job.ended:
                self.resume(task, job.value, job.error)
            else:
                job.late_task = task
        else:
            log.error("a handler yielded %s, which is no effect", type(effect).__name__)
            task.steps.close()
            self._end(task, None, Internal())

    # --- work: queues, deadlines, late ends ------------------------------------------------

    def _submit(self, job: Job) -> None:
        work = job.work
        if work.timeout is not None:
            self.call_at(self.clock() + work.timeout, lambda: self._expire(job))
        if work.queue is None:
            self._begin(job)
            return
        waiting = self._queues.setdefault(work.queue, collections.deque())
        if job.task.done is not None:  # a client waits for it
            asked = self._asked.get(work.queue, 0)
            if asked >= MAX_QUEUED:
                # Whatever blocks this queue (a keyring that never answers) must not make
                # every later request cost memory for ever: refuse instead of queueing.
                job.answered = True
                if not waiting:
                    del self._queues[work.queue]
                self.resume(job.task, None, _queue_full(work.queue))
                return
            self._asked[work.queue] = asked + 1
        waiting.append(job)
        if len(waiting) == 1:
            self._begin(job)

    def _begin(self, job: Job) -> None:
        start_at = job.work.start_at
        if start_at is not None:
            when = start_at()
            if when > self.clock():
                self.call_at(when, lambda: self.run_job(job))
                return
        self.run_job(job)

    def _expire(self, job: Job) -> None:
        """At a work's deadline: if its task still waits, throw the timeout error in."""
        timeout_error = job.work.timeout_error
        if job.answered or timeout_error is None:
            return
        job.answered = True
        self.resume(job.task, None, Overdue(timeout_error(), Late(job)))

    def job_ended(self, job: Job, value: Any, error: KeyagentError | None) -> None:
        """The work of ``job`` has ended (on this thread): resume whoever waits for it."""
        job.ended, job.value, job.error = True, value, error
        if not job.answered:
            job.answered = True
            self.resume(job.task, value, error)
        elif job.late_task is not None:
            log.warning("work finished after its deadline; bringing the agent in line")
            self.resume(job.late_task, value, error)
        # Only now start the next work of the queue: it must see this one's outcome (a failed
        # unlock sets when the next attempt may start).
        queue = job.work.queue
        if queue is not None:
            waiting = self._queues[queue]
            waiting.popleft()
            if job.task.done is not None:
                asked = self._asked[queue] - 1
                if asked:
                    self._asked[queue] = asked
                else:
                    del self._asked[queue]
            if waiting:
                self._begin(waiting[0])
            else:
                del self._queues[queue]


class InlineDriver(Driver):
    """Performs every effect at once, on the calling thread, moving a clock instead of waiting.

    For tests and tools that drive the agent without a server: :meth:`run` returns the result
    (or raises the error) of one handler's generator. Work runs inline; a timer is reached by
    calling ``advance`` with the seconds to it (a fake clock's), so nothing sleeps. Deadlines
    never pass: inline work always ends first.
    """

    def __init__(self, clock: Callable[[], float], advance: Callable[[float], None]) -> None:
        super().__init__(clock)
        self.advance = advance
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def run_job(self, job: Job) -> None:
        value, error = perform(job.work)
        self.job_ended(job, value, error)

    def call_at(self, deadline: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (deadline, next(self._seq), callback))

    def pass_time(self, seconds: float) -> None:
        """Move the clock ``seconds`` on, firing the timers due on the way, in order."""
        until = self.clock() + seconds
        while self._timers and self._timers[0][0] <= until:
            self._next_timer()
        wait = until - self.clock()
        if wait > 0:
            self.advance(wait)

    def _next_timer(self) -> None:
        deadline, _, callback = heapq.heappop(self._timers)
        wait = deadline - self.clock()
        if wait > 0:
            self.advance(wait)
        callback()

    def run(self, steps: Steps) -> Any:
        """Drive ``steps`` to its end; its result, or its error raised. Timers of background
        work it started (a retry's wait) stay set, for :meth:`pass_time` to reach."""
        ended: list[tuple[Any, KeyagentError | None]] = []
        self.start(steps, lambda result, error: ended.append((result, error)))
        while not ended and self._timers:
            self._next_timer()
        if not ended:
            raise RuntimeError("the handler waits for something that never comes")
        result, error = ended[0]
        if error is not None:
            raise error
        return result


def _queue_full(queue: str) -> Busy:
    """The refusal of work whose queue already holds :data:`MAX_QUEUED`: it says that, not
    what the work itself would have failed with (a confirmation was never shown, so it did
    not time out), and names the queue (``account\0HOST\0USER`` reads ``account HOST USER``)."""
    return Busy(
        f"{MAX_QUEUED} requests already wait their turn for the same work "
        f"({' '.join(queue.split(chr(0)))}), so this one was refused; retry once they have ended"
    )


def log_internal(error: BaseException) -> None:
    """Log an unexpected exception by type and frames only.

    The message is left out on purpose: a ``KeyError`` or ``ValueError`` raised while a
    secret was at hand may quote the secret.
    """
    import traceback  # only on this rare path: 0.7 MiB the agent does not keep otherwise

    frames = traceback.extract_tb(error.__traceback__)
    where = "; ".join(f"{frame.filename}:{frame.lineno} in {frame.name}" for frame in frames)
    log.error("internal error %s at %s", type(error).__name__, where or "?")
