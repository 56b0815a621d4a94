"""Plain JSON for decoded records: dataclasses become objects, extent maps become summaries."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from .extents import ExtentMap

MAX_EXTENTS_IN_JSON = 4096


def extents_json(m: ExtentMap) -> dict[str, Any]:
    listed = []
    for i, e in enumerate(m):
        if i >= MAX_EXTENTS_IN_JSON:
            break
        listed.append({"phys": e.phys, "size": e.size, "order": e.order})
    return {"extent_count": len(m), "block_count": m.block_count(), "bytes": m.total_bytes,
            "blocks_by_order": {str(k): v for k, v in m.blocks_by_order().items()},
            "extents": listed, "extents_truncated": len(m) > MAX_EXTENTS_IN_JSON}


def to_json(obj: Any) -> Any:
    if isinstance(obj, ExtentMap):
        return extents_json(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        if type(obj).__name__ not in ("Finding",):
            out["type"] = type(obj).__name__
        for f in dataclasses.fields(obj):
            out[f.name] = to_json(getattr(obj, f.name))
        return out
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_json(v) for v in obj]
    if isinstance(obj, bytes):
        return obj.hex()
    return obj
