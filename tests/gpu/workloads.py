"""Known GPU workloads for the live-verdict tests (needs torch with CUDA).

    python tests/gpu/workloads.py gemv|gemm|host_stall|idle SECONDS

Prints "ready" once warmed up, then runs until SECONDS have passed.
"""

from __future__ import annotations

import sys
import time


def main() -> None:
    import torch

    kind, seconds = sys.argv[1], float(sys.argv[2])
    dev = torch.device("cuda:0")
    torch.cuda.init()
    if kind == "gemv":
        # bf16 28672x8192 weights, batch 1: reads 470 MB per call -> memory-bound.
        a = torch.randn(28672, 8192, device=dev, dtype=torch.bfloat16)
        x = torch.randn(8192, 1, device=dev, dtype=torch.bfloat16)

        def step() -> None:
            for _ in range(20):
                torch.matmul(a, x)
    elif kind == "gemm":
        a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)

        def step() -> None:
            for _ in range(5):
                torch.matmul(a, b)
    elif kind == "host_stall":
        a = torch.randn(256, 256, device=dev)
        x = torch.randn(256, 1, device=dev)

        def step() -> None:
            torch.matmul(a, x)
            torch.cuda.synchronize()
            t = time.perf_counter()
            n = 0
            while time.perf_counter() - t < 0.05:  # the Python loop that starves the GPU
                n += 1
    elif kind == "idle":
        torch.zeros(1, device=dev)

        def step() -> None:
            time.sleep(0.1)
    else:
        sys.exit(f"unknown workload {kind}")
    step()
    torch.cuda.synchronize()
    print("ready", flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        step()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
