"""An in-memory ``keyring`` backend with fault switches, for tests of keyring persistence.

Pass an instance to :class:`keyagent.persist.KeyringStore`. keyring never picks it on its own:
its priority is below every real backend and it declares itself not viable, so keyring's
backend discovery never even instantiates it. Selecting it explicitly still works
(``PYTHON_KEYRING_BACKEND=keyagent.testing.memory_keyring.MemoryKeyring``), with one
empty store per instance.

Fault switches, checked on every call (get, set, delete), in this order:

``block``
    An unset :class:`threading.Event` makes calls wait until it is set, like a keyring stuck
    on an unlock prompt; ``waiting`` is set as soon as a call starts waiting.
``fail_with``
    An exception to raise, e.g. a third-party backend's D-Bus error.
``locked``
    True raises ``keyring.errors.KeyringLocked``, as a locked Secret Service does.

``calls`` records ``(operation, service, username)`` of every call, passwords never.
"""

from __future__ import annotations

import threading

from keyring.backend import KeyringBackend
from keyring.errors import KeyringLocked, PasswordDeleteError

__all__ = ["MemoryKeyring"]


class MemoryKeyring(KeyringBackend):
    """A thread-safe keyring backend that keeps entries in a dict."""

    priority: float = -10.0
    """Below keyring's null (-1) and fail (0) backends: never preferred."""
    viable = False
    """Keeps keyring's backend discovery from instantiating it."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._mutex = threading.Lock()
        self._entries: dict[tuple[str, str], str] = {}
        self.locked = False
        self.fail_with: BaseException | None = None
        self.block: threading.Event | None = None
        self.waiting = threading.Event()
        self.calls: list[tuple[str, str, str]] = []

    def _enter(self, operation: str, service: str, username: str) -> None:
        with self._mutex:
            self.calls.append((operation, service, username))
        block = self.block
        if block is not None and not block.is_set():
            self.waiting.set()
            block.wait()
        if self.fail_with is not None:
            raise self.fail_with
        if self.locked:
            raise KeyringLocked("the in-memory keyring is locked")

    def get_password(self, service: str, username: str) -> str | None:
        self._enter("get", service, username)
        with self._mutex:
            return self._entries.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self._enter("set", service, username)
        with self._mutex:
            self._entries[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        self._enter("delete", service, username)
        with self._mutex:
            if self._entries.pop((service, username), None) is None:
                raise PasswordDeleteError("no such password in the in-memory keyring")

    def entries(self, service: str | None = None) -> dict[tuple[str, str], str]:
        """A snapshot of the stored entries (of one service, if given), bypassing the faults."""
        with self._mutex:
            return {
                (entry_service, username): password
                for (entry_service, username), password in self._entries.items()
                if service is None or entry_service == service
            }

    def put(self, service: str, username: str, password: str) -> None:
        """Store an entry directly, bypassing the faults and ``calls`` (to seed a test)."""
        with self._mutex:
            self._entries[(service, username)] = password
