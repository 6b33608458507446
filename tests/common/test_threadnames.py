"""The daemons' Python threads carry their names into the kernel (``/proc/.../comm``)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from rooftop.common.threadnames import name_os_threads, os_thread_name

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="/proc/<pid>/task is Linux's")


def comm(native_id: int | None) -> str:
    return Path(f"/proc/self/task/{native_id}/comm").read_text().strip()


def test_a_kernel_name_drops_the_rooftop_prefix_and_fits_in_15_bytes():
    assert os_thread_name("rooftop-sampler") == "sampler"
    assert os_thread_name("rooftop-hook-receiver-with-a-long-name") == "hook-receiver-w"
    assert os_thread_name("Thread-7 (worker)") == "Thread-7 (worke"
    assert os_thread_name("rooftop-") == "rooftop-"  # never an empty name
    assert len(os_thread_name("é" * 20).encode()) <= 15  # cut on a character, not a byte


def test_every_python_thread_but_the_main_one_gets_its_name_in_proc():
    main_before = comm(threading.main_thread().native_id)
    release = threading.Event()
    thread = threading.Thread(target=release.wait, name="rooftop-probe", daemon=True)
    thread.start()
    try:
        # Python 3.11 does not name OS threads: the kernel shows the process's name.
        assert comm(thread.native_id) != "probe"
        assert name_os_threads() >= 1
        assert comm(thread.native_id) == "probe"
        assert comm(threading.main_thread().native_id) == main_before  # ps and pgrep see it
    finally:
        release.set()
        thread.join()


def test_without_proc_nothing_is_named_and_nothing_raises(tmp_path):
    release = threading.Event()
    thread = threading.Thread(target=release.wait, name="rooftop-probe", daemon=True)
    thread.start()
    try:
        assert name_os_threads(proc_self=tmp_path / "no-proc") == 0
    finally:
        release.set()
        thread.join()
