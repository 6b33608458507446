"""A message that is not a Batch ends the stream with INVALID_ARGUMENT, and is counted.

Before: the stream ended with status OK (the client was told all was well) and the
message was counted nowhere.
"""

from __future__ import annotations

import grpc  # noqa: TID251 — a raw client that sends bytes, not a Batch
import pytest

from tests.collector.helpers import AgentStream, batch, gpu
from tests.e2e.adversarial.conftest import report
from tests.e2e.conftest import Harness

pytestmark = pytest.mark.slow


def test_an_unreadable_message_gets_invalid_argument_and_is_counted(e2e: Harness):
    c = e2e.collector()
    with grpc.insecure_channel(c.address) as channel:
        stream = channel.stream_stream(
            "/rooftop.v1.Ingest/Stream",
            request_serializer=lambda raw: raw,
            response_deserializer=lambda raw: raw,
        )
        with pytest.raises(grpc.RpcError) as failed:
            list(stream(iter([b"\xff\xff\xff\xff not protobuf"]), timeout=20))
    code, details = failed.value.code(), failed.value.details()
    counted = c.metric("rooftop_collector_rejected_total", rooftop_reject_reason="unreadable")
    # The collector goes on serving agents.
    with AgentStream(c.address) as good:
        good.send(batch(1, agent_id="good", records=[gpu(0)]))
        good.wait_acked(1)
    report("unreadable", {"status": code.name, "counted": counted})
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a rooftop.v1.Batch" in details
    assert counted == 1
