"""The CA bundle is read once, at start: replacing the file later trusts no new CA."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from keyagent.conduce import ConduceAccount, HttpSettings
from keyagent.errors import TLSError
from keyagent.testing.emulator import ConduceEmulator
from keyagent.testing.emulator_process import Emulator, EmulatorProcess

from .conftest import AgentFactory, CtlResult, run_ctl

USER = "alice@example.com"
PASSWORD = "pa55-w0rd-that-must-never-leak"


@pytest.fixture
def first() -> Iterator[Emulator]:
    """The emulator whose CA the agent is started with."""
    with EmulatorProcess(USER, PASSWORD) as emu:
        yield emu


@pytest.fixture
def second() -> Iterator[Emulator]:
    """Another emulator, with a CA of its own (another trustme CA)."""
    with EmulatorProcess(USER, PASSWORD) as emu:
        yield emu


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """Where the bundle the agent is given lives: a private directory of the test's."""
    directory = tmp_path / "certs"
    directory.mkdir(mode=0o700)
    return directory / "ca.pem"


def login(socket_path: str, emu: Emulator) -> CtlResult:
    return run_ctl(
        socket_path, "--host", emu.host, "--user", USER, "login", "--password-stdin",
        stdin=PASSWORD + "\n",
    )  # fmt: skip


def test_the_agent_keeps_the_bundle_it_started_with(
    agent_factory: AgentFactory, first: Emulator, second: Emulator, bundle: Path
) -> None:
    """After the bundle file is overwritten with another CA, before any Conduce call, the
    running agent still refuses that CA's server and still trusts the first one."""
    shutil.copyfile(first.ca_path, bundle)
    agent = agent_factory("--ca-bundle", str(bundle), "--connect-timeout", "5")
    shutil.copyfile(second.ca_path, bundle)  # same path, same inode: new contents

    refused = login(agent.socket_path, second)
    assert refused.code == 1
    assert "[tls_error]" in refused.err
    assert second.session_count(USER) == 0

    trusted = login(agent.socket_path, first)
    assert trusted.code == 0, trusted.err
    assert first.session_count(USER) == 1


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"])
def test_a_bundle_named_by_the_environment_is_pinned_at_start_too(
    agent_factory: AgentFactory, first: Emulator, second: Emulator, bundle: Path, variable: str
) -> None:
    """REQUESTS_CA_BUNDLE (or CURL_CA_BUNDLE), which requests would re-read on every new
    connection, is read once at start like --ca-bundle: a later change trusts no new CA."""
    shutil.copyfile(first.ca_path, bundle)
    env = {**os.environ, variable: str(bundle)}
    env.pop("REQUESTS_CA_BUNDLE" if variable == "CURL_CA_BUNDLE" else "CURL_CA_BUNDLE", None)
    agent = agent_factory("--connect-timeout", "5", env=env)
    shutil.copyfile(second.ca_path, bundle)

    refused = login(agent.socket_path, second)
    assert refused.code == 1
    assert "[tls_error]" in refused.err
    trusted = login(agent.socket_path, first)
    assert trusted.code == 0, trusted.err


def test_a_replaced_bundle_file_is_not_read_again_by_the_same_process(
    bundle: Path, tmp_path: Path
) -> None:
    """HttpSettings for a bundle path made after the file changed still trust what the
    first read found, not the new contents (a restart is needed)."""
    with ConduceEmulator() as one, ConduceEmulator() as two:
        for emu in (one, two):
            emu.add_user(USER, PASSWORD)
        shutil.copyfile(one.ca_path, bundle)
        with ConduceAccount(one.host, USER, HttpSettings(verify=str(bundle))) as account:
            account.login(PASSWORD)
        replacement = tmp_path / "replacement.pem"
        shutil.copyfile(two.ca_path, replacement)
        replacement.replace(bundle)  # a new file (new inode) at the same path
        settings = HttpSettings(verify=str(bundle), retries=0)
        with (
            ConduceAccount(two.host, USER, settings) as other,
            pytest.raises(TLSError, match="could not be verified"),
        ):
            other.login(PASSWORD)
        with ConduceAccount(one.host, USER, HttpSettings(verify=str(bundle))) as again:
            again.login(PASSWORD)


def test_connections_through_a_proxy_use_the_loaded_bundle_too(bundle: Path) -> None:
    """With HTTPS_PROXY the tunnelled connection verifies against the same loaded context,
    and no CA path is handed to urllib3 (which would read it again on each connection)."""
    with ConduceEmulator() as emu:
        shutil.copyfile(emu.ca_path, bundle)
        settings = HttpSettings(verify=str(bundle))
        with ConduceAccount(emu.host, USER, settings) as account:
            adapter = account._session.get_adapter(f"https://{emu.host}/")
            assert isinstance(adapter, requests.adapters.HTTPAdapter)
            manager = adapter.proxy_manager_for("http://proxy.invalid:3128")
            assert manager.connection_pool_kw["ssl_context"] is settings.ssl_context
            direct = adapter.poolmanager.connection_pool_kw
            assert direct["ssl_context"] is settings.ssl_context
            assert "ca_certs" not in direct
