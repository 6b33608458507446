"""Config parsing, fuzzed: any bytes, any TOML document, for both daemons.

A config file either loads or fails with one ``ConfigError`` line that starts with the
file's name, and with ``path:LINE:`` only where LINE really holds the key (or the table)
the message names; never another exception (a traceback in ``config check``).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from rooftop.agent.config import KEYS as AGENT_KEYS
from rooftop.agent.config import load_config as load_agent
from rooftop.collector.config import _SCHEMA
from rooftop.collector.config import load_config as load_collector
from rooftop.common.errors import ConfigError
from rooftop.common.otlp import OTLP_KEYS
from rooftop.config_check import check_config

Loader = Callable[[Path], object]
LOADERS: dict[str, Loader] = {
    "agent": lambda path: load_agent(path, env={}),
    "collector": lambda path: load_collector(path, env={}),
    "check": lambda path: check_config(path, None, {}),
}


@contextmanager
def _file(data: bytes) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "rooftop.toml"
        path.write_bytes(data)
        yield path


_NAMED = re.compile(
    r"(?:unknown key |unknown section \[)?'?((?:[a-z_]\w*(?:\[\d+\])?\.)*[a-z_]\w*)"
)


def _outcome(loader: Loader, path: Path, text: str | None, *, startup: bool = False) -> None:
    try:
        loader(path)
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message, message
        match = re.match(rf"^{re.escape(str(path))}(?::(\d+))?: ", message)
        # The file is named first; the daemon's start-up checks (config check runs them
        # after the file loaded) name the key alone, as the daemon does.
        assert match is not None or startup, message
        if match is not None and match[1] is not None and text is not None:
            line = text.splitlines()[int(match[1]) - 1]
            named = _NAMED.match(message[match.end():])
            key = re.sub(r"\[\d+\]", "", named[1]).split(".")[-1] if named else ""
            assert line.lstrip().startswith("[") or (key and key in line), (message, line)


# ---- bytes -------------------------------------------------------------------------------

_SAMPLE = (b'[collector]\nlisten = "127.0.0.1:4850"\ninsecure = true\n'
           b'[[otlp]]\nendpoint = "otel:4317"\n')


@given(st.sampled_from(sorted(LOADERS)), st.one_of(
    st.binary(max_size=256),
    st.tuples(st.integers(0, len(_SAMPLE) - 1), st.binary(min_size=1, max_size=4)).map(
        lambda p: _SAMPLE[: p[0]] + p[1] + _SAMPLE[p[0] + len(p[1]) :]),
))
@example("check", b"# caf\xe9\n")
@example("collector", b"[collector]\ninsecure = true\n\xff")
def test_any_bytes_load_or_fail_with_one_line_naming_the_file(kind: str, data: bytes):
    with _file(data) as path:
        try:
            text = data.decode()
        except UnicodeDecodeError:
            text = None
        _outcome(LOADERS[kind], path, text, startup=kind == "check")


# ---- TOML documents ------------------------------------------------------------------------

_SCALARS = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, 1, -1, 4 * 1024 * 1024, 10**20 // 10**2]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", "127.0.0.1:0", "0.0.0.0:4850", "grpc", "http/protobuf",
                     "http://otel:4317", "fake:h100", "nvml", "replay:x"]),
)
_VALUES = st.one_of(_SCALARS, st.lists(_SCALARS, max_size=3),
                    st.dictionaries(st.sampled_from(["x-api-key", "a b", "k"]), _SCALARS,
                                    max_size=2))


def _toml(value: Any) -> str:
    """``value`` as a TOML value (nan and inf as TOML spells them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"


_COLLECTOR_KEYS = {section: sorted(keys) for section, keys in _SCHEMA.items()}
_ANY_KEY = st.from_regex(r"[a-z_]{1,10}", fullmatch=True)


@st.composite
def _collector_toml(draw: st.DrawFn) -> str:
    lines: list[str] = []
    for section in draw(st.lists(st.sampled_from([*_COLLECTOR_KEYS, "otlp", "bogus"]),
                                 max_size=4)):
        known = _COLLECTOR_KEYS.get(section, list(OTLP_KEYS))
        lines.append(f"[[{section}]]" if section == "otlp" and draw(st.booleans())
                     else f"[{section}]")
        for key in draw(st.lists(st.one_of(st.sampled_from(known), _ANY_KEY), max_size=4,
                                 unique=True)):
            lines.append(f"{key} = {_toml(draw(_VALUES))}")
    return "\n".join(lines) + "\n"


@st.composite
def _agent_toml(draw: st.DrawFn) -> str:
    keys = draw(st.lists(st.one_of(st.sampled_from(AGENT_KEYS), _ANY_KEY), max_size=6,
                         unique=True))
    lines = [f"{key} = {_toml(draw(_VALUES))}" for key in keys if key != "otlp"]
    if draw(st.booleans()):
        lines.append("[otlp]")
        for key in draw(st.lists(st.sampled_from(OTLP_KEYS), max_size=4, unique=True)):
            lines.append(f"{key} = {_toml(draw(_VALUES))}")
    return "\n".join(lines) + "\n"


@pytest.mark.slow
@given(_collector_toml())
@example('[prometheus]\nlisten = "127.0.0.1:0"\n[collector]\nlisten = "x"\ninsecure = true\n')
def test_any_collector_document_loads_or_names_the_key_and_its_line(text: str):
    with _file(text.encode()) as path:
        _outcome(LOADERS["collector"], path, text)


@pytest.mark.slow
@given(_agent_toml())
@example("insecure = true\n[otlp]\nendpoint = \"https://o:4317\"\ninsecure = true\n")
def test_any_agent_document_loads_or_names_the_key_and_its_line(text: str):
    with _file(text.encode()) as path:
        _outcome(LOADERS["agent"], path, text)
