"""A remote-write 1.0 receiver on loopback for tests: decodes every POST it is sent.

It answers with the statuses it is told to (``script``), then 204, and keeps each
decoded ``WriteRequest`` with its headers. The real receiver (Prometheus) is in
``test_remote_write_prometheus.py``; this one lets a test see the bytes and make errors.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from rooftop.collector.config import CollectorConfig
from rooftop.collector.remote_write import RemoteWrite
from rooftop.collector.service import Collector
from rooftop.collector.snappy import decompress
from rooftop.prompb import remote_pb2


class Receiver:
    """``url`` takes POSTs; ``requests`` holds (headers, WriteRequest) of each."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], remote_pb2.WriteRequest]] = []
        self.script: list[int] = []  # statuses to answer first, in order
        self.posts = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver._lock:
                    receiver.posts += 1
                    status = receiver.script.pop(0) if receiver.script else 204
                    if status == 204:
                        request = remote_pb2.WriteRequest.FromString(decompress(body))
                        receiver.requests.append((dict(self.headers.items()), request))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/api/v1/write"

    def points(self) -> Iterator[tuple[dict[str, str], int, float]]:
        """Every sample received: (labels, timestamp ms, value)."""
        with self._lock:
            requests = [r for _, r in self.requests]
        for request in requests:
            for ts in request.timeseries:
                labels = {label.name: label.value for label in ts.labels}
                for s in ts.samples:
                    yield labels, s.timestamp, s.value

    def close(self) -> None:
        """Stop serving."""
        self._httpd.shutdown()
        self._httpd.server_close()


def start_collector(receiver: Receiver, **remote: object) -> Collector:
    """A started collector (loopback ports) remote-writing to ``receiver``.

    ``remote``: ``RemoteWrite`` fields besides the url (its sends wait at most 50 ms).
    """
    rw = RemoteWrite(url=receiver.url, batch_send_deadline_s=0.05, **remote)  # type: ignore[arg-type]
    config = CollectorConfig(
        listen="127.0.0.1:0",
        insecure=True,
        prometheus_listen="127.0.0.1:0",
        remote_write=(rw,),
    ).validated()
    c = Collector(config)
    c.start()
    return c
