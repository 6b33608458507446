"""In-process engine hooks: mark requests and tokens; Rooftop gets TTFT, TPOT, queue depth.

Runs inside the inference engine, so it is stdlib only (no grpc, pynvml, psutil or
protobuf), costs well under a microsecond per token on the caller's thread, never
blocks and never raises. Summaries go once per interval (default 1 s) to the local
agent over a unix datagram socket (``$ROOFTOP_HOOK_SOCKET``, default
``/run/rooftop/hooks.sock``); with no agent listening they are dropped and counted.

Usage::

    from rooftop.agent import hooks

    hooks.configure(engine_id="my-server", model="llama-3-8b")   # optional
    with hooks.request() as req:           # request arrives
        for tok in generate(prompt):
            req.token()                    # one per token (or req.token(n) per chunk)
    print(hooks.stats())                   # sent / dropped / errors

Engines that measure latency themselves report it instead of marking tokens:
``observe_tpot_s``, ``observe_ttft_s``, ``observe_request_duration_s``, ``add_tokens``,
``set_queue``. Each finished request is one observation in the TPOT, TTFT and request
duration histograms that ride on the summaries. Adapters:
:mod:`rooftop.agent.hooks.hf` (a transformers streamer) and :mod:`rooftop.agent.hooks.vllm`
(a vLLM stat-logger plugin). The wire format is in :mod:`rooftop.agent.hooks.wire`.
"""

from __future__ import annotations

import threading

from rooftop.agent.hooks._core import (
    DEFAULT_INTERVAL_S,
    DEFAULT_SOCKET_PATH,
    ENV_ENGINE_ID,
    ENV_INTERVAL_S,
    ENV_MODEL,
    ENV_SOCKET,
    Aggregator,
    HookStats,
    Request,
)

__all__ = [
    "DEFAULT_INTERVAL_S",
    "DEFAULT_SOCKET_PATH",
    "ENV_ENGINE_ID",
    "ENV_INTERVAL_S",
    "ENV_MODEL",
    "ENV_SOCKET",
    "Aggregator",
    "HookStats",
    "Request",
    "add_tokens",
    "aggregator",
    "configure",
    "flush",
    "observe_request_duration_s",
    "observe_tpot_s",
    "observe_ttft_s",
    "request",
    "set_queue",
    "shutdown",
    "start_request",
    "stats",
]

_default: Aggregator | None = None
_default_lock = threading.Lock()


def configure(
    *,
    engine_id: str | None = None,
    model: str | None = None,
    socket_path: str | None = None,
    interval_s: float | None = None,
) -> Aggregator:
    """Replace the process-wide aggregator (the old one sends its last summary first).

    Optional: without it the first hook call builds one from ``$ROOFTOP_ENGINE_ID``,
    ``$ROOFTOP_MODEL``, ``$ROOFTOP_HOOK_SOCKET`` and ``$ROOFTOP_HOOK_INTERVAL_S``.
    Invalid values fall back to the defaults with a log line, never an exception.
    Requests already started on the old aggregator stay with it and are not reported.

    Args:
        engine_id: names this engine to the agent (default ``pid-<pid>``).
        model: the model served.
        socket_path: the agent's unix datagram socket.
        interval_s: seconds between summaries.

    Returns:
        The new process-wide aggregator.
    """
    global _default
    new = Aggregator(
        engine_id=engine_id, model=model, socket_path=socket_path, interval_s=interval_s
    )
    with _default_lock:
        old, _default = _default, new
    if old is not None:
        old.shutdown(timeout_s=0.2)
    return new


def aggregator() -> Aggregator:
    """The process-wide aggregator, created from the environment on first use."""
    global _default
    agg = _default
    if agg is None:
        with _default_lock:
            if _default is None:
                _default = Aggregator()
            agg = _default
    return agg


def start_request(sequences: int = 1) -> Request:
    """Mark a request arriving now; call ``token()`` per token and ``end()`` on the result.

    Args:
        sequences: sequences decoded together in this request (a batched generate).

    Returns:
        The request handle; also a context manager that ends it.
    """
    return aggregator().start_request(sequences)


def request(sequences: int = 1) -> Request:
    """Context-manager spelling of :func:`start_request`: ``with hooks.request() as r:``.

    Args:
        sequences: sequences decoded together in this request.

    Returns:
        The request handle; leaving the ``with`` block ends it.
    """
    return aggregator().start_request(sequences)


def add_tokens(n: int) -> None:
    """Count ``n`` output tokens not tied to a request handle."""
    aggregator().add_tokens(n)


def observe_tpot_s(seconds: float) -> None:
    """Record one request's time per output token as measured by the engine."""
    aggregator().observe_tpot_s(seconds)


def observe_ttft_s(seconds: float) -> None:
    """Record one request's time to first token as measured by the engine."""
    aggregator().observe_ttft_s(seconds)


def observe_request_duration_s(seconds: float) -> None:
    """Record one finished request's duration (arrival to last token), engine-measured."""
    aggregator().observe_request_duration_s(seconds)


def set_queue(running: int | None = None, waiting: int | None = None) -> None:
    """Report the engine's queue depth (overrides the count of open request handles)."""
    aggregator().set_queue(running, waiting)


def stats() -> HookStats:
    """Counters of the process-wide aggregator: summaries sent and dropped, errors."""
    return aggregator().stats()


def flush(timeout_s: float = 1.0) -> bool:
    """Send a summary now; True when it reached the agent's socket.

    Args:
        timeout_s: how long to wait if the shipper thread is mid-send.

    Returns:
        Whether the summary was handed to the socket.
    """
    return aggregator().flush(timeout_s)


def shutdown(timeout_s: float = 1.0) -> None:
    """Stop shipping, after a final summary. Also runs at interpreter exit."""
    agg = _default
    if agg is not None:
        agg.shutdown(timeout_s)
