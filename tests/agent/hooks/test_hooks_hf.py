"""The transformers streamer, driven by a fake generate loop (no transformers needed)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from rooftop.agent.hooks import Aggregator
from rooftop.agent.hooks.hf import RooftopStreamer


class FakeTensor:
    """Just enough of a torch tensor: a shape."""

    def __init__(self, *shape: int) -> None:
        self.shape = shape


def fake_generate(streamer, clock, prompt, steps, *, prefill_ms=40.0, step_ms=10.0):
    """What transformers' generate does with a streamer: prompt, one put per step, end."""
    streamer.put(prompt)
    clock.advance_ms(prefill_ms)
    for step in steps:
        streamer.put(step)
        clock.advance_ms(step_ms)
    streamer.end()


def make_agg(sock_path, clock):
    return Aggregator(engine_id="hf", socket_path=sock_path, clock_ns=clock, autostart=False)


def sample_of(agg, rx):
    assert agg.flush()
    rx.flush()
    (sample,) = rx.drain()
    return sample


def test_first_put_is_the_prompt_not_a_token(receiver, sock_path, clock):
    agg = make_agg(sock_path, clock)
    streamer = RooftopStreamer(agg)
    fake_generate(streamer, clock, [[101, 102, 103, 104]], [[5], [6], [7], [8], [9]])
    s = sample_of(agg, receiver)
    assert s.output_tokens == 5  # the 4 prompt ids are not output
    assert s.ttft_ms == pytest.approx(40.0)  # prefill: prompt put -> first step put
    assert s.tpot_ms == pytest.approx(10.0)
    assert s.requests_running == 0


def test_tensor_like_values_and_1d_steps(receiver, sock_path, clock):
    agg = make_agg(sock_path, clock)
    streamer = RooftopStreamer(agg)
    fake_generate(streamer, clock, FakeTensor(1, 12), [FakeTensor(1)] * 4, step_ms=20.0)
    s = sample_of(agg, receiver)
    assert s.output_tokens == 4
    assert s.tpot_ms == pytest.approx(20.0)


def test_batched_generate_counts_tokens_per_sequence(receiver, sock_path, clock):
    agg = make_agg(sock_path, clock)
    streamer = RooftopStreamer(agg)
    fake_generate(streamer, clock, FakeTensor(3, 8), [FakeTensor(3)] * 5)
    s = sample_of(agg, receiver)
    assert s.output_tokens == 15  # 5 steps x 3 sequences
    assert s.tpot_ms == pytest.approx(10.0)  # TPOT is the step time, not step / 3


def test_assisted_decoding_puts_several_tokens(receiver, sock_path, clock):
    agg = make_agg(sock_path, clock)
    streamer = RooftopStreamer(agg)
    fake_generate(streamer, clock, [[1, 2]], [[[7]], [[8, 9, 10]]], step_ms=30.0)
    s = sample_of(agg, receiver)
    assert s.output_tokens == 4
    assert s.tpot_ms == pytest.approx(10.0)  # 30 ms for 3 tokens


def test_streamer_is_reusable_and_forwards_to_inner(receiver, sock_path, clock):
    seen: list[object] = []

    class Inner:
        def put(self, value):
            seen.append(value)

        def end(self):
            seen.append("end")

    agg = make_agg(sock_path, clock)
    streamer = RooftopStreamer(agg, inner=Inner(), model="tiny-llama")
    fake_generate(streamer, clock, [[1]], [[2], [3]])
    fake_generate(streamer, clock, [[1]], [[2], [3], [4]])
    assert seen == [[[1]], [2], [3], "end", [[1]], [2], [3], [4], "end"]
    s = sample_of(agg, receiver)
    assert s.output_tokens == 5
    assert s.model == "tiny-llama"


def test_garbage_puts_never_raise(receiver, sock_path, clock):
    agg = make_agg(sock_path, clock)
    streamer = RooftopStreamer(agg)
    streamer.end()  # end before any put
    streamer.put(None)
    streamer.put(object())
    streamer.put(FakeTensor())  # shape ()
    streamer.put([])
    streamer.end()
    streamer.end()
    s = sample_of(agg, receiver)
    assert s.requests_running == 0


def test_default_aggregator(monkeypatch, sock_path):
    from rooftop.agent import hooks

    monkeypatch.setattr(hooks, "_default", None)
    agg = hooks.configure(socket_path=sock_path)
    try:
        assert RooftopStreamer()._agg is agg
    finally:
        hooks.shutdown()


def test_subclasses_transformers_base_streamer_when_importable(tmp_path):
    pkg = tmp_path / "transformers" / "generation"
    pkg.mkdir(parents=True)
    (tmp_path / "transformers" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            """
            class BaseStreamer:
                def put(self, value):
                    raise NotImplementedError()

                def end(self):
                    raise NotImplementedError()
            """
        )
    )
    code = textwrap.dedent(
        """
        from transformers.generation import BaseStreamer
        from rooftop.agent.hooks import Aggregator
        from rooftop.agent.hooks.hf import RooftopStreamer
        assert issubclass(RooftopStreamer, BaseStreamer)
        s = RooftopStreamer(Aggregator(socket_path="/nonexistent/x.sock", autostart=False))
        s.put([[1, 2]]); s.put([3]); s.end()
        """
    )
    env = {"PYTHONPATH": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_plain_class_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"  # import fails like an absent package
        "from rooftop.agent.hooks.hf import RooftopStreamer\n"
        "assert [c.__name__ for c in RooftopStreamer.__mro__] == "
        "['RooftopStreamer', '_StreamerBase', 'object']\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
