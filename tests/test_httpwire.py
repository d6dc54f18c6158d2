"""keyagent.httpwire: what leaves in one write. A small answer (or request) that goes out as
two writes costs the reader two reads and, often, two wake-ups; one that is held while its
source waits stalls the reader. Each test runs over a SOCK_SEQPACKET pair, which keeps the
boundaries of writes, so a test can see how the bytes were sent, not only which."""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Iterator
from typing import cast

import h11
import pytest

from keyagent.httpwire import (
    MAX_INTERIM,
    RECV,
    BadAnswer,
    ClientGone,
    HttpConnection,
    Malformed,
    RequestHead,
    ServiceConnection,
)  # fmt: skip

REQUEST = b"GET /conduce/api/v1/user/list-teams HTTP/1.1\r\nHost: app.conduce.com\r\n\r\n"


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        theirs.setblocking(False)  # a read that finds nothing fails at once
        yield ours, theirs


def writes(sock: socket.socket) -> list[bytes]:
    """Each write that has arrived on ``sock``, in order."""
    received = []
    while True:
        try:
            received.append(sock.recv(1 << 20))
        except BlockingIOError:
            return received


def connection(sock: socket.socket) -> HttpConnection:
    return HttpConnection(sock, head_timeout=5, idle_timeout=5, io_timeout=5)


def answered(pair: tuple[socket.socket, socket.socket]) -> HttpConnection:
    """A tool's connection whose request was read: the answer is the test's to send."""
    ours, tool = pair
    tool.send(REQUEST)
    http = connection(ours)
    head = http.next_request()
    assert head is not None
    http.finish_request()
    return http


def parsed(data: bytes) -> list[object]:
    """The events a client makes of ``data``: the answer must be whole and well framed."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    events: list[object] = []
    while (event := client.next_event()) is not h11.NEED_DATA:
        events.append(event)
        if isinstance(event, h11.EndOfMessage):
            break
    return events


def test_a_small_answer_leaves_in_one_write(pair: tuple[socket.socket, socket.socket]) -> None:
    http = answered(pair)
    http.respond(200, [("Content-Length", "5")], b"teams")
    (data,) = writes(pair[1])
    events = parsed(data)
    assert [type(event) for event in events] == [h11.Response, h11.Data, h11.EndOfMessage]
    assert cast(h11.Data, events[1]).data == b"teams"


def test_a_streamed_answer_that_is_all_there_leaves_in_one_write(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    http = answered(pair)
    http.respond(200, [("Content-Type", "application/json")], iter([b"[1,", b"2]"]))
    (data,) = writes(pair[1])
    assert data.endswith(b"0\r\n\r\n")  # chunked, with its end in the same write
    assert (
        b"".join(bytes(event.data) for event in parsed(data) if isinstance(event, h11.Data))
        == b"[1,2]"
    )


def test_before_end_runs_before_the_answer_ends(pair: tuple[socket.socket, socket.socket]) -> None:
    """``before_end`` (the proxy records its audit entry there) runs once the body is all
    in hand and before its end reaches the tool: a tool that has its answer finds the entry;
    a body that fails mid-way never runs it."""
    http = answered(pair)
    seen: list[list[bytes]] = []
    http.respond(
        200, [], iter([b"[1,", b"", b"2]"]), before_end=lambda: seen.append(writes(pair[1]))
    )
    ((first,),) = seen
    assert not first.endswith(b"0\r\n\r\n")  # what went before the wait; not the end
    (rest,) = writes(pair[1])
    assert rest.endswith(b"0\r\n\r\n")

    def failing() -> Iterator[bytes]:
        yield b"x"
        raise ClientGone("the service dropped it")

    http = answered(pair)
    with pytest.raises(ClientGone):
        http.respond(200, [], failing(), before_end=lambda: seen.append([]))
    assert len(seen) == 1


def test_what_is_ready_leaves_before_the_body_waits(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """An empty chunk means the body's source is about to wait (for the service): the head
    and what came so far must be with the tool by then, or a slow answer stalls it."""
    http = answered(pair)
    seen: list[list[bytes]] = []

    def body() -> Iterator[bytes]:
        yield b""  # the service sent its head alone
        seen.append(writes(pair[1]))
        yield b"first"
        yield b""
        seen.append(writes(pair[1]))
        yield b"last"

    http.respond(200, [("Content-Length", "9")], body())
    seen.append(writes(pair[1]))
    assert [len(round) for round in seen] == [1, 1, 1]
    assert seen[0][0].startswith(b"HTTP/1.1 200 ")
    assert seen[0][0].endswith(b"\r\n\r\n")
    assert seen[1] == [b"first"]
    assert seen[2] == [b"last"]


def test_a_long_body_is_not_held_past_one_read(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A source that never waits (a fast download) still has its body sent as it goes: less
    than RECV bytes are held back, whatever the body's length."""
    http = answered(pair)
    piece = b"x" * (RECV // 4)
    held: list[int] = []  # body bytes given to respond but not yet with the tool

    def body() -> Iterator[bytes]:
        given = arrived = 0
        for _ in range(20):
            yield piece
            given += len(piece)
            for write in writes(pair[1]):
                head_end = write.find(b"\r\n\r\n")
                arrived += len(write) - (head_end + 4 if head_end >= 0 else 0)
            held.append(given - arrived)

    http.respond(200, [("Content-Length", str(20 * len(piece)))], body())
    assert max(held) < RECV
    assert held.count(0) >= 4  # sent every RECV bytes, not once at the end


def test_a_cut_body_still_sends_what_was_ready(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    http = answered(pair)

    def body() -> Iterator[bytes]:
        yield b"part"
        raise ConnectionResetError("the service dropped it")

    with pytest.raises(ConnectionResetError):
        http.respond(200, [("Content-Length", "10")], body())
    (data,) = writes(pair[1])
    assert data.endswith(b"\r\n\r\npart")  # the head and the part: cut, never wrong
    assert not http.reusable


class PlainSocket(socket.socket):
    """Stands in for a TLS socket: nothing is ever decrypted and waiting in OpenSSL."""

    def pending(self) -> int:
        return 0


def service(sock: socket.socket) -> ServiceConnection:
    plain = PlainSocket(fileno=os.dup(sock.fileno()))
    OPEN.append(plain)
    return ServiceConnection(cast(ssl.SSLSocket, plain))


OPEN: list[socket.socket] = []


@pytest.fixture(autouse=True)
def close_stand_ins() -> Iterator[None]:
    yield
    while OPEN:
        OPEN.pop().close()


def test_a_request_leaves_in_one_write_with_its_body(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, server = pair
    wire = service(ours)
    head = RequestHead.make("GET", "/api/v2/data/x", [("Host", "h")], chunked=False)
    wire.send_head(head, hold=True)
    wire.end_request()
    (data,) = writes(server)
    assert data == b"GET /api/v2/data/x HTTP/1.1\r\nHost: h\r\n\r\n"

    wire = service(ours)  # a new connection's state: the answer is not the subject here
    put = RequestHead.make("PUT", "/api/v2/data/x", [("Host", "h"), ("Content-Length", "4")],
                           chunked=False)  # fmt: skip
    wire.send_head(put, hold=True)
    wire.send_body(b"body")
    wire.end_request()
    (data,) = writes(server)
    assert data.startswith(b"PUT ")
    assert data.endswith(b"\r\n\r\nbody")


def test_an_answer_body_marks_each_wait_with_an_empty_chunk(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, server = pair
    wire = service(ours)
    wire.send_head(RequestHead.make("GET", "/x", [("Host", "h")], chunked=False), hold=True)
    wire.end_request()
    writes(server)
    # All of it at once: no wait, no empty chunk.
    server.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert wire.read_head() == (200, [("Content-Length", "2")])
    assert list(wire.read_body()) == [b"ok"]

    wire.next_cycle()
    wire.send_head(RequestHead.make("GET", "/x", [("Host", "h")], chunked=False), hold=True)
    wire.end_request()
    writes(server)
    server.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
    assert wire.read_head()[0] == 200
    body = wire.read_body()
    assert next(body) == b""  # nothing of the body here yet: the reader may send its part
    server.send(b"late")
    assert list(body) == [b"late"]


def test_interim_answers_are_passed_over_but_not_without_end(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """1xx answers before the final one are skipped; a service that sends them without end
    is refused rather than followed for as long as it keeps on."""
    ours, server = pair
    wire = service(ours)
    wire.send_head(RequestHead.make("GET", "/x", [("Host", "h")], chunked=False), hold=True)
    wire.end_request()
    writes(server)
    server.send(b"HTTP/1.1 102 Processing\r\n\r\n" * MAX_INTERIM)
    server.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert wire.read_head() == (200, [("Content-Length", "2")])

    endless_ours, endless = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with endless_ours, endless:
        endless.setblocking(False)
        wire = service(endless_ours)
        wire.send_head(RequestHead.make("GET", "/x", [("Host", "h")], chunked=False), hold=True)
        wire.end_request()
        writes(endless)
        endless.sendall(b"HTTP/1.1 102 Processing\r\n\r\n" * (MAX_INTERIM + 1))
        with pytest.raises(BadAnswer, match="interim"):
            wire.read_head()


def test_a_streamed_bodys_head_leaves_at_once(pair: tuple[socket.socket, socket.socket]) -> None:
    """Without the body in hand, the head (and the credential checked with it) is not held
    for a first chunk that may be long in coming."""
    ours, server = pair
    wire = service(ours)
    head = RequestHead.make("PUT", "/api/v2/data/x", [("Host", "h")], chunked=True)
    wire.send_head(head, hold=False)
    (data,) = writes(server)
    assert data.endswith(b"Transfer-Encoding: chunked\r\n\r\n")
    wire.send_body(b"late")
    wire.end_request()
    assert b"".join(writes(server)) == b"4\r\nlate\r\n0\r\n\r\n"


class StalledTool:
    """A tool's socket that sent one request and then stopped reading: each write fails
    with a timeout, as a full socket buffer would make it (after sending part, perhaps)."""

    def __init__(self) -> None:
        self.requests = [REQUEST]
        self.writes: list[bytes] = []

    def settimeout(self, seconds: float) -> None:
        pass

    def recv(self, size: int) -> bytes:
        return self.requests.pop(0) if self.requests else b""

    def sendall(self, data: bytes) -> None:
        self.writes.append(data)
        raise TimeoutError


def test_bytes_a_write_failed_on_are_never_written_again() -> None:
    """A write that timed out may have sent part of its bytes: writing them again would
    give the tool a whole body of the right length and the wrong content."""
    tool = StalledTool()
    http = connection(cast(socket.socket, tool))
    assert http.next_request() is not None
    http.finish_request()

    def body() -> Iterator[bytes]:
        yield b"x" * RECV  # enough to be written before the end
        yield b"rest"

    with pytest.raises(ClientGone):
        http.respond(200, [("Content-Length", str(RECV + 4))], body())
    assert len(tool.writes) == 1


def test_empty_lines_before_a_request_line_are_ignored(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """CRLFs before a request line (some clients send one after a body) are skipped, as RFC
    9112 says a server should, up to a bound; the request after them is read."""
    ours, tool = pair
    http = connection(ours)
    tool.send(b"\r\n")
    tool.send(b"\r\n\n" + REQUEST)
    head = http.next_request()
    assert head is not None
    assert head.target == "/conduce/api/v1/user/list-teams"
    http.finish_request()
    http.respond(204, [])
    tool.send(b"\r\n" * 40 + REQUEST)  # past the bound: no request line, a 400
    with pytest.raises(Malformed):
        http.next_request()


def test_an_empty_line_after_a_body_is_not_the_next_request(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A CRLF sent after a request body, in the same write as the body and the next request
    (where RFC 9112 says clients send it), is skipped too: the next request is read."""
    ours, tool = pair
    http = connection(ours)
    post = b"POST /api/v2/data/x HTTP/1.1\r\nHost: app.conduce.com\r\nContent-Length: 2\r\n\r\n"
    tool.send(post + b"ab\r\n" + REQUEST)
    first = http.next_request()
    assert first is not None
    assert b"".join(http.body()) == b"ab"
    http.respond(204, [])
    second = http.next_request()
    assert second is not None
    assert second.target == "/conduce/api/v1/user/list-teams"


def test_an_error_to_a_head_has_no_body_and_the_next_answer_has_its_own(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """The agent's own answer to a HEAD is its head alone (Content-Length that of the body a
    GET would get); the next request on the connection, a GET, gets its body again."""
    ours, tool = pair
    http = connection(ours)
    tool.send(b"HEAD /x HTTP/1.1\r\nHost: app.conduce.com\r\n\r\n" + REQUEST)
    assert http.next_request() is not None
    http.finish_request()
    http.respond(403, [("Content-Length", "9")], b"forbidden")
    assert http.next_request() is not None
    http.finish_request()
    http.respond(403, [("Content-Length", "9")], b"forbidden")
    answers = b"".join(writes(tool))
    assert answers.count(b"HTTP/1.1 403 ") == 2
    assert answers.endswith(b"\r\n\r\nforbidden")
    assert answers.count(b"forbidden") == 1
