"""Live diagnose with engine figures: in-process hooks and /metrics scraping, end to end.

Real processes: ``agentctl diagnose`` (fake GPUs) in a subprocess, a separate "engine"
process emitting tokens through ``rooftop.agent.hooks`` over the real unix socket, and a real
local HTTP server serving vLLM-shaped ``/metrics``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rooftop.agent.engines.sources import EngineEndpoint
from rooftop.common.errors import ConfigError

ENGINE = textwrap.dedent("""
    import sys, time
    from rooftop.agent.hooks import Aggregator
    agg = Aggregator(engine_id="toy-engine", socket_path=sys.argv[1], interval_s=0.2,
                     gpu_indices=(0,))
    end = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < end:
        req = agg.start_request()
        for _ in range(50):
            time.sleep(0.006)   # ~6 ms per token: H100-like decode
            req.token()
        req.end()
    agg.shutdown()
""")


def diagnose(*args: str, env: dict[str, str] | None = None) -> dict:
    out = subprocess.run([sys.executable, "-m", "rooftop", "diagnose", "--json", *args],
                         capture_output=True, text=True, check=True, timeout=60,
                         env={**os.environ, **(env or {})})
    return json.loads(out.stdout)


@pytest.mark.slow
def test_hooks_in_another_process_give_tpot_in_live_diagnose(tmp_path: Path):
    sock = str(tmp_path / "hooks.sock")
    engine = subprocess.Popen([sys.executable, "-c", ENGINE, sock, "6"])
    try:
        report = diagnose("--fake", "h100:decode", "--seconds", "4",
                          env={"ROOFTOP_HOOK_SOCKET": sock})
    finally:
        engine.wait(timeout=30)
    gpu = report["gpus"][0]
    assert gpu["verdict"] == "memory-bound"
    tpot = gpu["evidence"]["tpot_ms"]
    assert tpot["provenance"] == "engine"
    assert 5.0 < tpot["value"] < 12.0  # 6 ms sleeps plus scheduling jitter
    assert 5.0 < gpu["evidence"]["ttft_ms"]["value"] < 50.0  # first token after one sleep


VLLM_METRICS = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{model_name="m"}} 4
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{model_name="m"}} 0
# TYPE vllm:inter_token_latency_seconds histogram
vllm:inter_token_latency_seconds_bucket{{le="0.005",model_name="m"}} 0
vllm:inter_token_latency_seconds_bucket{{le="0.01",model_name="m"}} {n}
vllm:inter_token_latency_seconds_bucket{{le="+Inf",model_name="m"}} {n}
vllm:inter_token_latency_seconds_sum{{model_name="m"}} {s}
vllm:inter_token_latency_seconds_count{{model_name="m"}} {n}
"""


@pytest.fixture
def vllm_server() -> Iterator[str]:
    scrapes = {"n": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            scrapes["n"] += 1
            n = 1000 * scrapes["n"]
            body = VLLM_METRICS.format(n=n, s=n * 0.0062).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_scraped_vllm_tpot_is_tied_to_the_named_gpu(vllm_server: str, tmp_path: Path):
    report = diagnose("--fake", "h100:decode,idle", "--seconds", "3", "--no-hooks",
                      "--engine-url", f"{vllm_server}@0")
    gpu0, gpu1 = report["gpus"]
    assert gpu0["evidence"]["tpot_ms"]["value"] == pytest.approx(6.2, abs=0.05)
    assert gpu0["evidence"]["requests"]["value"] == pytest.approx(4)
    assert "tpot_ms" not in gpu1["evidence"]


@pytest.mark.parametrize(("text", "url", "gpus"), [
    ("http://h:8000/metrics", "http://h:8000/metrics", ()),
    ("http://h:8000/metrics@0,3", "http://h:8000/metrics", (0, 3)),
    ("http://user@h:8000/metrics", "http://user@h:8000/metrics", ()),
])
def test_engine_endpoint_parsing(text, url, gpus):
    assert EngineEndpoint.parse(text) == EngineEndpoint(url, gpus)


def test_engine_endpoint_without_scheme_is_a_config_error():
    with pytest.raises(ConfigError, match="http"):
        EngineEndpoint.parse("localhost:8000/metrics")
