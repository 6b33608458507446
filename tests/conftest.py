"""Shared fixtures: clean environment, paths to the real H100 recordings."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from rooftop.agent.trace import BUNDLED_RECORDINGS

REPO = Path(__file__).resolve().parent.parent
SHARED_TRACES = REPO.parent / "shared" / "traces" / "h100-2026-11-22"
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No ROOFTOP_* variable from the caller's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("ROOFTOP_"):
            monkeypatch.delenv(name)
    yield


DATA_TRACES = BUNDLED_RECORDINGS


@pytest.fixture
def shared_traces() -> Path:
    """The real H100 recordings: ../shared/traces, or the project's own copy in tests/data."""
    return SHARED_TRACES if SHARED_TRACES.is_dir() else DATA_TRACES
