"""``agentctl config check`` and ``config example``: one place for both daemons' files.

The check is the daemon's own: it loads the file as the daemon does (environment
included), then runs the daemon's start-up checks — for the agent
``rooftop.agent.daemon.startup_checks`` (somewhere to send, TLS or explicit plaintext,
TLS files and token readable, the key matching the certificate), for the collector
its loader's checks (no mode that authenticates nobody off loopback unless
``allow_unauthenticated``, bounded ``max_message_bytes``, finite intervals) and
``rooftop.collector.ingest.IngestCredentials.load`` (certificate and key load and
match, token files hold tokens). A file that is not UTF-8 or not TOML is one line
naming it (and the line and byte offset). Only what needs the host itself is left to
the start: the NVIDIA driver and the spool directory (systemd creates it). The
effective configuration is printed as TOML that loads back to the same settings;
header values are redacted.

The commented examples ship in ``rooftop/data/config``; a test keeps every key of
``AgentConfig`` and of the collector's schema documented there.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rooftop.common.configfile import read_toml
from rooftop.common.errors import ConfigError

if TYPE_CHECKING:
    from rooftop.agent.config import AgentConfig
    from rooftop.collector.config import CollectorConfig

__all__ = ["EXAMPLES", "Kind", "check_config", "detect_kind", "example_text", "to_toml"]

Kind = Literal["agent", "collector"]
EXAMPLES: Mapping[str, Path] = {
    kind: Path(__file__).resolve().parent / "data" / "config" / f"{kind}.toml"
    for kind in ("agent", "collector")
}
# The collector's file is all tables; the agent's keys are top-level.
_COLLECTOR_TABLE = re.compile(r"^\s*\[\[?\s*(collector|prometheus|metrics)\s*[\].]", re.M)


def example_text(kind: Kind) -> str:
    """The commented default configuration for ``kind``."""
    return EXAMPLES[kind].read_text(encoding="utf-8")


def detect_kind(text: str) -> Kind:
    """Which daemon a config file is for, from its shape."""
    return "collector" if _COLLECTOR_TABLE.search(text) else "agent"


def check_config(path: Path, kind: Kind | None, env: Mapping[str, str]) -> tuple[Kind, str]:
    """Load ``path`` and run the daemon's start-up checks; the effective config as TOML.

    Raises:
        ConfigError: what the daemon would refuse to start with, naming the key.
    """
    _, text = read_toml(path)  # unreadable, not UTF-8, not TOML: one line, for both kinds
    kind = kind or detect_kind(text)
    if kind == "agent":
        from rooftop.agent.config import load_config as load_agent  # noqa: PLC0415
        from rooftop.agent.daemon import startup_checks  # noqa: PLC0415

        agent = load_agent(path, env=env)
        startup_checks(agent)
        return kind, to_toml(agent)
    from rooftop.collector.config import load_config as load_collector  # noqa: PLC0415
    from rooftop.collector.ingest import IngestCredentials  # noqa: PLC0415

    collector = load_collector(path, env=env)
    IngestCredentials.load(collector)
    for rw in collector.remote_write:
        # The files a remote write re-reads at each send: missing ones fail here, not later.
        for key, file in (("bearer_token_file", rw.bearer_token_file), ("ca_file", rw.ca_file)):
            if file is not None and not file.is_file():
                raise ConfigError(f"remote_write.{key}: {file}: no such file")
    return kind, to_toml(collector)


# ---- printing a configuration as TOML ----------------------------------------------


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # finite: both configs refuse nan and inf
    if isinstance(value, (str, Path)):
        # A JSON string is a TOML basic string: the same escapes.
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{json.dumps(str(k))} = {_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"no TOML for {type(value).__name__}")  # a field type added without one


def _lines(values: Mapping[str, Any]) -> list[str]:
    return [f"{k} = {_value(v)}" if v is not None else f"# {k}: not set"
            for k, v in values.items()]


def to_toml(config: AgentConfig | CollectorConfig) -> str:
    """``config`` as the TOML file that loads to it (OTLP header values redacted)."""
    from rooftop.agent.config import AgentConfig  # noqa: PLC0415

    if isinstance(config, AgentConfig):
        top = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
               if f.name != "otlp"}
        lines = _lines(top)
        if config.otlp is None:
            lines.append("# [otlp]: none (no direct OTLP export)")
        else:
            lines += ["", "[otlp]", *_lines(config.otlp.as_table())]
        return "\n".join(lines)
    from rooftop.collector.config import _SCHEMA  # noqa: PLC0415

    lines = []
    for section, schema in _SCHEMA.items():
        lines += [f"[{section}]", *_lines({key: getattr(config, name)
                                           for key, (name, _) in schema.items()}), ""]
    for exp in config.otlp:
        lines += ["[[otlp]]", *_lines(exp.as_table()), ""]
    if not config.otlp:
        lines += ["# [[otlp]]: none", ""]
    from rooftop.collector.config import _REMOTE_WRITE  # noqa: PLC0415

    for rw in config.remote_write:
        table = {key: getattr(rw, name) for key, (name, _) in _REMOTE_WRITE.items()}
        lines += ["[[remote_write]]", *_lines(table), ""]
    if not config.remote_write:
        lines.append("# [[remote_write]]: none")
    return "\n".join(lines).rstrip("\n")
