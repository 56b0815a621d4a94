"""Struct layouts declared once, with the size the kernel header gives asserted at import."""

from __future__ import annotations

import struct


def layout(fmt: str, size: int) -> struct.Struct:
    """`fmt` as a struct.Struct; an AssertionError at import when it is not `size` bytes."""
    declared = struct.Struct(fmt)
    assert declared.size == size, (fmt, declared.size, size)
    return declared
