"""Known GPU workloads for the live-verdict tests (needs torch with CUDA).

    python tests/gpu/workloads.py gemv|gemm|host_stall|idle|hf_generate|graph_decode SECONDS

The two engine-shaped ones report TPOT through ``rooftop.agent.hooks`` (to $ROOFTOP_HOOK_SOCKET):
``hf_generate`` is HF transformers ``generate`` of a random-weight Llama (1.1B shape) with
the Rooftop streamer, batch 1; ``graph_decode`` is an 8B-Llama-shaped decode step with
random bf16 weights, batch 1, captured in a CUDA graph and replayed — the memory-bound
decode DESIGN §4 measured at 75 % of the roofline.

Run it with ``CUDA_VISIBLE_DEVICES=<GPU UUID>`` (as the tests do): it loads ``cuda:0``,
and only the UUID makes that the GPU NVML samples under the same name; CUDA's own
numbering (fastest first) need not match NVML's (PCI bus order).

Prints "ready" once warmed up, then runs until SECONDS have passed.
"""

from __future__ import annotations

import os
import sys
import time


def main() -> None:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if not visible.startswith(("GPU-", "MIG-")) or "," in visible:
        sys.exit("workloads.py: set CUDA_VISIBLE_DEVICES to one GPU's UUID (GPU-...): CUDA "
                 f"and NVML number GPUs differently (it is {visible!r})")
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
    elif kind == "hf_generate":
        step = hf_generate_step(torch, dev)
    elif kind == "graph_decode":
        step = graph_decode_step(torch, dev)
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


def hf_generate_step(torch, dev):  # noqa: ANN001, ANN201 — torch is imported lazily
    from transformers import LlamaConfig, LlamaForCausalLM

    from rooftop.agent.hooks.hf import RooftopStreamer

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)
    model = LlamaForCausalLM(config).to(dev, torch.bfloat16).eval()
    prompt = torch.randint(0, 32000, (1, 32), device=dev)
    streamer = RooftopStreamer(model="tinyllama-1.1b")

    def step() -> None:
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                           streamer=streamer)
    return step


def graph_decode_step(torch, dev):  # noqa: ANN001, ANN201
    from rooftop.agent import hooks

    hidden, inter, layers, vocab = 4096, 14336, 32, 128256
    kv_dim = 8 * 128
    bf16 = torch.bfloat16
    weights = [
        (torch.randn(hidden + 2 * kv_dim, hidden, device=dev, dtype=bf16) * 0.01,
         torch.randn(hidden, hidden, device=dev, dtype=bf16) * 0.01,
         torch.randn(2 * inter, hidden, device=dev, dtype=bf16) * 0.01,
         torch.randn(hidden, inter, device=dev, dtype=bf16) * 0.01)
        for _ in range(layers)
    ]
    lm_head = torch.randn(vocab, hidden, device=dev, dtype=bf16) * 0.01
    x = torch.randn(1, hidden, device=dev, dtype=bf16)

    def decode() -> None:
        h = x
        for qkv, o, gate_up, down in weights:
            a = h @ qkv.T
            h = h + a[:, :hidden] @ o.T
            g, u = (h @ gate_up.T).chunk(2, dim=-1)
            h = h + (torch.nn.functional.silu(g) * u) @ down.T
        (h @ lm_head.T).argmax(dim=-1)

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        decode()  # warm up outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode()
    agg = hooks.Aggregator(engine_id="graph-decode-8b", model="llama-3-8b")

    def step() -> None:
        req = agg.start_request()
        for _ in range(100):
            graph.replay()
            torch.cuda.synchronize()  # one token = one decode step, timed on the host
            req.token()
        req.end()
    return step


if __name__ == "__main__":
    main()
