"""``keyagent-ctl``: parse the command line, call the client, print. Nothing else.

Exit codes (stable, documented in the README):

* 0 — success
* 1 — the agent answered with an error (nothing found, locked, bad passphrase, ...)
* 2 — no agent reachable (as ``ssh-add``)
* 64 — usage error (``EX_USAGE``; argparse's own 2 would collide with "no agent")
* 78 — the configuration file is invalid (``EX_CONFIG``)
* 127 — ``exec``: the command was not found; 126 — it could not be run
* 130 — interrupted (Ctrl-C)
* 141 — the output pipe was closed early (as a command killed by SIGPIPE)

:data:`EXIT_STATUSES` holds the same list for ``--help`` and the manual page.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys

from keyagent.client import Client, shown
from keyagent.errors import AgentUnreachable, BadConfig, BadRequest, KeyagentError, ProtocolError

# argparse and getpass are imported where they are used: `keyagent-ctl get` runs in other
# tools' hot paths and takes a fast path that needs neither.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence
    from typing import Any, Final, TextIO

EXIT_OK, EXIT_AGENT_ERROR, EXIT_NO_AGENT, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 64, 78
EXIT_NOT_READY = 3  # as systemctl is-active (and LSB status) for a unit not running
EXIT_BROKEN_PIPE = 141
"""128 + SIGPIPE: what the shell reports for a command the closed pipe killed."""
DEFAULT_ENV_NAME = "CONDUCE_API_KEY"
UNRECORDED = (
    "the agent cannot record its ephemeral keys in its leftovers file (its log says why): "
    "if it is killed, those keys stay on the service until keyagent-ctl prune deletes them"
)


class UsageError(Exception):
    """The command line is wrong; exit 64 with the message."""


EXIT_STATUSES = (
    (EXIT_OK, "success"),
    (EXIT_AGENT_ERROR, "the agent refused (nothing found, locked, bad passphrase, ...)"),
    (EXIT_NO_AGENT, "no agent reachable (as ssh-add)"),
    (
        EXIT_NOT_READY,
        "service status: no agent would start at first use (units missing, or"
        " the socket not enabled and active)",
    ),
    (EXIT_USAGE, "usage error (EX_USAGE; argparse's own 2 would collide with no agent)"),
    (EXIT_CONFIG, "the configuration file is invalid (EX_CONFIG)"),
    (126, "exec: the command could not be run"),
    (127, "exec: the command was not found"),
    (130, "interrupted (Ctrl-C)"),
    (EXIT_BROKEN_PIPE, "the output pipe was closed early (as a command killed by SIGPIPE)"),
)
"""Every status keyagent-ctl exits with; --help and the manual page list them from here."""

ACCOUNT_COMMANDS = frozenset(
    {"add", "get", "list", "ls", "exec", "config", "login", "logout", "create"}
    | {"create-api-key", "list-api-keys", "remove", "remove-api-key"}
    | {"prune"}
    | {"rotate"}
)
"""The commands that act on one account, and so take --host and --user."""

LOCAL_COMMANDS = frozenset({"config", "completion", "service"})
"""The commands that talk to no agent, and so take no --socket."""

CONFIG_COMMANDS = frozenset(
    {"add", "create", "create-api-key", "list", "ls", "list-api-keys", "login", "logout"}
    | {"prune", "rotate", "config"}
)
"""The commands that may read the configuration file (for the account, when --host, --user
and the environment leave it open), and so take --config."""

SHELLS = ("bash", "zsh", "fish")
"""The shells `keyagent-ctl completion` writes a script for (through shtab)."""


def build_parser() -> argparse.ArgumentParser:
    import argparse

    from keyagent import __version__
    from keyagent._argparse import UsageParser as _Parser
    from keyagent._argparse import duration_type, entry_count_type, renamed
    from keyagent.protocol import MAX_LIFETIME

    # The agent's own limits, checked here too: a wrong value is a usage error (exit 64)
    # with a message, not a [bad_request] from the agent.
    _duration = duration_type(MAX_LIFETIME, "ten years, the longest lifetime the agent takes")
    # Options accepted before the command and after it (conduce-api style): SUPPRESS, so the
    # one the subcommand parses does not overwrite the one given before it with a default.
    connection = _Parser(add_help=False)
    connection.add_argument(
        "--socket",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="agent socket (default: $KEYAGENT_SOCK, else the per-user default)",
    )
    selectors = _Parser(add_help=False)
    selectors.add_argument(
        "--host",
        default=argparse.SUPPRESS,
        help="Conduce host (default: $KEYAGENT_HOST, else the configuration file)",
    )
    selectors.add_argument(
        "--user",
        default=argparse.SUPPRESS,
        help="account e-mail (default: $KEYAGENT_USER, else the configuration file)",
    )

    configured = _Parser(add_help=False)
    configured.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="configuration file the default host and user come from (default:"
        " $KEYAGENT_CONFIG, else ~/.config/keyagent/config.toml)",
    )

    exit_statuses = "\n".join(f"  {code:<5}{meaning}" for code, meaning in EXIT_STATUSES)
    parser: argparse.ArgumentParser = _Parser(
        prog="keyagent-ctl",
        description="Talk to a running keyagent: hold, fetch and manage Conduce API keys.",
        epilog=f"exit status:\n{exit_statuses}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        # --host/--user before the command, for the commands that take them (main refuses
        # them before any other command).
        parents=[connection, selectors, configured],
    )
    parser.add_argument("--version", action="version", version=f"keyagent-ctl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def command(name: str, help: str, *aliases: str) -> argparse.ArgumentParser:
        parents = [] if name in LOCAL_COMMANDS else [connection]
        if name in ACCOUNT_COMMANDS:
            parents.append(selectors)
        if name in CONFIG_COMMANDS:
            parents.append(configured)
        return sub.add_parser(
            name, help=help, aliases=list(aliases), parents=parents, description=help
        )

    def add_key_options(p: argparse.ArgumentParser) -> None:
        # -C as ssh-keygen's comment: keyagent's own -D means "stay in the foreground".
        p.add_argument(
            "--description",
            "-C",
            metavar="TEXT",
            help="a note kept with the key and shown by list",
        )
        p.add_argument(
            "-D",
            action=renamed("-C (--description)", "keyagent's own -D means stay in the foreground"),
            help=argparse.SUPPRESS,
        )
        p.add_argument(
            "--lifetime",
            "-t",
            type=_duration,
            help="forget the key after this long: seconds, or e.g. 15m, 8h, 2d",
        )
        p.add_argument(
            "--persist",
            action=argparse.BooleanOptionalAction,
            help="also keep it in the OS keyring (default: persist in the config file)",
        )
        p.add_argument(
            "--export",
            action=argparse.BooleanOptionalAction,
            help="--no-export: the key never leaves the agent (no get, no exec); use it"
            " through its HTTP socket (default: export in the agent's config file)",
        )
        p.add_argument(
            "--confirm",
            action="store_true",
            default=None,
            help="ask (through the agent's askpass program) before each use of the key",
        )
        p.add_argument(
            "--allow-exe",
            action="append",
            metavar="PATH",
            help="only this program may use the key (repeat for several; default: any, or"
            " allow_exe in the agent's config file)",
        )

    p = command("status", "show the agent's state")
    p.add_argument("--json", action="store_true", help="print JSON")
    command("hello", "check that an agent answers, and its protocol version")

    p = command("add", "hand an API key to the agent (read from stdin, or prompted)")
    add_key_options(p)

    p = command("get", "print the newest matching key, alone, on stdout")
    p.add_argument("--key-id", type=_key_id_argument, help=KEY_ID_HELP)

    p = command("list", "list held keys (never the secrets)", "ls")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--remote", action="store_true", help="also ask the Conduce service")

    p = command("forget", "drop a key from the agent's memory")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "key_id", nargs="?", metavar="KEY_ID", type=_key_id_argument, help=KEY_ID_HELP
    )
    group.add_argument("--all", action="store_true", help="forget every key")
    p.add_argument("--persist", action="store_true", help="also delete it from the OS keyring")
    p.add_argument(
        "--local",
        action="store_true",
        help="keep an ephemeral key on the service (by default forgetting one deletes it there)",
    )

    command("lock", "lock the agent with a passphrase (prompted, or from stdin)")
    command("unlock", "unlock the agent (passphrase prompted, or from stdin)")
    command("stop", "stop the agent")

    command("config", "print the effective configuration and where each value comes from")

    p = command("log", "show the audit log: who used which key, and what changed")
    p.add_argument("--json", action="store_true", help="print JSON, one entry per line")
    p.add_argument(
        "-n",
        type=entry_count_type,
        metavar="N",
        help="the last N entries only (default: all the agent keeps; 10 with --follow)",
    )
    p.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="then print each new entry as it happens, until interrupted (Ctrl-C)",
    )

    p = command("exec", "run a command with the key in its environment")
    p.add_argument(
        "--env",
        default=DEFAULT_ENV_NAME,
        metavar="NAME",
        help=f"variable to set (default: {DEFAULT_ENV_NAME}); not one that the loader, a"
        " shell or a language runtime reads (LD_*, PATH, PYTHON*, ...)",
    )
    p.add_argument("--key-id", type=_key_id_argument, help=KEY_ID_HELP)
    p.add_argument(
        "argv",
        nargs=argparse.REMAINDER,
        metavar="-- CMD ARGS",
        help="the command to run, after --; its exit status is keyagent-ctl's",
    )

    p = command("login", "log in to Conduce; the agent keeps the session, not the password")
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from stdin instead of prompting",
    )
    p.add_argument(
        "--confirm",
        action="store_true",
        default=None,
        help="ask (through the agent's askpass program) before each use of the session"
        " through the HTTP socket",
    )
    p.add_argument(
        "--allow-exe",
        action="append",
        metavar="PATH",
        help="only this program may use the session through the HTTP socket (repeat for"
        " several; default: any, or allow_exe in the agent's config file)",
    )
    command("logout", "drop the Conduce session from the agent")

    p = command("create", "create an API key on Conduce and hold it", "create-api-key")
    add_key_options(p)
    p.add_argument(
        "--print", action="store_true", dest="reveal", help="print the new key on stdout"
    )
    p.add_argument(
        "--keep",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the key on the service when its lifetime ends (default: delete it there,"
        " unless keep_created_keys is set in the config file)",
    )
    p.add_argument(
        "--rotate-every",
        type=_rotate_every_argument,
        metavar="DURATION",
        help="replace the key by a new one on this schedule (at least 1m; e.g. 1h, 1d),"
        " deleting the old one on the service; shorter than --lifetime",
    )

    p = command("rotate", "replace a held key by a new one on Conduce, then delete the old one")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "key_id", nargs="?", metavar="KEY_ID", type=_key_id_argument, help=KEY_ID_HELP
    )
    group.add_argument(
        "--all", action="store_true", help="rotate every key create made for the account"
    )
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command("list-api-keys", "list the account's API keys on Conduce (masked)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command("remove", "delete an API key on Conduce, then forget it", "remove-api-key")
    p.add_argument(
        "key",
        metavar="KEY_ID|-",
        help="the key's id (4 to 64 hex digits), or - to read the key itself from stdin",
    )

    _add_prune_parser(command)

    p = command("completion", "print a shell completion script (see the README)")
    p.add_argument("shell", choices=SHELLS, help="the shell to complete in")
    p.add_argument(
        "--program",
        choices=("keyagent-ctl", "keyagent"),
        default="keyagent-ctl",
        help="the command to complete (default: keyagent-ctl)",
    )
    _add_service_parser(sub)
    return parser


KEY_ID_HELP = "a key id as list shows it, or any 4 to 64 hex digits it starts with"
KEY_ID_USAGE = (
    "a key id is 4 to 64 hex digits (keyagent-ctl list shows them); if several keys start"
    " with the digits given, give more"
)


def _key_id_or_usage_error(text: str) -> None:
    from keyagent.protocol import is_key_id_prefix

    if not is_key_id_prefix(text):
        raise UsageError(f"--key-id: {KEY_ID_USAGE}")


def _key_id_argument(text: str) -> str:
    """argparse ``type=`` for key ids; the message never repeats the text (it may be a key)."""
    import argparse

    from keyagent.protocol import is_key_id_prefix

    if not is_key_id_prefix(text):
        raise argparse.ArgumentTypeError(KEY_ID_USAGE)
    return text


def _rotate_every_argument(text: str) -> float:
    """argparse ``type=`` for ``--rotate-every``: a duration the agent takes as an interval
    (:func:`keyagent.rules.rotate_every_problem`)."""
    import argparse

    from keyagent.duration import parse_duration
    from keyagent.rules import rotate_every_problem

    try:
        seconds = parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    problem = rotate_every_problem(seconds)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"'{text}' must be {problem}, at most ten years")
    return seconds


# --- helpers ---------------------------------------------------------------------------------


def _selectors(args: argparse.Namespace, *, check: bool = True) -> tuple[str | None, str | None]:
    """--host/--user, else $KEYAGENT_HOST/$KEYAGENT_USER; either may be missing.

    Checked as the agent will check them (unless ``check`` is false: ``get``'s fast path
    checks only once the agent has refused), so a wrong one is a usage error (exit 64),
    found before anything is sent.
    """
    host = getattr(args, "host", None) or os.environ.get("KEYAGENT_HOST") or None
    user = getattr(args, "user", None) or os.environ.get("KEYAGENT_USER") or None
    if check:
        _check_selectors(args, host, user)
    return host, user


def _check_selectors(args: argparse.Namespace, host: str | None, user: str | None) -> None:
    from keyagent.errors import BadRequest
    from keyagent.protocol import OPS, host_problem

    if host is not None:
        problem = host_problem(host)
        if problem is not None:
            source = "--host" if getattr(args, "host", None) else "KEYAGENT_HOST"
            # The reason names the grammar, not the text: a pasted secret must not be echoed.
            raise UsageError(
                f"{source} is not a host: {problem}; give a name such as app.conduce.com,"
                " an IPv4 address or a bracketed IPv6 address, optionally with :PORT"
            )
    if user is not None:
        try:
            OPS["add"]["user"][0]("user", user)
        except BadRequest as error:
            source = "--user" if getattr(args, "user", None) else "KEYAGENT_USER"
            raise UsageError(f"{source}: {error.message}; give the account's e-mail") from None


def _account(args: argparse.Namespace) -> tuple[str, str]:
    """The account a command acts on: flags, else environment, else the config file."""
    host, user = _selectors(args)
    if host is None or user is None:
        # Only now pay for reading the file (which checks its own values, exit 78): get and
        # exec never need it.
        from keyagent.config import load

        config = load(getattr(args, "config", None))
        host, user = host or config.host, user or config.user
    if host is None or user is None:
        missing = " and ".join(n for n, v in (("--host", host), ("--user", user)) if v is None)
        raise UsageError(
            f"{missing} needed (or set KEYAGENT_HOST / KEYAGENT_USER, or host/user in the"
            " config file)"
        )
    return host, user


def _check_description(description: str | None) -> None:
    """--description as the agent checks it: a wrong one is a usage error, found first."""
    if description is None:
        return
    from keyagent.errors import BadRequest
    from keyagent.protocol import OPS

    try:
        OPS["add"]["description"][0]("description", description)
    except BadRequest as error:
        raise UsageError(f"--description: {error.message}") from None


def read_secret(prompt: str, stdin: TextIO, *, whole: bool = False, prompt_tty: bool = True) -> str:
    """A secret from a pipe (first line, or all of it), or typed without echo at a terminal."""
    if prompt_tty and stdin.isatty():
        value = _prompt(prompt)
    else:
        try:
            value = stdin.read() if whole else stdin.readline()
        except UnicodeDecodeError:  # a strict UTF-8 locale: said without the bytes read
            raise _not_text(prompt) from None
        value = value.strip() if whole else value.rstrip("\r\n")
    if not value:
        raise UsageError(f"empty input for: {prompt.strip().rstrip(':')}")
    return value


def _prompt(prompt: str) -> str:
    import getpass

    try:
        return getpass.getpass(prompt)
    except UnicodeDecodeError:
        raise _not_text(prompt) from None


def _not_text(prompt: str) -> UsageError:
    return UsageError(
        f"the input for {prompt.strip().rstrip(':')} is not text in this locale's encoding; "
        "enter it again"
    )


def _print_json(value: Any, out: TextIO) -> None:
    json.dump(value, out, indent=2, sort_keys=True)
    out.write("\n")


def _table(rows: list[list[str]], out: TextIO) -> None:
    rows = [[shown(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            + "\n"
        )


# --- the shape of the agent's replies -----------------------------------------------------
# A reply is data from another process (a buggy or different program of the same uid can
# serve the socket): each member a command reads is checked where it reads it, and one of the
# wrong shape is a bad_reply (exit 1), as a reply that is not an object is, never a traceback.
# The message names the member, never its value (which may hold a key).


def _bad_reply(what: str) -> ProtocolError:
    return ProtocolError(
        f"the agent sent a reply this client does not understand ({what}): check what"
        " listens on the agent's socket, or upgrade keyagent"
    )


def _objects(value: object, member: str) -> list[dict[str, Any]]:
    """A member that is a list of objects (``keys``, ``sessions``, ``entries``...); absent
    or null is empty."""
    if value is None:
        return []
    if isinstance(value, list) and all(isinstance(item, dict) for item in value):
        return value
    raise _bad_reply(f"{member!r} is not a list of objects")


def _object(value: object, member: str) -> dict[str, Any]:
    """A member that is an object (an ``error``); absent or null is empty."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    raise _bad_reply(f"{member!r} is not an object")


def _number(value: object, member: str) -> float | None:
    """A member that is a number of seconds, or null."""
    if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
        return value
    raise _bad_reply(f"{member!r} is not a number")


def _strings(value: object, member: str) -> list[str]:
    """A member that is a list of strings (``allowed_exes``); absent or null is empty."""
    if value is None:
        return []
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise _bad_reply(f"{member!r} is not a list of strings")


def _print_keys(keys: list[dict[str, Any]], out: TextIO) -> None:
    if not keys:
        out.write("no keys held\n")
        return
    rows = [
        ["KEY_ID", "HOST", "USER", "EXPIRES", "EPHEMERAL", "SOURCE", "RULES", "ROTATES",
         "DESCRIPTION"]
    ]  # fmt: skip
    for key in keys:
        source = str(key.get("source", ""))
        if key.get("stale"):
            source += " (stale)"
        if key.get("refused"):  # the service refused it when the agent last checked
            source += " (refused)"
        rows.append(
            [
                str(key.get("key_id") or key.get("masked") or ""),
                str(key.get("host", "")),
                str(key.get("user", "")),
                str(key.get("expires") or "never"),
                "yes" if key.get("ephemeral") else "no",
                source,
                _rules(key),
                _rotates(key),
                str(key.get("description") or ""),
            ]
        )
    _table(rows, out)


def _rotates(key: dict[str, Any]) -> str:
    """When a key with a rotation schedule is next replaced, and how often; ``-`` for none."""
    every = _number(key.get("rotate_every"), "rotate_every")
    if not every:
        return "-"
    return f"{key.get('next_rotation')} (every {every:g}s)"


def _programs(paths: list[str] | None) -> list[str] | None:
    """``--allow-exe`` paths, each an executable file here: a rule naming nothing that can
    run could never be met (``--allow-exe curl`` in the wrong directory, a typo)."""
    for path in paths or ():
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise UsageError(
                f"--allow-exe {shown(path)}: no executable file there; name the program by its"
                " full path (command -v PROGRAM prints it)"
            )
    return paths


def _rules(key: dict[str, Any]) -> str:
    """A key's rules in a few words: ``no-export``, ``confirm``, ``only PATH,PATH``; ``-``
    for none."""
    rules = []
    if key.get("exportable") is False:
        rules.append("no-export")
    if key.get("confirm"):
        rules.append("confirm")
    programs = _strings(key.get("allowed_exes"), "allowed_exes")
    if programs:
        rules.append("only " + ",".join(programs))
    return " ".join(rules) or "-"


def _print_remote(keys: list[dict[str, Any]], out: TextIO) -> None:
    if not keys:
        out.write("no API keys on the service\n")
        return
    rows = [["KEY", "CREATED", "HELD", "KEYAGENT", "KEY_ID", "DESCRIPTION"]]
    for key in keys:
        rows.append(
            [
                str(key.get("masked", "")),
                str(key.get("created") or "?"),
                "pending deletion"
                if key.get("pending_deletion")
                else ("yes" if key.get("held") else "no"),
                "yes" if key.get("keyagent") else "no",  # created by keyagent (its mark)
                str(key.get("key_id") or "-"),
                str(key.get("description") or ""),
            ]
        )
    _table(rows, out)


# --- commands ----------------------------------------------------------------------------

if TYPE_CHECKING:
    Handler = Callable[[argparse.Namespace, Client, TextIO, TextIO], int]


def cmd_hello(args: argparse.Namespace, client: Client, stdin: TextIO, out: TextIO) -> int:
    result = client.hello()
    out.write(f"keyagent {shown(result.get('version'))} protocol {shown(result.get('protocol'))}\n")
    return EXIT_OK


def cmd_status(args: argparse.Namespace, client: Client, stdin: TextIO, out: TextIO) -> int:
    status = client.status()
    sessions = _objects(status.get("sessions"), "sessions")
    pending_deletions = _objects(status.get("pending_deletions"), "pending_deletions")
    if args.json:
        _print_json(status, out)
        return EXIT_OK
    out.write(
        f"agent pid {shown(status.get('pid'))} on {shown(status.get('socket'))}, version"
        f" {shown(status.get('version'))}, up {shown(status.get('uptime'))}s\n"
        f"locked: {'yes' if status.get('locked') else 'no'}\n"
    )
    if status.get("http_socket"):
        out.write(f"HTTP socket: {shown(status['http_socket'])}\n")
    workers = status.get("http_workers")
    most = status.get("http_workers_max")
    # An older agent does not say how many it may run: then only how many it does.
    of_most = f" of at most {shown(most)}" if most is not None else ""
    if isinstance(workers, list) and workers:
        pids = ", ".join(shown(pid) for pid in workers)
        out.write(f"HTTP workers: {len(workers)}{of_most} (pid {pids})\n")
    elif most is not None:
        out.write(f"HTTP workers: none running, at most {shown(most)}\n")
    if "keys" in status:  # a locked agent may not say
        out.write(f"keys held: {shown(status.get('keys'))}\n")
    for session in sessions:
        state = (
            "expired"
            if session.get("expired")
            else ("logged in" if session.get("logged_in") else "logged out")
        )
        # A logged-out session has no start time: say so without a placeholder. The time is
        # the login's: an expired session says so rather than seem to have expired then.
        since = ""
        if session.get("since"):
            login = shown(session["since"])
            since = f" (logged in {login})" if session.get("expired") else f" since {login}"
        rules = _rules(session)
        ruled = f" ({shown(rules)})" if rules != "-" else ""
        out.write(
            f"session {shown(session.get('user'))}@{shown(session.get('host'))}: {state}{since}"
            f"{ruled}\n"
        )
    leftovers = status.get("leftovers")
    if isinstance(leftovers, dict) and leftovers.get("failing") is True:
        out.write(f"warning: {UNRECORDED} ({shown(leftovers.get('path'))})\n")
    for pending in pending_deletions:
        note = ""
        if pending.get("left_over"):  # named by the leftovers file of a killed agent
            waits = "; waits for keyagent-ctl login" if pending.get("waiting_for_login") else ""
            note = f" (left by an earlier agent{waits})"
        out.write(
            f"pending deletion of key {shown(pending.get('key_id'))} on"
            f" {shown(pending.get('user'))}@{shown(pending.get('host'))} since"
            f" {shown(pending.get('since'))}: {shown(pending.get('attempts'))} attempt(s)"
            f"{note}\n"
        )
    return EXIT_OK


def cmd_add(args: argparse.Namespace, client: Client, stdin: TextIO, out: TextIO) -> int:
    host, user = _account(args)
    _check_description(args.description)
    programs = _programs(args.allow_exe)  # before the key is asked for
    key = read_secret("API key: ", stdin, whole=True)
    held = client.add(
        host,
        user,
        key,
        description=args.description,
        lifetime=args.lifetime,
        persist=args.persist,
        export=args.export,
        confirm=args.confirm,
        allow_exe=programs,
    )
    expires = f", expires {shown(held['expires'])}" if held.get("expires") else ""
    out.write(f"added key {shown(held.get('key_id'))} for {shown(user)}@{shown(host)}{expires}\n")
    return EXIT_OK


def cmd_get(args: argparse.Namespace, client: Client, stdin: TextIO, out: TextIO) -> int:
    # The fast path skips the checks (importing the protocol module would cost more than
    # the rest of the command) and makes them only once the request has failed.
    fast = getattr(args, "fast", False)
    host, user = _selectors(args, check=not fast)
    try:
        key = client.get(host, user, args.key_id)
    except KeyagentError:  # no agent, a refusal: wrong arguments are the first thing to say
        if fast:
            _check_selectors(args, host, user)
            if args.key_id is not None:
                _key_id_or_usage_error(args.key_id)
        raise
    out.write(key + "\n")
    return EXIT_OK


def cmd_list(args: argparse.Namespace, client: Client, stdin: TextIO, out: TextIO) -> int:
    if args.remote:
        account = _account(args)
        result = client.call("list", host=account[0], user=account[1], remote=True)
        remote = _objects(result.get("remote"), "remote")
        held = _objects(result.get("keys"), "keys")
        if args.json:
            _print_json(result, out)
            return EXIT_OK
        _print_remote(remote, out)
        stale = [key for key in held if key.get("stale")]
        if stale:
            out.write("\nheld here but no longer on the service (stale):\n")
            _print_keys(stale, out)
        return EXIT_OK
    host, user = _selectors(args)
    keys = _objects(client.list(host, user), "keys")
    if args.json:
        _print_json({"keys": keys}, out)
    else:
        _print_keys(keys, out)
    return EXIT_OK


def cmd_list_api_keys(args: argparse.Namespace, client: Client, stdin: TextIO, out: TextIO) -> int:
    args.remote = True
    return cmd_list(args, client, stdin, out)


def cmd_forget(args: argparse.Namespace, client: Client, stdin: TextIO, out: TextIO) -> int:
    result = client.call(
        "forget",
        key_id=args.key_id,
        all=args.all or None,
        persist=args.persist or None,
        local=args.local or None,
    )
    count = _count(result, "forgotten")
    line = f"forgot {count} key{'s' if count != 1 else ''}"  # ints: nothing to escape
    unpersisted = _count(result, "unpersisted")
    if unpersisted > count:  # entries of keys not held (ints: nothing to escape)
        line += f"; deleted {unpersisted} OS keyring entr{'ies' if unpersisted != 1 else 'y'}"
    deleting = _count(result, "deleting")
    if deleting:
        line += f"; deleting {deleting} on the service (forget --local keeps keys there)"
    out.write(line + "\n")
    _say_staying(result, out)
    return EXIT_OK


def _say_staying(result: dict[str, Any], out: TextIO) -> None:
    """Name the keys the agent made that stay valid on the service with nobody holding
    them (``staying`` in forget's and stop's replies), and how to delete each."""
    from keyagent.protocol import remove_command

    for key in _objects(result.get("staying"), "staying"):
        key_id, host, user = (shown(key.get(name)) for name in ("key_id", "host", "user"))
        # Quoted: the line is there to be pasted, and an account name may hold $( or '.
        command = remove_command(host, user, key_id)
        out.write(
            f"key {key_id} of {user} on {host} stays valid on the service, held by nobody;"
            f" to delete it, log in to the account with an agent, then run: {command}\n"
        )


def _count(result: dict[str, Any], member: str) -> int:
    """A count in a reply; 0 if it is absent (or not a count: an agent's reply is data)."""
    value = result.get(member, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _passphrase(value: str) -> str:
    """A passphrase the agent would take (1 to 1024 characters, no control character), or
    a usage error that never shows it."""
    from keyagent.rules import has_control_characters

    if len(value) > 1024 or has_control_characters(value):
        raise UsageError(
            "the passphrase must be at most 1024 characters, without control characters (a"
            " tab, say)"
        )
    return value


def cmd_lock(args: argparse.Namespace, client: Client, stdin: TextIO, out: TextIO) -> int:
    passphrase = _passphrase(read_secret("Lock passphrase: ", stdin))
    if stdin.isatty() and _prompt("Again: ") != passphrase:
        raise UsageError("the passphrases differ; nothing was locked")
    client.lock(passphrase)
    out.write("agent locked\n")
    return EXIT_OK


def cmd_unlock(args: argparse.Namespace, client: Client, stdin: TextIO, out: TextIO) -> int:
    client.unlock(_passphrase(read_secret("Unlock passphrase: ", stdin)))
    out.write("agent unlocked\n")
    return EXIT_OK


def cmd_stop(args: argparse.Namespace, client: Client, stdin: TextIO, out: TextIO) -> int:
    result = client.stop()
    deleting, waiting = _count(result, "deleting"), _count(result, "waiting")
    # The agent answered before deleting or waiting: this returns now, and says what it
    # still does.
    steps = []
    if waiting:
        steps.append(f"waits for {waiting} create(s) or rotation(s) under way")
    if deleting:
        steps.append(
            f"deletes {deleting} ephemeral key(s) on the service (its log names any it could not)"
        )
    if steps:
        out.write(f"agent stopping; it first {', and '.join(steps)}\n")
    elif result.get("locked") is True:
        out.write(
            "agent stopping; it is locked, so it does not say what it does first (it may"
            " delete ephemeral keys on the service: its log names any it could not)\n"
        )
    else:
        out.write("agent stopped\n")
    _say_staying(result, out)
    return EXIT_OK


def cmd_config(args: argparse.Namespace, client: Client, stdin: TextIO, out: TextIO) -> int:
    from keyagent.config import load, render

    flags = {name: getattr(args, name, None) for name in ("host", "user")}
    out.write(render(load(getattr(args, "config", None), flags=flags)))
    return EXIT_OK


# Variables that the dynamic loader, a shell, a language runtime or a common tool reads as
# code, a search path, options, a file to open or a command to run. A key put there could be
# run, loaded, or printed back in an error message (LD_PRELOAD: "object '<key>' cannot be
# preloaded"), or change what the command finds (PATH, HOME). Compared in upper case.
FORBIDDEN_ENV_PREFIXES = (
    "LD_", "DYLD_",  # the dynamic loaders (glibc, musl, macOS)
    "MALLOC_", "GLIBC_", "GCONV_", "LC_",  # the C library
    "BASH_", "PYTHON", "PERL", "RUBY", "NODE_", "NPM_", "JAVA", "_JAVA", "JDK_",
    "GIT_", "SSH_", "XDG_", "KEYAGENT_",  # tools that run commands or find their files here
)  # fmt: skip
FORBIDDEN_ENV_NAMES = frozenset(
    (
        # search paths and the environment of the process itself
        "PATH", "HOME", "SHELL", "USER", "LOGNAME", "PWD", "OLDPWD", "TMPDIR", "TMP", "TEMP",
        "LANG", "LANGUAGE", "LOCPATH", "NLSPATH", "TZ", "TZDIR", "TERM", "TERMINFO",
        "TERMCAP", "HOSTALIASES", "LOCALDOMAIN", "RES_OPTIONS", "CLASSPATH",
        # POSIX and other shells
        "IFS", "ENV", "CDPATH", "FPATH", "PS1", "PS2", "PS3", "PS4", "PROMPT_COMMAND",
        "SHELLOPTS", "BASHOPTS", "GLOBIGNORE", "HISTFILE", "MAIL", "MAILPATH", "ZDOTDIR",
        # commands that programs run on the user's behalf
        "EDITOR", "VISUAL", "PAGER", "MANPAGER", "BROWSER", "LESSOPEN", "LESSCLOSE",
        "SUDO_ASKPASS",
        # TLS trust and proxies (read in either case by curl, requests and others)
        "SSL_CERT_FILE", "SSL_CERT_DIR", "CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE",
        "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "FTP_PROXY",
        "DISPLAY", "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS",
        # files and programs named by libraries (SSLKEYLOGFILE: Python's ssl, curl and
        # browsers write TLS secrets to a file named by the variable)
        "SSLKEYLOGFILE", "OPENSSL_CONF", "OPENSSL_ENGINES", "OPENSSL_MODULES",
        "TERMINFO_DIRS", "VIMINIT", "EXINIT", "MYVIMRC", "INPUTRC", "TCLLIBPATH",
    )
)  # fmt: skip
# A deny-list never names every variable some program reads. What remains is an allow rule:
# the variable must be named as a credential, which is what tools read a key from.
CREDENTIAL_SUFFIXES = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL", "CREDENTIALS")


def env_name_problem(name: str) -> str | None:
    """Why ``name`` may not receive the key in ``exec --env``, or None if it may."""
    first, rest = name[:1], name[1:]
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_"
    if not first or first not in letters or rest.strip(letters + "0123456789"):
        return "a variable name is letters, digits and _, not starting with a digit"
    upper = name.upper()
    if upper in FORBIDDEN_ENV_NAMES or upper.startswith(FORBIDDEN_ENV_PREFIXES):
        return (
            "the loader, a shell, a language runtime or a common tool reads this variable, and"
            " could run, load or print the key"
        )
    if not upper.endswith(CREDENTIAL_SUFFIXES):
        return (
            "the name must say it holds a credential: end it in KEY, TOKEN, SECRET, PASSWORD"
            " or CREDENTIALS (a variable named otherwise may be one some program reads as a"
            " file, an option or a command)"
        )
    return None


def cmd_exec(args: argparse.Namespace, client: Client, stdin: TextIO, out: TextIO) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise UsageError("exec needs a command: keyagent-ctl exec -- CMD ARGS...")
    problem = env_name_problem(args.env)
    if problem is not None:
        raise UsageError(
            f"--env {shown(args.env)}: {problem}; choose a name of your own, such as the"
            f" default {DEFAULT_ENV_NAME}"
        )
    host, user = _selectors(args)
    try:
        key = client.get(host, user, args.key_id, purpose="exec")
    except BadRequest as error:
        if "'purpose'" not in error.message:
            raise
        # An agent older than the audit log takes no purpose: it records nothing anyway.
        key = client.get(host, user, args.key_id)
    client.close()  # Client.get refused a key no API key could be: nothing is run then
    environment = dict(os.environ)
    environment[args.env] = key
    out.flush()
    limits = getattr(args, "core_limits", None)
    if limits is not None:  # the command's core dumps are as the user set them
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, limits)
    # exec, not spawn: the command takes over this process, so signals reach it directly
    # and its exit status is ours, with no wrapper holding the key in between.
    try:
        os.execvpe(argv[0], argv, environment)
    except FileNotFoundError:
        sys.stderr.write(f"keyagent-ctl: {shown(argv[0])}: command not found\n")
        return 127
    except OSError as error:
        sys.stderr.write(f"keyagent-ctl: {shown(argv[0])}: {os.strerror(error.errno or 0)}\n")
        return 126


def cmd_login(args: argparse.Namespace, client: Client, stdin: TextIO, out: TextIO) -> int:
    host, user = _account(args)
    programs = _programs(args.allow_exe)  # before the password is asked for
    if args.password_stdin:
        password = read_secret("Password: ", stdin, prompt_tty=False)
    elif stdin.isatty():
        password = _prompt(f"Password for {user} on {host}: ")
    else:
        raise UsageError("no terminal to prompt on; pipe the password with --password-stdin")
    client.login(host, user, password, confirm=args.confirm, allow_exe=programs)
    out.write(f"logged in as {shown(user)} on {shown(host)}\n")
    return EXIT_OK


def cmd_logout(args: argparse.Namespace, client: Client, stdin: TextIO, out: TextIO) -> int:
    host, user = _account(args)
    client.logout(host, user)
    out.write(f"logged out {shown(user)} on {shown(host)}\n")
    return EXIT_OK


def cmd_create(args: argparse.Namespace, client: Client, stdin: TextIO, out: TextIO) -> int:
    host, user = _account(args)
    _check_description(args.description)
    every, lifetime = args.rotate_every, args.lifetime
    if every is not None and lifetime is not None and lifetime <= every:
        raise UsageError(
            f"--lifetime {lifetime:g}s would end the key before its first rotation (--rotate-every"
            f" {every:g}s): give a shorter --rotate-every, or a longer --lifetime"
        )
    created = client.create(
        host,
        user,
        description=args.description,
        lifetime=args.lifetime,
        reveal=args.reveal or None,
        persist=args.persist,
        export=args.export,
        confirm=args.confirm,
        allow_exe=_programs(args.allow_exe),
        keep=args.keep,
        rotate_every=args.rotate_every,
    )
    if args.reveal:
        out.write(f"{_revealed_key(created)}\n")  # exact, like get
    else:
        fate = "; deleted on the service when it expires" if created.get("ephemeral") else ""
        every = created.get("rotate_every")
        if isinstance(every, int | float):
            fate += f"; replaced by a new key every {every:g}s"
        out.write(
            f"created key {shown(created.get('key_id'))} for {shown(user)}@{shown(host)};"
            f" held by the agent{fate}\n"
        )
    if created.get("unrecorded") is True:
        sys.stderr.write(f"keyagent-ctl: warning: {UNRECORDED}\n")
    return EXIT_OK


def _revealed_key(created: dict[str, Any]) -> str:
    """The key ``create --print`` prints as it is: one an API key could be, as Client.get
    checks the key get prints (the agent holds no other; a process in its place might send
    none, or one with a control character for the terminal)."""
    key = created.get("key")
    if not isinstance(key, str) or not key or not key.isprintable() or " " in key:
        raise _bad_reply(
            "'key' is absent, empty, or has a NUL, space or control character, which no API key has"
        )
    return key


def cmd_rotate(args: argparse.Namespace, client: Client, stdin: TextIO, out: TextIO) -> int:
    if args.all:
        host, user = _account(args)
        result = client.rotate(all=True, host=host, user=user)
        rotated = _objects(result.get("rotated"), "rotated")
        failed = _objects(result.get("failed"), "failed")
    else:
        selected = _selectors(args)
        result = client.rotate(args.key_id, host=selected[0], user=selected[1])
        rotated, failed = [result], []
    if args.json:
        _print_json(result, out)
    else:
        for key in rotated:
            out.write(_rotated_line(key))
        if args.all and not rotated and not failed:
            out.write(f"no created keys held for {shown(user)}@{shown(host)}\n")
        for failure in failed:
            error = _object(failure.get("error"), "error")
            out.flush()
            sys.stderr.write(
                f"keyagent-ctl: could not rotate key {shown(failure.get('key_id'))}:"
                f" {shown(error.get('message'))} [{shown(error.get('code'))}]\n"
            )
    return EXIT_AGENT_ERROR if failed else EXIT_OK


def _rotated_line(key: dict[str, Any]) -> str:
    if key.get("old_deleted"):
        fate = "deleted on the service"
    else:
        fate = (
            "NOT yet deleted on the service: pending deletion, retried in the background"
            " (keyagent-ctl status shows it)"
        )
    return (
        f"rotated key {shown(key.get('old_key_id'))} to {shown(key.get('key_id'))}"
        f" for {shown(key.get('user'))}@{shown(key.get('host'))}; the old key is {fate}\n"
    )


LOG_HEADER = ["TIME", "OP", "OUTCOME", "KEY_ID", "HOST", "USER", "PID", "UID", "EXE", "REQUEST"]
FOLLOW_WIDTHS = (24, 7, 14, 12, 20, 24, 7, 6, 0, 0)
"""Column widths of ``log --follow``'s table, which cannot measure entries yet to come."""


def _log_row(entry: dict[str, Any]) -> list[str]:
    def cell(name: str) -> str:
        value = entry.get(name)
        return "-" if value is None else str(value)

    request = ""
    if entry.get("method") is not None or entry.get("path") is not None:
        request = f"{cell('method')} {cell('path')} {cell('status')}"
    return [
        cell("time"), cell("op"), cell("outcome"), cell("key_id"), cell("host"), cell("user"),
        cell("pid"), cell("uid"), cell("exe"), request,
    ]  # fmt: skip


def _follow_line(row: list[str]) -> str:
    cells = [shown(cell).ljust(width) for cell, width in zip(row, FOLLOW_WIDTHS, strict=True)]
    return "  ".join(cells).rstrip() + "\n"


def cmd_log(args: argparse.Namespace, client: Client, stdin: TextIO, out: TextIO) -> int:
    if args.follow:
        if not args.json:
            out.write(_follow_line(LOG_HEADER))
            out.flush()
        # Until Ctrl-C (130) or a closed pipe (141); the agent may end it with an error.
        for entry in client.follow_log(10 if args.n is None else args.n):
            if not isinstance(entry, dict):  # the entries the reply lists, before new ones
                raise _bad_reply("'entries' is not a list of objects")
            out.write(
                json.dumps(entry, sort_keys=True) + "\n"
                if args.json
                else _follow_line(_log_row(entry))
            )
            out.flush()
        return EXIT_OK
    entries = _objects(client.log(args.n), "entries")
    if args.json:
        for entry in entries:
            out.write(json.dumps(entry, sort_keys=True) + "\n")
    elif not entries:
        out.write("no audit entries\n")
    else:
        _table([LOG_HEADER, *(_log_row(entry) for entry in entries)], out)
    return EXIT_OK


def cmd_completion(args: argparse.Namespace, client: Client, stdin: TextIO, out: TextIO) -> int:
    from keyagent.completion import completion_script

    out.write(completion_script(args.shell, args.program))
    return EXIT_OK


def cmd_remove(args: argparse.Namespace, client: Client, stdin: TextIO, out: TextIO) -> int:
    from keyagent.protocol import is_key_id_prefix

    target: str = args.key
    if target != "-" and not is_key_id_prefix(target):
        # Not an id, so perhaps the key itself: never take it from argv, where ps shows it
        # to every local user. The message does not repeat it.
        raise UsageError(
            f"remove takes a key id or -; {KEY_ID_USAGE}. To name the key itself, pass it on"
            " stdin, never as an argument: printf '%s\\n' \"$KEY\" | keyagent-ctl remove -"
        )
    host, user = _selectors(args)
    if target == "-":
        result = client.remove(key=read_secret("API key to remove: ", stdin), host=host, user=user)
    else:
        result = client.remove(key_id=target, host=host, user=user)
    key_id = shown(result.get("key_id"))
    if result.get("already_gone") is True:
        said = f"key {key_id} was already gone from the service"
    else:
        said = f"removed key {key_id} on the service"
    out.write(f"{said}{' and forgot it' if result.get('forgotten') else ''}\n")
    return EXIT_OK


# --- keyagent-ctl prune: keyagent's keys on the service that this agent does not hold -------

PRUNE_WARNING = (
    "prune deletes every key of the account on the service whose description ends with"
    " ' [keyagent]' and that THIS agent does not hold: keys held by another keyagent of the"
    " same account (another machine, another user session) are deleted too. Run it where"
    " no other agent uses the account, and look at the list before giving --yes."
)


def _add_prune_parser(command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command(
        "prune",
        "list (and with --yes delete) the account's keyagent-created keys on Conduce that this"
        " agent does not hold",
    )
    p.epilog = (
        f"{PRUNE_WARNING} Without --yes, prune only lists them and exits 1 if there are any,"
        " 0 if none (keyagent-ctl prune || keyagent-ctl prune --yes). With --yes it exits 1"
        " if any could not be deleted."
    )
    p.add_argument(
        "--yes",
        "-y",
        action="store_true",
        help="delete them on the service (a key already gone counts as deleted)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_prune(args: argparse.Namespace, client: Client, stdin: TextIO, out: TextIO) -> int:
    host, user = _account(args)
    result = client.prune(host, user, delete=args.yes or None)
    orphans = _objects(result.get("orphans"), "orphans")
    failed = [orphan for orphan in orphans if args.yes and orphan.get("error")]
    status = EXIT_AGENT_ERROR if failed or (orphans and not args.yes) else EXIT_OK
    if args.json:
        _print_json(result, out)
        return status
    account = f"{shown(user)}@{shown(host)}"
    if not orphans:
        out.write(f"no keys created by keyagent that this agent does not hold for {account}\n")
        return status
    header = ["KEY_ID", "KEY", "CREATED", "DESCRIPTION"]
    rows = [[*header, "RESULT"] if args.yes else header]
    for orphan in orphans:
        row = [
            str(orphan.get("key_id") or "-"),
            str(orphan.get("masked") or ""),
            str(orphan.get("created") or "?"),
            str(orphan.get("description") or ""),
        ]
        if args.yes:
            row.append(_prune_result(orphan))
        rows.append(row)
    _table(rows, out)
    count = len(orphans)
    if not args.yes:
        out.write(
            f"{count} key{'s' if count != 1 else ''} created by keyagent that this agent does"
            f" not hold for {account}; delete them with keyagent-ctl prune --yes (any other"
            " agent of this account would lose those it holds)\n"
        )
    else:
        deleted = sum(1 for orphan in orphans if orphan.get("deleted"))
        out.write(f"deleted {deleted} of {count} key{'s' if count != 1 else ''} on the service\n")
    return status


def _prune_result(orphan: dict[str, Any]) -> str:
    """What became of one orphan under --yes."""
    if orphan.get("deleted"):
        return "deleted"
    if orphan.get("held"):
        return "kept: held by this agent now"
    error = _object(orphan.get("error"), "error")
    return f"failed: {error.get('message', '?')} [{error.get('code', '?')}]"


# --- keyagent-ctl service: systemd user units for this installation (keyagent/service.py) ---


def _add_service_parser(sub: Any) -> None:
    p = sub.add_parser(
        "service",
        help="start keyagent at login: install, uninstall or show its systemd user units",
        description="Install keyagent.socket and keyagent.service in the systemd user unit"
        " directory, running this installation's keyagent; enable the socket, so the first"
        " client starts the agent.",
    )
    p.add_argument(
        "action",
        choices=("install", "uninstall", "status"),
        help="install: write, reload, enable --now; uninstall: stop, disable, remove what"
        " install wrote; status: installed, enabled, active, and the command they run",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="install: replace units keyagent-ctl did not write; uninstall: remove units it"
        " wrote that were edited since",
    )
    p.add_argument(
        "--print",
        action="store_true",
        dest="print_units",
        help="install: print the units instead of installing them (for packagers)",
    )


def cmd_service(args: argparse.Namespace, client: Client, stdin: TextIO, out: TextIO) -> int:
    from keyagent import service

    if args.print_units and args.action != "install":
        raise UsageError("--print goes with install: keyagent-ctl service install --print")
    if args.force and args.action == "status":
        raise UsageError("--force goes with install or uninstall")
    try:
        if args.print_units:
            service.print_units(out)
        elif args.action == "install":
            service.install(out, force=args.force)
        elif args.action == "uninstall":
            service.uninstall(out, force=args.force)
        elif not service.status(out):
            return EXIT_NOT_READY
    except service.ServiceError as error:
        out.flush()
        sys.stderr.write(f"keyagent-ctl: service {args.action}: {shown(error)}\n")
        return EXIT_AGENT_ERROR
    return EXIT_OK


# --- end of keyagent-ctl service ------------------------------------------------------------


HANDLERS: dict[str, Handler] = {  # annotation only: Handler exists for the type checker
    "hello": cmd_hello,
    "status": cmd_status,
    "add": cmd_add,
    "get": cmd_get,
    "list": cmd_list,
    "ls": cmd_list,
    "forget": cmd_forget,
    "lock": cmd_lock,
    "unlock": cmd_unlock,
    "stop": cmd_stop,
    "exec": cmd_exec,
    "config": cmd_config,
    "log": cmd_log,
    "login": cmd_login,
    "logout": cmd_logout,
    "create": cmd_create,
    "create-api-key": cmd_create,
    "list-api-keys": cmd_list_api_keys,
    "remove": cmd_remove,
    "remove-api-key": cmd_remove,
    "prune": cmd_prune,
    "rotate": cmd_rotate,
    "service": cmd_service,
    "completion": cmd_completion,
}


_GET_OPTIONS = {"--socket": "socket", "--host": "host", "--user": "user", "--key-id": "key_id"}


def fast_get_args(argv: Sequence[str]) -> dict[str, str] | None:
    """The options of a plain ``get``, read without argparse; None for anything else.

    ``get`` runs inside other tools' hot paths, where importing argparse would be most of
    the cost. Anything unusual (help, an unknown option, a missing value) returns None and
    takes the ordinary path, so errors read the same either way.
    """
    values: dict[str, str] = {}
    seen_get = False
    position = 0
    while position < len(argv):
        word = argv[position]
        position += 1
        if word == "get" and not seen_get:
            seen_get = True
            continue
        name, equals, value = word.partition("=")
        field = _GET_OPTIONS.get(name)
        # As argparse has it: --key-id after the verb only, the others before or after it.
        if field is None or (field == "key_id" and not seen_get):
            return None
        if not equals:
            if position >= len(argv):
                return None
            value = argv[position]
            position += 1
        if not value or value.startswith("-") or field in values:  # repeated: argparse decides
            return None
        values[field] = value
    return values if seen_get else None


def _refuse_unused_selectors(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--host/--user before a command that acts on no account is a usage error (exit 64),
    as is --config before one that reads no configuration file, and --socket before one
    that talks to no agent: the parser takes them there for the commands that do."""
    if hasattr(args, "socket") and args.command in LOCAL_COMMANDS:
        parser.error(
            f"{args.command} talks to no agent, so --socket means nothing to it: leave it out"
        )
    if hasattr(args, "config") and args.command not in CONFIG_COMMANDS:
        parser.error(
            f"{args.command} reads no configuration file, so --config means nothing to it:"
            " leave it out"
        )
    if args.command in ACCOUNT_COMMANDS:
        return
    for name in ("host", "user"):
        if hasattr(args, name):
            parser.error(
                f"{args.command} acts on no account, so --{name} means nothing to it: leave it out"
            )


class _HeldOutput:
    """A command's output, held until the command has checked its whole reply, and its
    messages (stderr) that come after some output, held with it so that the two are written
    in the order they came. A message before any output goes out at once (a prompt, say)."""

    def __init__(self, stdout: TextIO, stderr: TextIO) -> None:
        self._stderr = stderr
        self._held: list[tuple[TextIO, str]] = []
        self.out = _Held(self, stdout)
        self.err = _Held(self, stderr)

    def write(self, stream: TextIO, text: str) -> None:
        if stream is self._stderr and not self._held:
            stream.write(text)
        else:
            self._held.append((stream, text))

    def release(self, *, output: bool) -> None:
        """Write what is held, in order; without ``output``, the messages only (the command
        failed: none of its output is shown)."""
        held, self._held = self._held, []
        for stream, text in held:
            if output or stream is self._stderr:
                stream.write(text)


class _Held(io.StringIO):
    """One stream of a :class:`_HeldOutput`: what is written goes to the holder."""

    def __init__(self, holder: _HeldOutput, stream: TextIO) -> None:
        super().__init__()
        self._holder, self._stream = holder, stream

    def write(self, text: str) -> int:
        self._holder.write(self._stream, text)
        return len(text)


def _read_named_config(args: argparse.Namespace) -> None:
    """A file named with --config is read, and refused if unusable (exit 78), even by a
    command that turns out not to need the account from it: nothing given on the command
    line is ignored without a word."""
    path = getattr(args, "config", None)
    if path == "":
        raise UsageError("--config needs a file name")
    if path is None or args.command == "config":  # config reads and shows it anyway
        return
    from keyagent.config import load

    load(path)


SECRET_COMMANDS: Final = frozenset(
    {"add", "create", "create-api-key", "exec", "get", "lock", "login", "remove",
     "remove-api-key", "unlock"}
)  # fmt: skip
"""The commands that may hold a key, a password or a passphrase in memory (aliases too:
argparse names a command as it was typed)."""


def _without_core_dumps() -> tuple[int, int] | None:
    """Stop this process from leaving a core dump, which would hold what it read (Ctrl-\\
    while an unlock is held back, say): the soft ``RLIMIT_CORE`` to 0, as the agent's. The
    limits before, for ``exec`` to give back to its command; None if they could not be
    changed."""
    import resource

    try:
        before = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (0, before[1]))
    except (OSError, ValueError):
        return None
    return before


def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run one ``keyagent-ctl`` command; returns the exit status."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    argv = sys.argv[1:] if argv is None else list(argv)
    fast = fast_get_args(argv)
    if fast is not None:
        from types import SimpleNamespace

        args: Any = SimpleNamespace(
            **{"command": "get", "key_id": None, "socket": None, "fast": True, **fast}
        )
    else:
        try:
            # argparse writes usage errors and help to sys.stdout/sys.stderr: send them to
            # the streams this call was given.
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
                parser = build_parser()
                args = parser.parse_args(argv)
                _refuse_unused_selectors(parser, args)
        except SystemExit as exit_:
            return int(exit_.code or 0)
    if args.command in SECRET_COMMANDS:
        args.core_limits = _without_core_dumps()
    try:
        # A command's warnings go to sys.stderr: the stream this call was given.
        with Client(getattr(args, "socket", None)) as client, contextlib.redirect_stderr(stderr):
            _read_named_config(args)
            # Entries as they come; the steps of service install as they are taken.
            if (args.command == "log" and args.follow) or args.command == "service":
                return HANDLERS[args.command](args, client, stdin, stdout)
            # The rest is written whole, once every member of the reply has been checked: a
            # malformed one fails the command before any line of it is printed.
            held = _HeldOutput(stdout, stderr)
            try:
                with contextlib.redirect_stderr(held.err):
                    code = HANDLERS[args.command](args, client, stdin, held.out)
            except BaseException:
                held.release(output=False)
                raise
            held.release(output=True)
            return code
    except UsageError as error:
        stderr.write(f"keyagent-ctl: {shown(error)}\n")
        return EXIT_USAGE
    except BadConfig as error:
        stderr.write(f"keyagent-ctl: {shown(error.message)}\n")
        return EXIT_CONFIG
    except AgentUnreachable as error:
        stderr.write(f"keyagent-ctl: {shown(error.message)}\n")
        return EXIT_NO_AGENT
    except KeyagentError as error:
        # Message and code come from the agent (and through it, from the service).
        stderr.write(f"keyagent-ctl: {shown(error.message)} [{shown(error.code)}]\n")
        return EXIT_AGENT_ERROR
    except KeyboardInterrupt:
        stderr.write("\n")
        return 130
    except BrokenPipeError:
        # The reader went away (keyagent-ctl status | head -1): stop quietly, as a command
        # killed by SIGPIPE would, instead of a traceback; the interpreter's last flush at
        # exit must not fail again, so the real stdout now points at /dev/null.
        if stdout is sys.stdout:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return EXIT_BROKEN_PIPE
