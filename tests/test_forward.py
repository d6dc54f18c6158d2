"""The HTTP socket's upstream side (keyagent.forward): h11 over pooled TLS connections, against
the shipped HTTPS emulator and, for answers no real service sends, a raw TLS server."""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from keyagent.errors import RemoteError, RemoteUnreachable, Timeout, TLSError
from keyagent.forward import Answer, Upstream, split_host
from keyagent.testing.emulator import ConduceEmulator, Fault
from keyagent.tls import HttpSettings

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


# --- answers the emulator never sends: a raw TLS server -----------------------------------


@pytest.fixture
def raw_server() -> Iterator[Callable[[bytes], tuple[str, HttpSettings]]]:
    """Start a TLS server that answers every request on a connection with the given bytes,
    then closes; yields a function that starts one and returns its host and settings."""
    ca = trustme.CA()
    stops: list[Callable[[], None]] = []

    def start(answer: bytes) -> tuple[str, HttpSettings]:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(context)
        listener = socket.create_server(("127.0.0.1", 0))
        done = threading.Event()

        def serve() -> None:
            while not done.is_set():
                try:
                    raw, _ = listener.accept()
                except OSError:
                    return
                with context.wrap_socket(raw, server_side=True) as conn:
                    request = b""
                    while b"\r\n\r\n" not in request:
                        data = conn.recv(4096)
                        if not data:
                            break
                        request += data
                    conn.sendall(answer)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()

        def stop() -> None:
            done.set()
            listener.shutdown(socket.SHUT_RDWR)  # wakes accept(), which close() alone does not
            listener.close()
            thread.join(5)
            assert not thread.is_alive()

        stops.append(stop)
        settings = HttpSettings(verify=True, ca_certificates=ca.cert_pem.bytes().decode())
        return f"127.0.0.1:{listener.getsockname()[1]}", settings

    yield start
    for stop in stops:
        stop()


def test_an_answer_that_is_not_http_is_a_remote_error(
    raw_server: Callable[[bytes], tuple[str, HttpSettings]],
) -> None:
    host, settings = raw_server(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
    with pytest.raises(RemoteError, match=r"not HTTP/1\.1"):
        call(opened(settings), host, "k", "/api/v2/data/echo")


def test_an_answer_cut_short_is_unreachable_mid_answer(
    raw_server: Callable[[bytes], tuple[str, HttpSettings]],
) -> None:
    host, settings = raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
    upstream = opened(settings)
    answer = upstream.send("GET", host, "/api/v2/data/x", [("Host", host)], b"", chunked=False)
    assert answer.status == 200
    with pytest.raises(RemoteUnreachable, match="mid-answer"):
        b"".join(answer.body(host))
    answer.finish(complete=False)


def test_an_answer_ended_by_closing_is_passed_on_whole(
    raw_server: Callable[[bytes], tuple[str, HttpSettings]],
) -> None:
    """No Content-Length and no chunks: the body runs to the close, and the next request
    goes on a new connection."""
    host, settings = raw_server(b"HTTP/1.1 200 OK\r\nX-Kind: raw\r\n\r\nto the end")
    upstream = opened(settings)
    for _ in range(2):
        status, body = call(upstream, host, "k", "/api/v2/data/x")
        assert (status, body) == (200, b"to the end")


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
