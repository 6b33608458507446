"""Rooftop's one exception tree.

::

    RooftopError
     ├── SensorError              a sensor could not produce a reading
     │    ├── NvmlUnavailable     no NVIDIA driver / libnvidia-ml, or NVML init failed
     │    ├── DeviceLost          one GPU fell off the bus (NVMLError_GpuIsLost)
     │    └── DeviceInaccessible  NVML refuses this user one GPU (NVMLError_NoPermission)
     ├── TraceError               a recording is unreadable (names file and line)
     ├── StreamError              talking to the collector failed
     │    ├── Retryable           transient: reconnect with backoff
     │    └── Rejected            the collector refused (auth, invalid batch)
     ├── RooflineError            unknown model / GPU, malformed config.json
     ├── ProbeError               the client-side probe could not measure an endpoint
     └── ConfigError              bad configuration (names the key)

Callers catch ``RooftopError`` at the CLI and thread boundaries and print one line.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DeviceInaccessible",
    "DeviceLost",
    "NvmlUnavailable",
    "ProbeError",
    "Rejected",
    "Retryable",
    "RooflineError",
    "RooftopError",
    "SensorError",
    "StreamError",
    "TraceError",
    "inaccessible_text",
]


class RooftopError(Exception):
    """Base of every error Rooftop raises on purpose."""


class SensorError(RooftopError):
    """A sensor could not produce a reading."""


class NvmlUnavailable(SensorError):
    """NVML cannot be used: no driver, no library, or init failed.

    ``reason`` says why; ``hint`` how to go on without a GPU. They are apart so that
    each command can replace the hint with the options it really accepts.
    """

    def __init__(self, reason: str, hint: str = "") -> None:
        self.reason = reason
        self.hint = hint
        super().__init__(f"{reason}; {hint}" if hint else reason)


class DeviceLost(SensorError):
    """A GPU is lost (fell off the bus); the other GPUs go on."""

    def __init__(self, gpu_index: int, detail: str = "") -> None:
        self.gpu_index = gpu_index
        super().__init__(f"GPU {gpu_index} is lost{': ' + detail if detail else ''}")


class DeviceInaccessible(SensorError):
    """NVML refuses this user one GPU (no handle: NoPermission); the other GPUs go on.

    Not a lost GPU: the GPU may be healthy and busy, the agent just may not open it, so
    the remedy is access (the GPU's ``/dev/nvidia*`` node, a container's device list),
    never a reset. ``error`` is NVML's error name, e.g. ``"NO_PERMISSION"``.
    """

    def __init__(self, gpu_index: int, error: str) -> None:
        self.gpu_index = gpu_index
        self.error = error
        super().__init__(inaccessible_text(gpu_index, error))


def inaccessible_text(gpu_index: int, error: str) -> str:
    """The one line that says GPU ``gpu_index`` cannot be opened by this user, and what to do.

    The device node is named by index as a hint only: ``/dev/nvidiaN`` is numbered by the
    GPU's minor number, which usually, not always, equals its NVML index.
    """
    return (
        f"GPU {gpu_index} is not accessible to this user (NVML {error}): run the agent with "
        f"access to /dev/nvidia{gpu_index} (the GPU's device node; see ls -l /dev/nvidia*)"
    )


class TraceError(RooftopError):
    """A recording could not be read; the message names the file and line."""


class StreamError(RooftopError):
    """Talking to the collector failed."""


class Retryable(StreamError):
    """A transient failure: reconnect with backoff."""


class Rejected(StreamError):
    """The collector refused what we sent."""


class RooflineError(RooftopError):
    """Roofline input is unknown or malformed."""


class ProbeError(RooftopError):
    """The probe could not measure: unreachable, HTTP error, or no content streamed."""


class ConfigError(RooftopError):
    """Configuration is invalid; the message names the key."""
