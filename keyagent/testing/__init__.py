"""Test helpers for keyagent and for projects that use it.

:class:`~keyagent.testing.emulator.ConduceEmulator` is a loopback HTTPS fake of the Conduce
service; ``python -m keyagent.testing serve`` runs one from the command line.

Importing this package is cheap and has no third-party dependency: the names below load
their module on first use (PEP 562), and ``trustme`` is only imported when an emulator starts.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from keyagent.testing.emulator import ConduceEmulator, Fault, RequestRecord

__all__ = ["ConduceEmulator", "Fault", "RequestRecord"]

_LAZY = {
    "ConduceEmulator": "keyagent.testing.emulator",
    "Fault": "keyagent.testing.emulator",
    "RequestRecord": "keyagent.testing.emulator",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'keyagent.testing' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
