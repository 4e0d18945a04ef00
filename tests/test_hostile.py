"""Hostile devices: the real daemon against simulators told to misbehave.

What a device says is data, never an instruction: URLs it hands back are followed only on the
configured site's own scheme, host and port (never through a redirect), file names never
derive from its strings, answers are size- and depth-capped before they are parsed, and
strings PostgreSQL cannot store (NUL, lone surrogates, NaN) are made storable. After each
hostile answer a normal alarm still lands, exactly once, and no poller ever dies.
"""

from __future__ import annotations

import asyncio
import json
import re
import tracemalloc
import zlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from structlog.testing import capture_logs
from yarl import URL

from cms_ingest.config import MediaConfig
from cms_ingest.metrics import Metrics
from cms_ingest.simulators.base import DeviceAnswer, ScriptedAnswer, static_answer
from cms_ingest.simulators.camtrace import CamTraceSimulator, CamTraceSite
from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite
from cms_ingest.vendors.davantis import MAX_JSON_BYTES
from tests.conftest import eventually
from tests.support import app_config, camtrace_site, davantis_site, running_daemon

MiB = 1024 * 1024


class Trap:
    """A plain HTTP server that only records who reached it: the daemon never must.

    It answers like a willing media server (a JPEG), so following a link to it would work."""

    def __init__(self) -> None:
        self.contacts: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self, host: str) -> None:
        self._server = await asyncio.start_server(self._serve, host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.read(4096), timeout=2)
        except (TimeoutError, ConnectionError):
            head = b""
        self.contacts.append(head or b"<connected>")
        body = b"\xff\xd8\xff\xe0stolen"
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def traps() -> AsyncIterator[tuple[Trap, Trap]]:
    """A foreign host (127.0.0.2) and another port of the site's own host (127.0.0.1)."""
    foreign, other_port = Trap(), Trap()
    await foreign.start("127.0.0.2")
    await other_port.start("127.0.0.1")
    yield foreign, other_port
    await foreign.stop()
    await other_port.stop()


def _polls(metrics: Metrics, site_id: str, outcome: str, vendor: str = "davantis") -> float:
    return metrics.sample("cms_ingest_polls_total", site_id=site_id, vendor=vendor, outcome=outcome)


def _bad_input(metrics: Metrics, what: str, vendor: str = "davantis") -> float:
    return metrics.sample("cms_ingest_bad_input_total", source=f"device:{vendor}", what=what)


def _poller_restarts(metrics: Metrics) -> float:
    return metrics.sample("cms_ingest_task_restarts_total", task="poller")


async def _source_ids(db: asyncpg.Connection, site_id: str) -> list[str]:
    rows = await db.fetch(
        "SELECT source_id FROM alarms WHERE site_id = $1 AND vendor <> 'cms' ORDER BY id",
        site_id,
    )
    return [row["source_id"] for row in rows]


async def _has_ids(db: asyncpg.Connection, site_id: str, ids: list[int]) -> bool:
    return set(map(str, ids)) <= set(await _source_ids(db, site_id))


async def _has_cursor(db: asyncpg.Connection, site_id: str) -> bool:
    value = await db.fetchval("SELECT cursor FROM site_state WHERE site_id = $1", site_id)
    return value is not None


async def _media_settled(db: asyncpg.Connection, site_id: str, n: int) -> bool:
    row = await db.fetchrow(
        "SELECT count(*) FILTER (WHERE state = 'pending') AS pending, count(*) AS total "
        "FROM alarm_media WHERE site_id = $1",
        site_id,
    )
    return row["pending"] == 0 and row["total"] >= n


async def _media(db: asyncpg.Connection, site_id: str) -> dict[tuple[str, str], Any]:
    rows = await db.fetch(
        "SELECT a.source_id, m.kind, m.state, m.path, m.last_error FROM alarm_media m "
        "JOIN alarms a ON a.id = m.alarm_id WHERE a.site_id = $1",
        site_id,
    )
    return {(row["source_id"], row["kind"]): row for row in rows}


def _json_answer(payload: Any) -> ScriptedAnswer:
    """Device JSON as Python's json writes it: NUL and lone surrogates as \\u escapes, NaN bare."""
    return static_answer(200, json.dumps(payload), {"Content-Type": "application/json"})


def _stream_answer(
    head: bytes, filler: bytes, total: int, sent: list[int], content_type: str
) -> ScriptedAnswer:
    """A chunked body of `total` bytes (no Content-Length); `sent` counts what went out."""

    async def answer(request: web.Request, device: DeviceAnswer) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)
        sent.append(0)
        chunk = filler * (MiB // len(filler))
        try:
            await response.write(head)
            while sent[-1] < total:
                await response.write(chunk)
                sent[-1] += len(chunk)
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the daemon hung up: exactly what it should do
        return response

    return answer


def _gzip_zeros(size: int) -> bytes:
    packer = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: the gzip format
    block = bytes(MiB)
    return b"".join([*(packer.compress(block) for _ in range(size // MiB)), packer.flush()])


def _files_under(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file()]


OUR_MEDIA_NAME = re.compile(
    r"[a-z0-9_-]+/\d{4}/\d{2}/\d{2}/\d+-(snapshot|thumbnail|video)\.(jpg|mp4)"
)


# --------------------------------------------------------------------------------- URLs


async def test_device_urls_and_redirects_never_leave_the_site(
    database_url: str, db: asyncpg.Connection, tmp_path: Path, traps: tuple[Trap, Trap]
) -> None:
    foreign, other_port = traps
    site = DavantisSite(media_delay=0)
    async with DavantisSimulator({"default": site}) as sim:
        port = URL(sim.url()).port
        config = app_config(
            database_url, tmp_path, [davantis_site("hx-url", sim.url(), media_deadline_s=2.5)]
        )
        async with running_daemon(config):
            await eventually(lambda: _has_cursor(db, "hx-url"), what="first cursor")
            # The next alarm poll is a redirect to the foreign host.
            stolen = f"http://127.0.0.2:{foreign.port}/alarms"
            sim.respond("GET", "/alarms", static_answer(302, headers={"Location": stolen}))
            # Media URLs on a foreign host, another port, another scheme of the same host.
            first = site.add_alarm(
                overrides={
                    "snapshot_absolute": f"http://127.0.0.2:{foreign.port}/steal.jpg",
                    "video_absolute": f"http://127.0.0.1:{other_port.port}/steal.mp4",
                    "supportvideo_absolute": f"https://127.0.0.1:{port}/steal.mp4",
                    "supportvideo_status": "ready",
                }
            )
            # A media download that redirects to the foreign host, every time.
            second = site.add_alarm()
            to_foreign = {"Location": f"http://127.0.0.2:{foreign.port}/x.jpg"}
            sim.respond(
                "GET",
                f"/alarms/{second.id}/snapshot",
                static_answer(302, headers=to_foreign),
                times=None,
            )
            third = site.add_alarm()  # a normal alarm after the hostile ones
            ids = [first.id, second.id, third.id]
            await eventually(lambda: _has_ids(db, "hx-url", ids), what="the three alarms")
            await eventually(
                lambda: _media_settled(db, "hx-url", 6), timeout=10, what="media settled"
            )
            media = await _media(db, "hx-url")
        assert await _source_ids(db, "hx-url") == [str(i) for i in ids]  # each exactly once
        assert media[(str(first.id), "snapshot")]["state"] == "ready"  # from the site itself
        assert media[(str(first.id), "video")]["state"] == "ready"
        refused = media[(str(second.id), "snapshot")]
        assert refused["state"] == "failed" and "302" in refused["last_error"]
        assert media[(str(second.id), "video")]["state"] == "ready"
        assert media[(str(third.id), "snapshot")]["state"] == "ready"
        assert site.requests[f"GET /alarms/{second.id}/snapshot"] >= 2  # retried, never followed
    assert foreign.contacts == [] and other_port.contacts == []
    for path in _files_under(tmp_path / "media"):
        assert b"stolen" not in path.read_bytes()


async def test_camtrace_paging_links_stay_on_the_site(
    database_url: str, db: asyncpg.Connection, tmp_path: Path, traps: tuple[Trap, Trap]
) -> None:
    """`Link: rel="next"` to a foreign host, another port, another scheme, or not even a URL
    (behind NAT the server names itself): nothing is requested there, the site is paged by
    offset on its configured origin, every alarm arrives once and no poll fails."""
    foreign, other_port = traps
    site = CamTraceSite(media_delay=0)
    async with CamTraceSimulator({"default": site}) as sim:
        port = URL(sim.url()).port
        config = app_config(
            database_url, tmp_path, [camtrace_site("hx-ct", sim.url(), options={"page_size": 5})]
        )
        with capture_logs() as logs:
            async with running_daemon(config) as daemon:
                await eventually(lambda: _has_cursor(db, "hx-ct"), what="first cursor")
                failed = _polls(daemon.metrics, "hx-ct", "error", "camtrace")
                expected: list[int] = []
                for link in (
                    f"<//127.0.0.2:{foreign.port}/api/v1.2/cameras/alarms?offset=5>",
                    f"<http://127.0.0.1:{other_port.port}/api/v1.2/cameras/alarms>",
                    f"<https://127.0.0.1:{port}/api/v1.2/cameras/alarms?offset=5>",
                    "<//[::1/api/v1.2/cameras/alarms>",  # not a URL at all
                    f"<//user:pw@127.0.0.1:{port}/api/v1.2/cameras/alarms>",  # credentials
                ):
                    page = "/api/v1.2/cameras/alarms"
                    sim.respond("GET", page, _with_link(f'{link}; rel="next"'), times=None)
                    expected += [alarm.id for alarm in site.add_alarms(7, recording=False)]
                    await eventually(
                        lambda ids=list(expected): _has_ids(db, "hx-ct", ids),
                        what=f"alarms with {link}",
                    )
                    sim.unscript("GET", page)
                assert _polls(daemon.metrics, "hx-ct", "error", "camtrace") == failed
        assert sorted(map(int, await _source_ids(db, "hx-ct"))) == expected  # each once
    assert foreign.contacts == [] and other_port.contacts == []
    assert _poller_restarts(daemon.metrics) == 0
    assert not [e for e in logs if e["event"] in ("task_crashed", "site_failing")]


def _with_link(link: str) -> ScriptedAnswer:
    async def answer(request: web.Request, device: DeviceAnswer) -> web.StreamResponse:
        response = await device()
        response.headers["Link"] = link
        return response

    return answer


async def test_site_http_refuses_what_a_device_cannot_make_us_send(
    traps: tuple[Trap, Trap],
) -> None:
    """Below the vendors: URLs that do not parse, carry credentials or leave the origin, and
    headers that would inject others, are refused before anything is sent (no crash)."""
    from cms_ingest.sitehttp import SiteHttp, UnsafeUrl, new_client_session

    foreign, site_port = traps
    base = f"http://127.0.0.1:{site_port.port}/t/x"
    async with new_client_session() as session:
        http = SiteHttp(session, base)
        for hostile in (
            "//[::1/alarms",
            f"//127.0.0.1:{site_port.port}:1/alarms",
            "//127.0.0.1:99999/alarms",
            f"//user:pw@127.0.0.1:{site_port.port}/alarms",
            f"http://127.0.0.2:{foreign.port}/alarms",
            f"https://127.0.0.1:{site_port.port}/alarms",
        ):
            with pytest.raises(UnsafeUrl) as refused:
                async with http.request("GET", hostile):
                    pass
            assert refused.value.sent is False
        with pytest.raises(UnsafeUrl, match="malformed request"):
            async with http.request("GET", "/a", headers={"Authorization": "Bearer x\r\nX: 1"}):
                pass
        # A ValueError of the caller's own, inside the block, stays the caller's.
        with pytest.raises(ValueError, match="mine"):
            async with http.request("GET", "/a"):
                raise ValueError("mine")
    assert foreign.contacts == []
    # Only the last, well-formed request reached the site (the refused header got as far as
    # a TCP connection, no byte of a request).
    requests = [contact for contact in site_port.contacts if contact != b"<connected>"]
    assert len(requests) == 1 and requests[0].startswith(b"GET /t/x/a HTTP/1.1")


# ------------------------------------------------------------------------------ strings


HOSTILE_CAMERAS = [
    {"id": "../../etc/passwd", "alias": "../../../etc/shadow"},
    {"id": "nul\x00cam", "alias": "Gate\x00'; DROP TABLE alarms; --"},
    {"id": "long", "alias": "L" * 100_000},
    {"id": "uni", "alias": "Caméra 北門 🚨"},
    {"id": "surrogate", "alias": "bad \ud800 half"},
]
# Alarm JSON fields written verbatim over a normal alarm; all of these keep a usable id.
HOSTILE_ALARMS: list[dict[str, Any]] = [
    {"idcamera": "../../etc/passwd", "description": "../../etc/passwd"},
    {"idcamera": "nul\x00cam", "description": "a\x00b"},
    {"idcamera": "long", "description": "D" * 100_000},
    {"idcamera": "uni", "description": "Intrusion 北門 🚨"},
    {"idcamera": "surrogate", "description": "\udfff"},
    {"idcamera": "x" * 100_000},
    {"started": "not\x00a date"},
    {"started": "0001-01-01T00:00:00+01:00"},  # before year 1 in UTC
    {"snapshot_status": "rec\x00ording", "video_status": ["\x00"]},
    {"score": float("nan"), "limit": float("inf"), "extra": {"k\x00": ["\x00", "\ud83d"]}},
]
# Alarm ids the daemon cannot use: reported as bad input, skipped, nothing else.
UNUSABLE_IDS: list[Any] = ["../../etc/passwd", "²", "9" * 5000, "1\x00", None]


async def test_hostile_strings_are_stored_as_data(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    site = DavantisSite(media_delay=0)
    async with DavantisSimulator({"default": site}) as sim:
        sim.respond("GET", "/cameras", _json_answer(HOSTILE_CAMERAS), times=None)
        # The device's first login hands out a token that would inject a header.
        sim.respond(
            "POST",
            "/oauth/token",
            _json_answer({"access_token": "x\r\nX-Injected: 1", "expires_in": 3600}),
        )
        config = app_config(
            database_url, tmp_path, [davantis_site("hx-str", sim.url(), media_deadline_s=3.0)]
        )
        with capture_logs() as logs:
            async with running_daemon(config) as daemon:
                await eventually(lambda: _has_cursor(db, "hx-str"), what="first cursor")
                added_at = datetime.now(UTC)
                stored = [site.add_alarm(overrides=fields).id for fields in HOSTILE_ALARMS]
                skipped = [site.add_alarm(overrides={"id": bad}).id for bad in UNUSABLE_IDS]
                after = site.add_alarm().id  # a normal alarm after the hostile ones
                await eventually(
                    lambda: _has_ids(db, "hx-str", [*stored, after]), what="every usable alarm"
                )
                ingested_at = datetime.now(UTC)
                await eventually(
                    lambda: _media_settled(db, "hx-str", 2 * (len(stored) + 1)),
                    timeout=15,
                    what="media settled",
                )
                rows = {
                    row["source_id"]: row
                    for row in await db.fetch(
                        "SELECT source_id, camera_id, camera_name, description, occurred_at,"
                        " raw::text AS raw FROM alarms WHERE site_id = 'hx-str'"
                    )
                }
                media = await _media(db, "hx-str")

    # Every usable alarm once, the unusable ones skipped (and counted), none lost after them.
    assert await _source_ids(db, "hx-str") == [str(i) for i in [*stored, after]]
    assert not {str(i) for i in skipped} & set(await _source_ids(db, "hx-str"))
    assert _bad_input(daemon.metrics, "alarm_without_id") >= len(UNUSABLE_IDS)
    assert _poller_restarts(daemon.metrics) == 0
    assert not [e for e in logs if e["event"] == "task_crashed"]
    injected = [e for e in logs if e["event"] == "site_failing" and e["site_id"] == "hx-str"]
    assert len(injected) == 1 and "not a valid bearer token" in injected[0]["error"]
    unusable_logs = [
        e for e in logs if e["event"] == "bad_device_input" and e["what"] == "alarm_without_id"
    ]
    assert len(unusable_logs) == 1  # logged once per site, however many polls saw them

    by_camera = {row["camera_id"]: row for row in rows.values()}
    assert by_camera["../../etc/passwd"]["camera_name"] == "../../../etc/shadow"  # just text
    assert rows[str(stored[0])]["description"] == "../../etc/passwd"
    assert by_camera["nul\ufffdcam"]["camera_name"] == "Gate\ufffd'; DROP TABLE alarms; --"
    assert rows[str(stored[1])]["description"] == "a\ufffdb"
    assert by_camera["uni"]["camera_name"] == "Caméra 北門 🚨"
    assert rows[str(stored[3])]["description"] == "Intrusion 北門 🚨"
    assert by_camera["surrogate"]["camera_name"] == "bad \ufffd half"
    assert rows[str(stored[4])]["description"] == "\ufffd"
    long_name, long_text = by_camera["long"]["camera_name"], rows[str(stored[2])]["description"]
    assert long_name.startswith("LLLL") and len(long_name) <= 1024
    assert long_text.startswith("DDDD") and len(long_text) <= 4096
    long_camera = rows[str(stored[5])]["camera_id"]
    assert long_camera.startswith("xxxx") and len(long_camera) <= 1024
    for row in rows.values():
        assert "NaN" not in row["raw"]
    # An unreadable `started` (NUL inside; before year 1 in UTC): the time it was polled,
    # reported as bad input.
    for bad_date in (stored[6], stored[7]):
        occurred_at = rows[str(bad_date)]["occurred_at"]
        assert added_at <= occurred_at <= ingested_at, (added_at, occurred_at, ingested_at)
    assert _bad_input(daemon.metrics, "bad_started") >= 2
    assert json.loads(rows[str(stored[9])]["raw"])["score"] is None
    assert json.loads(rows[str(stored[0])]["raw"])["idcamera"] == "../../etc/passwd"

    # Media: garbled statuses are "not ready" until the deadline; every other alarm's media is
    # fetched, and every file is ours, under data_dir/media, named by our ids only.
    garbled = str(stored[8])
    expected = {(str(i), kind): "ready" for i in [*stored, after] for kind in ("snapshot", "video")}
    expected[(garbled, "snapshot")] = expected[(garbled, "video")] = "failed"
    assert {key: row["state"] for key, row in media.items()} == expected
    assert "not ready" in media[(garbled, "snapshot")]["last_error"]
    assert "not ready" in media[(garbled, "video")]["last_error"]
    ready = [row["path"] for row in media.values() if row["state"] == "ready"]
    for path in ready:
        assert OUR_MEDIA_NAME.fullmatch(path), path
    media_root = tmp_path / "media"
    for path in _files_under(media_root):
        assert OUR_MEDIA_NAME.fullmatch(str(path.relative_to(media_root))), path
    assert not [p for p in tmp_path.rglob("*") if p.name in ("passwd", "shadow", "etc")]


def _rewrite_alarms(changes: dict[int, dict[str, Any]]) -> ScriptedAnswer:
    """The device's CamTrace alarm page, with some alarms' fields replaced verbatim."""

    async def answer(request: web.Request, device: DeviceAnswer) -> web.StreamResponse:
        response = await device()
        if response.status != 200 or not isinstance(response, web.Response):
            return response
        assert isinstance(response.body, bytes)
        payload = json.loads(response.body)
        payload["alarms"] = [{**a, **changes.get(a["id"], {})} for a in payload["alarms"]]
        rewritten = web.Response(body=json.dumps(payload), content_type="application/json")
        if "Link" in response.headers:
            rewritten.headers["Link"] = response.headers["Link"]
        return rewritten

    return answer


async def test_camtrace_hostile_alarm_fields(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    site = CamTraceSite(media_delay=0)
    async with CamTraceSimulator({"default": site}) as sim:
        config = app_config(database_url, tmp_path, [camtrace_site("hx-ctstr", sim.url())])
        async with running_daemon(config) as daemon:
            await eventually(lambda: _has_cursor(db, "hx-ctstr"), what="first cursor")
            changes: dict[int, dict[str, Any]] = {}
            sim.respond("GET", "/api/v1.2/cameras/alarms", _rewrite_alarms(changes), times=None)
            hostile, superscript, huge_id, after = site.add_alarms(4, recording=False)
            changes[hostile.id] = {
                "cameraId": "../../etc/passwd\x00",
                "description": "MOTION Alarm \x00 北門 \ud800",
                "time": "0001-01-01T00:00:00+01:00",
                "snapshot": "/api/v1.2/../../../etc/passwd\x00",
                "extra": [float("nan"), {"\x00": "\x00" * 10_000}],
            }
            changes[superscript.id] = {"id": "²"}
            changes[huge_id.id] = {"id": "9" * 5000}
            await eventually(
                lambda: _has_ids(db, "hx-ctstr", [hostile.id, after.id]), what="usable alarms"
            )
            row = await db.fetchrow(
                "SELECT camera_id, description, vendor_event, raw::text AS raw FROM alarms"
                " WHERE site_id = 'hx-ctstr' AND source_id = $1",
                str(hostile.id),
            )
        assert await _source_ids(db, "hx-ctstr") == [str(hostile.id), str(after.id)]
    assert row["camera_id"] == "../../etc/passwd\ufffd"
    assert row["description"] == "MOTION Alarm \ufffd 北門 \ufffd"
    assert row["vendor_event"] == "MOTION"
    assert "NaN" not in row["raw"]
    assert _poller_restarts(daemon.metrics) == 0
    for path in _files_under(tmp_path / "media"):
        assert OUR_MEDIA_NAME.fullmatch(str(path.relative_to(tmp_path / "media"))), path


# ------------------------------------------------------------------------------- bodies


async def test_huge_and_deep_json_answers_are_refused_and_polling_goes_on(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    site = DavantisSite(media_delay=0)
    async with DavantisSimulator({"default": site}) as sim:
        config = app_config(database_url, tmp_path, [davantis_site("hx-body", sim.url())])
        with capture_logs() as logs:
            async with running_daemon(config) as daemon:
                await eventually(lambda: _has_cursor(db, "hx-body"), what="first cursor")
                expected: list[int] = []
                sent: list[int] = []
                offered = 4 * MAX_JSON_BYTES
                huge = _stream_answer(
                    b"[", b'{"id": 1}, ' * 1000, offered, sent, "application/json"
                )
                deep = static_answer(200, b"[" * 100_000, {"Content-Type": "application/json"})
                bomb = static_answer(
                    200,
                    _gzip_zeros(8 * MAX_JSON_BYTES),  # ~130 kB on the wire, 128 MiB inflated
                    {"Content-Type": "application/json", "Content-Encoding": "gzip"},
                )
                nested = {"id": 1, "deep": json.loads("[" * 100 + "]" * 100)}
                deep_but_parseable = _json_answer([nested])
                # The simulator runs in this process too: the peak counts its buffers as well.
                tracing = tracemalloc.is_tracing()
                if not tracing:
                    tracemalloc.start()
                tracemalloc.reset_peak()
                baseline = tracemalloc.get_traced_memory()[0]
                for name, answer in (
                    ("huge", huge),
                    ("gzip bomb", bomb),
                    ("deep", deep),
                    ("100 levels", deep_but_parseable),
                ):
                    bad = _polls(daemon.metrics, "hx-body", "bad_response")
                    sim.respond("GET", "/alarms", answer)
                    # No media: only polls ask for /alarms, so the poll meets the answer.
                    expected.append(site.add_alarm(snapshot="unavailable", video="unavailable").id)
                    await eventually(
                        lambda ids=list(expected): _has_ids(db, "hx-body", ids),
                        what=f"the alarm after the {name} answer",
                    )
                    assert _polls(daemon.metrics, "hx-body", "bad_response") > bad, name
                growth = tracemalloc.get_traced_memory()[1] - baseline
                if not tracing:
                    tracemalloc.stop()
        assert await _source_ids(db, "hx-body") == [str(i) for i in expected]  # each once
    # The huge answer was abandoned at the cap: the daemon stopped reading it early.
    assert len(sent) == 1 and sent[0] < offered // 2, sent
    print(f"peak Python allocations over the hostile answers: {growth / MiB:.1f} MiB")
    assert growth < 2 * MAX_JSON_BYTES + 16 * MiB, growth
    assert _poller_restarts(daemon.metrics) == 0
    assert not [e for e in logs if e["event"] == "task_crashed"]
    reported = [e for e in logs if e["event"] == "bad_device_input" and e["site_id"] == "hx-body"]
    kinds = sorted(e["what"] for e in reported)
    assert kinds == ["oversized_answer", "unreadable_json"], kinds  # each kind logged once
    # Counted every time: two unreadable (deep) answers, two oversized (huge, bomb).
    assert _bad_input(daemon.metrics, "unreadable_json") >= 2
    assert _bad_input(daemon.metrics, "oversized_answer") >= 2


async def test_media_body_over_the_cap_is_abandoned(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """A video without Content-Length that never ends: cut at `media.max_bytes`, no file."""
    site = DavantisSite(media_delay=0)
    async with DavantisSimulator({"default": site}) as sim:
        config = app_config(
            database_url,
            tmp_path,
            [davantis_site("hx-media", sim.url())],
            media=MediaConfig(max_bytes=2 * MiB, retry_base_s=0.2, retry_max_s=0.5),
        )
        async with running_daemon(config):
            await eventually(lambda: _has_cursor(db, "hx-media"), what="first cursor")
            hostile = site.add_alarm()
            sent: list[int] = []
            mp4_head = b"\x00\x00\x00\x18ftypmp42"
            sim.respond(
                "GET",
                f"/alarms/{hostile.id}/video",
                _stream_answer(mp4_head, b"\x00", 512 * MiB, sent, "video/mp4"),
            )
            after = site.add_alarm()
            ids = [hostile.id, after.id]
            await eventually(lambda: _has_ids(db, "hx-media", ids), what="both alarms")
            await eventually(lambda: _media_settled(db, "hx-media", 4), what="media settled")
            media = await _media(db, "hx-media")
        assert await _source_ids(db, "hx-media") == [str(i) for i in ids]
    refused = media[(str(hostile.id), "video")]
    assert refused["state"] == "failed" and "cap" in refused["last_error"]
    assert refused["path"] is None
    assert media[(str(hostile.id), "snapshot")]["state"] == "ready"
    assert media[(str(after.id), "video")]["state"] == "ready"
    assert len(sent) == 1 and sent[0] < 64 * MiB, sent  # hung up near the cap, not at 512 MiB
    assert not _files_under(tmp_path / "media" / ".partial")
    videos = [p for p in _files_under(tmp_path / "media") if p.name.endswith("-video.mp4")]
    assert len(videos) == 1 and videos[0].stat().st_size < MiB
