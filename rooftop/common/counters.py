"""Counters: a component's event counts, bumped from any thread, read as one snapshot.

Each component names its counters once, as the fields of a frozen stats dataclass
(``SpoolStats``, ``StreamStats`` …) whose every field has a default. ``Counters``
holds the counts; ``add(dropped_full=1)`` bumps them under a lock, and ``get()`` is a
consistent, immutable snapshot, made once after each change and handed out until the
next (copying the dataclass on every ``add`` was most of a bump, on paths that bump
per datagram or per request). A misspelt counter fails at once (``AttributeError``)
instead of counting nowhere. Stdlib only: the in-engine hooks use it too.
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

    __slots__ = ("_lock", "_type", "_values", "_snapshot")

    def __init__(self, stats_type: type[S]) -> None:
        self._lock = threading.Lock()
        self._type = stats_type
        self._snapshot: S | None = stats_type()
        self._values: dict[str, Any] = dataclasses.asdict(self._snapshot)

    def add(self, **increments: int) -> None:
        """Add to the named counters (``add(sent=1, acked=3)``).

        Raises:
            AttributeError: a name that is not a field of the stats type (nothing counted).
        """
        with self._lock:
            values = self._values
            if not values.keys() >= increments.keys():
                unknown = sorted(increments.keys() - values.keys())
                raise AttributeError(f"{self._type.__name__} has no counter {', '.join(unknown)}")
            for name, n in increments.items():
                values[name] += n
            self._snapshot = None

    def set(self, **values: Any) -> None:
        """Set fields outright: a gauge or the last error among the counts.

        Raises:
            TypeError: a name that is not a field of the stats type (nothing set).
        """
        with self._lock:
            if not self._values.keys() >= values.keys():
                unknown = sorted(values.keys() - self._values.keys())
                raise TypeError(f"{self._type.__name__} has no field {', '.join(unknown)}")
            self._values.update(values)
            self._snapshot = None

    def get(self) -> S:
        """The current snapshot (immutable: later counts never change it)."""
        snapshot = self._snapshot
        if snapshot is None:
            with self._lock:
                snapshot = self._snapshot
                if snapshot is None:
                    snapshot = self._snapshot = self._type(**self._values)
        return snapshot
