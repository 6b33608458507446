"""``agentctl collector``: a real subprocess until SIGTERM, and its one-line errors."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from rooftop.cli import main
from tests.collector.helpers import AgentStream, batch, gpu, verdict

REPO = Path(__file__).resolve().parents[2]


def test_runs_until_sigterm_and_stops_gracefully(tmp_path: Path):
    config = tmp_path / "collector.toml"
    config.write_text('[collector]\nack_interval_s = 0.05\n[prometheus]\nlisten = "127.0.0.1:0"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOFTOP_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rooftop", "collector", "--config", str(config),
         "--listen", "127.0.0.1:0", "--insecure"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        ingest = proc.stdout.readline()
        prom = proc.stdout.readline()
        ingest_port = int(re.search(r"ingest on 127\.0\.0\.1:(\d+)", ingest).group(1))  # type: ignore[union-attr]
        prom_url = re.search(r"prometheus on (http://\S+)", prom).group(1)  # type: ignore[union-attr]
        with AgentStream(f"127.0.0.1:{ingest_port}") as stream:
            stream.send(batch(1, records=[gpu(0)], verdicts=[verdict(0)]))
            assert stream.wait_acked(1)[-1].acked_seq == 1
        text = urllib.request.urlopen(prom_url, timeout=5).read().decode()
        assert "rooftop_gpu_bound{" in text
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "rooftop collector: stopped" in out


def test_plaintext_without_insecure_is_one_line_error():
    result = CliRunner().invoke(main, ["collector", "--listen", "127.0.0.1:0"])
    assert result.exit_code == 1
    assert "agentctl: error: collector.insecure" in result.output
    assert "Traceback" not in result.output


def test_unknown_key_is_named(tmp_path: Path):
    config = tmp_path / "c.toml"
    config.write_text("[collector]\nlisten_address = '0.0.0.0:1'\n")
    result = CliRunner().invoke(main, ["collector", "--config", str(config), "--insecure"])
    assert result.exit_code == 1
    assert "unknown key collector.listen_address" in result.output


def test_help():
    result = CliRunner().invoke(main, ["collector", "--help"])
    assert result.exit_code == 0
    for option in ("--config", "--listen", "--prometheus", "--insecure"):
        assert option in result.output


def test_plaintext_on_every_interface_is_refused_without_the_opt_in():
    result = CliRunner().invoke(main, ["collector", "--listen", "0.0.0.0:0", "--insecure"])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith(
        "agentctl: error: collector.listen: plaintext authenticates no agent, and 0.0.0.0:0 "
        "is not loopback")
    assert "--allow-unauthenticated" in result.output


@pytest.mark.slow
def test_allow_unauthenticated_starts_and_says_nobody_is_authenticated():
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOFTOP_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rooftop", "collector", "--listen", "0.0.0.0:0", "--insecure",
         "--allow-unauthenticated", "--prometheus", ""],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert re.search(r"ingest on 0\.0\.0\.0:\d+ \(PLAINTEXT, no authentication;", line), line
