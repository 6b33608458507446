"""OTLP metrics receivers for tests, built on the official opentelemetry-proto definitions.

``GrpcOtlpReceiver`` serves ``opentelemetry.proto.collector.metrics.v1.MetricsService``
on 127.0.0.1, port 0; ``HttpOtlpReceiver`` accepts OTLP/HTTP protobuf POSTs on
``/v1/metrics``. Both keep every ``ExportMetricsServiceRequest`` they receive.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric

ExportRequest = metrics_service_pb2.ExportMetricsServiceRequest


class _Store:
    def __init__(self) -> None:
        self.requests: list[ExportRequest] = []
        self._cond = threading.Condition()

    def add(self, request: ExportRequest) -> None:
        with self._cond:
            self.requests.append(request)
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[list[ExportRequest]], bool], timeout_s: float = 15) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not pred(self.requests):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no matching export in {timeout_s} s")
                self._cond.wait(remaining)

    def metrics(self) -> dict[str, Metric]:
        """The last exported version of every metric, by name."""
        out: dict[str, Metric] = {}
        with self._cond:
            for req in self.requests:
                for rm in req.resource_metrics:
                    for sm in rm.scope_metrics:
                        for m in sm.metrics:
                            out[m.name] = m
        return out

    def resource(self) -> dict[str, Any]:
        with self._cond:
            return attributes(self.requests[-1].resource_metrics[0].resource.attributes)


def value_of(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: value_of(kv.value) for kv in kvs if isinstance(kv, KeyValue)}


class _Servicer(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, store: _Store) -> None:
        self.store = store

    def Export(self, request, context):  # noqa: N802
        self.store.add(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class GrpcOtlpReceiver(_Store):
    """OTLP/gRPC on 127.0.0.1:<port>."""

    def __init__(self) -> None:
        super().__init__()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=2))
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Servicer(self), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(grace=None)


class HttpOtlpReceiver(_Store):
    """OTLP/HTTP protobuf on http://127.0.0.1:<port>/v1/metrics."""

    def __init__(self) -> None:
        super().__init__()
        store = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/metrics" or (
                    self.headers.get("Content-Type") != "application/x-protobuf"
                ):
                    self.send_response(404)
                    self.end_headers()
                    return
                store.add(ExportRequest.FromString(body))
                payload = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/metrics"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
