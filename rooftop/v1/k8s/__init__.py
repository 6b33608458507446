"""Generated protobuf code (protos/generate.py; do not edit)."""
