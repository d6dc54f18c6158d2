"""What an event-loop HTTP worker could reach on the keep-alive row: a measurement, not code
keyagent runs.

    python bench/event_loop_bound.py [--reps 3] [--workers 2] [--duties]

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

With ``--duties`` each worker also does what keyagent's own worker does for each request
beyond framing, with keyagent's own functions: it builds the request's ``Head``, checks it
with ``route``, checks its grant (made once, at start) as ``AgentLink.still_good`` does,
rewrites the headers both ways with ``request_headers`` and ``answer_headers``, keeps the
request on a ``FlightBoard`` (posted as it leaves, replaced when the answer's head comes,
cleared as it ends) and sends its audit entry through ``AgentLink.audit`` to a stand-in for
the agent: one more process, one ``selectors`` loop over the workers' control sockets, that
checks each entry as ``keyagent.proxy_pool`` does and records it in an ``AuditLog``, logged
to a file every ``AUDIT_FLUSH_DELAY`` as the agent's log is. It still asks the agent for
nothing and keeps no deadlines.

The gap between this ratio and the agent's row (bench/run.py --http-only) is what the
thread-per-connection design costs; docs/performance.md reports both.
"""

from __future__ import annotations

import argparse
import itertools
import json
import mmap
import os
import selectors
import signal
import socket
import ssl
import sys
import tempfile
import time
from http import HTTPStatus
from pathlib import Path

import h11

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import http_socket
from keyagent.audit import AuditEntry, AuditLog
from keyagent.grant import Grant
from keyagent.httpwire import Head, RequestHead
from keyagent.log import INFO, to_stderr
from keyagent.proxy import _Flight, answer_headers, request_headers, route
from keyagent.proxy_pool import audit_fields
from keyagent.proxy_worker import (
    BOARD_SLOT,
    BOARD_SLOTS,
    GENERATION,
    MAX_MESSAGE,
    AgentLink,
    FlightBoard,
)
from keyagent.server import AUDIT_FLUSH_DELAY
from keyagent.store import digest_of, key_id_for

DROPPED = (b"authorization", b"cookie", b"host")
PEER = (os.getpid(), os.getuid(), sys.executable)
"""The pid, uid and program each audit entry names (the agent reads a tool's when it
accepts its connection, before any request)."""


class Pair:
    """One tool connection and its own upstream connection."""

    def __init__(self, tool: socket.socket, service: ssl.SSLSocket, conn: int) -> None:
        self.tool, self.service = tool, service
        self.server = h11.Connection(h11.SERVER)
        self.client = h11.Connection(h11.CLIENT)
        self.conn = conn  # its number in audit entries (the agent's, in keyagent)
        self.flight: _Flight | None = None  # with --duties: the request under way


class Duties:
    """What a worker does for each request beyond framing (``--duties``), with keyagent's own
    functions: the grant it was lent, its flight board and its link to the agent."""

    def __init__(self, host: str, key: str, control: socket.socket, generation: mmap.mmap) -> None:
        self.link = AgentLink(control, generation)
        self.board = FlightBoard(mmap.mmap(-1, BOARD_SLOTS * BOARD_SLOT))
        digest = digest_of(key)
        # As the agent lends a held key: bound by a deadline, and good while the generation
        # it was lent at stands.
        self.grant = Grant(
            host, http_socket.USER, header="Authorization", value=f"Bearer {key}",
            digest=digest, key_id=key_id_for(key), deadline=time.monotonic() + 3600,
            token=GENERATION.unpack_from(generation)[0],
        )  # fmt: skip

    def take_off(self, pair: Pair, event: h11.Request) -> h11.Request:
        """The request to send for the tool's ``event``, on the board as it leaves."""
        head = Head(event)
        where = route(head)
        grant = self.grant
        # Checked when the connection's grant is taken, and again once the (empty) body is
        # read, as keyagent.proxy does: the agent would be asked again were it stale.
        if not (self.link.still_good(grant) and self.link.still_good(grant)):
            raise RuntimeError("the grant went stale: nothing changes it here")
        flight = pair.flight = _Flight(pair.conn, head, where, grant)
        flight.slot = self.board.post({"conn": pair.conn, **flight.entry()})
        headers = request_headers(head, grant)
        return RequestHead.make(head.method, where.target, headers, chunked=head.chunked).event

    def answered(self, pair: Pair, event: h11.Response) -> h11.Response:
        """The answer to send the tool for the service's ``event``; the board says its status."""
        flight = pair.flight
        assert flight is not None
        headers = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in event.headers.raw_items()
        ]
        flight.status = status = event.status_code
        if flight.slot is not None:
            flight.slot = self.board.replace(flight.slot, {"conn": pair.conn, **flight.entry()})
        encoded = [
            (name.encode("latin-1"), value.encode("latin-1"))
            for name, value in answer_headers(headers, flight.grant)
        ]
        return h11.Response(
            status_code=status, headers=encoded, reason=HTTPStatus(status).phrase.encode()
        )

    def land(self, pair: Pair) -> None:
        """The answer is whole: its audit entry goes to the agent, its slot is emptied."""
        flight, pair.flight = pair.flight, None
        assert flight is not None
        self.link.audit(pair.conn, "ok", **flight.entry())
        if flight.slot is not None:
            self.board.clear(flight.slot)


def serve(
    listener: socket.socket,
    host: str,
    port: int,
    cafile: str,
    key: str,
    *,
    duties: Duties | None = None,
) -> None:
    """Forward requests from ``listener``'s tools to ``host``:``port`` until killed; with
    ``duties``, doing them too."""
    context = ssl.create_default_context(cafile=cafile)
    selector = selectors.DefaultSelector()
    added = [(b"host", f"{host}:{port}".encode()), (b"authorization", f"Bearer {key}".encode())]
    numbers = itertools.count(1)

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
        pair = Pair(tool, context.wrap_socket(raw, server_hostname=host), next(numbers))
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
            if isinstance(event, h11.Request) and duties is not None:
                out = pair.client.send(duties.take_off(pair, event))
            elif isinstance(event, h11.Request):
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
                if isinstance(event, h11.Response) and duties is not None:
                    out += pair.server.send(duties.answered(pair, event)) or b""
                elif isinstance(event, h11.Response):
                    headers = [(n, v) for n, v in event.headers if n != b"set-cookie"]
                    response = h11.Response(status_code=event.status_code, headers=headers)
                    out += pair.server.send(response) or b""
                elif isinstance(event, h11.Data):
                    out += pair.server.send(h11.Data(data=event.data)) or b""
                elif isinstance(event, h11.EndOfMessage):
                    if duties is not None:  # recorded before the answer's end leaves
                        duties.land(pair)
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


def agent(controls: list[socket.socket], log_path: str) -> None:
    """The agent's side of the workers' control sockets, until killed: each audit entry read,
    checked and recorded as keyagent.proxy_pool and keyagent.agent do, and the audit log
    written to ``log_path`` at most ``AUDIT_FLUSH_DELAY`` after an entry, as the agent's
    server does. Nothing else comes on them here."""
    descriptor = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(descriptor, 2)
    os.close(descriptor)
    to_stderr(INFO)  # as keyagent -D logs
    audit_log = AuditLog()
    audit_log.deferred = True
    flush_at: float | None = None

    def pending() -> None:
        nonlocal flush_at
        flush_at = time.monotonic() + AUDIT_FLUSH_DELAY

    audit_log.on_pending = pending
    selector = selectors.DefaultSelector()
    for control in controls:
        control.setblocking(False)
        selector.register(control, selectors.EVENT_READ, control)
    while True:
        timeout = None if flush_at is None else max(flush_at - time.monotonic(), 0.0)
        for selected, _ in selector.select(timeout):
            readable: socket.socket = selected.data
            for _ in range(64):  # as ProxyPool reads: bounded per turn of the loop
                try:
                    data = readable.recv(MAX_MESSAGE)
                except BlockingIOError:
                    break
                if not data:
                    return
                record(audit_log, data)
        if flush_at is not None and time.monotonic() >= flush_at:
            flush_at = None
            audit_log.flush()


def record(audit_log: AuditLog, data: bytes) -> None:
    """One worker's message, as ``ProxyPool._handle`` and ``_audit`` check it and
    ``Agent.audit`` records it (for a peer read at accept: :data:`PEER`)."""
    message = json.loads(data)
    if message["t"] != "audit" or type(message.get("conn")) is not int:
        raise ValueError("not an audit entry")
    fields, status = audit_fields(message)
    outcome, path = fields["outcome"], fields["path"]
    assert outcome is not None  # audit_fields refuses an entry without one
    if path is not None:
        path = path.partition("?")[0].partition("#")[0]
    pid, uid, exe = PEER
    entry = AuditEntry(
        time.time(), "proxy", outcome, fields["key_id"], fields["host"], fields["user"],
        pid, uid, exe, fields["method"], path, status,
    )  # fmt: skip
    audit_log.record(entry)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument(
        "--duties",
        action="store_true",
        help="also do a worker's per-request duties, auditing to a stand-in agent",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir, http_socket.emulator() as (emu, key):
        key_file, _ = http_socket.write_key_files(Path(workdir), key)
        name, _, port = emu.host.rpartition(":")
        path = os.path.join(workdir, "http.sock")
        children = []
        # With --duties: a control socket per worker, and the generation number they all
        # read, as the agent's ProxyPool makes them.
        controls = [
            socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            for _ in range(args.workers if args.duties else 0)
        ]
        generation = mmap.mmap(-1, GENERATION.size)  # stays 0: the grant stays good
        if args.duties:
            child = os.fork()
            if child == 0:  # pragma: no cover - the agent never returns
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                agent([agent_end for agent_end, _ in controls], os.path.join(workdir, "agent.log"))
                os._exit(0)
            children.append(child)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1024)
        for index in range(args.workers):
            child = os.fork()
            if child == 0:  # pragma: no cover - the worker never returns
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                duties = None
                if args.duties:
                    duties = Duties(emu.host, key, controls[index][1], generation)
                serve(listener, name, int(port), emu.ca_path, key, duties=duties)
                os._exit(0)
            children.append(child)
        listener.close()  # bound and listening: a client's connect waits in its backlog
        for agent_end, worker_end in controls:
            agent_end.close()
            worker_end.close()
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
