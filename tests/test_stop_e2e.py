"""Deletion at stop, end to end: the real agent, stopped with keyagent-ctl stop or SIGTERM,
deletes its ephemeral keys on the shipped Conduce emulator before it exits, gives up after
stop_timeout when the service hangs, and says which keys it could not delete."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from keyagent import errors
from keyagent.effects import MAX_QUEUED
from keyagent.sockets import file_identity, remove_socket
from keyagent.store import digest_of, key_id_for
from keyagent.testing.agent import AgentProcess
from keyagent.testing.emulator import Fault
from keyagent.testing.emulator_process import Emulator

from .conftest import AgentFactory, CtlResult, run_ctl, wait_until

USER = "stella@example.com"
PASSWORD = "stop-pa55-w0rd"
MEMORY_KEYRING = "keyagent.testing.memory_keyring.MemoryKeyring"
STOP_TIMEOUT = 2.0
"""The hanging test's stop_timeout: short, so the test is too."""
EXIT_MARGIN = 6.0
"""Seconds past stop_timeout within which the agent must have exited (a loaded CI machine)."""


def start(agent_factory: AgentFactory, emulator: Emulator, *args: str) -> AgentProcess:
    """An agent that trusts the emulator, with an in-memory OS keyring (for --persist)."""
    env = {**os.environ, "PYTHON_KEYRING_BACKEND": MEMORY_KEYRING}
    return agent_factory(
        "--ca-bundle", emulator.ca_path, "--read-timeout", "30", *args, env=env
    )  # fmt: skip


def ctl(agent: AgentProcess, emu: Emulator, *argv: str, stdin: str = "") -> CtlResult:
    result = run_ctl(agent.socket_path, "--host", emu.host, "--user", USER, *argv, stdin=stdin)
    assert result.code == 0, result.err
    return result


def create(agent: AgentProcess, emu: Emulator, *argv: str) -> str:
    """Log in (once), create a key with ``argv``; its secret, as the emulator holds it."""
    if not emu.api_keys(USER):
        ctl(agent, emu, "login", "--password-stdin", stdin=PASSWORD + "\n")
    before = set(emu.api_keys(USER))
    ctl(agent, emu, "create", *argv)
    (secret,) = set(emu.api_keys(USER)) - before
    return secret


def exited(agent: AgentProcess, timeout: float) -> int:
    assert agent.process is not None
    return agent.process.wait(timeout)


def audited_deletions(agent_log: str) -> list[str]:
    """The delete entries of the audit log, as the agent wrote them to its log."""
    return [line for line in agent_log.splitlines() if "op=delete" in line]


def test_keyagent_ctl_stop_deletes_ephemeral_keys_but_not_persisted_ones_then_exits(
    agent_factory: AgentFactory, emulator: Emulator
) -> None:
    """keyagent-ctl stop answers at once saying it deletes one key, deletes the ephemeral key
    that is not persisted on the service, leaves the persisted one, and the agent exits 0."""
    agent = start(agent_factory, emulator)
    ephemeral = create(agent, emulator, "--lifetime", "1h")
    persisted = create(agent, emulator, "--lifetime", "1h", "--persist")
    stopped = run_ctl(agent.socket_path, "stop")
    assert stopped.code == 0, stopped.err
    assert stopped.out == (
        "agent stopping; it first deletes 1 ephemeral key(s) on the service (its log names"
        " any it could not)\n"
    )
    assert exited(agent, 20) == 0
    assert emulator.api_keys(USER) == [persisted]
    assert ephemeral not in emulator.api_keys(USER)
    (entry,) = audited_deletions(agent.log())
    assert "outcome=ok" in entry
    assert f"key_id={key_id_for(ephemeral)}" in entry
    assert ephemeral not in agent.log()


def test_stop_deletes_more_ephemeral_keys_of_one_account_than_a_queue_takes_requests(
    agent_factory: AgentFactory, emulator: Emulator
) -> None:
    """The deletions at stop wait in the account's queue, one call at a time: more of them
    than the queue takes from clients (MAX_QUEUED) are all made, none refused as busy."""
    agent = start(agent_factory, emulator)
    count = MAX_QUEUED + 6
    with agent.client() as client:
        client.login(emulator.host, USER, PASSWORD)
        for _ in range(count):
            client.create(emulator.host, USER, lifetime=3600)
    assert len(emulator.api_keys(USER)) == count
    stopped = run_ctl(agent.socket_path, "stop")
    assert stopped.code == 0, stopped.err
    assert exited(agent, 60) == 0
    assert emulator.api_keys(USER) == []
    deletions = audited_deletions(agent.log())
    assert len(deletions) == count
    assert all("outcome=ok" in entry for entry in deletions), deletions


def test_a_request_under_way_at_stop_is_answered_and_recorded_before_the_exit(
    agent_factory: AgentFactory, emulator: Emulator
) -> None:
    """A remove the service is still carrying out when stop comes: the agent waits for it
    (as for its deletions, up to stop_timeout), so its client gets its answer and the audit
    log records it, rather than a closed connection and no trace of a key deleted."""
    agent = start(agent_factory, emulator)
    secret = create(agent, emulator)  # no lifetime: not deleted at stop
    emulator.inject(Fault.delay(1.5), path="apikeys/delete", count=1)
    outcome: list[CtlResult] = []
    remover = threading.Thread(
        target=lambda: outcome.append(run_ctl(agent.socket_path, "remove", key_id_for(secret)))
    )
    remover.start()
    try:
        wait_until(
            lambda: any(r.path == "apikeys/delete" for r in emulator.requests),
            "the delete reaches the service",
            pause=0.01,
        )
        stopped = run_ctl(agent.socket_path, "stop")
        assert stopped.code == 0, stopped.err
    finally:
        remover.join(30)
    (removed,) = outcome
    assert removed.code == 0, removed.err
    assert removed.out == f"removed key {key_id_for(secret)} on the service and forgot it\n"
    assert exited(agent, 20) == 0
    assert emulator.api_keys(USER) == []
    log = agent.log()
    assert any("op=remove" in line and "outcome=ok" in line for line in log.splitlines()), log


def test_sigterm_deletes_ephemeral_keys_before_the_agent_exits(
    agent_factory: AgentFactory, emulator: Emulator
) -> None:
    """SIGTERM (keyagent -k, systemd at logout) deletes the agent's ephemeral keys on the
    service before it exits 0."""
    agent = start(agent_factory, emulator)
    first = create(agent, emulator, "--lifetime", "1h")
    second = create(agent, emulator, "--lifetime", "8h")
    os.kill(agent.pid, signal.SIGTERM)
    assert exited(agent, 20) == 0
    assert emulator.api_keys(USER) == []
    log = agent.log()
    assert "SIGTERM: stopping" in log
    assert len(audited_deletions(log)) == 2
    assert {first, second}.isdisjoint(log.split())


def test_a_hanging_service_delays_the_exit_by_stop_timeout_at_most_and_the_log_says_what_to_do(
    agent_factory: AgentFactory, emulator: Emulator
) -> None:
    """With the service hanging every delete, the stopping agent refuses new connections,
    answers get on an open one as for a forgotten key, exits within stop_timeout (and a
    margin), and logs the key not deleted with the command that deletes it."""
    agent = start(agent_factory, emulator, "--stop-timeout", f"{STOP_TIMEOUT:g}")
    secret = create(agent, emulator, "--lifetime", "1h")
    emulator.inject(Fault.hang(), path="apikeys/delete")
    follower = agent.client(timeout=5).follow_log(0)  # sent now: sees what comes after
    with agent.client() as open_before:
        assert open_before.get(key_id=key_id_for(secret)) == secret
        began = time.monotonic()
        run_ctl(agent.socket_path, "stop")
        with pytest.raises(errors.NotFound):
            open_before.get(key_id=key_id_for(secret))
        with pytest.raises(errors.AgentUnreachable):
            agent.client(timeout=5).hello()
        assert exited(agent, STOP_TIMEOUT + EXIT_MARGIN) == 0
    # The follower saw the deletion the stop gave up on, recorded as the agent exited.
    seen: list[tuple[str, str]] = []
    with contextlib.suppress(errors.AgentUnreachable):
        for followed in follower:
            seen.append((followed["op"], followed["outcome"]))
    assert ("delete", "timeout") in seen, seen
    took = time.monotonic() - began
    assert STOP_TIMEOUT - 0.5 <= took < STOP_TIMEOUT + EXIT_MARGIN
    assert emulator.api_keys(USER) == [secret]  # the hung delete never reached the store
    log = agent.log()
    (line,) = [line for line in log.splitlines() if "was not deleted on the service" in line]
    assert key_id_for(secret) in line
    assert f"stop_timeout, {STOP_TIMEOUT:g} s" in line
    assert f"keyagent-ctl remove --host={emulator.host} --user={USER} {digest_of(secret)}" in line
    (entry,) = audited_deletions(log)
    assert "outcome=timeout" in entry
    assert secret not in log


def test_a_new_agent_on_the_path_keeps_its_sockets_when_the_stopping_one_exits(
    agent_factory: AgentFactory, emulator: Emulator
) -> None:
    """While a stopping agent waits on a hung delete, a new agent starts on the same path
    (the old one no longer listens). When the old one exits, the new one's sockets are
    still there, and it is still reached through them."""
    agent = start(agent_factory, emulator, "--stop-timeout", f"{STOP_TIMEOUT:g}")
    create(agent, emulator, "--lifetime", "1h")
    emulator.inject(Fault.hang(), path="apikeys/delete")
    stopped = run_ctl(agent.socket_path, "stop")
    assert "deletes 1 ephemeral key" in stopped.out, stopped.err
    # Gone as the agent stops listening, not at its exit: nothing it removes later can be
    # the new agent's (whose socket may even get the freed inode number).
    http_path = os.path.join(os.path.dirname(agent.socket_path), "http.sock")
    wait_until(
        lambda: not (os.path.exists(agent.socket_path) or os.path.exists(http_path)),
        "the stopping agent's socket files removed",
    )
    assert agent.process is not None
    assert agent.process.poll() is None  # still deleting
    successor = start(agent_factory, emulator)  # the same directory, so the same path
    assert successor.socket_path == agent.socket_path
    assert run_ctl(successor.socket_path, "status").code == 0
    assert exited(agent, STOP_TIMEOUT + EXIT_MARGIN) == 0
    assert os.path.exists(successor.socket_path)
    assert os.path.exists(os.path.join(os.path.dirname(successor.socket_path), "http.sock"))
    with successor.client() as client:
        assert client.status()["pid"] == successor.pid


def test_a_socket_file_with_our_inode_but_a_later_change_is_not_ours(tmp_path: Path) -> None:
    """remove_socket removes the file it bound, and not one that merely has its device and
    inode (a file system may give a freed inode number to the next file made): the change
    time tells them apart. An identity with an earlier change time stands in for ours here
    (a kernel may stamp files with a clock too coarse for a chmod to show)."""
    path = str(tmp_path / "agent.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        bound = file_identity(path)
        assert bound is not None
        assert bound[:2] == (os.stat(path).st_dev, os.stat(path).st_ino)
        remove_socket(path, (bound[0], bound[1], bound[2] - 1))
        assert os.path.exists(path)
        remove_socket(path, bound)
        assert not os.path.exists(path)


def test_stop_says_it_waits_for_a_create_under_way_and_the_create_says_why_it_failed(
    agent_factory: AgentFactory, emulator: Emulator
) -> None:
    """A create hangs on the service when keyagent-ctl stop comes: stop says the agent first
    waits for it; once the service answers, the create exits 1 (busy) naming the key the
    agent deletes, the key is gone from the service, and the agent exits 0."""
    agent = start(agent_factory, emulator)
    ctl(agent, emulator, "login", "--password-stdin", stdin=PASSWORD + "\n")
    emulator.inject(Fault.hang(), path="apikeys/create", count=1)
    creating = subprocess.Popen(
        [sys.executable, "-m", "keyagent", "--socket", agent.socket_path, "--host",
         emulator.host, "--user", USER, "create"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert emulator.wait_for_hung(1, timeout=20)
        stopped = run_ctl(agent.socket_path, "stop")
        assert stopped.code == 0, stopped.err
        assert stopped.out == (
            "agent stopping; it first waits for 1 create(s) or rotation(s) under way\n"
        )
    finally:
        emulator.release()
        out, err = creating.communicate(timeout=30)
    assert creating.returncode == 1, out + err
    assert "[busy]" in err
    assert "deletes that key on the service before it exits" in err
    assert exited(agent, 20) == 0
    assert emulator.api_keys(USER) == []


def log_entries(agent: AgentProcess) -> list[dict[str, Any]]:
    result = run_ctl(agent.socket_path, "log", "--json")
    assert result.code == 0, result.err
    return [json.loads(line) for line in result.out.splitlines()]


def test_forget_prints_how_many_keys_it_deletes_and_the_deletion_is_audited(
    agent_factory: AgentFactory, emulator: Emulator
) -> None:
    """keyagent-ctl forget says how many of the keys it forgot it deletes on the service;
    forget --local deletes none and says nothing of it; the deletion shows in keyagent-ctl
    log as op delete by the agent itself, with the key's id, host, user and outcome."""
    agent = start(agent_factory, emulator)
    local = create(agent, emulator, "--lifetime", "1h")
    deleted = create(agent, emulator, "--lifetime", "1h")
    forgot = run_ctl(agent.socket_path, "forget", "--local", key_id_for(local))
    assert forgot.out.splitlines()[0] == "forgot 1 key"
    assert f"key {key_id_for(local)} of {USER} on {emulator.host} stays valid" in forgot.out
    forgot = run_ctl(agent.socket_path, "forget", key_id_for(deleted))
    assert (
        forgot.out == "forgot 1 key; deleting 1 on the service (forget --local keeps keys there)\n"
    )
    wait_until(
        lambda: any(entry["op"] == "delete" for entry in log_entries(agent)),
        "the deletion in the audit log",
    )
    (entry,) = [entry for entry in log_entries(agent) if entry["op"] == "delete"]
    assert (entry["outcome"], entry["key_id"], entry["host"], entry["user"]) == (
        "ok", key_id_for(deleted), emulator.host, USER,
    )  # fmt: skip
    assert entry["pid"] is None
    assert emulator.api_keys(USER) == [local]
    table = run_ctl(agent.socket_path, "log").out
    (row,) = [line for line in table.splitlines() if " delete " in line]
    assert key_id_for(deleted) in row


def test_a_second_signal_makes_a_stopping_agent_exit_at_once(
    agent_factory: AgentFactory, emulator: Emulator
) -> None:
    """A second SIGINT while the agent waits for its deletions (Ctrl-C twice) makes it exit
    at once, well before stop_timeout, logging the key it did not delete."""
    agent = start(agent_factory, emulator, "--stop-timeout", "60")
    secret = create(agent, emulator, "--lifetime", "1h")
    emulator.inject(Fault.hang(), path="apikeys/delete")
    os.kill(agent.pid, signal.SIGINT)
    wait_until(
        lambda: "waiting up to 60 s" in agent.log(), "the agent waiting on the deletion", pause=0.01
    )
    os.kill(agent.pid, signal.SIGINT)
    assert exited(agent, EXIT_MARGIN) == 0
    log = agent.log()
    assert "SIGINT while stopping: exiting now" in log
    (line,) = [line for line in log.splitlines() if "was not deleted on the service" in line]
    assert key_id_for(secret) in line
    assert "a signal cut the wait short" in line


def test_a_key_the_stopping_agent_could_not_delete_is_deleted_by_the_next_agent(
    agent_factory: AgentFactory, emulator: Emulator
) -> None:
    """A key whose deletion at stop failed (the service answered 503) stays named in the
    leftovers file, so the next agent on the same socket deletes it at the account's login."""
    agent = start(agent_factory, emulator)
    secret = create(agent, emulator, "--lifetime", "1h")
    emulator.inject(Fault.status(503), path="apikeys/delete")
    stopped = run_ctl(agent.socket_path, "stop")
    assert "deletes 1 ephemeral key" in stopped.out, stopped.err
    assert exited(agent, STOP_TIMEOUT + EXIT_MARGIN + 10) == 0
    assert emulator.api_keys(USER) == [secret]
    assert "was not deleted on the service" in agent.log()
    emulator.clear_faults()

    successor = start(agent_factory, emulator)
    status = run_ctl(successor.socket_path, "status", "--json")
    pending = json.loads(status.out)["pending_deletions"]
    assert [(entry["key_id"], entry["left_over"]) for entry in pending] == [
        (key_id_for(secret), True)
    ]
    ctl(successor, emulator, "login", "--password-stdin", stdin=PASSWORD + "\n")
    wait_until(lambda: emulator.api_keys(USER) == [], "the left key deleted after the login")
