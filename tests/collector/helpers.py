"""Helpers for the collector tests: batch builders and a real gRPC client stream."""

from __future__ import annotations

import queue
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence

import grpc

from rooftop.collector.config import CollectorConfig
from rooftop.collector.fleet import Fleet
from rooftop.collector.ingest import IngestServer
from rooftop.collector.service import Collector
from rooftop.common.codec import record_to_proto, timestamp, verdict_to_proto
from rooftop.common.columns import encode
from rooftop.common.model import (
    Bound,
    EngineSample,
    Evidence,
    GpuProcess,
    GpuSample,
    Provenance,
    Verdict,
)
from rooftop.v1 import telemetry_pb2 as pb
from rooftop.v1 import telemetry_pb2_grpc

H100 = "NVIDIA H100 80GB HBM3"


def gpu(index: int = 0, time_s: float | None = None, **metrics: object) -> GpuSample:
    fields: dict[str, object] = {
        "busy_pct": 95.5,
        "mem_ctrl_pct": 97.1,
        "sm_active_pct": 81.3,
        "sm_occupancy_pct": 11.7,
        "tensor_active_pct": 2.2,
        "fp16_active_pct": 1.0,
        "fp32_active_pct": 0.5,
        "fp64_active_pct": 0.0,
        "dram_bw_pct": 84.8,
        "power_w": 650.0,
        "sm_clock_mhz": 1980.0,
        "mem_used_bytes": 70 * 2**30,
        "mem_total_bytes": 80 * 2**30,
        "temperature_c": 61.0,
        "pcie_rx_bytes_per_s": 1.5e9,
        "pcie_tx_bytes_per_s": 0.5e9,
        "processes": (GpuProcess(pid=4242, gpu_mem_bytes=60 * 2**30),),
    }
    fields["gpu_uuid"] = f"GPU-{index:04d}-uuid"
    fields["gpu_name"] = H100
    fields.update(metrics)
    return GpuSample(
        time_s=time.time() if time_s is None else time_s,
        gpu_index=index,
        **fields,  # type: ignore[arg-type]
    )


def engine(time_s: float | None = None, **fields: object) -> EngineSample:
    values: dict[str, object] = {
        "engine_id": "vllm:8000",
        "requests_running": 8,
        "requests_waiting": 2,
        "tpot_ms": 5.84,
        "ttft_ms": 42.0,
        "output_tokens": 1000,
        "pid": 4242,
        "model": "meta-llama/Llama-3.1-8B-Instruct",
    }
    values.update(fields)
    return EngineSample(time_s=time.time() if time_s is None else time_s, **values)  # type: ignore[arg-type]


def verdict(index: int = 0, bound: Bound = Bound.MEMORY, **fields: object) -> Verdict:
    now = time.time()
    values: dict[str, object] = {
        "gpu_index": index,
        "gpu_uuid": f"GPU-{index:04d}-uuid",
        "gpu_name": H100,
        "verdict": bound,
        "cause": None,
        "confidence": 0.9,
        "rule": "dram > 80 and compute < 60",
        "evidence": (Evidence("dram_pct", 84.8, Provenance.GPM),),
        "recommendations": ("FP8 KV cache",),
        "regimes": ((bound, 1.0),),
        "samples": 50,
        "active_samples": 50,
        "window_start_s": now - 5,
        "window_end_s": now,
    }
    values.update(fields)
    return Verdict(**values)  # type: ignore[arg-type]


def batch(
    seq: int,
    *,
    agent_id: str = "agent-1",
    boot_id: str = "boot-1",
    hostname: str = "gpu-node-1",
    records: Sequence[object] = (),
    verdicts: Sequence[Verdict | pb.Verdict] = (),
    stats: pb.AgentStats | None = None,
) -> pb.Batch:
    msg = pb.Batch(agent_id=agent_id, boot_id=boot_id, seq=seq, hostname=hostname)
    for r in records:
        msg.records.append(r if isinstance(r, pb.TraceRecord) else record_to_proto(r))  # type: ignore[arg-type]
    for v in verdicts:
        msg.verdicts.append(v if isinstance(v, pb.Verdict) else verdict_to_proto(v))
    if stats is not None:
        msg.stats.CopyFrom(stats)
    msg.sent_time.CopyFrom(timestamp(time.time()))
    return msg


def target(server: IngestServer) -> str:
    """The loopback address ``server`` listens on."""
    return f"127.0.0.1:{server.port}"


def scrape(c: Collector) -> str:
    """What ``c``'s Prometheus endpoint serves now."""
    url = f"http://127.0.0.1:{c.telemetry.prometheus_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def start_server(
    *, config: CollectorConfig | None = None, observers: Sequence[object] = (), **overrides: object
) -> tuple[IngestServer, Fleet]:
    cfg = config or CollectorConfig(listen="127.0.0.1:0", insecure=True, **overrides)  # type: ignore[arg-type]
    fleet = Fleet(forget_after_s=cfg.forget_after_s, limits=cfg.fleet_limits())
    server = IngestServer(fleet, cfg, observers=observers)  # type: ignore[arg-type]
    server.start()
    return server, fleet


class AgentStream:
    """A real client stream: send batches, read acks on a thread."""

    def __init__(
        self,
        target: str,
        *,
        metadata: Sequence[tuple[str, str]] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, object]] = (),
    ) -> None:
        opts = [("grpc.max_send_message_length", 64 * 2**20), *options]
        self.channel = (
            grpc.secure_channel(target, credentials, options=opts)
            if credentials is not None
            else grpc.insecure_channel(target, options=opts)
        )
        self._requests: queue.Queue[pb.Batch | None] = queue.Queue()
        stub = telemetry_pb2_grpc.IngestStub(self.channel)
        self.call = stub.Stream(self._iter(), metadata=metadata)
        self.acks: list[pb.Ack] = []
        self.error: grpc.RpcError | None = None
        self._cond = threading.Condition()
        self._done = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _iter(self) -> Iterator[pb.Batch]:
        while True:
            item = self._requests.get()
            if item is None:
                return
            yield item

    def _read(self) -> None:
        try:
            for ack in self.call:
                with self._cond:
                    self.acks.append(ack)
                    self._cond.notify_all()
        except grpc.RpcError as exc:
            self.error = exc
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def send(self, *batches: pb.Batch) -> None:
        for b in batches:
            self._requests.put(b)

    def wait(self, pred: Callable[[list[pb.Ack]], bool], timeout_s: float = 10.0) -> list[pb.Ack]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not pred(self.acks):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._done:
                    if pred(self.acks):
                        break
                    got = [(a.acked_seq, a.rejected_seq) for a in self.acks]
                    raise AssertionError(f"condition not met; acks={got} error={self.error}")
                self._cond.wait(remaining)
            return list(self.acks)

    def wait_acked(self, seq: int, timeout_s: float = 10.0) -> list[pb.Ack]:
        return self.wait(lambda acks: any(a.acked_seq >= seq for a in acks), timeout_s)

    def wait_done(self, timeout_s: float = 10.0) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._done, timeout_s)
        assert self._done, "stream did not end"

    def close(self) -> None:
        self._requests.put(None)
        self._reader.join(timeout=10)
        self.channel.close()

    def __enter__(self) -> AgentStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def as_columns(msg: pb.Batch) -> pb.Batch:
    """``msg`` with its GPU samples moved from records into ``gpu_columns`` (in order)."""
    out = pb.Batch()
    out.CopyFrom(msg)
    del out.records[:]
    out.records.extend(rec for rec in msg.records if not rec.HasField("gpu"))
    out.gpu_columns.CopyFrom(encode([rec.gpu for rec in msg.records if rec.HasField("gpu")]))
    return out
