"""The Prometheus text writer, fuzzed: any label value still parses, and means itself.

Label values come from agents (host names, GPU names, engine models): control
characters, quotes, backslashes and any Unicode must come out as a valid exposition
that a real parser reads back to the same labels and values. Two parsers: the
prometheus_client one (a dependency) for every example, and Prometheus' own
(``promtool check metrics``, installed by .ci/install-prometheus.sh) for fewer, larger
expositions, since each costs a process.
"""

from __future__ import annotations

import math
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from rooftop.collector.prometheus import Family, prometheus_labels, render
from tests.support import PROMTOOL, require_tool


@dataclass(frozen=True)
class _Point:
    value: float
    attributes: Mapping[str, Any] | None


# Python strings off the wire are valid Unicode: no lone surrogates (protobuf refuses them).
_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
_NASTY = st.sampled_from(['"', "\\", "\n", "\r", "\t", "\x00", "\x7f", "\\n", '\\"', "\u2028",
                          "é", "日本", "🙂", "a=\"b\",c", "}", "{x=\"y\"} 1", "# HELP x"])
_LABEL_VALUES = st.one_of(_TEXT, _NASTY, st.lists(_NASTY, max_size=4).map("".join),
                          st.integers(), st.booleans())
_ATTRIBUTE_NAMES = st.one_of(
    st.sampled_from(["host.name", "gpu.uuid", "hw.id", "rooftop.engine.model", "k8s.pod.name"]),
    st.from_regex(r"[a-z][a-z0-9_.]{0,12}", fullmatch=True),
)
# Names that sanitize alike ("host.name", "host_name") collide: see the xfail below.
_ATTRIBUTES = st.dictionaries(_ATTRIBUTE_NAMES, _LABEL_VALUES, max_size=4).filter(
    lambda d: len({re.sub(r"[^a-zA-Z0-9]+", "_", k) for k in d}) == len(d))
_VALUES = st.floats(allow_nan=True, allow_infinity=True)


def _family(points: list[_Point], kind: str = "gauge") -> Family:
    return Family("hw.gpu.utilization", kind, "1", "GPU utilization, \\ and\nnewline",
                  lambda: points)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.slow
@given(st.lists(st.tuples(_ATTRIBUTES, _VALUES), min_size=1, max_size=6))
@example([({"host.name": 'a"b\\c\nd'}, 1.0)])
@example([({"host.name": "\r\x00"}, float("nan"))])
def test_any_label_value_parses_back_to_itself(series: list[tuple[dict[str, Any], float]]):
    points = [_Point(value, attrs) for attrs, value in series]
    text = render([_family(points)], resource={"service.name": 'rooftop "collector"'})
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    expected: dict[tuple[tuple[str, str], ...], float] = {}
    for p in points:  # a gauge keeps the last value of each label set
        expected[tuple(sorted(prometheus_labels(p.attributes).items()))] = p.value
    samples = parsed["hw_gpu_utilization"].samples
    got = {tuple(sorted(s.labels.items())): s.value for s in samples}
    assert got.keys() == expected.keys()
    assert all(_same(got[k], v) for k, v in expected.items())
    assert parsed["target_info"].samples[0].labels == {"service_name": 'rooftop "collector"'}


@settings(max_examples=12)
@given(st.lists(st.tuples(_ATTRIBUTES, _VALUES), min_size=10, max_size=40),
       st.sampled_from(["gauge", "counter"]))
def test_promtool_parses_any_exposition(series: list[tuple[dict[str, Any], float]],
                                        kind: str):
    text = render([_family([_Point(v, a) for a, v in series], kind)],
                  resource={"host.name": "\\\n\""})
    # promtool exits 0 when clean, 3 with lint remarks only (naming advice), 1 when it
    # could not parse the text.
    assert _promtool_problem(text) is None, text


def _promtool_problem(text: str) -> str | None:
    promtool = require_tool("promtool", PROMTOOL)
    proc = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                          capture_output=True, timeout=30, check=False)
    output = (proc.stdout + proc.stderr).decode(errors="replace")
    return output if proc.returncode not in (0, 3) or "parsing error" in output else None


def test_attribute_names_that_sanitize_alike_stay_parseable():
    # Found by fuzzing: host.name and host_name were written as two host_name labels,
    # which Prometheus refuses. Now one label, the values joined as OpenTelemetry says.
    text = render([_family([_Point(1.0, {"host.name": "a", "host_name": "b\\"})])])
    assert _promtool_problem(text) is None
    assert 'host_name="a;b\\\\"' in text
    assert prometheus_labels({"host_name": "b", "host.name": "a", "x": ""}) == {
        "host_name": "a;b"
    }
