"""The vLLM stat-logger plugin, fed stand-ins shaped like vLLM's v1 stats objects."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rooftop.agent.hooks import Aggregator
from rooftop.agent.hooks.vllm import RooftopStatLogger

REPO = Path(__file__).resolve().parents[3]


# Stand-ins with the fields vLLM's vllm/v1/metrics/stats.py defines.
@dataclass
class SchedulerStats:
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0


@dataclass
class OldSchedulerStats:  # vLLM before kv_cache_usage was renamed
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    gpu_cache_usage: float = 0.0


@dataclass
class FinishedRequestStats:  # current: no first_token_latency on finished requests
    finish_reason: str = "stop"
    e2e_latency: float = 0.0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    mean_time_per_output_token: float = 0.0


@dataclass
class FinishedRequestStatsWithTtft(FinishedRequestStats):
    first_token_latency: float = 0.0


@dataclass
class IterationStats:
    num_generation_tokens: int = 0
    num_prompt_tokens: int = 0
    finished_requests: list[object] = field(default_factory=list)
    time_to_first_tokens_iter: list[float] = field(default_factory=list)
    inter_token_latencies_iter: list[float] = field(default_factory=list)


class VllmConfig:
    class model_config:  # noqa: N801 - mirrors the attribute name on vLLM's config
        served_model_name = "meta-llama/Llama-3.1-8B-Instruct"
        model = "/models/llama"


def make_plugin(sock_path, clock):
    agg = Aggregator(engine_id="vllm-test", socket_path=sock_path, clock_ns=clock, autostart=False)
    return RooftopStatLogger(VllmConfig(), 0, aggregator=agg)


def sample_of(plugin, rx):
    assert plugin.aggregator.flush()
    rx.flush()
    (sample,) = rx.drain()
    return sample


def test_queue_tokens_tpot_and_ttft(receiver, sock_path, clock):
    plugin = make_plugin(sock_path, clock)
    plugin.log_engine_initialized()
    plugin.record(SchedulerStats(num_running_reqs=5, num_waiting_reqs=2, kv_cache_usage=0.3), None)
    plugin.record(
        SchedulerStats(num_running_reqs=4, num_waiting_reqs=1),
        IterationStats(
            num_generation_tokens=40,
            finished_requests=[
                FinishedRequestStatsWithTtft(
                    mean_time_per_output_token=0.006, first_token_latency=0.2
                ),
                FinishedRequestStatsWithTtft(
                    mean_time_per_output_token=0.004, first_token_latency=0.1
                ),
                FinishedRequestStatsWithTtft(mean_time_per_output_token=0.0),  # one token: no TPOT
            ],
            time_to_first_tokens_iter=[0.5],  # ignored: TTFT comes with finished requests
        ),
        mm_cache_stats=None,
        engine_idx=0,
    )
    s = sample_of(plugin, receiver)
    assert (s.requests_running, s.requests_waiting) == (4, 1)
    assert s.output_tokens == 40
    assert s.tpot_ms == pytest.approx(5.0)
    assert s.tpot_p99_ms == pytest.approx(6.0)
    assert s.ttft_ms == pytest.approx(150.0)
    assert s.model == "meta-llama/Llama-3.1-8B-Instruct"


def test_ttft_from_iteration_when_finished_stats_lack_it(receiver, sock_path, clock):
    plugin = make_plugin(sock_path, clock)
    # First tokens arrive before any request finishes: held until the source is known.
    plugin.record(OldSchedulerStats(1, 0, 0.1), IterationStats(time_to_first_tokens_iter=[0.08]))
    plugin.record(None, IterationStats(time_to_first_tokens_iter=[0.12]))
    plugin.record(
        None,
        IterationStats(
            finished_requests=[FinishedRequestStats(mean_time_per_output_token=0.01)],
            time_to_first_tokens_iter=[0.1],
        ),
    )
    plugin.record(None, IterationStats(time_to_first_tokens_iter=[0.3]))
    s = sample_of(plugin, receiver)
    assert s.ttft_ms == pytest.approx((80 + 120 + 100 + 300) / 4)
    assert s.tpot_ms == pytest.approx(10.0)


def test_ttft_not_double_counted_when_finished_stats_carry_it(receiver, sock_path, clock):
    plugin = make_plugin(sock_path, clock)
    plugin.record(None, IterationStats(time_to_first_tokens_iter=[0.9]))  # pending, then dropped
    plugin.record(
        None,
        IterationStats(finished_requests=[FinishedRequestStatsWithTtft(first_token_latency=0.05)]),
    )
    assert sample_of(plugin, receiver).ttft_ms == pytest.approx(50.0)


@pytest.mark.parametrize(
    ("scheduler", "iteration"),
    [
        (None, None),
        (object(), object()),
        ("garbage", 42),
        (SchedulerStats(num_running_reqs=-3), IterationStats(num_generation_tokens="x")),  # type: ignore[arg-type]
        (None, IterationStats(finished_requests=[None, object(), 5])),
        (None, IterationStats(finished_requests=None, time_to_first_tokens_iter=None)),  # type: ignore[arg-type]
    ],
)
def test_record_never_raises(receiver, sock_path, clock, scheduler, iteration):
    plugin = make_plugin(sock_path, clock)
    plugin.record(scheduler, iteration)
    plugin.record(scheduler, iteration, None, 0)  # older positional call shape
    plugin.log()
    plugin.record_sleep_state(1, 0)
    s = sample_of(plugin, receiver)
    assert s.engine_id == "vllm-test"


def test_record_does_not_block_without_an_agent(sock_path, clock):
    plugin = make_plugin(sock_path, clock)  # nothing listening
    it = IterationStats(
        num_generation_tokens=8,
        finished_requests=[FinishedRequestStatsWithTtft(0, 0, 0, 0, 0.005, 0.1)] * 8,
    )
    sched = SchedulerStats(8, 0, 0.5)
    start = time.perf_counter()
    for _ in range(1000):
        plugin.record(sched, it)
    per_call_us = (time.perf_counter() - start) / 1000 * 1e6
    assert per_call_us < 500  # in-memory only: no send happens on vLLM's loop
    assert plugin.aggregator.stats().sent == plugin.aggregator.stats().dropped == 0
    assert plugin.aggregator.flush() is False
    assert plugin.aggregator.stats().dropped == 1


def test_default_aggregator_names_engine(monkeypatch):
    monkeypatch.setenv("ROOFTOP_HOOK_SOCKET", "/nonexistent/hooks.sock")
    plugin = RooftopStatLogger(VllmConfig(), engine_index=2)
    try:
        assert plugin.aggregator.engine_id.startswith("vllm-")
        assert plugin.aggregator.engine_id.endswith("-2")
        assert plugin.aggregator.model == "meta-llama/Llama-3.1-8B-Instruct"
    finally:
        plugin.shutdown()


def test_entry_point_is_declared_and_resolves():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    eps = meta["project"]["entry-points"]["vllm.stat_logger_plugins"]
    assert len(eps) == 1
    module, _, attr = next(iter(eps.values())).partition(":")
    assert getattr(importlib.import_module(module), attr) is RooftopStatLogger


def test_with_vllm_installed_it_is_a_stat_logger_base(tmp_path):
    """vLLM refuses plugins that are not StatLoggerBase subclasses; fake the package to check."""
    loggers = tmp_path / "vllm" / "v1" / "metrics"
    loggers.mkdir(parents=True)
    for d in (tmp_path / "vllm", tmp_path / "vllm" / "v1", loggers):
        (d / "__init__.py").write_text("")
    (loggers / "loggers.py").write_text(
        textwrap.dedent(
            """
            from abc import ABC, abstractmethod

            class StatLoggerBase(ABC):
                @abstractmethod
                def __init__(self, vllm_config, engine_index=0): ...

                @abstractmethod
                def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
                           engine_idx=0): ...

                @abstractmethod
                def log_engine_initialized(self): ...

                def log(self):
                    pass
            """
        )
    )
    code = textwrap.dedent(
        """
        from vllm.v1.metrics.loggers import StatLoggerBase
        from rooftop.agent.hooks.vllm import RooftopStatLogger
        plugin_class = RooftopStatLogger
        # what vLLM's load_stat_logger_plugin_factories checks
        assert isinstance(plugin_class, type) and issubclass(plugin_class, StatLoggerBase)
        logger = plugin_class(None, 0)  # abstract methods all implemented
        logger.record(None, None, mm_cache_stats=None, engine_idx=0)
        logger.log_engine_initialized()
        logger.shutdown(0.1)
        """
    )
    env = {"PYTHONPATH": str(tmp_path), "ROOFTOP_HOOK_SOCKET": "/nonexistent/hooks.sock"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)
