"""The client of the collector's ``rooftop.v1.Query``: ``agentctl status`` and ``diagnose``.

It presents the same credentials as the agent (``ClientAuth``); a read-only token
(the collector's ``read_token_file``) is enough.

Several collectors (active-active, agents spread over them by ``rooftop.agent.homing``)
are one fleet: ``query_fleets`` asks each of them at once, each call with its own
deadline, and merges the answers (``merge_fleets``). A DNS name that resolves to several
addresses is several collectors (``homing.expand``), each checked against the name's
certificate. A node that two collectors report (it moved during a failover, and the
one it left has not forgotten it yet) appears once: the report of a collector it has a
stream open to wins, else the newest ``last_seen_time``.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from google.protobuf.descriptor import FieldDescriptor

from rooftop.agent.credentials import ClientAuth, with_tls_name
from rooftop.agent.homing import Endpoint, Resolver, expand, system_resolver
from rooftop.agent.stream import map_grpc_errors
from rooftop.common.codec import timestamp, timestamp_s
from rooftop.common.errors import ConfigError, Rejected, Retryable, StreamError
from rooftop.v1 import telemetry_pb2 as pb
from rooftop.v1 import telemetry_pb2_grpc

__all__ = ["CollectorOutcome", "FleetView", "merge_fleets", "query_fleet_status", "query_fleets"]

# A whole fleet's status (1,000 nodes x 8 GPUs with details) is several MiB.
_QUERY_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# BoringSSL's word for a first answer that is no TLS record: a plaintext (HTTP/2) server.
_PLAINTEXT_PEER = "WRONG_VERSION_NUMBER"
# Collectors asked at once: a fleet runs a handful; more wait for a free thread.
_MAX_PARALLEL_QUERIES = 16


def query_fleet_status(
    address: str,
    auth: ClientAuth,
    *,
    node: str = "",
    detail: bool = False,
    timeout_s: float = 10.0,
    tls_name: str = "",
) -> pb.FleetStatus:
    """Ask the collector at ``address`` for the fleet's status (``rooftop.v1.Query``).

    ``tls_name``: the name to verify the collector's certificate against when
    ``address`` is one of the addresses a DNS name resolved to (``Endpoint.tls_name``);
    an explicit ``--server-name`` (in ``auth``) still wins.

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
    if credentials is not None:
        options = with_tls_name(options, tls_name)
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


@dataclass(frozen=True, slots=True)
class CollectorOutcome:
    """How one collector answered ``query_fleets``.

    ``error`` is "" when it answered; else why not, without the address (``status.py``
    prints ``collector ADDRESS: NOT ANSWERING (error)``). ``refused``: it answered
    with a refusal (auth, …), as opposed to not answering at all.
    """

    address: str
    tls_name: str = ""  # the DNS name the address came from, if it came from one
    error: str = ""
    refused: bool = False
    nodes: int = 0  # nodes in its own answer, before the merge
    version: str = ""  # its rooftop version
    status: pb.CollectorStatus | None = None  # its own counters

    @property
    def ok(self) -> bool:
        """True when the collector answered."""
        return not self.error


@dataclass(frozen=True, slots=True)
class FleetView:
    """The merged fleet of several collectors and how each of them answered."""

    status: pb.FleetStatus
    collectors: tuple[CollectorOutcome, ...]
    origins: dict[str, str]  # agent_id -> address of the collector whose report is shown

    @property
    def failed(self) -> tuple[CollectorOutcome, ...]:
        """The collectors that did not answer (or refused)."""
        return tuple(c for c in self.collectors if not c.ok)


def _without_address(message: str, address: str) -> str:
    return message.removeprefix(f"{address}: ")


def _is_not_found(exc: Rejected) -> bool:
    cause = exc.__cause__
    return isinstance(cause, grpc.Call) and cause.code() == grpc.StatusCode.NOT_FOUND


def query_fleets(
    addresses: Sequence[str],
    auth: ClientAuth,
    *,
    node: str = "",
    detail: bool = False,
    timeout_s: float = 10.0,
    resolve: Resolver = system_resolver,
) -> FleetView:
    """Ask every collector behind ``addresses`` at once; merge what they answer.

    A DNS name that resolves to several addresses is that many collectors
    (``homing.expand``, with ``resolve``). Each call has its own ``timeout_s``, so
    the whole takes about one timeout however many collectors are down. With
    ``node``, a collector that does not know it (NOT_FOUND) has answered: the node
    reports elsewhere.

    Raises:
        ConfigError: an address that is not ``host:port``.
        Retryable, Rejected: no collector answered (one collector: its own error,
            exactly as ``query_fleet_status``; several: every address with its
            reason, on one line); or ``node`` is known to none that answered.
    """
    try:
        endpoints = tuple(dict.fromkeys(expand(addresses, resolve)))
    except ValueError as exc:
        raise ConfigError(f"--collector: {exc}") from None

    not_found: list[Rejected] = []

    def ask(endpoint: Endpoint) -> pb.FleetStatus | StreamError:
        try:
            return query_fleet_status(endpoint.address, auth, node=node, detail=detail,
                                      timeout_s=timeout_s, tls_name=endpoint.tls_name)
        except Rejected as exc:
            if node and _is_not_found(exc):
                not_found.append(exc)
                return pb.FleetStatus()  # answered: not here
            return exc
        except StreamError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=min(_MAX_PARALLEL_QUERIES, len(endpoints) or 1)) as pool:
        answers = list(pool.map(ask, endpoints))
    errors = [a for a in answers if isinstance(a, StreamError)]
    if errors and len(errors) == len(answers):
        if len(errors) == 1:
            raise errors[0]
        kind = Retryable if any(isinstance(e, Retryable) for e in errors) else Rejected
        raise kind(f"no collector answered: {'; '.join(str(e) for e in errors)}")
    outcomes = []
    fleets = []
    answered: list[str] = []
    for endpoint, answer in zip(endpoints, answers, strict=True):
        if isinstance(answer, StreamError):
            outcomes.append(CollectorOutcome(
                endpoint.address, endpoint.tls_name,
                error=_without_address(str(answer), endpoint.address),
                refused=isinstance(answer, Rejected),
            ))  # fmt: skip
            continue
        fleets.append(answer)
        answered.append(endpoint.address)
        status = pb.CollectorStatus()
        status.CopyFrom(answer.collector)
        outcomes.append(CollectorOutcome(endpoint.address, endpoint.tls_name,
                                         nodes=len(answer.nodes),
                                         version=answer.collector.version, status=status))
    merged, winners = _merge(fleets)
    if node and not merged.nodes:
        if len(endpoints) == 1 and not_found:
            raise not_found[0]  # one collector: its own words, as query_fleet_status
        down = "; not answering: " + ", ".join(c.address for c in outcomes if not c.ok)
        raise Rejected(f"NOT_FOUND: no node {node!r} at any collector that answered"
                       + (down if errors else ""))
    origins = {agent_id: answered[i] for agent_id, i in winners.items()}
    return FleetView(merged, tuple(outcomes), origins)


def _newness(node: pb.NodeStatus) -> tuple[bool, float, int, str]:
    """Which of two reports of a node is newer: connected, last seen, batches, boot_id.

    Connected first: the collector the agent streams to now holds the live report,
    even when the one it left shows a later last-seen time (their clocks differ, or
    the first batch on the new stream was a resend, a duplicate that moves no time).
    """
    return (node.connected, timestamp_s(node.last_seen_time), node.batches, node.boot_id)


def _sum_counters(total: pb.CollectorStatus, part: pb.CollectorStatus) -> None:
    """Add ``part``'s counters into ``total`` field by field (new counters included)."""
    for field in part.DESCRIPTOR.fields:
        value = getattr(part, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            target = getattr(total, field.name)
            for key, count in value.items():
                target[key] += count
        elif field.type == FieldDescriptor.TYPE_STRING:
            # Versions: "0.1.0", or "0.1.0, 0.2.0" during a rolling upgrade.
            seen = [v for v in getattr(total, field.name).split(", ") if v]
            if value and value not in seen:
                setattr(total, field.name, ", ".join([*seen, value]))
        elif isinstance(value, int) and not isinstance(value, bool):
            setattr(total, field.name, getattr(total, field.name) + value)


def merge_fleets(fleets: Sequence[pb.FleetStatus]) -> pb.FleetStatus:
    """Several collectors' answers as one ``FleetStatus`` (pure).

    Each node (agent_id) appears once: a report with its stream open (``connected``)
    wins, then the newest ``last_seen_time``, then the one with more batches, then the
    greater boot_id (so the choice never depends on which collector answered first);
    ``connected`` and ``disconnected_time`` come with the winning report, so a node
    connected anywhere is connected. ``taken_time`` is the newest answer's; each
    node's ``last_seen_time`` (and ``disconnected_time``) is moved by its own
    collector's lag behind it, so that "seen 3s ago" stays measured on the clock of
    the collector that saw the node.
    The collectors' counters are summed (versions listed once each). One answer is
    returned as it is.
    """
    return _merge(fleets)[0]


def _merge(fleets: Sequence[pb.FleetStatus]) -> tuple[pb.FleetStatus, dict[str, int]]:
    """``merge_fleets``, and for each agent_id the index of the answer shown."""
    if len(fleets) == 1:
        return fleets[0], {n.agent_id: 0 for n in fleets[0].nodes}
    merged = pb.FleetStatus()
    if not fleets:
        return merged, {}
    taken_s = max(timestamp_s(fs.taken_time) for fs in fleets)
    merged.taken_time.CopyFrom(timestamp(taken_s))
    best: dict[str, tuple[pb.NodeStatus, int]] = {}
    for i, fs in enumerate(fleets):
        for node in fs.nodes:
            held = best.get(node.agent_id)
            if held is None or _newness(node) > _newness(held[0]):
                best[node.agent_id] = (node, i)
        _sum_counters(merged.collector, fs.collector)
    for node, i in sorted(best.values(), key=lambda ni: (ni[0].hostname, ni[0].agent_id)):
        out = merged.nodes.add()
        out.CopyFrom(node)
        behind_s = taken_s - timestamp_s(fleets[i].taken_time)
        if behind_s:
            out.last_seen_time.CopyFrom(timestamp(timestamp_s(node.last_seen_time) + behind_s))
            if node.HasField("disconnected_time"):
                out.disconnected_time.CopyFrom(
                    timestamp(timestamp_s(node.disconnected_time) + behind_s))
    return merged, {agent_id: i for agent_id, (_, i) in best.items()}
