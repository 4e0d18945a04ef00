"""Every value the store writes, made storable once, where its rows are built.

PostgreSQL refuses NUL and lone surrogates in text and jsonb, NaN and Infinity in jsonb, and
Python will not even serialize an integer of thousands of digits. A device can put any of
them into an alarm, a media locator, a cursor, an error text or an action's result; one such
value would fail the transaction every site of the batch shares. Both adapters (PostgreSQL and
in memory) clean with these functions, so the runtime and the vendors never need to.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from cms_ingest.domain import (
    DESCRIPTION_LIMIT,
    ID_LIMIT,
    MAX_JSON_DEPTH,
    MAX_JSON_INT_BITS,
    NAME_LIMIT,
    RAW_TEXT_LIMIT,
    Alarm,
    MediaRequest,
    PollCommit,
    SiteHealth,
    clean_text,
)

HEALTH_ERROR_LIMIT = 1000  # characters of a site's last error kept in site_state
NOTE_LIMIT = DESCRIPTION_LIMIT  # media notes and reasons, action errors: they may quote devices
# Texts both adapters write themselves: a media row the device has none for, an expired action.
NO_MEDIA_NOTE = "the device has none"
EXPIRED_ERROR = "not_after passed before the action could be fired"


def stored_source_id(source_id: str) -> str:
    """The `source_id` as `commit_polls` stores it (to match the ids it returns)."""
    return clean_text(source_id, ID_LIMIT)


def storable_json(value: Any) -> Any:
    """Any JSON-like value as plain JSON `jsonb` takes: device strings cleaned, non-finite
    numbers and giant integers None, other objects (a datetime, bytes) as cleaned text.

    One pass (`clean_json`'s rules, plain types out), not a JSON round trip: a storm of
    full pages makes this run for every alarm, its raw answer and each media locator."""
    return _plain_json(value, MAX_JSON_DEPTH)


def _plain_json(value: Any, depth: int) -> Any:
    kind = type(value)  # the plain types first: no subclass checks for the usual values
    if kind is str:
        return clean_text(value, RAW_TEXT_LIMIT)
    if kind is int:
        return value if value.bit_length() <= MAX_JSON_INT_BITS else None
    if value is None or value is True or value is False:
        return value
    if kind is dict:
        return _plain_object(value, depth) if depth > 0 else None
    if isinstance(value, str):
        return clean_text(str(value), RAW_TEXT_LIMIT)
    if isinstance(value, int):
        return int(value) if value.bit_length() <= MAX_JSON_INT_BITS else None
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        if depth <= 0:
            return None
        return {
            clean_text(str(key), ID_LIMIT): _plain_json(item, depth - 1)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        if depth <= 0:
            return None
        return [_plain_json(item, depth - 1) for item in value]
    return _storable_str(value)


def _plain_object(value: dict[Any, Any], depth: int) -> dict[str, Any]:
    """A JSON object, its usual members (short clean ASCII keys and strings, small
    integers, null, booleans) taken as they are without a call each: a device's alarm is
    mostly those, and a storm passes thousands a second through here."""
    plain: dict[str, Any] = {}
    for raw_key, raw_item in value.items():
        key = raw_key
        if not (type(key) is str and len(key) <= ID_LIMIT and _is_clean(key)):
            key = clean_text(str(key), ID_LIMIT)
        item, kind = raw_item, type(raw_item)
        if kind is str:
            if not (len(item) <= RAW_TEXT_LIMIT and _is_clean(item)):
                item = clean_text(item, RAW_TEXT_LIMIT)
        elif kind is int:
            if item.bit_length() > MAX_JSON_INT_BITS:
                item = None
        elif not (item is None or kind is bool):
            item = _plain_json(item, depth - 1)
        plain[key] = item
    return plain


def _is_clean(text: str) -> bool:
    return text.isascii() and "\x00" not in text


def _is_storable(alarm: Alarm) -> bool:
    """Would `storable_alarm` change nothing? Its texts clean and within their limits, its
    raw answer and media locators plain JSON objects already."""
    return (
        _fits(alarm.source_id, ID_LIMIT)
        and _fits(alarm.vendor_event, ID_LIMIT)
        and _fits(alarm.description, DESCRIPTION_LIMIT)
        and (alarm.camera_id is None or _fits(alarm.camera_id, ID_LIMIT))
        and (alarm.camera_name is None or _fits(alarm.camera_name, NAME_LIMIT))
        and (alarm.group_of is None or _fits(alarm.group_of, ID_LIMIT))
        and type(alarm.media) is tuple
        and _is_plain_object(alarm.raw, MAX_JSON_DEPTH)
        and all(_is_plain_object(media.locator, MAX_JSON_DEPTH) for media in alarm.media)
    )


def _fits(text: str, limit: int) -> bool:
    return type(text) is str and len(text) <= limit and _is_clean(text)


def _is_plain_object(value: Any, depth: int) -> bool:
    """Is `value` a dict `_plain_json` would return unchanged (an equal, plain copy)?"""
    if type(value) is not dict or depth <= 0:
        return False
    for key, item in value.items():
        if not (type(key) is str and len(key) <= ID_LIMIT and _is_clean(key)):
            return False
        kind = type(item)
        if kind is str:
            if not (len(item) <= RAW_TEXT_LIMIT and _is_clean(item)):
                return False
        elif kind is int:
            if item.bit_length() > MAX_JSON_INT_BITS:
                return False
        elif not (item is None or kind is bool or _is_plain(item, depth - 1)):
            return False
    return True


def _is_plain(value: Any, depth: int) -> bool:
    kind = type(value)
    if kind is str:
        return len(value) <= RAW_TEXT_LIMIT and _is_clean(value)
    if kind is int:
        return bool(value.bit_length() <= MAX_JSON_INT_BITS)
    if value is None or kind is bool:
        return True
    if kind is float:
        return math.isfinite(value)
    if kind is dict:
        return _is_plain_object(value, depth)
    if kind is list:
        return depth > 0 and all(_is_plain(item, depth - 1) for item in value)
    return False


def storable_note(note: str | None) -> str | None:
    """A media note or reason, or an action's error, as stored (it may quote the device)."""
    return None if note is None else clean_text(note, NOTE_LIMIT)


def storable_result(result: Mapping[str, Any] | None) -> Any:
    """An action's result (the device's answer, quoted) as `jsonb` takes it."""
    return None if result is None else storable_json(dict(result))


def storable_health(report: SiteHealth) -> SiteHealth:
    """A site's health as stored: its last error (it may quote the device) cleaned and cut."""
    if report.last_error is None:
        return report
    return dataclasses.replace(report, last_error=clean_text(report.last_error, HEALTH_ERROR_LIMIT))


def _storable_str(value: Any) -> str:
    return clean_text(str(value), RAW_TEXT_LIMIT)


def storable_alarm(alarm: Alarm) -> Alarm:
    """The alarm with every device-supplied string cleaned and its JSON made plain: the
    alarm itself when it is so already (nearly always; looking costs a third of a copy)."""
    if _is_storable(alarm):
        return alarm
    return dataclasses.replace(
        alarm,
        source_id=stored_source_id(alarm.source_id),
        vendor_event=clean_text(alarm.vendor_event, ID_LIMIT),
        description=clean_text(alarm.description, DESCRIPTION_LIMIT),
        camera_id=None if alarm.camera_id is None else clean_text(alarm.camera_id, ID_LIMIT),
        camera_name=(
            None if alarm.camera_name is None else clean_text(alarm.camera_name, NAME_LIMIT)
        ),
        raw=storable_json(dict(alarm.raw)),
        media=tuple(
            MediaRequest(media.kind, storable_json(dict(media.locator)), media.available)
            for media in alarm.media
        ),
        # A flood member names its head by source_id: cleaned alike, so they still match.
        group_of=None if alarm.group_of is None else stored_source_id(alarm.group_of),
    )


def storable_commit(commit: PollCommit) -> PollCommit:
    """The commit as PostgreSQL can store it; a cursor that had to be changed for that is
    reported as bad input (the vendor put a device value into it)."""
    cursor = commit.cursor
    if cursor is not None:
        cursor = storable_json(dict(cursor))
        if commit.problems is not None and _as_json_text(commit.cursor) != _as_json_text(cursor):
            commit.problems.bad_input(
                "unstorable_cursor",
                "the cursor held a value PostgreSQL cannot store (NUL, lone surrogate, NaN, "
                "infinity, a giant integer or an over-long string); stored cleaned",
            )
    return dataclasses.replace(
        commit, alarms=[storable_alarm(alarm) for alarm in commit.alarms], cursor=cursor
    )


def _as_json_text(value: Any) -> str | None:
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):  # e.g. an integer too long to print
        return None


def degraded_commit(commit: PollCommit, *, keep_cursor: bool) -> PollCommit:
    """The commit reduced to what surely stores, after PostgreSQL refused it: every alarm kept
    with its texts, its device time (the time we received it when that one cannot be stored)
    and its media; `raw` replaced by a note. Without `keep_cursor` the stored cursor stays as
    it was (a restart replays from there; the unique key absorbs the replay)."""
    now = datetime.now(UTC)
    alarms = [
        dataclasses.replace(
            alarm,
            source_id=_text(alarm.source_id, ID_LIMIT),
            vendor_event=_text(alarm.vendor_event, ID_LIMIT),
            description=_text(alarm.description, DESCRIPTION_LIMIT),
            camera_id=_optional_text(alarm.camera_id, ID_LIMIT),
            camera_name=_optional_text(alarm.camera_name, NAME_LIMIT),
            occurred_at=storable_time(alarm.occurred_at, now),
            raw={"unstorable": "the device's record could not be stored; see the daemon log"},
            group_of=_optional_text(alarm.group_of, ID_LIMIT),
        )
        for alarm in commit.alarms
    ]
    return dataclasses.replace(
        commit, alarms=alarms, cursor=commit.cursor if keep_cursor else None, problems=None
    )


def _text(value: object, limit: int) -> str:
    return clean_text(value if isinstance(value, str) else str(value), limit)


def _optional_text(value: object, limit: int) -> str | None:
    return None if value is None else _text(value, limit)


# PostgreSQL's timestamptz covers 4713 BC to 294276 AD, but the driver converts to UTC first:
# year 1 or 9999 with an offset overflows there.
EARLIEST_STORABLE = datetime(1, 1, 2, tzinfo=UTC)
LATEST_STORABLE = datetime(9999, 12, 30, tzinfo=UTC)


def storable_time(value: datetime, fallback: datetime) -> datetime:
    """`value` in UTC when the driver can send it, else `fallback`."""
    utc = storable_utc(value)
    return fallback if utc is None else utc


def storable_utc(value: datetime) -> datetime | None:
    """`value` in UTC, or None when the driver cannot send it to timestamptz."""
    try:
        utc = value.astimezone(UTC)
    except (OverflowError, ValueError):
        return None
    return utc if EARLIEST_STORABLE <= utc <= LATEST_STORABLE else None
