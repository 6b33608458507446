"""A vLLM stat-logger plugin: vLLM's own per-request stats, shipped to the local agent.

Registered under the ``vllm.stat_logger_plugins`` entry point (see pyproject.toml),
so ``vllm serve`` loads it in its API-server process; no code change in vLLM.
``record()`` runs in the server's event loop once per engine step: it only copies a
few numbers into the hook aggregator (deque appends, attribute stores) and returns;
the aggregator's own thread does the sending.

What is taken from vLLM's stats objects (not a stable vLLM interface, so every
field is read with a fallback and a missing one is skipped, never an error):

- ``SchedulerStats.num_running_reqs`` / ``num_waiting_reqs`` → queue depth;
  ``kv_cache_usage`` (older ``gpu_cache_usage``) → KV-cache use (0-1).
- ``IterationStats.num_generation_tokens`` → output tokens.
- ``FinishedRequestStats.mean_time_per_output_token`` → one TPOT per request
  (vLLM computes it as decode time / (tokens - 1); 0 for a one-token request,
  which has no TPOT and is skipped).
- ``FinishedRequestStats.e2e_latency`` → one request duration per request.
- TTFT: ``FinishedRequestStats.first_token_latency`` where vLLM has it; otherwise
  ``IterationStats.time_to_first_tokens_iter`` (TTFTs of requests whose first token
  came in that step). The choice is made once, on the first finished request, so
  no request is counted twice.

Each of these is one observation per request, counted into the TPOT, TTFT and request
duration histograms of the aggregator's next summary.

This module imports without vLLM (it then derives from a local stand-in base),
so the agent and its tests never need vLLM installed.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from rooftop.agent.hooks._core import ENV_ENGINE_ID, Aggregator

__all__ = ["RooftopStatLogger"]

# TTFTs seen before the first finished request tells us where TTFT comes from;
# bounded so a server that never finishes a request cannot grow it.
_MAX_PENDING_TTFT = 4096

if TYPE_CHECKING:
    _StatLoggerBase = object
else:
    try:
        from vllm.v1.metrics.loggers import StatLoggerBase as _StatLoggerBase
    except Exception:  # noqa: BLE001 - no vLLM (or an incompatible one): the stand-in below

        class _StatLoggerBase:  # mirrors vllm.v1.metrics.loggers.StatLoggerBase
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(
                self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any
            ) -> None:
                raise NotImplementedError

            def log_engine_initialized(self) -> None:
                raise NotImplementedError

            def log(self) -> None:
                pass


def _model_name(vllm_config: Any) -> str | None:
    model_config = getattr(vllm_config, "model_config", None)
    for attr in ("served_model_name", "model"):
        name = getattr(model_config, attr, None)
        if isinstance(name, (list, tuple)):  # served_model_name may be a list of aliases
            name = name[0] if name else None
        if isinstance(name, str) and name:
            return name
    return None


class RooftopStatLogger(_StatLoggerBase):
    """vLLM ``StatLoggerBase`` that forwards per-step stats to the Rooftop agent.

    Args:
        vllm_config: vLLM's ``VllmConfig`` (only the model name is read from it).
        engine_index: the data-parallel engine this logger serves.
        aggregator: where the figures go; default a new one named
            ``vllm-<pid>-<engine_index>`` (or ``$ROOFTOP_ENGINE_ID``) shipping to
            ``$ROOFTOP_HOOK_SOCKET``. Tests inject one.
    """

    def __init__(
        self, vllm_config: Any, engine_index: int = 0, *, aggregator: Aggregator | None = None
    ) -> None:
        self.engine_index = engine_index
        if aggregator is None:
            engine_id = os.environ.get(ENV_ENGINE_ID)
            if engine_id and engine_index:
                engine_id = f"{engine_id}-{engine_index}"
            aggregator = Aggregator(
                engine_id=engine_id or f"vllm-{os.getpid()}-{engine_index}",
                model=_model_name(vllm_config),
            )
        if not aggregator.model:
            aggregator.model = _model_name(vllm_config)
        self.aggregator = aggregator
        self._ttft_from_finished: bool | None = None
        self._pending_ttft: list[float] = []

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        """Take one engine step's stats (vLLM passes ``mm_cache_stats``/``engine_idx`` too).

        Never raises and never blocks: it runs in vLLM's event loop.
        """
        agg = self.aggregator
        try:
            if scheduler_stats is not None:
                self._record_scheduler(scheduler_stats)
            if iteration_stats is not None:
                self._record_iteration(iteration_stats)
            if agg.autostart and agg._thread is None:
                agg.start()  # the shipper starts with the first step vLLM reports
        except Exception:  # noqa: BLE001 - a metrics plugin must not take the server down
            agg._note_error("RooftopStatLogger.record")

    def _record_scheduler(self, stats: Any) -> None:
        running = getattr(stats, "num_running_reqs", None)
        waiting = getattr(stats, "num_waiting_reqs", None)
        self.aggregator.set_queue(running, waiting)
        kv = getattr(stats, "kv_cache_usage", None)
        if kv is None:
            kv = getattr(stats, "gpu_cache_usage", None)
        if kv is not None:
            self.aggregator.set_kv_cache_usage(kv)

    def _record_iteration(self, stats: Any) -> None:
        agg = self.aggregator
        tokens = getattr(stats, "num_generation_tokens", 0)
        if tokens:
            agg.add_tokens(tokens)
        step_ttfts = getattr(stats, "time_to_first_tokens_iter", None) or ()
        for finished in getattr(stats, "finished_requests", None) or ():
            tpot_s = getattr(finished, "mean_time_per_output_token", None)
            if tpot_s:  # 0: a one-token request has no TPOT
                agg.observe_tpot_s(tpot_s)
            e2e_s = getattr(finished, "e2e_latency", None)
            if e2e_s is not None:
                agg.observe_request_duration_s(e2e_s)
            if self._ttft_from_finished is None:
                self._ttft_from_finished = hasattr(finished, "first_token_latency")
                if not self._ttft_from_finished:
                    for pending_s in self._pending_ttft:
                        agg.observe_ttft_s(pending_s)
                self._pending_ttft.clear()
            if self._ttft_from_finished:
                latency_s = getattr(finished, "first_token_latency", None)
                if latency_s:
                    agg.observe_ttft_s(latency_s)
        if self._ttft_from_finished is False:
            for step_s in step_ttfts:
                agg.observe_ttft_s(step_s)
        elif self._ttft_from_finished is None and len(self._pending_ttft) < _MAX_PENDING_TTFT:
            self._pending_ttft.extend(step_ttfts)

    def log_engine_initialized(self) -> None:
        """Called once the engine is up: start shipping (an idle engine reports too)."""
        if self.aggregator.autostart:
            self.aggregator.start()

    def log(self) -> None:
        """Called periodically by vLLM: nothing to do, the aggregator ships on its own clock."""

    def record_sleep_state(self, *args: Any, **kwargs: Any) -> None:
        """Called on vLLM sleep-mode changes: not used."""

    def shutdown(self, timeout_s: float = 1.0) -> None:
        """Send a last summary and stop (also done at interpreter exit)."""
        self.aggregator.shutdown(timeout_s)
