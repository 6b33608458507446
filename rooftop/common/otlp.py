"""Where OTLP metrics go: one settings type for the collector's export and the agent's own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["OtlpExport", "OtlpProtocol"]

OtlpProtocol = Literal["grpc", "http/protobuf"]


@dataclass(frozen=True, slots=True)
class OtlpExport:
    """One OTLP metrics destination."""

    endpoint: str
    protocol: OtlpProtocol = "grpc"
    interval_s: float = 10.0
    timeout_s: float = 10.0
    insecure: bool = False
    headers: tuple[tuple[str, str], ...] = ()
