"""The Python half of ``scripts/gpu-check.sh``: what this host's GPU stack does, as JSON.

It opens the real ``NvmlBackend`` over a timing proxy of ``pynvml`` (the backend takes
its NVML library as an argument, as it takes the fake), runs the sampling loop the agent
runs (``Sampler.tick``) and writes ``gpu-check.json``:

- driver, NVML, CUDA-driver and pynvml versions, the uid it ran as, each GPU's UUID
  and MIG mode, and how torch numbers the GPUs (CUDA's order is not NVML's);
- the time of every NVML call the loop makes, per function and per GPU (p50/p99/max
  µs, count, errors), and of NvmlBackend's start-up calls;
- fresh GPM readings when sampling at 1 Hz and at 10 Hz: per read, whether GPM was
  computed anew (``nvmlGpmMetricsGet`` succeeded during that read), whether its values
  changed from the previous read, and whether ``GpuSample.gpm_stale`` marks it a
  repeat;
- with ``--pytest``, the result of every ``gpu``-marked test (counts, exit code);
- with ``--unprivileged USER`` (run as root), the same sampling as USER, and what
  degraded there (calls that fail, fields that go absent, GPM that stops).

Usage::

    .venv/bin/python scripts/gpu_check.py [--out gpu-check.json] [--pytest] [--unprivileged nobody]
    .venv/bin/python scripts/gpu_check.py --fake h100 --gpus 2   # the simulated H100s, no GPU
    .venv/bin/python scripts/gpu_check.py --probe                # "real"/"fake", or 1 line + exit 1

Exit status: 0 when nothing is wrong; 1 when NVML cannot be used (one line on stderr)
or a problem was found (listed in the summary and under ``"problems"``); 2 for bad
arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import math
import os
import platform
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

# The tool exists to time the real pynvml from outside Rooftop, so it wraps the module
# itself (pyproject lets this one file import it).
import pynvml

from rooftop.agent.sampler import Sampler
from rooftop.agent.sensors.base import GpuInfo
from rooftop.agent.sensors.fake import FAKE_PROFILES, FakeNvmlLibrary
from rooftop.agent.sensors.gpm import GPM_METRIC_FIELDS, GPM_MIN_INTERVAL_S
from rooftop.agent.sensors.nvml import NvmlBackend
from rooftop.common.errors import NvmlUnavailable
from rooftop.common.model import GpuSample

REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
SCHEMA = 1
SYSTEM = "system"  # the per-GPU key of calls that concern no one GPU (init, count)

# GpuSample's measurements: its optional numbers (not the identity, timestamp or status).
METRIC_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(GpuSample)
    if isinstance(f.type, str) and f.type in ("float | None", "int | None")
    # Absent by this check's own choice: it runs the backend without the XID thread.
    and f.name != "xid_count"
    # MIG identity, not a measurement: absent on every GPU outside MIG.
    and f.name not in ("gpu_instance_id", "compute_instance_id")
)
GPM_FIELDS: tuple[str, ...] = tuple(GPM_METRIC_FIELDS.values())
# Errors that mean "this GPU/driver has no such value": absent fields, not a fault.
_ABSENT_ERRORS = frozenset({pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND})
# Driver module parameters that decide what a non-root user may read.
_DRIVER_PARAMS = ("RmProfilingAdminOnly", "ModifyDeviceFiles", "DeviceFileMode")
_TAIL_LINES = 40


# -- timing ---------------------------------------------------------------------------


def stats_us(durations_ns: Sequence[int]) -> dict[str, float | int]:
    """Count, p50, p99, max and mean of durations, in µs (nearest-rank percentiles)."""
    if not durations_ns:
        return {"count": 0}
    ordered = sorted(durations_ns)
    n = len(ordered)

    def rank(q: float) -> float:
        return ordered[min(n - 1, max(0, math.ceil(q * n) - 1))] / 1000.0

    return {
        "count": n,
        "p50_us": round(rank(0.50), 2),
        "p99_us": round(rank(0.99), 2),
        "max_us": round(ordered[-1] / 1000.0, 2),
        "mean_us": round(sum(ordered) / n / 1000.0, 2),
    }


def _error_text(err: BaseException) -> str:
    code = getattr(err, "value", None)
    if isinstance(err, pynvml.NVMLError) and isinstance(code, int):
        return f"{err} (NVML error {code})"
    return f"{type(err).__name__}: {err}"


_Key = tuple[str, str, int | None]  # (phase, function, GPU index or None)


class TimedNvml:
    """A stand-in for the ``pynvml`` module that times every ``nvml*`` function call.

    Constants, structs and error classes pass through untouched, so ``NvmlBackend``
    and ``GpmSampler`` use it exactly as they use ``pynvml`` (or ``FakeNvmlLibrary``).
    Each call is filed under the current ``phase`` and the GPU it concerns: the GPU
    being read (``current_gpu``, set around ``NvmlBackend.read``), else the GPU of the
    handle passed, else (while the backend opens GPUs one by one) the GPU last opened.

    Args:
        inner: the ``pynvml`` module, or a library with its API.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.phase = "init"
        self.current_gpu: int | None = None
        self.times: defaultdict[_Key, list[int]] = defaultdict(list)
        self.errors: defaultdict[_Key, Counter[str]] = defaultdict(Counter)
        self.error_codes: defaultdict[_Key, Counter[int]] = defaultdict(Counter)
        self.ok: Counter[tuple[str, int | None]] = Counter()  # (function, GPU), any phase
        self._opening: int | None = None
        # id(handle) -> (handle, index); the handle is kept so its id cannot be reused.
        self._handles: dict[int, tuple[Any, int]] = {}
        self._wrapped: dict[str, Callable[..., Any]] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not name.startswith("nvml") or isinstance(attr, type) or not callable(attr):
            return attr
        wrapped = self._wrapped.get(name)
        if wrapped is None:
            wrapped = self._wrapped[name] = self._wrap(name, attr)
        return wrapped

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        # functools.wraps keeps __name__: the backend logs failures by it.
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            gpu = self._gpu_of(name, args)
            start = time.perf_counter_ns()
            try:
                result = fn(*args, **kwargs)
            except Exception as err:
                self._file(name, gpu, time.perf_counter_ns() - start, err)
                raise
            self._file(name, gpu, time.perf_counter_ns() - start, None)
            if name == "nvmlDeviceGetHandleByIndex" and args:
                self._handles[id(result)] = (result, int(args[0]))
            return result

        return timed

    def _gpu_of(self, name: str, args: tuple[Any, ...]) -> int | None:
        if self.current_gpu is not None:
            return self.current_gpu
        if name == "nvmlDeviceGetHandleByIndex" and args:
            self._opening = int(args[0])
            return self._opening
        if args and id(args[0]) in self._handles:
            return self._handles[id(args[0])][1]
        return self._opening if self.phase == "init" else None

    def _file(self, name: str, gpu: int | None, elapsed_ns: int, err: Exception | None) -> None:
        key = (self.phase, name, gpu)
        self.times[key].append(elapsed_ns)
        if err is None:
            self.ok[(name, gpu)] += 1
            return
        self.errors[key][_error_text(err)] += 1
        code = getattr(err, "value", None)
        if isinstance(code, int):
            self.error_codes[key][code] += 1

    def report(self, phase: str) -> dict[str, Any]:
        """Per function: stats over all GPUs, and per GPU (``"0"``, ``"1"``, ``"system"``)."""
        out: dict[str, Any] = {}
        for (key_phase, name, gpu), durations in sorted(
            self.times.items(), key=lambda kv: (kv[0][1], -1 if kv[0][2] is None else kv[0][2])
        ):
            if key_phase != phase:
                continue
            entry = out.setdefault(name, {"all": [], "per_gpu": {}, "errors": Counter()})
            entry["all"].extend(durations)
            errors = self.errors.get((phase, name, gpu), Counter())
            entry["errors"].update(errors)
            entry["per_gpu"][SYSTEM if gpu is None else str(gpu)] = {
                **stats_us(durations),
                "errors": dict(errors),
            }
        return {
            name: {
                "all": {**stats_us(entry["all"]), "errors": dict(entry["errors"])},
                "per_gpu": entry["per_gpu"],
            }
            for name, entry in out.items()
        }


@dataclasses.dataclass(slots=True)
class _Read:
    phase: str
    gpu: int
    sample: GpuSample
    gpm_computed: bool  # nvmlGpmMetricsGet succeeded for this GPU during this read


class TimedBackend:
    """``GpuBackend`` around ``NvmlBackend``: tells the proxy which GPU each read is for.

    Args:
        backend: the backend to read.
        nvml: the proxy that backend calls.
    """

    def __init__(self, backend: NvmlBackend, nvml: TimedNvml) -> None:
        self._backend = backend
        self._nvml = nvml
        self.read_ns: defaultdict[tuple[str, int], list[int]] = defaultdict(list)
        self.reads: list[_Read] = []

    def devices(self) -> tuple[GpuInfo, ...]:
        """The backend's GPUs."""
        return self._backend.devices()

    def read(self, gpu_index: int, time_s: float) -> GpuSample:
        """``NvmlBackend.read``, timed, with every NVML call filed under ``gpu_index``."""
        nvml = self._nvml
        computed_before = nvml.ok[("nvmlGpmMetricsGet", gpu_index)]
        nvml.current_gpu = gpu_index
        start = time.perf_counter_ns()
        try:
            sample = self._backend.read(gpu_index, time_s)
        finally:
            self.read_ns[(nvml.phase, gpu_index)].append(time.perf_counter_ns() - start)
            nvml.current_gpu = None
        computed = nvml.ok[("nvmlGpmMetricsGet", gpu_index)] > computed_before
        self.reads.append(_Read(nvml.phase, gpu_index, sample, computed))
        return sample

    def close(self) -> None:
        """Close the backend."""
        self._backend.close()


def _run_ticks(sampler: Sampler, ticks: int, rate_hz: float) -> list[int]:
    """``ticks`` ticks at ``rate_hz`` on absolute deadlines, the first one period from now."""
    period_s = 1.0 / rate_hz
    start = time.monotonic()
    durations: list[int] = []
    for n in range(1, ticks + 1):
        time.sleep(max(0.0, start + n * period_s - time.monotonic()))
        t0 = time.perf_counter_ns()
        sampler.tick()
        durations.append(time.perf_counter_ns() - t0)
    return durations


def _marker_field() -> str | None:
    # GpuSample's own word on whether its GPM part is a repeat (``gpm_stale``: the
    # sampler, asked within 100 ms, hands back its last reading marked stale). Found by
    # name, so the check still runs against a model without it, or with "fresh".
    for field in dataclasses.fields(GpuSample):
        if "stale" in field.name or "fresh" in field.name:
            return field.name
    return None


def _stale_marker(read: _Read, field: str | None) -> bool | None:
    """Whether ``read``'s GPM part is stale by GpuSample's marker; None without one."""
    if field is None:
        return None
    flag = bool(getattr(read.sample, field))
    return flag if "stale" in field else not flag


def _freshness(
    reads: list[_Read], phase: str, gpus: Sequence[int], rate_hz: float
) -> dict[str, Any]:
    """Count the fresh GPM readings of ``phase`` among ``reads`` (all phases, in order)."""
    field = _marker_field()
    marker = f"GpuSample.{field}" if field else None
    per_gpu: dict[str, Any] = {}
    for gpu in gpus:
        counts = Counter[str]()
        previous: tuple[float | None, ...] | None = None
        readings = 0
        for r in reads:
            if r.gpu != gpu or r.sample.lost:
                continue
            values = tuple(getattr(r.sample, f) for f in GPM_FIELDS)
            # The phase's first reading is compared with the read before it (of the
            # phase before), or a repeat there would pass for a change.
            changed = values != previous
            previous = values
            if r.phase != phase:
                continue
            readings += 1
            counts["fresh_by_nvml"] += r.gpm_computed
            stale = _stale_marker(r, field)
            if stale:
                counts["stale_by_marker"] += 1
            if all(v is None for v in values):
                continue
            counts["with_gpm"] += 1
            counts["fresh_by_value" if changed else "repeated_by_value"] += 1
            if stale is False:
                counts["fresh_by_marker"] += 1
        per_gpu[str(gpu)] = {
            "readings": readings,
            "with_gpm": counts["with_gpm"],
            "fresh_by_nvml": counts["fresh_by_nvml"],
            "fresh_by_value": counts["fresh_by_value"],
            "repeated_by_value": counts["repeated_by_value"],
            "fresh_by_marker": counts["fresh_by_marker"] if marker else None,
            "stale_by_marker": counts["stale_by_marker"] if marker else None,
        }
    return {"rate_hz": rate_hz, "marker": marker, "per_gpu": per_gpu}


# A GPU has one of each pair by design (Ampere+ remaps rows, older GPUs retire pages):
# the one it lacks is not missing.
_EITHER = {
    "retired_pages_single_bit": "remapped_rows_corrected",
    "retired_pages_double_bit": "remapped_rows_uncorrected",
    "retired_pages_pending": "remap_pending",
}
_EITHER.update({v: k for k, v in _EITHER.items()})


def _fields_absent(reads: list[_Read], gpus: Sequence[int]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for gpu in gpus:
        mine = [r.sample for r in reads if r.gpu == gpu and not r.sample.lost]
        absent = {
            m for m in METRIC_FIELDS if mine and all(getattr(s, m, None) is None for s in mine)
        }
        out[str(gpu)] = [
            m for m in METRIC_FIELDS if m in absent and _EITHER.get(m, m) in absent
        ]
    return out


def _unusable(reads: list[_Read]) -> tuple[list[int], dict[str, str]]:
    """GPUs lost, and GPUs this user may not open (with NVML's error), over ``reads``."""
    lost: set[int] = set()
    inaccessible: dict[str, str] = {}
    for r in reads:
        # Newer backends mark a GPU NVML refuses this user; it is not lost.
        refused = getattr(r.sample, "inaccessible", None)
        if refused:
            inaccessible[str(r.gpu)] = str(refused)
        elif r.sample.lost:
            lost.add(r.gpu)
    return sorted(lost), inaccessible


def _call_or_none(nvml: Any, name: str, *args: Any) -> Any:
    try:
        return getattr(nvml, name)(*args)
    except (pynvml.NVMLError, AttributeError):
        # The fake has no version calls; an old driver lacks some: the field is unknown.
        return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _versions(nvml: Any) -> dict[str, str | None]:
    cuda = _call_or_none(nvml, "nvmlSystemGetCudaDriverVersion_v2")
    if cuda is None:
        cuda = _call_or_none(nvml, "nvmlSystemGetCudaDriverVersion")
    return {
        "driver": _text(_call_or_none(nvml, "nvmlSystemGetDriverVersion")),
        "nvml": _text(_call_or_none(nvml, "nvmlSystemGetNVMLVersion")),
        "cuda_driver": f"{cuda // 1000}.{cuda % 1000 // 10}" if isinstance(cuda, int) else None,
        "pynvml": _package_version("nvidia-ml-py"),
        "rooftop": _package_version("rooftop"),
        "python": platform.python_version(),
    }


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gpu_details(nvml: Any, infos: Sequence[GpuInfo]) -> list[dict[str, Any]]:
    out = []
    for info in infos:
        entry: dict[str, Any] = {
            "index": info.gpu_index,
            "uuid": info.gpu_uuid,
            "name": info.gpu_name,
            "has_gpm": info.has_gpm,
            "mem_total_bytes": info.mem_total_bytes,
            "pci_bus_id": None,
            "mig_mode": None,
        }
        handle = _call_or_none(nvml, "nvmlDeviceGetHandleByIndex", info.gpu_index)
        if handle is not None:
            pci = _call_or_none(nvml, "nvmlDeviceGetPciInfo", handle)
            entry["pci_bus_id"] = _text(getattr(pci, "busId", None))
            entry["mig_mode"] = _mig_mode(nvml, handle)
        out.append(entry)
    return out


def _mig_mode(nvml: Any, handle: Any) -> dict[str, str] | str | None:
    fn = getattr(nvml, "nvmlDeviceGetMigMode", None)
    if fn is None:
        return None  # a library without MIG (the fake)
    try:
        current, pending = fn(handle)
    except pynvml.NVMLError as err:
        if getattr(err, "value", None) == pynvml.NVML_ERROR_NOT_SUPPORTED:
            return "not supported"
        return _error_text(err)
    names = {pynvml.NVML_DEVICE_MIG_ENABLE: "enabled", pynvml.NVML_DEVICE_MIG_DISABLE: "disabled"}
    return {"current": names.get(current, str(current)),
            "pending": names.get(pending, str(pending))}


def _driver_params() -> dict[str, str]:
    try:
        text = Path("/proc/driver/nvidia/params").read_text(encoding="utf-8")
    except OSError:
        return {}
    params = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k: params[k].strip() for k in _DRIVER_PARAMS if k in params}


def _whoami() -> dict[str, Any]:
    euid = os.geteuid()
    try:
        user = pwd.getpwuid(euid).pw_name
    except KeyError:
        user = None
    return {"uid": os.getuid(), "euid": euid, "gid": os.getgid(), "user": user,
            "groups": sorted(os.getgroups())}


def open_library(fake: str | None, gpus: int, workload: str) -> Any:
    """The NVML library to time: the real ``pynvml``, or a ``FakeNvmlLibrary``."""
    if fake is None:
        return pynvml
    return FakeNvmlLibrary(fake, gpus, workload)


def measure(library: Any, ticks: int, rate_hz: float, gpm_seconds: float) -> dict[str, Any]:
    """Open ``NvmlBackend`` over a timing proxy of ``library``; time the sampling loop.

    Raises:
        NvmlUnavailable: NVML cannot be initialized.
    """
    nvml = TimedNvml(library)
    started = time.perf_counter()
    # The backend's looks at the XID event set (a Timeout answer when none is queued)
    # are not sensor reads: timed here, they would read as timeout "errors".
    backend = NvmlBackend(nvml, xid_events=False)
    init_ms = (time.perf_counter() - started) * 1000.0
    timed = TimedBackend(backend, nvml)
    try:
        sampler = Sampler(timed)
        gpus = [info.gpu_index for info in timed.devices()]
        # The backend primed GPM while opening: start one GPM interval later, so the
        # first tick already computes metrics as every later one does.
        time.sleep(GPM_MIN_INTERVAL_S)
        nvml.phase = "timing"
        tick_ns = _run_ticks(sampler, ticks, rate_hz)
        timing_reads = [r for r in timed.reads if r.phase == "timing"]
        gpm: dict[str, Any] = {}
        for label, hz in (("1hz", 1.0), ("10hz", 10.0)):
            nvml.phase = f"gpm_{label}"
            _run_ticks(sampler, max(1, round(gpm_seconds * hz)), hz)
            gpm[label] = {
                "seconds": gpm_seconds,
                **_freshness(timed.reads, nvml.phase, gpus, hz),
            }
        nvml.phase = "info"
        details = _gpu_details(library, timed.devices())
        versions = _versions(library)
    finally:
        nvml.phase = "close"
        timed.close()
    lost, inaccessible = _unusable(timed.reads)
    return {
        "whoami": _whoami(),
        "versions": versions,
        "gpus": details,
        "lost_gpus": lost,
        "inaccessible_gpus": inaccessible,
        "timing": {
            "ticks": ticks,
            "rate_hz": rate_hz,
            "init_ms": round(init_ms, 2),
            "tick_us": stats_us(tick_ns),
            "read_us": {str(g): stats_us(timed.read_ns[("timing", g)]) for g in gpus},
            "calls": nvml.report("timing"),
            "init_calls": nvml.report("init"),
        },
        "gpm": gpm,
        "fields_absent": _fields_absent(timing_reads, gpus),
    }


# -- child processes ------------------------------------------------------------------


_children: set[subprocess.Popen[str]] = set()


def _kill_children(signum: int, frame: FrameType | None) -> None:
    # SIGTERM (the shell's overall timeout): take the test workloads down with us.
    for child in list(_children):
        _kill_group(child)
    sys.exit(128 + signum)


def _kill_group(child: subprocess.Popen[str]) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclasses.dataclass(slots=True)
class _Ran:
    exit_code: int | None
    stdout: str
    tail: list[str]
    timed_out: bool
    seconds: float


def run_child(
    cmd: Sequence[str],
    timeout_s: float,
    *,
    echo: bool = False,
    env: dict[str, str] | None = None,
    cwd: Path | str = REPO,
    keep_stdout: bool = False,
) -> _Ran:
    """Run ``cmd`` in its own process group; kill the whole group after ``timeout_s``.

    Output is merged and its tail kept (and echoed to stderr with ``echo``); with
    ``keep_stdout`` stdout is kept apart, whole, and only stderr goes to the tail.
    """
    start = time.monotonic()
    child = subprocess.Popen(
        list(cmd), cwd=cwd, env=env, text=True, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE if keep_stdout else subprocess.STDOUT,
    )
    _children.add(child)
    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    stdout_parts: list[str] = []

    def pump() -> None:
        stream = child.stderr if keep_stdout else child.stdout
        assert stream is not None
        for line in stream:
            tail.append(line.rstrip("\n"))
            if echo:
                print(f"  | {line}", end="", file=sys.stderr, flush=True)

    def keep() -> None:
        assert child.stdout is not None
        stdout_parts.append(child.stdout.read())

    readers = [threading.Thread(target=pump, daemon=True)]
    if keep_stdout:
        readers.append(threading.Thread(target=keep, daemon=True))
    for reader in readers:
        reader.start()
    timed_out = False
    try:
        child.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(child)
        child.wait()
    finally:
        _children.discard(child)
    for reader in readers:
        reader.join(timeout=5)
    for stream in (child.stdout, child.stderr):
        if stream is not None:
            stream.close()
    return _Ran(None if timed_out else child.returncode, "".join(stdout_parts), list(tail),
                timed_out, round(time.monotonic() - start, 2))


def run_pytest(timeout_s: float, extra: Sequence[str] = (), *, echo: bool = True) -> dict[str, Any]:
    """Run every ``gpu``-marked test (anywhere under tests/) and count the outcomes."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q",
               "-rfEs", f"--junitxml={junit}", *extra]
        ran = run_child(cmd, timeout_s, echo=echo)
        counts = _junit_counts(junit) if junit.is_file() else {}
    shown = ["pytest", *cmd[3:]]
    shown[shown.index(f"--junitxml={junit}")] = "--junitxml=..."
    return {
        "command": " ".join(shown),
        "exit_code": ran.exit_code,
        "timed_out": ran.timed_out,
        "seconds": ran.seconds,
        "tests": counts.get("tests"),
        "passed": counts.get("passed"),
        "failed": counts.get("failed"),
        "errors": counts.get("errors"),
        "skipped": counts.get("skipped"),
        "not_passed": counts.get("not_passed", []),
        "output_tail": ran.tail,
    }


def _junit_counts(path: Path) -> dict[str, Any]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = Counter[str]()
    for suite in suites:
        for key in ("tests", "failures", "errors", "skipped"):
            totals[key] += int(suite.get(key, "0"))
    not_passed = []
    for case in root.iter("testcase"):
        for outcome in ("failure", "error", "skipped"):
            element = case.find(outcome)
            if element is not None:
                message = element.get("message") or (element.text or "").strip()
                not_passed.append({
                    "test": f"{case.get('classname', '')}::{case.get('name', '')}",
                    "outcome": {"failure": "failed", "error": "error"}.get(outcome, outcome),
                    "message": message[:300],
                })
    failed, errors, skipped = totals["failures"], totals["errors"], totals["skipped"]
    return {
        "tests": totals["tests"],
        "passed": max(0, totals["tests"] - failed - errors - skipped),
        "failed": failed,
        "errors": errors,
        "skipped": skipped,
        "not_passed": not_passed[:50],
    }


def _drop_command(user: str) -> tuple[list[str], pwd.struct_passwd] | str:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return f"no user {user!r} on this host"
    if setpriv := shutil.which("setpriv"):
        # Numeric ids and no PAM session: nothing but the identity changes.
        return [setpriv, f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}",
                "--clear-groups", "--"], entry
    if runuser := shutil.which("runuser"):
        return [runuser, "-u", user, "--"], entry
    return "neither setpriv nor runuser is installed"


def _child_args(args: argparse.Namespace) -> list[str]:
    out = ["--sample-only", "--out", "-", "--ticks", str(args.ticks), "--rate", str(args.rate),
           "--gpm-seconds", str(args.gpm_seconds)]
    if args.fake:
        out += ["--fake", args.fake, "--gpus", str(args.gpus), "--workload", args.workload]
    return out


def run_unprivileged(
    user: str, args: argparse.Namespace, privileged: dict[str, Any], timeout_s: float
) -> dict[str, Any]:
    """Repeat the sampling as ``user`` and list what degraded against ``privileged``.

    ``timeout_s`` bounds the whole step: finding a Python the user can run, and the run.
    """
    deadline = time.monotonic() + timeout_s
    result: dict[str, Any] = {"user": user}
    if os.geteuid() != 0:
        result["skipped"] = f"not root (uid {os.geteuid()}): this run already is unprivileged"
        return result
    drop = _drop_command(user)
    if isinstance(drop, str):
        result["error"] = drop
        return result
    prefix, entry = drop
    result.update(uid=entry.pw_uid, gid=entry.pw_gid, via=Path(prefix[0]).name)
    base_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": entry.pw_dir, "LANG": "C.UTF-8",
                "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1"}
    if "LD_LIBRARY_PATH" in os.environ:  # where some hosts keep libnvidia-ml.so.1
        base_env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
    interpreter = _interpreter_for(prefix, base_env, deadline)
    if isinstance(interpreter, str):
        result["error"] = interpreter
        return result
    python, env = interpreter
    result["interpreter"] = python
    result["pythonpath"] = env.get("PYTHONPATH")
    ran = run_child([*prefix, python, str(SCRIPT), *_child_args(args)],
                    max(1.0, deadline - time.monotonic()), env=env, cwd="/", keep_stdout=True)
    result.update(exit_code=ran.exit_code, timed_out=ran.timed_out, seconds=ran.seconds)
    if ran.exit_code == 0:
        child = json.loads(ran.stdout)
        result["result"] = child
        result["degraded"] = degraded(privileged, child)
        result["p50_us"] = _p50_pairs(privileged, child)
    else:
        last = next((line for line in reversed(ran.tail) if line.strip()), "no output")
        result["error"] = "timed out" if ran.timed_out else last
        # NVML refusing a non-root user outright is the biggest degradation of all.
        result["degraded"] = [f"sampling failed as {user}: {result['error']}"]
    return result


def _interpreter_for(
    prefix: list[str], base_env: dict[str, str], deadline: float
) -> tuple[str, dict[str, str]] | str:
    # The venv's python may resolve into a directory the user cannot enter (pyenv under
    # /root): then a system python of the same version, given the venv's packages and
    # the checkout on PYTHONPATH, runs the same code (the sampling path is pure Python).
    packages = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates: list[tuple[str, dict[str, str]]] = [(sys.executable, base_env)]
    system = shutil.which(version, path="/usr/local/bin:/usr/bin:/bin")
    if system:
        pythonpath = os.pathsep.join([str(REPO), *sorted(packages)])
        candidates.append((system, {**base_env, "PYTHONPATH": pythonpath}))
    last = "no python found"
    for python, env in candidates:
        timeout_s = max(1.0, min(60.0, (deadline - time.monotonic()) / 2))
        probe = run_child([*prefix, python, "-c", "import rooftop.agent.sensors.nvml"],
                          timeout_s, env=env, cwd="/")
        if probe.exit_code == 0:
            return python, env
        last = next((ln for ln in reversed(probe.tail) if ln.strip()), f"exit {probe.exit_code}")
    return (f"the user cannot run Rooftop's Python ({last}); make the checkout and .venv "
            f"readable by it (e.g. a clone outside /root) and rerun")


def degraded(privileged: dict[str, Any], child: dict[str, Any]) -> list[str]:
    """What the unprivileged run lost: new call errors, absent fields, GPM, GPUs."""
    out: list[str] = []
    # A refusal at start-up (the backend primes GPM there) is as much a loss as one in
    # the sampling loop.
    for step, where in (("calls", ""), ("init_calls", " (start-up)")):
        mine = privileged["timing"].get(step, {})
        theirs = child["timing"].get(step, {})
        for name in sorted(set(mine) | set(theirs)):
            had = mine.get(name, {}).get("per_gpu", {})
            for gpu, entry in sorted(theirs.get(name, {}).get("per_gpu", {}).items()):
                new = {e: n for e, n in entry.get("errors", {}).items()
                       if e not in had.get(gpu, {}).get("errors", {})}
                for error, n in sorted(new.items()):
                    out.append(f"{name} on GPU {gpu}: {error} ×{n}{where}")
            if step == "calls" and name in mine and name not in theirs:
                out.append(f"{name}: no longer called")
    for gpu, absent in sorted(child["fields_absent"].items()):
        lost = sorted(set(absent) - set(privileged["fields_absent"].get(gpu, [])))
        if lost:
            out.append(f"GPU {gpu}: absent fields {', '.join(lost)}")
    priv_gpm = {g["index"]: g["has_gpm"] for g in privileged["gpus"]}
    for gpu in child["gpus"]:
        if priv_gpm.get(gpu["index"]) and not gpu["has_gpm"]:
            out.append(f"GPU {gpu['index']}: GPM unavailable")
    for label in ("1hz", "10hz"):
        for gpu, counts in sorted(child["gpm"][label]["per_gpu"].items()):
            before = privileged["gpm"][label]["per_gpu"].get(gpu, {}).get("fresh_by_nvml", 0)
            now = counts["fresh_by_nvml"]
            # At 10 Hz a tick lands either side of GPM's 100 ms minimum by scheduling
            # jitter alone, so there only losing GPM altogether is a degradation.
            if now < before and (label == "1hz" or now == 0):
                out.append(f"GPU {gpu}: fresh GPM readings at {label} {now} (root: {before})")
    for gpu, error in sorted(child.get("inaccessible_gpus", {}).items()):
        if gpu not in privileged.get("inaccessible_gpus", {}):
            out.append(f"GPU {gpu}: cannot be opened (NVML {error})")
    if len(child["gpus"]) < len(privileged["gpus"]):
        out.append(f"sees {len(child['gpus'])} GPUs (root: {len(privileged['gpus'])})")
    return out


def _p50_pairs(privileged: dict[str, Any], child: dict[str, Any]) -> dict[str, list[Any]]:
    mine, theirs = privileged["timing"]["calls"], child["timing"]["calls"]
    return {name: [mine.get(name, {}).get("all", {}).get("p50_us"),
                   theirs.get(name, {}).get("all", {}).get("p50_us")]
            for name in sorted(set(mine) | set(theirs))}


def probe_torch(timeout_s: float = 120) -> dict[str, Any]:
    """The torch version and the GPUs CUDA sees, in CUDA's order (in a child: torch is slow)."""
    program = (
        "import json\n"
        "try:\n"
        "    import torch\n"
        "except Exception as e:\n"
        "    print(json.dumps({'installed': False, 'error': f'{type(e).__name__}: {e}'}))\n"
        "    raise SystemExit\n"
        "out = {'installed': True, 'version': torch.__version__, 'cuda': torch.version.cuda,\n"
        "       'cuda_available': torch.cuda.is_available(), 'devices': []}\n"
        "for i in range(torch.cuda.device_count() if out['cuda_available'] else 0):\n"
        "    p = torch.cuda.get_device_properties(i)\n"
        "    out['devices'].append({'cuda_index': i, 'name': p.name,\n"
        "                           'uuid': str(getattr(p, 'uuid', '')) or None})\n"
        "print(json.dumps(out))\n"
    )
    # Unset so torch sees every GPU, in CUDA's own order, as a workload would.
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    ran = run_child([sys.executable, "-c", program], timeout_s, env=env, keep_stdout=True)
    if ran.exit_code != 0:
        last = "timed out" if ran.timed_out else (ran.tail[-1] if ran.tail else "no output")
        return {"installed": None, "error": f"probing torch failed: {last}"}
    result: dict[str, Any] = json.loads(ran.stdout)
    return result


def _map_cuda_to_nvml(torch_info: dict[str, Any], gpus: list[dict[str, Any]]) -> None:
    def norm(uuid: str | None) -> str:
        return (uuid or "").lower().removeprefix("gpu-")

    by_uuid = {norm(g["uuid"]): g["index"] for g in gpus}
    for device in torch_info.get("devices", []):
        device["nvml_index"] = by_uuid.get(norm(device.get("uuid")))
    devices = torch_info.get("devices", [])
    torch_info["cuda_order_is_nvml_order"] = (
        all(d["nvml_index"] == d["cuda_index"] for d in devices) if devices else None
    )


# -- findings ---------------------------------------------------------------------------


def findings(report: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Problems (exit 1) and notes (worth knowing, not wrong) in ``report``."""
    problems: list[str] = []
    notes: list[str] = []
    real = report["backend"] == "nvml"
    for name, entry in report["timing"]["calls"].items():
        for gpu, stats in entry["per_gpu"].items():
            for error, n in stats.get("errors", {}).items():
                if not any(f"(NVML error {code})" in error for code in _ABSENT_ERRORS):
                    problems.append(f"{name} on GPU {gpu} failed: {error} ×{n}")
    problems += [f"GPU {g} is lost" for g in report["lost_gpus"]]
    problems += [f"GPU {g} cannot be opened by uid {report['whoami']['euid']}: NVML {error}"
                 for g, error in report["inaccessible_gpus"].items()]
    for gpu in report["gpus"]:
        counts = report["gpm"]["1hz"]["per_gpu"].get(str(gpu["index"]), {})
        fresh, reads = counts.get("fresh_by_nvml", 0), counts.get("readings", 0)
        # A second apart, every GPM reading must be new: 100 ms is the only limit.
        if gpu["has_gpm"] and fresh < reads:
            problems.append(f"GPU {gpu['index']}: {fresh} of {reads} GPM readings fresh at 1 Hz")
        fast = report["gpm"]["10hz"]["per_gpu"].get(str(gpu["index"]), {})
        if gpu["has_gpm"] and fast.get("readings"):
            notes.append(f"GPU {gpu['index']}: at 10 Hz {fast['fresh_by_nvml']} of "
                         f"{fast['readings']} GPM readings are fresh (the rest come within "
                         "GPM's 100 ms of the last)")
        mig = gpu["mig_mode"]
        if isinstance(mig, dict) and "enabled" in mig.values():
            notes.append(f"GPU {gpu['index']}: MIG {mig['current']} (pending {mig['pending']})")
    period_us = 1e6 / report["timing"]["rate_hz"]
    tick_p99 = report["timing"]["tick_us"].get("p99_us", 0)
    if tick_p99 > period_us:
        notes.append(f"a tick's p99 ({tick_p99 / 1000:.1f} ms) is over the "
                     f"{period_us / 1000:.0f} ms period at {report['timing']['rate_hz']:g} Hz")
    if report["driver_params"].get("RmProfilingAdminOnly") == "1":
        notes.append("the driver restricts profiling (GPM) to admins: RmProfilingAdminOnly=1")
    torch_info = report["torch"]
    if real and torch_info is not None:
        if not torch_info.get("installed"):
            problems.append(f"torch is missing ({torch_info.get('error')}): the GPU tests fail")
        elif not torch_info.get("cuda_available"):
            problems.append(f"torch {torch_info.get('version')} cannot use CUDA here "
                            "(a CPU-only wheel, or a driver older than its CUDA?)")
        elif torch_info.get("cuda_order_is_nvml_order") is False:
            notes.append("CUDA numbers the GPUs differently from NVML: pick GPUs by UUID")
    pytest_result = report["pytest"]
    if pytest_result is not None:
        if pytest_result["timed_out"]:
            problems.append(f"the GPU tests timed out after {pytest_result['seconds']:.0f} s")
        elif pytest_result["exit_code"] != 0:
            problems.append(f"the GPU tests failed (pytest exit {pytest_result['exit_code']}: "
                            f"{pytest_result['failed']} failed, {pytest_result['errors']} errors)")
        if real and pytest_result["skipped"]:
            problems.append(f"{pytest_result['skipped']} GPU tests skipped on a GPU host")
    unprivileged = report["unprivileged"]
    if unprivileged is not None and "result" not in unprivileged and "skipped" not in unprivileged:
        notes.append(f"no unprivileged run: {unprivileged.get('error')}")
    return problems, notes


# -- output -------------------------------------------------------------------------------


def summary(report: dict[str, Any]) -> Iterator[str]:
    """The report as lines for a person."""
    who, v = report["whoami"], report["versions"]
    yield (f"gpu-check: {report['backend']} on {report['host']['hostname']}, "
           f"uid {who['euid']} ({who['user']}), {len(report['gpus'])} GPU(s)")
    yield (f"versions: driver {v['driver'] or 'n/a'}, NVML {v['nvml'] or 'n/a'}, "
           f"CUDA driver {v['cuda_driver'] or 'n/a'}, pynvml {v['pynvml'] or 'n/a'}, "
           f"torch {_torch_line(report['torch'])}")
    for gpu in report["gpus"]:
        mig = gpu["mig_mode"]
        mig_text = mig["current"] if isinstance(mig, dict) else (mig or "n/a")
        yield (f"  GPU {gpu['index']}: {gpu['name']}  {gpu['uuid']}  "
               f"GPM {'yes' if gpu['has_gpm'] else 'no'}  MIG {mig_text}")
    timing = report["timing"]
    yield (f"NVML calls per read, {timing['ticks']} ticks at {timing['rate_hz']:g} Hz "
           f"(µs over all GPUs; worst GPU by p99):")
    yield f"  {'function':<42} {'calls':>6} {'p50':>8} {'p99':>8} {'max':>8}  worst GPU  errors"
    for name, entry in timing["calls"].items():
        a = entry["all"]
        worst = max(entry["per_gpu"].items(), key=lambda kv: kv[1].get("p99_us", 0))
        errors = sum(a["errors"].values())
        yield (f"  {name:<42} {a['count']:>6} {a['p50_us']:>8.1f} {a['p99_us']:>8.1f} "
               f"{a['max_us']:>8.1f}  {worst[0]:>4} {worst[1]['p99_us']:>7.1f}  "
               f"{errors or ''}")
    reads = "  ".join(f"GPU {g} p50 {s['p50_us']:.0f} p99 {s['p99_us']:.0f}"
                      for g, s in timing["read_us"].items())
    yield f"  read() µs: {reads}"
    tick = timing["tick_us"]
    yield (f"  tick µs: p50 {tick['p50_us']:.0f} p99 {tick['p99_us']:.0f} max "
           f"{tick['max_us']:.0f}; NvmlBackend start-up {timing['init_ms']:.1f} ms")
    yield "GPM readings: fresh (computed by NVML) / reads; by value: changed, repeated"
    for phase in report["gpm"].values():
        marker = phase["marker"]
        parts = []
        for gpu, c in phase["per_gpu"].items():
            by_marker = f"; stale by marker {c['stale_by_marker']}" if marker else ""
            parts.append(f"GPU {gpu} {c['fresh_by_nvml']}/{c['readings']} "
                         f"({c['fresh_by_value']}, {c['repeated_by_value']}{by_marker})")
        yield f"  at {phase['rate_hz']:g} Hz for {phase['seconds']:g} s: {'; '.join(parts)}"
        if marker:
            yield f"    (marker: {marker})"
    absent = {g: f for g, f in report["fields_absent"].items() if f}
    if absent:
        yield "absent fields: " + "; ".join(f"GPU {g}: {', '.join(f)}" for g, f in absent.items())
    yield from _pytest_lines(report["pytest"])
    yield from _unprivileged_lines(report["unprivileged"])
    for note in report["notes"]:
        yield f"note: {note}"
    for problem in report["problems"]:
        yield f"PROBLEM: {problem}"
    if not report["problems"]:
        yield "no problems found"


def _torch_line(torch_info: dict[str, Any] | None) -> str:
    if torch_info is None:
        return "not checked"
    if not torch_info.get("installed"):
        return f"missing ({torch_info.get('error')})"
    cuda = "CUDA " + str(torch_info.get("cuda")) if torch_info.get("cuda_available") else "no CUDA"
    return f"{torch_info.get('version')} ({cuda})"


def _pytest_lines(result: dict[str, Any] | None) -> Iterator[str]:
    if result is None:
        yield "GPU tests: not run (--pytest)"
        return
    yield (f"GPU tests ({result['command']}): {result['passed']} passed, {result['failed']} "
           f"failed, {result['errors']} errors, {result['skipped']} skipped; exit "
           f"{'timeout' if result['timed_out'] else result['exit_code']} in "
           f"{result['seconds']:.0f} s")
    for case in result["not_passed"][:10]:
        yield f"  {case['outcome']}: {case['test']}: {case['message'][:120]}"


def _unprivileged_lines(result: dict[str, Any] | None) -> Iterator[str]:
    if result is None:
        yield "unprivileged: not run (--unprivileged USER)"
        return
    if "skipped" in result:
        yield f"unprivileged: {result['skipped']}"
        return
    if "degraded" not in result:
        yield f"unprivileged ({result['user']}): not run: {result.get('error')}"
        return
    degraded_items = result["degraded"]
    yield (f"unprivileged ({result['user']}, uid {result.get('uid')}): "
           f"{'nothing degraded' if not degraded_items else 'degraded:'}")
    for item in degraded_items:
        yield f"  - {item}"


def new_report(backend: str, measurement: dict[str, Any]) -> dict[str, Any]:
    """The report around ``measure``'s result; the later steps fill in their keys."""
    return {
        "schema": SCHEMA,
        "complete": False,
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": {"hostname": socket.gethostname(), "kernel": platform.release()},
        "backend": backend,  # "nvml", or "fake:<profile>"
        **measurement,
        "driver_params": _driver_params(),
        "torch": None,
        "pytest": None,
        "unprivileged": None,
        "problems": [],
        "notes": [],
        "seconds": None,
    }


def write_json(report: dict[str, Any], out: str) -> None:
    """Write ``report`` to ``out`` (``-``: stdout), atomically: a reader never sees half."""
    text = json.dumps(report, indent=2) + "\n"
    if out == "-":
        sys.stdout.write(text)
        return
    path = Path(out)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gpu_check.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--out", default="gpu-check.json", help="JSON file ('-': stdout)")
    parser.add_argument("--fake", metavar="PROFILE", choices=FAKE_PROFILES,
                        help="time the shipped fake NVML (h100, a100) instead of a GPU")
    parser.add_argument("--gpus", type=int, default=1, help="fake GPUs (with --fake)")
    # Busy, so that fresh GPM values differ from the last (an idle fake GPU reads 0s).
    parser.add_argument("--workload", default="gemv", help="fake workload (with --fake)")
    parser.add_argument("--ticks", type=int, default=100, help="ticks timed (default 100)")
    parser.add_argument("--rate", type=float, default=10.0, help="their rate, Hz (default 10)")
    parser.add_argument("--gpm-seconds", type=float, default=5.0,
                        help="how long to count fresh GPM readings at 1 Hz and at 10 Hz")
    parser.add_argument("--pytest", action="store_true", help="run the gpu-marked tests")
    parser.add_argument("--deadline", type=float, default=600.0,
                        help="seconds for the whole check; each step gets what is left")
    parser.add_argument("--pytest-timeout", type=float, default=420.0)
    parser.add_argument("--unprivileged", metavar="USER",
                        help="repeat the sampling as USER (needs root), e.g. nobody")
    parser.add_argument("--unprivileged-timeout", type=float, default=120.0)
    parser.add_argument("--probe", action="store_true",
                        help="print real/fake if NVML opens, else one line and exit 1")
    parser.add_argument("--sample-only", action="store_true",
                        help="only the sampling (what the unprivileged run does)")
    args = parser.parse_args(argv)
    if args.gpus != 1 and not args.fake:
        parser.error("--gpus needs --fake")
    if args.ticks < 1 or args.rate <= 0 or args.gpm_seconds <= 0 or args.gpus < 1:
        parser.error("--ticks, --rate, --gpm-seconds and --gpus must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; the exit status (see the module docstring)."""
    args = _parse(argv)
    signal.signal(signal.SIGTERM, _kill_children)
    started = time.monotonic()
    library = open_library(args.fake, args.gpus, args.workload)
    try:
        if args.probe:
            NvmlBackend(library).close()
            print("fake" if args.fake else "real")
            return 0
        measurement = measure(library, args.ticks, args.rate, args.gpm_seconds)
    except NvmlUnavailable as exc:
        print(f"gpu-check: error: {exc.reason}; this needs an NVIDIA GPU and driver "
              f"(--fake h100 runs it on a simulated one)", file=sys.stderr)
        return 1
    if args.sample_only:
        write_json(measurement, args.out)
        return 0
    report = new_report(f"fake:{args.fake}" if args.fake else "nvml", measurement)
    deadline: float = started + args.deadline

    def left(cap_s: float, keep_s: float = 0.0) -> float:
        # A step gets its own cap, or what the deadline leaves after later steps' share.
        return max(5.0, min(cap_s, deadline - keep_s - time.monotonic()))

    unprivileged_s = args.unprivileged_timeout if args.unprivileged else 0.0
    torch_info = probe_torch(left(120.0))
    _map_cuda_to_nvml(torch_info, report["gpus"])
    report["torch"] = torch_info
    checkpoint = args.out != "-"
    if checkpoint:  # a kill later on still leaves what was measured so far
        write_json(report, args.out)
    if args.pytest:
        print("gpu-check: running the GPU tests...", file=sys.stderr, flush=True)
        report["pytest"] = run_pytest(left(args.pytest_timeout, keep_s=unprivileged_s))
        if checkpoint:
            write_json(report, args.out)
    if args.unprivileged:
        print(f"gpu-check: sampling again as {args.unprivileged}...", file=sys.stderr,
              flush=True)
        report["unprivileged"] = run_unprivileged(
            args.unprivileged, args, measurement, left(args.unprivileged_timeout)
        )
    report["problems"], report["notes"] = findings(report)
    report["complete"] = True
    report["seconds"] = round(time.monotonic() - started, 2)
    write_json(report, args.out)
    # With the JSON on stdout the summary would corrupt it: it goes to stderr then.
    stream = sys.stderr if args.out == "-" else sys.stdout
    for line in summary(report):
        print(line, file=stream)
    if args.out != "-":
        print(f"wrote {args.out}", file=stream)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
