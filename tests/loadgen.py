"""A fleet of simulated agents in ONE process: real gRPC streams, homing, a seq ledger.

``LoadGen`` runs N agents (8 GPUs each, one batch a second by default) on one
``grpc.aio`` event loop in a background thread. Each agent behaves as the real
agent's ``Streamer`` does where the collectors can tell (rooftop/agent/stream.py):

- it picks its collector with ``rooftop.agent.homing.Homing`` (rendezvous ranking of
  the collectors' addresses: the same home the real agent would pick);
- one bidi ``Ingest.Stream`` at a time, with the agent id in the metadata; at most
  ``WINDOW`` batches unacked; a batch a second, numbered ``seq`` 1, 2, ... per boot;
- on a stream failure it moves to the next-ranked collector (``Homing.failed``) and
  reconnects within a second, resending every unacked batch, oldest first (the
  spool's at-least-once);
- while away it probes home with the gRPC health check every ``probe_interval_s``
  (the agent's 5 s) and goes home after ``return_after_s`` of answers
  (``Homing.probed_home``): gracefully, as the real agent does (no new batches, a
  half-close, the last acks, then home).

Batches are real ``rooftop.v1.Batch`` messages: one ``GpuColumns`` block of the 8 GPUs' samples
(what an agent sends to a collector that takes columns; ``batch_format="records"``: one
``GpuSample`` record each, an older agent) stamped with the current time, and a ``Verdict``
per GPU every ``verdict_every`` batches, but encoded by byte concatenation from
per-second and per-agent templates, so that the generator's CPU stays small next to
the collectors'. ``Batch`` fields may appear in any order on the wire, which is what
makes that exact.

The **ledger** (``AgentLedger``) is what the test checks the collectors against:
per agent, the last seq sent, the highest acked, every seq sent on more than one
stream before its ack (each collector that got it may have applied it: "applied
again, and counted"), and the homing events with their wall-clock times.

Channels: ``channels_per_collector`` HTTP/2 connections per collector, the agents'
streams spread over them (an agent's "connection" is its stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc  # noqa: TID251 - a test-side client, like the real agent's stream.py
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rooftop.agent.homing import Endpoint, Homing
from rooftop.collector.snappy import varint
from rooftop.common import columns, gcpolicy
from rooftop.common.codec import timestamp
from rooftop.common.wire import AGENT_ID_METADATA, INGEST_SERVICE
from rooftop.v1 import telemetry_pb2 as pb

__all__ = ["AgentLedger", "Event", "LoadGen"]

WINDOW = 64  # the real agent's max_in_flight
GPU_NAME = "NVIDIA H100 80GB HBM3"
# Every simulated GPU's readings (a memory-bound decode); identity and time added per agent.
_SAMPLE = pb.GpuSample(
    gpu_name=GPU_NAME, busy_pct=95.5, mem_ctrl_pct=97.1, sm_active_pct=81.3,
    sm_occupancy_pct=11.7, tensor_active_pct=2.2, fp16_active_pct=1.0,
    fp32_active_pct=0.5, fp64_active_pct=0.0, dram_bw_pct=84.8,
    pcie_rx_bytes_per_s=1.5e9, pcie_tx_bytes_per_s=0.5e9, pcie_link_gen=5,
    pcie_link_width=16, power_w=650.0, sm_clock_mhz=1980.0,
    mem_used_bytes=70 * 2**30, mem_total_bytes=80 * 2**30, temperature_c=61.0,
)  # fmt: skip


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def _timestamp(t_s: float) -> bytes:
    return timestamp(t_s).SerializeToString()


@dataclass(frozen=True, slots=True)
class Event:
    """One homing event of one agent, on the generator's wall clock."""

    time_s: float
    kind: str  # "streaming" (first ack on a stream), "failed", "home" (returned)
    address: str
    detail: str = ""  # why a stream failed (its gRPC status), for the test's messages


def _why(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


@dataclass(slots=True)
class AgentLedger:
    """What one simulated agent sent where, and what came back."""

    agent_id: str
    boot_id: str
    hostname: str
    home: str
    gpu_uuids: tuple[str, ...]
    last_seq: int = 0  # the newest seq generated
    acked_seq: int = 0  # the highest cumulative ack received
    # seq -> (wire bytes, addresses it was sent to), oldest first; dropped once acked.
    unacked: OrderedDict[int, tuple[bytes, list[str]]] = field(default_factory=OrderedDict)
    # Sent on more than one stream before its ack (a failover, a return home): each
    # collector that got it may have applied it ("applied again, and counted").
    multi_sent: set[int] = field(default_factory=set)
    sends: int = 0
    resends: int = 0  # sends of a seq sent before (after a failover or a return)
    events: list[Event] = field(default_factory=list)
    current: str = ""


class _Templates:
    """Per-second wire pieces shared by every agent (the time-stamped parts)."""

    def __init__(self, now_s: float, verdict_window_s: float, samples_per_gpu: int = 1) -> None:
        body = _SAMPLE.SerializeToString()
        # A batch of a faster agent holds several ticks, oldest first, over its interval.
        self.samples = [
            _field(1, _timestamp(now_s - (samples_per_gpu - 1 - k) / samples_per_gpu)) + body
            for k in range(samples_per_gpu)
        ]
        verdict = pb.Verdict(
            verdict="memory-bound", confidence=0.9, rule="dram_high", samples=5,
            active_samples=5,
        )  # fmt: skip
        verdict.window_start.CopyFrom(Timestamp(seconds=int(now_s - verdict_window_s)))
        verdict.window_end.CopyFrom(Timestamp(seconds=int(now_s)))
        self.verdict = verdict.SerializeToString()
        self.sent_time = _field(8, _timestamp(now_s))
        # Columns: every agent's block differs only in identity; the times are shared.
        self.times_us = [
            int(now_s * 1e6) - (samples_per_gpu - 1 - k) * 1_000_000 // samples_per_gpu
            for k in range(samples_per_gpu)
        ]
        self.time_us_cache: dict[int, bytes] = {}

    def time_us_field(self, gpus: int) -> bytes:
        """``GpuColumns.time_us`` for ``gpus`` GPUs: rows are tick-major (all GPUs, then
        the next tick), as the agent's batcher writes them."""
        field_ = self.time_us_cache.get(gpus)
        if field_ is None:
            rows = [t for t in self.times_us for _ in range(gpus)]
            field_ = self.time_us_cache[gpus] = _field(2, struct.pack(f"<{len(rows)}q", *rows))
        return field_


class _Agent:
    def __init__(self, gen: LoadGen, index: int, boot_id: str) -> None:
        agent_id = f"load-{index:05d}"
        self.gen = gen
        self.homing = Homing(agent_id, gen.endpoints, return_after_s=gen.return_after_s)
        self.channel_index = index % gen.channels_per_collector
        uuids = tuple(f"GPU-{index:05d}-{g}" for g in range(gen.gpus))
        self.ledger = AgentLedger(
            agent_id, boot_id, f"node-{index:05d}", self.homing.home.address, uuids
        )
        # Per-agent wire prefixes: identity fields of the Batch, and each GPU's index + uuid.
        self.head = (
            _field(1, agent_id.encode())
            + _field(2, boot_id.encode())
            + _field(7, self.ledger.hostname.encode())
        )
        self.gpu_ids = [
            b"\x10" + varint(g) + _field(3, uuid_.encode()) for g, uuid_ in enumerate(uuids)
        ]
        self.metadata = ((AGENT_ID_METADATA, agent_id),)
        self.columns_static = self._columns_static(uuids) if gen.batch_format == "columns" else b""
        self.new_batch = asyncio.Event()

    def _columns_static(self, uuids: tuple[str, ...]) -> bytes:
        """This agent's ``GpuColumns`` without ``time_us`` (added per batch: fields may
        come in any order on the wire)."""
        gen = self.gen
        msgs = []
        for _ in range(gen.samples_per_gpu):
            for g, uuid_ in enumerate(uuids):
                msg = pb.GpuSample(gpu_index=g, gpu_uuid=uuid_)
                msg.MergeFrom(_SAMPLE)
                msg.time.FromMicroseconds(1)
                msgs.append(msg)
        cols = columns.encode(msgs)
        cols.ClearField("time_us")
        return cols.SerializeToString()

    def encode(self, seq: int, tpl: _Templates) -> bytes:
        """One Batch on the wire: identity, seq, 8 GPU records (or one columns block),
        sometimes 8 verdicts."""
        parts = [self.head, b"\x18" + varint(seq), tpl.sent_time]
        if self.columns_static:
            parts.append(_field(20, self.columns_static + tpl.time_us_field(len(self.gpu_ids))))
        else:
            for sample in tpl.samples:
                for gpu in self.gpu_ids:
                    parts.append(_field(4, _field(1, gpu + sample)))  # records { gpu { ... } }
        if seq % self.gen.verdict_every == 0:
            for g, gpu_uuid in enumerate(self.ledger.gpu_uuids):
                ident = b"\x18" + varint(g) + _field(4, gpu_uuid.encode())
                parts.append(_field(5, ident + tpl.verdict))
        return b"".join(parts)

    def generate(self, tpl: _Templates) -> None:
        """The sampler's side: one new batch into the 'spool'."""
        led = self.ledger
        led.last_seq += 1
        led.unacked[led.last_seq] = (self.encode(led.last_seq, tpl), [])
        self.new_batch.set()

    def on_ack(self, ack: pb.Ack, address: str, first: list[bool]) -> None:
        led = self.ledger
        if first[0]:
            first[0] = False
            led.events.append(Event(time.time(), "streaming", address))
        if ack.acked_seq > led.acked_seq:
            led.acked_seq = ack.acked_seq
            while led.unacked:
                seq = next(iter(led.unacked))
                if seq > led.acked_seq:
                    break
                _, sent_to = led.unacked.pop(seq)
                if len(sent_to) > 1:
                    led.multi_sent.add(seq)

    async def run(self, start_delay_s: float) -> None:
        await asyncio.sleep(start_delay_s)
        gen = self.gen
        while not gen.stopping.is_set():
            endpoint = self.homing.current
            self.ledger.current = endpoint.address
            try:
                went_home = await self.session(endpoint.address)
            except Exception as exc:  # any end of the stream but ours is a failure: fail over
                went_home = False
                if gen.stopping.is_set():
                    return
                self.ledger.events.append(
                    Event(time.time(), "failed", endpoint.address, _why(exc))
                )
                self.homing.failed()
                # Reconnect within a second, spread so a dead collector's agents do not
                # all land on the next one in the same millisecond.
                await asyncio.sleep(random.uniform(0.05, 0.5))
            if went_home:
                self.homing.go_home()
                self.ledger.events.append(Event(time.time(), "home", self.homing.home.address))

    async def session(self, address: str) -> bool:
        """One stream; True when it ended to go home, False when the generator stops."""
        gen = self.gen
        channel = gen.channel(address, self.channel_index)
        call = channel.stream_stream(
            "/rooftop.v1.Ingest/Stream",
            request_serializer=lambda b: b,
            response_deserializer=pb.Ack.FromString,
        )(metadata=self.metadata)
        first = [True]

        async def read() -> None:
            async for ack in call:
                self.on_ack(ack, address, first)

        reader = asyncio.ensure_future(read())
        reader.add_done_callback(lambda _: self.new_batch.set())  # wake the sender
        led = self.ledger
        sent_here: set[int] = set()
        next_probe_s = time.monotonic() + gen.probe_interval_s
        probe: asyncio.Future[bool] | None = None
        try:
            while not gen.stopping.is_set():
                self.new_batch.clear()  # before the scan: a batch made during it wakes us
                # Everything unacked not yet sent on this stream, oldest first, in the window.
                in_flight = sum(1 for s in led.unacked if s in sent_here)
                for seq, (body, sent_to) in list(led.unacked.items()):
                    if seq in sent_here:
                        continue
                    if in_flight >= WINDOW:
                        break
                    in_flight += 1
                    if sent_to:
                        led.resends += 1
                    sent_to.append(address)
                    sent_here.add(seq)
                    led.sends += 1
                    # Batch.acked_seq (field 21, tag 0xa8 0x01) as the agent sets it: at send
                    # time, the highest ack so far; a later field is legal protobuf.
                    try:
                        await call.write(body + b"\xa8\x01" + varint(min(led.acked_seq, seq - 1)))
                    except asyncio.InvalidStateError:
                        # The call has ended ("RPC already finished"): its status says why.
                        raise ConnectionError(
                            f"{(await call.code()).name}: {await call.details()}"
                        ) from None
                if reader.done():
                    reader.result()  # raises the stream's error
                    raise ConnectionError(f"{address} ended the stream")
                # Woken by the next batch (every period), the reader's end, or stopping;
                # no timer per agent: thousands of them cost the loop more than the streams.
                await self.new_batch.wait()
                # The home probe runs beside the stream, as the agent's does: a slow home
                # never holds the batches back. Its answer is read at the next wake.
                if probe is not None and probe.done():
                    healthy, probe = probe.result(), None
                    if self.homing.probed_home(healthy, time.time()):
                        await call.done_writing()
                        with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError):
                            await asyncio.wait_for(reader, timeout=gen.drain_timeout_s)
                        return True
                if self.homing.away and probe is None and time.monotonic() >= next_probe_s:
                    next_probe_s = time.monotonic() + gen.probe_interval_s
                    probe = asyncio.ensure_future(
                        gen.probe(self.homing.home.address, self.channel_index)
                    )
            # Stopping: half-close and take the last acks.
            await call.done_writing()
            with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError):
                await asyncio.wait_for(reader, timeout=gen.drain_timeout_s)
            return False
        finally:
            if probe is not None and not probe.done():
                probe.cancel()
            if reader.done() and not reader.cancelled():
                reader.exception()  # retrieved: the failure is the one being handled
            if not reader.done():
                reader.cancel()
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await reader


class LoadGen:
    """N simulated agents against ``addresses``, on their own event loop thread.

    Args:
        addresses: the collectors (``host:port``), as the agents' ``collectors`` list.
        agents: how many agents.
        gpus: GPUs per agent.
        rate_hz: batches per agent per second.
        samples_per_gpu: samples per GPU in each batch (10: a 10 Hz agent batching each second).
        return_after_s: home must answer probes this long before an agent returns.
        verdict_every: every this many batches carry a verdict per GPU.
        channels_per_collector: HTTP/2 connections per collector the streams share.
        start_spread_s: agents start spread evenly over this long (no thundering herd).
        probe_interval_s: how often an agent away from home probes it (the agent's
            ``home_probe_interval_s`` default); each probe waits as long at most, as
            the agent's does (up to its ``connect_timeout_s``, 10 s).
        batch_format: ``columns`` (one ``GpuColumns`` block per batch: what an agent
            sends to a collector that takes them) or ``records`` (one GpuSample record
            each: an older agent).
    """

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        agents: int = 2000,
        gpus: int = 8,
        rate_hz: float = 1.0,
        samples_per_gpu: int = 1,
        return_after_s: float = 3.0,
        verdict_every: int = 5,
        channels_per_collector: int = 4,
        start_spread_s: float = 5.0,
        probe_interval_s: float = 5.0,
        drain_timeout_s: float = 2.0,
        batch_format: str = "columns",
    ) -> None:
        if batch_format not in ("records", "columns"):
            raise ValueError(f"batch_format must be records or columns, not {batch_format!r}")
        self.batch_format = batch_format
        self.endpoints = tuple(Endpoint(a) for a in addresses)
        self.agents_n = agents
        self.gpus = gpus
        self.rate_hz = rate_hz
        self.samples_per_gpu = samples_per_gpu
        self.return_after_s = return_after_s
        self.verdict_every = verdict_every
        self.channels_per_collector = channels_per_collector
        self.start_spread_s = start_spread_s
        self.probe_interval_s = probe_interval_s
        self.probes: Counter[str] = Counter()  # home probes by answer (or gRPC status)
        self.drain_timeout_s = drain_timeout_s
        self.boot_id = str(uuid.uuid4())
        self.stopping = asyncio.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="loadgen", daemon=True)
        self._channels: dict[tuple[str, int], grpc.aio.Channel] = {}
        self._agents: list[_Agent] = []
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.generating = True
        self._gc_before: tuple[int, int, int] | None = None

    # -- the test's side (any thread) --

    def start(self) -> LoadGen:
        """Start the agents (spread over ``start_spread_s``); returns at once.

        The process's GC is tuned as the daemons tune theirs (``gcpolicy``) until
        ``stop``: inside pytest the heap holds the whole session, and a full collection
        of it every few seconds stalled the agents' loop (their acks piled up unread).
        """
        self._gc_before = gcpolicy.tune()
        self._thread.start()
        self._ready.wait(30)
        return self

    def stop(self, drain_s: float = 20.0, timeout_s: float = 30.0) -> None:
        """Stop generating, wait up to ``drain_s`` for every batch's ack, then half-close
        every stream and take the last acks."""
        self.generating = False
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline and self.unacked() and self._thread.is_alive():
            time.sleep(0.1)
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop_now)
            self._thread.join(timeout_s)
        if self._gc_before is not None:
            gcpolicy.restore(self._gc_before)
            self._gc_before = None
        if self._error is not None:
            raise self._error

    def _stop_now(self) -> None:
        self.stopping.set()
        for agent in self._agents:
            agent.new_batch.set()

    def unacked(self) -> int:
        """Batches generated and not acked yet, over all agents."""
        return sum(len(a.ledger.unacked) for a in self._agents)

    @property
    def ledgers(self) -> list[AgentLedger]:
        """Every agent's ledger (read them after ``stop``, or accept a moving picture)."""
        return [a.ledger for a in self._agents]

    def homes(self) -> dict[str, list[AgentLedger]]:
        """The agents by home collector address."""
        out: dict[str, list[AgentLedger]] = {e.address: [] for e in self.endpoints}
        for led in self.ledgers:
            out[led.home].append(led)
        return out

    def on(self, address: str) -> int:
        """How many agents stream to ``address`` now."""
        return sum(1 for led in self.ledgers if led.current == address)

    # -- the loop's side --

    def channel(self, address: str, index: int) -> grpc.aio.Channel:
        key = (address, index)
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = grpc.aio.insecure_channel(
                address,
                options=[
                    ("grpc.use_local_subchannel_pool", 1),  # one connection per channel
                    ("grpc.initial_reconnect_backoff_ms", 200),
                    ("grpc.max_reconnect_backoff_ms", 1000),
                ],
            )
        return channel

    async def probe(self, address: str, index: int) -> bool:
        """The gRPC health check of the ingest service, as the agent's home probe."""
        stub = health_pb2_grpc.HealthStub(self.channel(address, index))
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=INGEST_SERVICE),
                timeout=max(0.1, min(self.probe_interval_s, 10.0)),
            )
        except grpc.aio.AioRpcError as exc:
            self.probes[exc.code().name] += 1
            return False
        serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        self.probes["SERVING" if serving else "NOT_SERVING"] += 1
        return bool(serving)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()
            self._loop.close()

    async def _main(self) -> None:
        self.stopping = asyncio.Event()
        self._agents = [_Agent(self, i, self.boot_id) for i in range(self.agents_n)]
        self._ready.set()
        step_s = self.start_spread_s / max(1, self.agents_n)
        tasks = [
            asyncio.ensure_future(agent.run(i * step_s)) for i, agent in enumerate(self._agents)
        ]
        ticker = asyncio.ensure_future(self._tick(step_s))
        await self.stopping.wait()
        await ticker
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in self._channels.values():
            await channel.close()

    async def _tick(self, step_s: float) -> None:
        # Each agent generates at its own phase (its start offset), as real hosts do.
        period_s = 1.0 / self.rate_hz
        start = time.monotonic()
        slots = max(1, min(self.agents_n, 50))  # generate in 50 groups per period
        group_s = period_s / slots
        n = 0
        while not self.stopping.is_set() and self.generating:
            now = time.monotonic()
            tpl = _Templates(time.time(), self.verdict_every * period_s, self.samples_per_gpu)
            slot = n % slots
            for i in range(slot, self.agents_n, slots):
                if now - start >= i * step_s:  # started
                    self._agents[i].generate(tpl)
            n += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.stopping.wait(), timeout=max(0.0, start + n * group_s - time.monotonic())
                )
