"""Key rules against the real daemon: non-exportable keys, confirmation through a real askpass
program, and allowed programs checked against the real peer executable."""

from __future__ import annotations

import json
import os
import select
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from keyagent import errors
from keyagent.daemon import EXIT_CONFIG
from keyagent.store import key_id_for
from keyagent.testing.agent import AgentProcess, wait_for_exit

from .conftest import AgentFactory, run_ctl

HOST, USER = "app.conduce.example", "ada@example.com"
PLAIN, GUARDED = "plain-S3CR3T-0001", "guarded-S3CR3T-0002"

# One request line, byte for byte the same from every peer: the reply memo keys on it.
GET_LINE = b'{"id":1,"op":"get"}\n'
# Sends GET_LINE and prints the reply line; run with -I -S by different executables.
PEER_SCRIPT = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_UNIX)\n"
    "s.settimeout(20)\n"
    "s.connect(sys.argv[1])\n"
    f"s.sendall({GET_LINE!r})\n"
    "data = b''\n"
    "while not data.endswith(b'\\n'):\n"
    "    chunk = s.recv(65536)\n"
    "    if not chunk:\n"
    "        break\n"
    "    data += chunk\n"
    "sys.stdout.write(data.decode())\n"
)


def get_as(program: str, socket_path: str) -> dict[str, Any]:
    """The reply to GET_LINE sent by a process running ``program``."""
    done = subprocess.run(
        [program, "-I", "-S", "-c", PEER_SCRIPT, socket_path],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    reply: dict[str, Any] = json.loads(done.stdout)
    return reply


@pytest.fixture
def python_copy(tmp_path: Path) -> str:
    """A copy of the Python binary: a program with another /proc/PID/exe than sys.executable."""
    copy = tmp_path / "bin" / "allowed-python"
    copy.parent.mkdir(mode=0o700)
    shutil.copyfile(os.path.realpath(sys.executable), copy)
    copy.chmod(0o700)
    return str(copy)


def test_only_the_allowed_program_gets_the_key_and_no_reply_is_shared(
    agent_factory: AgentFactory, python_copy: str
) -> None:
    """With allow-exe, the allowed executable gets the key and another is denied, for the
    same request line in any order: a reply is never served from the memo to another peer."""
    agent = agent_factory(debug=False)  # at debug level the server remembers no replies
    with agent.client() as client:
        client.add(HOST, USER, GUARDED, allow_exe=[python_copy])
    other = os.path.realpath(sys.executable)
    for program, allowed in [(python_copy, True), (other, False), (python_copy, True),
                             (other, False), (other, False), (python_copy, True)]:  # fmt: skip
        reply = get_as(program, agent.socket_path)
        if allowed:
            assert reply["ok"] is True
            assert reply["result"]["key"] == GUARDED
        else:
            assert reply["ok"] is False
            assert reply["error"]["code"] == "denied"
            assert GUARDED not in json.dumps(reply)
            assert other in reply["error"]["message"]


def test_a_program_path_with_a_newline_forges_no_line_of_the_agents_log(
    agent_factory: AgentFactory, python_copy: str, tmp_path: Path
) -> None:
    """Any local user can name a program with a newline in its path; denied a key, its path
    is in the agent's warning, written escaped on the one line, not as a line of its own
    that would read as the agent's (here a forged audit entry)."""
    agent = agent_factory(debug=False)
    with agent.client() as client:
        client.add(HOST, USER, GUARDED, allow_exe=[python_copy])
    forged = "keyagent[1]: INFO: audit op=get outcome=ok"
    program = tmp_path / f"evil\n{forged}"
    shutil.copyfile(os.path.realpath(sys.executable), program)
    program.chmod(0o700)
    reply = get_as(str(program), agent.socket_path)
    assert reply["error"]["code"] == "denied"
    log = agent.log()
    assert "evil\\x0akeyagent[1]: INFO: audit op=get outcome=ok" in log
    assert not any(line.startswith(forged) for line in log.splitlines())


def test_another_programs_newer_key_gives_way_to_an_older_one_for_each_peer(
    agent_factory: AgentFactory, python_copy: str
) -> None:
    """A get naming no key gets the newest key the asking program may use: the allowed
    program the newer guarded key, any other the older plain one, for the same request line
    in any order (neither reply is served from the memo to the other peer)."""
    agent = agent_factory(debug=False)
    with agent.client() as client:
        client.add(HOST, USER, PLAIN)
        client.add(HOST, USER, GUARDED, allow_exe=[python_copy])
    other = os.path.realpath(sys.executable)
    order = [(other, PLAIN), (python_copy, GUARDED), (other, PLAIN), (other, PLAIN),
             (python_copy, GUARDED), (python_copy, GUARDED)]  # fmt: skip
    for program, wanted in order:
        assert get_as(program, agent.socket_path)["result"]["key"] == wanted


def test_a_plain_key_is_still_answered_from_the_memo_path(agent_factory: AgentFactory) -> None:
    """A key without rules is served to any program, repeatedly (the fast path is kept)."""
    agent = agent_factory(debug=False)
    with agent.client() as client:
        client.add(HOST, USER, PLAIN)
    for _ in range(3):
        assert get_as(os.path.realpath(sys.executable), agent.socket_path)["result"]["key"] == PLAIN


def test_keyagent_ctl_allow_exe_resolves_the_path_and_refuses_other_programs(
    agent: AgentProcess, python_copy: str, tmp_path: Path
) -> None:
    """add --allow-exe with a relative path through a symlink sends the resolved absolute
    path; keyagent-ctl get from this interpreter is then denied with exit 1."""
    link = tmp_path / "link-to-python"
    link.symlink_to(python_copy)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        added = run_ctl(agent.socket_path, "--host", HOST, "--user", USER, "add",
                        "--allow-exe", "link-to-python", stdin=GUARDED)  # fmt: skip
    finally:
        os.chdir(cwd)
    assert added.code == 0, added.err
    listed = run_ctl(agent.socket_path, "list", "--json")
    (key,) = json.loads(listed.out)["keys"]
    assert key["allowed_exes"] == [python_copy]
    table = run_ctl(agent.socket_path, "list").out
    assert f"only {python_copy}" in table
    refused = run_ctl(agent.socket_path, "get")
    assert refused.code == 1
    assert "[denied]" in refused.err
    assert GUARDED not in refused.out + refused.err


def test_allow_exe_naming_no_program_is_a_usage_error(agent: AgentProcess, tmp_path: Path) -> None:
    """A rule no program could meet (a path with nothing there, a directory, a file that
    cannot run) is refused before the key or password is read: exit 64, nothing held."""
    plain = tmp_path / "not-a-program"
    plain.write_text("")
    for path in (str(tmp_path / "nonexistent-prog"), str(tmp_path), str(plain)):
        for command in (["add"], ["login", "--password-stdin"]):
            refused = run_ctl(agent.socket_path, "--host", HOST, "--user", USER, *command,
                              "--allow-exe", path, stdin=GUARDED)  # fmt: skip
            assert refused.code == 64, (command, path, refused.err)
            assert "no executable file there" in refused.err
    assert json.loads(run_ctl(agent.socket_path, "list", "--json").out)["keys"] == []


def test_a_non_exportable_key_is_refused_by_get_and_exec_but_listed(
    agent: AgentProcess, tmp_path: Path
) -> None:
    """add --no-export: get and exec exit 1 with forbidden and the way to use it; list shows
    it with exportable false; the command of exec never runs."""
    added = run_ctl(agent.socket_path, "--host", HOST, "--user", USER, "add", "--no-export",
                    stdin=GUARDED)  # fmt: skip
    assert added.code == 0, added.err
    got = run_ctl(agent.socket_path, "get")
    assert got.code == 1
    assert "[forbidden]" in got.err
    assert "KEYAGENT_HTTP_SOCK" in got.err
    assert GUARDED not in got.out + got.err
    marker = tmp_path / "ran"
    ran = run_ctl(agent.socket_path, "exec", "--", "touch", str(marker))
    assert ran.code == 1
    assert "[forbidden]" in ran.err
    assert not marker.exists()
    (key,) = json.loads(run_ctl(agent.socket_path, "list", "--json").out)["keys"]
    assert (key["key_id"], key["exportable"]) == (key_id_for(GUARDED), False)
    assert "no-export" in run_ctl(agent.socket_path, "list").out


def test_config_export_false_makes_new_keys_non_exportable(
    agent_factory: AgentFactory, tmp_path: Path
) -> None:
    """With export = false in the agent's config, an added key is non-exportable unless
    add says --export."""
    config = tmp_path / "config.toml"
    config.write_text("export = false\n")
    agent = agent_factory("--config", str(config))
    with agent.client() as client:
        assert client.add(HOST, USER, GUARDED)["exportable"] is False
        with pytest.raises(errors.Forbidden):
            client.get()
        assert client.add(HOST, USER, PLAIN, export=True)["exportable"] is True
        assert client.get(key_id=key_id_for(PLAIN)) == PLAIN


# --- confirmation through a real askpass program ---------------------------------------------


@pytest.fixture
def confirming_agent(agent_factory: AgentFactory, askpass_dir: Path) -> AgentProcess:
    """An agent whose askpass is the test script, with a 5 s confirmation timeout, holding a
    plain key and a --confirm key."""
    config = askpass_dir.parent / "config.toml"
    config.write_text(f'askpass = "{askpass_dir / "ask"}"\nconfirm_timeout = "5s"\n')
    agent = agent_factory("--config", str(config))
    with agent.client() as client:
        client.add(HOST, USER, PLAIN)
        client.add(HOST, USER, GUARDED, confirm=True, description="ci\u00a0key")
    return agent


def test_confirmation_allows_or_refuses_as_the_askpass_program_answers(
    confirming_agent: AgentProcess, askpass_dir: Path
) -> None:
    """Exit 0 hands out the key; exit 1 is denied; the question names the program, pid and key."""
    guarded = key_id_for(GUARDED)
    with confirming_agent.client() as client:
        assert client.get(key_id=guarded) == GUARDED
        (askpass_dir / "mode").write_text("refuse")
        with pytest.raises(errors.Denied) as caught:
            client.get(key_id=guarded)
        assert "refused" in caught.value.message
    questions = (askpass_dir / "questions").read_text().splitlines()
    assert len(questions) == 2
    assert os.path.realpath(sys.executable) in questions[0]
    assert f"(pid {os.getpid()})" in questions[0]
    for part in (guarded, HOST, USER, "ci key"):
        assert part in questions[0]
    assert GUARDED not in "".join(questions)


def _get_guarded(agent: AgentProcess, outcome: list[BaseException | str]) -> None:
    """Get the --confirm key; what it gave (or raised) goes into ``outcome``."""
    try:
        with agent.client() as client:
            outcome.append(client.get(key_id=key_id_for(GUARDED)))
    except BaseException as error:  # noqa: BLE001  # handed to the test thread
        outcome.append(error)


def _hang_askpass(thread: threading.Thread, askpass_dir: Path) -> int:
    """Set the askpass program to hang, start ``thread`` (a get that asks it), and return
    the program's pid once it hangs."""
    (askpass_dir / "mode").write_text("hang")
    thread.start()
    # The script writes its pid into the FIFO once it hangs: wait for it, with a deadline.
    fifo = os.open(askpass_dir / "hanging", os.O_RDONLY | os.O_NONBLOCK)
    try:
        readable, _, _ = select.select([fifo], [], [], 20)
        assert readable, "the askpass program never started"
        return int(os.read(fifo, 64).split()[0])
    finally:
        os.close(fifo)


def test_an_unanswered_confirmation_times_out_while_others_are_served(
    confirming_agent: AgentProcess, askpass_dir: Path
) -> None:
    """While the askpass program hangs, another client's get of a plain key is answered; the
    waiting get is denied after confirm_timeout and the program is killed."""
    outcome: list[BaseException | str] = []
    thread = threading.Thread(target=_get_guarded, args=(confirming_agent, outcome))
    try:
        hanging_pid = _hang_askpass(thread, askpass_dir)
        assert thread.is_alive()  # its question times out 5 s after it was put: far off
        with confirming_agent.client(timeout=5) as other:
            assert other.get(key_id=key_id_for(PLAIN)) == PLAIN
    finally:
        thread.join(30)
    (error,) = outcome
    assert isinstance(error, errors.Denied)
    assert "within 5 s" in error.message
    assert wait_for_exit(hanging_pid, 10)


def test_without_askpass_a_confirmed_key_is_refused(agent: AgentProcess) -> None:
    """An agent with no askpass program refuses to add a --confirm key (every use would be
    denied), saying how to set one; nothing is held."""
    added = run_ctl(agent.socket_path, "--host", HOST, "--user", USER, "add", "--confirm",
                    stdin=GUARDED)  # fmt: skip
    assert added.code == 1
    assert "[bad_request]" in added.err
    assert "KEYAGENT_ASKPASS" in added.err
    assert json.loads(run_ctl(agent.socket_path, "list", "--json").out)["keys"] == []


def test_an_askpass_program_others_can_change_is_refused_at_start(tmp_path: Path) -> None:
    """KEYAGENT_ASKPASS naming a program writable by others stops the daemon with exit 78."""
    program = tmp_path / "ask"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o777)
    assert program.stat().st_mode & stat.S_IWOTH
    env = {**os.environ, "KEYAGENT_ASKPASS": str(program), "KEYAGENT_CONFIG": os.devnull}
    env.pop("KEYAGENT_SOCK", None)
    done = subprocess.run(
        [sys.executable, "-m", "keyagent.daemon", "-D", "-a", str(tmp_path / "run" / "a.sock")],
        capture_output=True, text=True, timeout=30, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == EXIT_CONFIG
    assert "askpass" in done.stderr
    assert "chmod" in done.stderr


def test_create_no_export_through_the_emulator(agent_factory: AgentFactory) -> None:
    """create --no-export --allow-exe holds the new key with its rules: get is forbidden,
    --print with --no-export is refused before the service makes a key."""
    from keyagent.testing.emulator_process import EmulatorProcess

    user, password = "alice@example.com", "pa55-w0rd-for-rules"
    with EmulatorProcess(user, password) as emulator:
        agent = agent_factory("--ca-bundle", emulator.ca_path, "--read-timeout", "5")
        base = ("--host", emulator.host, "--user", user)
        login = run_ctl(agent.socket_path, *base, "login", "--password-stdin", stdin=password)
        assert login.code == 0, login.err
        refused = run_ctl(agent.socket_path, *base, "create", "--no-export", "--print")
        assert refused.code == 1
        assert "[bad_request]" in refused.err
        assert emulator.api_keys(user) == []
        created = run_ctl(agent.socket_path, *base, "create", "--no-export",
                          "--allow-exe", "/usr/bin/env")  # fmt: skip
        assert created.code == 0, created.err
        (secret,) = emulator.api_keys(user)
        (key,) = json.loads(run_ctl(agent.socket_path, "list", "--json").out)["keys"]
        assert (key["exportable"], key["allowed_exes"]) == (
            False,
            [os.path.realpath("/usr/bin/env")],
        )
        got = run_ctl(agent.socket_path, "get")  # keyagent-ctl is not /usr/bin/env
        assert got.code == 1
        assert "[denied]" in got.err
        assert secret not in got.out + got.err


def test_a_non_exportable_key_cannot_mint_a_printable_one(agent_factory: AgentFactory) -> None:
    """With only a --no-export key held (no session), create --print is forbidden and the
    service makes nothing; create --no-export is made with that key."""
    from keyagent.testing.emulator_process import EmulatorProcess

    user, password = "mint@example.com", "pa55-w0rd-for-mint"
    with EmulatorProcess(user, password) as emulator:
        agent = agent_factory("--ca-bundle", emulator.ca_path, "--read-timeout", "5")
        base = ("--host", emulator.host, "--user", user)
        secret = emulator.add_key(user)
        added = run_ctl(agent.socket_path, *base, "add", "--no-export", stdin=secret)
        assert added.code == 0, added.err
        refused = run_ctl(agent.socket_path, *base, "create", "--print")
        assert refused.code == 1
        assert "[forbidden]" in refused.err
        assert "leave out --print" in refused.err
        assert emulator.api_keys(user) == [secret]
        made = run_ctl(agent.socket_path, *base, "create", "--no-export")
        assert made.code == 0, made.err
        assert len(emulator.api_keys(user)) == 2


def test_a_stopping_agent_ends_the_askpass_dialog_it_opened(
    confirming_agent: AgentProcess, askpass_dir: Path
) -> None:
    """A confirmation still open when the agent stops is killed with it, whole: no dialog is
    left on the user's screen asking about a key the agent no longer holds."""
    outcome: list[BaseException | str] = []
    thread = threading.Thread(target=_get_guarded, args=(confirming_agent, outcome))
    try:
        hanging_pid = _hang_askpass(thread, askpass_dir)
        stopped = run_ctl(confirming_agent.socket_path, "stop")
        assert stopped.code == 0, stopped.err
        assert confirming_agent.process is not None
        confirming_agent.process.wait(10)
    finally:
        thread.join(30)
    (error,) = outcome
    # Refused as the agent stops, or cut by its exit, whichever reaches the client first.
    assert isinstance(error, (errors.Denied, errors.AgentUnreachable)), error
    assert wait_for_exit(hanging_pid, 5)
