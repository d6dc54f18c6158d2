"""Ephemeral keys end to end: the real agent deletes an expired created key on the shipped
Conduce emulator, retrying through injected 503s."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from keyagent.store import key_id_for
from keyagent.testing.agent import AgentProcess, wait_for_exit
from keyagent.testing.emulator import Fault
from keyagent.testing.emulator_process import Emulator

from .conftest import AgentFactory, CtlResult, agent_status, run_ctl, wait_until

USER = "erin@example.com"
PASSWORD = "ephemeral-pa55-w0rd"


def ctl(agent: AgentProcess, emu: Emulator, *argv: str, stdin: str = "") -> CtlResult:
    return run_ctl(agent.socket_path, "--host", emu.host, "--user", USER, *argv, stdin=stdin)


def create_ephemeral(agent: AgentProcess, emu: Emulator) -> str:
    """Log in, create a key that lives 5 s (the steps that follow must come before it ends),
    log out (so the key deletes itself); its secret."""
    login = ctl(agent, emu, "login", "--password-stdin", stdin=PASSWORD + "\n")
    assert login.code == 0, login.err
    created = ctl(agent, emu, "create", "--lifetime", "5s")
    assert created.code == 0, created.err
    assert "deleted on the service when it expires" in created.out
    (secret,) = emu.api_keys(USER)
    assert key_id_for(secret) in created.out
    listed = json.loads(ctl(agent, emu, "list", "--json").out)["keys"]
    assert [key["ephemeral"] for key in listed] == [True]
    assert ctl(agent, emu, "logout").code == 0
    return secret


def deletes(emu: Emulator) -> list[int | None]:
    return [record.status for record in emu.requests if record.path == "apikeys/delete"]


def test_an_expired_created_key_is_deleted_on_the_service(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """create --lifetime 5s makes a key the agent deletes on the service once it expires,
    authenticating with the key itself when there is no session."""
    create_ephemeral(conduce_agent, emulator)
    wait_until(lambda: emulator.api_keys(USER) == [], "the expired key deleted on the service")
    assert deletes(emulator) == [200]
    (record,) = [r for r in emulator.requests if r.path == "apikeys/delete"]
    assert record.auth == "bearer"


def test_a_deletion_refused_with_503_is_retried_until_it_succeeds(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """While the service answers 503 the deletion stays pending (status shows it) and is
    retried; once the service recovers, a retry deletes the key."""
    emulator.inject(Fault.status(503), path="apikeys/delete")
    secret = create_ephemeral(conduce_agent, emulator)
    wait_until(lambda: 503 in deletes(emulator), "a first, failed, deletion")
    (pending,) = agent_status(conduce_agent)["pending_deletions"]
    assert (pending["key_id"], pending["user"]) == (key_id_for(secret), USER)
    assert pending["attempts"] >= 1
    text = run_ctl(conduce_agent.socket_path, "status").out
    assert f"pending deletion of key {key_id_for(secret)}" in text
    assert emulator.api_keys(USER) == [secret]
    emulator.clear_faults()
    wait_until(lambda: emulator.api_keys(USER) == [], "the key deleted by a retry")
    assert deletes(emulator)[-1] == 200
    assert deletes(emulator).count(503) >= 1
    wait_until(
        lambda: agent_status(conduce_agent)["pending_deletions"] == [], "no deletion pending"
    )


def test_a_deletion_the_service_leaves_hanging_is_retried_after_the_read_timeout(
    agent_factory: AgentFactory, emulator: Emulator
) -> None:
    """A deletion the service never answers ends at the agent's read timeout and is retried;
    the retry, answered, deletes the key."""
    agent = agent_factory("--ca-bundle", emulator.ca_path, "--read-timeout", "1")
    emulator.inject(Fault.hang(), path="apikeys/delete", count=1)
    secret = create_ephemeral(agent, emulator)
    assert emulator.wait_for_hung(1, timeout=20)
    wait_until(lambda: emulator.api_keys(USER) == [], "the key deleted by a retry", timeout=30)
    (retried,) = [r for r in emulator.requests if r.path == "apikeys/delete" and r.status == 200]
    assert retried.auth == "bearer"
    assert secret not in emulator.api_keys(USER)
    log = agent.log()
    assert f"could not delete key {key_id_for(secret)}" in log
    assert secret not in log


def test_keep_and_forget_local_leave_keys_on_the_service_and_forget_deletes(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """Through keyagent-ctl: create --keep makes a key that is not ephemeral; forget --local
    of an ephemeral key keeps it on the service; plain forget deletes it there."""
    login = ctl(conduce_agent, emulator, "login", "--password-stdin", stdin=PASSWORD + "\n")
    assert login.code == 0, login.err
    kept = ctl(conduce_agent, emulator, "create", "--lifetime", "1h", "--keep")
    assert kept.code == 0, kept.err
    assert "deleted on the service" not in kept.out
    local = ctl(conduce_agent, emulator, "create", "--lifetime", "1h")
    deleted = ctl(conduce_agent, emulator, "create", "--lifetime", "1h")
    keys = emulator.api_keys(USER)
    assert len(keys) == 3
    kept_key, local_key, deleted_key = keys
    table = ctl(conduce_agent, emulator, "list").out
    assert "EPHEMERAL" in table.splitlines()[0]
    forgot = run_ctl(conduce_agent.socket_path, "forget", "--local", key_id_for(local_key))
    assert forgot.code == 0, forgot.err
    forgot = run_ctl(conduce_agent.socket_path, "forget", key_id_for(deleted_key))
    assert forgot.code == 0, forgot.err
    wait_until(lambda: deleted_key not in emulator.api_keys(USER), "the forgotten key deleted")
    assert emulator.api_keys(USER) == [kept_key, local_key]
    assert local.code == deleted.code == 0


def test_keep_created_keys_in_the_config_file_reaches_the_running_agent(
    agent_factory: AgentFactory, emulator: Emulator, tmp_path: Path
) -> None:
    """keep_created_keys = true in the agent's config file makes created keys kept: the
    setting crosses the hand-off from the daemon to the serving process."""
    config = tmp_path / "config.toml"
    config.write_text("keep_created_keys = true\n")
    config.chmod(0o600)
    agent = agent_factory("--config", str(config), "--ca-bundle", emulator.ca_path)
    login = ctl(agent, emulator, "login", "--password-stdin", stdin=PASSWORD + "\n")
    assert login.code == 0, login.err
    kept = ctl(agent, emulator, "create", "--lifetime", "1h")
    assert kept.code == 0, kept.err
    assert "deleted on the service when it expires" not in kept.out
    asked = ctl(agent, emulator, "create", "--lifetime", "1h", "--no-keep")
    assert asked.code == 0, asked.err
    listed = json.loads(ctl(agent, emulator, "list", "--json").out)["keys"]
    assert [key["ephemeral"] for key in listed] == [False, True]


def command_mode(tmp_path: Path, emu: Emulator, script: str) -> subprocess.Popen[str]:
    """``keyagent --ca-bundle CA -a SOCK sh -c SCRIPT``, on a socket of its own, with $PY,
    $HOST, $USER and the account's $PASSWORD set for the script; stdout and stderr piped."""
    directory = tmp_path / "run"
    directory.mkdir(mode=0o700, parents=True)
    env = {**os.environ, "PY": sys.executable, "HOST": emu.host, "USER": USER}
    env["PASSWORD"] = PASSWORD  # the emulator's throw-away account
    return subprocess.Popen(
        [sys.executable, "-m", "keyagent.daemon", "--ca-bundle", emu.ca_path,
         "--read-timeout", "5", "--stop-timeout", "5", "-a", str(directory / "agent.sock"),
         "sh", "-c", script],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


CREATE_EPHEMERAL = (
    'ctl() { $PY -m keyagent --host "$HOST" --user "$USER" "$@"; }\n'
    'printf "%s\\n" "$PASSWORD" | ctl login --password-stdin >/dev/null || exit 9\n'
    "ctl create --lifetime 1h >/dev/null || exit 9\n"
    'echo "$KEYAGENT_PID"\n'
)
"""Part of a script for :func:`command_mode`: log in, create an ephemeral key, print the
agent's pid."""


def test_keyagent_cmd_returns_once_the_agent_has_deleted_its_keys(
    tmp_path: Path, emulator: Emulator
) -> None:
    """keyagent CMD stops the agent when CMD ends and waits for it: by the time CMD's status
    comes back, the agent has deleted its ephemeral keys on the service and exited (a CI
    job that ends with CMD leaves nothing valid behind)."""
    process = command_mode(tmp_path, emulator, CREATE_EPHEMERAL + "exit 3")
    out, err = process.communicate(timeout=120)
    assert process.returncode == 3, err
    agent = int(out.split()[0])
    assert emulator.api_keys(USER) == []
    assert deletes(emulator) == [200]
    assert wait_for_exit(agent, 0)
    assert "ERROR" not in err


def test_keyagent_cmd_says_on_stderr_which_key_it_could_not_delete(
    tmp_path: Path, emulator: Emulator
) -> None:
    """A key the stopping agent could not delete is named on keyagent CMD's stderr, with the
    command that deletes it (in the background it would reach only syslog)."""
    emulator.inject(Fault.status(503), path="apikeys/delete")
    process = command_mode(tmp_path, emulator, CREATE_EPHEMERAL)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    (secret,) = emulator.api_keys(USER)
    assert f"ERROR: key {key_id_for(secret)} of {USER} on {emulator.host} was not deleted" in err
    assert "keyagent-ctl remove" in err
    assert secret not in err


def test_keyagent_cmd_passes_sigterm_to_the_command_and_ends_as_it_does(
    tmp_path: Path, emulator: Emulator
) -> None:
    """SIGTERM sent to keyagent CMD reaches CMD, whose status is returned; a CMD that dies
    of a signal makes keyagent end by the same signal, as a shell reports it."""
    script = 'trap "exit 42" TERM; echo ready; while :; do sleep 1; done'
    with command_mode(tmp_path, emulator, script) as trapping:
        assert trapping.stdout is not None
        assert trapping.stdout.readline() == "ready\n"
        trapping.send_signal(signal.SIGTERM)
        assert trapping.wait(timeout=60) == 42
    with command_mode(tmp_path / "again", emulator, "kill -KILL $$") as dying:
        dying.communicate(timeout=60)
        assert dying.returncode == -signal.SIGKILL


def test_forget_and_stop_name_created_keys_left_valid_with_nobody_holding_them(
    conduce_agent: AgentProcess, emulator: Emulator, agent_factory: AgentFactory
) -> None:
    """keyagent-ctl forget and stop say which keys the agent made stay valid on the service
    with nobody holding them (made without a lifetime), and how to delete each."""
    assert (
        ctl(conduce_agent, emulator, "login", "--password-stdin", stdin=PASSWORD + "\n").code == 0
    )
    assert ctl(conduce_agent, emulator, "create", "-C", "first").code == 0
    assert ctl(conduce_agent, emulator, "create", "-C", "second").code == 0
    first, second = emulator.api_keys(USER)
    forgot = run_ctl(conduce_agent.socket_path, "forget", key_id_for(first))
    assert forgot.code == 0, forgot.err
    said, advice = forgot.out.splitlines()
    assert said == "forgot 1 key"
    assert advice.startswith(
        f"key {key_id_for(first)} of {USER} on {emulator.host} stays valid on the service,"
        " held by nobody; to delete it, log in to the account with an agent, then run: "
    )
    stopped = run_ctl(conduce_agent.socket_path, "stop")
    assert stopped.code == 0, stopped.err
    assert f"key {key_id_for(second)} of {USER} on {emulator.host} stays valid" in stopped.out
    assert emulator.api_keys(USER) == [first, second]
    # The advice works as printed: with an agent logged in to the account, the line deletes
    # the key on the service.
    command = shlex.split(advice.rpartition("then run: ")[2])
    assert command[:2] == ["keyagent-ctl", "remove"]
    again = agent_factory("--ca-bundle", emulator.ca_path)
    assert ctl(again, emulator, "login", "--password-stdin", stdin=PASSWORD + "\n").code == 0
    removed = run_ctl(again.socket_path, *command[1:])
    assert removed.code == 0, removed.err
    assert emulator.api_keys(USER) == [second]


def test_keyagent_cmd_names_a_key_made_without_a_lifetime_that_stays_valid(
    tmp_path: Path, emulator: Emulator
) -> None:
    """A key CMD made without a lifetime is not deleted when the agent stops (a tool may
    use it), but nobody holds it after: keyagent CMD names it on stderr, with the command
    that deletes it."""
    script = CREATE_EPHEMERAL.replace("create --lifetime 1h", "create")
    process = command_mode(tmp_path, emulator, script)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    (secret,) = emulator.api_keys(USER)
    assert f"key {key_id_for(secret)} of {USER} on {emulator.host}, made by this agent" in err
    assert f"keyagent-ctl remove --host={emulator.host} --user={USER}" in err
    assert secret not in err
