"""``python -m keyagent.testing serve`` as a user meets it: without the testing extra, and
in the background for a shell's ``eval``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyagent.testing.__main__ import INSTALL_HINT
from keyagent.testing.agent import wait_for_exit

# Runs ``python -m keyagent.testing ARGS`` in a Python where ``import trustme`` fails, as it
# does after a plain ``pip install .``; cheaper than a throwaway venv, and the same failure.
WITHOUT_TRUSTME = """
import runpy, sys

class NoTrustme:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "trustme":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoTrustme())
sys.modules.pop("trustme", None)
sys.argv = ["keyagent.testing", *sys.argv[1:]]
runpy.run_module("keyagent.testing", run_name="__main__", alter_sys=True)
"""

# The README's "Trying it without a Conduce account" steps, as written there.
README_STEPS = """
eval "$(python -m keyagent.testing serve --background)"
eval "$(keyagent --ca-bundle "$CONDUCE_CA_BUNDLE")"
printf '%s\\n' demo-password | keyagent-ctl login --host "$CONDUCE_HOST" --user "$CONDUCE_USER" --password-stdin
keyagent-ctl create --host "$CONDUCE_HOST" --user "$CONDUCE_USER" --description demo
"""  # noqa: E501


def _environment(tmp_path: Path) -> dict[str, str]:
    """This interpreter's venv first on PATH (python, keyagent, keyagent-ctl), a private
    runtime directory for the agent's default socket, and no proxy for loopback traffic."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.lower().endswith("_proxy") and not name.startswith(("KEYAGENT_", "CONDUCE_"))
    }
    bin_dir = str(Path(sys.executable).parent)
    environment.update(
        PATH=f"{bin_dir}{os.pathsep}{environment.get('PATH', '/usr/bin:/bin')}",
        XDG_RUNTIME_DIR=str(runtime),
        KEYAGENT_CONFIG="/dev/null",
    )
    return environment


@pytest.fixture
def leftovers(tmp_path: Path) -> Iterator[Path]:
    """A file where a shell script writes the pids it started; they are stopped afterwards."""
    pids = tmp_path / "pids"
    yield pids
    for line in pids.read_text().split() if pids.exists() else []:
        try:
            os.kill(int(line), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            continue
        wait_for_exit(int(line), 10.0)


@pytest.mark.parametrize("extra", [[], ["--background"]])
def test_serve_without_trustme_says_what_to_install(extra: list[str]) -> None:
    """Without trustme, serve prints one line naming the extra to install and exits 69."""
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TRUSTME, "serve", *extra],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 69
    assert result.stdout == ""  # nothing for an eval to run
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert INSTALL_HINT in result.stderr
    assert "trustme" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_help_names_the_extra() -> None:
    """``serve --help`` names the extra the emulator needs, and works without it."""
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TRUSTME, "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "keyagent[testing]" in result.stdout
    assert "not the PyPI project" in result.stdout
    assert "--background" in result.stdout


def test_readme_steps_work_in_one_shell(tmp_path: Path, leftovers: Path) -> None:
    """The README's eval of ``serve --background`` exports what its next commands use: an
    agent logs in to the emulator and creates a key; ``kill $CONDUCE_EMULATOR_PID`` stops it."""
    script = f"""
set -eu
{README_STEPS.strip().splitlines()[0]}
echo "$CONDUCE_EMULATOR_PID" >> {leftovers}
{README_STEPS.strip().splitlines()[1]}
echo "$KEYAGENT_PID" >> {leftovers}
{chr(10).join(README_STEPS.strip().splitlines()[2:])}
echo "emulator-pid=$CONDUCE_EMULATOR_PID"
echo "emulator-dir=$(dirname "$CONDUCE_EMULATOR_CONTROL")"
keyagent-ctl list --json
kill "$CONDUCE_EMULATOR_PID"
eval "$(keyagent -k)"
"""
    result = subprocess.run(
        ["sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=_environment(tmp_path),
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    values = dict(line.partition("=")[::2] for line in result.stdout.splitlines() if "=" in line)
    pid = int(values["emulator-pid"])
    assert '"host": "127.0.0.1:' in result.stdout  # the key created on the emulator is held
    assert "demo-password" in result.stderr  # serve told the user how to log in
    assert 'kill "$CONDUCE_EMULATOR_PID"' in result.stderr  # ... and how to stop it
    assert wait_for_exit(pid, 10.0), "the background emulator outlived its kill"
    # SIGTERM let it remove its directory: the CA and the control token are gone with it.
    assert not Path(values["emulator-dir"]).exists()


def test_background_prints_nothing_to_eval_when_the_emulator_fails(tmp_path: Path) -> None:
    """A background emulator that cannot start (its port is taken) leaves stdout empty,
    explains itself in one line on stderr, and exits non-zero."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "keyagent.testing", "serve", "--background",
             "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env=_environment(tmp_path),
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert f"the emulator did not start: port {port} is taken" in result.stderr
    assert "--port" in result.stderr  # the next step


def test_background_emulator_detaches_from_the_callers_output(
    tmp_path: Path, leftovers: Path
) -> None:
    """``serve --background`` returns while the emulator serves on, holding neither the
    caller's stdout nor its stderr (so ``$(...)`` ends), in a session of its own."""
    result = subprocess.run(
        [sys.executable, "-m", "keyagent.testing", "serve", "--background"],
        capture_output=True,  # run() reads both pipes to their end: held ones would hang it
        text=True,
        timeout=30,
        check=False,
        env=_environment(tmp_path),
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    exports = dict(line.split(";")[0].partition("=")[::2] for line in result.stdout.splitlines())
    pid = int(exports["CONDUCE_EMULATOR_PID"])
    leftovers.write_text(f"{pid}\n")
    assert set(exports) == {
        "CONDUCE_HOST", "CONDUCE_CA_BUNDLE", "CONDUCE_USER", "CONDUCE_EMULATOR_CONTROL",
        "CONDUCE_EMULATOR_TOKEN_FILE", "CONDUCE_EMULATOR_PID",
    }  # fmt: skip
    assert os.getsid(pid) == pid
    with socket.create_connection(("127.0.0.1", int(exports["CONDUCE_HOST"].rpartition(":")[2]))):
        pass  # it serves
    os.kill(pid, signal.SIGTERM)
    assert wait_for_exit(pid, 10.0)
