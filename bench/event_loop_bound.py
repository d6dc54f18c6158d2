"""What an event-loop HTTP worker could reach on the keep-alive row: a measurement, not code
keyagent runs.

    python bench/event_loop_bound.py [--reps 3] [--workers 2]

It starts the emulator and a stand-in for the HTTP socket: ``--workers`` processes, each one
``selectors`` loop over non-blocking sockets, that frame HTTP with ``h11`` on both sides
(as the tool's server and as the service's client, as keyagent's workers do), add the key,
drop the tool's credential headers and the service's ``Set-Cookie``, and keep one warm TLS
connection to the emulator per tool connection. It leaves out what keyagent adds on top:
asking the agent for credentials, the audit entry, the rules, the deadlines. Then it runs
bench/http_socket.py's keep-alive clients through it and directly, alternating, and prints
the ratio of each repetition. It serves one request at a time per connection (no
pipelining, which those clients do not do) and connects to the emulator, blocking its
loop, as each client connects, before the measured window opens.

The gap between this ratio and the agent's row (bench/run.py --http-only) is what the
thread-per-connection design costs; docs/performance.md reports both.
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import ssl
import sys
import tempfile
from pathlib import Path

import h11

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import http_socket

DROPPED = (b"authorization", b"cookie", b"host")


class Pair:
    """One tool connection and its own upstream connection."""

    def __init__(self, tool: socket.socket, service: ssl.SSLSocket) -> None:
        self.tool, self.service = tool, service
        self.server = h11.Connection(h11.SERVER)
        self.client = h11.Connection(h11.CLIENT)


def serve(listener: socket.socket, host: str, port: int, cafile: str, key: str) -> None:
    """Forward requests from ``listener``'s tools to ``host``:``port`` until killed."""
    context = ssl.create_default_context(cafile=cafile)
    selector = selectors.DefaultSelector()
    added = [(b"host", f"{host}:{port}".encode()), (b"authorization", f"Bearer {key}".encode())]

    def send_all(sock: socket.socket, data: bytes) -> None:
        sock.setblocking(True)
        sock.sendall(data)
        sock.setblocking(False)

    def close(pair: Pair) -> None:
        for sock in (pair.tool, pair.service):
            selector.unregister(sock)
            sock.close()

    def accept() -> None:
        try:
            tool, _ = listener.accept()
        except BlockingIOError:
            return
        raw = socket.create_connection((host, port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = Pair(tool, context.wrap_socket(raw, server_hostname=host))
        for sock in (pair.tool, pair.service):
            sock.setblocking(False)
        selector.register(pair.tool, selectors.EVENT_READ, (from_tool, pair))
        selector.register(pair.service, selectors.EVENT_READ, (from_service, pair))

    def from_tool(pair: Pair) -> None:
        data = pair.tool.recv(65536)
        pair.server.receive_data(data)
        if not data:
            close(pair)
            return
        while True:
            event = pair.server.next_event()
            if isinstance(event, h11.Request):
                headers = [(n, v) for n, v in event.headers if n not in DROPPED] + added
                out = pair.client.send(
                    h11.Request(method=event.method, target=event.target, headers=headers)
                )
            elif isinstance(event, h11.Data):
                out = pair.client.send(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                out = pair.client.send(h11.EndOfMessage())
            else:
                return
            send_all(pair.service, out or b"")

    def from_service(pair: Pair) -> None:
        while True:
            try:
                data = pair.service.recv(65536)
            except ssl.SSLWantReadError:
                return
            pair.client.receive_data(data)
            if not data:
                close(pair)
                return
            out = bytearray()
            while True:
                event = pair.client.next_event()
                if isinstance(event, h11.Response):
                    headers = [(n, v) for n, v in event.headers if n != b"set-cookie"]
                    response = h11.Response(status_code=event.status_code, headers=headers)
                    out += pair.server.send(response) or b""
                elif isinstance(event, h11.Data):
                    out += pair.server.send(h11.Data(data=event.data)) or b""
                elif isinstance(event, h11.EndOfMessage):
                    out += pair.server.send(h11.EndOfMessage()) or b""
                    pair.client.start_next_cycle()
                    pair.server.start_next_cycle()
                else:
                    break
            if out:
                send_all(pair.tool, bytes(out))
            if not pair.service.pending():
                return

    listener.setblocking(False)
    selector.register(listener, selectors.EVENT_READ, None)
    while True:
        for selected, _ in selector.select():
            if selected.data is None:
                accept()
            else:
                handler, pair = selected.data
                handler(pair)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir, http_socket.emulator() as (emu, key):
        key_file, _ = http_socket.write_key_files(Path(workdir), key)
        name, _, port = emu.host.rpartition(":")
        path = os.path.join(workdir, "http.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1024)
        children = []
        for _ in range(args.workers):
            child = os.fork()
            if child == 0:  # pragma: no cover - the worker never returns
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                serve(listener, name, int(port), emu.ca_path, key)
                os._exit(0)
            children.append(child)
        listener.close()  # bound and listening: a client's connect waits in its backlog
        try:
            for _ in range(args.reps):
                ours = http_socket.clients_rps("unix", path, emu, "", args.seconds)
                theirs = http_socket.clients_rps("tls", "", emu, str(key_file), args.seconds)
                print(
                    f"event-loop bound {ours:,.0f} req/s, direct {theirs:,.0f} req/s:"
                    f" {ours / theirs:.2f}x",
                    flush=True,
                )
        finally:
            for child in children:
                os.kill(child, signal.SIGKILL)
                os.waitpid(child, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
