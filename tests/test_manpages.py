"""keyagent(1) and keyagent-ctl(1): rendered from the parsers when the wheel is built, and
installed where `man` finds them next to the installation's bin directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from keyagent import __version__, cli

ROOT = Path(__file__).resolve().parent.parent
MAN1 = f"keyagent-{__version__}.data/data/share/man/man1"
BUILD_TIMEOUT = 300  # the build installs setuptools and argparse-manpage in an isolated env

pytestmark = pytest.mark.timeout(BUILD_TIMEOUT * 2)


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT, env=env, check=False
    )
    assert result.returncode == 0, f"{argv}: {result.stderr}"
    return result


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the pip it comes with, as a user's `python -m venv` has."""
    path = tmp_path_factory.mktemp("venv")
    run(sys.executable, "-m", "venv", str(path))
    return path


@pytest.fixture(scope="module")
def wheel(venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built by that venv's pip from a copy of the source (the tree stays clean)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy(ROOT / name, source)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "keyagent", source / "keyagent", ignore=ignore)
    shutil.copytree(ROOT / "man", source / "man")  # the pages' extra sections
    shutil.copytree(ROOT / "contrib" / "bin", source / "contrib" / "bin")
    out = tmp_path_factory.mktemp("wheel")
    run(str(venv / "bin" / "pip"), "wheel", "--quiet", "--no-deps", "-w", str(out), str(source))
    (built,) = out.glob("keyagent-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(venv: Path, wheel: Path) -> Path:
    """The venv with the wheel installed (no dependencies: only the files matter here)."""
    run(str(venv / "bin" / "pip"), "install", "--quiet", "--no-deps", str(wheel))
    return venv


def man(*argv: str, path: str | None = None) -> str:
    if shutil.which("man") is None:
        pytest.skip("man is not installed (apt-get install man-db)")
    env = {"PATH": path or os.environ["PATH"], "MANWIDTH": "100", "MANPAGER": "cat", "LANG": "C"}
    return run("man", *argv, env=env).stdout


def test_the_wheel_holds_both_manual_pages(wheel: Path) -> None:
    """The built wheel carries keyagent.1 and keyagent-ctl.1 as data for share/man/man1."""
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"{MAN1}/keyagent.1", f"{MAN1}/keyagent-ctl.1"} <= names


def test_man_finds_the_pages_of_an_installation_on_path(installed: Path) -> None:
    """man finds both pages in <venv>/share/man, by -M and from <venv>/bin on PATH alone."""
    pages = installed / "share" / "man"
    for program in ("keyagent", "keyagent-ctl"):
        expected = str(pages / "man1" / f"{program}.1")
        assert man("-M", str(pages), "-w", program).strip() == expected
        on_path = f"{installed / 'bin'}:/usr/bin:/bin"
        assert man("-w", program, path=on_path).strip() == expected


def groff_warnings(page: Path) -> str:
    """What groff warns of while it renders ``page`` (skips the test without groff)."""
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed (apt-get install groff-base)")
    return subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(page)],
        capture_output=True, text=True, timeout=30, check=True,
    ).stderr  # fmt: skip


def test_keyagent_ctl_page_documents_every_command_option_and_exit_status(
    installed: Path,
) -> None:
    """keyagent-ctl(1) renders cleanly and names each command, each option and each exit status."""
    page = installed / "share" / "man" / "man1" / "keyagent-ctl.1"
    assert groff_warnings(page) == ""
    text = man("-l", str(page))
    assert "keyagent-ctl - talk to a running keyagent" in text
    assert f"keyagent {__version__}" in text
    for command in ("status", "get", "lock", "exec", "completion", "remove"):
        assert f"keyagent-ctl {command}" in text, command
    for option in ("--socket PATH", "--version", "--key-id", "--description TEXT, -C TEXT"):
        assert option in text, option
    flat = " ".join(text.split())
    for code, meaning in cli.EXIT_STATUSES:
        assert f"{code} {meaning}" in flat, code


def test_keyagent_page_documents_the_daemon(installed: Path) -> None:
    """keyagent(1) names the daemon's flags and how to start it, and has the sections a
    daemon's page is read for: its environment, files and exit status."""
    page = installed / "share" / "man" / "man1" / "keyagent.1"
    assert groff_warnings(page) == ""
    text = man("-l", str(page))
    sections = [line for line in text.splitlines() if line[:1].isalpha() and line.isupper()]
    for section in ("ENVIRONMENT", "FILES", "EXIT STATUS", "SEE ALSO"):
        assert section in sections, section
    for name in ("XDG_RUNTIME_DIR", "KEYAGENT_PID", "KEYAGENT_ASKPASS", "leftovers-*.json"):
        assert name in text, name
    assert "keyagent - a credential agent for the Conduce REST API" in text
    for option in ("-D", "-a PATH", "--lifetime", "--no-keyring", "--ca-bundle FILE"):
        assert option in text, option
    assert 'eval "$(keyagent)"' in text
