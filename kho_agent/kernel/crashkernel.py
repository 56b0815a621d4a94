"""crashkernel= as the kernel reads it (parse_crashkernel(), kernel/crash_reserve.c): how much
memory the kdump reservation takes below and above 4 GiB. Pure: no I/O. The scratch
recommendation counts it among the kernel's early reservations when memblock debugfs is not
there to count them (kho_agent/engine/scratch_plan.py)."""

from __future__ import annotations

from collections.abc import Sequence

from .kho_scratch import ARCH_LOW_ADDRESS_LIMIT
from .params import memparse

CRASH_LOW_DEFAULT = 256 << 20             # DEFAULT_CRASH_KERNEL_LOW_SIZE floor for ",high"


def crashkernel_sizes(values: Sequence[str | None], ram: int) -> tuple[int, int]:
    """(low, high) bytes reserved by every crashkernel= given (plain, `,high`, `,low`, range
    list `start-[end]:size,...` chosen by the RAM size `ram`, `@offset`); a malformed size
    counts 0."""
    low = high = 0
    low_given = False
    wants_high = False
    for value in values:
        if not value:
            continue
        body, _, offset = value.partition("@")
        if body.endswith(",low"):
            low, low_given = _size(body[:-4]), True
            continue
        if body.endswith(",high"):
            high, wants_high = _size(body[:-5]), True
            continue
        if body.endswith(",cma"):
            continue  # a CMA area: movable pages, not an early kernel reservation
        size = _range_size(body, ram) if ":" in body else _size(body)
        fixed_high = bool(offset) and _size(offset) > ARCH_LOW_ADDRESS_LIMIT
        if fixed_high:
            high = size
        else:
            low = size
    if wants_high and not low_given:
        low = max(low, CRASH_LOW_DEFAULT)
    return low, high


def _size(text: str) -> int:
    return memparse(text) or 0


def _range_size(body: str, ram: int) -> int:
    """`start-[end]:size[,...]`: the size of the range that holds the RAM size."""
    for part in body.split(","):
        span, _, size = part.partition(":")
        start_text, _, end_text = span.partition("-")
        start = _size(start_text)
        end = _size(end_text) if end_text else None
        if ram >= start and (end is None or ram < end):
            return _size(size)
    return 0
