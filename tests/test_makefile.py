"""The Makefile's virtual environment: rebuilt when the interpreter it was made by changes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# How the Makefile names an interpreter: its version and where it is installed.
IDENTITY = 'import sys; print("%d.%d" % sys.version_info[:2], sys.base_prefix)'

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _make_venv(python: str, venv: Path) -> None:
    """A venv made by ``python``, with the Makefile's stamp saying it is installed."""
    subprocess.run([python, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    stamp = venv / ".installed"
    stamp.touch()
    # Newer than pyproject.toml: only the interpreter can make it stale.
    later = (ROOT / "pyproject.toml").stat().st_mtime + 10
    os.utime(stamp, (later, later))


def _planned(venv: Path, python: str) -> str:
    """What ``make test`` would do (``make -n``: nothing is run)."""
    result = subprocess.run(
        ["make", "-n", "-C", str(ROOT), f"VENV={venv}", f"PYTHON={python}", "test"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _identity(python: str) -> str:
    return subprocess.run(
        [python, "-c", IDENTITY], capture_output=True, text=True, timeout=30, check=True
    ).stdout


def _other_python() -> str | None:
    """A CPython 3.11+ other than the one running the tests (on PATH, or pyenv's)."""
    mine = _identity(sys.executable)
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    candidates = [shutil.which(f"python3.{minor}") for minor in range(11, 20)]
    candidates += map(str, sorted(pyenv.glob("versions/3.1[1-9]*/bin/python3")))
    for found in candidates:
        if found is None:
            continue
        try:
            if _identity(found) != mine:
                return found
        except (subprocess.CalledProcessError, OSError):
            continue  # a pyenv shim for a version that is not active
    return None


@needs_make
def test_venv_of_the_same_python_is_reused(tmp_path: Path) -> None:
    """A venv made by the same interpreter is used as it is: no rebuild, straight to nox."""
    venv = tmp_path / "venv"
    _make_venv(sys.executable, venv)
    plan = _planned(venv, sys.executable)
    assert " -m venv" not in plan
    assert f"{venv}/bin/nox -s tests" in plan


@needs_make
def test_venv_of_another_python_is_rebuilt(tmp_path: Path) -> None:
    """A venv made by another interpreter is cleared and rebuilt, with a message saying why."""
    other = _other_python()
    if other is None:
        pytest.skip("no second CPython version on PATH")
    venv = tmp_path / "venv"
    _make_venv(other, venv)
    plan = _planned(venv, sys.executable)
    assert f"{sys.executable} -m venv --clear {venv}" in plan
    assert "was made by Python 3." in plan
    assert "rebuilding it with" in plan


@needs_make
def test_venv_whose_python_is_gone_is_rebuilt(tmp_path: Path) -> None:
    """A venv whose interpreter no longer runs (removed by an upgrade) is rebuilt, not used."""
    venv = tmp_path / "venv"
    _make_venv(sys.executable, venv)
    for name in ("python", "python3"):
        (venv / "bin" / name).unlink()
        (venv / "bin" / name).symlink_to(tmp_path / "removed-python")
    plan = _planned(venv, sys.executable)
    assert f"-m venv --clear {venv}" in plan
    assert "a Python that no longer runs" in plan
