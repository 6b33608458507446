"""Kubernetes pod attribution: which containers hold each GPU, from the kubelet.

The kubelet serves its pod-resources API (``v1.PodResourcesLister``, vendored in
``protos/k8s/``) on a unix socket, ``/var/lib/kubelet/pod-resources/kubelet.sock`` by
default; the DaemonSet mounts its directory read-only. ``List`` returns every pod's
containers with the device ids the device plugins assigned them. For NVIDIA's plugin
those ids are GPU UUIDs (``GPU-...``, resource ``nvidia.com/gpu``) or MIG UUIDs
(``MIG-...``, resources ``nvidia.com/mig-1g.10gb`` ...); with time-slicing each replica
is ``<uuid>::<n>``, and the suffix is dropped, so a shared GPU lists every container
that holds a replica of it. A plugin run with ``DEVICE_ID_STRATEGY=index`` hands out
GPU indices (``"0"``), which match a whole GPU by index. Devices allocated through DRA
(``dynamic_resources``) are not attributed.

API v1 has no ``Watch``: a thread calls ``List`` every ``refresh_s`` (with a
``timeout_s`` deadline), and the sampler reads the latest mapping without waiting.
When a ``List`` fails (the kubelet restarting, a hung socket) the last good mapping
stays in use and one warning covers the whole failure streak; the next success says
so at info. No socket at all (not a Kubernetes node) is one info line and nothing
else: no attributes, no retries logged.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping

import grpc

from rooftop.common.model import PodRef
from rooftop.v1.k8s.podresources.v1 import api_pb2, api_pb2_grpc

__all__ = ["PodResources", "device_pods", "pod_order"]

log = logging.getLogger(__name__)

_NVIDIA = "nvidia.com/"  # nvidia.com/gpu, nvidia.com/mig-<profile>, renamed shared resources
_MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # the kubelet's own limit for this API


def pod_order(ref: PodRef) -> tuple[str, str, str]:
    """The sort key of containers wherever they are listed: namespace, pod, container."""
    return ref.namespace, ref.pod, ref.container


def device_pods(response: api_pb2.ListPodResourcesResponse) -> dict[str, tuple[PodRef, ...]]:
    """Device id (GPU UUID, MIG UUID or GPU index) -> the containers holding it, sorted.

    Pure: the mapping one ``List`` answer gives. Non-NVIDIA resources are skipped; a
    time-sliced replica's ``::<n>`` suffix is dropped, so a shared GPU lists each pod.
    """
    holders: dict[str, set[PodRef]] = {}
    for pod in response.pod_resources:
        for container in pod.containers:
            for devices in container.devices:
                if not devices.resource_name.startswith(_NVIDIA):
                    continue
                ref = PodRef(pod=pod.name, namespace=pod.namespace, container=container.name)
                for device_id in devices.device_ids:
                    holders.setdefault(device_id.partition("::")[0], set()).add(ref)
    return {
        device: tuple(sorted(refs, key=pod_order))
        for device, refs in holders.items()
    }


class PodResources:
    """The kubelet's GPU -> pod mapping, refreshed on a thread of its own.

    Lifecycle: ``start()``, ``flush(timeout_s)`` (one refresh now), ``shutdown(timeout_s)``
    (idempotent). ``pods_of`` never blocks on the kubelet.

    Args:
        socket_path: the kubelet's pod-resources socket; "" turns attribution off.
        refresh_s: seconds between ``List`` calls.
        timeout_s: the deadline of one ``List`` call.
    """

    def __init__(
        self, socket_path: str, *, refresh_s: float = 10.0, timeout_s: float = 2.0
    ) -> None:
        self.socket_path = socket_path
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        self.refreshes = 0  # successful List calls
        self.failures = 0  # failed List calls
        self._mapping: Mapping[str, tuple[PodRef, ...]] = {}  # swapped whole, read lock-free
        self._lock = threading.Lock()  # one refresh at a time (thread vs flush)
        self._channel: grpc.Channel | None = None
        self._stub: api_pb2_grpc.PodResourcesListerStub | None = None
        self._said_absent = False
        self._failing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._shut = False

    # --- reading --------------------------------------------------------------------

    def pods_of(
        self, gpu_uuid: str, mig_uuid: str = "", gpu_index: int | None = None
    ) -> tuple[PodRef, ...]:
        """The containers holding this GPU (or MIG instance); () when none or unknown."""
        mapping = self._mapping
        if not mapping:
            return ()
        if mig_uuid:
            return mapping.get(mig_uuid, ())
        pods = mapping.get(gpu_uuid, ()) if gpu_uuid else ()
        if not pods and gpu_index is not None:
            pods = mapping.get(str(gpu_index), ())
        return pods

    @property
    def mapping(self) -> Mapping[str, tuple[PodRef, ...]]:
        """The latest device id -> containers mapping (the last good one after failures)."""
        return self._mapping

    # --- refreshing -----------------------------------------------------------------

    def refresh(self) -> bool:
        """Call ``List`` once now; True when the mapping was updated from the kubelet."""
        if not self.socket_path:
            return False
        with self._lock:
            if not os.path.exists(self.socket_path):
                if self.refreshes:
                    # The kubelet removes its socket while it restarts: a failure streak.
                    self._failed("the socket is gone")
                elif not self._said_absent:
                    # Not (yet) a Kubernetes node: said once, then nothing more.
                    self._said_absent = True
                    log.info(
                        "no kubelet pod-resources socket at %s: no Kubernetes pod attribution",
                        self.socket_path,
                    )
                return False
            try:
                response = self._list()
            except grpc.RpcError as exc:
                self._close_channel()  # the next try dials the (restarted) kubelet afresh
                self._failed(f"{exc.code().name}: {exc.details()}")
                return False
            self._mapping = device_pods(response)
            self.refreshes += 1
            if self._failing:
                self._failing = False
                log.info(
                    "kubelet pod-resources List works again: %d device(s) attributed",
                    len(self._mapping),
                )
            return True

    def _list(self) -> api_pb2.ListPodResourcesResponse:
        if self._stub is None:
            self._channel = grpc.insecure_channel(
                f"unix://{self.socket_path}",
                options=[("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES)],
            )
            self._stub = api_pb2_grpc.PodResourcesListerStub(self._channel)
        response: api_pb2.ListPodResourcesResponse = self._stub.List(
            api_pb2.ListPodResourcesRequest(), timeout=self.timeout_s
        )
        return response

    def _failed(self, why: str) -> None:
        self.failures += 1
        if not self._failing:
            self._failing = True
            log.warning(
                "kubelet pod-resources List at %s failed (%s): keeping the last mapping "
                "(%d device(s)) until it answers again",
                self.socket_path,
                why,
                len(self._mapping),
            )

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._stub = None

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Refresh once now, then every ``refresh_s`` on a daemon thread (idempotent)."""
        if self._thread is not None or self._shut or not self.socket_path:
            return
        self.refresh()
        self._thread = threading.Thread(target=self._loop, name="rooftop-pods", daemon=True)
        self._thread.start()

    def flush(self, timeout_s: float) -> bool:
        """Refresh now; True when the kubelet answered (``timeout_s`` bounds the call)."""
        del timeout_s  # each List carries its own deadline (timeout_s of the constructor)
        return self.refresh()

    def shutdown(self, timeout_s: float) -> None:
        """Stop the thread and close the channel (idempotent)."""
        if self._shut:
            return
        self._shut = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._lock:
            self._close_channel()

    def _loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.refresh()
            except Exception:  # thread boundary: attribution must never stop the agent
                log.exception("kubelet pod-resources refresh failed; going on")
