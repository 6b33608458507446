"""The client of the collector's ``rooftop.v1.Query``: ``agentctl status`` and ``diagnose``.

It presents the same credentials as the agent (``ClientAuth``); a read-only token
(the collector's ``read_token_file``) is enough.
"""

from __future__ import annotations

import grpc

from rooftop.agent.credentials import ClientAuth
from rooftop.agent.stream import map_grpc_errors
from rooftop.common.errors import Retryable
from rooftop.v1 import telemetry_pb2 as pb
from rooftop.v1 import telemetry_pb2_grpc

__all__ = ["query_fleet_status"]

# A whole fleet's status (1,000 nodes x 8 GPUs with details) is several MiB.
_QUERY_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# BoringSSL's word for a first answer that is no TLS record: a plaintext (HTTP/2) server.
_PLAINTEXT_PEER = "WRONG_VERSION_NUMBER"


def query_fleet_status(
    address: str,
    auth: ClientAuth,
    *,
    node: str = "",
    detail: bool = False,
    timeout_s: float = 10.0,
) -> pb.FleetStatus:
    """Ask the collector at ``address`` for the fleet's status (``rooftop.v1.Query``).

    Raises:
        Retryable: the collector is unreachable (UNAVAILABLE, DEADLINE_EXCEEDED, …), or
            speaks plaintext to a TLS client (the message says to add ``--insecure``).
        Rejected: it refused (UNAUTHENTICATED, PERMISSION_DENIED, NOT_FOUND, …).
    """
    options: list[tuple[str, str | int]] = [
        ("grpc.max_receive_message_length", _QUERY_MAX_MESSAGE_BYTES),
        ("grpc.enable_retries", 0),
        *auth.options(),
    ]
    credentials = auth.credentials()
    channel = (
        grpc.secure_channel(address, credentials, options=options)
        if credentials is not None
        else grpc.insecure_channel(address, options=options)
    )
    request = pb.FleetStatusRequest(node=node, detail=detail)
    with channel:
        try:
            with map_grpc_errors(address):
                stub = telemetry_pb2_grpc.QueryStub(channel)
                return stub.GetFleetStatus(request, metadata=auth.metadata(), timeout=timeout_s)
        except Retryable as exc:
            # gRPC words it as a TLS handshake failure; what the user needs is the flag.
            if credentials is not None and _PLAINTEXT_PEER in str(exc):
                raise Retryable(
                    f"the collector at {address} speaks plaintext, not TLS: add --insecure "
                    "(or set ROOFTOP_INSECURE=1)"
                ) from exc
            raise
