"""A SIA DC-09 receiver for the forwarding tests: pysiaalarm's, the library Home Assistant's
SIA integration uses (nobody here wrote it), recording what it accepted.

pysiaalarm ACKs every valid message, a repeat too. A real receiver drops a repeat by its
sequence number: `accepted()` does that (a message equal to the one this account sent last,
same sequence number, is the repeat of a message whose ACK was lost), and `raw` keeps
everything pysiaalarm passed on, to count the repeats.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import pysiaalarm.event
from pysiaalarm import SIAAccount
from pysiaalarm.aio.server import SIAServerTCP, SIAServerUDP
from pysiaalarm.event import SIAEvent
from pysiaalarm.utils import Counter


@dataclass(frozen=True)
class Received:
    account: str
    sequence: str
    code: str | None
    zone: str | None
    alarm_id: int | None
    xdata: str | None
    timestamp: datetime | None


class SiaReceiver:
    def __init__(
        self, port: int, accounts: list[tuple[str, str | None]], *, udp: bool = False
    ) -> None:
        self.port = port
        self.udp = udp
        self._udp: asyncio.DatagramTransport | None = None
        self.accounts = accounts
        self.raw: list[Received] = []
        self._server: asyncio.Server | None = None
        self._sia: SIAServerTCP | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def _on_event(self, event: SIAEvent) -> None:
        self.raw.append(
            Received(
                account=str(event.account),
                sequence=str(event.sequence),
                code=event.code,
                zone=event.ri if event.message_type.value == "ADM-CID" else event.message,  # type: ignore[union-attr]
                alarm_id=_alarm_id(event.x_data),
                xdata=event.x_data,
                timestamp=event.timestamp if isinstance(event.timestamp, datetime) else None,
            )
        )

    async def start(self) -> None:
        """pysiaalarm's TCP server logic (`SIAServerTCP.handle_line`) on a listener of ours,
        which also closes the open connections at `stop` (pysiaalarm's own stop leaves them
        answering: no receiver that went down does)."""
        accounts = {a.account_id: a for a in (SIAAccount(n, k) for n, k in self.accounts)}
        if self.udp:
            loop = asyncio.get_running_loop()
            self._udp, _ = await loop.create_datagram_endpoint(
                lambda: _UdpServer(accounts, self._on_event, Counter()),
                local_addr=("127.0.0.1", self.port),
            )
            return
        self._sia = SIAServerTCP(accounts, self._on_event, Counter())
        sia = self._sia

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._writers.add(writer)
            try:
                await sia.handle_line(reader, writer)
            except Exception:  # a connection cut by stop()
                pass
            finally:
                self._writers.discard(writer)

        self._server = await asyncio.start_server(
            handle, "127.0.0.1", self.port, reuse_address=True
        )

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._server is None:
            return
        assert self._sia is not None
        self._sia.shutdown_flag = True
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()
        self._server = None

    def accepted(self) -> list[Received]:
        """What a receiver that drops repeats by sequence number keeps."""
        kept: list[Received] = []
        last: dict[str, Received] = {}
        for message in self.raw:
            previous = last.get(message.account)
            if previous is not None and (previous.sequence, previous.xdata) == (
                message.sequence,
                message.xdata,
            ):
                continue
            last[message.account] = message
            kept.append(message)
        return kept

    def alarm_ids(self) -> list[int]:
        return [m.alarm_id for m in self.accepted() if m.alarm_id is not None]

    def repeats(self) -> int:
        return len(self.raw) - len(self.accepted())


class _UdpServer(SIAServerUDP):
    """pysiaalarm's UDP server, minus one assertion: on Python 3.11 the selector loop's
    datagram transport is not an `asyncio.DatagramTransport` subclass (pysiaalarm asserts it
    is, so its own UDP server cannot start there)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]


def _alarm_id(xdata: str | None) -> int | None:
    for block in (xdata or "").split("]["):
        if block.startswith("V"):
            return int(block[1:].split()[0])
    return None


@contextlib.asynccontextmanager
async def sia_receiver(
    port: int, accounts: list[tuple[str, str | None]], *, udp: bool = False
) -> AsyncIterator[SiaReceiver]:
    receiver = SiaReceiver(port, accounts, udp=udp)
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


@contextlib.contextmanager
def receiver_clock_skewed(seconds: float) -> Iterator[None]:
    """pysiaalarm's clock `seconds` ahead (its window check and its NAK timestamps)."""
    real = pysiaalarm.event.datetime

    class Skewed(real):  # type: ignore[valid-type,misc]
        @classmethod
        def now(cls, tz=None):  # type: ignore[no-untyped-def]
            return real.now(tz) + timedelta(seconds=seconds)

    pysiaalarm.event.datetime = Skewed  # type: ignore[misc]
    try:
        yield
    finally:
        pysiaalarm.event.datetime = real  # type: ignore[misc]
