"""Test helpers for keyagent and for projects that use it.

:class:`~keyagent.testing.emulator.ConduceEmulator` is a loopback HTTPS fake of the Conduce
service; ``python -m keyagent.testing serve`` runs one from the command line, and
:class:`~keyagent.testing.emulator_process.EmulatorProcess` runs that command and steers it
with the same methods as an in-process emulator. :class:`~keyagent.testing.agent.AgentProcess`
starts a real agent on a private socket; :class:`~keyagent.testing.memory_keyring.MemoryKeyring`
is an in-memory ``keyring`` backend with switches to make it locked, failing or blocking.
:class:`~keyagent.testing.account_contract.RemoteAccountContract` is the test suite any
stand-in for a Conduce account must pass (subclass it; it needs pytest).

Importing this package is cheap and has no third-party dependency: the names below load
their module on first use (PEP 562), and ``trustme`` is only imported when an emulator starts.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from keyagent.testing.account_contract import AccountUnderTest, RemoteAccountContract
    from keyagent.testing.agent import AgentProcess
    from keyagent.testing.emulator import ConduceEmulator, Fault, RequestRecord
    from keyagent.testing.emulator_process import Emulator, EmulatorProcess
    from keyagent.testing.memory_keyring import MemoryKeyring

__all__ = [
    "AccountUnderTest",
    "AgentProcess",
    "ConduceEmulator",
    "Emulator",
    "EmulatorProcess",
    "Fault",
    "MemoryKeyring",
    "RemoteAccountContract",
    "RequestRecord",
]

_LAZY = {
    "AccountUnderTest": "keyagent.testing.account_contract",
    "RemoteAccountContract": "keyagent.testing.account_contract",
    "AgentProcess": "keyagent.testing.agent",
    "MemoryKeyring": "keyagent.testing.memory_keyring",
    "ConduceEmulator": "keyagent.testing.emulator",
    "Emulator": "keyagent.testing.emulator_process",
    "EmulatorProcess": "keyagent.testing.emulator_process",
    "Fault": "keyagent.testing.emulator",
    "RequestRecord": "keyagent.testing.emulator",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'keyagent.testing' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
