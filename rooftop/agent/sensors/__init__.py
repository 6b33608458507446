"""Sensors: the hardware edge. NVML (+GPM), a fake, a replay, and the host."""
