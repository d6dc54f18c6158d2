"""Key rules on the HTTP socket, end to end: a non-exportable key works only through it, a
key with allowed programs serves only those, a --confirm key asks once per connection."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from keyagent import errors
from keyagent.store import key_id_for
from keyagent.testing.agent import AgentProcess
from keyagent.testing.emulator import key_id
from keyagent.testing.emulator_process import Emulator

from .conftest import AgentFactory, run_ctl

USER = "dora@example.com"
PASSWORD = "rules-pa55word"
ECHO = "/conduce/api/v1/echo"
CURL = shutil.which("curl")
pytestmark = pytest.mark.skipif(CURL is None, reason="curl is not installed")


@pytest.fixture
def rules_agent(agent_factory: AgentFactory, emulator: Emulator, askpass_dir: Path) -> AgentProcess:
    """An agent trusting the emulator, with the test askpass and a 2 s confirmation timeout."""
    config = askpass_dir.parent / "config.toml"
    config.write_text(f'askpass = "{askpass_dir / "ask"}"\nconfirm_timeout = "2s"\n')
    return agent_factory("--config", str(config), "--ca-bundle", emulator.ca_path)


def http_path(agent: AgentProcess) -> str:
    return str(Path(agent.socket_path).with_name("http.sock"))


def curl(
    agent: AgentProcess, emu: Emulator, *urls: str, program: str | None = None
) -> list[tuple[int, dict[str, Any]]]:
    """One curl process (one connection, keep-alive) fetching each URL: status and JSON."""
    assert CURL is not None
    command = [program or CURL, "-sS", "--unix-socket", http_path(agent)]
    for url in urls:
        command += ["-w", r"\n%{http_code}\n", f"http://{emu.host}{url}"]
    output = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
    lines = output.stdout.splitlines()
    return [(int(lines[i + 1]), json.loads(lines[i])) for i in range(0, len(lines), 2)]


def test_a_non_exportable_key_serves_only_through_the_http_socket(
    rules_agent: AgentProcess, emulator: Emulator
) -> None:
    """get refuses it; a call through the socket is made with it."""
    secret = emulator.add_key(USER)
    with rules_agent.client() as client:
        client.add(emulator.host, USER, secret, export=False)
        with pytest.raises(errors.Forbidden):
            client.get()
    ((status, seen),) = curl(rules_agent, emulator, ECHO)
    assert status == 200
    assert seen["headers"]["authorization"] == {
        "auth": "bearer",
        "key_id": key_id(secret),
        "valid": True,
    }


def test_allowed_programs_are_checked_on_the_http_socket(
    rules_agent: AgentProcess, emulator: Emulator, tmp_path: Path
) -> None:
    """A key allowed to one copy of curl is lent to it, and denied (403) to curl itself,
    without the service seeing the refused call."""
    assert CURL is not None
    allowed = tmp_path / "allowed-curl"
    shutil.copy2(os.path.realpath(CURL), allowed)
    secret = emulator.add_key(USER)
    with rules_agent.client() as client:
        client.add(emulator.host, USER, secret, allow_exe=[str(allowed)])
    ((status, _),) = curl(rules_agent, emulator, ECHO, program=str(allowed))
    assert status == 200
    emulator.clear_requests()
    ((status, refused),) = curl(rules_agent, emulator, ECHO)
    assert status == 403
    assert refused["error"]["code"] == "denied"
    assert str(allowed) in refused["error"]["message"]
    assert emulator.requests == []


def test_a_key_for_another_program_leaves_an_older_key_to_the_rest(
    rules_agent: AgentProcess, emulator: Emulator, tmp_path: Path
) -> None:
    """The newest key is allowed only to a copy of curl: curl itself is lent the older
    key, the copy the newer one; the audit log names the key each request used."""
    assert CURL is not None
    allowed = tmp_path / "allowed-curl"
    shutil.copy2(os.path.realpath(CURL), allowed)
    older, newer = emulator.add_key(USER), emulator.add_key(USER)
    with rules_agent.client() as client:
        client.add(emulator.host, USER, older)
        client.add(emulator.host, USER, newer, allow_exe=[str(allowed)])
    ((status, seen),) = curl(rules_agent, emulator, ECHO)
    assert (status, seen["headers"]["authorization"]["key_id"]) == (200, key_id(older))
    ((status, seen),) = curl(rules_agent, emulator, ECHO, program=str(allowed))
    assert (status, seen["headers"]["authorization"]["key_id"]) == (200, key_id(newer))
    with rules_agent.client() as client:
        proxied = [entry for entry in client.log() if entry["op"] == "proxy"]
    assert [(entry["key_id"], entry["exe"]) for entry in proxied] == [
        (key_id_for(older), os.path.realpath(CURL)),
        (key_id_for(newer), str(allowed)),
    ]


def test_a_confirmed_key_asks_once_per_connection(
    rules_agent: AgentProcess, emulator: Emulator, askpass_dir: Path
) -> None:
    """Two requests on one connection ask once; a new connection asks again; a refusal is
    403 denied and never reaches the service. The question names curl and the key."""
    secret = emulator.add_key(USER)
    with rules_agent.client() as client:
        client.add(emulator.host, USER, secret, confirm=True, description="guarded")
    answers = curl(rules_agent, emulator, ECHO, ECHO)
    assert [status for status, _ in answers] == [200, 200]
    questions = (askpass_dir / "questions").read_text().splitlines()
    assert len(questions) == 1
    assert os.path.realpath(CURL or "") in questions[0]
    assert key_id_for(secret) in questions[0]
    assert secret not in questions[0]
    (askpass_dir / "mode").write_text("refuse")
    emulator.clear_requests()
    ((status, refused),) = curl(rules_agent, emulator, ECHO)
    assert status == 403
    assert refused["error"]["code"] == "denied"
    assert len((askpass_dir / "questions").read_text().splitlines()) == 2
    assert emulator.requests == []
    with rules_agent.client() as client:
        proxied = [
            (e["outcome"], e["status"], e["key_id"], e["user"])
            for e in client.log()
            if e["op"] == "proxy"
        ]
    # The refusal names the key whose rule refused, as the uses it allowed do.
    assert proxied == [("ok", 200, key_id_for(secret), USER)] * 2 + [
        ("denied", None, key_id_for(secret), USER)
    ]


def test_the_agent_socket_is_served_while_a_proxied_confirmation_waits(
    rules_agent: AgentProcess, emulator: Emulator, askpass_dir: Path
) -> None:
    """An unanswered confirmation holds up only its own request: it ends 403 denied after
    confirm_timeout, and run_ctl status is answered meanwhile."""
    secret = emulator.add_key(USER)
    with rules_agent.client() as client:
        client.add(emulator.host, USER, secret, confirm=True)
    (askpass_dir / "mode").write_text("hang")
    assert CURL is not None
    waiting = subprocess.Popen(
        [CURL, "-sS", "--unix-socket", http_path(rules_agent), "-w", r"\n%{http_code}",
         f"http://{emulator.host}{ECHO}"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        fifo = os.open(askpass_dir / "hanging", os.O_RDONLY)  # blocks until the script writes
        os.close(fifo)
        assert waiting.poll() is None
        assert run_ctl(rules_agent.socket_path, "status").code == 0
        out, _ = waiting.communicate(timeout=30)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    body, code = out.rsplit("\n", 1)
    assert code == "403"
    assert json.loads(body)["error"]["code"] == "denied"


def test_a_session_logged_in_with_rules_keeps_them_on_the_http_socket(
    rules_agent: AgentProcess, emulator: Emulator, askpass_dir: Path, tmp_path: Path
) -> None:
    """keyagent-ctl login --allow-exe COPY --confirm: curl itself is denied (403, never sent);
    the copy is asked once for its connection and served with the session; status says
    so, and the audit log names the account (no key) of each try."""
    assert CURL is not None
    allowed = tmp_path / "allowed-curl"
    shutil.copy2(os.path.realpath(CURL), allowed)
    emulator.add_user(USER, PASSWORD)
    account = ("--host", emulator.host, "--user", USER)
    login = run_ctl(
        rules_agent.socket_path, *account, "login", "--password-stdin", "--confirm",
        "--allow-exe", str(allowed), stdin=PASSWORD,
    )  # fmt: skip
    assert login.code == 0, login.err
    status = run_ctl(rules_agent.socket_path, "status")
    assert f"session {USER}@{emulator.host}: logged in since " in status.out
    assert f"(confirm only {allowed})" in status.out

    emulator.clear_requests()
    ((code, refused),) = curl(rules_agent, emulator, ECHO)
    assert (code, refused["error"]["code"]) == (403, "denied")
    assert "the session of" in refused["error"]["message"]
    assert not (askpass_dir / "questions").exists()
    assert emulator.requests == []

    answers = curl(rules_agent, emulator, ECHO, ECHO, program=str(allowed))
    assert [code for code, _ in answers] == [200, 200]
    assert answers[0][1]["headers"]["cookie"]["auth"] == "cookie"
    (question,) = (askpass_dir / "questions").read_text().splitlines()
    assert str(allowed) in question
    assert f"the session of {USER} on {emulator.host}" in question
    with rules_agent.client() as client:
        proxied = [
            (e["outcome"], e["status"], e["key_id"], e["user"])
            for e in client.log()
            if e["op"] == "proxy"
        ]
    assert proxied == [("denied", None, None, USER)] + [("ok", 200, None, USER)] * 2
