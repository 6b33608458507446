"""printable() and identity_problem(): peer-supplied strings made safe to print."""

from __future__ import annotations

import pytest

from rooftop.common.text import identity_problem, printable

HOSTILE = "gpu-node\x1b]0;pwned\x07\r\nINFO forged line"


def test_printable_escapes_escape_sequences_and_line_breaks():
    assert printable(HOSTILE) == "gpu-node\\x1b]0;pwned\\x07\\r\\nINFO forged line"


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("\x00\x7f\x9b", "\\x00\\x7f\\x9b"),  # NUL, DEL, the C1 CSI
        ("a\tb", "a\\tb"),
        ("x\u202ey", "x\\u202ey"),  # right-to-left override: reorders what follows
        ("x\u2028y", "x\\u2028y"),  # line separator
        ("back\\slash", "back\\\\slash"),  # so an escaped name cannot pass for another
    ],
)
def test_printable_escapes_every_non_printing_character(raw, shown):
    assert printable(raw) == shown


def test_printable_leaves_plain_and_non_ascii_names_alone():
    for name in ("gpu-node-1", "nœud-ünïcode", "ノード", "a b"):
        assert printable(name) is name


def test_printable_output_is_one_line_without_control_characters():
    out = printable("".join(map(chr, range(0x250))))
    assert out.isprintable()


def test_identity_problem_names_the_field_and_quotes_the_value_escaped():
    problem = identity_problem("boot_id", "b1\nERROR forged")
    assert problem == "boot_id 'b1\\nERROR forged' holds control or non-printing characters"
    assert identity_problem("hostname", "gpu-node-1.example.com") is None
    assert identity_problem("hostname", "") is None  # whether it is required is the caller's


def test_identity_problem_enforces_a_length_only_when_asked():
    assert identity_problem("agent_id", "a" * 300) is None
    assert identity_problem("agent_id", "a" * 300, max_chars=256) == (
        "agent_id is 300 characters (at most 256)"
    )
