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
