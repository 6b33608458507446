"""Reading the daemons' TOML files: one error line that names the file and line."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from rooftop.common.errors import ConfigError

__all__ = ["line_of", "read_toml"]


def line_of(text: str, key: str) -> int | None:
    """The line where ``key`` is set (or opened as a table), for the error message."""
    pattern = re.compile(
        rf"""^[ \t]*(\[[ \t]*)?["']?{re.escape(key)}["']?[ \t]*(=|\]|\.)""", re.MULTILINE
    )
    match = pattern.search(text)
    return None if match is None else text.count("\n", 0, match.start()) + 1


def read_toml(path: Path) -> tuple[dict[str, Any], str]:
    """The parsed file and its text (for ``line_of``).

    Raises:
        ConfigError: unreadable, not UTF-8, or not valid TOML.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc.reason}") from exc
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        # The message already says "(at line N, column M)".
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
