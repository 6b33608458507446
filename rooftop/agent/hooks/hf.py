"""A Hugging Face transformers streamer that feeds Rooftop's hook.

    from rooftop.agent.hooks.hf import RooftopStreamer
    model.generate(**inputs, streamer=RooftopStreamer(model="llama-3-8b"))

``generate`` calls ``put`` first with the prompt (not a token: it starts the
request, so TTFT covers prefill), then once per decoding step with the new token
ids, then ``end()``. The streamer can be reused for the next ``generate`` call, and
can wrap another streamer (``inner=TextStreamer(tok)``) so printing still works.

It subclasses ``transformers.generation.BaseStreamer`` when transformers imports,
and is a plain class with the same ``put``/``end`` otherwise, so this module imports
(and is tested) without transformers or torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from rooftop.agent.hooks._core import Aggregator, Request

__all__ = ["RooftopStreamer", "StreamerLike"]


class StreamerLike(Protocol):
    """What ``generate`` needs from a streamer."""

    def put(self, value: Any) -> None:
        """Receive the prompt ids, then each step's new token ids."""

    def end(self) -> None:
        """Generation finished."""


if TYPE_CHECKING:
    _StreamerBase = object
else:
    try:
        from transformers.generation import BaseStreamer as _StreamerBase
    except Exception:  # noqa: BLE001 - absent or broken (e.g. torch mismatch): run without it

        class _StreamerBase:  # the same two methods transformers' BaseStreamer declares
            def put(self, value: Any) -> None:
                raise NotImplementedError

            def end(self) -> None:
                raise NotImplementedError


def _prompt_rows(value: Any) -> int:
    """Rows of a 2-D (batch, prompt_len) prompt: the sequences decoded together."""
    shape = getattr(value, "shape", None)
    if shape is not None:
        return int(shape[0]) if len(shape) == 2 and int(shape[0]) > 0 else 1
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple)):
        return len(value)
    return 1


def _step_tokens(value: Any) -> int:
    """Tokens per sequence in one step: 1-D (batch,) is one; 2-D (batch, k) is k."""
    # Runs once per decoding step: attribute reads only, no copies of the shape.
    shape = getattr(value, "shape", None)
    if shape is not None:
        return int(shape[1]) if len(shape) == 2 else 1
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple)):
        return len(value[0])
    return 1


class RooftopStreamer(_StreamerBase):
    """Marks one request per ``generate`` call and one token mark per step.

    Args:
        aggregator: where marks go; default the process-wide one from :mod:`rooftop.agent.hooks`.
        inner: another streamer to forward ``put``/``end`` to (e.g. ``TextStreamer``).
        model: sets the model name on the default aggregator when it has none.
    """

    def __init__(
        self,
        aggregator: Aggregator | None = None,
        *,
        inner: StreamerLike | None = None,
        model: str | None = None,
    ) -> None:
        if aggregator is None:
            from rooftop.agent import (
                hooks,  # deferred: hooks imports nothing heavy, but keep cycles out
            )

            aggregator = hooks.aggregator()
        if model and not aggregator.model:
            aggregator.model = model
        self._agg = aggregator
        self._inner = inner
        self._req: Request | None = None

    def put(self, value: Any) -> None:
        """Receive token ids from ``generate``: the prompt first, then each step's tokens."""
        try:
            req = self._req
            if req is None:
                # The prompt, not a token: the request starts here, so TTFT covers prefill.
                self._req = self._agg.start_request(sequences=_prompt_rows(value))
            else:
                # Assisted / speculative decoding puts several tokens per step.
                req.token(_step_tokens(value))
        except Exception:  # noqa: BLE001 - a streamer must never break generate()
            self._agg._note_error("RooftopStreamer.put")
        if self._inner is not None:
            self._inner.put(value)

    def end(self) -> None:
        """Generation finished: end the request; the next ``put`` is a new prompt."""
        req, self._req = self._req, None
        if req is not None:
            req.end()
        if self._inner is not None:
            self._inner.end()
