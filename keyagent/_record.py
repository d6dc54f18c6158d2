"""Slotted value classes for the agent's long-running core, without :mod:`dataclasses`.

Importing ``dataclasses`` pulls in ``inspect`` and with it ``ast``, ``dis`` and
``tokenize``: about 1.6 MiB resident, for an agent that otherwise idles in about 11 MiB
(see docs/performance.md). The classes the agent keeps derive from :class:`Record` or
:class:`Frozen` instead and write their own ``__init__``; the bases give them field-wise
equality, a ``repr`` that leaves out the fields named in ``_hidden`` (secrets), and, for
:class:`Frozen`, no assignment once built. Fields are the subclass's ``__slots__``.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (0.7 MiB)
if TYPE_CHECKING:
    from typing import ClassVar

__all__ = ["Frozen", "Record", "set_field"]

set_field = object.__setattr__
"""Sets a field of a :class:`Frozen` from its ``__init__``."""


class Record:
    """Equality over every field, and a repr without the ``_hidden`` ones."""

    __slots__: ClassVar[tuple[str, ...]] = ()
    _hidden: ClassVar[frozenset[str]] = frozenset()

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def _asdict(self) -> dict[str, object]:
        """Every field by name, secrets included (as the constructor takes them)."""
        return {name: getattr(self, name) for name in self.__slots__}

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None  # type: ignore[assignment]  # mutable: like a dataclass with eq=True

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={getattr(self, name)!r}" for name in self.__slots__ if name not in self._hidden
        )
        return f"{type(self).__name__}({shown})"


class Frozen(Record):
    """A :class:`Record` whose fields are set once, in ``__init__`` (with :func:`set_field`)."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: cannot assign to '{name}'")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: cannot delete '{name}'")

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(self._values())
