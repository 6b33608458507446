"""Rooftop's node agent: says whether each GPU is memory-, compute- or host-bound.

The flow, one module per stage: ``sensors`` (NVML, GPM, host) → ``sampler`` →
``window`` → ``classifier`` → ``spool`` → ``stream``; ``daemon`` wires them. ``hooks``
run inside inference engines (stdlib only) and ``engines`` scrape or receive them.
"""

__all__: list[str] = []
