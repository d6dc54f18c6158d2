"""keyagent-ctl completion: scripts shtab writes from the parsers, run in the real shells."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import run_ctl


def script(shell: str, *extra: str) -> str:
    result = run_ctl(None, "completion", shell, *extra)
    assert result.code == 0, result.err
    return result.out


def run_shell(argv: list[str], tmp_path: Path) -> str:
    """Run a shell non-interactively with a private HOME, so no user file is read."""
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not installed (apt-get install {argv[0]})")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "TERM": "dumb"}
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def bash_complete(completion: str, words: list[str], tmp_path: Path) -> list[str]:
    """What bash offers for the last of ``words``, through the script's function."""
    path = tmp_path / "completion.bash"
    path.write_text(completion)
    quoted = " ".join(f"'{word}'" for word in words)
    program = f"""
        source {path}
        COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}
        COMP_LINE="${{COMP_WORDS[*]}}"; COMP_POINT=${{#COMP_LINE}}
        function=$(complete -p {words[0]} | sed -E 's/.* -F ([^ ]+) .*/\\1/')
        "$function" {words[0]} '{words[-1]}' '{words[-2]}'
        printf '%s\\n' "${{COMPREPLY[@]}}"
    """
    return run_shell(["bash", "--norc", "--noprofile", "-c", program], tmp_path).split()


def test_bash_completes_commands_and_each_commands_own_options(tmp_path: Path) -> None:
    """In bash, commands complete by prefix and lock offers --socket but not --host."""
    completion = script("bash")
    assert bash_complete(completion, ["keyagent-ctl", "lo"], tmp_path) == [
        "lock",
        "log",
        "login",
        "logout",
    ]
    lock = bash_complete(completion, ["keyagent-ctl", "lock", "--"], tmp_path)
    assert "--socket" in lock
    assert "--host" not in lock
    add = bash_complete(completion, ["keyagent-ctl", "add", "--"], tmp_path)
    assert {"--host", "--user", "--description", "--lifetime", "--persist"} <= set(add)


def test_bash_completes_file_names_for_socket(tmp_path: Path) -> None:
    """--socket PATH completes file names, as its value is a socket's path."""
    (tmp_path / "agent.sock").touch()
    words = ["keyagent-ctl", "status", "--socket", f"{tmp_path}/ag"]
    assert bash_complete(script("bash"), words, tmp_path) == [f"{tmp_path}/agent.sock"]


def test_bash_completes_the_daemon_too(tmp_path: Path) -> None:
    """completion bash --program keyagent completes keyagent's own flags."""
    offered = bash_complete(script("bash", "--program", "keyagent"), ["keyagent", "--"], tmp_path)
    assert {"--lifetime", "--idle-timeout", "--no-keyring", "--version"} <= set(offered)


def test_fish_completes_commands_and_options(tmp_path: Path) -> None:
    """In fish, commands complete with their help, and lock offers no --host."""
    path = tmp_path / "keyagent-ctl.fish"
    path.write_text(script("fish"))
    program = (
        f"source {path}; complete -C 'keyagent-ctl lo'; echo ==; complete -C 'keyagent-ctl lock --'"
    )
    commands, lock = run_shell(["fish", "--no-config", "-c", program], tmp_path).split("==\n")
    assert [line.split("\t")[0] for line in commands.splitlines()] == [
        "lock",
        "log",
        "login",
        "logout",
    ]
    assert "lock the agent with a passphrase" in commands
    lock_options = [line.split("\t")[0] for line in lock.splitlines()]
    assert "--socket" in lock_options
    assert "--host" not in lock_options


@pytest.mark.parametrize("how", ["eval", "fpath"])
def test_zsh_registers_the_completion(tmp_path: Path, how: str) -> None:
    """zsh takes the script by eval or from a directory in $fpath, and binds it to the command."""
    completion = script("zsh")
    functions = tmp_path / "functions"
    functions.mkdir()
    (functions / "_keyagent-ctl").write_text(completion)
    load = f'eval "$(cat {functions}/_keyagent-ctl)"' if how == "eval" else "true"
    program = (
        f"fpath=({functions} $fpath); autoload -Uz compinit; compinit -u -d {tmp_path}/zcompdump;"
        f" {load}; print -r -- ${{_comps[keyagent-ctl]}}"
    )
    bound = run_shell(["zsh", "-f", "-c", program], tmp_path).strip()
    assert bound == ("_shtab_keyagent_ctl" if how == "eval" else "_keyagent-ctl")
    run_shell(["zsh", "-n", str(functions / "_keyagent-ctl")], tmp_path)
    # Each command's own options: lock's list names --socket and not --host.
    lock_options = completion.split("_shtab_keyagent_ctl_lock_options=(", 1)[1].split("\n)", 1)[0]
    assert "--socket" in lock_options
    assert "--host" not in lock_options


def test_completion_without_shtab_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without shtab, completion is a usage error naming the install command, not a traceback."""
    monkeypatch.setitem(sys.modules, "shtab", None)  # makes `import shtab` fail
    result = run_ctl(None, "completion", "bash")
    assert result.code == 64
    assert "pip install shtab" in result.err
    assert "Traceback" not in result.err


def test_an_unknown_shell_is_a_usage_error() -> None:
    """completion names the shells it supports when given another."""
    result = run_ctl(None, "completion", "csh")
    assert result.code == 64
    assert "choose from 'bash', 'zsh', 'fish'" in result.err
