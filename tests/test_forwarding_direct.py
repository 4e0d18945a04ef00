"""The DC-09 forwarder against pysiaalarm's receiver, over the in-memory outbox (fast).

Every test commits alarms as the writer does (`commit_polls`, which queues their deliveries)
and checks what the receiver accepted: each alarm once, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cms_ingest.config.forwarders import ForwarderConfig
from cms_ingest.db.memory import MemoryStorage
from cms_ingest.domain import Alarm, CommitTerms, Delivery, EventType, PollCommit, RouteFilter
from cms_ingest.forwarding import dc09
from cms_ingest.metrics import Metrics
from cms_ingest.runtime.forwarder import (
    ForwarderSender,
    build_delivery_message,
    build_test_message,
    send_test,
)
from tests.conftest import eventually
from tests.sia_receiver import receiver_clock_skewed, sia_receiver
from tests.support import free_port, running

KEY_TEXT = "0123456789ABCDEF"  # pysiaalarm uses a key's characters as its bytes: AES-128


def forwarder(port: int, **overrides: Any) -> ForwarderConfig:
    values: dict[str, Any] = {
        "name": "cms",
        "primary": f"127.0.0.1:{port}",
        "account": "1234",
        "receiver": "1",
        "line": "2",
        "ack_timeout_s": 1.0,
        "connect_timeout_s": 0.5,
        "retry_base_s": 0.05,
        "retry_max_s": 0.2,
    }
    values.update(overrides)
    return ForwarderConfig(**values)


def one_sender(
    port: int, *, metrics: Metrics | None = None, **overrides: Any
) -> tuple[MemoryStorage, ForwarderSender]:
    """The in-memory outbox routed to one forwarder (`forwarder(port, **overrides)`) and the
    daemon's sender for it."""
    config = forwarder(port, **overrides)
    storage = MemoryStorage(routes=(config.route(),))
    sender = ForwarderSender(config, storage, owner="d1", lease_ttl_s=3.0, metrics=metrics)
    return storage, sender


def alarms(
    site_id: str, n: int, start: int = 0, kind: EventType = EventType.INTRUSION
) -> list[Alarm]:
    now = datetime.now(UTC)
    return [
        Alarm(
            site_id=site_id,
            vendor="davantis",
            source_id=str(start + i),
            event_type=kind,
            vendor_event="x",
            description=f"alarm {start + i}",
            occurred_at=now - timedelta(seconds=1),
            camera_id=str(1 + i % 4),
            camera_name=f"cam {1 + i % 4}",
        )
        for i in range(n)
    ]


async def commit(storage: MemoryStorage, batch: Sequence[Alarm]) -> list[int]:
    by_site: dict[str, list[Alarm]] = {}
    for alarm in batch:
        by_site.setdefault(alarm.site_id, []).append(alarm)
    commits = [PollCommit(site, "davantis", list(items), None) for site, items in by_site.items()]
    terms = {site: CommitTerms(media_deadline_s=60) for site in by_site}
    result = await storage.commit_polls(commits, terms)
    return [row.id for row in result.inserted]


def delivered(storage: MemoryStorage) -> list[int]:
    return sorted(r.alarm_id for r in storage.deliveries.values() if r.state == "delivered")


@pytest.mark.parametrize(
    ("message_format", "key"),
    [
        (dc09.MessageFormat.SIA_DCS, None),
        (dc09.MessageFormat.ADM_CID, None),
        (dc09.MessageFormat.SIA_DCS, KEY_TEXT),
        (dc09.MessageFormat.ADM_CID, KEY_TEXT),
    ],
    ids=["sia-plain", "cid-plain", "sia-aes", "cid-aes"],
)
async def test_a_stream_arrives_once_and_in_order(
    message_format: dc09.MessageFormat, key: str | None
) -> None:
    port = free_port()
    extra: dict[str, Any] = {"format": message_format}
    if key is not None:
        extra |= {"aes_key": key, "aes_key_encoding": "text"}
    storage, sender = one_sender(port, **extra)
    async with sia_receiver(port, [("1234", key)]) as receiver, running(sender.run):
        ids = await commit(storage, alarms("s1", 30))
        sender.wake()
        await eventually(lambda: len(delivered(storage)) == 30, timeout=10, what="30 delivered")
    assert receiver.alarm_ids() == ids
    assert receiver.repeats() == 0
    first = receiver.accepted()[0]
    assert first.code == "BA"  # intrusion: SIA BA, Contact ID 1130 (pysiaalarm maps it to BA)
    assert first.zone is not None
    assert int(first.zone) == 1  # camera "1" is zone 1
    rows = list(storage.deliveries.values())
    assert sorted(r.seq for r in rows if r.seq is not None) == list(range(1, 31))


async def test_udp_delivers_in_order_too() -> None:
    port = free_port()
    storage, sender = one_sender(
        port, transport="udp", format="ADM-CID", aes_key=KEY_TEXT, aes_key_encoding="text"
    )
    async with running(sender.run):
        ids = await commit(storage, alarms("s1", 3))
        sender.wake()
        await eventually(lambda: sender.state.link_up is False, what="no receiver yet")
        async with sia_receiver(port, [("1234", KEY_TEXT)], udp=True) as receiver:
            ids += await commit(storage, alarms("s1", 12, 3))
            sender.wake()
            await eventually(lambda: len(delivered(storage)) == 15, timeout=10, what="15 delivered")
    assert receiver.alarm_ids() == ids
    assert receiver.repeats() == 0


@pytest.mark.parametrize("message_format", list(dc09.MessageFormat)[:2])
async def test_every_default_code_is_understood_by_the_receiver(
    message_format: dc09.MessageFormat,
) -> None:
    """One alarm of every event type (comm_lost and comm_restored too, which the poller's
    supervision commits like any alarm): none refused (DUH), each with its table code."""
    from pysiaalarm.data.adm_mapping import ADM_MAPPING

    from cms_ingest.forwarding.codes import DEFAULT_CODES

    port = free_port()
    storage, sender = one_sender(port, format=message_format)
    kinds = list(EventType)
    async with sia_receiver(port, [("1234", None)]) as receiver, running(sender.run):
        for i, kind in enumerate(kinds):
            await commit(storage, alarms("s1", 1, i, kind))
        sender.wake()
        await eventually(lambda: len(delivered(storage)) == len(kinds), what="all delivered")
    expected = []
    for kind in kinds:
        code = DEFAULT_CODES[kind]
        if message_format is dc09.MessageFormat.SIA_DCS:
            expected.append(code.sia)
        else:  # pysiaalarm turns a Contact ID event into the SIA code it maps to
            expected.append(ADM_MAPPING[code.cid[1:]][code.cid[0]])
    assert [m.code for m in receiver.accepted()] == expected


async def test_only_the_forwarders_sites_and_event_types_are_queued() -> None:
    route = RouteFilter("cms", frozenset({"s1"}), frozenset({EventType.INTRUSION}))
    storage = MemoryStorage(routes=(route, RouteFilter("all")))
    await commit(storage, alarms("s1", 2) + alarms("s2", 2) + alarms("s1", 2, 10, EventType.MOTION))
    queued = {
        (
            r.forwarder,
            storage.alarms[r.alarm_id].alarm.source_id,
            storage.alarms[r.alarm_id].alarm.site_id,
        )
        for r in storage.deliveries.values()
    }
    assert {q for q in queued if q[0] == "cms"} == {("cms", "0", "s1"), ("cms", "1", "s1")}
    assert len([q for q in queued if q[0] == "all"]) == 6
    await commit(storage, alarms("s1", 2))  # a replay: no new alarm, no new delivery
    assert len(storage.deliveries) == 8


async def test_a_receiver_down_for_a_while_gets_everything_once_in_order_after() -> None:
    port = free_port()
    storage, sender = one_sender(port)
    async with running(sender.run):
        async with sia_receiver(port, [("1234", None)]) as receiver:
            ids = await commit(storage, alarms("s1", 5))
            sender.wake()
            await eventually(lambda: len(delivered(storage)) == 5, what="5 delivered")
        # the receiver is down: alarms keep coming
        ids += await commit(storage, alarms("s1", 10, 5))
        sender.wake()
        await eventually(lambda: sender.state.link_up is False, what="link seen down")
        await asyncio.sleep(0.5)
        assert len(delivered(storage)) == 5
        receiver.raw.clear()
        async with sia_receiver(port, [("1234", None)]) as again:
            await eventually(lambda: len(delivered(storage)) == 15, timeout=10, what="15 delivered")
    assert receiver.alarm_ids() == []
    assert again.alarm_ids() == ids[5:]
    assert sender.state.link_up is True


async def test_a_receiver_stopped_for_30_s_gets_every_alarm_of_the_outage_once_in_order() -> None:
    """The issue's case to the letter: the receiver stopped for 30 s while an alarm a second
    keeps coming, then started again."""
    port = free_port()
    storage, sender = one_sender(port, retry_base_s=0.5, retry_max_s=2.0)
    async with running(sender.run):
        async with sia_receiver(port, [("1234", None)]) as before:
            ids = await commit(storage, alarms("s1", 3))
            sender.wake()
            await eventually(lambda: len(delivered(storage)) == 3, what="3 delivered")
        for second in range(30):  # stopped: an alarm a second for 30 s
            ids += await commit(storage, alarms("s1", 1, 3 + second))
            sender.wake()
            await asyncio.sleep(1.0)
        assert len(delivered(storage)) == 3
        assert sender.state.link_up is False
        async with sia_receiver(port, [("1234", None)]) as after:
            await eventually(lambda: len(delivered(storage)) == 33, timeout=15, what="33 delivered")
    assert before.alarm_ids() == ids[:3]
    assert after.alarm_ids() == ids[3:]
    assert before.repeats() == after.repeats() == 0


async def test_a_nak_with_the_receivers_time_resynchronises_the_clock() -> None:
    port = free_port()
    metrics = Metrics()
    storage, sender = one_sender(port, metrics=metrics)
    with receiver_clock_skewed(300.0):
        async with sia_receiver(port, [("1234", None)]) as receiver, running(sender.run):
            ids = await commit(storage, alarms("s1", 5))
            sender.wake()
            await eventually(lambda: len(delivered(storage)) == 5, what="5 delivered")
    assert receiver.alarm_ids() == ids
    assert 298 <= sender.state.clock_offset_s <= 302
    assert metrics.sample("cms_ingest_forward_messages_total", forwarder="cms", outcome="nak") == 1


async def test_the_backup_takes_over_when_the_primary_is_down() -> None:
    primary, backup = free_port(), free_port()  # nothing listens on the primary
    storage, sender = one_sender(primary, backup=f"127.0.0.1:{backup}", attempts_per_path=2)
    async with sia_receiver(backup, [("1234", None)]) as receiver, running(sender.run):
        ids = await commit(storage, alarms("s1", 10))
        sender.wake()
        await eventually(lambda: len(delivered(storage)) == 10, what="10 delivered")
    assert receiver.alarm_ids() == ids
    assert sender.state.path == "backup"


async def test_a_duh_fails_the_delivery_with_the_reason_and_the_stream_goes_on() -> None:
    port = free_port()
    # "QQ" is no SIA code: pysiaalarm answers DUH.
    storage, sender = one_sender(port, codes={"motion": {"sia": "QQ"}})
    async with sia_receiver(port, [("1234", None)]) as receiver, running(sender.run):
        ids = await commit(
            storage, alarms("s1", 1) + alarms("s1", 1, 1, EventType.MOTION) + alarms("s1", 1, 2)
        )
        sender.wake()
        await eventually(
            lambda: all(r.state != "pending" for r in storage.deliveries.values()), what="settled"
        )
    states = {storage.alarms[r.alarm_id].alarm.source_id: r for r in storage.deliveries.values()}
    assert states["1"].state == "failed"
    assert "DUH" in (states["1"].last_error or "")
    assert [states["0"].state, states["2"].state] == ["delivered", "delivered"]
    assert receiver.alarm_ids() == [ids[0], ids[2]]


async def test_two_daemons_one_sender() -> None:
    port = free_port()
    config = forwarder(port)
    storage = MemoryStorage(routes=(config.route(),))
    first = ForwarderSender(config, storage, owner="d1", lease_ttl_s=3.0)
    second = ForwarderSender(config, storage, owner="d2", lease_ttl_s=3.0)
    async with (
        sia_receiver(port, [("1234", None)]) as receiver,
        running(first.run),
        running(second.run),
    ):
        ids = await commit(storage, alarms("s1", 40))
        first.wake()
        second.wake()
        await eventually(lambda: len(delivered(storage)) == 40, timeout=10, what="40 delivered")
        assert [first.state.holding, second.state.holding].count(True) == 1
    assert receiver.alarm_ids() == ids
    assert receiver.repeats() == 0


async def test_forward_test_sends_a_test_report_and_returns_the_answer() -> None:
    port = free_port()
    for message_format in (dc09.MessageFormat.SIA_DCS, dc09.MessageFormat.ADM_CID):
        config = forwarder(port, format=message_format, aes_key=KEY_TEXT, aes_key_encoding="text")
        async with sia_receiver(port, [("1234", KEY_TEXT)]) as receiver:
            address, answer = await send_test(config)
        assert address == f"127.0.0.1:{port}"
        assert answer.kind is dc09.AnswerKind.ACK
        assert answer.encrypted
        assert [m.code for m in receiver.raw] == ["RX"]


async def test_supervision_sends_null_messages_when_idle() -> None:
    port = free_port()
    metrics = Metrics()
    _, sender = one_sender(port, supervision_interval_s=0.2, metrics=metrics)
    async with sia_receiver(port, [("1234", None)]), running(sender.run):
        await eventually(
            lambda: (
                metrics.sample("cms_ingest_forward_messages_total", forwarder="cms", outcome="ack")
                >= 1
            ),
            what="a NULL message ACKed",
        )
    assert sender.state.link_up is True


async def test_a_database_outage_mid_stream_loses_nothing_and_repeats_nothing() -> None:
    port = free_port()
    storage, sender = one_sender(port)
    async with sia_receiver(port, [("1234", None)]) as receiver, running(sender.run):
        ids = await commit(storage, alarms("s1", 40))
        sender.wake()
        await eventually(lambda: len(delivered(storage)) >= 5, what="5 delivered")
        storage.unavailable = True  # ACKed messages may now fail to be marked: sent again
        await asyncio.sleep(0.5)
        storage.unavailable = False
        await eventually(lambda: len(delivered(storage)) == 40, timeout=10, what="40 delivered")
    assert receiver.alarm_ids() == ids
    assert receiver.repeats() <= 1  # the one ACKed as the database went away, dropped by seq


async def test_commit_to_ack_latency_over_postgresql(database_url: str) -> None:
    """Figures: alarms committed one by one (~60/s) through the PostgreSQL outbox."""
    from cms_ingest.db.engine import create_engine
    from cms_ingest.db.outbox import OutboxStore
    from cms_ingest.db.store import Store

    port = free_port()
    config = forwarder(port)
    engine = create_engine(database_url, pool_size=3)
    store = Store(engine, routes=[config.route()])
    outbox = OutboxStore(engine)
    metrics = Metrics()
    sender = ForwarderSender(config, outbox, owner="d1", lease_ttl_s=3.0, metrics=metrics)
    try:
        async with sia_receiver(port, [("1234", None)]) as receiver, running(sender.run):
            for i in range(100):
                batch = alarms("s1", 1, i)
                await store.commit_polls(
                    [PollCommit("s1", "davantis", batch, None)],
                    {"s1": CommitTerms(media_deadline_s=60)},
                )
                sender.wake()  # what the daemon's LISTEN on cms_deliveries does
                await asyncio.sleep(0.01)

            async def all_delivered() -> bool:
                rows = await outbox.delivery_rows("cms")
                return sum(r["state"] == "delivered" for r in rows) == 100

            await eventually(all_delivered, timeout=20, what="100 delivered")
        rows = await outbox.delivery_rows("cms")
        async with engine.connect() as connection:
            from sqlalchemy import text

            latencies = sorted(
                float(r[0])
                for r in await connection.execute(
                    text(
                        "SELECT extract(epoch FROM d.finished_at - a.received_at) "
                        "FROM deliveries d JOIN alarms a ON a.id = d.alarm_id"
                    )
                )
            )
    finally:
        await engine.dispose()
    assert len(receiver.alarm_ids()) == 100
    assert sum(r["attempts"] for r in rows) == 100  # one message each
    p50, p99 = latencies[len(latencies) // 2], latencies[int(0.99 * (len(latencies) - 1))]
    print(f"FIGURES pg commit->ACK p50={p50 * 1000:.1f} ms p99={p99 * 1000:.1f} ms n=100")
    assert p99 < 2.0


async def test_database_connections_cut_mid_stream_lose_and_repeat_nothing(
    database_url: str,
) -> None:
    """Every connection to the database killed every 250 ms while the sender works (what a
    database restart looks like from here): it waits, goes on, nothing lost or repeated."""
    import asyncpg

    from cms_ingest.db.engine import create_engine, plain_url
    from cms_ingest.db.outbox import OutboxStore
    from cms_ingest.db.store import Store

    port = free_port()
    config = forwarder(port)
    engine = create_engine(database_url, pool_size=3)
    store = Store(engine, routes=[config.route()])
    outbox = OutboxStore(engine)
    sender = ForwarderSender(config, outbox, owner="d1", lease_ttl_s=3.0)
    admin = await asyncpg.connect(plain_url(database_url))
    await _commit_retrying(store, alarms("s1", 60))

    async def delivered_count() -> int:
        return int(
            await admin.fetchval("SELECT count(*) FROM deliveries WHERE state = 'delivered'")
        )

    cuts = 0

    async def cut_everything(stop: asyncio.Event) -> None:
        nonlocal cuts
        cutter = await asyncpg.connect(plain_url(database_url))
        try:
            await _cut_until(cutter, stop)
        finally:
            await cutter.close()

    async def _cut_until(cutter: asyncpg.Connection, stop: asyncio.Event) -> None:
        nonlocal cuts
        while not stop.is_set():
            cuts += int(
                await cutter.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> ALL($1::int[])",
                    [cutter.get_server_pid(), admin.get_server_pid()],
                )
            )
            await asyncio.sleep(0.25)

    try:
        async with sia_receiver(port, [("1234", None)]) as receiver, running(sender.run):
            await eventually(lambda: _at_least(delivered_count, 5), what="5 sent")
            async with running(cut_everything):
                for start in range(60, 120, 5):  # alarms keep coming while it happens
                    more = alarms("s1", 5, start)
                    await _commit_retrying(store, more)
                    await asyncio.sleep(0.1)
                await eventually(lambda: cuts >= 4, timeout=20, what="4 rounds of cuts")
            await eventually(lambda: _at_least(delivered_count, 120), timeout=15, what="all 120")
        ids = [r["id"] for r in await admin.fetch("SELECT id FROM alarms ORDER BY id")]
    finally:
        await admin.close()
        await engine.dispose()
    assert cuts >= 4
    assert receiver.alarm_ids() == ids  # repeats (ACKed, then the mark cut off) dropped by seq


async def _commit_retrying(store: Any, batch: list[Alarm]) -> None:
    from cms_ingest.db.errors import DatabaseUnavailable

    for _ in range(50):
        try:
            await store.commit_polls(
                [PollCommit("s1", "davantis", batch, None)],
                {"s1": CommitTerms(media_deadline_s=60)},
            )
            return
        except DatabaseUnavailable:
            await asyncio.sleep(0.05)
    raise AssertionError("could not commit")


async def _at_least(count: Any, n: int) -> bool:
    return bool(await count() >= n)


async def test_two_daemons_over_postgresql_hand_the_forwarder_over(database_url: str) -> None:
    """Two senders (two daemons) on one database: one sends; when it stops, the other takes
    the forwarder over; every alarm reaches the receiver once, in order."""
    from cms_ingest.db.engine import create_engine
    from cms_ingest.db.outbox import OutboxStore
    from cms_ingest.db.store import Store

    port = free_port()
    config = forwarder(port)
    engines = [create_engine(database_url, pool_size=2) for _ in range(2)]
    store = Store(engines[0], routes=[config.route()])
    senders = [
        ForwarderSender(config, OutboxStore(engine), owner=f"d{i}", lease_ttl_s=3.0)
        for i, engine in enumerate(engines)
    ]
    try:
        async with sia_receiver(port, [("1234", None)]) as receiver:
            stop_first = asyncio.Event()
            first = asyncio.create_task(senders[0].run(stop_first))
            await eventually(lambda: senders[0].state.holding, what="the first holds it")
            async with running(senders[1].run):
                await _commit_retrying(store, alarms("s1", 20))
                for sender in senders:
                    sender.wake()
                await eventually(lambda: len(receiver.raw) >= 20, what="20 delivered")
                assert not senders[1].state.holding
                stop_first.set()  # it releases the lease as it stops: the other takes over
                await asyncio.wait_for(first, timeout=10)
                await eventually(lambda: senders[1].state.holding, what="taken over")
                await _commit_retrying(store, alarms("s1", 20, 20))
                senders[1].wake()
                await eventually(lambda: len(receiver.raw) >= 40, what="40 delivered")
        rows = await OutboxStore(engines[0]).delivery_rows("cms")
    finally:
        for engine in engines:
            await engine.dispose()
    assert [r["state"] for r in rows] == ["delivered"] * 40
    assert receiver.alarm_ids() == [r["alarm_id"] for r in rows]
    assert receiver.repeats() == 0


# ---------------------------------------------------------------------- the protocol itself


def test_crc16_is_crc16_arc() -> None:
    assert dc09.crc16(b"123456789") == 0xBB3D  # the catalogue's check value for CRC-16/ARC


def test_an_encrypted_message_decrypts_to_pad_bar_and_data() -> None:
    key = bytes.fromhex("00112233445566778899aabbccddeeff")
    sent_at = datetime(2026, 12, 3, 12, 0, 5, tzinfo=UTC)
    frame = dc09.build_message(
        message_format=dc09.MessageFormat.SIA_DCS,
        sequence=42,
        receiver="1",
        line="2",
        account="1234",
        event=dc09.SiaEvent("BA", 3),
        extended=[("V", "7")],
        sent_at=sent_at,
        key=key,
    )
    body = dc09.unframe(frame)
    assert body.startswith('"*SIA-DCS"0042R1L2#1234[')
    plain = dc09.decrypt(key, body.split("[", 1)[1])
    assert len(plain) % 16 == 0
    assert plain.split("|", 1)[1] == "#1234|Nri1/BA003][V7]_12:00:05,12-03-2026"


def test_answers_are_checked_and_read() -> None:
    body = b'"NAK"0000R1L2A0[]_12:00:00,12-03-2026'
    frame = b"\n" + f"{dc09.crc16(body):04X}{len(body):04X}".encode() + body + b"\r"
    answer = dc09.parse_answer(frame)
    assert answer.kind is dc09.AnswerKind.NAK
    assert answer.timestamp == datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    with pytest.raises(dc09.BadAnswer):
        dc09.parse_answer(frame.replace(b"NAK", b"NAQ"))
    reader = dc09.FrameReader()
    assert reader.feed(b"junk" + frame[:10]) == []
    assert reader.feed(frame[10:] + frame) == [frame, frame]


def test_keys_are_checked_without_quoting_them() -> None:
    assert len(dc09.parse_key("00" * 32, "hex")) == 32
    with pytest.raises(ValueError, match="128, 192 or 256") as caught:
        dc09.parse_key("abc123", "hex")
    assert "abc123" not in str(caught.value)


def test_the_test_message_is_a_manual_test_report() -> None:
    config = forwarder(1, format="ADM-CID")
    body = dc09.unframe(build_test_message(config, datetime(2026, 1, 1, tzinfo=UTC), 7))
    assert "#1234|1601 01 000]" in body


def test_the_longest_message_fits_in_one_receiver_read() -> None:
    config = forwarder(
        1,
        account="F" * 16,
        receiver="FFFFFF",
        line="FFFFFF",
        aes_key="00" * 32,
        media_base_url="https://" + "m" * 112,
    )
    delivery = Delivery(
        id=1,
        forwarder="cms",
        alarm_id=2**62,
        seq=9999,
        attempts=0,
        site_id="s1",
        event_type=EventType.SABOTAGE,
        description="d" * 3000,
        camera_id="999",
        camera_name="c" * 500,
        occurred_at=datetime.now(UTC),
        committed_at=datetime.now(UTC),
    )
    frame = build_delivery_message(config, delivery, datetime.now(UTC))
    assert len(frame) < dc09.MAX_FRAME
