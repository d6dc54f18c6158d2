"""Orphans end to end: keys a SIGKILLed agent created stay on the shipped Conduce emulator
with keyagent's mark; a new agent's ``keyagent-ctl prune`` shows them (exit 1) and with
``--yes`` deletes them, never touching a key made by hand or one it holds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

from keyagent.conduce import ConduceAccount, HttpSettings, RemoteKey
from keyagent.store import key_id_for
from keyagent.testing.agent import AgentProcess
from keyagent.testing.emulator import Fault
from keyagent.testing.emulator_process import Emulator

from .conftest import AgentFactory, CtlResult, run_ctl, run_ctl_process

USER = "orphan-owner@example.com"
PASSWORD = "prune-pa55-w0rd"


def ctl(agent: AgentProcess, emu: Emulator, *argv: str, stdin: str = "") -> CtlResult:
    return run_ctl(agent.socket_path, "--host", emu.host, "--user", USER, *argv, stdin=stdin)


def login(agent: AgentProcess, emu: Emulator) -> None:
    result = ctl(agent, emu, "login", "--password-stdin", stdin=PASSWORD + "\n")
    assert result.code == 0, result.err


def start(agent_factory: AgentFactory, emu: Emulator, name: str) -> AgentProcess:
    return agent_factory(
        "--ca-bundle", emu.ca_path, "--read-timeout", "5", "--connect-timeout", "5", name=name
    )


def on_service(emu: Emulator) -> list[RemoteKey]:
    """The account's keys as the emulator lists them over its API (with a session of its own)."""
    with ConduceAccount(emu.host, USER, HttpSettings(verify=emu.ca_path)) as account:
        account.login(PASSWORD)
        return list(account.list_keys())


def kill(agent: AgentProcess) -> None:
    """SIGKILL: the agent gets no chance to clean up anything."""
    assert agent.process is not None
    agent.process.send_signal(signal.SIGKILL)
    agent.process.wait(10)


def audit_entries(agent: AgentProcess) -> list[dict[str, Any]]:
    """The agent's audit log, through keyagent-ctl log --json."""
    shown = run_ctl(agent.socket_path, "log", "--json")
    assert shown.code == 0, shown.err
    return [json.loads(line) for line in shown.out.splitlines()]


def orphaned_agent(agent_factory: AgentFactory, emu: Emulator) -> tuple[list[str], AgentProcess]:
    """A first agent creates two keys and is SIGKILLed; a second one is started and logged in.
    Returns the two secrets and the second agent."""
    before = emu.api_keys(USER)
    first = start(agent_factory, emu, "first")
    login(first, emu)
    for description in ("build bot", "laptop"):
        created = ctl(first, emu, "create", "-C", description)
        assert created.code == 0, created.err
    orphans = [key for key in emu.api_keys(USER) if key not in before]
    assert len(orphans) == 2
    kill(first)
    second = start(agent_factory, emu, "second")
    login(second, emu)
    return orphans, second


def test_a_created_key_carries_the_mark_on_the_service(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """A key the agent creates has its description end with ' [keyagent]' on the service, and
    list --remote says keyagent: true for it and false for a key made by hand."""
    login(conduce_agent, emulator)
    by_hand = emulator.add_key(USER, "made in the console")
    assert ctl(conduce_agent, emulator, "create", "-C", "deploy").code == 0
    (mine,) = [key for key in emulator.api_keys(USER) if key != by_hand]
    descriptions = {listed.key: listed.description for listed in on_service(emulator)}
    assert descriptions == {by_hand: "made in the console", mine: "deploy [keyagent]"}
    listed = json.loads(ctl(conduce_agent, emulator, "list", "--remote", "--json").out)
    assert {k["key_id"]: k["keyagent"] for k in listed["remote"]} == {
        key_id_for(by_hand): False,
        key_id_for(mine): True,
    }
    table = ctl(conduce_agent, emulator, "list", "--remote").out.splitlines()
    assert table[0].split() == ["KEY", "CREATED", "HELD", "KEYAGENT", "KEY_ID", "DESCRIPTION"]
    row = {line.split()[4]: line.split()[3] for line in table[1:]}
    assert row == {key_id_for(by_hand): "no", key_id_for(mine): "yes"}


def test_prune_shows_then_deletes_the_keys_a_killed_agent_left(
    agent_factory: AgentFactory, emulator: Emulator
) -> None:
    """After the agent that created them is SIGKILLed, a new agent's prune lists its keys and
    exits 1; prune --yes deletes them on the service and exits 0; the key made by hand and
    the key the new agent holds are never touched; the audit log has one entry per deletion."""
    by_hand = emulator.add_key(USER, "made in the console")
    orphans, agent = orphaned_agent(agent_factory, emulator)
    assert ctl(agent, emulator, "create", "-C", "current").code == 0
    (held,) = set(emulator.api_keys(USER)) - {by_hand, *orphans}

    shown = ctl(agent, emulator, "prune")
    assert shown.code == 1, shown.err
    ids = [key_id_for(key) for key in orphans]
    assert [line.split()[0] for line in shown.out.splitlines()[1:3]] == ids
    assert "build bot [keyagent]" in shown.out
    assert "2 keys created by keyagent that this agent does not hold" in shown.out
    for untouched in (by_hand, held):
        assert key_id_for(untouched) not in shown.out
    for secret in (*orphans, by_hand, held):
        assert secret not in shown.out
    assert set(emulator.api_keys(USER)) == {by_hand, held, *orphans}

    as_json = ctl(agent, emulator, "prune", "--json")
    assert as_json.code == 1
    listed = json.loads(as_json.out)["orphans"]
    assert [(o["key_id"], o["description"]) for o in listed] == [
        (ids[0], "build bot [keyagent]"),
        (ids[1], "laptop [keyagent]"),
    ]
    assert all(o["masked"] and o["created"] for o in listed)

    pruned = ctl(agent, emulator, "prune", "--yes")
    assert pruned.code == 0, pruned.err
    assert "deleted 2 of 2 keys on the service" in pruned.out
    assert emulator.api_keys(USER) == [by_hand, held]

    again = ctl(agent, emulator, "prune")
    assert again.code == 0
    assert again.out.startswith("no keys created by keyagent that this agent does not hold")
    log = audit_entries(agent)
    entries = [(e["op"], e["key_id"], e["user"], e["outcome"]) for e in log if e["op"] == "prune"]
    assert entries == [("prune", key_id, USER, "ok") for key_id in ids]


def test_prune_yes_reports_a_failed_deletion_and_goes_on(
    agent_factory: AgentFactory, emulator: Emulator
) -> None:
    """When the service refuses one deletion (503), prune --yes still deletes the other key,
    says which failed and why, and exits 1; a second prune --yes finishes the job."""
    orphans, agent = orphaned_agent(agent_factory, emulator)
    emulator.inject(Fault.status(503), path="apikeys/delete", count=1)
    pruned = ctl(agent, emulator, "prune", "--yes", "--json")
    assert pruned.code == 1
    result: dict[str, Any] = json.loads(pruned.out)
    assert (result["deleted"], result["failed"]) == (1, 1)
    first, second = result["orphans"]
    assert (first["deleted"], first["error"]["code"]) == (False, "remote_error")
    assert second["deleted"] is True
    assert emulator.api_keys(USER) == [orphans[0]]
    log = audit_entries(agent)
    outcomes = [(e["key_id"], e["outcome"]) for e in log if e["op"] == "prune"]
    assert outcomes == [(key_id_for(orphans[0]), "remote_error"), (key_id_for(orphans[1]), "ok")]

    table = ctl(agent, emulator, "prune", "--yes")
    assert table.code == 0, table.err
    assert "RESULT" in table.out.splitlines()[0]
    assert "deleted 1 of 1 key on the service" in table.out
    assert emulator.api_keys(USER) == []


def test_prune_as_a_command_works_in_a_script(
    agent_factory: AgentFactory, emulator: Emulator
) -> None:
    """keyagent-ctl as its own process, with the account from KEYAGENT_HOST/KEYAGENT_USER:
    `prune || prune --yes` deletes the orphans, and prune then exits 0."""
    by_hand = emulator.add_key(USER, "made in the console")
    orphans, agent = orphaned_agent(agent_factory, emulator)
    env = {
        **os.environ,
        "KEYAGENT_SOCK": agent.socket_path,
        "KEYAGENT_HOST": emulator.host,
        "KEYAGENT_USER": USER,
    }
    alone = run_ctl_process(["prune"], env=env)
    assert alone.returncode == 1, alone.stderr
    assert key_id_for(orphans[0]) in alone.stdout
    ctl_command = f"{sys.executable} -m keyagent"
    script = subprocess.run(
        ["sh", "-c", f"{ctl_command} prune >/dev/null || {ctl_command} prune --yes"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert script.returncode == 0, script.stderr
    assert "deleted 2 of 2 keys" in script.stdout
    assert emulator.api_keys(USER) == [by_hand]
    assert run_ctl_process(["prune"], env=env).returncode == 0


def test_prune_help_warns_about_other_agents_of_the_account() -> None:
    """prune --help says it would delete keys another agent of the same account holds, and
    how its exit status works in scripts."""
    shown = run_ctl(None, "prune", "--help")
    assert shown.code == 0
    text = " ".join(shown.out.split())
    assert "another keyagent of the same account" in text
    assert "exits 1 if there are any" in text
    assert "--yes" in text
