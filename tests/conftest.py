"""Shared fixtures: clean environment, paths to the real H100 recordings."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rooftop.agent.sensors.nvml import NvmlBackend
from rooftop.agent.trace import BUNDLED_RECORDINGS
from tests.kubelet_standin import KubeletStandin

REPO = Path(__file__).resolve().parent.parent
SHARED_TRACES = REPO.parent / "shared" / "traces" / "h100-2026-11-22"
DATA = Path(__file__).resolve().parent / "data"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The three-collector kill-and-return scenario first, the rest in their order.

    It needs both cores of a CI machine (three collectors, 2,000 simulated agents,
    Prometheus) and its bounds are timings; at the end of the suite it met a machine
    slowed by minutes of full load (in two of three fresh-clone runs, some agents
    re-homed in 10-17 s; 3-4 s when it ran alone).
    """
    items.sort(key=lambda item: "tests/e2e/test_e2e_sharded.py" not in item.nodeid)


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No ROOFTOP_* variable (nor a CI pod's NODE_NAME) from the caller's shell leaks in."""
    for name in list(os.environ):
        if name.startswith("ROOFTOP_") or name == "NODE_NAME":
            monkeypatch.delenv(name)
    yield


@pytest.fixture(autouse=True)
def nvml_backends_closed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every NVML backend a test opens is closed after it (``close`` is idempotent).

    A backend left open once kept an XID thread polling once a second for the rest of
    the session (sixty of them slowed the sharded e2e's failover past its bound); the
    looks are the reader's now, and a closed backend still frees its NVML state.
    """
    opened: list[NvmlBackend] = []
    init = NvmlBackend.__init__

    def init_and_record(self: NvmlBackend, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        opened.append(self)

    monkeypatch.setattr(NvmlBackend, "__init__", init_and_record)
    yield
    for backend in opened:
        backend.close()


@pytest.fixture
def kubelet() -> Iterator[KubeletStandin]:
    """A started stand-in kubelet (tests/kubelet_standin.py) on a short unix socket path."""
    # Unix socket paths are limited to 107 bytes, which a deep tmp_path can exceed.
    directory = Path(tempfile.mkdtemp(prefix="kubelet-", dir="/tmp"))
    standin = KubeletStandin(directory / "kubelet.sock")
    standin.start()
    try:
        yield standin
    finally:
        standin.stop()
        shutil.rmtree(directory, ignore_errors=True)


DATA_TRACES = BUNDLED_RECORDINGS


@pytest.fixture
def shared_traces() -> Path:
    """The real H100 recordings: ../shared/traces, or the project's own copy in tests/data."""
    return SHARED_TRACES if SHARED_TRACES.is_dir() else DATA_TRACES
