"""Small parsing helpers every vendor client uses on device answers.

A device's answer is untrusted input. JSON is parsed with a depth limit (Python's parser
raises RecursionError, not ValueError, on a few thousand nested brackets) and without the
non-standard NaN/Infinity; strings headed for the database lose what PostgreSQL cannot store
(NUL, lone UTF-16 surrogates) and are length-capped; ids and times are read without letting
an odd value raise (`as_id`, `parse_time`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, Literal, Protocol

import aiohttp
import orjson

# The storable-text helpers live in the domain (the store cleans with them); vendors use them
# on what they keep in cursors and texts, and import them from here as before (`as`: an
# explicit re-export for mypy --strict).
from cms_ingest.domain import DESCRIPTION_LIMIT as DESCRIPTION_LIMIT  # noqa: PLC0414 (re-exported)
from cms_ingest.domain import ID_LIMIT as ID_LIMIT  # noqa: PLC0414 (re-exported)
from cms_ingest.domain import MAX_JSON_DEPTH as MAX_JSON_DEPTH  # noqa: PLC0414 (re-exported)
from cms_ingest.domain import NAME_LIMIT as NAME_LIMIT  # noqa: PLC0414 (re-exported)
from cms_ingest.domain import clean_text as clean_text  # noqa: PLC0414 (re-exported)
from cms_ingest.sitehttp import Answer, ResponseTooLarge, SiteHttp, read_limited
from cms_ingest.vendors.base import BadDeviceResponse, Download, SiteReporter

ERROR_KEYS = ("error", "message", "detail", "result")
MAX_JSON_BYTES = 16 * 1024 * 1024  # a page of alarms is ~200 kB; anything near this is hostile
MAX_INT_DIGITS = 18  # ids and counters: always fits a signed 64-bit integer
# Pages one poll may read: a device that ignores its paging parameters while answering full
# pages must not keep a poll running for ever. What is left is read by the next poll, from the
# cursor this poll commits (so a catch-up of thousands of alarms still arrives, in steps).
MAX_PAGES_PER_POLL = 20


class UnreadableJson(ValueError):
    """A device answer that is not usable JSON; the message says why (never the body)."""


def no_json_constant(_name: str) -> None:
    """`parse_constant` hook: NaN, Infinity, -Infinity are not JSON (and jsonb refuses them)."""


def finite_float(text: str) -> float | None:
    """`parse_float` hook: a number too large for a float (1e999 parses as inf) is None."""
    value = float(text)
    return value if math.isfinite(value) else None


def load_json(body: bytes) -> Any:
    """The JSON in `body`; `UnreadableJson` when it is not JSON or nests too deep.

    orjson reads it (0.2 ms for a full page of 300 alarms where the standard library took
    0.55): it refuses what it does not take exactly as `_load_json_slowly` would (NaN, 1e999,
    a byte-order mark, UTF-16, lone surrogates, over 1,024 levels), and those answers are read
    by the standard library as before. One difference it does not refuse: an integer beyond 64
    bits becomes a float. Such a value (a float as wide as 2**63 or wider: no 64-bit integer
    is) sends the answer to the standard library too, so every answer reads the same either
    way."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _load_json_slowly(body)
    flaw = json_tree_flaw(value, MAX_JSON_DEPTH)
    if flaw == "wide_number":
        return _load_json_slowly(body)
    if flaw == "too_deep":
        raise UnreadableJson(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _load_json_slowly(body: bytes) -> Any:
    try:
        value = json.loads(body, parse_constant=no_json_constant, parse_float=finite_float)
    except RecursionError:
        raise UnreadableJson("JSON nested too deep to parse") from None
    except UnicodeDecodeError:
        raise UnreadableJson("not UTF-8 text") from None
    except ValueError as exc:
        raise UnreadableJson(f"not JSON ({str(exc)[:100]})") from None
    if json_deeper_than(value, MAX_JSON_DEPTH):
        raise UnreadableJson(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


async def read_json(
    response: aiohttp.ClientResponse, problems: SiteReporter, where: str, *, strict: bool = False
) -> Any:
    """A device's JSON answer, read within MAX_JSON_BYTES; None when the body is empty.

    A larger answer is bad input (`oversized_answer`) and BadDeviceResponse. A body that is not
    usable JSON is None on an error status (an error page: the status says enough); on a 2xx
    status it is bad input (`unreadable_json`) and None, or BadDeviceResponse when `strict`.
    Each `what` is logged once per site by the SiteReporter, and counted every time.
    """
    try:
        body = await read_limited(response, MAX_JSON_BYTES)
    except ResponseTooLarge as exc:
        raise _oversized(exc, problems, where) from None
    return json_of(response.status, body, problems, where, strict=strict)


async def fetch_json(
    http: SiteHttp,
    method: str,
    path: str,
    problems: SiteReporter,
    *,
    strict: bool = False,
    params: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    json_body: Any = None,
    form: Mapping[str, str] | None = None,
    where: str | None = None,
) -> tuple[Answer, Any]:
    """`read_json` for a whole request through `SiteHttp.fetch` (a small GET takes the lean
    path): the answer and its JSON, with the same caps and the same bad-input reports
    (which name the request as `where`, default method and path)."""
    where = where or f"{method} {path}"
    try:
        answer = await http.fetch(
            method,
            path,
            limit=MAX_JSON_BYTES,
            params=params,
            headers=headers,
            json=json_body,
            data=dict(form) if form is not None else None,
        )
    except ResponseTooLarge as exc:
        raise _oversized(exc, problems, where) from None
    return answer, json_of(answer.status, answer.body, problems, where, strict=strict)


def _oversized(exc: ResponseTooLarge, problems: SiteReporter, where: str) -> BadDeviceResponse:
    problems.bad_input("oversized_answer", str(exc))
    return BadDeviceResponse(f"{where}: answer over {MAX_JSON_BYTES} bytes")


def json_of(status: int, body: bytes, problems: SiteReporter, where: str, *, strict: bool) -> Any:
    """The JSON of an answer's body (see `read_json`)."""
    if not body:
        return None
    try:
        return load_json(body)
    except UnreadableJson as exc:
        if not 200 <= status < 300:
            return None
        problems.bad_input("unreadable_json", f"{where}: {exc}")
        if strict:
            raise BadDeviceResponse(f"{where}: answer {status} is not JSON") from None
        return None


def json_deeper_than(value: Any, limit: int) -> bool:
    """Whether containers nest more than `limit` levels (iterative: no recursion to exhaust)."""
    return json_tree_flaw(value, limit) == "too_deep"


# Floats this wide or wider may be integers orjson could not hold in 64 bits (see load_json).
WIDE_FLOAT = float(2**63)


def json_tree_flaw(value: Any, limit: int) -> Literal["too_deep", "wide_number"] | None:
    """ "too_deep" when containers nest more than `limit` levels, else "wide_number" when a
    float is as wide as `WIDE_FLOAT`, else None (iterative: no recursion to exhaust).

    Every answer's every value passes here (5 % of the daemon's CPU in a storm of full
    pages): only containers are stacked, and leaves cost a type check each. Parsed JSON holds
    plain dicts and lists only (no subclasses to look for)."""
    kind = type(value)
    if kind is not dict and kind is not list:
        return "wide_number" if kind is float and not -WIDE_FLOAT < value < WIDE_FLOAT else None
    stack: list[tuple[Any, int]] = [(value, 1)]
    push, pop = stack.append, stack.pop
    wide = False  # the walk goes on: too deep is the graver flaw
    while stack:
        item, depth = pop()
        if depth > limit:
            return "too_deep"
        for child in item.values() if type(item) is dict else item:
            kind = type(child)
            if kind is dict or kind is list:
                push((child, depth + 1))
            elif kind is float and not -WIDE_FLOAT < child < WIDE_FLOAT:
                wide = True
    return "wide_number" if wide else None


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


def as_id(value: Any) -> int | None:
    """A non-negative id from an int or ASCII digits in a string (surrounding blanks ignored, at
    most 18 digits, no sign); None for anything else, floats included."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.isdigit() and len(text) <= MAX_INT_DIGITS:
            return int(text)
    return None


def parse_time(value: Any, default_tz: tzinfo = UTC) -> datetime | None:
    """An ISO 8601 time string as an aware datetime in UTC (a time without an offset is in
    `default_tz`); None when it is not one: not a string, not ISO 8601, or outside what a
    datetime holds once converted ("0001-01-01T00:00:00+01:00" overflows)."""
    try:
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=default_tz)
        return parsed.astimezone(UTC)
    except (TypeError, ValueError, OverflowError):
        return None


# ------------------------------------------------------------------ plausible device times

EARLIEST_PLAUSIBLE = datetime(2000, 1, 1, tzinfo=UTC)
FUTURE_SLACK = timedelta(days=1)


def plausible_time(when: datetime, device_now: datetime | None = None) -> bool:
    """Whether a device time may move a cursor or a watermark: not before 2000, and not more
    than a day ahead of the device's own clock (ours when the vendor cannot tell). A time
    outside this window is reported as bad input by the caller and never becomes a cursor:
    one alarm stamped 9999 would otherwise hide every later alarm for good."""
    reference = device_now or datetime.now(UTC)
    return EARLIEST_PLAUSIBLE <= when <= reference + FUTURE_SLACK


# ------------------------------------------------------------------ device lives
# A device that is factory-reset, replaced or reinstalled under the same site starts its
# alarm ids again. Each such restart begins a new "life"; the life's tag (the UTC time the
# reset was detected) is kept in the vendor's cursor and suffixed to every source_id of that
# life, so a new alarm 7 never collides with the stored alarm 7 of the earlier life. The first
# life has no tag: rows stored before this scheme keep their source_ids.

LIFE_SEPARATOR = "@"


def new_life(now: datetime | None = None) -> str:
    """The tag of a device life that starts now ("20261203T122459Z")."""
    return (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def life_source_id(vendor_id: str, life: str | None) -> str:
    """`source_id` of a vendor alarm id in a device life: the vendor's id as it was for the
    first life (life None or ""), else "<id>@<life>"."""
    return f"{vendor_id}{LIFE_SEPARATOR}{life}" if life else vendor_id


class Downloads(Protocol):
    """What serves media downloads: a `VendorClient`, or one of its layers."""

    def download(self, path: str) -> AbstractAsyncContextManager[Download]: ...


async def download_size(client: Downloads, path: str, limit: int) -> tuple[int, str | None]:
    """Download `path` only to measure it (a probe, a check): its size in bytes, read no
    further than just past `limit`, and its content type."""
    size = 0
    async with client.download(path) as download:
        async for chunk in download.chunks:
            size += len(chunk)
            if size > limit:
                break
    return size, download.content_type
