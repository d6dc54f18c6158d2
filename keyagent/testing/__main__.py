"""``python -m keyagent.testing serve``: run a Conduce emulator until SIGINT or SIGTERM.

It prints one ``KEY=value`` line per setting, then serves::

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
file knows it. The password is never printed.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType

from keyagent.testing.emulator import ConduceEmulator

DEMO_USER = "demo@example.com"
DEMO_PASSWORD = "demo-password"  # noqa: S105  # documented demo-only password


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m keyagent.testing",
        description="Test helpers for keyagent.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run a loopback HTTPS emulator of the Conduce service",
        description=(
            "Serve a Conduce emulator on 127.0.0.1 with a throw-away CA, print "
            "CONDUCE_HOST, CONDUCE_CA_BUNDLE, CONDUCE_USER, CONDUCE_EMULATOR_CONTROL and "
            "CONDUCE_EMULATOR_TOKEN_FILE lines, and serve until SIGINT or SIGTERM."
        ),
    )
    serve.add_argument("--port", type=int, default=0, help="TCP port (default: any free one)")
    serve.add_argument("--user", default=DEMO_USER, help=f"account e-mail (default: {DEMO_USER})")
    serve.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the account's password from the first line of stdin (default: the "
        "fixed demo-only password documented in keyagent/testing/__main__.py)",
    )
    serve.add_argument(
        "--session-lifetime",
        type=float,
        default=None,
        metavar="SECONDS",
        help="sessions expire this long after login (default: never)",
    )
    return parser


def serve(port: int, user: str, password: str, session_lifetime: float | None) -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # Installed before the emulator starts, so a signal that follows the printed lines
    # promptly is never lost to Python's default handlers.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with ConduceEmulator(port, session_lifetime=session_lifetime, control=True) as emulator:
        emulator.add_user(user, password)
        # One write, control lines last: a reader that has the last line has them all.
        sys.stdout.write(
            f"CONDUCE_HOST={emulator.host}\n"
            f"CONDUCE_CA_BUNDLE={emulator.ca_path}\n"
            f"CONDUCE_USER={user}\n"
            f"CONDUCE_EMULATOR_CONTROL={emulator.control_path}\n"
            f"CONDUCE_EMULATOR_TOKEN_FILE={emulator.control_token_path}\n"
        )
        sys.stdout.flush()
        # Event.wait is woken by the handler: on POSIX the wait is interrupted to run it.
        while not stop.wait(1.0):
            pass
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command != "serve":  # pragma: no cover - argparse enforces the choice
        return 2
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            sys.stderr.write("python -m keyagent.testing: empty password on stdin\n")
            return 2
    else:
        password = DEMO_PASSWORD
        sys.stderr.write(f"{args.user} has the fixed demo-only password; do not reuse it\n")
    if args.port < 0 or args.port > 65535:
        sys.stderr.write("python -m keyagent.testing: --port must be 0 to 65535\n")
        return 2
    return serve(args.port, args.user, password, args.session_lifetime)


if __name__ == "__main__":
    sys.exit(main())
