"""Generated protobuf code for the Rooftop telemetry schema (see protos/generate.py)."""
