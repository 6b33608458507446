"""Counters: a component's event counts, bumped from any thread, read as one snapshot.

Each component names its counters once, as the fields of a frozen stats dataclass
(``SpoolStats``, ``StreamStats`` …) whose every field has a default. ``Counters``
holds the current snapshot; ``add(dropped_full=1)`` replaces it with a bumped copy
under a lock, so ``get()`` is a consistent, immutable view without one, and a
misspelt counter fails at once (``AttributeError``) instead of counting nowhere. Stdlib
only: the in-engine hooks use it too.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    S = TypeVar("S", bound=DataclassInstance)
else:
    S = TypeVar("S")

__all__ = ["Counters"]


class Counters(Generic[S]):
    """The counts of one component, as a frozen ``stats_type`` snapshot.

    Args:
        stats_type: a frozen dataclass whose fields all have defaults (0, None, "").
    """

    __slots__ = ("_lock", "_value")

    def __init__(self, stats_type: type[S]) -> None:
        self._lock = threading.Lock()
        self._value: S = stats_type()

    def add(self, **increments: int) -> None:
        """Add to the named counters (``add(sent=1, acked=3)``).

        Raises:
            AttributeError: a name that is not a field of the stats type.
        """
        with self._lock:
            value = self._value
            bumped = {name: getattr(value, name) + n for name, n in increments.items()}
            self._value = dataclasses.replace(value, **bumped)

    def set(self, **values: Any) -> None:
        """Set fields outright: a gauge or the last error among the counts."""
        with self._lock:
            self._value = dataclasses.replace(self._value, **values)

    def get(self) -> S:
        """The current snapshot (immutable: later counts never change it)."""
        return self._value
