"""The remote-account contract, run against the in-memory fake and the real adapter.

tests/fakes.py's FakeAccount stands in for Conduce in the agent's unit tests; ConduceAccount
talks to the HTTPS emulator. Both pass the same suite (keyagent.testing.account_contract),
so the fake cannot drift from what the agent meets for real.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyagent.testing.account_contract import (
    AccountUnderTest,
    RemoteAccountContract,
    emulated_account,
)
from keyagent.testing.emulator import ConduceEmulator

from .fakes import FakeAccount

_provisioned = itertools.count()


class TestFakeAccount(RemoteAccountContract):
    """tests/fakes.py's FakeAccount, the stand-in of the agent's unit tests."""

    @pytest.fixture
    def subject(self) -> Iterator[AccountUnderTest]:
        fake = FakeAccount(password="fake password 21b0")

        def provision_key() -> str:
            key = f"provisioned-{next(_provisioned):04d}-key"
            fake.keys.append(key)
            return key

        def expire_sessions() -> None:
            fake.session_alive = False

        yield AccountUnderTest(fake, fake.password, provision_key, expire_sessions)
        fake.close()


@pytest.fixture(scope="module")
def emulator() -> Iterator[ConduceEmulator]:
    """One emulator for the module: each test has a user of its own."""
    with ConduceEmulator() as emu:
        yield emu


class TestConduceAccount(RemoteAccountContract):
    """keyagent.conduce.ConduceAccount over real TLS to the Conduce emulator."""

    @pytest.fixture
    def subject(
        self, emulator: ConduceEmulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> Iterator[AccountUnderTest]:
        for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
        with emulated_account(emulator) as subject:
            yield subject


def test_the_contract_is_shipped_in_keyagent_testing_and_loads_pytest_only_when_used() -> None:
    """keyagent.testing names the contract, but importing the package does not load pytest."""
    probe = (
        "import sys, keyagent.testing as kit\n"
        "before = 'pytest' in sys.modules\n"
        "contract = kit.RemoteAccountContract\n"
        "print(before, contract.__module__, 'pytest' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.split() == ["False", "keyagent.testing.account_contract", "True"]
