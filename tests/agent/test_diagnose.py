"""Roofline in the diagnosis: TPOT floor and application-side MBU beside GPM DRAM."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from rooftop.agent.diagnose import FakeSpec, ModelContext, with_roofline
from rooftop.agent.roofline import analyze, find_gpu, find_model
from rooftop.agent.trace import BUNDLED_RECORDINGS
from rooftop.cli import main
from rooftop.common.errors import ConfigError
from rooftop.common.model import Bound, Evidence, Provenance, Verdict

DATA = BUNDLED_RECORDINGS
LLAMA3_8B = ModelContext(find_model("llama-3-8b"))


def verdict(bound: Bound, *, tpot_ms: float | None, dram: float, running: float = 1.0,
            waiting: float = 0.0, gpu_name: str = "NVIDIA H100 80GB HBM3") -> Verdict:
    evidence = [Evidence("dram_pct", dram, Provenance.GPM),
                Evidence("requests", running + waiting, Provenance.ENGINE),
                Evidence("requests_running", running, Provenance.ENGINE)]
    if tpot_ms is not None:
        evidence.append(Evidence("tpot_ms", tpot_ms, Provenance.ENGINE))
    return Verdict(0, "GPU-0", gpu_name, bound, None, 0.9, "rule", tuple(evidence),
                   ("first",), ((bound, 1.0),), 50, 50, 0.0, 5.0)


def test_graph_captured_decode_mbu_matches_gpm_dram():
    # DESIGN §4: 8B decode, TPOT 5.84 ms vs floor ≈ 4.4 ms → 75 %, GPM DRAM read 74 %.
    v = with_roofline(verdict(Bound.MEMORY, tpot_ms=5.84, dram=74.0), LLAMA3_8B)
    mbu = v.evidence_value("app_mbu_pct")
    assert mbu is not None and mbu.provenance is Provenance.ROOFLINE
    assert mbu.value == pytest.approx(76.7, abs=2.0)
    assert v.evidence_value("mbu_gap_pct") is None
    assert "of the roofline" in v.rule


def test_large_gap_between_app_mbu_and_gpm_dram_is_flagged():
    v = with_roofline(verdict(Bound.MEMORY, tpot_ms=20.0, dram=80.0), LLAMA3_8B)
    gap = v.evidence_value("mbu_gap_pct")
    assert gap is not None and gap.value > 50
    assert "gap" in v.rule
    assert any("DRAM traffic exceeds" in r for r in v.recommendations)


def test_host_bound_far_below_the_floor_blames_the_engine_loop_first():
    v = with_roofline(verdict(Bound.HOST, tpot_ms=96.0, dram=4.2), LLAMA3_8B)
    assert v.recommendations[0].startswith("TPOT is 21× the bandwidth floor")


def test_without_engine_tpot_or_known_gpu_the_verdict_is_unchanged():
    plain = verdict(Bound.MEMORY, tpot_ms=None, dram=80.0)
    assert with_roofline(plain, LLAMA3_8B) is plain
    unknown_gpu = verdict(Bound.MEMORY, tpot_ms=6.0, dram=80.0, gpu_name="Mystery GPU")
    assert with_roofline(unknown_gpu, LLAMA3_8B) is unknown_gpu


def test_roofline_batch_is_the_running_requests_not_running_plus_waiting():
    """8 decoding and 56 queued: the decode step reads 8 requests' KV, not 64."""
    ctx = ModelContext(find_model("llama-3-8b"), context_tokens=2048)
    v = with_roofline(verdict(Bound.MEMORY, tpot_ms=10.0, dram=50.0, running=8, waiting=56), ctx)
    floor = v.evidence_value("tpot_floor_ms")
    h100 = find_gpu("h100-sxm5")
    assert floor is not None
    assert floor.value == pytest.approx(analyze(ctx.model, h100, 8, 2048).tpot_floor_ms)
    assert floor.value != pytest.approx(analyze(ctx.model, h100, 64, 2048).tpot_floor_ms)
    assert "batch 8 on H100 SXM5" in v.rule
    one = with_roofline(verdict(Bound.MEMORY, tpot_ms=10.0, dram=50.0, running=1), ctx)
    assert one.evidence_value("tpot_floor_ms").value < floor.value  # KV of 1 request, not 8


def test_cli_roofline_batch_counts_only_the_engines_running_requests(tmp_path):
    """Through the real pipeline: a recording whose engine runs 16 requests with 48 waiting
    gets the floor of batch 16 (the decode step), not of the 64 in flight."""
    lines = []
    for line in (DATA / "hf_8b_b64.jsonl").read_text().splitlines():
        doc = json.loads(line)
        if "engine" in doc:
            doc["engine"].update(requests_running=16, requests_waiting=48)
        lines.append(json.dumps(doc))
    trace = tmp_path / "queued.jsonl"
    trace.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(main, ["diagnose", "--replay", str(trace), "--model",
                                       "llama-3-8b", "--context", "1024", "--json"])
    assert result.exit_code == 0, result.output
    gpu = json.loads(result.stdout)["gpus"][0]
    assert gpu["evidence"]["requests"]["value"] == pytest.approx(64)
    assert gpu["evidence"]["requests_running"]["value"] == pytest.approx(16)
    batch_16 = analyze(find_model("llama-3-8b"), find_gpu("h100-sxm5"), 16, 1024)
    assert gpu["evidence"]["tpot_floor_ms"]["value"] == pytest.approx(batch_16.tpot_floor_ms,
                                                                      abs=1e-3)  # JSON: 3 places
    assert "batch 16 on H100 SXM5" in gpu["rule"]


def test_cli_diagnose_with_model_reports_floor_and_mbu_on_the_hf_trace():
    result = CliRunner().invoke(main, ["diagnose", "--replay", str(DATA / "hf_8b_b1.jsonl"),
                                       "--model", "llama-3-8b", "--json"])
    assert result.exit_code == 0, result.output
    gpu = json.loads(result.stdout)["gpus"][0]
    assert gpu["verdict"] == "host-bound"
    assert gpu["evidence"]["tpot_floor_ms"]["value"] == pytest.approx(4.48, abs=0.1)
    assert gpu["evidence"]["app_mbu_pct"]["value"] == pytest.approx(4.6, abs=0.5)


def test_cli_unknown_model_is_a_usage_error_listing_the_known_ones():
    result = CliRunner().invoke(main, ["diagnose", "--replay", str(DATA / "idle.jsonl"),
                                       "--model", "gpt-17"])
    assert result.exit_code == 2  # as `agentctl roofline --model gpt-17`
    assert "llama-3-8b" in result.stderr


@pytest.mark.parametrize(("text", "workloads"), [
    ("h100", ()),
    ("a100:gemv,gemm", ("gemv", "gemm")),
    ("h100:gemv@2+gemm@1", ("gemv:2,gemm:1",)),
    ("h100:gemv+idle", ("gemv:2,idle:2",)),
])
def test_fake_spec_parsing(text, workloads):
    assert FakeSpec.parse(text).workloads == workloads


def test_fake_spec_without_profile_is_a_config_error():
    with pytest.raises(ConfigError):
        FakeSpec.parse(":gemv")
