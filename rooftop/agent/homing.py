"""Which collector an agent streams to: its home by rendezvous hashing, failover, return.

Several collectors run active-active. Each agent ranks them by rendezvous (highest
random weight) hashing of its agent id and the collector's address: the first is its
*home*. Every agent computes the same ranking without talking to anyone, and adding or
removing a collector moves only the agents whose home it is or becomes (1/N of them),
not everyone's, as a modulo would.

On a failure the agent moves to its next-ranked collector at once. While away it
probes home; it goes back only after home has answered every probe for
``return_after_s`` (hysteresis: a collector that flaps does not drag its agents back
and forth).

One DNS name that resolves to several addresses (a Kubernetes headless Service) is
several collectors: ``expand`` turns it into one ``ip:port`` per address, keeping the
name for TLS verification (see ``Endpoint.tls_name``); ``Homing.refresh`` re-resolves.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Endpoint", "Homing", "expand", "has_names", "rendezvous_rank"]

Resolver = Callable[[str, int], Sequence[str]]


@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    """One collector: the ``host:port`` to dial, and the name its certificate carries."""

    address: str
    tls_name: str = ""  # the DNS name the address came from ("" when dialled by name)


def _weight(agent_id: str, address: str) -> int:
    digest = hashlib.blake2b(f"{agent_id}\0{address}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_rank(agent_id: str, endpoints: Sequence[Endpoint]) -> tuple[Endpoint, ...]:
    """``endpoints`` in ``agent_id``'s order of preference; the first is its home."""
    unique = sorted(set(endpoints))
    return tuple(sorted(unique, key=lambda e: _weight(agent_id, e.address), reverse=True))


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"collector address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (TCP), in a stable order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def has_names(addresses: Sequence[str]) -> bool:
    """Whether any of ``addresses`` names a host DNS must resolve (not an IP, not localhost).

    Raises:
        ValueError: an address that is not ``host:port``.
    """
    hosts = [_split(address)[0] for address in addresses]
    return any(not (_is_ip(host) or host == "localhost") for host in hosts)


def expand(addresses: Sequence[str], resolve: Resolver = system_resolver) -> tuple[Endpoint, ...]:
    """The collectors behind ``addresses``: a name with several addresses is several.

    An IP address or ``localhost`` stays as it is; a name that resolves to one address
    too (it is dialled by name, so TLS checks it as usual). A name that fails to
    resolve stays as it is: the dial reports why.
    """
    out: list[Endpoint] = []
    for address in addresses:
        host, port = _split(address)
        if _is_ip(host) or host == "localhost":
            out.append(Endpoint(address))
            continue
        try:
            ips = resolve(host, port)
        except OSError:
            ips = []
        if len(ips) <= 1:
            out.append(Endpoint(address))
            continue
        out += [
            Endpoint(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}", tls_name=host) for ip in ips
        ]
    return tuple(out)


class Homing:
    """The agent's choice of collector over time (pure: the caller supplies the clock).

    Args:
        agent_id: whose ranking.
        endpoints: the collectors (after ``expand``).
        return_after_s: home must answer every probe this long before the agent returns.
    """

    def __init__(
        self, agent_id: str, endpoints: Sequence[Endpoint], *, return_after_s: float = 30.0
    ) -> None:
        if not endpoints:
            raise ValueError("at least one collector is needed")
        self._agent_id = agent_id
        self.return_after_s = return_after_s
        self.ranked = rendezvous_rank(agent_id, endpoints)
        self._index = 0
        self._home_healthy_since_s: float | None = None

    @property
    def home(self) -> Endpoint:
        """The first-ranked collector."""
        return self.ranked[0]

    @property
    def current(self) -> Endpoint:
        """The collector to stream to now."""
        return self.ranked[self._index]

    @property
    def away(self) -> bool:
        """True while streaming to a collector other than home."""
        return self._index != 0

    def failed(self) -> Endpoint:
        """The current collector failed: the next-ranked one (wrapping around)."""
        self._index = (self._index + 1) % len(self.ranked)
        self._home_healthy_since_s = None
        return self.current

    def probed_home(self, healthy: bool, now_s: float) -> bool:
        """Record a probe of home while away; True when it is time to go home."""
        if not self.away:
            return False
        if not healthy:
            self._home_healthy_since_s = None
            return False
        if self._home_healthy_since_s is None:
            self._home_healthy_since_s = now_s
        return now_s - self._home_healthy_since_s >= self.return_after_s

    def go_home(self) -> Endpoint:
        """Switch back to home."""
        self._index = 0
        self._home_healthy_since_s = None
        return self.current

    def refresh(self, endpoints: Sequence[Endpoint]) -> bool:
        """A new set of collectors (re-resolved DNS, a reload); True if it changed.

        The agent stays where it is when that collector is still listed (the next
        failure or the return-home probe moves it); otherwise it starts from its new home.
        """
        ranked = rendezvous_rank(self._agent_id, endpoints)
        if not ranked or ranked == self.ranked:
            return False
        current = self.current
        self.ranked = ranked
        self._index = ranked.index(current) if current in ranked else 0
        self._home_healthy_since_s = None
        return True
