"""Small parsing helpers every vendor client uses on device answers."""

from __future__ import annotations

import json
from typing import Any

ERROR_KEYS = ("error", "message", "detail", "result")


def parse_json(body: bytes) -> Any:
    """The JSON in `body`, or None when it is empty or not JSON (callers report that)."""
    if not body:
        return None
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None


def error_text(payload: Any) -> str:
    """The human part of an error answer (`{"error": ...}` and its cousins), or ""."""
    if isinstance(payload, dict):
        for key in ERROR_KEYS:
            if isinstance(payload.get(key), str):
                return str(payload[key])
    return ""


def as_int(value: Any) -> int | None:
    """An integer from an int, a float or digits in a string; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None
