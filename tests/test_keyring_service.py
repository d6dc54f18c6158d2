"""Persistence against a real Secret Service: gnome-keyring on a private D-Bus session bus."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyagent.store import key_id_for
from keyagent.testing.agent import AgentProcess, read_line

from .conftest import AgentFactory, run_ctl, wait_until

SECRET = "keyring-S3CR3T-0123456789abcdef"
KEYRING_PASSWORD = "unlock-me"

needs_secret_service = pytest.mark.skipif(
    not (shutil.which("dbus-daemon") and shutil.which("gnome-keyring-daemon")),
    reason="needs dbus-daemon and gnome-keyring-daemon (apt-get install dbus gnome-keyring)",
)


@pytest.fixture
def secret_service(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A session bus with an unlocked gnome-keyring; yields the environment that reaches it."""
    home = tmp_path / "home"
    runtime = tmp_path / "runtime"
    home.mkdir()
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}
    env.pop("PYTHON_KEYRING_BACKEND", None)
    bus = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", "--print-address=1"],
        stdout=subprocess.PIPE, env=env,
    )  # fmt: skip
    assert bus.stdout is not None
    try:
        address = read_line(bus.stdout.fileno(), 20).decode().strip()
        assert address.startswith("unix:")
        env["DBUS_SESSION_BUS_ADDRESS"] = address
        # Without --foreground the daemon returns once it serves the unlocked collection.
        subprocess.run(
            ["gnome-keyring-daemon", "--unlock", "--components=secrets"],
            input=KEYRING_PASSWORD.encode(), env=env, check=True, timeout=30,
            capture_output=True,
        )  # fmt: skip
        yield env
    finally:
        bus.terminate()  # gnome-keyring-daemon exits when its bus goes away
        bus.wait(10)
        bus.stdout.close()


INDEX_PROBE = """
import json, keyring
from secretstorage.exceptions import ItemNotFoundException
# The Secret Service has no atomic read: keyring finds the item, then asks for its secret.
# An agent deleting the entry in between makes the second step fail with ItemNotFound;
# reading again then gives what the service holds now.
for _ in range(20):
    try:
        value = keyring.get_password("keyagent", "index")
    except ItemNotFoundException:
        continue
    print(json.dumps(value))
    break
else:
    raise SystemExit("the index entry vanished during each of 20 reads")
"""


def keyring_index(env: dict[str, str]) -> object:
    """What the Secret Service holds under keyagent's index entry, read by a fresh process
    (while an agent may be changing it)."""
    result = subprocess.run(
        [sys.executable, "-c", INDEX_PROBE],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@needs_secret_service
def test_persisted_key_survives_sigkill_and_restart(
    agent_factory: AgentFactory, secret_service: dict[str, str]
) -> None:
    """A key added with --persist is back after the agent is SIGKILLed and restarted."""
    first = agent_factory(env=secret_service)
    added = run_ctl(
        first.socket_path,
        "--host",
        "h.example",
        "--user",
        "u",
        "add",
        "--persist",
        "-C",
        "kept",
        stdin=SECRET,
    )
    assert added.code == 0, added.err + first.log()
    assert first.process is not None
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(10)

    second = agent_factory(env=secret_service)
    assert second.socket_path == first.socket_path  # stale socket replaced
    with second.client() as client:
        assert client.get() == SECRET
        (listed,) = client.list()
    assert (listed["source"], listed["persisted"], listed["description"]) == (
        "keyring",
        True,
        "kept",
    )
    assert "restored 1 key(s)" in second.log()


@needs_secret_service
def test_forget_persist_removes_the_key_for_good(
    agent_factory: AgentFactory, secret_service: dict[str, str]
) -> None:
    """forget --persist deletes the keyring entry, so a restarted agent does not bring it back."""
    first = agent_factory(env=secret_service)
    run_ctl(first.socket_path, "--host", "h", "--user", "u", "add", "--persist", stdin=SECRET)
    gone = run_ctl(first.socket_path, "forget", "--persist", key_id_for(SECRET))
    assert gone.code == 0, gone.err
    first.stop()
    second = agent_factory(env=secret_service)
    with second.client() as client:
        assert client.list() == []
    assert keyring_index(secret_service) is None


@needs_secret_service
def test_expired_persisted_key_leaves_the_keyring(
    agent_factory: AgentFactory, secret_service: dict[str, str]
) -> None:
    """When a persisted key's lifetime ends, its keyring entry is deleted as well."""
    agent = agent_factory(env=secret_service)
    assert (
        run_ctl(
            agent.socket_path,
            "--host",
            "h",
            "--user",
            "u",
            "add",
            "--persist",
            "--lifetime",
            "5",  # long enough for the probe below, a fresh interpreter, to see it held
            stdin=SECRET,
        ).code
        == 0
    )
    assert keyring_index(secret_service) is not None
    with agent.client() as client:
        wait_until(lambda: not client.list(), "the key expired")
    # The deletion runs right after expiry, on the keyring queue: each probe is the wait.
    wait_until(lambda: keyring_index(secret_service) is None, "the expired key left the keyring")


def test_no_keyring_means_a_clear_error_and_memory_still_works(
    agent_factory: AgentFactory, tmp_path: Path
) -> None:
    """Without any Secret Service, --persist fails with the fix named; plain add still works."""
    hidden = {"DBUS_SESSION_BUS_ADDRESS", "PYTHON_KEYRING_BACKEND"}
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    env.update(HOME=str(tmp_path), XDG_RUNTIME_DIR=str(tmp_path))
    agent = agent_factory(env=env)
    refused = run_ctl(
        agent.socket_path, "--host", "h", "--user", "u", "add", "--persist", stdin=SECRET
    )
    assert refused.code == 1
    assert "[keyring_unavailable]" in refused.err
    assert "gnome-keyring" in refused.err or "Secret Service" in refused.err
    assert run_ctl(agent.socket_path, "--host", "h", "--user", "u", "add", stdin=SECRET).code == 0
    assert run_ctl(agent.socket_path, "get").out == SECRET + "\n"
    assert not any(
        SECRET in path.read_text(errors="ignore")
        for path in tmp_path.rglob("*")
        if path.is_file() and path.name != "agent.log"
    )


def test_agent_with_no_keyring_flag_never_loads_keyring(agent_factory: AgentFactory) -> None:
    """keyagent --no-keyring refuses persistence without touching any keyring backend."""
    agent: AgentProcess = agent_factory("--no-keyring")
    refused = run_ctl(
        agent.socket_path, "--host", "h", "--user", "u", "add", "--persist", stdin=SECRET
    )
    assert "[keyring_unavailable]" in refused.err
    assert "--no-keyring" in refused.err
