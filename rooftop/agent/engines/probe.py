"""Client-side TTFT/TPOT probe of any OpenAI-compatible streaming endpoint.

``agentctl probe URL --model M`` sends one streamed chat completion and times it
from the client: no hook, no ``/metrics``, works against vLLM, SGLang, TGI,
llama.cpp or a hosted API alike.

- TTFT: from sending the request (after the connection is up, so a TCP/TLS
  handshake is not counted) to the first chunk carrying content. The role-only
  first chunk (``{"delta": {"role": "assistant", "content": ""}}``) and SSE comment
  lines (``: keep-alive``) are not content.
- TPOT: (last content chunk - first content chunk) / (completion_tokens - 1), with
  ``completion_tokens`` from the final usage chunk, which ``stream_options:
  {"include_usage": true}`` asks for. Servers batch several tokens into one chunk,
  so counting chunks would overstate TPOT; without usage it falls back to chunks
  and says so.
- Lines that are not valid SSE JSON are counted (``malformed_lines``), not fatal.

Stdlib only (``http.client``), so it runs wherever the agent runs.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from rooftop.common.errors import ProbeError

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_PROMPT",
    "ProbeError",
    "ProbeResult",
    "chat_completions_url",
    "format_probe",
    "probe",
]

DEFAULT_PROMPT = "Count from 1 to 200, separated by spaces."
DEFAULT_MAX_TOKENS = 64
_MAX_LINE_BYTES = 1 << 20
_ERROR_BODY_BYTES = 2048


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One streamed completion, timed from the client."""

    url: str
    model: str
    ttft_ms: float
    tpot_ms: float | None  # None with fewer than two completion tokens
    total_ms: float
    completion_tokens: int | None  # from usage; None when the server sent none
    prompt_tokens: int | None
    content_chunks: int
    keepalives: int
    malformed_lines: int
    tokens_from: str  # "usage" or "chunks" (no usage: one token per chunk assumed)
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (field names as above)."""
        out = asdict(self)
        out["notes"] = list(self.notes)
        return out


def chat_completions_url(url: str) -> str:
    """The chat-completions endpoint for a base URL.

    ``http://h:8000``, ``http://h:8000/v1`` and ``http://h:8000/v1/chat/completions``
    all give ``http://h:8000/v1/chat/completions``.

    Args:
        url: base URL of the server, with or without ``/v1`` or the full path.

    Returns:
        The full endpoint URL.

    Raises:
        ProbeError: not an http(s) URL.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ProbeError(f"not an http(s) URL: {url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        path += "/chat/completions" if path.endswith("/v1") else "/v1/chat/completions"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def _content_of(chunk: dict[str, Any]) -> bool:
    """Whether a chunk carries generated text (reasoning text counts: it is tokens too)."""
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return False
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            continue
        for key in ("content", "reasoning_content", "reasoning"):
            text = delta.get(key)
            if isinstance(text, str) and text:
                return True
    return False


def _usage_int(usage: dict[str, Any], key: str) -> int | None:
    value = usage.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def probe(
    url: str,
    model: str,
    *,
    prompt: str = DEFAULT_PROMPT,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    timeout_s: float = 60.0,
    api_key: str | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> ProbeResult:
    """Stream one chat completion from ``url`` and time it.

    Args:
        url: server base URL (``/v1/chat/completions`` is appended when missing).
        model: model name to request.
        prompt: the user message; the default makes the model emit many tokens.
        max_tokens: completion length cap (at least 2 are needed for a TPOT).
        timeout_s: connect timeout and the longest silence tolerated mid-stream.
        api_key: sent as ``Authorization: Bearer``, for servers that want one.
        clock: seconds clock, injectable for tests.

    Returns:
        The timings and what the stream looked like.

    Raises:
        ProbeError: unreachable, timed out, an HTTP error status, an error object
            in the stream, or a stream without any content.
    """
    endpoint = chat_completions_url(url)
    parts = urllib.parse.urlsplit(endpoint)
    conn_cls = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    conn = conn_cls(parts.hostname or "", parts.port, timeout=timeout_s)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    headers = {
        "Content-Type": "application/json",
        "Accept": "text/event-stream",
        "User-Agent": "rooftop-probe",
    }
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        conn.connect()
        sent = clock()
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        if response.status != 200:
            detail = response.read(_ERROR_BODY_BYTES).decode("utf-8", errors="replace").strip()
            raise ProbeError(f"{endpoint}: HTTP {response.status} {response.reason}: {detail}")
        return _read_stream(response, endpoint, model, sent, clock)
    except TimeoutError as exc:
        raise ProbeError(f"{endpoint}: timed out after {timeout_s:g} s") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise ProbeError(f"{endpoint}: {exc}") from exc
    finally:
        conn.close()


def _read_stream(
    response: http.client.HTTPResponse,
    endpoint: str,
    model: str,
    sent: float,
    clock: Callable[[], float],
) -> ProbeResult:
    first: float | None = None
    last: float | None = None
    chunks = keepalives = malformed = 0
    usage: dict[str, Any] | None = None
    done = False
    notes: list[str] = []
    while True:
        raw = response.readline(_MAX_LINE_BYTES)
        if not raw:
            break
        now = clock()  # as soon as the line is in: this is when a user would see it
        line = raw.rstrip(b"\r\n")
        if not line:
            continue
        if line.startswith(b":"):
            keepalives += 1
            continue
        if not line.startswith(b"data:"):
            if not line.startswith((b"event:", b"id:", b"retry:")):
                malformed += 1
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            done = True
            break
        try:
            chunk = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError):
            malformed += 1
            continue
        if not isinstance(chunk, dict):
            malformed += 1
            continue
        if "error" in chunk:
            raise ProbeError(f"{endpoint}: error in stream: {chunk['error']}")
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
        if _content_of(chunk):
            if first is None:
                first = now
            last = now
            chunks += 1
    end = clock()
    if first is None or last is None:
        raise ProbeError(f"{endpoint}: the stream carried no content ({malformed} malformed lines)")
    if not done:
        notes.append("stream ended without data: [DONE]")
    completion = _usage_int(usage, "completion_tokens") if usage else None
    prompt_tokens = _usage_int(usage, "prompt_tokens") if usage else None
    if completion is not None:
        tokens, tokens_from = completion, "usage"
    else:
        tokens, tokens_from = chunks, "chunks"
        notes.append("no usage in the stream: TPOT assumes one token per content chunk")
    tpot_ms = (last - first) / (tokens - 1) * 1000.0 if tokens >= 2 else None
    if malformed:
        notes.append(f"{malformed} malformed SSE lines ignored")
    return ProbeResult(
        url=endpoint,
        model=model,
        ttft_ms=(first - sent) * 1000.0,
        tpot_ms=tpot_ms,
        total_ms=(end - sent) * 1000.0,
        completion_tokens=completion,
        prompt_tokens=prompt_tokens,
        content_chunks=chunks,
        keepalives=keepalives,
        malformed_lines=malformed,
        tokens_from=tokens_from,
        notes=tuple(notes),
    )


def format_probe(result: ProbeResult) -> str:
    """Human-readable lines for a probe result.

    Args:
        result: what :func:`probe` returned.

    Returns:
        A few aligned lines, no trailing newline.
    """
    tpot = f"{result.tpot_ms:.1f} ms" if result.tpot_ms is not None else "n/a (under 2 tokens)"
    tokens = (
        f"{result.completion_tokens} completion tokens (usage)"
        if result.tokens_from == "usage"
        else f"{result.content_chunks} content chunks (no usage sent)"
    )
    lines = [
        f"endpoint  {result.url}  model {result.model}",
        f"TTFT      {result.ttft_ms:.1f} ms",
        f"TPOT      {tpot}  over {tokens}",
        f"total     {result.total_ms:.1f} ms; {result.content_chunks} content chunks, "
        f"{result.keepalives} keep-alives, {result.malformed_lines} malformed lines",
    ]
    lines.extend(f"note      {note}" for note in result.notes)
    return "\n".join(lines)
