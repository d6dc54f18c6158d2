"""The serving process: a lean interpreter, handed its settings and socket by the daemon."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

from keyagent.client import Client
from keyagent.testing.agent import AgentProcess, read_line, wait_for_exit

from .conftest import AgentFactory

ROOT = Path(__file__).resolve().parent.parent

# Start-up, convenience and on-demand modules that must not stay resident in an idle agent:
# each costs from 0.3 to 15 MiB (docs/performance.md). hashlib (OpenSSL's libcrypto) loads
# with the first key or lock, keyring and requests with the first request that needs them.
NOT_RESIDENT = {
    "site", "argparse", "tomllib", "platformdirs", "keyagent.config", "keyagent.daemon",
    "typing", "dataclasses", "inspect", "logging", "traceback", "datetime", "hashlib",
    "_hashlib", "hmac", "requests", "keyring", "keyagent.conduce", "keyagent.client",
}  # fmt: skip
# The public standard modules serving is written against (they bring re and enum along).
SERVING = {"json", "socket", "signal", "select", "collections", "keyagent.server"}


def test_core_imports_only_what_serving_needs() -> None:
    """Importing keyagent.core in an isolated interpreter loads the modules serving uses and
    none of the heavy ones."""
    probe = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); import keyagent.core; "
        "print('\\n'.join(sorted(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True, check=True
    )
    loaded = set(result.stdout.split())
    assert SERVING - loaded == set()
    assert loaded & NOT_RESIDENT == set()


def test_no_module_imports_a_private_standard_module() -> None:
    """No keyagent module imports a private CPython module such as _socket or _json: their
    names and contents change between Python releases (_sha256 became _sha2 in 3.12)."""
    private = []
    for path in sorted((ROOT / "keyagent").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            private += [
                f"{path.relative_to(ROOT)}: {name}"
                for name in names
                if name.startswith("_") and name != "__future__"
            ]
    assert private == []


def test_agent_serves_from_an_isolated_interpreter(agent_factory: AgentFactory) -> None:
    """The daemon replaces itself (same pid, still named keyagent) with
    `python -I -S .../_serve.py`, which has not loaded OpenSSL and has closed the hand-off
    memfd."""
    agent: AgentProcess = agent_factory(debug=False)
    with agent.client() as client:
        assert client.call("status")["pid"] == agent.pid
    argv = Path(f"/proc/{agent.pid}/cmdline").read_bytes().split(b"\0")
    assert argv[1:3] == [b"-I", b"-S"]
    assert argv[3].endswith(b"/keyagent/_serve.py")
    assert Path(f"/proc/{agent.pid}/comm").read_text() == "keyagent\n"  # for pgrep, top
    mapped = Path(f"/proc/{agent.pid}/maps").read_text()
    assert "libcrypto" not in mapped
    assert "libssl" not in mapped
    descriptors = [os.readlink(fd) for fd in Path(f"/proc/{agent.pid}/fd").iterdir()]
    assert not [target for target in descriptors if "keyagent-handoff" in target]


def _start_foreground(argv: list[bytes | str], cwd: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("KEYAGENT_SOCK", None)
    return subprocess.Popen(
        [sys.executable, "-m", "keyagent.daemon", "-D", "--config", "/dev/null", *argv],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def test_current_directory_cannot_shadow_the_standard_library(tmp_path: Path) -> None:
    """A module in the directory the agent was started from, named like a standard module
    the serving process imports later (syslog, in the background), is not what it loads."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    marker = tmp_path / "shadowed"
    (workdir / "syslog.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    sock = str(run / "agent.sock")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = subprocess.run(
        [sys.executable, "-m", "keyagent.daemon", "-s", "--config", "/dev/null", "-a", sock],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    pid = int(started.stdout.split("KEYAGENT_PID=")[1].split(";")[0])
    try:
        with Client(sock) as client:
            assert client.call("status")["pid"] == pid
    finally:
        os.kill(pid, signal.SIGTERM)
        assert wait_for_exit(pid, 10)
    assert not marker.exists()


def test_undecodable_socket_path_is_announced_byte_for_byte(tmp_path: Path) -> None:
    """A socket path that is not valid UTF-8 reaches the shell lines with its own bytes."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    path = os.fsencode(run) + b"/agent-\xff.sock"
    with _start_foreground([b"-a", path], tmp_path) as process:
        try:
            assert process.stdout is not None
            line = read_line(process.stdout.fileno(), 20)
        finally:
            process.terminate()
    assert line.startswith(b"KEYAGENT_SOCK=")
    assert b"/agent-\xff.sock" in line


def test_standard_descriptors_stay_inheritable(agent_factory: AgentFactory) -> None:
    """The serving process leaves descriptors 0-2 open across exec, for helpers it starts."""
    agent = agent_factory(debug=False)
    for fd in (0, 1, 2):
        info = Path(f"/proc/{agent.pid}/fdinfo/{fd}").read_text()
        flags = int(
            next(line for line in info.splitlines() if line.startswith("flags:")).split()[1], 8
        )
        assert not flags & os.O_CLOEXEC, fd
