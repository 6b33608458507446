"""Rooftop: what bounds each GPU right now — memory bandwidth, compute, or the host?

One import namespace, layered (docs/DESIGN.md; import-linter holds it in the test command):

- ``rooftop.cli``, ``rooftop.demo``, ``rooftop.config_check``: ``agentctl``, above both roles.
- ``rooftop.agent``: the node agent (sensors → window → classifier → spool → stream).
- ``rooftop.collector``: the central collector (gate → ingest → fleet → OpenTelemetry).
- ``rooftop.common``: what both roles share (model, codec, errors, systemd, reloading files).
- ``rooftop.v1``: the generated protobuf code of ``protos/rooftop/v1/telemetry.proto``.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
