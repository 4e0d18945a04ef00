"""The forwarder: delivers the outbox's rows to one SIA DC-09 receiver, in order, exactly once.

One `ForwarderSender` per configured forwarder runs as a supervised task. It sends only while
it holds the forwarder's lease (one sender across every daemon; renewed every ttl/3), takes
the oldest pending rows in id order, and sends them one at a time over a kept-open TCP
connection (or as UDP datagrams), waiting for each answer:

- ACK with our sequence number: the row is `delivered` (only now);
- NAK: the receiver judged our timestamp (or the message) bad; its own timestamp gives the
  clock offset, which is applied to every later timestamp, and the row is sent again at
  once with the same sequence number; after `max_naks` NAKs in a row it backs off;
- DUH: the receiver does not understand the message: the row is `failed` with the reason;
- no answer (timeout, refused, reset): retried with backoff on the same path, switching to
  the other path (primary <-> backup) after `attempts_per_path` failures in a row.

A resend keeps the sequence number given before the first send (the receiver drops a
repeat), so a message ACKed just before a SIGKILL is sent again only with its old sequence
number. The link's loss and recovery are logged once each; NULL supervision messages go out
when the link was idle `supervision_interval_s` (off by default). The AES key never reaches
a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from cms_ingest.config.forwarders import ForwarderConfig, split_address
from cms_ingest.db.errors import DatabaseUnavailable
from cms_ingest.domain import Delivery, ForwarderLease
from cms_ingest.forwarding import dc09
from cms_ingest.forwarding.codes import TEST_CODE, EventCode
from cms_ingest.metrics import Metrics
from cms_ingest.retry import RetryPolicy
from cms_ingest.runtime.tasks import sleep_or_stop, wake_or_stop
from cms_ingest.storage_ports import Outbox

log = structlog.get_logger("cms_ingest.forwarder")

BATCH = 50
IDLE_POLL_S = 1.0  # a missed wake-up (another daemon's commit, a lost NOTIFY) waits this long
STATS_EVERY_S = 5.0
DB_RETRY = RetryPolicy(base=0.5, factor=2.0, cap=10.0, jitter=0.3)


class LinkFailure(Exception):
    """No usable answer from the receiver on this path (refused, reset, timeout, garbage)."""

    def __init__(self, outcome: str, detail: str) -> None:
        super().__init__(f"{outcome}: {detail}")
        self.outcome = outcome


class Link:
    """One TCP connection to one receiver address, kept open between messages; closed after
    any failure so that a late answer can never be taken for the next message's."""

    def __init__(self, address: str, *, connect_timeout_s: float) -> None:
        self.address = address
        self._host, self._port = split_address(address)
        self._connect_timeout_s = connect_timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._frames = dc09.FrameReader()

    async def exchange(self, frame: bytes, *, timeout_s: float) -> bytes:
        """Send one message and return the receiver's answer frame."""
        return await _closed_on_failure(self, self._exchange(frame, timeout_s))

    async def _exchange(self, frame: bytes, timeout_s: float) -> bytes:
        if self._writer is None:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(self._host, self._port), self._connect_timeout_s
            )
            self._frames = dc09.FrameReader()
        assert self._reader is not None
        assert self._writer is not None
        self._writer.write(frame)
        await asyncio.wait_for(self._writer.drain(), timeout_s)
        return await asyncio.wait_for(self._answer(self._reader), timeout_s)

    async def _answer(self, reader: asyncio.StreamReader) -> bytes:
        while True:
            data = await reader.read(4096)
            if not data:
                raise LinkFailure("error", f"{self.address} closed the connection")
            frames = self._frames.feed(data)
            if frames:
                return frames[0]

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()
        self.error: OSError | None = None

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.put_nowait(data)

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable, ...
        if isinstance(exc, OSError):
            self.error = exc
        self.received.put_nowait(b"")


class UdpLink:
    """The same exchange over UDP: one datagram out, one answer datagram back. Answers that
    arrived before the send (late ones) are discarded; the sender checks the sequence."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._host, self._port = split_address(address)
        self._transport: asyncio.DatagramTransport | None = None
        self._protocol: _Datagrams | None = None

    async def exchange(self, frame: bytes, *, timeout_s: float) -> bytes:
        return await _closed_on_failure(self, self._exchange(frame, timeout_s))

    async def _exchange(self, frame: bytes, timeout_s: float) -> bytes:
        if self._transport is None:
            loop = asyncio.get_running_loop()
            self._transport, self._protocol = await asyncio.wait_for(
                loop.create_datagram_endpoint(_Datagrams, remote_addr=(self._host, self._port)),
                timeout_s,
            )
        assert self._transport is not None
        assert self._protocol is not None
        while not self._protocol.received.empty():  # late answers to earlier messages
            self._protocol.received.get_nowait()
        self._transport.sendto(frame)
        return await asyncio.wait_for(self._answer(self._protocol), timeout_s)

    async def _answer(self, protocol: _Datagrams) -> bytes:
        frames = dc09.FrameReader()
        while True:
            data = await protocol.received.get()
            if not data and protocol.error is not None:
                raise LinkFailure("error", f"{self.address}: {protocol.error}")
            found = frames.feed(data)
            if found:
                return found[0]

    async def close(self) -> None:
        transport, self._transport, self._protocol = self._transport, None, None
        if transport is not None:
            transport.close()


async def _closed_on_failure(link: Link | UdpLink, exchange: Awaitable[bytes]) -> bytes:
    """One exchange on `link`; any failure closes the link (so a late answer is never taken
    for the next message's) and is a LinkFailure."""
    try:
        return await exchange
    except TimeoutError:
        await link.close()
        raise LinkFailure("timeout", f"no answer from {link.address} in time") from None
    except LinkFailure:
        await link.close()
        raise
    except OSError as exc:
        await link.close()
        raise LinkFailure("error", f"{link.address}: {exc.strerror or exc}") from None


def read_answer(raw: bytes, config: ForwarderConfig) -> dc09.Answer:
    """The receiver's answer frame, parsed (and decrypted); garbage is a LinkFailure."""
    try:
        return dc09.parse_answer(raw, config.key())
    except dc09.BadAnswer as exc:
        raise LinkFailure("bad_answer", str(exc)) from None


def make_link(address: str, config: ForwarderConfig) -> Link | UdpLink:
    if config.transport == "udp":
        return UdpLink(address)
    return Link(address, connect_timeout_s=config.connect_timeout_s)


def build_delivery_message(config: ForwarderConfig, delivery: Delivery, sent_at: datetime) -> bytes:
    """The DC-09 message of one delivery (`sent_at`: the timestamp the receiver judges)."""
    code = config.code_of(delivery.event_type)
    zone = config.zone_of(delivery.camera_id)
    link = f"{delivery.alarm_id}"
    if config.media_base_url is not None:
        link += f" {config.media_base_url}/{delivery.alarm_id}"
    extended = [("V", link)]
    if config.format is dc09.MessageFormat.SIA_DCS:
        text = delivery.description
        if delivery.camera_name:
            text = f"{delivery.camera_name}: {text}" if text else delivery.camera_name
        if text:
            extended.append(("I", text))
        extended.append(("H", dc09.format_timestamp(delivery.occurred_at)))
    return _message(
        config,
        account=config.account_of(delivery.site_id),
        code=code,
        zone=zone,
        sequence=delivery.seq,
        extended=extended,
        sent_at=sent_at,
    )


def build_test_message(config: ForwarderConfig, sent_at: datetime, sequence: int) -> bytes:
    """A manual test report: SIA RX / Contact ID 601, zone 0, on the default account."""
    return _message(
        config,
        account=config.account,
        code=TEST_CODE,
        zone=0,
        sequence=sequence,
        extended=[("I", "cms-ingest forward-test")]
        if config.format is dc09.MessageFormat.SIA_DCS
        else [],
        sent_at=sent_at,
    )


def _message(
    config: ForwarderConfig,
    *,
    account: str,
    code: EventCode,
    zone: int,
    sequence: int,
    extended: list[tuple[str, str]],
    sent_at: datetime,
) -> bytes:
    event: dc09.Event
    if config.format is dc09.MessageFormat.ADM_CID:
        event = dc09.ContactIdEvent(code.cid_qualifier, code.cid_event, zone, config.area)
    else:
        event = dc09.SiaEvent(code.sia, zone, config.area)
    return dc09.build_message(
        message_format=config.format,
        sequence=sequence,
        receiver=config.receiver,
        line=config.line,
        account=account,
        event=event,
        extended=extended,
        sent_at=sent_at,
        key=config.key(),
    )


@dataclass
class SenderState:
    """What `/status` and `cms-ingest status` show of a sender."""

    holding: bool = False
    link_up: bool | None = None  # None: nothing sent yet
    path: str = "primary"
    last_error: str | None = None
    clock_offset_s: float = 0.0
    down_since: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "holding": self.holding,
            "link_up": self.link_up,
            "path": self.path,
            "last_error": self.last_error,
            "clock_offset_s": round(self.clock_offset_s, 1),
        }


class ForwarderSender:
    def __init__(
        self,
        config: ForwarderConfig,
        outbox: Outbox,
        *,
        owner: str,
        lease_ttl_s: float = 15.0,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.config = config
        self._outbox = outbox
        self._owner = owner
        self._ttl_s = lease_ttl_s
        self._metrics = metrics if metrics is not None else Metrics()
        self._clock = clock or (lambda: datetime.now(UTC))
        self._wake = asyncio.Event()
        self._lease: ForwarderLease | None = None
        self._stats_at = 0.0
        self._last_exchange = time.monotonic()
        self._paths = [p for p in (config.primary, config.backup) if p is not None]
        self._links = [make_link(p, config) for p in self._paths]
        self._path = 0
        self._failures_on_path = 0
        self._switch_logged = False
        self._retry = RetryPolicy(
            base=config.retry_base_s, factor=2.0, cap=config.retry_max_s, jitter=0.3
        )
        self.state = SenderState()
        self._log = log.bind(forwarder=config.name)

    def wake(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------------ the loop

    async def run(self, stop: asyncio.Event) -> None:
        failures = 0
        # Renewed beside the sending, so a message waiting for its answer (up to
        # ack_timeout_s) never lets the lease run out under it.
        renewal = asyncio.create_task(self._keep_lease(stop), name=f"{self.config.name}:lease")
        try:
            while not stop.is_set():
                try:
                    await self._turn(stop)
                    failures = 0
                except DatabaseUnavailable as exc:
                    failures += 1
                    if failures == 1:
                        self._log.warning("forwarder_database_unavailable", error=str(exc))
                    await sleep_or_stop(DB_RETRY.delay(failures), stop)
        finally:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal
            await self._close()

    async def _keep_lease(self, stop: asyncio.Event) -> None:
        """Renew the lease every ttl/3 while held; a renewal refused means another daemon
        took it (ours ran out): stop sending."""
        while not await sleep_or_stop(self._ttl_s / 3, stop):
            lease = self._lease
            if lease is None:
                continue
            try:
                renewed = await self._outbox.renew_forwarder(self.config.name, lease, self._ttl_s)
            except DatabaseUnavailable:
                continue  # the sender meets the outage too; the next renewal may make it
            if not renewed and self._lease == lease:
                self._log.warning("forwarder_lease_lost", epoch=lease.epoch)
                self._lease = None
                self.state.holding = False

    async def _turn(self, stop: asyncio.Event) -> None:
        await self._update_stats()
        if not await self._hold():
            await wake_or_stop(self._wake, stop, self._ttl_s / 3)
            return
        assert self._lease is not None
        batch = await self._outbox.next_deliveries(self.config.name, self._lease, limit=BATCH)
        if not batch:
            await self._supervise()
            idle_s = min(IDLE_POLL_S, self.config.supervision_interval_s or IDLE_POLL_S)
            await wake_or_stop(self._wake, stop, idle_s)
            return
        for delivery in batch:
            if stop.is_set() or not await self._deliver(delivery, stop):
                return

    async def _hold(self) -> bool:
        """Whether we hold the forwarder's lease, taking it when free or expired
        (`_keep_lease` renews it)."""
        if self._lease is not None:
            return True
        lease = await self._outbox.acquire_forwarder(self.config.name, self._owner, self._ttl_s)
        self._lease = lease
        self.state.holding = lease is not None
        if lease is not None:
            self._log.info("forwarder_lease_taken", epoch=lease.epoch)
        return lease is not None

    async def _close(self) -> None:
        for link in self._links:
            await link.close()
        if self._lease is not None:
            with contextlib.suppress(DatabaseUnavailable):
                await self._outbox.release_forwarder(self.config.name, self._lease)
            self._lease = None
            self.state.holding = False

    async def _update_stats(self) -> None:
        now = time.monotonic()
        if now - self._stats_at < STATS_EVERY_S:
            return
        self._stats_at = now
        stats = (await self._outbox.outbox_stats([self.config.name]))[self.config.name]
        name = self.config.name
        self._metrics.forward_queue.labels(forwarder=name).set(stats.pending)
        oldest = stats.oldest_pending_at
        age = (self._clock() - oldest).total_seconds() if oldest is not None else 0.0
        self._metrics.forward_oldest_age.labels(forwarder=name).set(max(0.0, age))

    # ------------------------------------------------------------------ one delivery

    async def _deliver(self, delivery: Delivery, stop: asyncio.Event) -> bool:
        """Send until ACK or DUH settles the row: True. False: stopping or lease lost."""
        failures = 0
        naks = 0
        name = self.config.name
        while not stop.is_set():
            if not await self._hold():
                return False
            frame = build_delivery_message(self.config, delivery, self._timestamp())
            try:
                answer = await self._exchange(frame, delivery.seq)
            except LinkFailure as exc:
                failures += 1
                await self._outbox.delivery_attempted(delivery.id, error=str(exc))
                if await sleep_or_stop(self._retry.delay(failures), stop):
                    return False
                continue
            if answer.kind in (dc09.AnswerKind.ACK, dc09.AnswerKind.RSP):
                await self._outbox.delivery_finished(
                    delivery.id, delivered=True, answer=answer.text
                )
                latency = (self._clock() - delivery.committed_at).total_seconds()
                self._metrics.forward_latency.labels(forwarder=name).observe(max(0.0, latency))
                self._metrics.forward_deliveries.labels(forwarder=name, outcome="delivered").inc()
                return True
            if answer.kind is dc09.AnswerKind.DUH:
                reason = f"receiver answered DUH (does not understand): {answer.text}"
                await self._outbox.delivery_finished(
                    delivery.id, delivered=False, answer=answer.text, error=reason
                )
                self._metrics.forward_deliveries.labels(forwarder=name, outcome="failed").inc()
                self._log.error(
                    "forward_refused",
                    alarm_id=delivery.alarm_id,
                    seq=delivery.seq,
                    answer=answer.text,
                )
                return True
            naks += 1  # NAK: resynchronise the clock, send again at once
            self._resync(answer)
            await self._outbox.delivery_attempted(delivery.id, error=f"NAK: {answer.text}")
            if naks >= self.config.max_naks:
                if failures == 0:  # once per delivery: wrong account, key or clock
                    self._log.warning(
                        "forward_naks_repeated",
                        alarm_id=delivery.alarm_id,
                        seq=delivery.seq,
                        answer=answer.text,
                    )
                naks = 0
                failures += 1
                if await sleep_or_stop(self._retry.delay(failures), stop):
                    return False
        return False

    def _timestamp(self) -> datetime:
        return self._clock() + timedelta(seconds=self.state.clock_offset_s)

    def _resync(self, answer: dc09.Answer) -> None:
        if answer.timestamp is None:
            return
        # The receiver's clock has a resolution of one second: half a second is noise.
        offset = (answer.timestamp - self._clock()).total_seconds()
        if abs(offset - self.state.clock_offset_s) >= 1.0:
            self._log.warning(
                "forward_clock_resynchronised",
                offset_s=round(offset, 1),
                previous_s=round(self.state.clock_offset_s, 1),
            )
            self.state.clock_offset_s = offset

    async def _exchange(self, frame: bytes, sequence: int) -> dc09.Answer:
        """One message on the current path; raises LinkFailure (and moves to the other path
        after `attempts_per_path` failures in a row there)."""
        name = self.config.name
        path = "primary" if self._path == 0 else "backup"
        link = self._links[self._path]
        started = time.monotonic()
        try:
            raw = await link.exchange(frame, timeout_s=self.config.ack_timeout_s)
            answer = read_answer(raw, self.config)
            if answer.kind is not dc09.AnswerKind.NAK and int(answer.sequence) != sequence:
                raise LinkFailure("bad_answer", f"answer for sequence {answer.sequence}")
        except LinkFailure as exc:
            self._metrics.forward_messages.labels(forwarder=name, outcome=exc.outcome).inc()
            self._link_failed(path, str(exc))
            raise
        self._metrics.forward_round_trip.labels(forwarder=name).observe(time.monotonic() - started)
        self._metrics.forward_messages.labels(
            forwarder=name, outcome=answer.kind.value.lower()
        ).inc()
        self._link_ok(path)
        self._last_exchange = time.monotonic()
        return answer

    def _link_failed(self, path: str, error: str) -> None:
        self.state.last_error = error
        self._metrics.forward_link_up.labels(forwarder=self.config.name, path=path).set(0)
        if self.state.link_up is not False:
            self._log.warning(
                "forward_link_lost", path=path, address=self._paths[self._path], error=error
            )
            self.state.down_since = time.monotonic()
        self.state.link_up = False
        self._failures_on_path += 1
        if len(self._links) > 1 and self._failures_on_path >= self.config.attempts_per_path:
            self._path = 1 - self._path
            self._failures_on_path = 0
            self.state.path = "primary" if self._path == 0 else "backup"
            if not self._switch_logged:  # once per outage: both paths down keeps switching
                self._log.warning("forward_path_switched", path=self.state.path)
                self._switch_logged = True

    def _link_ok(self, path: str) -> None:
        self._metrics.forward_link_up.labels(forwarder=self.config.name, path=path).set(1)
        if self.state.link_up is False:
            down_s = time.monotonic() - (self.state.down_since or time.monotonic())
            self._log.info("forward_link_restored", path=path, down_s=round(down_s, 1))
        self.state.link_up = True
        self.state.down_since = None
        self._switch_logged = False
        self.state.path = path
        self._failures_on_path = 0

    async def _supervise(self) -> None:
        """A NULL message when the link was idle for the supervision interval."""
        interval = self.config.supervision_interval_s
        if interval is None or time.monotonic() - self._last_exchange < interval:
            return
        frame = dc09.build_message(
            message_format=dc09.MessageFormat.NULL,
            sequence=0,
            receiver=self.config.receiver,
            line=self.config.line,
            account=self.config.account,
            event=None,
            sent_at=self._timestamp(),
            key=self.config.key(),
        )
        self._last_exchange = time.monotonic()
        with contextlib.suppress(LinkFailure):
            answer = await self._exchange(frame, 0)
            if answer.kind is dc09.AnswerKind.NAK:
                self._resync(answer)

    def status(self) -> dict[str, Any]:
        return {"forwarder": self.config.name, **self.state.as_dict()}


async def send_test(config: ForwarderConfig, *, backup: bool = False) -> tuple[str, dc09.Answer]:
    """`cms-ingest forward-test`: one test report on the primary (or backup) path; the
    address used and the receiver's answer. Raises LinkFailure."""
    address = config.backup if backup and config.backup else config.primary
    link = make_link(address, config)
    sequence = secrets.randbelow(dc09.MAX_SEQUENCE) + 1
    try:
        offset = 0.0
        for _ in range(2):  # a NAK with the receiver's time: once more on its clock
            sent_at = datetime.now(UTC) + timedelta(seconds=offset)
            # A sequence number of its own: a receiver must not take it for a repeat of the
            # last message it got (a NULL's 0000, or the stream's last number).
            frame = build_test_message(config, sent_at, sequence)
            raw = await link.exchange(frame, timeout_s=config.ack_timeout_s)
            answer = read_answer(raw, config)
            if answer.kind is not dc09.AnswerKind.NAK or answer.timestamp is None:
                break
            offset = (answer.timestamp - datetime.now(UTC)).total_seconds()
        return address, answer
    finally:
        await link.close()
