"""A stand-in kubelet: the vendored ``v1.PodResourcesLister`` served by a real gRPC server.

It listens on a unix socket, as the kubelet does, and answers ``List`` with whatever
containers the test assigned to devices; ``stop()`` and ``start()`` on the same path
are a kubelet restart (the socket file disappears in between)::

    kubelet = KubeletStandin(socket_path)
    kubelet.assign("GPU-aaaa", pod="llm-0", namespace="serving", container="vllm")
    kubelet.start()
    ...
    kubelet.move("llm-0", "serving", "vllm", to=["GPU-bbbb"])   # the pod moved

Fixture ``kubelet`` (tests/conftest.py) gives one on a short path (unix socket paths
are limited to 107 bytes, which a deep ``tmp_path`` can exceed), already started.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from rooftop.v1.k8s.podresources.v1 import api_pb2, api_pb2_grpc

GPU_RESOURCE = "nvidia.com/gpu"


@dataclass
class _Container:
    pod: str
    namespace: str
    container: str
    devices: dict[str, list[str]] = field(default_factory=dict)  # resource -> device ids


class _Servicer(api_pb2_grpc.PodResourcesListerServicer):
    def __init__(self, standin: KubeletStandin) -> None:
        self.standin = standin

    def List(self, request: Any, context: Any) -> api_pb2.ListPodResourcesResponse:  # noqa: N802
        return self.standin.response()


class KubeletStandin:
    """The kubelet's pod-resources service on ``socket_path`` (start/stop = restart)."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = Path(socket_path)
        self.calls = 0
        self._lock = threading.Lock()
        self._containers: dict[tuple[str, str, str], _Container] = {}
        self._server: grpc.Server | None = None
        self.hang = threading.Event()  # set: List blocks (a hung kubelet) until cleared

    # --- what the kubelet says ------------------------------------------------------

    def assign(
        self,
        *device_ids: str,
        pod: str,
        namespace: str = "default",
        container: str = "main",
        resource: str = GPU_RESOURCE,
    ) -> None:
        """Give ``container`` of ``pod`` the devices (GPU-/MIG- UUIDs, ``uuid::n`` replicas)."""
        with self._lock:
            c = self._containers.setdefault(
                (namespace, pod, container), _Container(pod, namespace, container)
            )
            c.devices.setdefault(resource, []).extend(device_ids)

    def move(
        self,
        pod: str,
        namespace: str,
        container: str,
        *,
        to: list[str],
        resource: str = GPU_RESOURCE,
    ) -> None:
        """The container now holds ``to`` instead of what it held."""
        with self._lock:
            c = self._containers[(namespace, pod, container)]
            c.devices = {resource: list(to)}

    def remove(self, pod: str, namespace: str = "default") -> None:
        """The pod is gone."""
        with self._lock:
            for key in [k for k in self._containers if k[:2] == (namespace, pod)]:
                del self._containers[key]

    def response(self) -> api_pb2.ListPodResourcesResponse:
        """The ``List`` answer for the current assignments."""
        with self._lock:
            self.calls += 1
            pods: dict[tuple[str, str], api_pb2.PodResources] = {}
            for c in self._containers.values():
                pod = pods.setdefault(
                    (c.namespace, c.pod), api_pb2.PodResources(name=c.pod, namespace=c.namespace)
                )
                pod.containers.append(
                    api_pb2.ContainerResources(
                        name=c.container,
                        devices=[
                            api_pb2.ContainerDevices(resource_name=r, device_ids=ids)
                            for r, ids in c.devices.items()
                        ],
                        cpu_ids=[2, 3],  # exclusive CPUs: not GPUs, must be ignored
                    )
                )
        while self.hang.is_set():
            time.sleep(0.01)
        return api_pb2.ListPodResourcesResponse(pod_resources=list(pods.values()))

    # --- the server -----------------------------------------------------------------

    def start(self) -> None:
        """Serve on ``socket_path`` (a restarted kubelet: a new server, the same path)."""
        if self._server is not None:
            return
        server = grpc.server(ThreadPoolExecutor(max_workers=4))
        api_pb2_grpc.add_PodResourcesListerServicer_to_server(_Servicer(self), server)
        server.add_insecure_port(f"unix://{self.socket_path}")
        server.start()
        self._server = server

    def stop(self) -> None:
        """Stop serving and remove the socket, as a stopping kubelet does."""
        if self._server is None:
            return
        self.hang.clear()
        self._server.stop(grace=None).wait()
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
