"""Peer-supplied text made safe to print, and identity strings checked at ingest.

Host names, agent and boot ids, GPU UUIDs, engine ids and model names come from
other machines. Printed raw, an escape sequence in one (``ESC ] 0 ; … BEL`` retitles
the terminal, ``ESC [ 2 J`` clears it) or a CR / LF (forges a log line or a table
row) acts on the reader's terminal or log. Every human output that carries such a
string passes it through ``printable``; the collector refuses identity fields that
``identity_problem`` finds fault with, so they never reach its state at all (their
length is bounded apart: ``FleetLimits.max_label_bytes``, reason ``label_too_long``).
"""

from __future__ import annotations

__all__ = ["identity_problem", "printable"]

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str) -> str:
    r"""``text`` with every control or non-printing character escaped, one line.

    ESC, CR, LF, BEL, DEL, C1 controls, bidi overrides and line separators become
    ``\\x1b``, ``\\r``, ``\\n`` … (and a backslash ``\\\\``, so an escaped text cannot
    pass for another); printable characters, non-ASCII letters included, stay as
    they are. Plain text comes back unchanged (the common case costs one check).
    """
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(ch if ch.isprintable() and ch != "\\" else _escape(ch) for ch in text)


def identity_problem(name: str, value: str, *, max_chars: int | None = None) -> str | None:
    """Why ``value`` cannot be the identity field ``name``, else None.

    Identity fields (agent_id, boot_id, hostname, GPU UUIDs, engine ids, model names)
    are printable characters only: no control characters, no line breaks, no bidi
    overrides. The answer quotes the value escaped, so it is safe to log.

    Args:
        name: the field's name, for the message.
        value: what the peer sent (empty passes: whether it is required is the
            caller's business).
        max_chars: a length limit too, when given.
    """
    if max_chars is not None and len(value) > max_chars:
        return f"{name} is {len(value)} characters (at most {max_chars})"
    if not value.isprintable():
        return f"{name} '{printable(value)}' holds control or non-printing characters"
    return None
