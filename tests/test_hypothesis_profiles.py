"""The Hypothesis profiles tests/conftest.py loads: CI never depends on an earlier run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import hypothesis_profile

ROOT = Path(__file__).resolve().parents[1]
# What the loaded profile says, from a fresh interpreter that imports conftest as pytest does.
PROBE = (
    "import tests.conftest\n"
    "from hypothesis import settings\n"
    "d = settings.default\n"
    "print(d.derandomize, d.database is None)\n"
)


def loaded_profile(**variables: str) -> str:
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("CI", "HYPOTHESIS_PROFILE")
    }
    env.update(variables)
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.strip()


def test_under_ci_examples_come_from_a_fixed_seed_and_no_database() -> None:
    """With CI=true, Hypothesis runs derandomized and reads or writes no example database."""
    assert loaded_profile(CI="true") == "True True"


def test_outside_ci_the_search_is_random_and_remembers_failures() -> None:
    """Without CI, the dev profile searches at random and keeps failures in .hypothesis/."""
    assert loaded_profile() == "False False"


@pytest.mark.parametrize(
    ("environ", "profile"),
    [
        ({}, "dev"),
        ({"CI": "true"}, "ci"),
        ({"CI": "1"}, "ci"),
        ({"CI": "false"}, "dev"),
        ({"CI": ""}, "dev"),
        ({"CI": "true", "HYPOTHESIS_PROFILE": "dev"}, "dev"),
        ({"HYPOTHESIS_PROFILE": "ci"}, "ci"),
    ],
)
def test_the_profile_follows_ci_unless_named(environ: dict[str, str], profile: str) -> None:
    """CI=true (any value but empty, 0, false, no) picks ci; HYPOTHESIS_PROFILE beats both."""
    assert hypothesis_profile(environ) == profile


def test_the_example_database_is_ignored_by_git() -> None:
    """.hypothesis/ (the dev profile's database) is in .gitignore: it is never committed."""
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert ".hypothesis/" in ignored
