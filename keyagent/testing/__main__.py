"""``python -m keyagent.testing serve``: run a Conduce emulator until SIGINT or SIGTERM.

In the foreground it prints one ``KEY=value`` line per setting, then serves::

    CONDUCE_HOST=127.0.0.1:PORT
    CONDUCE_CA_BUNDLE=/tmp/conduce-emulator-.../ca.pem
    CONDUCE_USER=demo@example.com
    CONDUCE_EMULATOR_CONTROL=/tmp/conduce-emulator-.../control.sock
    CONDUCE_EMULATOR_TOKEN_FILE=/tmp/conduce-emulator-.../control.token

The last two are the control API (see :mod:`keyagent.testing.emulator`): a Unix socket, and
a 0600 file with its bearer token. :class:`keyagent.testing.emulator_process.EmulatorProcess`
reads these lines and drives the emulator through it.

The token is handed over in a file rather than printed because this output is the kind that
lands in CI logs and test reports; the file sits in the emulator's 0700 directory, next to
the socket, so exactly the users who can reach the socket can read it, and it is removed
with the directory when the emulator stops.

The account's password is read from stdin with ``--password-stdin``; without it the account
gets the fixed password ``demo-password``, which is for demos only: anyone who reads this
file knows it. ``serve --help`` names it, and ``serve --background``, run by a person at a
shell, shows it on stderr with the rest of what to do next. A password read from stdin is
never printed.

``serve --background`` is for a shell: ``eval "$(python -m keyagent.testing serve
--background)"``. The emulator detaches (a new session, stdin, stdout and stderr on
/dev/null) once it serves, and the command prints the same settings as ``export`` lines,
plus ``CONDUCE_EMULATOR_PID`` and a line saying how to stop it (``kill
"$CONDUCE_EMULATOR_PID"``), in the syntax of ``sh``, ``bash`` and ``zsh``.

The emulator needs ``trustme`` (the ``testing`` extra, from keyagent's source tree:
``pip install '/path/to/keyagent[testing]'``); without it ``serve``
says so in one line and exits with status 69 (``EX_UNAVAILABLE``).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

from keyagent.testing.emulator import ConduceEmulator

DEMO_USER = "demo@example.com"
DEMO_PASSWORD = "demo-password"  # noqa: S105  # documented demo-only password
INSTALL_HINT = (
    "pip install '/path/to/keyagent[testing]' (keyagent's source tree; not the PyPI "
    "project of that name)"
)
EX_UNAVAILABLE = 69  # sysexits.h: a program the command needs is not there
PROG = "python -m keyagent.testing"

Announce = Callable[[dict[str, str]], None]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Test helpers for keyagent.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run a loopback HTTPS emulator of the Conduce service",
        description=(
            "Serve a Conduce emulator on 127.0.0.1 with a throw-away CA, print "
            "CONDUCE_HOST, CONDUCE_CA_BUNDLE, CONDUCE_USER, CONDUCE_EMULATOR_CONTROL and "
            "CONDUCE_EMULATOR_TOKEN_FILE lines, and serve until SIGINT or SIGTERM. "
            f"Needs the testing extra: {INSTALL_HINT}."
        ),
    )
    serve.add_argument("--port", type=int, default=0, help="TCP port (default: any free one)")
    serve.add_argument("--user", default=DEMO_USER, help=f"account e-mail (default: {DEMO_USER})")
    serve.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the account's password from the first line of stdin (default: the "
        f"fixed demo-only password {DEMO_PASSWORD!r})",
    )
    serve.add_argument(
        "--session-lifetime",
        type=float,
        default=None,
        metavar="SECONDS",
        help="sessions expire this long after login (default: never)",
    )
    serve.add_argument(
        "--background",
        action="store_true",
        help="serve in the background and print the settings, and CONDUCE_EMULATOR_PID, as "
        f'sh export lines: eval "$({PROG} serve --background)"; '
        'stop it with kill "$CONDUCE_EMULATOR_PID"',
    )
    return parser


def _settings(emulator: ConduceEmulator, user: str) -> dict[str, str]:
    # In this order, control lines last: EmulatorProcess takes the last line to mean "all".
    return {
        "CONDUCE_HOST": emulator.host,
        "CONDUCE_CA_BUNDLE": emulator.ca_path,
        "CONDUCE_USER": user,
        "CONDUCE_EMULATOR_CONTROL": emulator.control_path,
        "CONDUCE_EMULATOR_TOKEN_FILE": emulator.control_token_path,
    }


def serve(
    port: int,
    user: str,
    password: str,
    session_lifetime: float | None,
    announce: Announce | None = None,
) -> int:
    """Serve until SIGINT or SIGTERM; ``announce`` gets the settings once the emulator serves
    (default: print them as ``KEY=value`` lines)."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # Installed before the emulator starts, so a signal that follows the printed lines
    # promptly is never lost to Python's default handlers.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with ConduceEmulator(port, session_lifetime=session_lifetime, control=True) as emulator:
        emulator.add_user(user, password)
        (announce or _print_settings)(_settings(emulator, user))
        # Event.wait is woken by the handler: on POSIX the wait is interrupted to run it.
        while not stop.wait(1.0):
            pass
    return 0


def _print_settings(settings: dict[str, str]) -> None:
    # One write: a reader that has the last line has them all.
    sys.stdout.write("".join(f"{name}={value}\n" for name, value in settings.items()))
    sys.stdout.flush()


def serve_background(
    port: int, user: str, password: str, session_lifetime: float | None
) -> tuple[int, dict[str, str]]:
    """Fork an emulator that detaches once it serves; return its pid and settings.

    ``eval "$(...)"`` reads the command's stdout until every process holding it has closed
    it, so the emulator gives up stdin, stdout and stderr (and its terminal, with a new
    session) before it reports back over a pipe of its own.
    """
    ready_read, ready_write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the emulator: whatever happens, it never returns into the caller's code
        status = 1
        report = _Report(ready_write)
        try:
            os.close(ready_read)
            os.setsid()
            os.chdir("/")
            status = serve(port, user, password, session_lifetime, report.detach)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                reason = f"port {port} is taken: choose another --port, or none for any free one"
            else:
                reason = f"{type(error).__name__}: {error}"
            report.send({"error": reason})
        except BaseException as error:  # noqa: BLE001  # reported to the waiting parent
            report.send({"error": f"{type(error).__name__}: {error}"})
        finally:
            os._exit(status)
    os.close(ready_write)
    with os.fdopen(ready_read, "rb") as ready:
        data = ready.read()
    try:
        settings = json.loads(data) if data else {}
    except ValueError:
        settings = {}
    if not isinstance(settings, dict) or "CONDUCE_HOST" not in settings:
        os.waitpid(pid, 0)
        failure = settings.get("error") if isinstance(settings, dict) else None
        raise RuntimeError(str(failure or "the emulator exited before it was ready"))
    return pid, {str(name): str(value) for name, value in settings.items()}


class _Report:
    """The forked emulator's one message to its parent: the settings, or why it failed."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def detach(self, settings: dict[str, str]) -> None:
        devnull = os.open(os.devnull, os.O_RDWR)
        for stream in (0, 1, 2):
            os.dup2(devnull, stream)
        os.close(devnull)
        self.send(settings)

    def send(self, document: dict[str, str]) -> None:
        # Once only: after close() the number may name another file the emulator opened.
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with os.fdopen(fd, "wb") as ready:
                ready.write(json.dumps(document).encode())
        except OSError:
            pass  # the parent is gone: nobody to tell


def _export_lines(settings: dict[str, str]) -> str:
    return "".join(
        f"{name}={shlex.quote(value)}; export {name};\n" for name, value in settings.items()
    )


def _missing_module() -> str | None:
    """The module the emulator needs and cannot import (trustme, or what trustme needs)."""
    try:
        importlib.import_module("trustme")
    except ModuleNotFoundError as error:
        return error.name or "trustme"
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command != "serve":  # pragma: no cover - argparse enforces the choice
        return 2
    if args.port < 0 or args.port > 65535:
        sys.stderr.write(f"{PROG}: --port must be 0 to 65535\n")
        return 2
    missing = _missing_module()
    if missing is not None:
        sys.stderr.write(
            f"{PROG} serve: the Conduce emulator needs {missing}, which this Python "
            f"({sys.executable}) lacks; install the testing extra: {INSTALL_HINT}\n"
        )
        return EX_UNAVAILABLE
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            sys.stderr.write(f"{PROG}: empty password on stdin\n")
            return 2
        login = f"log in as {args.user} with the password given on stdin"
    else:
        password = DEMO_PASSWORD
        login = (
            f"log in as {args.user} with the demo-only password {DEMO_PASSWORD!r} (do not reuse it)"
        )
    if not args.background:
        # In the foreground the output is read by programs (EmulatorProcess) and kept in
        # test logs, where no password belongs, even this one: --help names it.
        if not args.password_stdin:
            sys.stderr.write(
                f"{args.user} has the fixed demo-only password (see --help); do not reuse it\n"
            )
        return serve(args.port, args.user, password, args.session_lifetime)
    try:
        pid, settings = serve_background(args.port, args.user, password, args.session_lifetime)
    except (OSError, RuntimeError) as error:
        sys.stderr.write(f"{PROG} serve --background: the emulator did not start: {error}\n")
        return 1
    sys.stdout.write(_export_lines({**settings, "CONDUCE_EMULATOR_PID": str(pid)}))
    sys.stdout.flush()
    sys.stderr.write(
        f"Conduce emulator pid {pid} serves https://{settings['CONDUCE_HOST']}; {login}; "
        'stop it with: kill "$CONDUCE_EMULATOR_PID"\n'
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
