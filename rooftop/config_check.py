"""``agentctl config check`` and ``config example``: one place for both daemons' files.

The commented examples ship in ``rooftop/data/config``; a test keeps every key of
``AgentConfig`` and of the collector's schema documented there.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from rooftop.common.errors import ConfigError

__all__ = ["EXAMPLES", "Kind", "check_config", "detect_kind", "example_text"]

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
    """Load ``path`` as the daemon would (environment included); a summary, or ConfigError.

    Returns the kind and ``key = value`` lines of the effective configuration.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    kind = kind or detect_kind(text)
    if kind == "agent":
        from rooftop.agent.config import load_config as load_agent  # noqa: PLC0415

        config: Any = load_agent(path, env=env)
    else:
        from rooftop.collector.config import load_config as load_collector  # noqa: PLC0415

        config = load_collector(path, env=env)
    lines = [f"{f.name} = {getattr(config, f.name)!r}"
             for f in dataclasses.fields(config)]
    return kind, "\n".join(lines)
