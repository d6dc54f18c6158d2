"""``keyagent``: the daemon's command line, process set-up and hardening, in ssh-agent's image.

* ``eval "$(keyagent)"`` — start in the background, print shell lines that export
  ``KEYAGENT_SOCK`` and ``KEYAGENT_PID``.
* ``keyagent -D`` / ``-d`` — stay in the foreground (``-d``: debug log on stderr).
* ``keyagent CMD ARGS...`` — run CMD with the variables set; the agent exits with it.
* ``keyagent -k`` — stop the agent named by ``KEYAGENT_PID`` and print the unset lines.

The socket is bound before any fork, so a started agent is already reachable when the
shell lines are printed, and a refusal (live agent, unsafe directory) is reported by the
command itself with exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import resource
import select
import shlex
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import NoReturn, TextIO

from keyagent import __version__, paths
from keyagent.agent import Agent
from keyagent.config import ConfigError
from keyagent.config import load as load_config
from keyagent.duration import parse_duration
from keyagent.errors import KeyagentError
from keyagent.persist import KeyringStore, PersistedKey
from keyagent.protocol import MAX_LIFETIME
from keyagent.server import (
    Limits,
    Server,
    SocketSetupError,
    bind_listener,
    check_private_dir,
    file_identity,
    log_internal,
)
from keyagent.sessions import AccountFactory, LazyAccount, RemoteAccount
from keyagent.systemd import ListenFdsError, Notifier, listen_fds

log = logging.getLogger("keyagent")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 64

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if seconds > MAX_LIFETIME:
        raise argparse.ArgumentTypeError(f"'{text}' is longer than ten years")
    return seconds


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive whole number")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="keyagent",
        description="Hold Conduce sessions and API keys in memory; serve them on a Unix socket.",
        epilog='Start with: eval "$(keyagent)". Stop with: eval "$(keyagent -k)".',
    )
    syntax = parser.add_mutually_exclusive_group()
    syntax.add_argument(
        "-s", dest="syntax", action="store_const", const="sh", help="print Bourne-shell commands"
    )
    syntax.add_argument(
        "-c", dest="syntax", action="store_const", const="csh", help="print C-shell commands"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("-D", dest="foreground", action="store_true", help="stay in the foreground")
    mode.add_argument(
        "-d",
        dest="debug",
        action="store_true",
        help="stay in the foreground and log debug messages to stderr",
    )
    mode.add_argument(
        "-k", dest="kill", action="store_true", help="stop the agent named by $KEYAGENT_PID"
    )
    parser.add_argument(
        "-a",
        dest="socket",
        metavar="PATH",
        help="bind the socket at PATH (its directory must be private)",
    )
    parser.add_argument(
        "-t",
        dest="lifetime",
        type=_duration,
        metavar="LIFE",
        help="default key lifetime: seconds or e.g. 15m, 8h, 2d",
    )
    parser.add_argument(
        "--idle-timeout",
        type=_duration,
        default=None,
        metavar="SECONDS",
        help="close connections idle this long",
    )
    parser.add_argument(
        "--line-timeout",
        type=_duration,
        default=None,
        metavar="SECONDS",
        help="a request line must be complete this soon",
    )
    parser.add_argument(
        "--max-connections",
        type=_positive_int,
        default=None,
        metavar="N",
        help="connections served at once; more are answered 'busy'",
    )
    conduce = parser.add_argument_group("Conduce service")
    conduce.add_argument(
        "--ca-bundle",
        metavar="FILE",
        help="trust this CA bundle for Conduce hosts (beats REQUESTS_CA_BUNDLE)",
    )
    conduce.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify TLS certificates (logs a warning on every call)",
    )
    conduce.add_argument(
        "--connect-timeout",
        type=_duration,
        default=None,
        metavar="SECONDS",
        help="seconds to wait for a connection (default 5)",
    )
    conduce.add_argument(
        "--read-timeout",
        type=_duration,
        default=None,
        metavar="SECONDS",
        help="seconds to wait for an answer (default 30)",
    )
    conduce.add_argument(
        "--validate-after",
        type=_duration,
        default=None,
        metavar="SECONDS",
        help="check a session idle this long before relying on it (default 300)",
    )
    parser.add_argument(
        "--no-keyring",
        action="store_true",
        help="never touch the OS keyring: no restoring at start-up, no persisting",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="configuration file (default: $KEYAGENT_CONFIG, else ~/.config/keyagent/config.toml)",
    )
    parser.add_argument("--version", action="version", version=f"keyagent {__version__}")
    parser.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="CMD ARGS",
        help="run CMD with the agent's variables set; stop when it exits",
    )
    return parser


# --- shell lines -------------------------------------------------------------------------


def shell_syntax(explicit: str | None) -> str:
    if explicit:
        return explicit
    return "csh" if os.environ.get("SHELL", "").endswith("csh") else "sh"


def env_lines(syntax: str, socket_path: str, pid: int) -> str:
    quoted = shlex.quote(socket_path)
    if syntax == "csh":
        return (
            f"setenv {paths.SOCKET_ENV} {quoted};\n"
            f"setenv {paths.PID_ENV} {pid};\n"
            f"echo Agent pid {pid};\n"
        )
    return (
        f"{paths.SOCKET_ENV}={quoted}; export {paths.SOCKET_ENV};\n"
        f"{paths.PID_ENV}={pid}; export {paths.PID_ENV};\n"
        f"echo Agent pid {pid};\n"
    )


def unset_lines(syntax: str, pid: int) -> str:
    if syntax == "csh":
        return (
            f"unsetenv {paths.SOCKET_ENV};\nunsetenv {paths.PID_ENV};\n"
            f"echo Agent pid {pid} killed;\n"
        )
    return f"unset {paths.SOCKET_ENV};\nunset {paths.PID_ENV};\necho Agent pid {pid} killed;\n"


def kill_agent(syntax: str, out: TextIO, err: TextIO) -> int:
    raw = os.environ.get(paths.PID_ENV, "")
    if not raw.isdigit() or int(raw) <= 1:
        err.write(f"keyagent: {paths.PID_ENV} is not set to an agent's pid; nothing to kill\n")
        return EXIT_FAILURE
    pid = int(raw)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        err.write(f"keyagent: no process {pid}; the agent is already gone\n")
        return EXIT_FAILURE
    except PermissionError:
        err.write(f"keyagent: process {pid} is not yours; check {paths.PID_ENV}\n")
        return EXIT_FAILURE
    out.write(unset_lines(syntax, pid))
    return EXIT_OK


# --- process hardening -------------------------------------------------------------------


def harden(max_connections: int) -> None:
    """No core dumps, no ptrace by other processes of the user, enough descriptors."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    # Non-dumpable: no core file, and /proc/<pid>/mem and ptrace are closed to the user's
    # other processes, which could otherwise read every key out of memory.
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("could not make the agent non-dumpable: %s", os.strerror(ctypes.get_errno()))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + 64
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < wanted:
            log.warning(
                "descriptor limit %d allows fewer than %d connections", target, max_connections
            )


def die_with_parent(parent: int) -> None:
    """In command mode: get SIGTERM when the command (our parent) exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the command exited before the line above took effect
        os.kill(os.getpid(), signal.SIGTERM)


def configure_logging(*, debug: bool, foreground: bool) -> None:
    root = logging.getLogger("keyagent")
    root.handlers.clear()
    root.propagate = False
    handler: logging.Handler
    if foreground:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("keyagent[%(process)d]: %(levelname)s: %(message)s"))
        root.setLevel(logging.DEBUG if debug else logging.INFO)
    else:
        from logging.handlers import SysLogHandler  # background only: the foreground never

        try:
            handler = SysLogHandler(address="/dev/log", facility=SysLogHandler.LOG_AUTHPRIV)
            handler.setFormatter(logging.Formatter("keyagent[%(process)d]: %(message)s"))
        except OSError:
            handler = logging.NullHandler()
        root.setLevel(logging.WARNING)
    root.addHandler(handler)


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)


# --- main --------------------------------------------------------------------------------


CONFIGURED = (
    "lifetime", "ca_bundle", "connect_timeout", "read_timeout", "validate_after",
    "idle_timeout", "line_timeout", "max_connections",
)  # fmt: skip


def apply_config(args: argparse.Namespace) -> None:
    """Fill every setting not given as a flag from the environment, the file or the default.

    Precedence: flags > environment > config file > built-in defaults.
    """
    flags = {name: getattr(args, name) for name in CONFIGURED}
    if args.insecure:
        flags["insecure"] = True
    config = load_config(args.config, flags=flags)
    for name in CONFIGURED:
        setattr(args, name, getattr(config, name))
    if args.insecure:
        args.ca_bundle = None  # typed --insecure beats a bundle from the file or environment
    args.persist = config.persist


def conduce_accounts(args: argparse.Namespace) -> AccountFactory:
    """Accounts that talk to the real service.

    ``requests`` is imported by the first Conduce call, on a worker thread: an agent that
    only serves keys never loads it.
    """
    if args.insecure:
        log.warning("--insecure: TLS certificates of Conduce hosts will not be verified")

    def real(host: str, user: str) -> RemoteAccount:
        from keyagent.conduce import ConduceAccount, HttpSettings

        settings = HttpSettings(
            verify=args.ca_bundle or True,
            insecure=args.insecure,
            connect_timeout=args.connect_timeout,
            read_timeout=args.read_timeout,
        )
        return ConduceAccount(host, user, settings)

    def account(host: str, user: str) -> RemoteAccount:
        return LazyAccount(host, user, real)

    return account


RESTORE_TIMEOUT = 5.0


def restore_persisted(agent: Agent, keyring: KeyringStore) -> None:
    """Hold the keys persisted in the OS keyring again, waiting at most RESTORE_TIMEOUT.

    The keyring is read by a short-lived forked child that hands the keys back over a
    pipe: ``keyring`` and its D-Bus stack (over ten megabytes) then never load into the
    long-running agent unless a request asks to persist. The child shares the agent's
    hardening (non-dumpable, no core files). A locked keyring may prompt and block; the
    agent then starts without those keys rather than not at all.
    """
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the reader: no threads exist yet, so forking is safe
        os.close(read_end)
        try:
            live, expired = keyring.load_all(time.time())
            payload = {"keys": [vars_of(key) for key in live], "expired": len(expired)}
        except KeyagentError as error:
            payload = {"error": error.message}
        except BaseException as error:  # noqa: BLE001  # reported to the parent, which logs it
            payload = {"error": f"the OS keyring could not be read ({type(error).__name__})"}
        with os.fdopen(write_end, "w") as pipe:
            json.dump(payload, pipe)
        os._exit(0)
    os.close(write_end)
    try:
        data = _read_all(read_end, RESTORE_TIMEOUT)
    finally:
        os.close(read_end)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)  # a reader stuck on a prompt is abandoned
        os.waitpid(child, 0)
    if data is None:
        log.warning(
            "the OS keyring did not answer within %gs; persisted keys not restored",
            RESTORE_TIMEOUT,
        )
        return
    try:
        payload = json.loads(data)
        if "error" in payload:
            log.info("persisted keys not restored: %s", payload["error"])
            return
        keys = [PersistedKey(**fields) for fields in payload["keys"]]
    except (ValueError, TypeError, KeyError):
        log.warning("persisted keys not restored: the keyring reader failed")
        return
    if payload.get("expired"):
        log.info("deleted %d expired key(s) from the OS keyring", payload["expired"])
    agent.restore(keys)


def vars_of(key: PersistedKey) -> dict[str, object]:
    return {
        "key_id": key.key_id, "host": key.host, "user": key.user, "secret": key.secret,
        "description": key.description, "created": key.created, "expires": key.expires,
    }  # fmt: skip


def _read_all(fd: int, timeout: float) -> bytes | None:
    """Everything written to pipe ``fd`` until EOF, or None if that takes over ``timeout``."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        readable, _, _ = select.select([fd], [], [], remaining)
        if readable:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def serve(
    args: argparse.Namespace,
    listener_path: str,
    bound: tuple[int, int] | None,
    listener: socket.socket,
    on_ready: Callable[[], None],
    *,
    notifier: Notifier,
) -> int:
    """Harden, set up, call ``on_ready`` (signals are handled by then), serve until stopped."""
    harden(args.max_connections)
    agent = Agent(
        socket_path=listener_path,
        default_lifetime=args.lifetime,
        default_persist=args.persist,
        accounts=conduce_accounts(args),
        validate_after=args.validate_after,
        keyring=None if args.no_keyring else KeyringStore(),
    )
    if agent.keyring is not None:
        restore_persisted(agent, agent.keyring)
    limits = Limits(
        max_connections=args.max_connections,
        idle_timeout=args.idle_timeout,
        line_timeout=args.line_timeout,
    )
    server = Server(agent, listener, limits=limits)
    server.install_signal_handlers()

    def ready() -> None:
        # Start-up leaves freed heap behind (argument parsing, configuration, imports);
        # hand it back to the system before settling in for the session (about 1.5 MiB).
        with contextlib.suppress(AttributeError, OSError):
            ctypes.CDLL(None).malloc_trim(0)
        on_ready()
        notifier.ready(f"serving {len(agent.held_keys)} key(s) on {listener_path}")

    server.on_ready = ready
    try:
        server.serve_forever()
    finally:
        notifier.stopping("stopping")
        notifier.close()
        listener.close()
        # Remove the socket only if it is still the one we bound: a newer agent may have
        # replaced a socket it found unanswered.
        if bound is not None and file_identity(listener_path) == bound:
            os.unlink(listener_path)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    syntax = shell_syntax(args.syntax)
    if args.kill:
        return kill_agent(syntax, sys.stdout, sys.stderr)
    foreground = args.foreground or args.debug
    if foreground and args.command:
        sys.stderr.write("keyagent: -D/-d and a command exclude each other\n")
        return EXIT_USAGE
    configure_logging(debug=args.debug, foreground=True)  # until we know where logs go
    if args.ca_bundle and args.insecure:
        sys.stderr.write("keyagent: --ca-bundle and --insecure exclude each other\n")
        return EXIT_USAGE
    try:
        apply_config(args)
    except ConfigError as error:
        sys.stderr.write(f"keyagent: {error.message}\n")
        return EXIT_FAILURE
    if args.ca_bundle:
        if not os.path.isfile(args.ca_bundle):
            sys.stderr.write(f"keyagent: CA bundle {args.ca_bundle} is not a readable file\n")
            return EXIT_FAILURE
        args.ca_bundle = os.path.abspath(args.ca_bundle)  # the daemon changes directory
    # systemd's NOTIFY_SOCKET, read (and removed from the environment) before anything can
    # inherit it; a Notifier without one does nothing.
    notifier = Notifier()
    try:
        inherited = listen_fds()
    except ListenFdsError as error:
        sys.stderr.write(f"keyagent: {error}\n")
        return EXIT_FAILURE
    if inherited:
        # Socket activation: systemd made the socket (mode, directory, path) and removes it;
        # we serve it as given. The peer-uid check still applies to every connection.
        listener, extra = inherited[0], inherited[1:]
        for sock in extra:
            log.warning("ignoring extra inherited socket %s", sock.getsockname())
            sock.close()
        name = listener.getsockname()
        path = name if isinstance(name, str) and name else "(inherited socket)"
        bound = None
        foreground = True  # a socket-activated service must not fork away from its manager
    else:
        path = os.path.abspath(args.socket) if args.socket else paths.default_socket_path()
        try:
            if not args.socket:
                # The runtime directory itself (XDG: owned by the user, mode 0700) must be
                # safe too, or whoever owns it could swap our directory inside it.
                check_private_dir(os.path.dirname(os.path.dirname(path)))
            listener = bind_listener(path)
        except SocketSetupError as error:
            sys.stderr.write(f"keyagent: {error}\n")
            return EXIT_FAILURE
        bound = file_identity(path)

    if foreground:

        def announce() -> None:
            sys.stdout.write(env_lines(syntax, path, os.getpid()))
            sys.stdout.flush()

        return serve(args, path, bound, listener, announce, notifier=notifier)

    # Background: the child tells the parent through a pipe once it handles signals, so the
    # printed pid is never one that a quick "keyagent -k" would kill the hard way.
    ready_r, ready_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        os.close(ready_r)
        try:
            # A session of its own, in command mode too: a Ctrl-C at the command's terminal
            # goes to the foreground process group and must not stop the agent.
            os.setsid()
            if args.command:
                die_with_parent(parent)
            os.chdir("/")
            configure_logging(debug=False, foreground=False)

            def ready() -> None:
                os.write(ready_w, b"R")
                os.close(ready_w)
                _detach_stdio()

            code = serve(args, path, bound, listener, ready, notifier=notifier)
        except BaseException as error:  # noqa: BLE001  # the child must never return into the parent's code
            log_internal(error)  # to syslog: the child has no terminal any more
            code = EXIT_FAILURE
        os._exit(code)

    os.close(ready_w)
    listener.close()
    with os.fdopen(ready_r, "rb") as ready_pipe:
        if ready_pipe.read(1) != b"R":
            sys.stderr.write("keyagent: the agent failed to start; run keyagent -d to see why\n")
            return EXIT_FAILURE
    if args.command:
        os.environ[paths.SOCKET_ENV] = path
        os.environ[paths.PID_ENV] = str(child)
        try:
            os.execvp(args.command[0], args.command)
        except OSError as error:
            sys.stderr.write(f"keyagent: {args.command[0]}: {os.strerror(error.errno or 0)}\n")
            os.kill(child, signal.SIGTERM)
            return 127
    sys.stdout.write(env_lines(syntax, path, child))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
