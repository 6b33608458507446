"""Snappy block format (https://github.com/google/snappy/blob/main/format_description.txt).

Prometheus remote write 1.0 bodies are snappy *block* format (not the framed stream
format). No snappy binding is among Rooftop's dependencies, so this is a pure-Python
codec: ``compress`` finds repeats through a hash of 4-byte sequences (remote-write
bodies are label names and values repeated per series, which compress about 6x), and
``decompress`` reads any valid block, ours or another encoder's.
"""

from __future__ import annotations

from rooftop.common.errors import RooftopError

__all__ = ["SnappyError", "compress", "decompress", "literal_block", "varint"]

_MAX_OFFSET = 65_535  # 2-byte-offset copies: what this encoder emits
_MIN_MATCH = 4
_MAX_COPY = 64  # one copy element's length


class SnappyError(RooftopError):
    """A snappy block that cannot be decoded (truncated, corrupt, wrong length)."""


def varint(value: int) -> bytes:
    """``value`` (≥ 0) as a little-endian base-128 varint.

    Snappy's length preamble, and protobuf's integers and lengths (remote write's).
    """
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(out: bytearray, data: bytes, start: int, end: int) -> None:
    n = end - start - 1
    if n < 60:
        out.append(n << 2)
    elif n < 1 << 8:
        out += bytes((60 << 2, n))
    elif n < 1 << 16:
        out += bytes((61 << 2,)) + n.to_bytes(2, "little")
    elif n < 1 << 24:
        out += bytes((62 << 2,)) + n.to_bytes(3, "little")
    else:
        out += bytes((63 << 2,)) + n.to_bytes(4, "little")
    out += data[start:end]


def _copy(out: bytearray, offset: int, length: int) -> None:
    while length > 0:
        # Never leave a tail under 4: a 2-byte-offset copy takes 1-64, but keep the
        # rest long enough to be a copy of its own.
        step = min(length, _MAX_COPY)
        if 0 < length - step < _MIN_MATCH:
            step = length - _MIN_MATCH
        if 4 <= step <= 11 and offset < 2048:
            out += bytes((((offset >> 8) << 5) | ((step - 4) << 2) | 1, offset & 0xFF))
        else:
            out += bytes((((step - 1) << 2) | 2,)) + offset.to_bytes(2, "little")
        length -= step


def literal_block(data: bytes) -> bytes:
    """``data`` as a snappy block of literals: valid snappy, no CPU spent on matching."""
    out = bytearray(varint(len(data)))
    chunk = 1 << 16
    for start in range(0, len(data), chunk):
        _literal(out, data, start, min(start + chunk, len(data)))
    return bytes(out)


def compress(data: bytes) -> bytes:
    """``data`` as one snappy block."""
    n = len(data)
    out = bytearray(varint(n))
    table: dict[bytes, int] = {}
    literal_start = 0
    i = 0
    limit = n - _MIN_MATCH
    while i <= limit:
        key = data[i : i + _MIN_MATCH]
        candidate = table.get(key)
        table[key] = i
        if candidate is None or i - candidate > _MAX_OFFSET:
            i += 1
            continue
        # Extend the match as far as it goes.
        length = _MIN_MATCH
        while i + length < n and data[candidate + length] == data[i + length]:
            length += 1
        if literal_start < i:
            _literal(out, data, literal_start, i)
        _copy(out, i - candidate, length)
        i += length
        literal_start = i
    if literal_start < n:
        _literal(out, data, literal_start, n)
    return bytes(out)


def decompress(block: bytes, *, max_length: int = 1 << 28) -> bytes:
    """The bytes one snappy block holds.

    Raises:
        SnappyError: the block is corrupt, truncated, or says it holds more than
            ``max_length`` bytes.
    """
    # The preamble: the uncompressed length as a little-endian varint.
    length = shift = pos = 0
    while True:
        if pos >= len(block) or shift > 28:
            raise SnappyError("snappy: bad length preamble")
        byte = block[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            break
    if length > max_length:
        raise SnappyError(f"snappy: block says {length} bytes, more than {max_length}")
    out = bytearray()
    end = len(block)
    while pos < end:
        tag = block[pos]
        pos += 1
        kind = tag & 3
        if kind == 0:
            n = tag >> 2
            if n >= 60:
                extra = n - 59
                if pos + extra > end:
                    raise SnappyError("snappy: truncated literal length")
                n = int.from_bytes(block[pos : pos + extra], "little")
                pos += extra
            n += 1
            if pos + n > end:
                raise SnappyError("snappy: truncated literal")
            out += block[pos : pos + n]
            pos += n
            continue
        if kind == 1:
            if pos + 1 > end:
                raise SnappyError("snappy: truncated copy")
            n = ((tag >> 2) & 7) + 4
            offset = ((tag >> 5) << 8) | block[pos]
            pos += 1
        else:
            width = 2 if kind == 2 else 4
            if pos + width > end:
                raise SnappyError("snappy: truncated copy")
            n = (tag >> 2) + 1
            offset = int.from_bytes(block[pos : pos + width], "little")
            pos += width
        if offset == 0 or offset > len(out):
            raise SnappyError("snappy: copy offset outside the output")
        start = len(out) - offset
        if n <= offset:
            out += out[start : start + n]
        else:  # overlapping copy: a run
            for k in range(n):
                out.append(out[start + k])
        if len(out) > length:
            raise SnappyError("snappy: block longer than its preamble says")
    if len(out) != length:
        raise SnappyError(f"snappy: block holds {len(out)} bytes, preamble says {length}")
    return bytes(out)
