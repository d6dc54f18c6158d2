"""The agent's serving process: a lean interpreter that holds the keys and serves the socket.

:mod:`keyagent.daemon` parses the command line and the configuration, binds the socket,
forks if asked, and then replaces itself (same pid) with::

    python -I -S .../keyagent/_serve.py FD

where descriptor ``FD`` holds the hand-off: a JSON document with the settings, the
listening socket's descriptor, and where to report readiness. A fresh interpreter keeps
everything start-up needed (argparse, tomllib, platformdirs, ``site`` and its ``.pth``
hooks) out of the process that stays resident. ``-I`` also keeps ``PYTHON*`` variables
(``PYTHONINSPECT``, ``PYTHONSTARTUP``) from changing how it runs; its module search path
is the daemon's, in the same order, without the script's or current directory. Modules
here and below import only what serving needs (docs/performance.md lists the budget);
``requests`` and ``keyring`` load on first use.

Nothing in the hand-off is secret; it is a memfd, not argv or the environment, only so
that no other process or log sees the agent's paths and settings.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import sys
import time

from keyagent.agent import NO_EXECUTABLES, NO_EXECUTABLES_DEFAULT, Agent
from keyagent.errors import KeyagentError, KeyringUnavailable
from keyagent.handoff import Handoff, HandoffError
from keyagent.hardening import harden
from keyagent.leftovers import LeftoversFile
from keyagent.log import DEBUG, INFO, WARNING, get_logger, to_stderr, to_syslog
from keyagent.persist import KeyringStore, PersistedKey, UnreadableLock, is_absent
from keyagent.proxy_pool import ProxyPool
from keyagent.server import Limits, Server, log_internal
from keyagent.sessions import LazyAccount
from keyagent.sockets import remove_socket, sees_peer_executables
from keyagent.systemd import Notifier

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

    from keyagent.sessions import AccountFactory, RemoteAccount
    from keyagent.sockets import FileIdentity
    from keyagent.tls import HttpSettings

log = get_logger("keyagent")

EXIT_OK, EXIT_FAILURE = 0, 1
RESTORE_TIMEOUT = 5.0


def configure_logging(*, debug: bool, foreground: bool, errors_fd: int | None = None) -> None:
    """Foreground: stderr (``-d``: debug level). Background: warnings to syslog (authpriv),
    and errors to ``errors_fd`` as well if given."""
    if foreground:
        to_stderr(DEBUG if debug else INFO)
    else:
        to_syslog(WARNING, errors_fd=errors_fd)


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)


# --- Conduce and the keyring ---------------------------------------------------------------


def conduce_accounts(settings: Mapping[str, Any]) -> AccountFactory:
    """Accounts that talk to the real service.

    ``requests`` is imported by the first Conduce call, on a worker thread: an agent that
    only serves keys never loads it.
    """
    if settings["insecure"]:
        log.warning("--insecure: TLS certificates of Conduce hosts will not be verified")

    def real(host: str, user: str) -> RemoteAccount:
        from keyagent.conduce import ConduceAccount

        return ConduceAccount(host, user, http_settings(settings))

    def account(host: str, user: str) -> RemoteAccount:
        return LazyAccount(host, user, real)

    return account


def _http_fields(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of :class:`~keyagent.tls.HttpSettings` the agent's settings give."""
    return {
        "verify": settings["ca_bundle"] or True,
        "ca_certificates": settings.get("ca_certificates"),
        "insecure": settings["insecure"],
        "connect_timeout": settings["connect_timeout"],
        "read_timeout": settings["read_timeout"],
    }


def http_settings(settings: Mapping[str, Any]) -> HttpSettings:
    """How the agent talks to Conduce hosts, for its own calls and the HTTP socket alike.

    The CA bundle is the text the daemon read at start, after its checks (keyagent.trust):
    the file is never opened again, so whoever replaces it later becomes no trusted CA."""
    from keyagent.tls import HttpSettings

    return HttpSettings(**_http_fields(settings))


def worker_hello(settings: Mapping[str, Any], *, foreground: bool) -> dict[str, Any]:
    """What an HTTP worker (:mod:`keyagent.proxy_worker`) is started with: how to reach the
    service (the worker makes its :class:`~keyagent.tls.HttpSettings` of these fields: the
    agent need not load the CA bundle into a TLS context for it), the tool-facing deadlines
    and where to log. The CA bundle travels as the text the daemon read and checked at
    start, so no worker ever reads the file itself."""
    return {
        "http": _http_fields(settings),
        "head_timeout": settings["line_timeout"], "idle_timeout": settings["idle_timeout"],
        "max_connections": settings["max_connections"],
        "foreground": foreground, "debug": log.isEnabledFor(DEBUG),
    }  # fmt: skip


_BUSY_BODY = (
    b'{"error": {"code": "busy", "message": "the agent has too many connections open; '
    b'retry later"}}'
)
HTTP_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"X-Keyagent-Error: busy\r\nConnection: close\r\n"
    b"Content-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY
)
"""The answer to an HTTP connection past the shared cap, sent without reading its request
(and without loading the proxy for it); keyagent.proxy's error answers look the same."""


def restore_persisted(
    agent: Agent, keyring: KeyringStore, timeout: float = RESTORE_TIMEOUT
) -> None:
    """Hold the keys persisted in the OS keyring again, waiting at most ``timeout`` seconds.

    The keyring is read by a short-lived forked child that hands the keys back over a
    pipe, one JSON line per key as soon as it is read: ``keyring`` and its D-Bus stack (over
    ten megabytes) then never load into the long-running agent unless a request asks to
    persist. The child shares the agent's hardening (non-dumpable, no core files). A locked
    keyring may prompt and block; the agent then starts with the keys read by then.
    """
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the reader: no threads exist yet, so forking is safe
        os.close(read_end)
        with os.fdopen(write_end, "w") as pipe:

            def send(line: dict[str, Any]) -> None:
                pipe.write(json.dumps(line) + "\n")
                pipe.flush()

            try:
                # The lock first: keys must never arrive without the lock that guards them.
                try:
                    stored_lock = keyring.load_lock()
                except UnreadableLock:
                    send({"lock": None})
                else:
                    if stored_lock is not None:
                        send({"lock": [stored_lock[0].hex(), stored_lock[1].hex()]})
                _, expired = keyring.load_all(time.time(), lambda key: send(key._asdict()))
                send({"expired": len(expired)})
            except KeyringUnavailable as error:
                send({"error": error.message, "absent": is_absent(error)})
            except KeyagentError as error:
                send({"error": error.message})
            except BaseException as error:  # noqa: BLE001  # reported to the parent, which logs it
                send({"error": f"the OS keyring could not be read ({type(error).__name__})"})
        os._exit(0)
    os.close(write_end)
    try:
        data, complete = read_all(read_end, timeout)
    finally:
        os.close(read_end)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)  # a reader stuck on a prompt is abandoned
        os.waitpid(child, 0)
    keys: list[PersistedKey] = []
    lock: tuple[bytes, bytes] | None = None
    lock_unreadable = False
    read_through = False  # the reader's last line came: every key was read
    lost = False  # a line the reader sent could not be taken
    lines = data.split(b"\n")
    for line in lines[:-1]:  # the last piece is empty, or a line cut short by the deadline
        try:
            answer = json.loads(line)
            if not isinstance(answer, dict):
                raise TypeError("not an object")
            if "error" in answer:
                # No keyring at all is usual (a server); one that fails is worth a warning.
                level = INFO if answer.get("absent") else WARNING
                log.log(level, "persisted keys not restored: %s", answer["error"])
            elif "lock" in answer and answer["lock"] is None:
                lock_unreadable = True
            elif "lock" in answer:
                lock = bytes.fromhex(answer["lock"][0]), bytes.fromhex(answer["lock"][1])
            elif "expired" in answer:
                read_through = True
                if answer["expired"]:
                    log.info("deleted %d expired key(s) from the OS keyring", answer["expired"])
            else:
                keys.append(PersistedKey(**answer))
        except (ValueError, TypeError, KeyError):
            lost = True  # a key was lost on the way
            log.warning("a persisted key was not restored: the keyring reader failed")
    if not complete:
        log.warning(
            "the OS keyring did not answer within %gs; restored the %d key(s) read by then",
            timeout,
            len(keys),
        )
    if lock_unreadable:
        # Fail closed: the agent was locked when it stopped, and no passphrase could unlock
        # a lock whose hash is unreadable. The keys stay in the keyring, not in memory.
        log.warning(
            "the OS keyring holds a keyagent lock record that cannot be read; the %d persisted"
            " key(s) were not restored, so a restart does not unlock them: delete them with"
            " keyagent-ctl forget --all --persist (or the keyring's 'lock' entry of service"
            " keyagent) and add them again",
            len(keys),
        )
        keys = []
    agent.restore(keys, lock, read_through=read_through and not lost)


def read_all(fd: int, timeout: float) -> tuple[bytes, bool]:
    """What is written to ``fd`` until EOF or ``timeout``, and whether EOF came first."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b"".join(chunks), False
        readable, _, _ = select.select([fd], [], [], remaining)
        if readable:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks), True
            chunks.append(chunk)


# --- serving -------------------------------------------------------------------------------


def serve(
    settings: Mapping[str, Any],
    listener_path: str,
    bound: FileIdentity | None,
    listener: Any,
    on_ready: Callable[[], None],
    *,
    notifier: Notifier,
    private_dir: str | None = None,
    http: tuple[str, FileIdentity | None, socket.socket] | None = None,
    leftovers_path: str | None = None,
    foreground: bool = True,
) -> int:
    """Harden, set up, call ``on_ready`` (signals are handled by then), serve until stopped."""
    harden(settings["max_connections"])
    agent = Agent(
        socket_path=listener_path,
        default_lifetime=settings["lifetime"],
        default_persist=settings["persist"],
        accounts=conduce_accounts(settings),
        validate_after=settings["validate_after"],
        keyring=None if settings["no_keyring"] else KeyringStore(),
        max_keys=settings.get("max_keys"),
        default_export=settings.get("export", True),
        default_allowed_exes=tuple(settings.get("allow_exe", ())),
        sees_executables=sees_peer_executables(),
        # Checked by the daemon at start (keyagent.trust) and never re-read from the
        # environment: a variable changed later cannot name another program.
        askpass=settings.get("askpass"),
        confirm_timeout=settings.get("confirm_timeout", 30.0),
        audit_entries=settings["audit_entries"],
        keep_created_keys=settings.get("keep_created_keys", False),
        leftovers=None if leftovers_path is None else LeftoversFile(leftovers_path),
    )
    agent.http_socket_path = None if http is None else http[0]
    if not agent.sees_executables:
        if agent.default_allowed_exes:  # each add, create or login takes it, and is refused
            log.warning("new keys and logins will be refused: %s", NO_EXECUTABLES_DEFAULT)
        else:
            log.warning("keys and sessions with allowed programs are refused: %s", NO_EXECUTABLES)
    if agent.keyring is not None:
        restore_persisted(agent, agent.keyring)
    if agent.leftovers is not None:
        # After the keyring: a key it gave back is held again, so it is no orphan.
        agent.adopt_leftovers(agent.leftovers.read())
    limits = Limits(
        max_connections=settings["max_connections"],
        idle_timeout=settings["idle_timeout"],
        line_timeout=settings["line_timeout"],
        stop_timeout=settings.get("stop_timeout", 10.0),
    )
    server = Server(agent, listener, limits=limits, http_listener=None if http is None else http[2])
    if http is not None:
        pool = server.proxy_pool = ProxyPool(
            agent, worker_hello(settings, foreground=foreground),
            watch=server.watch, unwatch=server.unwatch, start_call=server.start_call,
            call_at=server.call_at, clock=server.clock, busy=HTTP_BUSY,
            max_workers=settings["http_workers"],
        )  # fmt: skip
        agent.http_workers = lambda: pool.pids
        agent.http_workers_max = pool.max_workers
    server.http_busy = HTTP_BUSY
    server.install_signal_handlers()

    def ready() -> None:
        # Set-up leaves freed heap behind; hand it back before settling in for the session.
        with contextlib.suppress(AttributeError, OSError):
            ctypes.CDLL(None).malloc_trim(0)
        on_ready()
        notifier.ready(f"serving {len(agent.held_keys)} key(s) on {listener_path}")

    server.on_ready = ready

    removed = False

    def remove_sockets() -> None:
        nonlocal removed
        if not removed:  # once: a socket at the path later on is another agent's
            removed = True
            remove_socket(listener_path, bound)
            if http is not None:
                remove_socket(http[0], http[1])

    def stopping() -> None:
        # The listeners are closed: a new agent may start on the path while this one still
        # deletes keys, and the socket it makes must not be taken for ours at exit.
        remove_sockets()
        # Said as the agent begins to stop, not as it exits: deleting keys may take a while.
        notifier.stopping("stopping: deleting ephemeral keys on the service")

    server.on_stopping = stopping
    try:
        server.serve_forever()
    finally:
        notifier.stopping("stopping")
        notifier.close()
        listener.close()
        if http is not None:
            http[2].close()
        remove_sockets()
        if private_dir is not None:
            # The mkdtemp directory made for this agent alone (no XDG_RUNTIME_DIR): leave
            # nothing behind. rmdir removes it only if empty, i.e. only what we made.
            with contextlib.suppress(OSError):
                os.rmdir(private_dir)
    return EXIT_OK


def _adopt(fd: int) -> int:
    """Take an inherited descriptor: close-on-exec again, so commands do not inherit it.

    Standard input, output and error stay as they are: a program started later (a D-Bus
    helper of the keyring, say) must not find them closed.
    """
    if fd > 2:
        os.set_inheritable(fd, False)
    return fd


def run(handoff: Handoff) -> int:
    """Serve as the hand-off from :func:`keyagent.daemon.exec_core` describes."""
    foreground = handoff.foreground
    # keyagent CMD: a copy of CMD's stderr for the errors alone (os.dup's copy is not
    # inherited by the HTTP workers), so no thread's traceback or warning goes there.
    errors_fd = os.dup(2) if handoff.errors_to_stderr and not foreground else None
    configure_logging(debug=handoff.debug, foreground=foreground, errors_fd=errors_fd)
    listener = socket.socket(fileno=_adopt(handoff.listener_fd))
    http = None
    if handoff.http_listener_fd is not None and handoff.http_socket_path is not None:
        http_listener = socket.socket(fileno=_adopt(handoff.http_listener_fd))
        http = (handoff.http_socket_path, handoff.http_bound, http_listener)
    announce_fd = handoff.announce_fd
    ready_fd = handoff.ready_fd
    if announce_fd is not None:
        _adopt(announce_fd)
    if ready_fd is not None:
        _adopt(ready_fd)

    def on_ready() -> None:
        if announce_fd is not None:
            os.write(announce_fd, handoff.announce)
        if ready_fd is not None:
            os.write(ready_fd, b"R")
            os.close(ready_fd)
            _detach_stdio()

    # "" rather than None: None would make the Notifier look in the environment itself.
    notifier = Notifier(handoff.notify or "", unset_environment=False)
    try:
        return serve(
            handoff.settings.as_dict(), handoff.socket_path, handoff.bound, listener, on_ready,
            notifier=notifier, private_dir=handoff.private_dir, http=http,
            leftovers_path=handoff.leftovers_path, foreground=foreground,
        )  # fmt: skip
    except BaseException as error:
        if foreground:
            raise
        log_internal(error)  # to syslog: a background agent has no terminal any more
        return EXIT_FAILURE


def main(argv: list[str]) -> int:
    """``_serve.py FD``: read the hand-off from descriptor FD, then serve."""
    fd = int(argv[0])
    with os.fdopen(_adopt(fd), "rb") as source:
        data = source.read()
    try:
        handoff = Handoff.from_json(data)
    except HandoffError as error:
        raise SystemExit(f"keyagent: the hand-off from the daemon is unusable: {error}") from None
    sys.path[:] = handoff.sys_path
    return run(handoff)
