"""``[[remote_write]]`` include / exclude: read from the file, and a glob that matches
no metric refused at load and by ``agentctl config check``, in one line."""

from __future__ import annotations

import re
import textwrap
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from rooftop.cli import main
from rooftop.collector.config import load_config, parse_config
from rooftop.collector.fleet import Fleet
from rooftop.collector.otel import Telemetry
from rooftop.collector.remote_write import SENDABLE_NAMES, RemoteWrite, RemoteWriter
from rooftop.common.errors import ConfigError

HEAD = '[collector]\ninsecure = true\n[[remote_write]]\nurl = "http://prom:9090/api/v1/write"\n'


@pytest.fixture
def config_file(tmp_path: Path) -> Callable[[str], Path]:
    """Writes a collector.toml with one ``[[remote_write]]`` holding ``lines``."""

    def write(lines: str) -> Path:
        path = tmp_path / "collector.toml"
        path.write_text(HEAD + lines + "\n")
        return path

    return write


def test_include_and_exclude_are_read_as_globs_and_default_to_everything(
    config_file: Callable[[str], Path],
) -> None:
    path = config_file('include = ["rooftop_gpu_bound", "rooftop_gpu_dram_*", "hw_*"]\n'
                       'exclude = ["hw_gpu_memory_*"]')
    (rw,) = load_config(path, env={}).remote_write
    assert rw.include == ("rooftop_gpu_bound", "rooftop_gpu_dram_*", "hw_*")
    assert rw.exclude == ("hw_gpu_memory_*",)
    sent = {n for n in SENDABLE_NAMES if rw.sends(n)}
    assert sent == {"rooftop_gpu_bound", "rooftop_gpu_dram_activity", "hw_gpu_utilization",
                    "hw_power_watts", "hw_temperature_celsius"}
    (everything,) = load_config(config_file(""), env={}).remote_write
    assert (everything.include, everything.exclude) == (("*",), ())
    assert all(everything.sends(n) for n in SENDABLE_NAMES)


def test_the_sendable_names_are_the_ones_a_gpu_sample_and_a_verdict_make() -> None:
    # What the globs are checked against: 16 names (17 series: pipe activity is three).
    assert len(SENDABLE_NAMES) == 16
    assert {"rooftop_gpu_bound", "rooftop_gpu_bound_confidence", "hw_power_watts",
            "rooftop_gpu_pcie_throughput_bytes_per_second"} <= set(SENDABLE_NAMES)
    assert not any(n.startswith("DCGM") for n in SENDABLE_NAMES)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        # A typo: the nearest names are offered.
        ('include = ["rooftop_gpu_dram_activty"]',
         "remote_write.include: 'rooftop_gpu_dram_activty' matches no metric remote write "
         "sends; did you mean rooftop_gpu_dram_activity"),
        ('exclude = ["hw_powr"]',
         "remote_write.exclude: 'hw_powr' matches no metric remote write sends; "
         "did you mean hw_power_watts"),
        # The OTel name, not the one on the wire.
        ('include = ["hw.power"]', "'hw.power' matches no metric remote write sends; "
         "did you mean hw_power_watts"),
        # DCGM names are the Prometheus endpoint's alone.
        ('include = ["DCGM_FI_DEV_POWER_USAGE"]',
         "remote write sends the rooftop names, not prometheus.dcgm_names'"),
        # Nothing near: a few valid names.
        ('include = ["zzz*"]', "'zzz*' matches no metric remote write sends; e.g. "
         "hw_gpu_utilization, hw_gpu_memory_usage_bytes"),
        ("include = []", "remote_write.include: include [] less exclude [] leaves no metric"),
        ('exclude = ["*"]',
         "remote_write.exclude: include ['*'] less exclude ['*'] leaves no metric to send"),
        ('include = "rooftop_gpu_bound"', "remote_write.include must be list"),
        ("include = [1]", "remote_write.include must be a list of strings (got 1)"),
    ],
)
def test_a_glob_that_matches_no_metric_is_refused_in_one_line_at_its_key(
    config_file: Callable[[str], Path], lines: str, message: str
) -> None:
    path = config_file(lines)
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    text = str(err.value)
    assert message in text
    assert text.startswith(f"{path}:5: ")  # the include / exclude line
    assert "\n" not in text


def test_config_check_refuses_a_glob_matching_nothing_and_prints_the_filter(
    config_file: Callable[[str], Path],
) -> None:
    bad = config_file('include = ["rooftop_gpu_bond"]')
    refused = CliRunner().invoke(main, ["config", "check", str(bad)], env={})
    assert refused.exit_code == 1
    assert refused.stderr.count("\n") == 1
    assert (f"{bad}:5: remote_write.include: 'rooftop_gpu_bond' matches no metric remote "
            "write sends; did you mean rooftop_gpu_bound") in refused.stderr

    good = config_file('include = ["rooftop_gpu_bound", "hw_power_watts"]\nexclude = ["x*"]')
    refused_exclude = CliRunner().invoke(main, ["config", "check", str(good)], env={})
    assert "remote_write.exclude: 'x*' matches no metric" in refused_exclude.stderr

    good = config_file('include = ["rooftop_gpu_bound", "hw_power_watts"]')
    ok = CliRunner().invoke(main, ["config", "check", str(good)], env={})
    assert ok.exit_code == 0, ok.output
    # The effective config, printed as TOML, loads back to the same filter.
    printed = tomllib.loads(ok.stdout)["remote_write"][0]
    assert printed["include"] == ["rooftop_gpu_bound", "hw_power_watts"]
    assert printed["exclude"] == []


def test_a_writer_made_in_code_refuses_a_glob_matching_nothing_too() -> None:
    with pytest.raises(ConfigError, match="remote_write.include: 'gpu_bound' matches no"):
        RemoteWriter(RemoteWrite(url="http://p/w", include=("gpu_bound",)),
                     Telemetry(Fleet()).points)


def test_the_operator_guides_remote_write_examples_load() -> None:
    # The guide's [[remote_write]] examples (a large fleet's include) are configs the
    # collector accepts: a renamed metric would fail here, not in an operator's hands.
    guide = (Path(__file__).resolve().parents[2] / "docs" / "OPERATOR-GUIDE.md").read_text()
    blocks = [textwrap.dedent(b) for b in re.findall(r"```toml\n(.*?)```", guide, re.S)
              if "[[remote_write]]" in b]  # fmt: skip
    includes = []
    for block in blocks:
        config = parse_config(tomllib.loads(block))
        includes += [rw.include for rw in config.remote_write if rw.include != ("*",)]
    assert len(includes) >= 2  # section 3's example and the capacity section's
