"""keyagent-ctl's command-line conventions: --version, help that lists what each command
takes, the exit statuses, --socket after the command, short flags, and `status` wording."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from keyagent import __version__, cli, daemon
from keyagent.testing.agent import AgentProcess
from keyagent.testing.emulator_process import Emulator, EmulatorProcess

from .conftest import AgentFactory, run_ctl, run_ctl_process

USER = "alice@example.com"
PASSWORD = "pa55-w0rd-that-must-never-leak"
NO_ACCOUNT = ("status", "hello", "forget", "lock", "unlock", "stop", "completion")


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Each command's parser by name (aliases included)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """The options a parser shows in its help."""
    return {
        option
        for action in parser._actions
        if action.help != argparse.SUPPRESS
        for option in action.option_strings
    }


def test_version_prints_the_package_version() -> None:
    """keyagent-ctl --version prints its name and the package version, and exits 0."""
    result = run_ctl(None, "--version")
    assert (result.code, result.out) == (0, f"keyagent-ctl {__version__}\n")


def test_each_command_offers_only_the_options_it_uses() -> None:
    """--host/--user appear in the help of the commands that act on an account, --config
    in that of the commands that read the configuration file, --socket in that of the
    commands that talk to an agent; and in no other."""
    commands = subparsers(cli.build_parser())
    for name in NO_ACCOUNT:
        assert not {"--host", "--user"} & option_strings(commands[name]), name
        help_text = run_ctl(None, name, "--help").out
        assert "--host" not in help_text, name
    for name in cli.ACCOUNT_COMMANDS:
        assert {"--host", "--user"} <= option_strings(commands[name]), name
    for name, command in commands.items():
        options = option_strings(command)
        assert ("--socket" in options) is (name not in cli.LOCAL_COMMANDS), name
        assert ("--config" in options) is (name in cli.CONFIG_COMMANDS), name
    assert set(commands) >= set(NO_ACCOUNT) | cli.ACCOUNT_COMMANDS | cli.LOCAL_COMMANDS


def test_host_given_to_a_command_without_an_account_is_a_usage_error() -> None:
    """--host before lock (where the parser takes it for other commands) or after it is refused."""
    before = run_ctl(None, "--host", "h.example", "lock")
    assert before.code == 64
    assert "lock acts on no account, so --host means nothing to it: leave it out" in before.err
    assert run_ctl(None, "--user", "u@example.com", "stop").code == 64
    after = run_ctl(None, "hello", "--host", "h.example")
    assert after.code == 64
    assert "unrecognized arguments: --host" in after.err


def _all_actions(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        yield parser.prog, action
        if isinstance(action, argparse._SubParsersAction):
            for subparser in set(action.choices.values()):
                yield from _all_actions(subparser)


@pytest.mark.parametrize("build_parser", [cli.build_parser, daemon.build_parser])
def test_every_option_and_argument_has_help_text(
    build_parser: Callable[[], argparse.ArgumentParser],
) -> None:
    """Every option and positional argument of both commands says what it does in --help."""
    for prog, action in _all_actions(build_parser()):
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
            continue
        assert action.help, f"{prog}: {action.option_strings or action.dest} has no help"


def test_help_lists_every_exit_status() -> None:
    """--help lists each status keyagent-ctl exits with, 141 for a closed pipe included."""
    help_text = run_ctl(None, "--help").out
    listed = {int(line.split()[0]) for line in help_text.split("exit status:\n")[1].splitlines()}
    assert listed == {code for code, _ in cli.EXIT_STATUSES}
    assert listed >= {0, 1, 2, 64, 78, 126, 127, 130, 141}
    assert {cli.EXIT_OK, cli.EXIT_AGENT_ERROR, cli.EXIT_NO_AGENT, cli.EXIT_USAGE} <= listed
    assert {cli.EXIT_CONFIG, cli.EXIT_BROKEN_PIPE} <= listed


def test_socket_after_the_command_is_used_on_both_paths(shared_agent: AgentProcess) -> None:
    """--socket after the command names the agent, for get's fast path and for argparse."""
    with shared_agent.client() as client:
        client.hello()
    env = {**os.environ, "KEYAGENT_SOCK": "/nonexistent/agent.sock"}
    socket_path = shared_agent.socket_path
    status = run_ctl_process(["status", "--socket", socket_path], env=env)
    assert status.returncode == 0, status.stderr
    assert f"agent pid {shared_agent.pid}" in status.stdout
    # get: found nothing (1), from this agent, not "no agent" (2) from $KEYAGENT_SOCK.
    for argv in (
        ["get", "--socket", socket_path],
        ["get", "--key-id", "0000", "--soc", socket_path],
    ):
        got = run_ctl_process([*argv, "--host", "nothing.example"], env=env)
        assert got.returncode == 1, (argv, got.stderr)
    assert run_ctl_process(["hello", f"--socket={socket_path}"], env=env).returncode == 0


def test_get_with_socket_after_it_takes_the_fast_path(shared_agent: AgentProcess) -> None:
    """get --socket PATH imports neither argparse nor the completion machinery."""
    probe = (
        "import sys\n"
        "from keyagent.cli import main\n"
        f"code = main(['get', '--socket', {shared_agent.socket_path!r}, '--host', 'no.example'])\n"
        "loaded = sorted(m for m in ('argparse', 'shtab', 'keyagent.completion')"
        " if m in sys.modules)\n"
        "print('loaded:', ','.join(loaded), 'code:', code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, check=True
    )
    assert result.stdout.splitlines()[-1] == "loaded:  code: 1"


def test_short_flags_of_both_commands_mean_the_same() -> None:
    """A short flag that keyagent and keyagent-ctl both take sets the same thing in each."""

    def short_flags(parser: argparse.ArgumentParser) -> dict[str, set[str]]:
        flags: dict[str, set[str]] = {}
        for _, action in _all_actions(parser):
            if action.help == argparse.SUPPRESS:
                continue
            for option in action.option_strings:
                if len(option) == 2 and option != "-h":
                    flags.setdefault(option, set()).add(action.dest)
        return flags

    agent_flags, ctl_flags = short_flags(daemon.build_parser()), short_flags(cli.build_parser())
    for flag in agent_flags.keys() & ctl_flags.keys():
        assert agent_flags[flag] == ctl_flags[flag], flag
    assert "-D" not in ctl_flags
    assert ctl_flags["-C"] == {"description"}


def test_the_old_description_flag_names_the_new_one() -> None:
    """keyagent-ctl add -D TEXT is a usage error that names -C, not a silent description."""
    result = run_ctl(None, "add", "-D", "ci")
    assert result.code == 64
    assert "-D is now -C (--description)" in result.err


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    """A loopback HTTPS Conduce emulator process with one account, stopped after the test."""
    with EmulatorProcess(USER, PASSWORD) as emu:
        yield emu


def logged_in_agent(
    agent_factory: AgentFactory, emulator: Emulator
) -> tuple[AgentProcess, list[str]]:
    """An agent trusting the emulator, logged in to its account; the account's ctl flags."""
    agent = agent_factory("--ca-bundle", emulator.ca_path)
    account = ["--host", emulator.host, "--user", USER]
    login = run_ctl(agent.socket_path, *account, "login", "--password-stdin", stdin=PASSWORD)
    assert login.code == 0, login.err
    return agent, account


def test_status_of_an_expired_session_names_its_login_time(
    agent_factory: AgentFactory, emulator: Emulator
) -> None:
    """An expired session shows when it logged in, not a time it seems to have expired at."""
    agent, account = logged_in_agent(agent_factory, emulator)
    emulator.expire_sessions(USER)
    assert run_ctl(agent.socket_path, *account, "list", "--remote").code != 0
    status = run_ctl(agent.socket_path, "status").out
    assert f"session {USER}@{emulator.host}: expired (logged in " in status
    assert "since" not in status


def test_status_after_logout_says_logged_out_without_a_time(
    agent_factory: AgentFactory, emulator: Emulator
) -> None:
    """status shows a logged-out session as "logged out", with no "since ?" placeholder."""
    agent, account = logged_in_agent(agent_factory, emulator)
    logged_in = run_ctl(agent.socket_path, "status").out
    assert f"session {USER}@{emulator.host}: logged in since " in logged_in
    assert run_ctl(agent.socket_path, *account, "logout").code == 0
    status = run_ctl(agent.socket_path, "status")
    assert status.code == 0
    assert f"session {USER}@{emulator.host}: logged out\n" in status.out
    assert "since" not in status.out
