"""Rotation end to end: keyagent-ctl rotate against the real agent and the shipped Conduce
emulator, through cli.main and as its own process; what the service holds before and after,
and what get and the HTTP socket serve afterwards. The schedule is seen through an
in-process server on a real socket with a fake clock (a real one would wait a minute)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import keyagent
from keyagent.agent import Agent
from keyagent.store import key_id_for
from keyagent.testing.agent import AgentProcess
from keyagent.testing.emulator import Fault
from keyagent.testing.emulator_process import Emulator

from .conftest import CtlResult, run_ctl, run_ctl_process, wait_until
from .fakes import FakeAccount, FakeTime
from .test_server_races import serving

USER = "rosa@example.com"
PASSWORD = "rotate-pa55-w0rd-never-shown"
VALIDATE = "/conduce/api/v1/user/validate-session"


def ctl(agent: AgentProcess, emu: Emulator, *argv: str, stdin: str = "") -> CtlResult:
    return run_ctl(agent.socket_path, "--host", emu.host, "--user", USER, *argv, stdin=stdin)


def ok(result: CtlResult) -> str:
    assert result.code == 0, result.err
    return result.out


def login(agent: AgentProcess, emu: Emulator) -> None:
    ok(ctl(agent, emu, "login", "--password-stdin", stdin=PASSWORD + "\n"))


def listed(agent: AgentProcess, emu: Emulator) -> list[dict[str, Any]]:
    keys: list[dict[str, Any]] = json.loads(ok(ctl(agent, emu, "list", "--json")))["keys"]
    return keys


def test_rotate_replaces_the_key_on_the_service_and_in_what_the_agent_serves(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """keyagent-ctl rotate KEY_ID: the service holds the new key instead of the old one,
    get prints the new key, and a request through the HTTP socket authenticates with it."""
    login(conduce_agent, emulator)
    ok(ctl(conduce_agent, emulator, "create", "--lifetime", "1h", "--description", "ci"))
    (old,) = emulator.api_keys(USER)
    out = ok(run_ctl(conduce_agent.socket_path, "rotate", key_id_for(old)))
    (new,) = emulator.api_keys(USER)
    assert new != old
    assert out == (
        f"rotated key {key_id_for(old)} to {key_id_for(new)} for {USER}@{emulator.host};"
        " the old key is deleted on the service\n"
    )
    assert ok(ctl(conduce_agent, emulator, "get")) == new + "\n"
    (key,) = listed(conduce_agent, emulator)
    assert (key["description"], key["ephemeral"]) == ("ci", True)
    # Without a session, a proxied request must use the held key: the old one is gone from
    # the service, so a 200 with a bearer key is the new key's.
    ok(ctl(conduce_agent, emulator, "logout"))
    emulator.clear_requests()
    http_socket = str(Path(conduce_agent.socket_path).with_name("http.sock"))
    with keyagent.http_session(emulator.host, socket_path=http_socket) as session:
        answer = session.get(f"https://{emulator.host}{VALIDATE}")
    assert answer.status_code == 200
    assert [(r.auth, r.status) for r in emulator.requests] == [("bearer", 200)]


def test_a_refused_deletion_is_reported_pending_and_retried(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """While the service refuses deletions, keyagent-ctl rotate (its own process) says the
    old key is pending deletion; once the service recovers, the agent deletes it."""
    login(conduce_agent, emulator)
    ok(ctl(conduce_agent, emulator, "create", "--lifetime", "1h"))
    (old,) = emulator.api_keys(USER)
    emulator.inject(Fault.status(503), path="apikeys/delete")
    env = {**os.environ, "KEYAGENT_SOCK": conduce_agent.socket_path}
    result = run_ctl_process(["rotate", key_id_for(old)], env=env)
    assert result.returncode == 0, result.stderr
    assert "NOT yet deleted on the service: pending deletion" in result.stdout
    old_present, new = emulator.api_keys(USER)
    assert old_present == old
    assert ok(ctl(conduce_agent, emulator, "get")) == new + "\n"
    emulator.clear_faults()
    wait_until(lambda: emulator.api_keys(USER) == [new], "the old key deleted by a retry")


def test_rotate_all_rotates_created_keys_and_fails_with_status_1_if_one_fails(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """rotate --all (its own process) rotates every created key and leaves added ones; when
    the service refuses to make keys, it names each key it could not rotate and exits 1."""
    login(conduce_agent, emulator)
    ok(ctl(conduce_agent, emulator, "create", "--lifetime", "1h"))
    ok(ctl(conduce_agent, emulator, "create", "--keep"))
    added = emulator.add_key(USER, "added by hand")
    ok(ctl(conduce_agent, emulator, "add", stdin=added + "\n"))
    before = emulator.api_keys(USER)
    argv = ["--socket", conduce_agent.socket_path, "rotate", "--all"]
    argv += ["--host", emulator.host, "--user", USER]
    result = run_ctl_process(argv)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("rotated key") == 2
    after = emulator.api_keys(USER)
    assert added in after
    assert len(after) == 3
    assert set(before) & set(after) == {added}
    emulator.inject(Fault.status(503), path="apikeys/create")
    failed = run_ctl_process(argv)
    assert failed.returncode == 1
    assert failed.stderr.count("could not rotate key") == 2
    assert emulator.api_keys(USER) == after


def test_create_rotate_every_is_listed_and_checked(
    conduce_agent: AgentProcess, emulator: Emulator
) -> None:
    """create --rotate-every 1h lists the key with its interval and next rotation; an
    interval under a minute, or not shorter than the lifetime, is refused."""
    login(conduce_agent, emulator)
    out = ok(ctl(conduce_agent, emulator, "create", "--rotate-every", "1h", "--lifetime", "8h"))
    assert out.endswith("; replaced by a new key every 3600s\n")
    (key,) = listed(conduce_agent, emulator)
    assert key["rotate_every"] == 3600
    assert key["next_rotation"] is not None
    table = ok(ctl(conduce_agent, emulator, "list"))
    assert "ROTATES" in table.splitlines()[0]
    assert f"{key['next_rotation']} (every 3600s)" in table
    too_short = ctl(conduce_agent, emulator, "create", "--rotate-every", "30s")
    assert too_short.code == 64
    assert "at least 60 seconds" in too_short.err
    # What the agent would refuse, keyagent-ctl refuses first: exit 64.
    too_long = ctl(conduce_agent, emulator, "create", "--rotate-every", "2h", "--lifetime", "1h")
    assert too_long.code == 64
    assert "--rotate-every" in too_long.err
    assert len(emulator.api_keys(USER)) == 1


def test_the_server_rotates_a_scheduled_key_when_its_time_comes(tmp_path: Path) -> None:
    """An in-process server on a real socket, on a fake clock: once the clock passes a key's
    rotate_every, the server's loop starts its rotation (as it reaps expired keys), and get
    then serves the new key while the old one is gone from the service."""
    time = FakeTime()
    account = FakeAccount()
    agent = Agent(clock=time.clock(), accounts=lambda host, user: account)
    with serving(tmp_path / "run" / "agent.sock", agent) as served:
        with served.client() as client:
            client.login("h.example", USER, "pw")
            client.create("h.example", USER, rotate_every=3600)
            (old,) = account.keys
            assert client.get("h.example", USER) == old
        # Past the idle timeout too (on the same clock): a new connection for each request.
        time.advance(3600)

        def get() -> str:
            with served.client() as client:
                return client.get("h.example", USER)

        get()  # wakes the loop, which then finds the rotation due
        wait_until(lambda: len(account.keys) == 1 and old not in account.keys, "the rotation")
        (new,) = account.keys
        wait_until(lambda: get() == new, "the new key served")
        with served.client() as client:
            (listed,) = client.list()
        assert listed["rotate_every"] == 3600
