"""agentctl demo: real collector + agent subprocesses replaying the H100 recordings."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from rooftop.common.model import GpuSample
from rooftop.demo import DEMO_NODES, DemoNode, build_playlist, run_demo


def test_playlist_puts_recordings_back_to_back_in_time_order():
    records = build_playlist(("idle", "gemm_8192"))
    times = [r.time_s for r in records]
    assert times == sorted(times)
    busy = [r.busy_pct for r in records if isinstance(r, GpuSample)]
    assert busy[0] == 0.0 and busy[-1] > 90  # idle first, then the GEMM
    assert times[-1] - times[0] >= 16  # each recording holds its verdict ≥ 8 s


@pytest.mark.slow
def test_demo_shows_a_labelled_replay_whose_verdicts_change():
    views: list[str] = []
    scraped: list[str] = []

    def echo(text: str) -> None:
        views.append(text)
        if len(views) == 12 and not scraped:
            port = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", text)
            assert port, text
            with urllib.request.urlopen(f"http://127.0.0.1:{port[1]}/metrics", timeout=5) as r:
                scraped.append(r.read().decode())

    nodes = (DemoNode("demo-x", ("idle", "gemv_b16")), DemoNode("demo-y", ("hf_8b_b1",)))
    shown = run_demo(seconds=22, prometheus_listen="127.0.0.1:0", nodes=nodes, echo=echo,
                     clear_screen=False)
    assert shown == len(views) >= 15
    assert all("REPLAY of real H100 recordings" in v for v in views)
    verdicts = [v for v in ("idle", "memory-bound") if any(f" {v} " in x for x in views)]
    assert verdicts == ["idle", "memory-bound"], views[-1]
    assert 'rooftop_gpu_bound{' in scraped[0]
    # The replayed HF recording carries the engine's TPOT (96.4 ms) through the fleet.
    assert any(re.search(r"demo-y .* 96\.\d ms", v) for v in views), views[-1]


def test_default_demo_nodes_replay_recordings_that_exist():
    for node in DEMO_NODES:
        assert build_playlist(node.recordings)


def _series(text: str, metric: str) -> list[tuple[dict[str, str], float]]:
    """Every ``metric{labels} value`` line of a Prometheus text scrape."""
    out = []
    for m in re.finditer(rf"^{metric}\{{([^}}]*)\}} (\S+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m[1]))
        out.append((labels, float(m[2])))
    return out


@pytest.mark.slow
def test_demo_metrics_show_each_node_its_own_gpu_with_one_bound_state_and_its_memory():
    """Two demo agents on one machine replay anonymised (all-zero UUID) recordings: the
    collector's /metrics must still hold two GPUs, as the screen does, each with the
    card's memory (not the two summed) and exactly one bound state at 1."""
    views: list[str] = []
    scrapes: list[str] = []

    def echo(text: str) -> None:
        views.append(text)
        if len(views) in (7, 10):  # verdicts exist by then (window_s = 2, hysteresis 1)
            port = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", text)
            assert port, text
            with urllib.request.urlopen(f"http://127.0.0.1:{port[1]}/metrics", timeout=5) as r:
                scrapes.append(r.read().decode())

    nodes = (DemoNode("demo-p", ("gemm_8192",)), DemoNode("demo-q", ("gemv_b16",)))
    run_demo(seconds=11, prometheus_listen="127.0.0.1:0", nodes=nodes, echo=echo,
             clear_screen=False)
    card_bytes = next(r.mem_total_bytes for r in build_playlist(("gemm_8192",))
                      if isinstance(r, GpuSample))
    assert len(scrapes) == 2, views[-1]
    screen_gpus = int(re.search(r"(\d+) GPU\(s\)", views[9])[1])  # type: ignore[index]
    assert screen_gpus == 2, views[9]
    for scrape in scrapes:
        memory = _series(scrape, "hw_gpu_memory_limit_bytes")
        gpus = {(s["host_name"], s["hw_id"]) for s, _ in memory}
        assert len(gpus) == len(memory) == screen_gpus, memory
        assert {host for host, _ in gpus} == {"demo-p", "demo-q"}
        assert all(not set(uuid.removeprefix("GPU-")) <= {"0", "-"} for _, uuid in gpus)
        assert [value for _, value in memory] == [card_bytes] * 2
        bound = _series(scrape, "rooftop_gpu_bound")
        for gpu in gpus:
            states = {s["rooftop_bound"]: v for s, v in bound
                      if (s["host_name"], s["hw_id"]) == gpu}
            assert sum(states.values()) == 1.0, (gpu, states)
            assert all(v in (0.0, 1.0) for v in states.values()), states
    # The screen's verdicts are the ones /metrics says are at 1.
    last = {s["host_name"]: s["rooftop_bound"] for s, v in _series(scrapes[1], "rooftop_gpu_bound")
            if v == 1.0}
    assert last == {"demo-p": "compute", "demo-q": "memory"}, last


def _children(pid: int) -> dict[int, str]:
    """The live child processes of ``pid`` and their command lines (Linux /proc)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if fields[1] == str(pid) and fields[0] != "Z":
            out[int(stat.parent.name)] = cmdline
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.slow
def test_sigterm_stops_the_demo_like_ctrl_c_agents_gone_and_temp_dir_removed(tmp_path: Path):
    """``kill`` (SIGTERM) on ``agentctl demo`` once left both agent subprocesses running
    and /tmp/rooftop-demo-* on disk: it must clean up and exit 0, as a normal stop does."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOFTOP_")}
    env["TMPDIR"] = str(tmp_path)  # where the demo's TemporaryDirectory goes
    proc = subprocess.Popen(
        [sys.executable, "-m", "rooftop", "demo", "--prometheus", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),  # type: ignore[union-attr]
                              daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while not any("2 node(s)" in line for line in list(lines)):
            assert proc.poll() is None and time.monotonic() < deadline, lines[-20:]
            time.sleep(0.1)
        agents = _children(proc.pid)
        assert len(agents) == 2 and all(" agent " in c for c in agents.values()), agents
        (workdir,) = tmp_path.glob("rooftop-demo-*")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)
        proc.stdout.close()  # type: ignore[union-attr]
    deadline = time.monotonic() + 5  # an orphan would still be running: give none a chance
    while any(_alive(pid) for pid in agents) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in agents if _alive(pid)], agents
    assert not workdir.exists()
    assert not list(tmp_path.glob("rooftop-demo-*"))
