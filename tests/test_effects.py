"""The effects driver: queues of work, and what a request is told when its queue is full."""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import Any

import pytest

from keyagent import errors
from keyagent.effects import MAX_QUEUED, Work, perform

from .fakes import FakeTime, HeldWorkDriver


def _waits_on(queue: str) -> Generator[Work, Any, Any]:
    value = yield Work(lambda: "done", queue=queue, timeout=30.0,
                       timeout_error=lambda: errors.Denied("no answer in time"))  # fmt: skip
    return value


def test_a_full_queue_refuses_more_as_busy_naming_the_queue() -> None:
    """With MAX_QUEUED works waiting on one queue, the next is refused at once as busy, with
    a message naming the queue and not the work's own timeout error; other queues still
    take work, and once the queue drains it takes work again."""
    driver = HeldWorkDriver(FakeTime())
    ended: list[tuple[Any, errors.KeyagentError | None]] = []

    def done(result: Any, error: errors.KeyagentError | None) -> None:
        ended.append((result, error))

    queue = "account\0app.conduce.com\0me@example.com"
    for _ in range(MAX_QUEUED):
        driver.start(_waits_on(queue), done)
    assert ended == []
    driver.start(_waits_on(queue), done)
    ((result, error),) = ended
    assert result is None
    assert isinstance(error, errors.Busy)
    assert error.message == (
        f"{MAX_QUEUED} requests already wait their turn for the same work (account "
        "app.conduce.com me@example.com), so this one was refused; retry once they have ended"
    )
    driver.start(_waits_on("keyring"), done)  # another queue: not refused
    assert len(ended) == 1
    while driver.held:
        driver.end(driver.held[0])
    assert ended[1:] == [("done", None)] * (MAX_QUEUED + 1)
    driver.start(_waits_on(queue), done)
    driver.end(driver.held[0])
    assert ended[-1] == ("done", None)


def test_the_agents_own_work_is_never_refused_nor_counted_against_clients() -> None:
    """Background work (the agent's deletions at stop, say) is queued however much of it
    there is, all of it is done, and it takes none of the places clients' work has: with
    100 background works waiting, clients may still queue MAX_QUEUED."""
    driver = HeldWorkDriver(FakeTime())
    ended: list[tuple[Any, errors.KeyagentError | None]] = []

    def done(result: Any, error: errors.KeyagentError | None) -> None:
        ended.append((result, error))

    background = 100
    for _ in range(background):
        driver.start_background(_waits_on("keyring"))
    for _ in range(MAX_QUEUED):
        driver.start(_waits_on("keyring"), done)
    assert ended == []
    driver.start(_waits_on("keyring"), done)
    ((_, refused),) = ended
    assert isinstance(refused, errors.Busy)
    ran = 0
    while driver.held:
        driver.end(driver.held[0])
        ran += 1
    assert ran == background + MAX_QUEUED
    assert ended[1:] == [("done", None)] * MAX_QUEUED
    for _ in range(MAX_QUEUED):  # the places were given back
        driver.start(_waits_on("keyring"), done)
    assert len(driver.held) == 1
    assert ended[-1] == ("done", None)


@pytest.mark.parametrize("raised", [SystemExit(3), asyncio.CancelledError(), GeneratorExit()])
def test_work_that_raises_past_exception_ends_as_internal_and_frees_its_queue(
    raised: BaseException,
) -> None:
    """Work raising what is not an Exception (SystemExit, asyncio's CancelledError) ends as
    internal, logged; it does not escape, which on a worker thread would end the thread and
    leave the queue's next work waiting for ever."""
    value, error = perform(Work(lambda: _raise(raised)))
    assert value is None
    assert isinstance(error, errors.Internal)
    driver = HeldWorkDriver(FakeTime())
    ended: list[tuple[Any, errors.KeyagentError | None]] = []

    def done(result: Any, error: errors.KeyagentError | None) -> None:
        ended.append((result, error))

    def failing() -> Generator[Work, Any, Any]:
        return (yield Work(lambda: _raise(raised), queue="keyring"))

    driver.start(failing(), done)
    driver.start(_waits_on("keyring"), done)
    driver.end(driver.held[0])
    driver.end(driver.held[0])
    assert [type(error) for _, error in ended] == [errors.Internal, type(None)]


def _raise(error: BaseException) -> None:
    raise error
