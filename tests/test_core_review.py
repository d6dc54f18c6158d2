"""Regression tests for the serving process's own checks (issue 9): the hardening read-back
and a keyring restore that runs out of time."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

import pytest
from keyring.backends import fail

from keyagent import core, errors, hardening
from keyagent.agent import Agent
from keyagent.persist import KeyringStore, PersistedKey
from keyagent.store import digest_of
from keyagent.testing.agent import AgentProcess, wait_for_exit
from keyagent.testing.memory_keyring import MemoryKeyring

from .fakes import driver_for

SECRETS = ["first-S3CR3T-key", "second-S3CR3T-key", "third-S3CR3T-key"]


class HangingKeyring(MemoryKeyring):
    """A keyring whose read of one entry never returns, like one stuck on an unlock prompt."""

    def __init__(self, hang_on: str) -> None:
        super().__init__()
        self.hang_on = hang_on
        self.armed = False

    def get_password(self, service: str, username: str) -> str | None:
        if self.armed and username == self.hang_on:
            threading.Event().wait()  # in the forked reader, which the agent then kills
        return super().get_password(service, username)


def persisted(secret: str) -> PersistedKey:
    return PersistedKey(
        digest=digest_of(secret),
        host="app.conduce.com",
        user="ada@example.com",
        secret=secret,
        description="",
        created=None,
        expires=None,
    )


def test_a_restore_that_hits_its_deadline_keeps_the_keys_read_before_it() -> None:
    """Keys read before the keyring hung are held; the agent does not start with none."""
    backend = HangingKeyring(hang_on=f"key:{digest_of(SECRETS[2])}")
    store = KeyringStore(backend)
    for secret in SECRETS:
        store.save(persisted(secret))
    backend.armed = True
    agent = Agent()
    # Waits out the whole deadline (the third read hangs): long enough that the first two
    # reads, in a forked process, are certain to come before it even on a loaded machine.
    core.restore_persisted(agent, store, timeout=5.0)
    held = sorted(held.secret for held in agent.held_keys.matching(agent.clock.monotonic()))
    assert held == sorted(SECRETS[:2])


def test_a_complete_restore_holds_every_key() -> None:
    """Without a hang every persisted key comes back, with nothing left waiting."""
    store = KeyringStore(MemoryKeyring())
    for secret in SECRETS:
        store.save(persisted(secret))
    agent = Agent()
    core.restore_persisted(agent, store, timeout=20.0)
    assert len(agent.held_keys) == 3


def test_the_restore_reader_brings_back_the_lock_with_the_keys() -> None:
    """The forked keyring reader hands over a stored lock: the agent starts locked."""
    store = KeyringStore(MemoryKeyring())
    for secret in SECRETS:
        store.save(persisted(secret))
    store.save_lock(b"s" * 16, b"d" * 32)
    agent = Agent()
    core.restore_persisted(agent, store, timeout=20.0)
    assert len(agent.held_keys) == 3
    assert agent.lock.locked
    assert agent.lock.salt == b"s" * 16


def test_a_stored_lock_with_no_key_behind_it_is_deleted() -> None:
    """Every key read, none there: the lock guards nothing, so the agent starts unlocked and
    deletes the stale record (it would otherwise lock keys added later)."""
    backend = MemoryKeyring()
    store = KeyringStore(backend)
    store.save_lock(b"s" * 16, b"d" * 32)
    agent = Agent(keyring=store)
    core.restore_persisted(agent, store, timeout=20.0)
    driver_for(agent)  # runs the background work the restore started
    assert not agent.lock.locked
    assert backend.get_password("keyagent", "lock") is None


@pytest.mark.parametrize("failure", ["index", "hang"])
def test_a_lock_whose_keys_could_not_be_read_is_kept_for_the_next_start(
    failure: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A restore that read no key because the keyring failed (an index that does not parse)
    or hung before the first key says nothing of the keys still stored: the lock record
    stays, so the start that reads them comes back locked, not unlocked."""
    backend = HangingKeyring(hang_on=f"key:{digest_of(SECRETS[0])}")
    store = KeyringStore(backend)
    for secret in SECRETS:
        store.save(persisted(secret))
    store.save_lock(b"s" * 16, b"d" * 32)
    index = backend.get_password("keyagent", "index")
    if failure == "index":
        backend.put("keyagent", "index", "{")
    else:
        backend.armed = True
    agent = Agent(keyring=store)
    # The lock is read first; with a hang the deadline is waited out whole.
    core.restore_persisted(agent, store, timeout=5.0)
    driver_for(agent)
    assert len(agent.held_keys) == 0
    assert not agent.lock.locked  # nothing in memory to guard
    assert backend.get_password("keyagent", "lock") is not None
    assert "the lock stays in the OS keyring" in caplog.text
    backend.armed = False
    assert index is not None
    backend.put("keyagent", "index", index)  # the keyring works again
    again = Agent(keyring=store)
    core.restore_persisted(again, store, timeout=20.0)
    assert len(again.held_keys) == 3
    assert again.lock.locked


@pytest.mark.parametrize("record", ['{"v":1,"salt":"zz","hash":5}', "not json", '{"v":1}'])
def test_an_unreadable_lock_record_keeps_the_keys_out_of_memory(
    record: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A lock record that does not parse fails closed: the keys it guarded are not restored
    (no passphrase could unlock them), and the log says how to recover."""
    backend = MemoryKeyring()
    store = KeyringStore(backend)
    for secret in SECRETS:
        store.save(persisted(secret))
    backend.put("keyagent", "lock", record)
    agent = Agent()
    core.restore_persisted(agent, store, timeout=20.0)
    assert len(agent.held_keys) == 0
    assert any(
        "lock record that cannot be read" in r.getMessage() and "forget --all --persist"
        in r.getMessage() for r in caplog.records
    )  # fmt: skip
    assert store.delete_all() == 3
    assert backend.entries() == {}  # forget --all --persist leaves nothing, the lock included


@pytest.mark.parametrize(("broken", "level"), [(False, logging.INFO), (True, logging.WARNING)])
def test_a_keyring_that_fails_at_restore_is_a_warning_none_at_all_is_not(
    broken: bool, level: int, caplog: pytest.LogCaptureFixture
) -> None:
    """No keyring at all (a server) is usual and logged at info; a keyring that cannot be
    read (here an index that does not parse) is a warning that says what to do."""
    backend: object = fail.Keyring()  # type: ignore[no-untyped-call]  # keyring is untyped here
    if broken:
        memory = MemoryKeyring()
        memory.put("keyagent", "index", "{")
        backend = memory
    agent = Agent()
    with caplog.at_level(logging.INFO):
        core.restore_persisted(agent, KeyringStore(backend), timeout=20.0)
    (record,) = [r for r in caplog.records if "persisted keys not restored" in r.getMessage()]
    assert record.levelno == level


@pytest.mark.parametrize(
    ("dumpable", "tracer", "expected"),
    [
        (0, 0, []),
        (1, 0, ["dumpable"]),
        (0, 4242, ["traced by pid 4242"]),
        (1, 7, ["dumpable", "7"]),
    ],
)
def test_hardening_problems_name_what_is_wrong(
    dumpable: int, tracer: int, expected: list[str]
) -> None:
    """The read-back of the hardening warns for a dumpable agent and for an attached tracer."""
    problems = hardening.hardening_problems(dumpable, tracer)
    assert len(problems) == len(expected)
    for problem, word in zip(problems, expected, strict=True):
        assert word in problem


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (.ci/run installs it)")
def test_an_agent_started_under_a_tracer_warns_at_start_up(tmp_path: Path) -> None:
    """A tracer attached before start-up keeps its access: the agent says so in its log."""
    with AgentProcess(tmp_path / "agent", wrapper=["strace", "-f", "-o", "/dev/null"]) as agent:
        with agent.client() as client:
            assert client.hello()["protocol"] == 1
            pid = client.status()["pid"]
        log = agent.log()
    assert "the agent is being traced by pid" in log
    # Stopping the wrapper stopped the traced agent too: none is left running.
    assert wait_for_exit(pid, 20), "the traced agent is still running"


def test_an_agent_started_normally_does_not_warn(tmp_path: Path) -> None:
    """A plain start reads back a non-dumpable, untraced process: no hardening warning."""
    with AgentProcess(tmp_path / "agent") as agent:
        with agent.client() as client:
            status = client.status()
        log = agent.log()
    assert status["locked"] is False
    assert "being traced" not in log
    assert "still dumpable" not in log


def test_max_keys_caps_a_running_agent(tmp_path: Path) -> None:
    """keyagent --max-keys N: the agent holds N keys and answers too_many for one more."""
    with (
        AgentProcess(tmp_path / "agent", ["--max-keys", "2"]) as agent,
        agent.client() as client,
    ):
        for secret in SECRETS[:2]:
            client.add("app.conduce.com", "ada@example.com", secret)
        with pytest.raises(errors.TooMany, match="--max-keys"):
            client.add("app.conduce.com", "ada@example.com", SECRETS[2])
        assert len(client.list()) == 2


def test_max_keys_comes_from_the_config_file(tmp_path: Path) -> None:
    """max_keys in config.toml sets the cap like the flag."""
    config = tmp_path / "conf"
    config.mkdir(mode=0o700)
    (config / "config.toml").write_text("max_keys = 1\n")
    (config / "config.toml").chmod(0o600)
    env = {**os.environ, "KEYAGENT_CONFIG": str(config / "config.toml")}
    with AgentProcess(tmp_path / "agent", env=env) as agent, agent.client() as client:
        client.add("app.conduce.com", "ada@example.com", SECRETS[0])
        with pytest.raises(errors.TooMany):
            client.add("app.conduce.com", "ada@example.com", SECRETS[1])
