"""Videoloft parsing: long-poll framings, alert spellings, token lifetime."""

from __future__ import annotations

import base64
import json

import pytest

from cms_ingest.vendors.videoloft import StreamDecoder, normalize_alert, token_lifetime

RECORDS = [
    {"type": "alert", "data": {"uid": "1.2", "id": 1700000000, "startt": 1700000000000}},
    {"type": "liveSession", "data": {"uidd": "1.2", "status": "offline"}},
]


def framed(framing: str) -> str:
    texts = [json.dumps(record) for record in RECORDS]
    if framing == "sse":
        return "".join(f"data: {text}\n\n" for text in texts)
    if framing == "ndjson":
        return "".join(f"{text}\n" for text in texts)
    return "".join(texts)  # back to back


@pytest.mark.parametrize("framing", ["sse", "ndjson", "concat"])
@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_every_framing_in_any_chunking(framing: str, chunk: int) -> None:
    decoder = StreamDecoder()
    body = framed(framing)
    got = []
    for start in range(0, len(body), chunk):
        records, garbage = decoder.feed(body[start : start + chunk])
        got += records
        assert garbage == []
    assert got == RECORDS


def test_sse_comments_and_fields_are_skipped_and_garbage_reported() -> None:
    decoder = StreamDecoder()
    records, garbage = decoder.feed(": keep-alive\nevent: message\nid: 4\nnot json at all\n")
    assert records == [] and garbage == ["not json at all"]
    records, _ = decoder.feed('data: {"type": "alert", "data": {}}\n\n')
    assert records == [{"type": "alert", "data": {}}]


@pytest.mark.parametrize(
    ("item", "end_ms"),
    [
        ({"alert": 1540567030, "startt": 1540567030000, "endt": 1540567037000}, 1540567037000),
        ({"id": 1540567030, "startt": 1540567030000, "endtt": 1540567037000}, 1540567037000),
        ({"id": 1540567030, "startt": 1540567030000, "enddt": 1540567037000}, 1540567037000),
        ({"id": 1540567030, "startt": 1540567030, "end": 1540567037}, 1540567037000),  # seconds
        ({"alert": "1540567030", "startt": 1540567030000, "endt": None}, None),  # still going
    ],
)
def test_alert_spellings(item: dict[str, object], end_ms: int | None) -> None:
    alert = normalize_alert({**item, "uid": "12345.63", "type": "motion"})
    assert alert is not None
    assert (alert.uidd, alert.id, alert.start_ms, alert.end_ms) == (
        "12345.63",
        1540567030,
        1540567030000,
        end_ms,
    )


def test_alert_without_id_is_refused() -> None:
    assert normalize_alert({"uid": "1.2", "startt": 5}) is None
    assert normalize_alert({"id": 5}) is None  # no device either


def test_token_lifetime_is_read_from_the_token() -> None:
    head = base64.b64encode(b"12345:1700000000:1200:0").decode()
    assert token_lifetime(f"{head}*signature") == (1700000000.0, 1200.0)
    assert token_lifetime("garbage") is None


@pytest.mark.parametrize(
    "alert_id",
    [
        "²",  # "²".isdigit() is true, int("²") fails
        "9" * 5000,  # int() refuses over 4300 digits
        999_999_999_999_999_999,  # no startt: id * 1000 ms is past year 9999
    ],
)
def test_unusable_alert_ids_are_refused_not_raised(alert_id: object) -> None:
    assert normalize_alert({"id": alert_id, "uid": "1.2"}) is None


@pytest.mark.parametrize(
    ("start", "end"),
    [
        ("nan", "inf"),
        (float("nan"), float("-inf")),
        ("1e999", "-1e999"),
        pytest.param(10**400, 10**400, id="past-any-float"),
        (1e300, -1e300),  # a float, but no datetime
    ],
)
def test_unusable_times_fall_back_or_stay_unknown(start: object, end: object) -> None:
    alert = normalize_alert({"id": 1540567030, "uid": "1.2", "startt": start, "endt": end})
    assert alert is not None
    assert (alert.start_ms, alert.end_ms) == (1540567030000, None)  # start from the id


def test_token_lifetime_wants_ascii_digits() -> None:
    head = base64.b64encode("12345:²:1200:0".encode()).decode()
    assert token_lifetime(f"{head}*signature") is None


def test_stream_records_have_no_nan_or_infinity() -> None:
    decoder = StreamDecoder()
    records, garbage = decoder.feed('{"a": NaN, "b": Infinity, "c": -Infinity, "d": 1e999}\n')
    assert records == [{"a": None, "b": None, "c": None, "d": None}] and garbage == []


def test_stream_records_nested_too_deep_are_garbage() -> None:
    decoder = StreamDecoder()
    deep = json.dumps({"type": "alert", "data": json.loads("[" * 100 + "]" * 100)})
    records, garbage = decoder.feed(f"{deep}\n{json.dumps(RECORDS[0])}\n")
    assert records == [RECORDS[0]]
    assert len(garbage) == 1 and garbage[0].startswith('{"type": "alert"')


@pytest.mark.parametrize("framing", ["sse", "ndjson"])
def test_stream_record_too_deep_to_parse_is_garbage_not_recursion_error(framing: str) -> None:
    decoder = StreamDecoder()
    deep = "[" * 100_000
    good = json.dumps(RECORDS[0])
    body = f"data: {deep}\n\ndata: {good}\n\n" if framing == "sse" else f"{deep}\n{good}\n"
    got, garbage = [], []
    for start in range(0, len(body), 65536):  # as a long-poll delivers it: in chunks
        records, fragments = decoder.feed(body[start : start + 65536])
        got += records
        garbage += fragments
    assert got == [RECORDS[0]]
    assert garbage == ["[" * 200]
