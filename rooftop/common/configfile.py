"""Reading the daemons' TOML files: one error line that names the file and line."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from rooftop.common.errors import ConfigError

__all__ = ["line_of", "located", "read_toml"]

# A table header: "[name]" or "[[name]]" (an array of tables); group 1 is "[" for the latter.
_HEADER = re.compile(r"^[ \t]*\[(\[)?[ \t]*([^\]\s]+)[ \t]*\]\]?", re.MULTILINE)


def _key_pattern(key: str) -> re.Pattern[str]:
    return re.compile(
        rf"""^[ \t]*(\[\[?[ \t]*)?["']?{re.escape(key)}["']?[ \t]*(=|\]|\.)""", re.MULTILINE
    )


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def line_of(
    text: str, key: str, *, table: str | None = None, index: int | None = None
) -> int | None:
    """The line where ``key`` is set (or opened as a table), for the error message.

    Args:
        text: the file's text.
        key: the key (or table name) to find.
        table: look only inside this table (its header line when ``key`` is not
            there); ``""`` means the top level, before the first table. None: anywhere.
        index: which ``[[table]]`` of an array of tables (0-based); None: the first.
    """
    if table is None:
        match = _key_pattern(key).search(text)
        return None if match is None else _line(text, match.start())
    headers = list(_HEADER.finditer(text))
    if table == "":
        start, end, header_line = 0, headers[0].start() if headers else len(text), None
    else:
        mine = [i for i, h in enumerate(headers) if h[2].strip("\"'") == table]
        if not mine:
            return None
        pick = mine[min(index or 0, len(mine) - 1)]
        start = headers[pick].end()
        end = headers[pick + 1].start() if pick + 1 < len(headers) else len(text)
        header_line = _line(text, headers[pick].start())
    match = _key_pattern(key).search(text, start, end)
    return header_line if match is None else _line(text, match.start())


# The key an error names: "otlp[1].protocol: ...", "unknown key collector.listen_addr",
# "unknown section [colector]". Errors naming an environment variable (capitals) match
# nothing: they have no line.
_KEY_IN_MESSAGE = re.compile(
    r"^(?:unknown key |unknown section \[)?((?:[a-z_]\w*(?:\[\d+\])?\.)*[a-z_]\w*(?:\[\d+\])?)"
)
_PART = re.compile(r"^([a-z_]\w*)(?:\[(\d+)\])?$")


def located(exc: ConfigError, path: Path | None, text: str) -> ConfigError:
    """``exc`` prefixed with ``path:line`` where the key it names is set.

    A dotted name (``otlp[1].protocol``, ``collector.listen``) is looked up inside
    its table (the second ``[[otlp]]``, ``[collector]``), so a key of the same name in
    another table is never blamed; a single name at the top level first. ``path``
    alone when that line cannot be found; unchanged without a file or a key.
    """
    match = _KEY_IN_MESSAGE.match(str(exc))
    if path is None or match is None:
        return exc
    parts = [_PART.match(p) for p in match[1].split(".")]
    names = [(p[1], int(p[2]) if p[2] is not None else None) for p in parts if p is not None]
    if not names:
        return exc
    (first, index), key = names[0], names[-1][0]
    if len(names) > 1:
        line = line_of(text, key, table=first, index=index)
    else:
        # A top-level key, else a table of that name.
        line = line_of(text, first, table="") or line_of(text, first, table=first, index=index)
    return ConfigError(f"{path}:{line}: {exc}" if line else f"{path}: {exc}")


def read_toml(path: Path) -> tuple[dict[str, Any], str]:
    """The parsed file and its text (for ``line_of``).

    Raises:
        ConfigError: unreadable, not UTF-8 (naming the line and byte offset), or not
            valid TOML.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte offset {exc.start}: {exc.reason}); "
            "save the file as UTF-8"
        ) from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        # The message already says "(at line N, column M)".
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
