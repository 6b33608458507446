"""Real local servers for the engine-side tests: a /metrics endpoint and an SSE stream."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # AF_UNIX paths are capped at 108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class MetricsEndpoint:
    """What the local /metrics server answers; tests change it between scrapes."""

    url: str
    body: str = ""
    status: int = 200
    requests: int = 0


class _Server(ThreadingHTTPServer):
    # Join handler threads on close, and keep their errors (a client that hung up
    # mid-stream) off stderr: a late traceback would land in a later test's output.
    daemon_threads = False
    block_on_close = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass


class _QuietHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


@pytest.fixture
def metrics_server() -> Iterator[MetricsEndpoint]:
    endpoint = MetricsEndpoint(url="")

    class Handler(_QuietHandler):
        def do_GET(self) -> None:
            endpoint.requests += 1
            data = endpoint.body.encode()
            self.send_response(endpoint.status)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = _Server(("127.0.0.1", 0), Handler)
    endpoint.url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield endpoint
    server.shutdown()
    server.server_close()
    thread.join(5)


@dataclass
class StreamScript:
    """What the fake OpenAI server streams, and what it was asked."""

    url: str = ""
    ttft_s: float = 0.15
    step_s: float = 0.05
    pieces: list[str] = field(default_factory=lambda: ["Hello", " world", ",", " one", " two"])
    tokens_per_piece: int = 1
    usage: bool = True
    keepalives: int = 2
    extra_lines: list[str] = field(default_factory=list)  # raw lines after the first content
    status: int = 200
    error_in_stream: bool = False
    received: list[dict[str, object]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)


def _chunk(delta: dict[str, object], *, finish: str | None = None) -> str:
    doc = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "tiny",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return "data: " + json.dumps(doc) + "\n\n"


@pytest.fixture
def sse_server() -> Iterator[StreamScript]:
    script = StreamScript()

    class Handler(_QuietHandler):
        def _send_chunk(self, text: str) -> None:
            data = text.encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            script.received.append(json.loads(self.rfile.read(length)))
            script.headers.append(dict(self.headers))
            if self.path != "/v1/chat/completions" or script.status != 200:
                status = 404 if script.status == 200 else script.status
                body = b'{"error": {"message": "nope"}}'
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            # The role-only first chunk comes at once, long before any token.
            self._send_chunk(_chunk({"role": "assistant", "content": ""}))
            for _ in range(script.keepalives):
                self._send_chunk(": keep-alive\n\n")
            time.sleep(script.ttft_s)
            if script.error_in_stream:
                self._send_chunk('data: {"error": {"message": "engine died"}}\n\n')
            for i, piece in enumerate(script.pieces):
                if i:
                    time.sleep(script.step_s)
                self._send_chunk(_chunk({"content": piece}))
                if i == 0:
                    for line in script.extra_lines:
                        self._send_chunk(line + "\n\n")
            self._send_chunk(_chunk({}, finish="length"))
            if script.usage:
                tokens = len(script.pieces) * script.tokens_per_piece
                usage = {"prompt_tokens": 9, "completion_tokens": tokens}
                doc = {"id": "chatcmpl-1", "choices": [], "usage": usage}
                self._send_chunk("data: " + json.dumps(doc) + "\n\n")
            self._send_chunk("data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    server = _Server(("127.0.0.1", 0), Handler)
    script.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield script
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def closed_port_url() -> str:
    # Bind then close: nothing listens there for the rest of the test (ECONNREFUSED).
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"
