"""Fixtures for the in-engine hooks: a short socket path, a real receiver, a fake clock."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from rooftop.agent.engines.receiver import HookReceiver


class FakeClockNs:
    """A monotonic nanosecond clock the test moves by hand."""

    def __init__(self, start_ns: int = 1_000_000_000) -> None:
        self.now_ns = start_ns

    def __call__(self) -> int:
        return self.now_ns

    def advance_ms(self, ms: float) -> None:
        self.now_ns += round(ms * 1_000_000)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # AF_UNIX paths are capped at 108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sock_path(sock_dir: Path) -> str:
    return str(sock_dir / "hooks.sock")


@pytest.fixture
def receiver(sock_path: str) -> Iterator[HookReceiver]:
    rx = HookReceiver(sock_path, clock=lambda: 1_767_225_600.0)
    rx.start()
    yield rx
    rx.shutdown()


@pytest.fixture
def clock() -> FakeClockNs:
    return FakeClockNs()
