"""Small parsing helpers every vendor client uses on device answers.

A device's answer is untrusted input. JSON is parsed with a depth limit (Python's parser
raises RecursionError, not ValueError, on a few thousand nested brackets) and without the
non-standard NaN/Infinity; strings headed for the database lose what PostgreSQL cannot store
(NUL, lone UTF-16 surrogates) and are length-capped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

from cms_ingest.domain import Alarm

ERROR_KEYS = ("error", "message", "detail", "result")
MAX_JSON_DEPTH = 64  # real device answers nest a handful of levels
MAX_INT_DIGITS = 18  # ids and counters: always fits a signed 64-bit integer

# What a device string may not carry into PostgreSQL `text` / `jsonb`.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
REPLACEMENT = "\ufffd"
# Length caps for device strings stored in columns (raw JSON strings get RAW_TEXT_LIMIT).
ID_LIMIT = 256
NAME_LIMIT = 512
DESCRIPTION_LIMIT = 2048
RAW_TEXT_LIMIT = 8192


class UnreadableJson(ValueError):
    """A device answer that is not usable JSON; the message says why (never the body)."""


def _no_constant(_name: str) -> None:
    return None  # NaN, Infinity, -Infinity: not JSON, and jsonb refuses them


def _finite_float(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None  # 1e999 parses as inf


def load_json(body: bytes) -> Any:
    """The JSON in `body`; `UnreadableJson` when it is not JSON or nests too deep."""
    try:
        value = json.loads(body, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise UnreadableJson("JSON nested too deep to parse") from None
    except UnicodeDecodeError:
        raise UnreadableJson("not UTF-8 text") from None
    except ValueError as exc:
        raise UnreadableJson(f"not JSON ({str(exc)[:100]})") from None
    if _deeper_than(value, MAX_JSON_DEPTH):
        raise UnreadableJson(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def parse_json(body: bytes) -> Any:
    """The JSON in `body`, or None when it is empty or not usable JSON (callers report that)."""
    if not body:
        return None
    try:
        return load_json(body)
    except UnreadableJson:
        return None


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether containers nest more than `limit` levels (iterative: no recursion to exhaust)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def error_text(payload: Any) -> str:
    """The human part of an error answer (`{"error": ...}` and its cousins), or ""."""
    if isinstance(payload, dict):
        for key in ERROR_KEYS:
            if isinstance(payload.get(key), str):
                return clean_text(str(payload[key]), DESCRIPTION_LIMIT)
    return ""


def as_int(value: Any) -> int | None:
    """An integer from an int, a finite float or ASCII digits in a string (at most 18 of
    them); None for anything else (`"²".isdigit()` is true, `int("²")` fails)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) else None
    if isinstance(value, str):
        text = value.strip()
        digits = text[1:] if text.startswith("-") else text
        if digits.isascii() and digits.isdigit() and len(digits) <= MAX_INT_DIGITS:
            return int(text)
    return None


# ------------------------------------------------------------------ storable device strings


def clean_text(value: str, limit: int) -> str:
    """A device string as PostgreSQL can store it: NUL and lone surrogates become U+FFFD, and
    at most `limit` characters (a longer one is cut and ends with "…")."""
    if len(value) > limit:
        value = value[: limit - 1] + "…"
    return _UNSTORABLE.sub(REPLACEMENT, value)


def clean_json(value: Any, *, depth: int = MAX_JSON_DEPTH) -> Any:
    """Device JSON made storable as `jsonb`: strings (keys too) cleaned, non-finite numbers
    None, containers nested past `depth` levels dropped (None)."""
    if isinstance(value, str):
        return clean_text(value, RAW_TEXT_LIMIT)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        if depth <= 0:
            return None
        return {
            clean_text(str(key), ID_LIMIT): clean_json(item, depth=depth - 1)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        if depth <= 0:
            return None
        return [clean_json(item, depth=depth - 1) for item in value]
    return value


def storable(alarm: Alarm) -> Alarm:
    """The alarm with every device-supplied string cleaned for the database (see above)."""
    return dataclasses.replace(
        alarm,
        source_id=clean_text(alarm.source_id, ID_LIMIT),
        vendor_event=clean_text(alarm.vendor_event, ID_LIMIT),
        description=clean_text(alarm.description, DESCRIPTION_LIMIT),
        camera_id=None if alarm.camera_id is None else clean_text(alarm.camera_id, ID_LIMIT),
        camera_name=(
            None if alarm.camera_name is None else clean_text(alarm.camera_name, NAME_LIMIT)
        ),
        raw=clean_json(dict(alarm.raw)),
        media=tuple(
            dataclasses.replace(media, locator=clean_json(dict(media.locator)))
            for media in alarm.media
        ),
    )
