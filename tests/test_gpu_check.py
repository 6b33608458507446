"""scripts/gpu-check.sh and scripts/gpu_check.py, run on the fake H100s; the GPU tests' guards.

The Python half runs against ``FakeNvmlLibrary`` (``--fake h100``), which counts every
call it gets: what the timing proxy filed per function and GPU is checked against those
counts. The shell half runs in a copy with a stand-in ``.venv/bin/python`` (no pip, no
network). The GPU tests are run with a stand-in ``pynvml`` that reports one GPU, so that
"a GPU but no torch" can be checked on a machine without one.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from rooftop.agent.sampler import Sampler
from rooftop.agent.sensors.fake import FakeNvmlLibrary
from rooftop.agent.sensors.nvml import NvmlBackend
from rooftop.common.model import GpuSample
from tests.support import nvml_works

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"

# Every NVML function one NvmlBackend.read makes on an H100 (GPM ones aside).
PER_READ = ("nvmlDeviceGetUtilizationRates", "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetClockInfo",
            "nvmlDeviceGetPowerUsage", "nvmlDeviceGetCurrPcieLinkGeneration",
            "nvmlDeviceGetCurrPcieLinkWidth", "nvmlDeviceGetComputeRunningProcesses")


def load_gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module


gpu_check = load_gpu_check()


def run_script(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, check=False, cwd=ROOT)


def can_drop_to_nobody() -> bool:
    return os.geteuid() == 0 and bool(shutil.which("setpriv") or shutil.which("runuser"))


# -- the timing proxy -----------------------------------------------------------------


def test_every_call_of_the_loop_is_timed_under_its_function_and_gpu():
    library = FakeNvmlLibrary("h100", 2, "gemv")
    nvml = gpu_check.TimedNvml(library)
    # As gpu_check opens it: the looks at the XID event set are not timed reads.
    timed = gpu_check.TimedBackend(NvmlBackend(nvml, xid_events=False), nvml)
    try:
        sampler = Sampler(timed)
        time.sleep(0.1)
        before = library.calls.copy()
        nvml.phase = "timing"
        gpu_check._run_ticks(sampler, 5, 8.0)  # 125 ms apart: GPM computes on every read
        made = library.calls - before
    finally:
        nvml.phase = "close"
        timed.close()
    calls = nvml.report("timing")
    # The proxy saw exactly the calls the library got: none missed, none invented.
    assert {name: entry["all"]["count"] for name, entry in calls.items()} == dict(made)
    for name in (*PER_READ, "nvmlGpmSampleGet", "nvmlGpmMetricsGet"):
        per_gpu = calls[name]["per_gpu"]
        assert set(per_gpu) == {"0", "1"}, name
        assert [per_gpu[g]["count"] for g in ("0", "1")] == [5, 5], name
        for stats in (calls[name]["all"], per_gpu["0"], per_gpu["1"]):
            assert 0 < stats["p50_us"] <= stats["p99_us"] <= stats["max_us"], name
    # GPM metrics (no handle in the call) are filed under the GPU their samples came from.
    computed = [gpu for gpu, _, _ in library.gpm_intervals[-10:]]
    assert computed.count(0) == computed.count(1) == 5
    init = nvml.report("init")
    assert init["nvmlInit"]["per_gpu"] == {"system": init["nvmlInit"]["per_gpu"]["system"]}
    assert set(init["nvmlDeviceGetUUID"]["per_gpu"]) == {"0", "1"}


def test_stats_are_nearest_rank_percentiles_in_microseconds():
    stats = gpu_check.stats_us([i * 1000 for i in range(1, 101)])  # 1..100 µs
    assert stats == {"count": 100, "p50_us": 50.0, "p99_us": 99.0, "max_us": 100.0,
                     "mean_us": 50.5}
    assert gpu_check.stats_us([]) == {"count": 0}


@pytest.fixture(scope="module")
def clean_and_refused():
    """A measurement of two fake H100s, and one where GPU 1 refuses GPM and power."""
    clean = gpu_check.measure(FakeNvmlLibrary("h100", 2, "gemv"), 5, 20.0, 0.1)
    library = FakeNvmlLibrary("h100", 2, "gemv")
    for fn in ("nvmlGpmSampleGet", "nvmlDeviceGetPowerUsage"):
        library.inject(1, fn, "no_permission")
    refused = gpu_check.measure(library, 5, 20.0, 0.1)
    return clean, refused


@pytest.mark.slow
def test_what_a_user_loses_is_listed_per_call_field_and_gpu(clean_and_refused):
    clean, refused = clean_and_refused
    assert gpu_check.degraded(clean, clean) == []
    lost = gpu_check.degraded(clean, refused)
    assert any(line.startswith("nvmlDeviceGetPowerUsage on GPU 1: Insufficient Permissions")
               for line in lost), lost
    assert any(line.startswith("nvmlGpmSampleGet on GPU 1:") for line in lost), lost
    absent = next(line for line in lost if line.startswith("GPU 1: absent fields"))
    assert "power_w" in absent and "dram_bw_pct" in absent and "sm_active_pct" in absent
    assert not any("GPU 0" in line for line in lost), lost
    assert refused["gpm"]["1hz"]["per_gpu"]["1"]["fresh_by_nvml"] == 0
    assert refused["gpm"]["1hz"]["per_gpu"]["0"]["fresh_by_nvml"] == 1


@pytest.mark.slow
def test_nvml_errors_as_root_are_problems_but_not_supported_is_not(clean_and_refused):
    clean, refused = clean_and_refused
    problems, _ = gpu_check.findings(gpu_check.new_report("fake:h100", clean))
    assert problems == []
    problems, _ = gpu_check.findings(gpu_check.new_report("fake:h100", refused))
    assert any(p.startswith("nvmlDeviceGetPowerUsage on GPU 1 failed: Insufficient") for p in
               problems), problems
    library = FakeNvmlLibrary("h100", 1, "gemv")
    library.inject(0, "nvmlDeviceGetPowerUsage", "not_supported")
    unsupported = gpu_check.measure(library, 3, 20.0, 0.1)
    problems, _ = gpu_check.findings(gpu_check.new_report("fake:h100", unsupported))
    assert problems == [] and unsupported["fields_absent"]["0"] == ["power_w"]


def test_row_remapping_or_page_retirement_absent_alone_is_by_design_not_missing():
    # GPU 0 retires pages (V100), GPU 1 remaps rows (H100), GPU 2 answers neither.
    v100 = GpuSample(time_s=0.0, gpu_index=0,
                     retired_pages_single_bit=0, retired_pages_double_bit=0)
    h100 = GpuSample(time_s=0.0, gpu_index=1,
                     remapped_rows_corrected=0, remapped_rows_uncorrected=0)
    neither = GpuSample(time_s=0.0, gpu_index=2)
    reads = [gpu_check._Read("1hz", s.gpu_index, s, gpm_computed=False)
             for s in (v100, h100, neither)]
    absent = gpu_check._fields_absent(reads, [0, 1, 2])
    pair = {"remapped_rows_corrected", "remapped_rows_uncorrected",
            "retired_pages_single_bit", "retired_pages_double_bit"}
    assert not pair & set(absent["0"]) and not pair & set(absent["1"])
    assert pair <= set(absent["2"])


# -- the program ---------------------------------------------------------------------


@pytest.mark.slow
def test_fake_run_writes_the_json_and_prints_a_summary(tmp_path):
    out = tmp_path / "gpu-check.json"
    extra = ["--unprivileged", "nobody"] if can_drop_to_nobody() else []
    proc = run_script("--fake", "h100", "--gpus", "2", "--ticks", "10", "--rate", "20",
                      "--gpm-seconds", "1", "--out", str(out), *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert set(report) == {
        "schema", "complete", "started_at", "host", "backend", "whoami", "versions", "gpus",
        "lost_gpus", "inaccessible_gpus", "timing", "gpm", "fields_absent", "driver_params",
        "torch", "pytest", "unprivileged", "problems", "notes", "seconds"}
    assert report["complete"] and report["backend"] == "fake:h100" and report["problems"] == []
    assert report["whoami"]["uid"] == os.getuid()
    versions = report["versions"]
    assert versions["pynvml"] == importlib.metadata.version("nvidia-ml-py")
    assert set(versions) == {"driver", "nvml", "cuda_driver", "pynvml", "rooftop", "python"}
    assert [(g["index"], g["uuid"][:4], g["has_gpm"]) for g in report["gpus"]] == [
        (0, "GPU-", True), (1, "GPU-", True)]
    timing = report["timing"]
    assert timing["ticks"] == 10 and timing["tick_us"]["count"] == 10
    assert set(timing["read_us"]) == {"0", "1"}
    for name in PER_READ:
        entry = timing["calls"][name]
        assert entry["all"]["count"] == 20
        assert {g: s["count"] for g, s in entry["per_gpu"].items()} == {"0": 10, "1": 10}
        assert entry["per_gpu"]["1"]["p99_us"] > 0 and entry["all"]["errors"] == {}
    for label, rate, readings in (("1hz", 1.0, 1), ("10hz", 10.0, 10)):
        phase = report["gpm"][label]
        assert phase["rate_hz"] == rate
        for counts in phase["per_gpu"].values():
            assert counts["readings"] == readings
            # A busy fake GPU: every computed reading has new values.
            assert counts["fresh_by_value"] == counts["fresh_by_nvml"] >= 1
            assert counts["fresh_by_value"] + counts["repeated_by_value"] == counts["with_gpm"]
            if phase["marker"]:  # every read is computed anew or marked stale
                assert counts["fresh_by_nvml"] + counts["stale_by_marker"] == readings
    assert report["gpm"]["1hz"]["per_gpu"]["0"]["fresh_by_nvml"] == 1
    assert report["pytest"] is None
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("gpu-check: fake:h100 on ") and "2 GPU(s)" in lines[0]
    assert any(line.startswith("  nvmlGpmMetricsGet ") for line in lines)
    assert any(line.startswith("  at 10 Hz for 1 s: GPU 0 ") for line in lines)
    assert lines[-2:] == ["no problems found", f"wrote {out}"]
    if extra:
        unprivileged = report["unprivileged"]
        assert unprivileged["uid"] != 0 and unprivileged["exit_code"] == 0, unprivileged
        assert unprivileged["result"]["whoami"]["euid"] == unprivileged["uid"]
        assert unprivileged["degraded"] == []  # the fake grants everyone everything
        assert "unprivileged (nobody, uid " in proc.stdout


@pytest.mark.skipif(nvml_works(), reason="an NVIDIA driver is present")
def test_without_a_driver_it_exits_1_with_one_line(tmp_path):
    out = tmp_path / "gpu-check.json"
    for args in (["--out", str(out)], ["--probe"]):
        proc = run_script(*args)
        assert proc.returncode == 1
        assert proc.stdout == ""
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("gpu-check: error: ")
        assert "driver" in proc.stderr
    assert not out.exists()


def test_probe_names_the_fake():
    proc = run_script("--probe", "--fake", "h100")
    assert (proc.returncode, proc.stdout) == (0, "fake\n")


SAMPLE_TESTS = """
import pytest

pytestmark = pytest.mark.gpu

@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")

def test_passes():
    pass

def test_fails():
    assert 1 == 2

def test_skips():
    pytest.skip("nothing here")

def test_errors(broken):
    pass

@pytest.mark.slow
def test_slow_passes():
    pass
"""


def test_the_pytest_step_counts_every_outcome(tmp_path):
    sample = tmp_path / "test_sample.py"
    sample.write_text(SAMPLE_TESTS)
    unmarked = tmp_path / "test_unmarked.py"
    unmarked.write_text("def test_not_gpu():\n    pass\n")
    result = gpu_check.run_pytest(60, ["-c", str(ROOT / "pyproject.toml"), "--rootdir",
                                       str(tmp_path), str(sample), str(unmarked)], echo=False)
    counts = {k: result[k] for k in ("tests", "passed", "failed", "errors", "skipped")}
    assert counts == {"tests": 5, "passed": 2, "failed": 1, "errors": 1, "skipped": 1}, result
    assert result["exit_code"] == 1 and not result["timed_out"]
    outcomes = {case["test"].rsplit("::", 1)[1]: (case["outcome"], case["message"])
                for case in result["not_passed"]}
    assert outcomes["test_fails"][0] == "failed" and "assert 1 == 2" in outcomes["test_fails"][1]
    assert outcomes["test_errors"][0] == "error" and "fixture broke" in outcomes["test_errors"][1]
    assert outcomes["test_skips"] == ("skipped", "nothing here")
    assert result["command"].startswith("pytest -m gpu ")


# -- the shell script -----------------------------------------------------------------

STAND_IN_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/../calls"
case "$*" in
    *--probe*)
        if [ -n "${NO_DRIVER:-}" ]; then
            echo "gpu-check: error: NVIDIA driver not found" >&2; exit 1
        fi
        echo real ;;
    "-c import "*) exit 1 ;;  # nothing is installed: torch and transformers are missing
    "-m pip install"*)
        [ -z "${FAIL_PIP:-}" ] || { echo "pip: no route to the index" >&2; exit 1; } ;;
esac
"""


def checkout(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    for name in ("gpu-check.sh", "setup.sh"):
        shutil.copy(ROOT / "scripts" / name, tmp_path / "scripts" / name)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("python", STAND_IN_PYTHON), ("agentctl", "#!/bin/sh\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    # Stamped as set up already: setup.sh returns without running pip.
    stamp = subprocess.run(["cksum", "pyproject.toml", "scripts/setup.sh"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout
    (tmp_path / ".venv" / ".rooftop-setup").write_text(stamp)
    return tmp_path


def gpu_check_sh(root: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    proc = subprocess.run([str(root / "scripts" / "gpu-check.sh")], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=30, check=False)
    calls = root / ".venv" / "calls"
    return proc, calls.read_text().splitlines() if calls.exists() else []


def test_script_installs_torch_and_transformers_then_runs_every_step(tmp_path):
    proc, calls = gpu_check_sh(checkout(tmp_path))
    assert proc.returncode == 0, proc.stderr
    pip = [c for c in calls if c.startswith("-m pip install")]
    assert [c.split()[-1] for c in pip] == ["torch", "transformers"]
    assert calls[-1] == ("scripts/gpu_check.py --out gpu-check.json --pytest "
                         "--unprivileged nobody")


def test_script_says_clearly_when_torch_cannot_be_installed_and_goes_on(tmp_path):
    proc, calls = gpu_check_sh(checkout(tmp_path), FAIL_PIP="1")
    assert "could not install torch into .venv" in proc.stderr
    assert "without internet" in proc.stderr
    assert calls[-1].startswith("scripts/gpu_check.py --out gpu-check.json")


def test_script_without_a_driver_stops_with_one_line_and_installs_nothing(tmp_path):
    proc, calls = gpu_check_sh(checkout(tmp_path), NO_DRIVER="1")
    assert proc.returncode == 1
    assert proc.stderr == "gpu-check: error: NVIDIA driver not found\n"
    assert calls == ["scripts/gpu_check.py --probe"]


# -- the GPU tests' guards ----------------------------------------------------------------

# pynvml as on a one-GPU host, over the real module (constants, errors) for the rest.
STAND_IN_PYNVML = """
import importlib.util, sys
_spec = importlib.util.spec_from_file_location("pynvml", {real!r})
_real = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_real)
globals().update({{k: v for k, v in vars(_real).items() if not k.startswith("__")}})

def nvmlInit(): pass
def nvmlShutdown(): pass
def nvmlDeviceGetCount(): return 1
def nvmlDeviceGetHandleByIndex(i): return i
def nvmlDeviceGetUUID(h): return "GPU-00000000-1111-2222-3333-444444444444"
def nvmlDeviceGetName(h): return "NVIDIA H100 80GB HBM3"
"""

NO_TORCH = 'raise ImportError("No module named \'torch\'")\n'
CPU_TORCH = """
import os
__version__ = "2.9.0+cpu"
class version:
    cuda = None
class cuda:
    @staticmethod
    def is_available(): return False
"""


@pytest.mark.parametrize(("torch_stub", "message"), [
    (NO_TORCH, "torch is missing: run scripts/gpu-check.sh"),
    (CPU_TORCH, "torch 2.9.0+cpu CUDA None cannot use NVIDIA H100 80GB HBM3 GPU-0000"),
])
def test_gpu_tests_fail_not_skip_when_a_gpu_is_there_but_torch_is_not(tmp_path, torch_stub,
                                                                      message):
    spec = importlib.util.find_spec("pynvml")
    assert spec is not None and spec.origin is not None
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "pynvml.py").write_text(STAND_IN_PYNVML.format(real=spec.origin))
    (stubs / "torch.py").write_text(torch_stub)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stubs), str(ROOT)])}
    junit = tmp_path / "junit.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(ROOT / "tests/gpu"),
         f"--junitxml={junit}"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=False)
    counts = gpu_check._junit_counts(junit)
    assert proc.returncode == 1, proc.stdout
    assert counts["skipped"] == 0 and counts["passed"] == 0, counts
    assert counts["errors"] == counts["tests"] >= 7, counts
    assert all(message in case["message"] for case in counts["not_passed"]), counts


def test_workload_refuses_a_cuda_index_for_a_gpu_uuid():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests/gpu/workloads.py"), "idle", "1"],
        capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"},
        timeout=30, check=False)
    assert proc.returncode == 1
    assert "CUDA_VISIBLE_DEVICES to one GPU's UUID" in proc.stderr
