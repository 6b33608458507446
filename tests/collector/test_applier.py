"""The apply thread: jobs from coroutines run on one thread, in order, results back on the loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from rooftop.collector.applier import Applier


@pytest.fixture
def applier() -> Iterator[Applier]:
    applier = Applier()
    yield applier
    applier.close()


def test_jobs_run_in_submission_order_on_one_thread_off_the_loop(applier: Applier):
    ran: list[tuple[int, int]] = []  # (job, thread ident)

    def job(i: int) -> int:
        ran.append((i, threading.get_ident()))
        return i * i

    async def main() -> list[int]:
        return list(await asyncio.gather(*(applier.run(lambda i=i: job(i)) for i in range(200))))

    assert asyncio.run(main()) == [i * i for i in range(200)]
    assert [i for i, _ in ran] == list(range(200))  # first in, first out
    threads = {ident for _, ident in ran}
    assert len(threads) == 1
    assert threads != {threading.get_ident()}  # not the loop's thread


def test_a_jobs_exception_is_raised_in_the_awaiting_coroutine_and_the_next_job_runs(
    applier: Applier,
):
    def boom() -> None:
        raise ValueError("bad batch")

    async def main() -> str:
        with pytest.raises(ValueError, match="bad batch"):
            await applier.run(boom)
        return await applier.run(lambda: "next")

    assert asyncio.run(main()) == "next"


def test_a_job_whose_awaiter_was_cancelled_still_runs_and_later_jobs_answer(applier: Applier):
    release = threading.Event()
    ran: list[str] = []

    def slow() -> None:
        release.wait(10)
        ran.append("slow")

    async def main() -> str:
        waiter = asyncio.ensure_future(applier.run(slow))
        await asyncio.sleep(0.05)
        waiter.cancel()  # the stream went away while its batch was queued
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        return await applier.run(lambda: "after")

    assert asyncio.run(main()) == "after"
    assert ran == ["slow"]  # queued, so applied: its agent resends it, a duplicate


def test_results_finished_together_wake_the_loop_once():
    wakeups: list[int] = []

    class Counting(Applier):
        def _hand_back(self, loop: asyncio.AbstractEventLoop) -> None:
            wakeups.append(1)
            super()._hand_back(loop)

    applier = Counting()
    release, finished = threading.Event(), threading.Event()

    async def main() -> list[int]:
        gate = asyncio.ensure_future(applier.run(lambda: release.wait(10)))
        jobs = [asyncio.ensure_future(applier.run(lambda i=i: i)) for i in range(50)]
        last = asyncio.ensure_future(applier.run(finished.set))
        await asyncio.sleep(0.05)  # every job queued behind the gate
        release.set()
        finished.wait(10)  # the loop blocks, as in a long turn, while all of them finish
        await asyncio.gather(gate, last)
        return list(await asyncio.gather(*jobs))

    try:
        assert asyncio.run(main()) == list(range(50))
    finally:
        applier.close()
    assert wakeups == [1]  # 52 results, one wakeup


def test_close_finishes_the_queued_jobs_then_refuses_new_ones():
    applier = Applier()
    release = threading.Event()
    ran: list[int] = []

    async def main() -> None:
        first = asyncio.ensure_future(applier.run(lambda: release.wait(10)))
        rest = [asyncio.ensure_future(applier.run(lambda i=i: ran.append(i))) for i in range(5)]
        await asyncio.sleep(0.05)
        closer = threading.Thread(target=applier.close)
        closer.start()
        release.set()
        await asyncio.gather(first, *rest)
        closer.join(10)
        with pytest.raises(RuntimeError, match="closed"):
            await applier.run(lambda: None)

    asyncio.run(main())
    assert ran == [0, 1, 2, 3, 4]
    assert not applier.alive


def test_busy_s_is_how_long_the_job_now_running_has_run():
    now = [100.0]
    applier = Applier(clock=lambda: now[0])
    release = threading.Event()
    started = threading.Event()

    def stuck() -> None:
        started.set()
        release.wait(10)

    async def main() -> None:
        job = asyncio.ensure_future(applier.run(stuck))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        now[0] = 112.5
        assert applier.busy_s() == 12.5
        release.set()
        await job

    try:
        assert applier.busy_s() == 0.0
        asyncio.run(main())
        assert applier.busy_s() == 0.0  # idle again
    finally:
        applier.close()
