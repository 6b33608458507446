"""Trace format v1: JSON Lines, one ``TraceRecord`` per line in protobuf's JSON mapping.

Reading is strict about structure and lenient about content: a line that is not JSON
or not a TraceRecord is an error naming the file and line; unknown fields are ignored;
a record with an impossible value (NaN, negative, a percentage over 100) is skipped
and counted, so the rest of the recording still counts.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from google.protobuf import json_format

from rooftop.common.codec import record_from_proto, record_to_proto
from rooftop.common.errors import TraceError
from rooftop.common.model import Record, invalid_reason
from rooftop.v1 import telemetry_pb2 as pb

__all__ = ["BUNDLED_RECORDINGS", "Trace", "TraceWriter", "read_trace"]

# Real H100 recordings shipped with the package (their README says what each holds).
BUNDLED_RECORDINGS = Path(__file__).resolve().parent / "data" / "h100-2026-11-22"


@dataclass(frozen=True, slots=True)
class Trace:
    """A recording, in file order, with what was skipped and why."""

    path: Path
    records: tuple[Record, ...]
    skipped: int = 0
    skipped_reasons: Counter[str] = field(default_factory=Counter)


def read_trace(path: Path) -> Trace:
    """Read a trace file; raises ``TraceError`` naming file and line on malformed input."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not a text file (UTF-8): {exc.reason}") from exc
    records: list[Record] = []
    reasons: Counter[str] = Counter()
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{where}: not valid JSON: {exc.msg}") from exc
        if not isinstance(obj, dict):
            raise TraceError(f"{where}: not a TraceRecord (expected a JSON object)")
        msg = pb.TraceRecord()
        try:
            json_format.ParseDict(obj, msg, ignore_unknown_fields=True)
        except json_format.ParseError as exc:
            raise TraceError(f"{where}: not a TraceRecord: {exc}") from exc
        try:
            record = record_from_proto(msg)
        except ValueError as exc:
            raise TraceError(f"{where}: not a TraceRecord: {exc}") from exc
        reason = invalid_reason(record)
        if reason is not None:
            reasons[reason.split(" ", 1)[0]] += 1
            continue
        records.append(record)
    if not records and not reasons:
        raise TraceError(f"{path}: empty trace: no records")
    if not records:
        skipped = sum(reasons.values())
        raise TraceError(f"{path}: no valid records ({skipped} skipped as out of range)")
    return Trace(path, tuple(records), sum(reasons.values()), reasons)


def encode_line(record: Record) -> str:
    """One trace-v1 line (no newline) for ``record``."""
    obj = json_format.MessageToDict(record_to_proto(record), preserving_proto_field_name=True)
    if "gpu" in obj:
        obj["gpu"].setdefault("gpu_index", 0)  # proto3 hides a zero; readers want it visible
    return json.dumps(obj, separators=(", ", ": "))


class TraceWriter:
    """Appends records to an open text stream in trace format v1."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self.written = 0

    def write(self, records: Iterable[Record]) -> None:
        """Write ``records``, one line each."""
        for record in records:
            self._stream.write(encode_line(record) + "\n")
            self.written += 1
        self._stream.flush()
