"""The HTTP socket's upstream side (keyagent.forward): h11 over pooled TLS connections, against
the shipped HTTPS emulator and, for answers no real service sends, a raw TLS server; and a
keyagent.proxy.Proxy over it with a stand-in lender, for what happens at a worker's stop."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import re
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from keyagent import forward
from keyagent.errors import (
    Denied,
    KeyagentError,
    RemoteError,
    RemoteUnreachable,
    Timeout,
    TLSError,
)
from keyagent.forward import Answer, Upstream, split_host
from keyagent.grant import Grant
from keyagent.httpwire import ClientGone
from keyagent.proxy import Proxy
from keyagent.proxy_worker import BOARD_SLOT, FlightBoard, read_board
from keyagent.testing.emulator import ConduceEmulator, Fault
from keyagent.tls import HttpSettings

from .fakes import FakeTime

USER = "ada@example.com"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def emulator() -> Iterator[ConduceEmulator]:
    with ConduceEmulator() as emu:
        emu.add_user(USER, "pw")
        yield emu


@pytest.fixture
def key(emulator: ConduceEmulator) -> str:
    return emulator.add_key(USER, "forward tests")


OPENED: list[Upstream] = []


@pytest.fixture(autouse=True)
def close_upstreams() -> Iterator[None]:
    """Each test's pools are closed after it, pooled connections and all."""
    yield
    while OPENED:
        OPENED.pop().close()


def opened(settings: HttpSettings) -> Upstream:
    upstream = Upstream(settings)
    OPENED.append(upstream)
    return upstream


def upstream_for(emulator: ConduceEmulator, **settings: float) -> Upstream:
    return opened(HttpSettings(verify=emulator.ca_path, **settings))  # type: ignore[arg-type]


def call(
    upstream: Upstream,
    host: str,
    key: str,
    target: str,
    *,
    method: str = "GET",
    body: bytes = b"",
) -> tuple[int, bytes]:
    """One whole exchange: status and body, the connection given back."""
    headers = [("Host", host), ("Authorization", f"Bearer {key}")]
    if body:
        headers.append(("Content-Length", str(len(body))))
    answer = upstream.send(method, host, target, headers, body, chunked=False)
    return answer.status, read_all(answer, host)


def read_all(answer: Answer, host: str) -> bytes:
    data = b"".join(answer.body(host))
    answer.finish(complete=True)
    return data


def test_split_host() -> None:
    assert split_host("app.conduce.com") == ("app.conduce.com", 443)
    assert split_host("127.0.0.1:8443") == ("127.0.0.1", 8443)
    assert split_host("[::1]:8443") == ("::1", 8443)
    assert split_host("[::1]") == ("::1", 443)


def test_the_target_goes_out_exactly_as_checked(emulator: ConduceEmulator, key: str) -> None:
    """No normalisation between what keyagent.proxy.route checked and the wire: doubled
    slashes, escapes and the query string arrive as the tool wrote them."""
    upstream = upstream_for(emulator)
    target = "//api/v2/data/echo/a%2Fb%2e?x=1&y=%20"
    status, body = call(upstream, emulator.host, key, target)
    assert status == 200
    echoed = json.loads(body)
    assert (echoed["path"], echoed["query"]) == ("//api/v2/data/echo/a%2Fb%2e", "x=1&y=%20")


def test_bodies_and_head_requests(emulator: ConduceEmulator, key: str) -> None:
    upstream = upstream_for(emulator)
    payload = b"x" * 100_000
    status, body = call(
        upstream, emulator.host, key, "/api/v2/data/echo", method="PUT", body=payload
    )
    assert status == 200
    assert json.loads(body)["body_sha256"] == hashlib.sha256(payload).hexdigest()
    headers = [("Host", emulator.host), ("Authorization", f"Bearer {key}")]
    chunks = iter([b"a" * 70_000, b"", b"b" * 10])
    answer = upstream.send(
        "POST", emulator.host, "/api/v2/data/upload", headers, chunks, chunked=True
    )
    assert json.loads(read_all(answer, emulator.host))["length"] == 70_010
    status, body = call(upstream, emulator.host, key, "/api/v2/data/blob/1000", method="HEAD")
    assert (status, body) == (200, b"")
    # The same pooled connection still frames the next answer right after a HEAD.
    status, body = call(upstream, emulator.host, key, "/api/v2/data/blob/1000")
    assert (status, len(body)) == (200, 1000)


def test_a_pooled_connection_closed_by_the_service_is_replaced(
    emulator: ConduceEmulator, key: str
) -> None:
    """A GET on a pooled connection the service drops without an answer goes once more, on
    a new connection; a POST does not (the service may have acted on it)."""
    upstream = upstream_for(emulator)
    host = emulator.host
    assert call(upstream, host, key, "/api/v2/data/echo")[0] == 200  # pools a connection
    emulator.inject(Fault.reset(), path="/api/v2/data/echo", count=1)
    assert call(upstream, host, key, "/api/v2/data/echo")[0] == 200
    assert [r.status for r in emulator.requests[-2:]] == [None, 200]

    emulator.inject(Fault.reset(), path="/api/v2/data/echo", count=1)
    with pytest.raises(RemoteUnreachable, match="before answering"):
        call(upstream, host, key, "/api/v2/data/echo", method="POST", body=b"{}")
    assert emulator.requests[-1].status is None  # not sent again


def test_a_new_connection_is_never_sent_again(emulator: ConduceEmulator, key: str) -> None:
    upstream = upstream_for(emulator)
    emulator.inject(Fault.reset(), path="/api/v2/data/echo", count=1)
    with pytest.raises(RemoteUnreachable):
        call(upstream, emulator.host, key, "/api/v2/data/echo")
    assert len(emulator.requests) == 1


def test_a_hung_service_times_out(emulator: ConduceEmulator, key: str) -> None:
    upstream = upstream_for(emulator, read_timeout=0.5)
    emulator.inject(Fault.hang(), path="/api/v2/data/echo", count=1)
    try:
        with pytest.raises(Timeout, match=r"did not answer within 0\.5s"):
            call(upstream, emulator.host, key, "/api/v2/data/echo")
    finally:
        emulator.release()


def test_an_untrusted_certificate_and_an_unreachable_host(
    emulator: ConduceEmulator, key: str
) -> None:
    other_ca = trustme.CA().cert_pem.bytes().decode()
    untrusting = opened(HttpSettings(verify=True, ca_certificates=other_ca))
    with pytest.raises(TLSError, match="could not be verified"):
        call(untrusting, emulator.host, key, "/api/v2/data/echo")
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        host = f"127.0.0.1:{unused.getsockname()[1]}"
        with pytest.raises(RemoteUnreachable, match="could not be reached"):
            call(upstream_for(emulator), host, key, "/api/v2/data/echo")


# --- answers the emulator never sends: a scripted TLS server -------------------------------


class Scripted:
    """A TLS server on loopback that answers each request head with ``answer(head)``; it
    closes a connection after each answer if ``close_after``. With ``early``, it answers
    as soon as the head is in, then reads and drops what comes until the client stops (a
    front end's lingering close). Counts the connections it accepted, and sets ``closed``
    each time it closes one."""

    def __init__(
        self, answer: Callable[[bytes], bytes], *, close_after: bool, early: bool = False
    ) -> None:
        ca = trustme.CA()
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(self.context)
        self.settings = HttpSettings(verify=True, ca_certificates=ca.cert_pem.bytes().decode())
        self.answer = answer
        self.close_after = close_after
        self.early = early
        self.accepted = 0
        self.closed = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            thread = threading.Thread(target=self._serve, args=(raw,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, raw: socket.socket) -> None:
        with contextlib.suppress(OSError), self.context.wrap_socket(raw, server_side=True) as conn:
            buffered = b""
            while True:
                while b"\r\n\r\n" not in buffered:
                    data = conn.recv(4096)
                    if not data:
                        return
                    buffered += data
                head, _, buffered = buffered.partition(b"\r\n\r\n")
                if self.early:
                    conn.sendall(self.answer(head))
                    while conn.recv(65536):
                        pass
                    break
                # The body is read before answering: closing with it unread would reset
                # the connection, and the client could lose the answer.
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                while length and len(buffered) < int(length[1]):
                    data = conn.recv(4096)
                    if not data:
                        return
                    buffered += data
                buffered = buffered[int(length[1]) :] if length else buffered
                conn.sendall(self.answer(head))
                if self.close_after:
                    break
        self.closed.set()

    def stop(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept(), which close() alone does not
        self.listener.close()
        for thread in self._threads[:1]:
            thread.join(5)
            assert not thread.is_alive()


@pytest.fixture
def scripted() -> Iterator[Callable[..., Scripted]]:
    servers: list[Scripted] = []

    def start(
        answer: bytes | Callable[[bytes], bytes], *, close_after: bool = False, early: bool = False
    ) -> Scripted:
        server = Scripted(
            answer if callable(answer) else (lambda head: answer),
            close_after=close_after,
            early=early,
        )
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_an_answer_that_is_not_http_is_a_remote_error(scripted: Callable[..., Scripted]) -> None:
    server = scripted(b"SSH-2.0-OpenSSH_9.2\r\n\r\n", close_after=True)
    with pytest.raises(RemoteError, match=r"not HTTP/1\.1"):
        call(opened(server.settings), server.host, "k", "/api/v2/data/echo")


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n",
            "both Content-Length and Transfer-Encoding",
        ),
        (
            b"HTTP/1.1 200 OK\r\n" + b"X-Filler: yes\r\n" * 5000 + b"\r\n",
            "an answer head larger than 64 KiB",
        ),
    ],
    ids=["two-framings", "huge-head"],
)
def test_an_answer_framed_two_ways_or_too_large_is_a_remote_error(
    scripted: Callable[..., Scripted], answer: bytes, problem: str
) -> None:
    """An answer with both framings (the shape of response splitting, which RFC 9112 says
    to treat as an error) and one whose head is too large are remote errors that say so."""
    server = scripted(answer, close_after=True)
    with pytest.raises(RemoteError, match=problem):
        call(opened(server.settings), server.host, "k", "/api/v2/data/echo")


def test_an_answer_cut_short_is_unreachable_mid_answer(scripted: Callable[..., Scripted]) -> None:
    server = scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this", close_after=True)
    upstream = opened(server.settings)
    host = server.host
    answer = upstream.send("GET", host, "/api/v2/data/x", [("Host", host)], b"", chunked=False)
    assert answer.status == 200
    with pytest.raises(RemoteUnreachable, match="mid-answer"):
        b"".join(answer.body(host))
    answer.finish(complete=False)


def test_an_answer_ended_by_closing_is_passed_on_whole(scripted: Callable[..., Scripted]) -> None:
    """No Content-Length and no chunks: the body runs to the close, and the next request
    goes on a new connection."""
    server = scripted(b"HTTP/1.1 200 OK\r\nX-Kind: raw\r\n\r\nto the end", close_after=True)
    upstream = opened(server.settings)
    for _ in range(2):
        assert call(upstream, server.host, "k", "/api/v2/data/x") == (200, b"to the end")
    assert server.accepted == 2


def test_a_connection_is_kept_between_answers_and_after_a_head(
    scripted: Callable[..., Scripted],
) -> None:
    """Answers framed by Content-Length leave the connection in the pool; a HEAD's answer
    has no body whatever its Content-Length says, and the next answer is read right."""

    def answer(head: bytes) -> bytes:
        body = b"" if head.startswith(b"HEAD ") else b"0123456789"
        return b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n" + body

    server = scripted(answer)
    upstream = opened(server.settings)
    assert call(upstream, server.host, "k", "/api/v2/x", method="HEAD") == (200, b"")
    assert call(upstream, server.host, "k", "/api/v2/x") == (200, b"0123456789")
    assert call(upstream, server.host, "k", "/api/v2/x", method="HEAD") == (200, b"")
    assert server.accepted == 1


def test_bytes_past_an_answers_end_never_answer_the_next_request(
    scripted: Callable[..., Scripted],
) -> None:
    """A service that sends more than its answer's framing says (here a whole forged second
    answer) must not have it taken for the answer to the next request, another tool's
    perhaps: that connection is closed, not pooled."""
    forged = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nforge"
    server = scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + forged)
    upstream = opened(server.settings)
    for _ in range(3):
        assert call(upstream, server.host, "k", "/api/v2/x") == (200, b"ok")
    assert server.accepted == 3


def test_an_early_answer_ends_the_upload(scripted: Callable[..., Scripted]) -> None:
    """A service that answers before the body's end (a 413, say) is sent no more of it:
    the answer comes back at once, not after the whole upload, and the connection, its
    request unfinished, is not used again."""
    server = scripted(
        b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nbig!", early=True
    )
    upstream = opened(server.settings)
    host, chunk, chunks = server.host, b"x" * 65536, 16384  # 1 GiB, were it all sent
    pulled = 0

    def body() -> Iterator[bytes]:
        nonlocal pulled
        for _ in range(chunks):
            pulled += 1
            yield chunk

    headers = [("Host", host), ("Content-Length", str(chunks * len(chunk)))]
    answer = upstream.send("PUT", host, "/api/v2/data/upload", headers, body(), chunked=False)
    assert (answer.status, read_all(answer, host)) == (413, b"big!")
    assert pulled < chunks // 2, "the upload went on after the answer"
    assert server.accepted == 1
    assert call(upstream, host, "k", "/api/v2/data/x")[0] == 413
    assert server.accepted == 2


def test_an_early_success_lets_the_upload_go_on(scripted: Callable[..., Scripted]) -> None:
    """An early 2xx is no refusal (as for curl): the whole body is sent, then the answer
    passed on."""
    server = scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", early=True)
    host, chunks = server.host, 64
    pulled = 0

    def body() -> Iterator[bytes]:
        nonlocal pulled
        for _ in range(chunks):
            pulled += 1
            yield b"x" * 65536

    headers = [("Host", host), ("Content-Length", str(chunks * 65536))]
    answer = opened(server.settings).send(
        "PUT", host, "/api/v2/data/upload", headers, body(), chunked=False
    )
    assert (answer.status, b"".join(answer.body(host)), pulled) == (200, b"ok", chunks)
    answer.finish(complete=False)


def test_a_connection_the_service_closed_while_idle_is_not_used(
    scripted: Callable[..., Scripted],
) -> None:
    """The service closes after answering: the next request, even a POST (never sent
    twice), goes on a new connection, not into the closed one."""
    server = scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", close_after=True)
    upstream = opened(server.settings)
    assert call(upstream, server.host, "k", "/api/v2/x") == (200, b"ok")
    assert server.closed.wait(5)
    assert call(upstream, server.host, "k", "/api/v2/x", method="POST", body=b"{}") == (200, b"ok")
    assert server.accepted == 2


def test_a_connection_idle_too_long_is_not_used(scripted: Callable[..., Scripted]) -> None:
    """A pooled connection idle up to POOL_IDLE seconds is used again; one idle longer is
    not (a front end may have dropped it by then), and a new one is made."""
    server = scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    clock = FakeTime()
    upstream = Upstream(server.settings, clock=clock.clock().monotonic)
    OPENED.append(upstream)
    call(upstream, server.host, "k", "/api/v2/x")
    clock.advance(forward.POOL_IDLE)
    call(upstream, server.host, "k", "/api/v2/x")
    assert server.accepted == 1
    clock.advance(forward.POOL_IDLE + 0.001)
    call(upstream, server.host, "k", "/api/v2/x")
    assert server.accepted == 2


def test_a_silent_server_is_a_handshake_timeout() -> None:
    """A host that accepts TCP and never speaks TLS: a timeout within connect_timeout."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        host = f"127.0.0.1:{silent.getsockname()[1]}"
        upstream = opened(HttpSettings(connect_timeout=0.3))
        with pytest.raises(Timeout, match=r"TLS handshake within 0\.3s"):
            call(upstream, host, "k", "/api/v2/x")


def test_a_certificate_for_another_host_is_refused(emulator: ConduceEmulator, key: str) -> None:
    emulator.inject(Fault.wrong_certificate("wrong_host"))
    with pytest.raises(TLSError, match="could not be verified"):
        call(upstream_for(emulator), emulator.host, key, "/api/v2/data/echo")


def test_the_tool_going_away_mid_upload_passes_through(emulator: ConduceEmulator, key: str) -> None:
    """ClientGone from the tool's body is the tool's failure, not the service's: it reaches
    the proxy as it is (which then answers nobody), and the upstream connection is closed."""

    def body() -> Iterator[bytes]:
        yield b"x" * 1000
        raise ClientGone("closed mid-body")

    headers = [("Host", emulator.host), ("Authorization", f"Bearer {key}")]
    upstream = upstream_for(emulator)
    with pytest.raises(ClientGone):
        upstream.send("PUT", emulator.host, "/api/v2/data/upload", headers, body(), chunked=True)


def test_a_streamed_body_is_never_sent_twice(emulator: ConduceEmulator, key: str) -> None:
    """A PUT is idempotent, but a streamed body is not in hand: on a pooled connection that
    fails before answering, the tool gets remote_unreachable and the service one request."""
    upstream = upstream_for(emulator)
    assert call(upstream, emulator.host, key, "/api/v2/data/echo")[0] == 200  # pools it
    emulator.clear_requests()
    emulator.inject(Fault.reset(), path="/api/v2/data/echo", count=1)
    headers = [("Host", emulator.host), ("Authorization", f"Bearer {key}")]
    with pytest.raises(RemoteUnreachable, match="before answering"):
        upstream.send(
            "PUT", emulator.host, "/api/v2/data/echo", headers, iter([b"a" * 100]), chunked=True
        )
    assert [record.status for record in emulator.requests] == [None]


def test_a_worker_loads_neither_requests_nor_urllib3() -> None:
    """What an HTTP worker imports (keyagent.proxy_worker does so before it says ready)
    leaves requests and urllib3 out: smaller, faster to start, one HTTP library."""
    script = (
        "import sys, keyagent.proxy_worker, keyagent.forward, keyagent.proxy, keyagent.httpwire\n"
        "print(sorted(m for m in ('requests', 'urllib3') if m in sys.modules))"
    )
    output = subprocess.run(
        [sys.executable, "-I", "-c", script],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout  # fmt: skip
    assert output.strip() == "[]"


def test_a_credential_http_cannot_carry_is_refused_without_showing_it(
    emulator: ConduceEmulator,
) -> None:
    """A session cookie the service set that is not a valid header value (tools' headers are
    checked on the way in, so only the agent's own can be) gets remote_error naming the way
    out, and neither the message nor the request shows the value; nothing is sent."""
    secret = "s3cr3t-cookie-value"
    headers = [("Host", emulator.host), ("Cookie", f"session={secret}\r\nX-Injected: 1")]
    with pytest.raises(RemoteError, match="log in again") as caught:
        upstream_for(emulator).send(
            "GET", emulator.host, "/api/v2/data/echo", headers, b"", chunked=False
        )
    assert secret not in str(caught.value)
    assert emulator.requests == []


class KeyLender:
    """A :class:`keyagent.proxy.Lender` that lends one key and keeps the audit entries."""

    def __init__(self, host: str, key: str) -> None:
        self.grant = Grant(
            host, USER, header="Authorization", value=f"Bearer {key}", digest="d" * 64,
            key_id="d" * 12, token=0,
        )  # fmt: skip
        self.entries: list[tuple[str, dict[str, Any]]] = []

    def authorize(self, conn: int, host: str, user: str | None, key_id: str | None) -> Grant:
        return self.grant

    def session_refused(
        self, conn: int, host: str, user: str, key_id: str | None, *, retry: bool = True
    ) -> Grant | None:
        return None

    def key_refused(
        self, conn: int, host: str, user: str, refused: list[str], *, retry: bool = True
    ) -> Grant | None:
        return None

    def still_good(self, grant: Grant) -> bool:
        return True

    def audit(self, conn: int, outcome: str, **fields: Any) -> None:
        self.entries.append((outcome, fields))


class RevokedKeyLender(KeyLender):
    """Lends a key the service does not know (a revoked one) first. After its 401, lends
    ``next_key`` (a grant already stale, if ``stale``), or raises ``refusal``."""

    def __init__(
        self, host: str, next_key: str, *, refusal: KeyagentError | None = None, stale: bool
    ) -> None:
        super().__init__(host, "revoked-key-unknown-to-the-service-0001")
        self.next = Grant(
            host, USER, header="Authorization", value=f"Bearer {next_key}", digest="e" * 64,
            key_id="e" * 12, token=1,
        )  # fmt: skip
        self.refusal = refusal
        self.stale = stale
        self.asked: list[list[str]] = []
        self.checked: list[list[str]] = []
        """Keys it was asked only to check (no retry: nothing is lent)."""

    def key_refused(
        self, conn: int, host: str, user: str, refused: list[str], *, retry: bool = True
    ) -> Grant | None:
        if not retry:
            self.checked.append(list(refused))
            return None
        self.asked.append(list(refused))
        if self.refusal is not None:
            raise self.refusal
        if self.stale:
            return Grant(
                host, USER, header="Authorization", value="Bearer stale", digest="f" * 64,
                token=0,
            )  # fmt: skip
        return self.next

    def still_good(self, grant: Grant) -> bool:
        return grant.token == 1 or grant is self.grant


def one_request(proxy: Proxy, host: str, target: str, conn: int = 7, extra: str = "") -> bytes:
    """``target`` asked of ``proxy`` on a connection of its own (numbered ``conn``), with
    ``extra`` header lines, and everything the tool gets back."""
    ours, tool = socket.socketpair()
    serving = threading.Thread(target=proxy.serve, args=(ours, conn))
    serving.start()
    with tool:
        tool.sendall(
            f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode()
        )
        answer = b"".join(iter(lambda: tool.recv(65536), b""))
    serving.join(10)
    assert not serving.is_alive(), "the proxy went on serving a closed connection"
    return answer


def proxied(lender: KeyLender, emulator: ConduceEmulator, target: str) -> bytes:
    """One request through a proxy of its own with ``lender``: what the tool gets back."""
    proxy = Proxy(lender, HttpSettings(verify=emulator.ca_path), head_timeout=5, idle_timeout=5)
    try:
        return one_request(proxy, emulator.host, target)
    finally:
        proxy.upstream.close()


@pytest.mark.parametrize("stale", [False, True])
def test_each_try_after_a_401_is_an_entry_naming_its_key(
    emulator: ConduceEmulator, key: str, stale: bool
) -> None:
    """A revoked key's 401, then the next key's answer: two entries, each naming the key it
    used. A grant that went stale while it was lent (the agent locked, say) is not sent:
    the tool gets the 401."""
    lender = RevokedKeyLender(emulator.host, key, stale=stale)
    answer = proxied(lender, emulator, "/conduce/api/v1/user/list-teams")
    assert lender.asked == [["d" * 64]]
    tries = [("ok", 401, "d" * 12)] + ([] if stale else [("ok", 200, "e" * 12)])
    assert [(outcome, e["status"], e["key_id"]) for outcome, e in lender.entries] == tries
    assert [r.status for r in emulator.requests] == [status for _, status, _ in tries]
    assert answer.startswith(f"HTTP/1.1 {tries[-1][1]} ".encode())


def test_a_401_that_cannot_be_tried_again_still_has_the_key_checked(
    emulator: ConduceEmulator, key: str
) -> None:
    """A streamed upload, or a request naming its key, that the service answers 401: the
    tool gets the 401 as it is (the body is gone; a named key is never swapped), and the
    agent is asked to check the key, lending nothing, so the next request gains from it."""
    lender = RevokedKeyLender(emulator.host, key, stale=False)
    proxy = Proxy(lender, HttpSettings(verify=emulator.ca_path), head_timeout=5, idle_timeout=5)
    try:
        ours, tool = socket.socketpair()
        serving = threading.Thread(target=proxy.serve, args=(ours, 7))
        serving.start()
        with tool:
            tool.sendall(
                f"POST /api/v2/data/upload HTTP/1.1\r\nHost: {emulator.host}\r\n"
                "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                "5\r\nhello\r\n0\r\n\r\n".encode()
            )
            streamed = b"".join(iter(lambda: tool.recv(65536), b""))
        serving.join(10)
        assert not serving.is_alive()
        named = one_request(
            proxy, emulator.host, "/conduce/api/v1/user/list-teams",
            extra="X-Keyagent-Key-Id: dddddddd\r\n",
        )  # fmt: skip
    finally:
        proxy.upstream.close()
    assert streamed.startswith(b"HTTP/1.1 401 ")
    assert named.startswith(b"HTTP/1.1 401 ")
    assert lender.checked == [["d" * 64], ["d" * 64]]
    assert lender.asked == []  # nothing else was lent


def test_a_retry_refused_by_the_next_keys_rules_names_that_key(
    emulator: ConduceEmulator, key: str
) -> None:
    """After a revoked key's 401, the next key's rules refuse this program: the tool gets
    the refusal; the try made is one entry (its key, its 401), the refusal another, naming
    the key refused."""
    refusal = Denied("key eeee may be used only by /usr/bin/curl")
    refusal.subject = ("e" * 12, emulator.host, "someone@example.com")
    lender = RevokedKeyLender(emulator.host, key, refusal=refusal, stale=False)
    answer = proxied(lender, emulator, "/conduce/api/v1/user/list-teams")
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert b"X-Keyagent-Error: denied" in answer
    assert [(outcome, e["status"], e["key_id"], e["user"]) for outcome, e in lender.entries] == [
        ("ok", 401, "d" * 12, USER), ("denied", None, "e" * 12, "someone@example.com")
    ]  # fmt: skip


ENDLESS = f"/api/v2/data/blob/{1 << 40}"


def start_endless(proxy: Proxy, host: str) -> tuple[socket.socket, threading.Thread]:
    """A tool's connection 7 to ``proxy``, whose endless download has begun; the tool's
    socket and the thread serving it."""
    ours, tool = socket.socketpair()
    serving = threading.Thread(target=proxy.serve, args=(ours, 7))
    serving.start()
    tool.sendall(f"GET {ENDLESS}?q=1 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert tool.recv(65536).startswith(b"HTTP/1.1 200 ")
    return tool, serving


def test_a_request_is_on_the_board_while_under_way(emulator: ConduceEmulator, key: str) -> None:
    """A request under way is on the worker's flight board, as the cut entry the agent
    would record if the worker died; its slot is emptied once its own entry is sent."""
    lender = KeyLender(emulator.host, key)
    memory = mmap.mmap(-1, 2 * BOARD_SLOT)
    proxy = Proxy(
        lender, HttpSettings(verify=emulator.ca_path), head_timeout=5, idle_timeout=5,
        board=FlightBoard(memory),
    )  # fmt: skip
    tool, serving = start_endless(proxy, emulator.host)
    try:
        with tool:
            (posted,) = read_board(memory)
            assert posted == {  # the service's answer under way: its status is there too
                "conn": 7, "method": "GET", "path": ENDLESS, "status": 200,
                "host": emulator.host, "key_id": lender.grant.key_id, "user": USER,
            }  # fmt: skip
        serving.join(10)  # the tool left: the request ends, cut
        assert not serving.is_alive()
    finally:
        proxy.upstream.close()
    assert [outcome for outcome, _ in lender.entries] == ["cut"]
    assert list(read_board(memory)) == []


def test_a_full_board_leaves_a_request_off_it(caplog: pytest.LogCaptureFixture) -> None:
    """A request finds no free slot (more requests than the board has): it goes on, off the
    board, and the worker says so once; a slot emptied serves the next. Text is kept as
    UTF-8: the longest entry the audit fields allow fits."""
    board = FlightBoard(mmap.mmap(-1, BOARD_SLOT))
    with caplog.at_level(logging.WARNING, logger="keyagent.proxy"):
        assert (board.post({"conn": 1}), board.post({"conn": 2})) == (0, None)
        board.clear(0)
        longest = {"conn": 3, "path": '"' * 521, "user": "\U0001f511" * 254, "host": "h" * 255}
        assert board.post(longest) == 0
        assert board.post({"conn": 4}) is None
    assert len([r for r in caplog.records if "not on its flight board" in r.getMessage()]) == 1
    (kept,) = read_board(board.memory)
    assert kept == longest


def test_a_replaced_entry_never_leaves_the_board_empty(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An entry replaced (the service's status now known) goes to a free slot before its
    old one is emptied; with no free slot the old entry stands, and nothing is said."""
    board = FlightBoard(mmap.mmap(-1, 2 * BOARD_SLOT))
    first = board.post({"conn": 1, "status": None})
    assert first is not None
    second = board.replace(first, {"conn": 1, "status": 200})
    assert second != first
    assert list(read_board(board.memory)) == [{"conn": 1, "status": 200}]
    board.post({"conn": 2})  # the board is full now
    with caplog.at_level(logging.WARNING, logger="keyagent.proxy"):
        assert board.replace(second, {"conn": 1, "status": 201}) == second
    assert {"conn": 1, "status": 200} in list(read_board(board.memory))
    assert caplog.records == []


def test_a_request_cut_at_stop_is_recorded_once(emulator: ConduceEmulator, key: str) -> None:
    """cut_all records each request under way; when one of them ends afterwards (its tool
    gone with the worker), it is not recorded a second time; and no request leaves after
    it."""
    lender = KeyLender(emulator.host, key)
    proxy = Proxy(lender, HttpSettings(verify=emulator.ca_path), head_timeout=5, idle_timeout=5)
    tool, serving = start_endless(proxy, emulator.host)
    try:
        with tool:
            proxy.cut_all()
            assert [outcome for outcome, _ in lender.entries] == ["cut"]
        serving.join(10)
        assert not serving.is_alive()
        # And nothing leaves after it, as nothing could be recorded: 503 busy.
        answer = one_request(proxy, emulator.host, "/conduce/api/v1/user/list-teams", conn=8)
    finally:
        proxy.upstream.close()
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert b"X-Keyagent-Error: busy" in answer
    ((outcome, fields), (refused, _)) = lender.entries
    assert (outcome, fields["status"]) == ("cut", 200)
    assert fields["key_id"] == lender.grant.key_id
    assert refused == "busy"
    assert len(emulator.requests) == 1  # the endless download only
