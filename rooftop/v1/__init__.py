"""Generated protobuf code for ``rooftop.v1`` (``protos/generate.py``; do not edit)."""
