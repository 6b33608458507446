"""agentctl's exit statuses, per command: a usage error is 2, a failure while running is 1.

Usage errors (a bad option or option value) are click's: exit 2 with "Usage:" and
"Error: Invalid value ...". Runtime failures (no GPU, unreachable collector or engine,
unreadable file, bad config file) print one ``agentctl: error:`` line and exit 1.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from rooftop.agent.trace import BUNDLED_RECORDINGS
from rooftop.cli import NO_GPU_HINTS, main
from tests.support import nvml_works


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is never the answer
    return result.exit_code, result.stderr


USAGE_ERRORS = {
    "diagnose --fake": ["diagnose", "--fake", "z900"],
    "diagnose --engine-url": ["diagnose", "--fake", "h100", "--engine-url", "localhost:8000"],
    "diagnose --model": ["diagnose", "--replay", str(BUNDLED_RECORDINGS / "idle.jsonl"),
                         "--model", "gpt-17"],
    "record --fake": ["record", "--fake", "h100:nope", "--out", "-"],
    "record without --out": ["record", "--fake", "h100"],
    "status without a collector": ["status"],
    "roofline --gpu": ["roofline", "--model", "llama-3-8b", "--gpu", "tpu-v5"],
    "probe URL": ["probe", "localhost:8000", "-m", "tiny"],
    "collector --listen": ["collector", "--listen", "7443", "--insecure"],
    "agent --fake": ["agent", "--fake", "z900"],
    "demo --prometheus": ["demo", "--prometheus", "9464"],
    "config example": ["config", "example", "gateway"],
}


@pytest.mark.parametrize("args", USAGE_ERRORS.values(), ids=USAGE_ERRORS.keys())
def test_a_usage_error_exits_2_saying_what_is_wrong(args: list[str]):
    code, err = invoke(*args)
    assert code == 2, err
    assert "Usage:" in err and "Error:" in err
    assert "agentctl: error:" not in err  # not reported as a failure while running


def runtime_failures(tmp_path: Path) -> dict[str, list[str]]:
    bad_json = tmp_path / "config.json"
    bad_json.write_text("{not json")
    no_collectors = tmp_path / "agent.toml"
    no_collectors.write_text('backend = "fake:h100"\ninsecure = true\n')
    port = closed_port()
    return {
        "diagnose --replay": ["diagnose", "--replay", str(tmp_path / "missing.jsonl")],
        "record --out": ["record", "--fake", "h100", "--seconds", "0.2",
                         "--out", str(tmp_path / "no-such-dir" / "rec.jsonl")],
        "status": ["status", "--collector", f"127.0.0.1:{port}", "--insecure",
                   "--timeout", "2"],
        "roofline --config": ["roofline", "--config", str(bad_json), "--gpu", "h100"],
        "probe": ["probe", f"http://127.0.0.1:{port}", "-m", "tiny", "--timeout", "2"],
        "collector": ["collector", "--listen", "127.0.0.1:0"],  # plaintext, not asked for
        "agent": ["agent", "--config", str(no_collectors)],
        "config check": ["config", "check", str(tmp_path / "missing.toml")],
    }


@pytest.mark.parametrize("name", [
    "diagnose --replay", "record --out", "status", "roofline --config", "probe", "collector",
    "agent", "config check",
])
def test_a_runtime_failure_exits_1_with_one_error_line(tmp_path: Path, name: str):
    code, err = invoke(*runtime_failures(tmp_path)[name])
    assert code == 1, err
    assert "Usage:" not in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_demo_that_cannot_serve_metrics_exits_1():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code, err = invoke("demo", "--seconds", "1",
                           "--prometheus", f"127.0.0.1:{busy.getsockname()[1]}")
    assert code == 1, err
    assert err.startswith("agentctl: error:") and "Usage:" not in err


def test_exit_statuses_are_the_process_exit_statuses():
    """What a shell sees, through ``python -m rooftop``: 2 then 1."""
    usage = subprocess.run([sys.executable, "-m", "rooftop", "roofline", "--gpu", "h100"],
                           capture_output=True, text=True, check=False)
    assert usage.returncode == 2, usage.stderr
    assert "Error: give --model NAME or --config PATH" in usage.stderr
    failure = subprocess.run(
        [sys.executable, "-m", "rooftop", "diagnose", "--replay", "/nonexistent/rec.jsonl"],
        capture_output=True, text=True, check=False)
    assert failure.returncode == 1, failure.stderr
    assert failure.stderr == "agentctl: error: /nonexistent/rec.jsonl: cannot read: " \
                             "No such file or directory\n"


@pytest.mark.skipif(nvml_works(), reason="an NVIDIA driver is present here")
def test_record_without_a_gpu_suggests_only_what_record_accepts(tmp_path: Path):
    out = tmp_path / "rec.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "rooftop", "record", "--seconds", "0.2", "--out", str(out)],
        capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    (line,) = proc.stderr.splitlines()  # one line, not a traceback
    assert line.startswith("agentctl: error: ") and line.endswith("; without a GPU: --fake h100")
    assert "--replay" not in proc.stderr  # record has no --replay
    record = subprocess.run(
        [sys.executable, "-m", "rooftop", "record", "--fake", "h100", "--seconds", "0.2",
         "--out", str(out)], capture_output=True, text=True, check=False)
    assert record.returncode == 0, record.stderr  # and the suggestion works


@pytest.mark.parametrize("command", sorted(NO_GPU_HINTS))
def test_no_gpu_hints_name_only_options_the_command_has(command: str):
    cmd = main.commands[command]
    options = {opt for p in cmd.params for opt in p.opts}
    named = {word.strip(",()") for word in NO_GPU_HINTS[command].split()
             if word.startswith("--")}
    assert named and named <= options, (command, named - options)


def _commands(group: click.Group, prefix: str = "") -> dict[str, click.Command]:
    out: dict[str, click.Command] = {}
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out |= _commands(cmd, f"{prefix}{name} ")
        else:
            out[f"{prefix}{name}"] = cmd
    return out


def test_every_seconds_and_rate_option_has_help_text():
    with_them = {}
    for name, cmd in _commands(main).items():
        for param in cmd.params:
            if isinstance(param, click.Option) and {"--seconds", "--rate"} & set(param.opts):
                with_them[f"{name} {param.opts[0]}"] = param.help
    assert {"diagnose --seconds", "diagnose --rate", "record --seconds", "record --rate",
            "demo --seconds"} <= with_them.keys()
    assert all(text and text.strip() for text in with_them.values()), with_them


def test_record_help_shows_what_seconds_and_rate_mean():
    code = CliRunner().invoke(main, ["record", "--help"])
    assert code.exit_code == 0
    assert "How long to record." in code.stdout and "Samples per second" in code.stdout
