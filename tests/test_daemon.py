"""The ``keyagent`` command: start-up modes, socket safety, signals and hardening."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from keyagent import daemon, errors, paths, sockets
from keyagent.client import Client
from keyagent.testing.agent import AgentProcess, read_line, wait_for_exit

from .conftest import AgentFactory, wait_until

PY = shlex.quote(sys.executable)


def run_shell(script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def private_dir(tmp_path: Path, name: str = "run") -> Path:
    directory = tmp_path / name
    directory.mkdir(mode=0o700)
    return directory


def test_eval_round_trip_starts_and_kills_a_background_agent(tmp_path: Path) -> None:
    """eval "$(keyagent)" exports a working socket and pid; eval "$(keyagent -k)" stops it."""
    sock = private_dir(tmp_path) / "agent.sock"
    result = run_shell(
        f'eval "$({PY} -m keyagent.daemon -a {sock})" >/dev/null\n'
        f'echo "pid=$KEYAGENT_PID sock=$KEYAGENT_SOCK"\n'
        f"{PY} -m keyagent status --json >/dev/null || exit 9\n"
        f'eval "$({PY} -m keyagent.daemon -k)" >/dev/null\n'
        f'echo "after=${{KEYAGENT_PID:-unset}}"\n'
    )
    lines = result.stdout.splitlines()
    pid = int(lines[0].split()[0].removeprefix("pid=")) if lines else 0
    try:
        assert result.returncode == 0, result.stderr
        first, after = lines
        assert first.split()[1] == f"sock={sock}"
        assert after == "after=unset"
        assert wait_for_exit(pid, 10)
        assert not sock.exists()
    finally:
        if pid and not wait_for_exit(pid, 0):  # a failed step must not leave an agent behind
            os.kill(pid, signal.SIGTERM)


def test_shell_syntax_flags() -> None:
    """-s prints Bourne-shell lines and -c prints C-shell lines, each naming socket and pid."""
    sh = daemon.env_lines("sh", "/run/user/1/keyagent/agent.sock", 42)
    csh = daemon.env_lines("csh", "/run/user/1/keyagent/agent.sock", 42)
    assert sh.splitlines()[:2] == [
        "KEYAGENT_SOCK=/run/user/1/keyagent/agent.sock; export KEYAGENT_SOCK;",
        "KEYAGENT_PID=42; export KEYAGENT_PID;",
    ]
    assert csh.splitlines()[:2] == [
        "setenv KEYAGENT_SOCK /run/user/1/keyagent/agent.sock;",
        "setenv KEYAGENT_PID 42;",
    ]
    assert "unsetenv KEYAGENT_SOCK;" in daemon.unset_lines("csh", 42)
    assert "unset KEYAGENT_SOCK;" in daemon.unset_lines("sh", 42)


def test_shell_lines_export_the_http_socket() -> None:
    """Both syntaxes export KEYAGENT_HTTP_SOCK after the pid, quoted; -k's lines unset it."""
    path = "/run/user/1/key agent/http.sock"
    sh = daemon.env_lines("sh", "/run/user/1/key agent/agent.sock", 42, path)
    csh = daemon.env_lines("csh", "/run/user/1/key agent/agent.sock", 42, path)
    assert sh.splitlines()[2] == f"KEYAGENT_HTTP_SOCK='{path}'; export KEYAGENT_HTTP_SOCK;"
    assert csh.splitlines()[2] == f"setenv KEYAGENT_HTTP_SOCK '{path}';"
    assert "unset KEYAGENT_HTTP_SOCK;" in daemon.unset_lines("sh", 42)
    assert "unsetenv KEYAGENT_HTTP_SOCK;" in daemon.unset_lines("csh", 42)


@pytest.mark.skipif(shutil.which("tcsh") is None, reason="needs tcsh (.ci/run installs it)")
def test_csh_lines_keep_a_path_with_quotes_and_exclamation_marks_whole() -> None:
    """An interactive tcsh expands history (!) even within single quotes: the lines escape
    it, and quotes, so that the path set is the path printed."""
    path = "/tmp/it's!here/agent.sock"
    lines = daemon.env_lines("csh", path, 42)
    ran = subprocess.run(
        ["tcsh", "-f", "-i"], input=lines + 'printf "[%s]\\n" "$KEYAGENT_SOCK"\n',
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert f"[{path}]" in ran.stdout, ran.stdout + ran.stderr


def test_a_socket_path_with_a_control_character_is_refused(tmp_path: Path) -> None:
    """A runtime directory (or TMPDIR) whose name holds a newline would break the printed
    lines and write raw bytes to terminals: the agent refuses it, showing it escaped,
    before it makes or checks anything there."""
    runtime = tmp_path / "run\nx"  # not there: refused before anything is made in it
    result = subprocess.run(
        [sys.executable, "-m", "keyagent.daemon", "-D"],
        env=daemon_env(XDG_RUNTIME_DIR=str(runtime), KEYAGENT_SOCK=None),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "a path has no control characters" in result.stderr
    assert "run\\nx" in result.stderr
    assert str(runtime) not in result.stderr  # never the raw newline
    assert not runtime.exists()


@pytest.mark.parametrize(
    ("shell", "syntax"),
    [("/usr/bin/fish", "fish"), ("/bin/tcsh", "csh"), ("/bin/csh", "csh"),
     ("/bin/bash", "sh"), ("/usr/local/bin/zsh", "sh"), ("", "sh"), ("/opt/selfish", "sh")],
)  # fmt: skip
def test_the_syntax_follows_the_login_shell_unless_a_flag_says(
    monkeypatch: pytest.MonkeyPatch, shell: str, syntax: str
) -> None:
    """$SHELL picks the lines' syntax (fish by its name, csh and tcsh by their ending);
    -s or -c overrides it."""
    monkeypatch.setenv("SHELL", shell)
    assert daemon.shell_syntax(None) == syntax
    assert daemon.shell_syntax("sh") == "sh"
    assert daemon.shell_syntax("csh") == "csh"


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_fish_lines_evaluated_by_a_bourne_shell_change_nothing(shell: str) -> None:
    """A script of a fish user that evals the lines without -s gets fish's: its shell must
    refuse them (bash goes on, dash stops the script), never turn on errexit or replace the
    script's arguments and go on ("set -e X" and "set -gx X" would)."""
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed")
    lines = daemon.env_lines("fish", "/run/x/agent.sock", 42) + daemon.unset_lines("fish", 42)
    script = f'set -- a b; eval {shlex.quote(lines)}; echo "flags=$- args=$*"'
    ran = subprocess.run(
        [shell, "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    went_on = [line for line in ran.stdout.splitlines() if line.startswith("flags=")]
    if not went_on:
        assert ran.returncode != 0  # the shell refused, and said so
        return
    flags, args = went_on[0].removeprefix("flags=").split(" args=")
    assert "e" not in flags
    assert args == "a b"


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_sources_the_lines_of_start_and_kill(tmp_path: Path) -> None:
    """In fish (SHELL names it), keyagent | source exports the variables, quoted for fish
    (a path with a space, a quote and a backslash), a client reaches the agent through them,
    and keyagent -k | source stops it and erases them."""
    directory = private_dir(tmp_path, "it's a \\ dir")
    sock = directory / "agent.sock"
    script = (
        f"{PY} -m keyagent.daemon -a {shlex.quote(str(sock))} | source\n"
        'echo "sock=$KEYAGENT_SOCK"\n'
        f"{PY} -m keyagent status --json >/dev/null; and echo reached\n"
        f"{PY} -m keyagent.daemon -k | source\n"
        "set -q KEYAGENT_SOCK KEYAGENT_PID KEYAGENT_HTTP_SOCK; or echo erased\n"
    )
    env = {**os.environ, "SHELL": "/usr/bin/fish"}
    for name in ("KEYAGENT_SOCK", "KEYAGENT_PID", "KEYAGENT_HTTP_SOCK"):
        env.pop(name, None)
    ran = subprocess.run(
        ["fish", "--no-config", "-c", script],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert f"sock={sock}" in lines
    assert "reached" in lines
    assert "erased" in lines
    wait_until(lambda: not sock.exists(), "the agent's socket removed", 10, pause=0.01)


def test_the_http_socket_sits_beside_the_agent_socket() -> None:
    """http.sock beside agent.sock; beside any other name, that name with .http added."""
    assert paths.http_socket_path("/run/user/1/keyagent/agent.sock") == (
        "/run/user/1/keyagent/http.sock"
    )
    assert paths.http_socket_path("/tmp/x/mine.sock") == "/tmp/x/mine.sock.http"


def test_background_agent_prints_csh_lines_with_c(tmp_path: Path) -> None:
    """keyagent -c starts an agent and prints setenv lines that name it."""
    sock = private_dir(tmp_path) / "agent.sock"
    result = subprocess.run(
        [sys.executable, "-m", "keyagent.daemon", "-c", "-a", str(sock)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0] == f"setenv KEYAGENT_SOCK {sock};"
    pid = int(lines[1].split()[2].rstrip(";"))
    with Client(str(sock)) as client:
        assert client.status()["pid"] == pid
        client.stop()
    assert wait_for_exit(pid, 10)


def test_kill_without_pid_variable_fails_clearly() -> None:
    """keyagent -k with no KEYAGENT_PID exits 1 and says what is missing."""
    env = {k: v for k, v in os.environ.items() if k != "KEYAGENT_PID"}
    result = subprocess.run(
        [sys.executable, "-m", "keyagent.daemon", "-k"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "KEYAGENT_PID" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("value", ["abc", "1", "0", "-5", "4\x1b[2J"])
def test_kill_with_a_pid_variable_that_is_no_pid_says_so(value: str) -> None:
    """keyagent -k with KEYAGENT_PID set to what is no process id (or init's) exits 1,
    says the variable is set but wrong, without echoing it, and kills nothing."""
    result = kill_with({**os.environ, "KEYAGENT_PID": value})
    assert result.returncode == 1
    assert "KEYAGENT_PID is set, but not to a process id" in result.stderr
    assert "\x1b" not in result.stderr
    assert result.stdout == ""


ESCAPES = "/tmp/x\x1b]0;PWNED\x07\x1b[2J"
"""A path with an OSC title-set and a screen clear in it."""


def test_kill_names_a_socket_variable_with_escapes_escaped(tmp_path: Path) -> None:
    """keyagent -k names $KEYAGENT_SOCK in its refusal; control characters in it are
    written escaped, never raw to the terminal."""
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        result = kill_with(daemon_env(KEYAGENT_PID=str(sleeper.pid), KEYAGENT_SOCK=ESCAPES))
    finally:
        sleeper.kill()
        sleeper.wait()
    assert result.returncode == 1
    assert f"pid {sleeper.pid} is not the agent on /tmp/x\\x1b]0;PWNED\\x07\\x1b[2J" in (
        result.stderr
    )
    assert "\x1b" not in result.stderr
    assert "\x07" not in result.stderr


def test_a_configuration_error_escapes_the_file_name() -> None:
    """A KEYAGENT_CONFIG naming no file is exit 78, naming it escaped."""
    result = subprocess.run(
        [sys.executable, "-m", "keyagent.daemon", "-s"],
        env=daemon_env(KEYAGENT_CONFIG=ESCAPES), capture_output=True, text=True, timeout=30,
        check=False,
    )  # fmt: skip
    assert result.returncode == 78
    assert "/tmp/x\\x1b]0;PWNED\\x07\\x1b[2J" in result.stderr
    assert "\x1b" not in result.stderr
    assert result.stdout == ""


def test_a_state_directory_with_a_control_character_is_refused_before_binding(
    tmp_path: Path,
) -> None:
    """XDG_STATE_HOME (where the leftovers file goes) with a control character is exit 78
    naming the variable, before any socket is made."""
    run = private_dir(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "keyagent.daemon", "-s", "-a", str(run / "a.sock")],
        env=daemon_env(XDG_STATE_HOME=str(tmp_path / "st\x1bx"), KEYAGENT_CONFIG=os.devnull),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 78, result.stderr
    assert "set XDG_STATE_HOME to a plain path" in result.stderr
    assert "\x1b" not in result.stderr
    assert list(run.iterdir()) == []


def test_command_mode_runs_the_command_and_stops_with_it(tmp_path: Path) -> None:
    """keyagent CMD runs CMD with the variables set (the HTTP socket's too, over one an
    outer agent set), returns its status, and the agent exits."""
    sock = private_dir(tmp_path) / "agent.sock"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "keyagent.daemon",
            "-a",
            str(sock),
            "sh",
            "-c",
            f"{PY} -m keyagent status --json >/dev/null || exit 9; "
            'echo "$KEYAGENT_PID $KEYAGENT_HTTP_SOCK"; exit 7',
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "KEYAGENT_HTTP_SOCK": "/outer/agent/http.sock"},
    )
    assert result.returncode == 7, result.stderr
    pid_text, http_sock = result.stdout.split()
    assert http_sock == str(sock.with_name("http.sock"))
    pid = int(pid_text)
    assert wait_for_exit(pid, 10)
    assert not sock.exists()


def test_command_mode_passes_sigusr1_to_the_agent_and_lives_on(tmp_path: Path) -> None:
    """SIGUSR1 to keyagent CMD (pkill -USR1 -x keyagent, from a screen-lock hook) makes the
    agent forget its keys; the wrapper is not killed by it, so CMD keeps its agent and its
    exit status is returned."""
    sock = private_dir(tmp_path) / "agent.sock"
    script = (
        f"printf 'k-S3CR3T-usr1\\n' | {PY} -m keyagent --host h --user u add >/dev/null "
        "|| exit 9; kill -USR1 $PPID; "
        f"for i in $(seq 100); do {PY} -m keyagent get >/dev/null 2>&1 || break; "
        "sleep 0.1; done; "
        f"{PY} -m keyagent get >/dev/null 2>&1 && exit 6; "  # forgotten: the agent got it
        f"{PY} -m keyagent status --json >/dev/null || exit 8; exit 7"
    )
    result = subprocess.run(
        [sys.executable, "-m", "keyagent.daemon", "-a", str(sock), "sh", "-c", script],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 7, result.stderr
    assert not sock.exists()


def test_socket_paths_with_control_characters_or_too_long_are_refused(tmp_path: Path) -> None:
    """-a with a control character is a usage error (exit 64); a path longer than a Unix
    socket may have says so (bind itself says only 'path too long', or 'Success')."""
    directory = private_dir(tmp_path)

    def start(path: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "keyagent.daemon", "-D", "-a", path],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    escaped = start(str(directory / "a\x1b[2Jb.sock"))
    assert escaped.returncode == 64
    assert "argument -a: a path has no control characters" in escaped.stderr
    assert "\x1b" not in escaped.stderr
    long = str(directory / ("x" * 120 + ".sock"))
    too_long = start(long)
    assert too_long.returncode == 1
    assert "is longer than a Unix socket path may be (107 bytes)" in too_long.stderr
    assert not os.path.exists(long)


def test_a_double_dash_ends_keyagents_options_before_the_command(tmp_path: Path) -> None:
    """keyagent -- CMD runs CMD (the "--" is not the command), as keyagent-ctl exec -- does;
    a second "--" is the command's own."""
    sock = private_dir(tmp_path) / "agent.sock"
    ran = subprocess.run(
        [sys.executable, "-m", "keyagent.daemon", "-a", str(sock), "--", "sh", "-c", "exit 3"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert ran.returncode == 3, ran.stderr
    echoed = subprocess.run(
        [sys.executable, "-m", "keyagent.daemon", "-a", str(sock), "--", "echo", "--", "-x"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (echoed.returncode, echoed.stdout) == (0, "-- -x\n"), echoed.stderr


def test_command_mode_beside_an_outer_agent_on_the_default_socket(tmp_path: Path) -> None:
    """With an agent on the default socket already, keyagent CMD does not refuse: its agent
    takes a private socket, which CMD is told (the outer agent's variables replaced), and
    removes when it exits; the outer agent goes on serving the default path."""
    runtime = private_dir(tmp_path)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    env.pop("KEYAGENT_SOCK", None)
    outer = subprocess.run(
        [sys.executable, "-m", "keyagent.daemon"],
        capture_output=True, text=True, timeout=60, check=True, env=env,
    )  # fmt: skip
    default = runtime / "keyagent" / "agent.sock"
    assert f"KEYAGENT_SOCK={default};" in outer.stdout
    outer_pid = int(outer.stdout.split("KEYAGENT_PID=")[1].split(";")[0])
    try:
        inner = subprocess.run(
            [sys.executable, "-m", "keyagent.daemon", "sh", "-c",
             f'echo "$KEYAGENT_SOCK"; {PY} -m keyagent status --json'],
            capture_output=True, text=True, timeout=60, check=False,
            env={**env, "KEYAGENT_SOCK": str(default)},
        )  # fmt: skip
        assert inner.returncode == 0, inner.stderr
        private, status = inner.stdout.split("\n", 1)
        assert private != str(default)
        assert json.loads(status)["socket"] == private
        wait_until(
            lambda: not os.path.exists(os.path.dirname(private)),
            "the private socket directory removed with the inner agent", 10, pause=0.01,
        )  # fmt: skip
        with Client(str(default)) as client:
            assert client.status()["pid"] == outer_pid
        # A private directory whose socket cannot be bound (the path too long), or in a
        # TMPDIR with a control character in its name: the start fails, saying why, and
        # leaves nothing behind.
        deep, odd = tmp_path / ("d" * 90), tmp_path / "tmp\nodd"
        for tmpdir, why in (
            (deep, "is longer than a Unix socket path may be"),
            (odd, "a path has no control characters"),
        ):
            tmpdir.mkdir(mode=0o700)
            failed = subprocess.run(
                [sys.executable, "-m", "keyagent.daemon", "true"],
                capture_output=True, text=True, timeout=60, check=False,
                env={**env, "TMPDIR": str(tmpdir)},
            )  # fmt: skip
            assert failed.returncode == 1
            assert why in failed.stderr
            assert list(tmpdir.iterdir()) == []
    finally:
        os.kill(outer_pid, signal.SIGTERM)
        assert wait_for_exit(outer_pid, 10)


def test_command_not_found_in_command_mode(tmp_path: Path) -> None:
    """keyagent with a missing command exits 127 and leaves no agent behind."""
    sock = private_dir(tmp_path) / "agent.sock"
    result = subprocess.run(
        [sys.executable, "-m", "keyagent.daemon", "-a", str(sock), "no-such-command-xyz"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 127
    assert "no-such-command-xyz" in result.stderr
    # The agent was told to stop: it goes, and takes its socket with it.
    wait_until(lambda: not sock.exists(), "the agent's socket removed", 10, pause=0.01)
    with socket.socket(socket.AF_UNIX) as probe, pytest.raises(FileNotFoundError):
        probe.connect(str(sock))


def test_socket_and_directory_modes(agent: AgentProcess) -> None:
    """The socket is 0600 and its directory 0700, both owned by the agent's user."""
    sock_info = os.stat(agent.socket_path)
    dir_info = os.stat(os.path.dirname(agent.socket_path))
    assert stat.S_ISSOCK(sock_info.st_mode)
    assert stat.S_IMODE(sock_info.st_mode) == 0o600
    assert stat.S_IMODE(dir_info.st_mode) == 0o700
    assert sock_info.st_uid == dir_info.st_uid == os.geteuid()


def start_foreground(sock: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run keyagent -D where it is expected to refuse (so it exits by itself)."""
    return subprocess.run(
        [sys.executable, "-m", "keyagent.daemon", "-D", "-a", str(sock), *extra],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_refuses_a_directory_owned_by_another_user(tmp_path: Path) -> None:
    """A socket directory owned by someone else is refused with the owner named."""
    directory = private_dir(tmp_path)
    os.chown(directory, 65534, 65534)
    result = start_foreground(directory / "agent.sock")
    assert result.returncode == 1
    assert "owned by uid 65534" in result.stderr


@pytest.mark.parametrize(
    ("mode", "owner", "problem"),
    [
        (0o777, 0, "writable by group or others (mode 0777)"),
        (0o775, 0, "writable by group or others (mode 0775)"),
        (0o755, 65534, "owned by uid 65534"),
    ],
)
def test_refuses_a_directory_another_user_could_replace(
    tmp_path: Path, mode: int, owner: int, problem: str
) -> None:
    """Whoever may write to a parent of the socket's directory could move the directory
    aside and answer in the agent's place: such a parent, however far up, is refused. (A
    sticky one such as /tmp is not: see the private-directory test below.)"""
    above = tmp_path / "above"
    above.mkdir()
    directory = private_dir(above)
    os.chmod(tmp_path, mode)
    os.chown(tmp_path, owner, 0)
    result = start_foreground(directory / "agent.sock")
    assert result.returncode == 1
    assert f"{tmp_path} is {problem}, so another user could replace {directory}" in result.stderr
    assert not (directory / "agent.sock").exists()


def test_refuses_a_link_another_user_could_change(tmp_path: Path) -> None:
    """A symbolic link on the way to the socket belongs to whoever made it, who can point it
    elsewhere at will; one of another user's is refused, one of ours is followed and the
    directories it leads to checked too."""
    target = tmp_path / "target"
    target.mkdir()
    directory = private_dir(target)
    link = tmp_path / "link"
    link.symlink_to(target)
    os.lchown(link, 65534, 65534)
    result = start_foreground(link / directory.name / "agent.sock")
    assert result.returncode == 1
    assert f"{link} is owned by uid 65534" in result.stderr
    os.lchown(link, 0, 0)
    os.chmod(target, 0o777)
    result = start_foreground(link / directory.name / "agent.sock")
    assert result.returncode == 1
    assert f"{target} is writable by group or others" in result.stderr


def test_a_private_directory_in_an_unsafe_tmpdir_is_refused_and_removed(tmp_path: Path) -> None:
    """Without XDG_RUNTIME_DIR the agent makes its directory in $TMPDIR: one that another
    user may write to, without the sticky bit, is refused, naming TMPDIR, and the directory
    made there is removed."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    os.chmod(tmpdir, 0o777)
    os.chown(tmpdir, 65534, 65534)
    result = subprocess.run(
        [sys.executable, "-m", "keyagent.daemon", "-D"],
        env=daemon_env(XDG_RUNTIME_DIR=None, KEYAGENT_SOCK=None, TMPDIR=str(tmpdir)),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert f"{tmpdir} is owned by uid 65534" in result.stderr
    assert "$TMPDIR" in result.stderr
    assert "listening on" not in result.stderr
    assert list(tmpdir.iterdir()) == []


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o750])
def test_refuses_a_directory_open_to_group_or_others(tmp_path: Path, mode: int) -> None:
    """A socket directory with any group or other permission is refused with the fix named."""
    directory = private_dir(tmp_path)
    os.chmod(directory, mode)
    result = start_foreground(directory / "agent.sock")
    assert result.returncode == 1
    assert "chmod 700" in result.stderr


def test_a_shared_directory_is_never_to_be_closed_or_removed(tmp_path: Path) -> None:
    """A socket in a sticky directory (/tmp, even when it is root's and the agent runs as
    root) is refused with advice to use a directory of one's own, never to chmod it."""
    directory = private_dir(tmp_path)
    os.chmod(directory, 0o1777)
    result = start_foreground(directory / "agent.sock")
    assert result.returncode == 1
    assert "shared directory" in result.stderr
    assert "mkdir -m 700" in result.stderr
    assert "chmod" not in result.stderr
    assert "remove it" not in result.stderr


def test_refuses_to_start_over_a_live_agent(agent: AgentProcess) -> None:
    """A second agent on the socket of a live one refuses and leaves the first serving."""
    result = start_foreground(Path(agent.socket_path))
    assert result.returncode == 1
    assert "already running" in result.stderr
    with agent.client() as client:
        assert client.status()["pid"] == agent.pid


def test_replaces_a_stale_socket(tmp_path: Path, agent_factory: AgentFactory) -> None:
    """A socket file left by a dead agent is replaced by the new agent."""
    directory = private_dir(tmp_path, "agent")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(directory / "agent.sock"))
    stale.close()  # bound, never listening: connections are refused, as after a crash
    agent = agent_factory()
    with agent.client() as client:
        assert client.status()["pid"] == agent.pid


def test_refuses_a_path_that_is_not_a_socket(tmp_path: Path) -> None:
    """A regular file where the socket should go is left alone and reported."""
    directory = private_dir(tmp_path)
    (directory / "agent.sock").write_text("not a socket")
    result = start_foreground(directory / "agent.sock")
    assert result.returncode == 1
    assert "not a socket" in result.stderr
    assert (directory / "agent.sock").read_text() == "not a socket"


def test_default_socket_is_in_the_runtime_dir_and_found_by_clients(tmp_path: Path) -> None:
    """Without -a, the agent listens on $XDG_RUNTIME_DIR/keyagent/agent.sock and clients find it."""
    runtime = private_dir(tmp_path, "xdg")
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    env.pop("KEYAGENT_SOCK", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "keyagent.daemon", "-D"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        expected = runtime / "keyagent" / "agent.sock"
        assert first.startswith(f"KEYAGENT_SOCK={expected};")
        status = subprocess.run(
            [sys.executable, "-m", "keyagent", "status", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert status.returncode == 0, status.stderr
        assert f'"pid": {process.pid}' in status.stdout
        assert stat.S_IMODE(os.stat(runtime / "keyagent").st_mode) == 0o700
    finally:
        process.terminate()
        process.communicate(timeout=10)


def test_keyagent_sock_variable_and_socket_flag_precedence(
    agent_factory: AgentFactory,
) -> None:
    """--socket beats $KEYAGENT_SOCK, which beats the default path."""
    first = agent_factory(name="first")
    second = agent_factory(name="second")
    env = {**os.environ, "KEYAGENT_SOCK": first.socket_path}
    via_env = subprocess.run(
        [sys.executable, "-m", "keyagent", "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert f'"pid": {first.pid}' in via_env.stdout
    via_flag = subprocess.run(
        [sys.executable, "-m", "keyagent", "--socket", second.socket_path, "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert f'"pid": {second.pid}' in via_flag.stdout


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_stop_signals_exit_cleanly_and_remove_the_socket(
    agent: AgentProcess, signum: signal.Signals
) -> None:
    """TERM, INT and HUP make the agent exit 0 and remove its socket."""
    assert agent.process is not None
    os.kill(agent.pid, signum)
    assert agent.process.wait(10) == 0
    assert not os.path.exists(agent.socket_path)
    assert f"{signum.name}: stopping" in agent.log()


def test_usr1_forgets_every_key_and_keeps_serving(agent: AgentProcess) -> None:
    """SIGUSR1 drops all held keys; the agent stays up."""
    with agent.client() as client:
        client.add("h", "u", "k1")
        os.kill(agent.pid, signal.SIGUSR1)
        # The signal and the next request race; the agent handles signals first once woken,
        # so wait on the observable effect with a bounded number of round trips.
        for _ in range(100000):
            if client.status()["keys"] == 0:
                break
        assert client.status()["keys"] == 0
        assert client.hello()["protocol"] == 1


def test_sigkill_leaves_a_stale_socket_that_the_next_agent_replaces(
    agent_factory: AgentFactory,
) -> None:
    """After SIGKILL, clients see 'no agent' and a new agent takes the socket over."""
    agent = agent_factory()
    assert agent.process is not None
    agent.process.kill()
    agent.process.wait(10)
    with pytest.raises(errors.AgentUnreachable):
        Client(agent.socket_path).hello()
    again = agent_factory()
    assert again.socket_path == agent.socket_path
    with again.client() as client:
        assert client.status()["pid"] == again.pid


def test_core_dumps_are_disabled(agent: AgentProcess) -> None:
    """The agent runs with a core-file size limit of zero, soft and hard."""
    limits = Path(f"/proc/{agent.pid}/limits").read_text()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"]


def test_agent_is_not_dumpable() -> None:
    """The serving process marks itself non-dumpable (exec resets the flag), so its /proc
    files belong to root, not to the user it runs as."""
    base = Path(tempfile.mkdtemp(prefix="keyagent-nobody-"))  # tmp_path is private to root
    os.chmod(base, 0o755)
    directory = base / "nobody"
    directory.mkdir(mode=0o700)
    os.chown(directory, 65534, 65534)
    # The interpreter may live under /root (0700): nobody gets to search directories, and
    # nothing else, through an ambient capability that survives the daemon's exec.
    setpriv = [
        "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
        "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", "--",
    ]  # fmt: skip
    command = [*setpriv, sys.executable, "-m", "keyagent.daemon", "-D", "--config", "/dev/null",
               "-a", str(directory / "agent.sock")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    try:
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=str(base), env=env
        ) as process:
            try:
                assert process.stdout is not None
                assert read_line(process.stdout.fileno(), 20).startswith(b"KEYAGENT_SOCK=")
                status = Path(f"/proc/{process.pid}/status").read_text()
                owner = os.stat(f"/proc/{process.pid}/environ").st_uid
            finally:
                process.terminate()
        assert "Uid:\t65534" in status
        assert owner == 0  # a dumpable process's /proc files would belong to uid 65534
    finally:
        shutil.rmtree(base)


def test_command_mode_passes_descriptors_and_ignored_signals_to_the_command(
    tmp_path: Path,
) -> None:
    """CMD gets what it would get run directly: the descriptors keyagent was given (a make
    jobserver, ``3<file``) and the signals it was told to ignore (``nohup``). The agent
    itself keeps none of CMD's stderr but a private copy for its errors: fd 2 is /dev/null."""
    sock = private_dir(tmp_path) / "agent.sock"
    given = tmp_path / "given"
    given.write_text("through fd 3\n")
    script = (
        f"trap '' HUP; exec {PY} -m keyagent.daemon -a {shlex.quote(str(sock))} sh -c '"
        'cat <&3; kill -HUP $$; echo "survived"; readlink /proc/$KEYAGENT_PID/fd/2'
        "' 3<" + shlex.quote(str(given))
    )
    result = subprocess.run(
        ["sh", "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["through fd 3", "survived", "/dev/null"]


def test_a_command_that_cannot_be_executed_in_command_mode(tmp_path: Path) -> None:
    """keyagent with a command it may not execute exits 126, as a shell does, and stops
    the agent before it returns."""
    sock = private_dir(tmp_path) / "agent.sock"
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    result = subprocess.run(
        [sys.executable, "-m", "keyagent.daemon", "-a", str(sock), str(script)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 126
    assert f"{script}: Permission denied" in result.stderr
    assert not sock.exists()


def test_command_mode_agent_has_a_session_of_its_own(tmp_path: Path) -> None:
    """In command mode the agent leaves the command's process group, so a Ctrl-C at the
    terminal (sent to the foreground group) cannot stop it."""
    sock = private_dir(tmp_path) / "agent.sock"
    result = subprocess.run(
        [sys.executable, "-m", "keyagent.daemon", "-a", str(sock), "sh", "-c",
         'echo "$(ps -o pgid= -p "$KEYAGENT_PID") $(ps -o pgid= -p $$)"'],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    agent_group, command_group = result.stdout.split()
    assert agent_group != command_group


def daemon_env(**changes: str | None) -> dict[str, str]:
    """os.environ with ``changes`` applied (None removes a variable)."""
    env = dict(os.environ)
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def kill_with(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keyagent.daemon", "-k"],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


# A service manager in miniature: it listens on the socket, then starts the agent with the
# socket passed as fd 3 (LISTEN_FDS), and stays the socket's listener, as systemd --user does.
LAUNCHER = """
import os, socket, sys
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1])
listener.listen(16)
child = os.fork()
if child == 0:
    if listener.fileno() != 3:
        os.dup2(listener.fileno(), 3)
    os.set_inheritable(3, True)
    os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
    os.execv(sys.executable, [sys.executable, "-m", "keyagent.daemon", "-D"])
print(child, flush=True)
os.waitpid(child, 0)
"""


def test_kill_under_socket_activation_signals_the_agent_never_the_manager(
    tmp_path: Path,
) -> None:
    """Under socket activation the listener is the manager: keyagent -k refuses the manager's
    pid (once it SIGTERMed systemd --user) and stops the agent by its own pid."""
    directory = tmp_path / "run"
    directory.mkdir(mode=0o700)
    path = str(directory / "agent.sock")
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, path], stdout=subprocess.PIPE,
        env=daemon_env(KEYAGENT_CONFIG=os.devnull),
    )  # fmt: skip
    try:
        assert launcher.stdout is not None
        agent_pid = int(read_line(launcher.stdout.fileno(), 20))
        with Client(path, timeout=20) as client:  # waits in the backlog until the agent serves
            assert client.status()["pid"] == agent_pid
            assert client.peer_pid == launcher.pid
        refused = kill_with(daemon_env(KEYAGENT_PID=str(launcher.pid), KEYAGENT_SOCK=path))
        assert refused.returncode == 1, refused.stderr
        assert "nothing was killed" in refused.stderr
        assert f"the agent there is pid {agent_pid}" in refused.stderr
        assert launcher.poll() is None
        done = kill_with(daemon_env(KEYAGENT_PID=str(agent_pid), KEYAGENT_SOCK=path))
        assert done.returncode == 0, done.stderr
        assert launcher.wait(20) == 0  # the agent exited, and with it the launcher
    finally:
        launcher.kill()
        launcher.wait(10)
        if launcher.stdout is not None:
            launcher.stdout.close()


def test_kill_signals_only_the_process_listening_on_the_socket(
    agent_factory: AgentFactory,
) -> None:
    """keyagent -k refuses a KEYAGENT_PID that is not the process listening on KEYAGENT_SOCK."""
    agent = agent_factory(name="one")
    other = agent_factory(name="two")
    # A process of mine that waits until its stdin closes (at the end of the test).
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        for pid, sock in (
            (bystander.pid, agent.socket_path),  # any process of mine
            (other.pid, agent.socket_path),  # an agent, but not the one on this socket
            (agent.pid, None),  # nothing to check against
        ):
            result = kill_with(daemon_env(KEYAGENT_PID=str(pid), KEYAGENT_SOCK=sock,
                                          XDG_RUNTIME_DIR=None))  # fmt: skip
            assert result.returncode == 1, result.stderr
            assert "nothing was killed" in result.stderr
            assert result.stdout == ""
        assert bystander.poll() is None
        assert agent.process is not None
        assert agent.process.poll() is None
        assert other.process is not None
        assert other.process.poll() is None
        # The real pair is stopped, and the shell lines are printed.
        done = kill_with(daemon_env(KEYAGENT_PID=str(agent.pid), KEYAGENT_SOCK=agent.socket_path))
        assert done.returncode == 0, done.stderr
        assert "unset KEYAGENT_PID;" in done.stdout
        assert agent.process.wait(10) == 0
    finally:
        bystander.kill()
        bystander.communicate(timeout=10)  # also closes its stdin pipe


def test_a_background_agent_is_the_listener_its_pid_names(tmp_path: Path) -> None:
    """After eval "$(keyagent)", the printed pid is the process that listens (SO_PEERCRED)."""
    sock = private_dir(tmp_path) / "agent.sock"
    result = subprocess.run(
        [sys.executable, "-m", "keyagent.daemon", "-s", "-a", str(sock)],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    pid = int(result.stdout.splitlines()[1].split(";")[0].removeprefix("KEYAGENT_PID="))
    try:
        with Client(str(sock)) as client:
            assert client.status()["pid"] == pid
            assert client.peer_pid == pid
    finally:
        os.kill(pid, signal.SIGTERM)
        assert wait_for_exit(pid, 10)


@pytest.fixture
def systemd_home(tmp_path: Path) -> dict[str, str]:
    """An environment with a private runtime directory and keyagent.service installed in
    $XDG_CONFIG_HOME/systemd/user, as the user manager would find it."""
    runtime = private_dir(tmp_path, "xdg-runtime")
    units = tmp_path / "config" / "systemd" / "user"
    units.mkdir(parents=True)
    (units / "keyagent.service").write_text("[Service]\nExecStart=keyagent -D\n")
    return daemon_env(
        XDG_RUNTIME_DIR=str(runtime),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        XDG_DATA_HOME=str(tmp_path / "data"),
        KEYAGENT_SOCK=None,
        KEYAGENT_PID=None,
    )


def test_a_hand_started_agent_is_not_taken_for_the_units(systemd_home: dict[str, str]) -> None:
    """With the unit installed but the agent on the default socket started by hand (not in
    keyagent.service's control group), eval "$(keyagent)" and keyagent -k do not send the
    user to systemctl, which would stop nothing: a second agent is refused as usual, and -k
    asks for the agent's pid. Once it is gone, clients say how to check the unit.
    (tests/test_systemd.py shows both naming systemctl for an agent the manager runs.)"""
    env = systemd_home
    # In the foreground on the default path, as systemd would run it, but by hand.
    process = subprocess.Popen(
        [sys.executable, "-m", "keyagent.daemon", "-D"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        assert read_line(process.stdout.fileno(), 20).startswith(b"KEYAGENT_SOCK=")
        started = run_shell(
            f'eval "$({PY} -m keyagent.daemon -s)" && echo "sock=$KEYAGENT_SOCK"', env
        )
        assert "an agent is already running on" in started.stderr
        assert "sock=\n" in started.stdout  # the eval set nothing
        assert "systemctl" not in started.stdout + started.stderr
        killed = kill_with(env)
        assert killed.returncode == 1
        assert "KEYAGENT_PID is not set to an agent's pid" in killed.stderr
        assert "systemctl" not in killed.stderr
        assert process.poll() is None  # neither command started or stopped an agent
    finally:
        process.terminate()
        process.wait(10)
        process.stdout.close()  # type: ignore[union-attr]
    gone = subprocess.run(
        [sys.executable, "-m", "keyagent", "status"],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert gone.returncode == 2
    assert "systemctl --user status keyagent.service" in gone.stderr


def test_no_unit_no_systemctl_hint(tmp_path: Path) -> None:
    """Without an installed unit, "no agent" suggests starting one, not systemctl."""
    env = daemon_env(
        XDG_RUNTIME_DIR=str(private_dir(tmp_path, "xdg-runtime")),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        XDG_DATA_HOME=str(tmp_path / "data"),
        KEYAGENT_SOCK=None,
    )
    if any(
        Path(d, "keyagent.service").exists() for d in ("/etc/systemd/user", "/usr/lib/systemd/user")
    ):
        pytest.skip("keyagent.service is installed system-wide on this machine")
    gone = subprocess.run(
        [sys.executable, "-m", "keyagent", "status"],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert gone.returncode == 2
    assert "systemctl --user" not in gone.stderr
    assert 'eval "$(keyagent)"' in gone.stderr


def test_without_a_runtime_dir_the_agent_makes_a_private_directory(tmp_path: Path) -> None:
    """Without XDG_RUNTIME_DIR, a runtime-UID made first by another user does not stop the
    agent: it binds in a fresh private directory and says that clients need KEYAGENT_SOCK."""
    if os.path.isdir(f"/run/user/{os.geteuid()}"):
        pytest.skip("/run/user/UID exists here: it is the runtime directory")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir(mode=0o1777)
    os.chmod(tmpdir, 0o1777)
    squatted = tmpdir / f"runtime-{os.geteuid()}"
    squatted.mkdir(mode=0o700)
    os.chown(squatted, 65534, 65534)
    env = daemon_env(XDG_RUNTIME_DIR=None, KEYAGENT_SOCK=None, TMPDIR=str(tmpdir))
    process = subprocess.Popen(
        [sys.executable, "-m", "keyagent.daemon", "-D"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        first = read_line(process.stdout.fileno(), 20).decode()
        assert first.startswith("KEYAGENT_SOCK="), first
        path = Path(first.split(";")[0].removeprefix("KEYAGENT_SOCK="))
        assert path.name == "agent.sock"
        assert path.parent.parent == tmpdir
        assert path.parent != squatted
        info = os.stat(path.parent)
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (os.geteuid(), 0o700)
        with Client(str(path)) as client:
            assert client.status()["pid"] == process.pid
        # A client without the variable cannot guess the directory, and says what it needs.
        lost = subprocess.run(
            [sys.executable, "-m", "keyagent", "status"],
            env=env, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert lost.returncode == 2
        assert "KEYAGENT_SOCK" in lost.stderr
        assert "XDG_RUNTIME_DIR" in lost.stderr
        found = subprocess.run(
            [sys.executable, "-m", "keyagent", "status"],
            env={**env, "KEYAGENT_SOCK": str(path)}, capture_output=True, text=True,
            timeout=30, check=False,
        )  # fmt: skip
        assert found.returncode == 0, found.stderr
    finally:
        process.terminate()
        _, err = process.communicate(timeout=10)
    assert "KEYAGENT_SOCK" in err.decode()
    assert not path.parent.exists(), "the agent left its private directory behind"


def test_lifetime_is_the_long_form_of_t(agent_factory: AgentFactory) -> None:
    """keyagent --lifetime 1h sets the default key lifetime, as -t 1h does."""
    agent = agent_factory("--lifetime", "1h")
    with agent.client() as client:
        held = client.add("h", "u", "k-with-default-lifetime")
    assert held.get("expires")


def test_inherited_sockets_are_told_apart_by_name_else_by_order() -> None:
    """A socket named http is the HTTP socket; without names, the second one is (systemd
    passes a unit's sockets in the order of its ListenStream= lines)."""
    socks = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
    try:
        a, b, c = socks
        assert daemon.split_inherited([("keyagent.socket", a)]) == ([a], [])
        assert daemon.split_inherited([("keyagent.socket", a), ("keyagent.socket", b)]) == (
            [a], [b]
        )  # fmt: skip
        assert daemon.split_inherited([("http", a), ("agent", b)]) == ([b], [a])
        assert daemon.split_inherited([("x", a), ("x", b), ("x", c)]) == ([a, c], [b])
    finally:
        for sock in socks:
            sock.close()


def test_every_directory_a_link_leads_through_is_checked(tmp_path: Path) -> None:
    """A link's target is walked name by name as the kernel resolves it: a second link met
    there, in a directory another user may write to, is refused too (that user could point
    it elsewhere), though the final directories are all fine."""
    safe = tmp_path / "safe"
    (safe / "d").mkdir(parents=True)
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    os.chown(open_to_all, 65534, 65534)
    os.chmod(open_to_all, 0o777)
    (open_to_all / "l2").symlink_to(safe)
    start = tmp_path / "start"
    start.mkdir()
    (start / "l1").symlink_to(open_to_all / "l2" / "d")
    with pytest.raises(sockets.SocketSetupError, match=f"{open_to_all} is owned by uid 65534"):
        sockets.check_ancestors(str(start / "l1" / "run"))
    sockets.check_ancestors(str(safe / "d" / "run"))  # the same place, reached plainly


@pytest.mark.parametrize(
    ("mode", "owner", "refused"),
    [(0o1777, 0, False), (0o1770, 0, False), (0o1777, 65534, True), (0o0777, 0, True)],
)
def test_a_sticky_parent_is_safe_only_when_it_is_roots_or_ours(
    tmp_path: Path, mode: int, owner: int, refused: bool
) -> None:
    """In a sticky directory only an entry's owner (or the directory's) may rename it: such
    a parent open to writes is fine if it is root's or ours, as /tmp is, and refused if it
    belongs to someone else, who could rename anything in it."""
    parent = tmp_path / "parent"
    parent.mkdir()
    os.chown(parent, owner, 0)
    os.chmod(parent, mode)
    directory = str(parent / "run")
    if refused:
        with pytest.raises(sockets.SocketSetupError, match="another user could replace"):
            sockets.check_ancestors(directory)
    else:
        sockets.check_ancestors(directory)


def test_a_runtime_directory_reached_through_a_link_is_followed(tmp_path: Path) -> None:
    """XDG_RUNTIME_DIR may be a symbolic link (root's or ours) to a private directory: it is
    followed, the link checked as any on the way is. A socket directory that is itself a
    link is refused, naming the directory it leads to."""
    real = private_dir(tmp_path, "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    started = subprocess.run(
        [sys.executable, "-m", "keyagent.daemon", "-s", "sh", "-c", 'echo "$KEYAGENT_SOCK"'],
        env=daemon_env(XDG_RUNTIME_DIR=str(link), KEYAGENT_SOCK=None),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == str(link / "keyagent" / "agent.sock")
    refused = start_foreground(link / "agent.sock")
    assert refused.returncode == 1
    assert f"{link} is a symbolic link" in refused.stderr
    assert f"use -a with the path it leads to, {real}" in refused.stderr


def test_a_command_name_with_control_characters_is_shown_escaped(tmp_path: Path) -> None:
    """keyagent CMD with a command that is not found says so without writing the name's
    control characters (a terminal title sequence, say) raw; nor does a bad -t value."""
    sock = private_dir(tmp_path) / "agent.sock"
    name = "x\x1b]0;pwn\x07y"
    result = subprocess.run(
        [sys.executable, "-m", "keyagent.daemon", "-a", str(sock), name],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 127
    assert "x\\x1b]0;pwn\\x07y" in result.stderr
    assert "\x1b" not in result.stderr
    bad_lifetime = subprocess.run(
        [sys.executable, "-m", "keyagent.daemon", "-t", "1h\x1b[2J"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad_lifetime.returncode == 64
    assert "\x1b" not in bad_lifetime.stderr
    assert "1h\\x1b[2J" in bad_lifetime.stderr
