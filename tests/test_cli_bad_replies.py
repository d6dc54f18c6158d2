"""keyagent-ctl against a process in the agent's place whose replies are objects with members
of the wrong shape: a list of numbers where the protocol has a list of objects, a string
where it has a number, no key where one was asked for.

Each is refused as a reply that is not an object is: ``[bad_reply]`` on stderr with the next
step, exit 1, never a traceback.
"""

from __future__ import annotations

import io
import os
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keyagent import cli

from .conftest import run_ctl, run_ctl_process
from .test_cli_hostile import FakeAgent, ok

ACCOUNT = ("--host", "h.example", "--user", "u@example.com")
ACCOUNT_FIELDS = {"host": "h.example", "user": "u@example.com"}
KEY = {"key_id": "0123456789ab", "host": "h.example", "user": "u@example.com", "source": "add"}
SESSION = {"host": "h.example", "user": "u@example.com", "logged_in": True}
ORPHAN = {"key_id": "0123456789ab", "masked": "KA-1…9z", "created": "2026-01-01"}


Serve = Callable[[dict[str, Any]], FakeAgent]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    """``serve(result)``: a fake agent answering with ``result``; closed at the end of the
    test."""
    started: list[FakeAgent] = []

    def start(result: dict[str, Any]) -> FakeAgent:
        directory = tmp_path / f"fake{len(started)}"
        directory.mkdir(mode=0o700)
        agent = FakeAgent(str(directory / "agent.sock"), ok(result), one_reply=True)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.close()


# (argv, the result every request gets): each a member of the wrong shape.
MALFORMED: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "list: a key that is a number": (("list",), {"keys": [1]}),
    "list: a key that is a string": (("list",), {"keys": ["0123456789ab"]}),
    "list --json: a key that is a number": (("list", "--json"), {"keys": [1]}),
    "list: rotate_every a string": (("list",), {"keys": [{**KEY, "rotate_every": "x"}]}),
    "list: rotate_every a list": (("list",), {"keys": [{**KEY, "rotate_every": [60]}]}),
    "list: rotate_every a boolean": (("list",), {"keys": [{**KEY, "rotate_every": True}]}),
    "list: allowed_exes a number": (("list",), {"keys": [{**KEY, "allowed_exes": 3}]}),
    "list: allowed_exes a string": (("list",), {"keys": [{**KEY, "allowed_exes": "/bin/sh"}]}),
    "list: allowed_exes of numbers": (("list",), {"keys": [{**KEY, "allowed_exes": [1]}]}),
    "forget: staying of strings": (("forget", "--all"), {"forgotten": 1, "staying": ["x"]}),
    "stop: staying an object": (("stop",), {"stopping": True, "staying": {"key_id": "x"}}),
    "list --remote: remote of numbers": ((*ACCOUNT, "list", "--remote"), {"remote": [1]}),
    "list --remote: remote a string": ((*ACCOUNT, "list", "--remote"), {"remote": "abc"}),
    "list --remote: remote a number": ((*ACCOUNT, "list", "--remote"), {"remote": 5}),
    "list --remote: remote an object": ((*ACCOUNT, "list", "--remote"), {"remote": {"a": 1}}),
    "list --remote: keys of strings": (
        (*ACCOUNT, "list", "--remote"),
        {"remote": [], "keys": ["x"]},
    ),
    "list-api-keys: remote of numbers": ((*ACCOUNT, "list-api-keys"), {"remote": [1]}),
    "status: a session that is a number": (("status",), {"pid": 1, "sessions": [1]}),
    "status: sessions a number": (("status",), {"pid": 1, "sessions": 5}),
    "status --json: a session that is a string": (
        ("status", "--json"),
        {"pid": 1, "sessions": ["x"]},
    ),
    "status: a session's allowed_exes a number": (
        ("status",),
        {"pid": 1, "sessions": [{**SESSION, "allowed_exes": 7}]},
    ),
    "status: a pending deletion that is a string": (
        ("status",),
        {"pid": 1, "pending_deletions": ["0123456789ab"]},
    ),
    "log: an entry that is a number": (("log",), {"entries": [1]}),
    "log --json: an entry that is a string": (("log", "--json"), {"entries": ["x"]}),
    "log --follow: an entry that is a number": (("log", "--follow"), {"entries": [1]}),
    "log --follow --json: an entry that is a list": (
        ("log", "--follow", "--json"),
        {"entries": [[1]]},
    ),
    "prune: an orphan that is a number": ((*ACCOUNT, "prune"), {"orphans": [1]}),
    "prune --json: an orphan that is a string": ((*ACCOUNT, "prune", "--json"), {"orphans": ["x"]}),
    "prune --yes: an orphan that is a string": ((*ACCOUNT, "prune", "--yes"), {"orphans": ["x"]}),
    "prune --yes: an orphan's error a string": (
        (*ACCOUNT, "prune", "--yes"),
        {"orphans": [{**ORPHAN, "deleted": False, "error": "boom"}]},
    ),
    "rotate --all: a rotated key that is a number": (
        (*ACCOUNT, "rotate", "--all"),
        {"rotated": [1], "failed": []},
    ),
    "rotate --all: rotated a number": ((*ACCOUNT, "rotate", "--all"), {"rotated": 1}),
    "rotate --all --json: a failure that is a string": (
        (*ACCOUNT, "rotate", "--all", "--json"),
        {"rotated": [], "failed": ["x"]},
    ),
    "rotate --all: a failure's error a string": (
        (*ACCOUNT, "rotate", "--all"),
        {"rotated": [], "failed": [{"key_id": "0123456789ab", "error": "boom"}]},
    ),
    "create --print: no key": ((*ACCOUNT, "create", "--print"), {"key_id": "0123456789ab"}),
    "create --print: a key that is a number": ((*ACCOUNT, "create", "--print"), {"key": 5}),
    "create --print: an empty key": ((*ACCOUNT, "create", "--print"), {"key": ""}),
    "create --print: a key with escapes": (
        (*ACCOUNT, "create", "--print"),
        {"key": "ab\x1b]0;PWNED\x07cd"},
    ),
}


@pytest.mark.parametrize(("argv", "result"), MALFORMED.values(), ids=MALFORMED.keys())
def test_a_member_of_the_wrong_shape_is_a_bad_reply(
    serve: Serve, argv: tuple[str, ...], result: dict[str, Any]
) -> None:
    """Exit 1 with bad_reply and the next step on stderr; nothing the reply held is shown."""
    agent = serve(result)
    got = run_ctl(agent.path, *argv)
    assert got.code == 1, (got.out, got.err)
    assert "[bad_reply]" in got.err
    assert "check what listens on the agent's socket" in got.err
    assert "\x1b" not in got.out + got.err
    assert "PWNED" not in got.out + got.err
    if argv[:2] != ("log", "--follow"):  # entries before the bad one were shown as they came
        assert got.out == ""  # nothing printed before the bad member was found
    assert agent.requests  # refused after the agent answered, not before asking


# Replies whose members are odd but which every command shows safely (shown() turns any JSON
# value into escaped text): these are no crash, so they print and exit 0 as before.
TOLERATED: dict[str, tuple[tuple[str, ...], dict[str, Any], str]] = {
    "hello": (("hello",), {"version": [1], "protocol": {"v": 1}}, ""),
    "add": ((*ACCOUNT, "add"), {"key_id": [1], "expires": {"at": 1}}, "k3y\n"),
    "forget": (("forget", "--all"), {"forgotten": "x", "deleting": [1]}, ""),
    "lock": (("lock",), {"locked": "x"}, "passphrase\n"),
    "unlock": (("unlock",), {"locked": [1]}, "passphrase\n"),
    "login": ((*ACCOUNT, "login", "--password-stdin"), {"session": 1}, "pw\n"),
    "logout": ((*ACCOUNT, "logout"), {"session": [1]}, ""),
    "create": ((*ACCOUNT, "create"), {"key_id": [1], "rotate_every": "x", "ephemeral": 1}, ""),
    "rotate one key": (("rotate", "0123456789ab"), {"key_id": 1, "old_key_id": [1]}, ""),
    "remove": (("remove", "0123456789ab"), {"key_id": {"a": 1}}, ""),
    "status, locked": (("status",), {"pid": [1], "http_workers": 3, "leftovers": "x"}, ""),
    "list: no rotation": (("list",), {"keys": [{**KEY, "rotate_every": None}]}, ""),
    "stop": (("stop",), {"deleting": "x", "waiting": [1]}, ""),
}


@pytest.mark.parametrize(("argv", "result", "stdin"), TOLERATED.values(), ids=TOLERATED.keys())
def test_members_every_command_can_show_are_shown(
    serve: Serve, argv: tuple[str, ...], result: dict[str, Any], stdin: str
) -> None:
    agent = serve(result)
    got = run_ctl(agent.path, *argv, stdin=stdin)
    assert got.code == 0, got.err
    assert got.err == ""


def test_a_user_sees_the_message_and_no_traceback(serve: Serve) -> None:
    """As its own process (python -m keyagent): exit 1, one line on stderr, no traceback."""
    agent = serve({"keys": [{**KEY, "rotate_every": "x"}]})
    env = {**os.environ, "KEYAGENT_SOCK": agent.path}
    result = run_ctl_process(["list"], env=env)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("keyagent-ctl: ")
    assert result.stderr.count("\n") == 1
    assert "[bad_reply]" in result.stderr
    assert "'rotate_every'" in result.stderr  # names the member, never its value
    assert result.stdout == ""


def test_forget_says_how_many_keyring_entries_of_keys_not_held_it_deleted(serve: Serve) -> None:
    """forget --persist FINGERPRINT of a record no held key has (one an unreadable index
    left behind) says it deleted the entry, not only "forgot 0 keys"; what it shows of a
    staying key is escaped, and its remove command quoted for a shell."""
    user = "o'brien$(touch x)@example.com"  # what the account grammar allows
    staying = {"key_id": "ab\x1b[2J", "host": "[::1]:8443", "user": user}
    agent = serve({"forgotten": 0, "unpersisted": 1, "staying": [staying]})
    got = run_ctl(agent.path, "forget", "--persist", "ab" * 32)
    assert got.code == 0, got.err
    first, second = got.out.splitlines()
    assert first == "forgot 0 keys; deleted 1 OS keyring entry"
    assert second.startswith(f"key ab\\x1b[2J of {user} on [::1]:8443 stays valid")
    # The command is quoted for a shell: pasted, it runs nothing else.
    command = shlex.split(second.rpartition("then run: ")[2])
    assert command == [
        "keyagent-ctl", "remove", "--host=[::1]:8443", f"--user={user}", "ab\\x1b[2J"
    ]  # fmt: skip


def test_output_and_messages_come_out_in_the_order_written(serve: Serve) -> None:
    """keyagent-ctl holds a command's output until its reply is checked, and its messages
    (stderr) after some output with it: on one terminal they read in the order written,
    the rotated keys before the failures."""
    rotated = {"key_id": "0123456789ab", "old_key_id": "ba9876543210", **ACCOUNT_FIELDS}
    failed = {"key_id": "cccccccccccc", "error": {"code": "remote_error", "message": "boom"}}
    agent = serve({"rotated": [rotated], "failed": [failed]})
    both = io.StringIO()
    code = cli.main(["--socket", agent.path, *ACCOUNT, "rotate", "--all"], stdout=both, stderr=both)
    assert code == 1
    lines = both.getvalue().splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["rotated", "key"],
        ["keyagent-ctl:", "could"],
    ], lines
