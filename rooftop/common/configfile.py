"""Reading the daemons' TOML files: one error line that names the file and line."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from rooftop.common.errors import ConfigError

__all__ = ["line_of", "located", "read_toml"]


def line_of(text: str, key: str) -> int | None:
    """The line where ``key`` is set (or opened as a table), for the error message."""
    pattern = re.compile(
        rf"""^[ \t]*(\[\[?[ \t]*)?["']?{re.escape(key)}["']?[ \t]*(=|\]|\.)""", re.MULTILINE
    )
    match = pattern.search(text)
    return None if match is None else text.count("\n", 0, match.start()) + 1


# The key an error names: "otlp[1].protocol: ...", "unknown key collector.listen_addr",
# "unknown section [colector]". Errors naming an environment variable (capitals) match
# nothing: they have no line.
_KEY_IN_MESSAGE = re.compile(
    r"^(?:unknown key |unknown section \[)?((?:[a-z_]\w*(?:\[\d+\])?\.)*[a-z_]\w*)"
)


def located(exc: ConfigError, path: Path | None, text: str) -> ConfigError:
    """``exc`` prefixed with ``path:line`` where the key it names is set.

    ``path`` alone when that line cannot be found; unchanged without a file or a key.
    """
    match = _KEY_IN_MESSAGE.match(str(exc))
    if path is None or match is None:
        return exc
    parts = re.sub(r"\[\d+\]", "", match[1]).split(".")
    # The key itself, else the table it is missing from.
    line = line_of(text, parts[-1]) or line_of(text, parts[0])
    return ConfigError(f"{path}:{line}: {exc}" if line else f"{path}: {exc}")


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
