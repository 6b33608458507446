"""The client-side probe against a real local streaming HTTP server."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from rooftop.agent.engines.probe import (
    ProbeError,
    ProbeResult,
    chat_completions_url,
    format_probe,
    probe,
)
from rooftop.cli import main


def test_ttft_and_tpot_from_a_real_stream(sse_server):
    result = probe(sse_server.url, "tiny", prompt="hi", max_tokens=5)
    # Role chunk and keep-alives came at once; TTFT is the 150 ms before content.
    assert 140 <= result.ttft_ms < 400
    # 5 content chunks 50 ms apart: (last - first) / (5 - 1) = 50 ms.
    assert result.tpot_ms == pytest.approx(50, abs=20)
    assert result.content_chunks == 5
    assert result.completion_tokens == 5
    assert result.prompt_tokens == 9
    assert result.tokens_from == "usage"
    assert result.keepalives == 2
    assert result.malformed_lines == 0
    assert result.notes == ()
    assert result.total_ms >= result.ttft_ms
    request = sse_server.received[0]
    assert request["stream"] is True
    assert request["stream_options"] == {"include_usage": True}
    assert request["model"] == "tiny"
    assert request["max_tokens"] == 5
    assert request["messages"] == [{"role": "user", "content": "hi"}]


def test_tpot_uses_usage_tokens_not_chunks(sse_server):
    sse_server.tokens_per_piece = 3  # the server batches 3 tokens per chunk
    sse_server.pieces = ["a", "b", "c"]
    sse_server.step_s = 0.06
    result = probe(sse_server.url, "tiny")
    assert result.completion_tokens == 9
    # (last - first) = 2 x 60 ms over 9 - 1 tokens = 15 ms, not 60 ms per chunk.
    assert result.tpot_ms == pytest.approx(120 / 8, abs=6)


def test_without_usage_falls_back_to_chunks_and_says_so(sse_server):
    sse_server.usage = False
    result = probe(sse_server.url, "tiny")
    assert result.completion_tokens is None
    assert result.tokens_from == "chunks"
    assert result.tpot_ms == pytest.approx(50, abs=20)
    assert any("no usage" in n for n in result.notes)


def test_malformed_sse_lines_are_counted_not_fatal(sse_server):
    sse_server.extra_lines = ["data: {not json", "garbage line", "data: [1, 2]", "event: ping"]
    result = probe(sse_server.url, "tiny")
    assert result.malformed_lines == 3  # event: is valid SSE
    assert result.content_chunks == 5
    assert any("3 malformed" in n for n in result.notes)


def test_single_token_has_no_tpot(sse_server):
    sse_server.pieces = ["only"]
    result = probe(sse_server.url, "tiny")
    assert result.tpot_ms is None
    assert "n/a" in format_probe(result)


def test_http_error_status(sse_server):
    sse_server.status = 503
    with pytest.raises(ProbeError, match="HTTP 503"):
        probe(sse_server.url, "tiny")


def test_error_object_in_stream(sse_server):
    sse_server.error_in_stream = True
    with pytest.raises(ProbeError, match="engine died"):
        probe(sse_server.url, "tiny")


def test_no_content_is_an_error(sse_server):
    sse_server.pieces = []
    with pytest.raises(ProbeError, match="no content"):
        probe(sse_server.url, "tiny")


def test_unreachable(closed_port_url):
    with pytest.raises(ProbeError, match="127.0.0.1"):
        probe(closed_port_url, "tiny", timeout_s=2)


def test_timeout_mid_stream(sse_server):
    sse_server.ttft_s = 1.0
    with pytest.raises(ProbeError, match="timed out"):
        probe(sse_server.url, "tiny", timeout_s=0.3)


def test_api_key_sent_as_bearer(sse_server):
    probe(sse_server.url, "tiny", api_key="sekret")
    assert sse_server.headers[0]["Authorization"] == "Bearer sekret"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://h:8000", "http://h:8000/v1/chat/completions"),
        ("http://h:8000/", "http://h:8000/v1/chat/completions"),
        ("http://h:8000/v1", "http://h:8000/v1/chat/completions"),
        ("https://h/v1/chat/completions", "https://h/v1/chat/completions"),
        ("http://h/proxy/v1/", "http://h/proxy/v1/chat/completions"),
    ],
)
def test_endpoint_url(url, expected):
    assert chat_completions_url(url) == expected


@pytest.mark.parametrize("url", ["ftp://h/", "h:8000", "", "http://"])
def test_bad_url(url):
    with pytest.raises(ProbeError):
        chat_completions_url(url)


def test_result_to_dict_is_json_ready():
    r = ProbeResult("u", "m", 1.0, 2.0, 3.0, 4, 5, 6, 7, 8, "usage", ("n",))
    assert json.loads(json.dumps(r.to_dict()))["notes"] == ["n"]


def test_cli_probe_json(sse_server):
    out = CliRunner().invoke(
        main, ["probe", sse_server.url, "--model", "tiny", "--max-tokens", "5", "--json"]
    )
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["completion_tokens"] == 5
    assert 140 <= doc["ttft_ms"] < 400
    assert sse_server.received[0]["max_tokens"] == 5


def test_cli_probe_text(sse_server):
    out = CliRunner().invoke(main, ["probe", sse_server.url, "-m", "tiny", "--prompt", "yo"])
    assert out.exit_code == 0, out.output
    assert "TTFT" in out.output and "TPOT" in out.output
    assert sse_server.received[0]["messages"][0]["content"] == "yo"


def test_cli_probe_failure_is_one_line(closed_port_url):
    out = CliRunner().invoke(main, ["probe", closed_port_url, "--model", "tiny"])
    assert out.exit_code == 1
    assert "Traceback" not in out.output
    assert len(out.output.strip().splitlines()) == 1
