"""Nothing is lost across a crash, end to end: the real agent, SIGKILLed and restarted on the
same socket, deletes on the shipped Conduce emulator the ephemeral keys its predecessor left
(named by the leftovers file, which never holds a secret), and a persisted ephemeral key
keeps its flag and expiry across restarts (gnome-keyring on a private bus)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

from keyagent import paths
from keyagent.errors import KeyagentError
from keyagent.leftovers import LeftoversFile
from keyagent.store import digest_of, key_id_for
from keyagent.testing.agent import AgentProcess
from keyagent.testing.emulator import Fault
from keyagent.testing.emulator_process import Emulator

from .conftest import AgentFactory, CtlResult, agent_status, run_ctl, wait_until
from .test_keyring_service import keyring_index, needs_secret_service, secret_service

__all__ = ["secret_service"]  # a fixture, used by name

USER = "crash@example.com"
PASSWORD = "crash-pa55-w0rd"


def ctl(agent: AgentProcess, emu: Emulator, *argv: str, stdin: str = "") -> CtlResult:
    result = run_ctl(agent.socket_path, "--host", emu.host, "--user", USER, *argv, stdin=stdin)
    assert result.code == 0, result.err + agent.log()
    return result


def login(agent: AgentProcess, emu: Emulator) -> None:
    ctl(agent, emu, "login", "--password-stdin", stdin=PASSWORD + "\n")


def start(factory: AgentFactory, emu: Emulator, env: dict[str, str] | None = None) -> AgentProcess:
    """An agent on the test's one socket (a restart reuses it) that trusts the emulator."""
    return factory("--ca-bundle", emu.ca_path, "--read-timeout", "5", "--connect-timeout", "5",
                   env=env)  # fmt: skip


def kill(agent: AgentProcess) -> None:
    assert agent.process is not None
    agent.process.send_signal(signal.SIGKILL)
    agent.process.wait(10)


def leftovers_of(agent: AgentProcess) -> Path:
    return Path(paths.leftovers_path(agent.socket_path))


def fingerprints(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [entry["fingerprint"] for entry in json.loads(path.read_text())["keys"]]


def test_the_leftovers_file_names_ephemeral_keys_and_holds_no_secret(
    agent_factory: AgentFactory, emulator: Emulator
) -> None:
    """After several ephemeral creates, the 0600 file (in a 0700 directory, the user's own)
    names each key by fingerprint, host, user and expiry, and contains no part of any key."""
    agent = start(agent_factory, emulator)
    login(agent, emulator)
    for _ in range(3):
        ctl(agent, emulator, "create", "--lifetime", "1h")
    ctl(agent, emulator, "create", "--lifetime", "1h", "--keep")
    secrets = emulator.api_keys(USER)
    assert len(secrets) == 4
    path = leftovers_of(agent)
    text = path.read_text()
    for secret in secrets:
        assert secret not in text
        assert secret[len(secret) // 2 :] not in text
        assert secret[:8] not in text
    assert sorted(fingerprints(path)) == sorted(digest_of(s) for s in secrets[:3])
    for entry in json.loads(text)["keys"]:
        assert set(entry) == {"fingerprint", "host", "user", "expires"}
        assert (entry["host"], entry["user"]) == (emulator.host, USER)
        assert entry["expires"] > time.time() + 3000
    info = path.stat()
    assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o600, os.geteuid())
    directory = path.parent.stat()
    assert (stat.S_IMODE(directory.st_mode), directory.st_uid) == (0o700, os.geteuid())


def test_the_file_still_parses_after_a_sigkill_in_the_middle_of_creates(
    agent_factory: AgentFactory, emulator: Emulator
) -> None:
    """An agent SIGKILLed while a client creates ephemeral keys in a loop leaves a file that
    parses, naming only keys that exist on the service."""
    agent = start(agent_factory, emulator)
    login(agent, emulator)
    stop = threading.Event()

    def create_forever() -> None:
        with agent.client() as client:
            while not stop.is_set():
                try:
                    client.call("create", host=emulator.host, user=USER, lifetime=3600)
                except (KeyagentError, OSError):
                    return

    creator = threading.Thread(target=create_forever)
    creator.start()
    path = leftovers_of(agent)
    try:
        wait_until(lambda: len(fingerprints(path)) >= 5, "five keys recorded", pause=0.01)
        kill(agent)
    finally:
        stop.set()
        creator.join(30)
    entries = LeftoversFile(str(path)).read()
    assert len(entries) >= 5
    on_service = {digest_of(secret) for secret in emulator.api_keys(USER)}
    assert {entry.fingerprint for entry in entries} <= on_service
    # A temporary file the kill interrupted is the reader's to remove.
    assert [name for name in os.listdir(path.parent) if name.endswith(".tmp")] == []


def test_a_killed_agents_key_is_deleted_at_the_next_login(
    agent_factory: AgentFactory, emulator: Emulator
) -> None:
    """SIGKILL, then restart on the same socket: with no credentials for the account the
    left-over key waits (status shows it); the next login deletes it on the service, through
    a 503 retried, list --remote showing it pending meanwhile; then the file is gone."""
    agent = start(agent_factory, emulator)
    login(agent, emulator)
    ctl(agent, emulator, "create", "--lifetime", "1h")
    (secret,) = emulator.api_keys(USER)
    ctl(agent, emulator, "logout")
    kill(agent)
    again = start(agent_factory, emulator)
    assert again.socket_path == agent.socket_path
    (pending,) = agent_status(again)["pending_deletions"]
    assert pending["key_id"] == key_id_for(secret)
    assert pending["waiting_for_login"] is True
    text = run_ctl(again.socket_path, "status").out
    assert f"pending deletion of key {key_id_for(secret)}" in text
    assert "(left by an earlier agent; waits for keyagent-ctl login)" in text
    emulator.inject(Fault.status(503), path="apikeys/delete")
    login(again, emulator)
    wait_until(
        lambda: any(r.path == "apikeys/delete" and r.status == 503 for r in emulator.requests),
        "a first, refused, deletion",
    )
    remote = json.loads(ctl(again, emulator, "list", "--remote", "--json").out)["remote"]
    assert [r["pending_deletion"] for r in remote] == [True]
    assert fingerprints(leftovers_of(again)) == [digest_of(secret)]
    emulator.clear_faults()
    wait_until(lambda: emulator.api_keys(USER) == [], "the left-over key deleted")
    wait_until(lambda: not leftovers_of(again).exists(), "the leftovers file removed", pause=0.01)
    assert agent_status(again)["pending_deletions"] == []


@needs_secret_service
def test_a_killed_agents_key_is_deleted_at_start_with_a_persisted_key(
    agent_factory: AgentFactory, emulator: Emulator, secret_service: dict[str, str]
) -> None:
    """SIGKILL, then restart: the agent restores a persisted (kept) key of the account from
    the keyring and with it deletes at once the ephemeral key the killed agent left."""
    agent = start(agent_factory, emulator, secret_service)
    login(agent, emulator)
    ctl(agent, emulator, "create", "--keep", "--persist")
    ctl(agent, emulator, "create", "--lifetime", "1h")
    kept, ephemeral = emulator.api_keys(USER)
    ctl(agent, emulator, "logout")
    kill(agent)
    again = start(agent_factory, emulator, secret_service)
    wait_until(lambda: emulator.api_keys(USER) == [kept], "the left-over key deleted")
    (delete,) = [r for r in emulator.requests if r.path == "apikeys/delete"]
    assert delete.auth == "bearer"
    with again.client() as client:
        assert [key["fingerprint"] for key in client.list()] == [digest_of(kept)]
    wait_until(lambda: not leftovers_of(again).exists(), "the leftovers file removed", pause=0.01)
    assert digest_of(ephemeral) not in again.log()  # logged by its short id only


@needs_secret_service
def test_a_persisted_ephemeral_key_comes_back_ephemeral_and_expiring(
    agent_factory: AgentFactory, emulator: Emulator, secret_service: dict[str, str]
) -> None:
    """create --persist of an ephemeral key, SIGKILL, restart: the key is back, ephemeral, with
    its original expiry; it is not in the leftovers file (the keyring holds it)."""
    agent = start(agent_factory, emulator, secret_service)
    login(agent, emulator)
    ctl(agent, emulator, "create", "--lifetime", "1h", "--persist")
    (before,) = json.loads(ctl(agent, emulator, "list", "--json").out)["keys"]
    assert fingerprints(leftovers_of(agent)) == []
    kill(agent)
    again = start(agent_factory, emulator, secret_service)
    (after,) = json.loads(ctl(again, emulator, "list", "--json").out)["keys"]
    assert (after["fingerprint"], after["ephemeral"], after["persisted"]) == (
        before["fingerprint"], True, True,
    )  # fmt: skip
    assert after["expires"] == before["expires"]
    assert after["source"] == "keyring"


BACKDATE = """
import json, sys, time, keyring
name = "key:" + sys.argv[1]
record = json.loads(keyring.get_password("keyagent", name))
record["expires"] = time.time() - 60
keyring.set_password("keyagent", name, json.dumps(record))
"""


def backdate(env: dict[str, str], digest: str) -> None:
    """Make the Secret Service's record of the key ``digest`` say it expired a minute ago,
    from a fresh process (the agent is not running)."""
    subprocess.run([sys.executable, "-c", BACKDATE, digest], env=env, timeout=30, check=True)


@needs_secret_service
def test_a_persisted_ephemeral_key_that_expired_while_down_is_deleted_at_start(
    agent_factory: AgentFactory, emulator: Emulator, secret_service: dict[str, str]
) -> None:
    """A persisted ephemeral key whose expiry passes while no agent runs is deleted on the
    service by the next agent at start, with itself; its keyring entry is deleted after."""
    agent = start(agent_factory, emulator, secret_service)
    login(agent, emulator)
    ctl(agent, emulator, "create", "--lifetime", "1h", "--persist")
    (secret,) = emulator.api_keys(USER)
    (listed,) = json.loads(ctl(agent, emulator, "list", "--json").out)["keys"]
    assert listed["fingerprint"] == digest_of(secret)
    ctl(agent, emulator, "logout")
    kill(agent)
    assert keyring_index(secret_service) is not None
    # The expiry passes while no agent runs: the record says so, as an hour later would.
    backdate(secret_service, digest_of(secret))
    again = start(agent_factory, emulator, secret_service)
    wait_until(lambda: emulator.api_keys(USER) == [], "the expired key deleted on the service")
    (delete,) = [r for r in emulator.requests if r.path == "apikeys/delete"]
    assert delete.auth == "bearer"  # with the key itself: the agent had nothing else
    wait_until(lambda: keyring_index(secret_service) is None, "its keyring entry deleted")
    with again.client() as client:
        assert client.list() == []
    assert "expired meanwhile" in again.log()


def test_an_untrusted_leftovers_file_is_reported_not_fatal(
    agent_factory: AgentFactory, emulator: Emulator
) -> None:
    """An agent whose leftovers file is not JSON starts and serves anyway; its log names the
    file and what to do. A later ephemeral create replaces the file with a good one."""
    first = start(agent_factory, emulator)
    leftovers = leftovers_of(first)
    first.stop()
    leftovers.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    leftovers.write_text("{not json")
    leftovers.chmod(0o600)
    agent = start(agent_factory, emulator)
    assert agent_status(agent)["pending_deletions"] == []
    assert f"ignoring the leftovers file {leftovers}: it is not valid JSON" in agent.log()
    login(agent, emulator)
    ctl(agent, emulator, "create", "--lifetime", "1h")
    (secret,) = emulator.api_keys(USER)
    assert fingerprints(leftovers) == [digest_of(secret)]


def test_an_agent_that_cannot_record_its_keys_says_so_where_the_user_looks(
    agent_factory: AgentFactory, emulator: Emulator
) -> None:
    """With the leftovers file's directory open to others (0755), the agent cannot record
    its ephemeral keys for a crash. create --lifetime still makes and holds the key, and
    exits 0, but warns on stderr, and status says so, until a write succeeds again."""
    first = start(agent_factory, emulator)
    leftovers = leftovers_of(first)
    first.stop()
    leftovers.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    leftovers.parent.chmod(0o755)
    agent = start(agent_factory, emulator)
    login(agent, emulator)
    created = ctl(agent, emulator, "create", "--lifetime", "1h")
    assert "keyagent-ctl: warning: the agent cannot record its ephemeral keys" in created.err
    assert "held by the agent; deleted on the service when it expires" in created.out
    assert agent_status(agent)["leftovers"] == {"path": str(leftovers), "failing": True}
    status = run_ctl(agent.socket_path, "status")
    assert "warning: the agent cannot record its ephemeral keys in its leftovers file" in (
        status.out
    )
    assert str(leftovers) in status.out
    kept = ctl(agent, emulator, "create")  # not ephemeral: nothing to record, no warning
    assert "warning" not in kept.err
    leftovers.parent.chmod(0o700)
    ctl(agent, emulator, "create", "--lifetime", "1h")  # the next write succeeds
    assert agent_status(agent)["leftovers"] == {"path": str(leftovers), "failing": False}
    assert "warning" not in run_ctl(agent.socket_path, "status").out
    assert len(fingerprints(leftovers)) == 2
