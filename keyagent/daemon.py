"""``keyagent``: the daemon's command line, process set-up and hardening, in ssh-agent's image.

* ``eval "$(keyagent)"`` — start in the background, print shell lines that export
  ``KEYAGENT_SOCK`` and ``KEYAGENT_PID``.
* ``keyagent -D`` / ``-d`` — stay in the foreground (``-d``: debug log on stderr).
* ``keyagent CMD ARGS...`` — run CMD with the variables set; the agent exits with it.
* ``keyagent -k`` — stop the agent named by ``KEYAGENT_PID`` and print the unset lines,
  once a connection to ``KEYAGENT_SOCK`` shows that this pid is the agent serving there.

Under systemd (``keyagent.service``, with ``KEYAGENT_PID`` unset) both point the user to
``systemctl --user``: the service manager, not this command, starts and stops that agent.
Without a runtime directory the socket goes into a fresh private directory with a random
name, which clients learn only through ``KEYAGENT_SOCK``.

The socket is bound before any fork, so a started agent is already reachable when the
shell lines are printed, and a refusal (live agent, unsafe directory) is reported by the
command itself with exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import logging
import os
import shlex
import signal
import socket
import stat
import sys
from collections.abc import Sequence
from typing import NamedTuple, NoReturn, TextIO

from keyagent import __version__, paths
from keyagent._argparse import (
    EXIT_USAGE,
    UsageParser,
    count_type,
    duration_type,
    entry_count_type,
    path_type,
    worker_count_type,
)
from keyagent.config import ConfigError
from keyagent.config import load as load_config
from keyagent.handoff import Handoff, Settings
from keyagent.log import one_line
from keyagent.rules import path_problem
from keyagent.sockets import (
    AgentRunning,
    FileIdentity,
    SocketSetupError,
    accepts_connections,
    bind_listener,
    check_private_dir,
    file_identity,
    remove_socket,
    socket_path_problem,
)
from keyagent.systemd import NOTIFY_ENV, ListenFdsError, listen_fds_with_names

log = logging.getLogger("keyagent")

EXIT_OK, EXIT_FAILURE = 0, 1
EXIT_CONFIG = 78
"""EX_CONFIG: the configuration (file, environment, CA bundle) is unusable, as keyagent-ctl."""
CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
"""What requests honours for its trust store, in its order of precedence."""

PR_SET_PDEATHSIG = 1
LISTEN_BACKLOG = 1024
"""bind_listener's default backlog, repeated when the background child listens again."""


_duration = duration_type()


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
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
        type=path_type,
        help="bind the socket at PATH (its directory must be private)",
    )
    parser.add_argument(
        "-t",
        "--lifetime",
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
        "--stop-timeout",
        type=_duration,
        default=None,
        metavar="SECONDS",
        help="when stopping, wait this long at most for ephemeral keys to be deleted on the"
        " service (default 10; keep it below the unit's TimeoutStopSec under systemd)",
    )
    parser.add_argument(
        "--max-connections",
        type=count_type,
        default=None,
        metavar="N",
        help="connections served at once; more are answered 'busy'",
    )
    parser.add_argument(
        "--max-keys",
        type=count_type,
        default=None,
        metavar="N",
        help="keys held at once (default 100000); add and create beyond it answer 'too_many'",
    )
    parser.add_argument(
        "--audit-entries",
        type=entry_count_type,
        default=None,
        metavar="N",
        help="audit log entries kept in memory for keyagent-ctl log (default 10000; 0: none,"
        " entries are still written to the agent's log)",
    )
    parser.add_argument(
        "--http-workers",
        type=worker_count_type,
        default=None,
        metavar="N",
        help="most worker processes serving the HTTP socket at once, 1 to 32 (default: two"
        " per core, 2 to 8); each takes about 24 MiB",
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
    # Not a flag: the PEM text of --ca-bundle, read once at start (see main).
    parser.set_defaults(ca_certificates=None)
    return parser


# --- shell lines -------------------------------------------------------------------------


def shell_syntax(explicit: str | None) -> str:
    """``sh``, ``csh`` or ``fish``: the flag's, else the one ``$SHELL`` names (sh if none)."""
    if explicit:
        return explicit
    shell = os.path.basename(os.environ.get("SHELL", ""))
    if shell.endswith("csh"):
        return "csh"
    return "fish" if shell == "fish" else "sh"


def _quote(syntax: str, value: str) -> str:
    if syntax == "fish":  # in fish's single quotes, backslash escapes ' and itself
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if syntax == "csh":  # csh expands history (!) even within single quotes
        return shlex.quote(value).replace("!", "\\!")
    return shlex.quote(value)


def _set(syntax: str, name: str, value: str) -> str:
    """One line that sets and exports ``name`` (a plain name: never quoted)."""
    quoted = _quote(syntax, value)
    if syntax == "csh":
        return f"setenv {name} {quoted};\n"
    if syntax == "fish":
        # Long options: a Bourne shell that evals these by mistake (a script of a fish
        # user, without -s) refuses them and changes nothing ("set -e" would turn on
        # errexit there, and "set -gx" replace the script's arguments).
        return f"set --global --export {name} {quoted};\n"
    return f"{name}={quoted}; export {name};\n"


def _unset(syntax: str, name: str) -> str:
    if syntax == "csh":
        return f"unsetenv {name};\n"
    if syntax == "fish":
        return f"set --erase {name};\n"
    return f"unset {name};\n"


def env_lines(syntax: str, socket_path: str, pid: int, http_path: str | None = None) -> str:
    return (
        _set(syntax, paths.SOCKET_ENV, socket_path)
        + _set(syntax, paths.PID_ENV, str(pid))
        + (_set(syntax, paths.HTTP_SOCKET_ENV, http_path) if http_path is not None else "")
        + f"echo Agent pid {pid};\n"
    )


def unset_lines(syntax: str, pid: int) -> str:
    return (
        _unset(syntax, paths.SOCKET_ENV)
        + _unset(syntax, paths.HTTP_SOCKET_ENV)
        + _unset(syntax, paths.PID_ENV)
        + f"echo Agent pid {pid} killed;\n"
    )


SYSTEMD_STOP = f"systemctl --user stop {paths.SYSTEMD_SERVICE}"


def _agent_pid(path: str) -> int | None:
    """The pid of the agent of ours that answers on ``path``, else None.

    The kernel names the process that listens (``SO_PEERCRED``); the agent names itself in
    ``status``. They must agree, except under socket activation, where the listener is the
    service manager that started the agent: then it must be the agent's parent. (Trusting the
    listener alone made ``keyagent -k`` signal the manager, e.g. ``systemd --user``.)
    """
    from keyagent.client import Client
    from keyagent.errors import KeyagentError

    try:
        with Client(path, timeout=10) as client:
            claimed = client.status().get("pid")
            listener = client.peer_pid
    except KeyagentError:
        return None
    if not isinstance(claimed, int) or isinstance(claimed, bool) or claimed <= 1:
        return None
    if claimed == listener or (listener is not None and _parent_of(claimed) == listener):
        return claimed
    return None


def _systemd_agent(path: str) -> int | None:
    """The pid of the agent on ``path`` if the user manager runs it (as keyagent.service),
    else None: an agent started by hand is not one, even with the units installed."""
    if not paths.systemd_unit_installed():  # cheap, and nothing to connect to otherwise
        return None
    pid = _agent_pid(path)
    return pid if pid is not None and _under_systemd(pid) else None


def _under_systemd(pid: int) -> bool:
    """Whether ``pid`` runs in keyagent.service's control group (``/proc/PID/cgroup``)."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="replace") as cgroups:
            # One "ID:CONTROLLERS:PATH" line per hierarchy; cgroup v2 has just "0::PATH".
            return any(
                line.rstrip("\n").rpartition("/")[2] == paths.SYSTEMD_SERVICE for line in cgroups
            )
    except OSError:
        return False


def _remove_private_dir(args: argparse.Namespace) -> None:
    """Remove the directory made for this agent's socket alone (no runtime directory, or
    beside an outer agent) when start-up fails; rmdir removes it only if it is empty."""
    directory = getattr(args, "private_dir", None)
    if directory:
        with contextlib.suppress(OSError):
            os.rmdir(directory)


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            # "pid (comm) state ppid ...": comm may hold spaces or parentheses; split after it.
            return int(stat_file.read().rpartition(b")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _fail(message: str, err: TextIO | None = None) -> None:
    """Write ``keyagent: MESSAGE`` to stderr (or ``err``), escaped: messages name paths and
    values from the environment and the command line (KEYAGENT_SOCK, KEYAGENT_CONFIG), and a
    control character in one must not reach the terminal raw."""
    (sys.stderr if err is None else err).write(f"keyagent: {one_line(message)}\n")


def kill_agent(syntax: str, out: TextIO, err: TextIO) -> int:
    """``keyagent -k``: SIGTERM to ``$KEYAGENT_PID``, but only if that pid is the process
    listening on ``$KEYAGENT_SOCK``: a stale or forged variable must not kill something else.
    """
    raw = os.environ.get(paths.PID_ENV, "")
    path = paths.socket_path()
    if not raw:
        if path and _systemd_agent(path) is not None:
            _fail(f"the agent on {path} runs under systemd; stop it with {SYSTEMD_STOP}", err)
        else:
            _fail(f"{paths.PID_ENV} is not set to an agent's pid; nothing to kill", err)
        return EXIT_FAILURE
    if not (raw.isascii() and raw.isdigit()) or int(raw) <= 1:
        _fail(
            f"{paths.PID_ENV} is set, but not to a process id (a number above 1);"
            f' nothing was killed: set it to the agent\'s pid, as eval "$(keyagent)" does',
            err,
        )
        return EXIT_FAILURE
    pid = int(raw)
    if not path:
        _fail(
            f"{paths.SOCKET_ENV} is not set, so nothing shows that pid {pid} is an"
            f" agent; nothing was killed: set {paths.SOCKET_ENV} to its socket",
            err,
        )
        return EXIT_FAILURE
    # A pidfd pins the process: the pid cannot be reused between the check and the signal.
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        _fail(f"no process {pid}; the agent is already gone", err)
        return EXIT_FAILURE
    try:
        agent = _agent_pid(path)
        if agent != pid:
            found = "no agent answers there" if agent is None else f"the agent there is pid {agent}"
            hint = f"check {paths.PID_ENV} and {paths.SOCKET_ENV}"
            if agent is not None and _under_systemd(agent):
                hint = f"that agent runs under systemd: stop it with {SYSTEMD_STOP}"
            _fail(
                f"pid {pid} is not the agent on {path} ({found}); nothing was killed: {hint}", err
            )
            return EXIT_FAILURE
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        except ProcessLookupError:
            _fail(f"no process {pid}; the agent is already gone", err)
            return EXIT_FAILURE
        except PermissionError:
            _fail(f"process {pid} is not yours; check {paths.PID_ENV}", err)
            return EXIT_FAILURE
    finally:
        os.close(pidfd)
    out.write(unset_lines(syntax, pid))
    return EXIT_OK


def systemd_lines(syntax: str, socket_path: str) -> str:
    """For eval "$(keyagent)" when the agent on the default socket runs under systemd: use
    it (clients find it by default; the lines export the socket all the same, and clear a
    stale pid) and say how it is stopped."""
    quoted = _quote(syntax, socket_path)
    return (
        _set(syntax, paths.SOCKET_ENV, socket_path)
        + _set(syntax, paths.HTTP_SOCKET_ENV, paths.http_socket_path(socket_path))
        + _unset(syntax, paths.PID_ENV)
        + f"echo keyagent runs under systemd on {quoted}: stop it with {SYSTEMD_STOP};\n"
    )


class HttpListener(NamedTuple):
    """The HTTP socket (keyagent.proxy): its path, file identity (None if systemd made it)
    and listening socket."""

    path: str
    bound: FileIdentity | None
    listener: socket.socket


def split_inherited(
    named: list[tuple[str, socket.socket]],
) -> tuple[list[socket.socket], list[socket.socket]]:
    """The agent sockets and the HTTP sockets among those socket activation passed.

    A socket named ``http`` (``FileDescriptorName=http``, in a socket unit of its own) is
    an HTTP socket and every other one an agent socket. Without that name, the order
    decides, as systemd passes a unit's sockets in the order of its ``ListenStream=``
    lines: the shipped unit lists agent.sock first and http.sock second.
    """
    if any(name == HTTP_FD_NAME for name, _ in named):
        agent = [sock for name, sock in named if name != HTTP_FD_NAME]
        return agent, [sock for name, sock in named if name == HTTP_FD_NAME]
    socks = [sock for _, sock in named]
    return socks[:1] + socks[2:], socks[1:2]


HTTP_FD_NAME = "http"


# --- process set-up ------------------------------------------------------------------------


def _temporary_directory() -> str:
    import tempfile

    return tempfile.gettempdir()


def run_command(command: list[str], agent: int) -> int:
    """``keyagent CMD``: run CMD, then stop the agent and wait for it; CMD's exit status.

    The agent deletes its ephemeral keys on the service as it stops, and says on stderr
    which it could not delete: returning before that would leave a CI job or a container
    that ends with CMD to kill it half-way, keys left valid and nobody told.

    Meanwhile this process stays as a shell stays with its foreground job. CMD gets the
    descriptors and ignored signals this process was given (a make jobserver, ``nohup``).
    Ctrl-C and Ctrl-\\ at the terminal reach CMD's process group: they are CMD's to act on.
    A SIGTERM or SIGHUP sent to this process is passed on to CMD. Once CMD has ended,
    SIGINT, SIGQUIT or SIGTERM cuts the agent's wait short (its second signal); a SIGHUP
    does not (a hang-up may come twice, from the shell and from the terminal). A SIGUSR1
    is passed on to the agent, which forgets every key."""
    import subprocess

    watched = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP)
    ignored = {number for number in watched if signal.getsignal(number) is signal.SIG_IGN}
    running: list[subprocess.Popen[bytes]] = []
    early: list[int] = []  # passed on once CMD has started
    stopping = False

    def on_signal(received: int, _frame: object) -> None:
        if stopping:
            if received != signal.SIGHUP:
                _signal(agent, signal.SIGTERM)
        elif received in (signal.SIGTERM, signal.SIGHUP):
            if running:
                running[0].send_signal(received)
            else:
                early.append(received)

    # Handled before CMD starts, so that no signal finds this process unprepared. A handler
    # (unlike SIG_IGN) does not pass on to CMD, which starts with the default.
    for number in watched:
        if number not in ignored:
            signal.signal(number, on_signal)
    if signal.getsignal(signal.SIGUSR1) is not signal.SIG_IGN:
        # "Forget every key" is the agent's: a screen-lock hook's pkill -USR1 -x keyagent
        # reaches this process too (same name), which SIGUSR1 would otherwise kill,
        # leaving CMD without its agent.
        signal.signal(signal.SIGUSR1, lambda _number, _frame: _signal(agent, signal.SIGUSR1))
    try:
        process = subprocess.Popen(command, close_fds=False)  # the user's own command line
    except OSError as error:
        _fail(f"{command[0]}: {os.strerror(error.errno or 0)}")
        status = 126 if error.errno == errno.EACCES else 127
    else:
        running.append(process)
        for received in early:
            process.send_signal(received)
        status = process.wait()
    stopping = True
    _signal(agent, signal.SIGTERM)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(agent, 0)
    if status < 0:  # ended by a signal: end by the same one, as a shell would report it
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # CMD's core dump is CMD's own
        with contextlib.suppress(OSError, ValueError):  # SIGKILL, SIGSTOP: no handler
            signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
        return 128 - status  # a signal this process could not die of (SIGCHLD, say)
    return status


def _signal(pid: int, number: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, number)


def die_with_parent(parent: int) -> None:
    """In command mode: get SIGTERM when the command (our parent) exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the command exited before the line above took effect
        os.kill(os.getpid(), signal.SIGTERM)


def configure_logging(*, debug: bool) -> None:
    """Messages of this start-up process go to stderr (the serving process sets up its own)."""
    root = logging.getLogger("keyagent")
    root.handlers.clear()
    root.propagate = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("keyagent[%(process)d]: %(levelname)s: %(message)s"))
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.addHandler(handler)


# --- main --------------------------------------------------------------------------------


CONFIGURED = (
    "lifetime", "ca_bundle", "connect_timeout", "read_timeout", "validate_after",
    "idle_timeout", "line_timeout", "max_connections", "max_keys", "audit_entries",
    "http_workers", "stop_timeout",
)  # fmt: skip
FILE_ONLY = ("export", "allow_exe", "askpass", "confirm_timeout", "keep_created_keys")
"""Settings with no flag of their own: from the environment, the file or the default."""


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
    for name in FILE_ONLY:
        setattr(args, name, getattr(config, name))


def askpass_problem(path: str) -> str | None:
    """Why ``path`` cannot be the askpass program, or None: it must be a trusted file (see
    :mod:`keyagent.trust`) that the agent's user may execute."""
    from keyagent.trust import UntrustedFile, check_trusted

    try:
        info = check_trusted(path, harm="answer the agent's confirmations in your place")
    except UntrustedFile as error:
        return f"askpass program {error.message}"
    if not stat.S_ISREG(info.st_mode) or not os.access(path, os.X_OK):
        return (
            f"askpass program {path}: is not an executable file; run chmod u+x {path}, or "
            "set KEYAGENT_ASKPASS (or askpass in the config) to another program"
        )
    return None


MFD_NOEXEC_SEAL = 0x0008  # os.MFD_NOEXEC_SEAL from Python 3.12 on


def exec_core(
    args: argparse.Namespace,
    path: str,
    bound: FileIdentity | None,
    listener: socket.socket,
    *,
    foreground: bool,
    notify_address: str | None,
    announce: str | None = None,
    ready_fd: int | None = None,
    http: HttpListener | None = None,
) -> NoReturn:
    """Become the serving process (:mod:`keyagent.core`): same pid, a lean interpreter.

    The hand-off travels in a memfd whose descriptor is the one argument; the listening
    socket, the readiness pipe and the descriptor for the shell lines are inherited.
    """
    # The daemon's module search path, in its order (the standard library before anything
    # installed), without the script's directory or the current directory that the
    # interpreter puts first (unless -P / PYTHONSAFEPATH kept it off).
    search_path: list[str] = []
    for entry in sys.path if sys.flags.safe_path else sys.path[1:]:
        if entry and os.path.isabs(entry) and entry not in search_path:
            search_path.append(entry)
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if package_parent not in search_path:  # an editable install's finder hook, say
        search_path.append(package_parent)
    inherited = [listener.fileno()]
    if http is not None:
        inherited.append(http.listener.fileno())
    announce_fd: int | None = None
    announced = b""
    if announce is not None:
        try:
            announce_fd = sys.stdout.fileno()  # a caller may have replaced sys.stdout
        except (AttributeError, OSError, ValueError):  # not a file: the real stdout, then
            announce_fd = 1
        encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
        # Bytes as the daemon would have written them; a path that is not valid in the
        # locale's encoding keeps its original bytes.
        announced = announce.encode(encoding, "surrogateescape")
        inherited.append(announce_fd)
    if ready_fd is not None:
        inherited.append(ready_fd)
    handoff = Handoff(
        sys_path=search_path,
        socket_path=path,
        bound=bound,
        listener_fd=listener.fileno(),
        foreground=foreground,
        debug=args.debug,
        notify=notify_address,
        private_dir=getattr(args, "private_dir", None),
        settings=Settings(**{name: getattr(args, name) for name in Settings.__slots__}),
        announce_fd=announce_fd,
        announce=announced,
        ready_fd=ready_fd,
        http_socket_path=None if http is None else http.path,
        http_bound=None if http is None else http.bound,
        http_listener_fd=None if http is None else http.listener.fileno(),
        leftovers_path=paths.leftovers_path(path),
        errors_to_stderr=bool(args.command) and not foreground,
    )
    try:  # sealed non-executable where the kernel knows the flag (Linux 6.3+)
        memfd = os.memfd_create("keyagent-handoff", MFD_NOEXEC_SEAL)
    except OSError:
        memfd = os.memfd_create("keyagent-handoff", 0)
    os.write(memfd, handoff.to_json())
    os.lseek(memfd, 0, os.SEEK_SET)
    inherited.append(memfd)
    for fd in inherited:
        os.set_inheritable(fd, True)
    sys.stdout.flush()
    sys.stderr.flush()
    serve_script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_serve.py")
    os.execv(sys.executable, [sys.executable, "-I", "-S", serve_script, str(memfd)])


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command[:1] == ["--"]:  # argparse keeps the "--" that ends the options: not CMD
        args.command = args.command[1:]
    syntax = shell_syntax(args.syntax)
    if args.kill:
        return kill_agent(syntax, sys.stdout, sys.stderr)
    foreground = args.foreground or args.debug
    if foreground and args.command:
        _fail("-D/-d and a command exclude each other")
        return EXIT_USAGE
    configure_logging(debug=args.debug)
    if args.ca_bundle and args.insecure:
        _fail("--ca-bundle and --insecure exclude each other")
        return EXIT_USAGE
    try:
        apply_config(args)
    except ConfigError as error:
        _fail(error.message)
        return EXIT_CONFIG
    # Where the leftovers file goes: checked before anything is bound, as the serving
    # process would refuse it only once the sockets exist.
    state = paths.state_dir()
    if (problem := path_problem(state)) is not None:
        _fail(
            f"the state directory {state} is not usable: {problem}; it comes from "
            "XDG_STATE_HOME (else ~/.local/state): set XDG_STATE_HOME to a plain path"
        )
        return EXIT_CONFIG
    named_by = "CA bundle"
    if not args.ca_bundle and not args.insecure:
        # requests would read these on every new connection, unchecked: whoever could replace
        # the file later would become a trusted CA. Held to the --ca-bundle rules instead.
        for variable in CA_BUNDLE_VARIABLES:
            if os.environ.get(variable):
                args.ca_bundle, named_by = os.environ[variable], f"CA bundle (${variable})"
                break
    if args.ca_bundle:
        # Refused before anything is bound if another user could change the bundle (or a
        # directory or link on its path, see keyagent.trust), or if it holds no usable CA.
        from keyagent.trust import UntrustedFile, read_ca_bundle

        args.ca_bundle = os.path.abspath(args.ca_bundle)  # the daemon changes directory
        try:
            # Read once, here: the serving process gets this text, never the path to re-read.
            args.ca_certificates = read_ca_bundle(args.ca_bundle)
        except UntrustedFile as error:
            _fail(f"{named_by} {error.message}")
            return EXIT_CONFIG
    if args.askpass:
        # Whoever can replace the askpass program answers every confirmation: held to the
        # rules of the CA bundle (keyagent.trust), and checked once, here, before serving.
        problem = askpass_problem(args.askpass)
        if problem is not None:
            _fail(problem)
            return EXIT_CONFIG
        args.askpass = os.path.abspath(args.askpass)  # the daemon changes directory
    # systemd's NOTIFY_SOCKET, taken out of the environment before anything can inherit it;
    # the serving process notifies there (or nowhere, without one).
    notify_address = os.environ.pop(NOTIFY_ENV, None)
    try:
        inherited = listen_fds_with_names()
    except ListenFdsError as error:
        _fail(str(error))
        return EXIT_FAILURE
    http: HttpListener | None = None
    if inherited:
        # Socket activation: systemd made the socket (mode, directory, path) and removes it;
        # we serve it as given. The peer-uid check still applies to every connection.
        agent_socks, http_socks = split_inherited(inherited)
        if not agent_socks:
            _fail("socket activation passed no agent socket; fix the unit")
            return EXIT_FAILURE
        listener: socket.socket = agent_socks[0]
        for sock in agent_socks[1:] + http_socks[1:]:
            log.warning("ignoring extra inherited socket %s", sock.getsockname())
            sock.close()
        if http_socks:
            http_name = http_socks[0].getsockname()
            http = HttpListener(
                http_name if isinstance(http_name, str) else "(inherited socket)",
                None,
                http_socks[0],
            )
        name = listener.getsockname()
        path = name if isinstance(name, str) and name else "(inherited socket)"
        bound = None
        foreground = True  # a socket-activated service must not fork away from its manager
    else:
        default = None if args.socket else paths.default_socket_path()
        # -a is checked as it is parsed; a path from the environment before anything is
        # made there or printed (bind_listener checks again, whatever the source).
        from_environment = default if default is not None else _temporary_directory()
        if not args.socket and (problem := socket_path_problem(from_environment)) is not None:
            _fail(problem)
            return EXIT_FAILURE
        if args.socket:
            path = os.path.abspath(args.socket)
        elif default is None:
            # No runtime directory: a fixed fallback such as /tmp/runtime-UID could be made
            # first by another user and keep the agent from starting. A fresh directory with
            # a random name cannot; clients learn it only from KEYAGENT_SOCK.
            path = paths.private_socket_path()
            args.private_dir = os.path.dirname(path)  # the serving process removes it at exit
        else:
            path = default
            if not foreground and not args.command and _systemd_agent(path) is not None:
                sys.stdout.write(systemd_lines(syntax, path))
                return EXIT_OK
        try:
            if path == default:
                # The runtime directory itself (XDG: owned by the user, mode 0700) must be
                # safe too, or whoever owns it could swap our directory inside it.
                # Followed if it is a link (the walk of check_ancestors checks the link).
                check_private_dir(os.path.realpath(os.path.dirname(os.path.dirname(path))))
            try:
                listener = bind_listener(path)
            except AgentRunning:
                if not (args.command and path == default):
                    raise
                # An outer agent serves the default path: this one, whose command learns
                # its socket from the variables it is given, takes a private one (as
                # ssh-agent CMD always does) rather than refuse to start.
                path = paths.private_socket_path()
                args.private_dir = os.path.dirname(path)  # the serving process removes it
                listener = bind_listener(path)
        except SocketSetupError as error:
            _remove_private_dir(args)
            where = ""
            if getattr(args, "private_dir", None):
                where = " (the private directory is made in $TMPDIR, else /tmp)"
            _fail(f"{error}{where}")
            return EXIT_FAILURE
        if default is None and not args.socket:
            _fail(
                "XDG_RUNTIME_DIR is not set (to an absolute path): listening on"
                f" {path}, in a private"
                f" directory of its own; clients find it only through {paths.SOCKET_ENV}"
                ' (eval "$(keyagent)" sets it)'
            )
        bound = file_identity(path)
        http_path = paths.http_socket_path(path)
        try:
            http_listener = bind_listener(http_path, alive=accepts_connections)
        except SocketSetupError as error:
            listener.close()
            remove_socket(path, bound)
            _remove_private_dir(args)
            _fail(f"the HTTP socket: {error}")
            return EXIT_FAILURE
        http = HttpListener(http_path, file_identity(http_path), http_listener)

    if foreground:
        try:
            exec_core(
                args, path, bound, listener, foreground=True, notify_address=notify_address,
                announce=env_lines(syntax, path, os.getpid(), http and http.path), http=http,
            )  # fmt: skip
        except OSError as error:
            remove_socket(path, bound)
            if http is not None:
                remove_socket(http.path, http.bound)
            _remove_private_dir(args)
            _fail(f"could not start the agent: {error}")
            return EXIT_FAILURE

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
            # Listen again, from this process: SO_PEERCRED of a connection names the
            # process that last called listen(), and keyagent -k checks that it is the
            # KEYAGENT_PID printed below (this pid, kept across the exec).
            listener.listen(LISTEN_BACKLOG)
            if args.command:
                die_with_parent(parent)
            os.chdir("/")
            exec_core(
                args, path, bound, listener, foreground=False, notify_address=notify_address,
                ready_fd=ready_w, http=http,
            )  # fmt: skip
        except BaseException as error:  # noqa: BLE001  # the child must never return into the parent's code
            remove_socket(path, bound)
            if http is not None:
                remove_socket(http.path, http.bound)
            _remove_private_dir(args)
            _fail(f"could not start the agent: {type(error).__name__}: {error}")
        os._exit(EXIT_FAILURE)

    os.close(ready_w)
    listener.close()
    if http is not None:
        http.listener.close()
    with os.fdopen(ready_r, "rb") as ready_pipe:
        if ready_pipe.read(1) != b"R":
            _remove_private_dir(args)  # only if empty: the agent may still be on its way out
            _fail("the agent failed to start; run keyagent -d to see why")
            return EXIT_FAILURE
    if args.command:
        os.environ[paths.SOCKET_ENV] = path
        os.environ[paths.PID_ENV] = str(child)
        if http is not None:
            os.environ[paths.HTTP_SOCKET_ENV] = http.path
        else:  # an outer agent's HTTP socket is not this agent's
            os.environ.pop(paths.HTTP_SOCKET_ENV, None)
        return run_command(args.command, child)
    sys.stdout.write(env_lines(syntax, path, child, http and http.path))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
