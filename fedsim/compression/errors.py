"""The one error a payload decoder raises.

`decode` turns every malformed payload (wrong magic or version, truncation, a checksum that
does not match, unknown enums, a layout other than the receiver's, counts that overflow, position
codes that do not parse, trailing bytes) into a `CodecError` with the reason; nothing else
(`IndexError`, `struct.error`, `OverflowError`, ...) escapes it.
"""

from __future__ import annotations


class CodecError(ValueError):
    """A payload that cannot be decoded; the message says what is wrong and where."""
