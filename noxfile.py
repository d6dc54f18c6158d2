"""The test suite on every supported CPython, each in its own virtual environment.

``make test`` runs ``nox -s tests`` (all of them, one after the other); ``make test
PYTHONS=3.12`` or ``nox -s tests-3.12`` runs one. Locally an interpreter that is missing is
skipped with a warning; under CI (``CI`` set) nox fails instead, so CI cannot pass having
tested fewer versions than this file names.

Interpreters are looked up on PATH as ``python3.X``. pyenv's installations are put first on
PATH here, so they are found without ``pyenv global`` or ``pyenv shell`` listing them (a
pyenv shim for a version that is not active fails instead of running it).
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

# Every CPython from the oldest supported (requires-python) to the newest this machine image
# provides; the README's "Tested on" line names the same list.
PYTHONS = ["3.11", "3.12", "3.13"]

nox.options.sessions = ["tests"]
# Never fetch an interpreter from outside: a version that is not installed is reported (an
# error under CI), not silently replaced by a downloaded build.
nox.options.download_python = "never"


def _version(directory: Path) -> tuple[int, ...]:
    """(3, 12, 1) for .../versions/3.12.1/bin; () for anything that is not a plain CPython."""
    name = directory.parent.name
    parts = name.split(".")
    return tuple(int(part) for part in parts) if all(p.isdigit() for p in parts) else ()


def _pyenv_first_on_path() -> None:
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    found = [bin_dir for bin_dir in root.glob("versions/*/bin") if _version(bin_dir)]
    wanted = {tuple(int(part) for part in version.split(".")) for version in PYTHONS}
    # The newest patch release of each wanted minor version comes first.
    chosen: dict[tuple[int, ...], Path] = {}
    for bin_dir in sorted(found, key=_version):
        if _version(bin_dir)[:2] in wanted:
            chosen[_version(bin_dir)[:2]] = bin_dir
    if chosen:
        path = os.environ.get("PATH", "")
        os.environ["PATH"] = os.pathsep.join([*map(str, chosen.values()), path])


_pyenv_first_on_path()


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The whole pytest suite; arguments after ``--`` go to pytest."""
    session.install("--quiet", "--upgrade", "pip")
    session.install("--quiet", "-e", ".[test]")
    session.run("python", "--version")
    session.run("pytest", *session.posargs)
