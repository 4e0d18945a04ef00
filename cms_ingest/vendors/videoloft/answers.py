"""What every Videoloft answer shares: the `result` wrapper, device lists keyed by owner,
and the clock alerts and live records are timed by."""

from __future__ import annotations

import time
from typing import Any


def _result(payload: Any) -> Any:
    if isinstance(payload, dict) and "result" in payload:
        return payload["result"]
    return payload if payload is not None else {}


def _device_entries(result: Any) -> dict[str, dict[str, Any]]:
    """`{owner uid: {"devices": {id: {...}}, "alias": ...}}` -> {uidd: its entry}."""
    entries: dict[str, dict[str, Any]] = {}
    if not isinstance(result, dict):
        return entries
    for owner in result.values():
        if not isinstance(owner, dict) or not isinstance(owner.get("devices"), dict):
            continue
        for item in owner["devices"].values():
            if not isinstance(item, dict):
                continue
            uidd = item.get("uidd") or item.get("uid")
            if uidd:
                entries[str(uidd)] = item
    return entries


def _now_ms() -> int:
    return int(time.time() * 1000)
