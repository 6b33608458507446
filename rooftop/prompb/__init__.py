"""Prometheus remote-write 1.0 protobuf (generated from protos/rooftop/prompb/, vendored)."""
