"""The fleet's cardinality bounds (``FleetLimits``), without sockets: what is new past a
bound is refused and counted, what is known goes on being updated."""

from __future__ import annotations

import pytest

from rooftop.collector.config import CollectorConfig, load_config
from rooftop.collector.fleet import (
    Fleet,
    FleetLimits,
    LimitReason,
    OverLimit,
    PoisonBatch,
    RejectReason,
    decode_batch,
)
from rooftop.common.errors import ConfigError
from rooftop.common.model import PodRef
from rooftop.v1 import telemetry_pb2 as pb
from tests.collector.helpers import batch, engine, gpu

NOW = 1_800_000_000.0


def apply(fleet: Fleet, b: pb.Batch, received_s: float = NOW) -> None:
    decoded = decode_batch(b, received_s=received_s)
    fleet.check_labels(decoded)
    fleet.apply(decoded, received_s=received_s)


def agent_batch(n: int, *gpus: int, seq: int = 1, **fields: object) -> pb.Batch:
    return batch(seq, agent_id=f"agent-{n}", hostname=f"node-{n}",
                 records=[gpu(i, time_s=NOW, gpu_uuid=f"GPU-{n}-{i}") for i in gpus],
                 **fields)  # type: ignore[arg-type]  # fmt: skip


def limited(fleet: Fleet) -> dict[str, int]:
    return dict(fleet.counts().limited)


def test_a_new_agent_past_max_agents_is_refused_whole_and_counted():
    fleet = Fleet(limits=FleetLimits(max_agents=2), clock=lambda: NOW)
    apply(fleet, agent_batch(1, 0))
    apply(fleet, agent_batch(2, 0))
    with pytest.raises(OverLimit, match=r"max_agents \(2\)") as refused:
        apply(fleet, agent_batch(3, 0))
    assert refused.value.reason is LimitReason.AGENTS
    snap = fleet.snapshot()
    assert {a.agent_id for a in snap.agents} == {"agent-1", "agent-2"}
    assert {g.agent_id for g in snap.gpus} == {"agent-1", "agent-2"}  # nothing of it applied
    # Known agents go on being served.
    apply(fleet, agent_batch(1, 0, seq=2), received_s=NOW + 1)
    assert limited(fleet) == {"agents": 1}
    assert fleet.counts().batches == 3


def test_an_agent_gone_silent_frees_its_place_for_a_new_one():
    fleet = Fleet(limits=FleetLimits(max_agents=1), forget_after_s=60, clock=lambda: NOW)
    apply(fleet, agent_batch(1, 0))
    apply(fleet, agent_batch(2, 0), received_s=NOW + 61)
    assert [a.agent_id for a in fleet.snapshot().agents] == ["agent-2"]
    assert limited(fleet) == {}


def test_new_gpus_past_max_gpus_per_agent_are_left_out_and_counted():
    fleet = Fleet(limits=FleetLimits(max_gpus_per_agent=2))
    apply(fleet, agent_batch(1, *range(100)))
    gpus = fleet.snapshot().gpus
    assert len(gpus) == 2
    assert limited(fleet) == {"gpus_per_agent": 98}
    # The two it holds are still updated; another agent has its own allowance.
    apply(fleet, agent_batch(1, *(g.gpu_index for g in gpus), seq=2), received_s=NOW + 1)
    apply(fleet, agent_batch(2, 0, 1))
    assert len(fleet.snapshot().gpus) == 4
    assert limited(fleet) == {"gpus_per_agent": 98}


def test_new_gpus_past_max_gpus_are_left_out_and_counted():
    fleet = Fleet(limits=FleetLimits(max_gpus=3))
    apply(fleet, agent_batch(1, 0, 1))
    apply(fleet, agent_batch(2, 0, 1))
    assert len(fleet.snapshot().gpus) == 3
    assert limited(fleet) == {"gpus": 1}


def test_new_engines_past_their_bounds_are_left_out_and_counted():
    fleet = Fleet(limits=FleetLimits(max_engines_per_agent=2, max_engines=3))
    records = [engine(time_s=NOW, engine_id=f"vllm:{8000 + i}") for i in range(5)]
    apply(fleet, batch(1, agent_id="a", records=records))
    apply(fleet, batch(1, agent_id="b", records=records))
    assert len(fleet.snapshot().engines) == 3
    # a: 2 kept, 3 past its own bound; b: 1 kept, then the collector is full for 4
    assert limited(fleet) == {"engines_per_agent": 3, "engines": 4}


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"hostname": "h" * 257}, "hostname"),
        ({"agent_id": "a" * 257}, "agent_id"),
        ({"records": [gpu(0, time_s=NOW, gpu_uuid="GPU-" + "u" * 300)]}, "gpu_uuid"),
        ({"records": [engine(time_s=NOW, engine_id="e" * 300)]}, "engine_id"),
        ({"records": [gpu(0, time_s=NOW, pods=(PodRef("p" * 300, "ns", "c"),))]}, "pod"),
        # Bytes, not characters: 65 four-byte characters are 260 bytes.
        ({"hostname": "\U0001f525" * 65}, "hostname"),
    ],
)
def test_an_identity_or_label_over_max_label_bytes_is_poison(fields, named):
    fleet = Fleet()
    b = batch(1, **fields)
    with pytest.raises(PoisonBatch, match=rf"{named} is longer than max_label_bytes \(256\)") as e:
        apply(fleet, b)
    assert e.value.reason is RejectReason.LABEL_TOO_LONG
    assert fleet.snapshot().agents == ()


def test_a_label_at_max_label_bytes_is_fine():
    fleet = Fleet()
    apply(fleet, batch(1, hostname="h" * 256, records=[gpu(0, time_s=NOW)]))
    assert fleet.snapshot().agents[0].hostname == "h" * 256


def test_the_limits_are_config_keys_with_the_fleet_defaults(tmp_path):
    assert CollectorConfig().fleet_limits() == FleetLimits()
    path = tmp_path / "collector.toml"
    path.write_text(
        "[collector]\ninsecure = true\nmax_agents = 10\nmax_gpus = 20\nmax_gpus_per_agent = 3\n"
        "max_engines = 30\nmax_engines_per_agent = 4\nmax_label_bytes = 64\n"
        "max_unread_acks = 8\nmax_connections = 100\nmax_handshakes = 5\n"
        "[prometheus]\nmax_connections = 2\ntimeout_s = 3\n"
    )
    config = load_config(path, env={})
    assert config.fleet_limits() == FleetLimits(10, 20, 3, 30, 4, 64)
    assert (config.max_unread_acks, config.max_connections, config.max_handshakes) == (8, 100, 5)
    assert (config.prometheus_max_connections, config.prometheus_timeout_s) == (2, 3.0)


@pytest.mark.parametrize("key", ["collector.max_agents", "collector.max_label_bytes",
                                 "prometheus.max_connections", "prometheus.timeout_s"])  # fmt: skip
def test_a_bound_of_zero_is_a_config_error_naming_it(tmp_path, key):
    section, name = key.split(".")
    path = tmp_path / "collector.toml"
    other = "" if section == "collector" else "\n[collector]\ninsecure = true"
    extra = "\ninsecure = true" if section == "collector" else ""
    path.write_text(f"[{section}]\n{name} = 0{extra}{other}\n")
    with pytest.raises(ConfigError, match=rf"{key} must be positive"):
        load_config(path, env={})
