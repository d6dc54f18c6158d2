"""The serving process: a lean interpreter, handed its settings and socket by the daemon."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from keyagent.testing.agent import AgentProcess

from .conftest import AgentFactory

ROOT = Path(__file__).resolve().parent.parent

# Start-up, convenience and on-demand modules that must not stay resident in an idle agent:
# each costs from 0.3 to 15 MiB (docs/performance.md).
NOT_RESIDENT = {
    "site", "argparse", "tomllib", "platformdirs", "keyagent.config", "keyagent.daemon",
    "typing", "dataclasses", "inspect", "logging", "traceback", "datetime", "hashlib",
    "_hashlib", "hmac", "requests", "keyring", "keyagent.conduce", "keyagent.client",
    "json", "re", "enum", "socket", "signal", "selectors",
}  # fmt: skip


def test_core_imports_only_what_serving_needs() -> None:
    """Importing keyagent.core in an isolated interpreter loads none of the heavy modules."""
    probe = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); import keyagent.core; "
        "print('\\n'.join(sorted(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True, check=True
    )
    loaded = set(result.stdout.split())
    assert "keyagent.server" in loaded
    assert loaded & NOT_RESIDENT == set()


def test_agent_serves_from_an_isolated_interpreter(agent_factory: AgentFactory) -> None:
    """The daemon replaces itself (same pid) with `python -I -S .../_serve.py`, which has not
    loaded OpenSSL and has closed the hand-off memfd."""
    agent: AgentProcess = agent_factory(debug=False)
    with agent.client() as client:
        assert client.call("status")["pid"] == agent.pid
    argv = Path(f"/proc/{agent.pid}/cmdline").read_bytes().split(b"\0")
    assert argv[1:3] == [b"-I", b"-S"]
    assert argv[3].endswith(b"/keyagent/_serve.py")
    mapped = Path(f"/proc/{agent.pid}/maps").read_text()
    assert "libcrypto" not in mapped
    assert "libssl" not in mapped
    descriptors = [os.readlink(fd) for fd in Path(f"/proc/{agent.pid}/fd").iterdir()]
    assert not [target for target in descriptors if "keyagent-handoff" in target]


def test_malformed_json_is_an_error_in_a_lean_interpreter() -> None:
    """Without the json package loaded, malformed JSON still gives the protocol's errors
    (Python 3.11's _json needs json.decoder for them and does not import it)."""
    probe = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "from keyagent import protocol, wire\n"
        "assert 'json.decoder' not in sys.modules\n"
        "try:\n"
        "    protocol.parse_request(b'{')\n"
        "except protocol.InvalidRequest as error:\n"
        "    print(error.error.code)\n"
        "try:\n"
        "    wire.parse_reply(b'{\"ok\": true,}')\n"
        "except ValueError:\n"
        "    print('ValueError')\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["bad_request", "ValueError"]
