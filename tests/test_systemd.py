"""systemd integration: the notify protocol and credentials, with real processes and sockets.

The daemon runs as `cms-ingest run` in a subprocess, with the environment systemd gives a
`Type=notify` unit with `WatchdogSec=`: `NOTIFY_SOCKET` names a unix datagram socket bound
here (playing systemd's end), `WATCHDOG_USEC` the watchdog timeout, and for credentials
`CREDENTIALS_DIRECTORY`. A real PostgreSQL and a simulated Davantis site complete the picture.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url
from structlog.testing import capture_logs

from cms_ingest.runtime.sdnotify import SystemdNotifier
from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite
from tests.conftest import eventually
from tests.support import daemon_process, free_port, ready
from tests.test_process import write_config

# What systemd sets for a unit; never inherited from the environment the tests run in.
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "CREDENTIALS_DIRECTORY")
WATCHDOG_USEC = 2_000_000  # pings every second (half of it)


def monotonic_usec() -> int:
    # CLOCK_MONOTONIC is one clock for the whole machine: comparable across processes.
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


@dataclass(frozen=True)
class Message:
    at: float  # time.monotonic() when received
    fields: dict[str, str]

    def __contains__(self, key: str) -> bool:
        return key in self.fields


class NotifySocket:
    """systemd's end of NOTIFY_SOCKET: one datagram per message, drained as they come (an
    undrained unix datagram socket blocks its senders after net.unix.max_dgram_qlen, 10)."""

    def __init__(self, address: str) -> None:
        self.address = address  # what goes into NOTIFY_SOCKET ("@name": abstract)
        self.messages: list[Message] = []
        self._arrived = asyncio.Event()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self._sock.setblocking(False)
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> NotifySocket:
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._sock.close()

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self._sock, 65536)
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.messages.append(Message(time.monotonic(), fields))
            self._arrived.set()

    async def wait_for(
        self, predicate: Callable[[Message], bool], *, after: int = 0, timeout: float = 10.0
    ) -> tuple[int, Message]:
        """The first message from index `after` on that matches, and its index."""
        deadline = time.monotonic() + timeout
        while True:
            for index in range(after, len(self.messages)):
                if predicate(self.messages[index]):
                    return index, self.messages[index]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                shown = [m.fields for m in self.messages[after:]]
                raise AssertionError(f"no matching notify message in {timeout} s; got {shown}")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), timeout=remaining)

    def since(self, index: int, key: str) -> list[Message]:
        return [m for m in self.messages[index:] if key in m]


def has(key: str, value: str | None = None) -> Callable[[Message], bool]:
    return lambda m: key in m.fields and (value is None or m.fields[key] == value)


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
    return {**env, **extra}


async def alarm_count(db: asyncpg.Connection, site_id: str) -> int:
    return int(await db.fetchval("SELECT count(*) FROM alarms WHERE site_id = $1", site_id))


# --------------------------------------------------------------------------- the daemon


async def test_ready_watchdog_reload_and_stop(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """READY=1 once ready (and /readyz agrees), WATCHDOG=1 every WATCHDOG_USEC/2, RELOADING=1
    with MONOTONIC_USEC then READY=1 around a SIGHUP reload, STOPPING=1 and exit 0 on SIGTERM."""
    sites = {"n1": DavantisSite(media_delay=0), "n2": DavantisSite(media_delay=0)}
    async with (
        DavantisSimulator(dict(sites)) as sim,
        NotifySocket(str(tmp_path / "notify.sock")) as notify,
    ):
        port = free_port()
        config = tmp_path / "cms.yaml"
        write_config(config, database_url, tmp_path / "data", {"n1": sim.url("n1")}, port)
        env = child_env(
            SITE_PASSWORD="secret",
            NOTIFY_SOCKET=notify.address,
            WATCHDOG_USEC=str(WATCHDOG_USEC),  # no WATCHDOG_PID: the child's pid is not known yet
        )
        log = tmp_path / "daemon.log"
        async with daemon_process(config, log, env) as daemon:
            # Ready: READY=1 (with a STATUS), and by then /readyz answers 200.
            ready_at, announced = await notify.wait_for(has("READY", "1"), timeout=30)
            assert announced.fields.get("STATUS", "").startswith("1 site(s) configured")
            assert await ready(port)
            assert not notify.since(0, "STOPPING") and not notify.since(0, "RELOADING")

            # The watchdog: about one ping a second (WATCHDOG_USEC / 2), from the start on.
            await asyncio.sleep(3.5)
            pings = [m.at for m in notify.since(ready_at, "WATCHDOG")]
            assert len(pings) >= 3, pings
            gaps = [b - a for a, b in itertools.pairwise(pings)]
            assert all(0.6 < gap < 1.6 for gap in gaps), gaps
            assert all(m.fields == {"WATCHDOG": "1"} for m in notify.since(0, "WATCHDOG"))

            # SIGHUP with a second site: RELOADING=1 + MONOTONIC_USEC, then READY=1 again.
            write_config(
                config, database_url, tmp_path / "data", {n: sim.url(n) for n in sites}, port
            )
            before = len(notify.messages)
            sent_at = monotonic_usec()
            daemon.send_signal(signal.SIGHUP)
            reload_at, reloading = await notify.wait_for(has("RELOADING", "1"), after=before)
            stamp = int(reloading.fields["MONOTONIC_USEC"])
            assert sent_at <= stamp <= monotonic_usec()
            await notify.wait_for(has("READY", "1"), after=reload_at + 1)
            await eventually(
                lambda: '"event": "config_reloaded"' in log.read_text(),
                timeout=10,
                what="config_reloaded in the log",
            )
            # The added site is polled: its first poll sets the cursor, then it ingests.
            await eventually(
                lambda: db.fetchval(
                    "SELECT cursor IS NOT NULL FROM site_state WHERE site_id = 'n2'"
                ),
                timeout=15,
                what="the new site's first poll",
            )
            sites["n2"].add_alarms(1)
            await eventually(lambda: alarm_count(db, "n2"), timeout=15, what="the new site's alarm")
            assert await ready(port)

            # SIGTERM: STOPPING=1, then a clean exit.
            before = len(notify.messages)
            daemon.send_signal(signal.SIGTERM)
            await notify.wait_for(has("STOPPING", "1"), after=before)
            assert await asyncio.wait_for(daemon.wait(), timeout=15) == 0
        assert len(notify.since(0, "READY")) == 2  # start and the reload, nothing else


async def test_secrets_from_credentials_directory(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Database URL and site password from files in $CREDENTIALS_DIRECTORY, as systemd's
    LoadCredential= provides them: the daemon connects, logs in, ingests, and logs neither."""
    db_canary = f"Db-Canary-{uuid.uuid4().hex[:8]}"
    site_canary = f"Site-Canary-{uuid.uuid4().hex[:8]}"
    # The server trusts local connections: the URL's password is never used, only carried.
    url = make_url(database_url).set(password=db_canary).render_as_string(hide_password=False)
    credentials = tmp_path / "credentials"  # systemd: /run/credentials/cms-ingest.service
    credentials.mkdir(mode=0o700)
    (credentials / "database_url").write_text(url + "\n")
    (credentials / "acme-north").write_text(site_canary + "\n")
    site = DavantisSite(password=site_canary, media_delay=0)
    async with (
        DavantisSimulator({"default": site}) as sim,
        NotifySocket(str(tmp_path / "notify.sock")) as notify,
    ):
        port = free_port()
        config = tmp_path / "cms.yaml"
        config.write_text(
            "database_url_file: ${CREDENTIALS_DIRECTORY}/database_url\n"
            f"data_dir: {tmp_path / 'data'}\n"
            f"listen: 127.0.0.1:{port}\n"
            "log_level: debug\n"
            "log_format: json\n"
            "sites:\n"
            f"  - id: acme-north\n"
            f"    vendor: davantis\n"
            f"    url: '{sim.url()}'\n"
            f"    username: cms\n"
            "    password_file: ${CREDENTIALS_DIRECTORY}/acme-north\n"
            "    poll_interval: 0.2\n"
        )
        env = child_env(CREDENTIALS_DIRECTORY=str(credentials), NOTIFY_SOCKET=notify.address)
        log = tmp_path / "daemon.log"
        async with daemon_process(config, log, env) as daemon:
            await notify.wait_for(has("READY", "1"), timeout=30)
            await eventually(
                lambda: db.fetchval("SELECT cursor IS NOT NULL FROM site_state"),
                timeout=15,
                what="the site's first poll",
            )
            site.add_alarms(2)
            await eventually(
                lambda: alarm_count(db, "acme-north"), timeout=15, what="alarms ingested"
            )
            assert site.logins == 1  # one client, one login, with the password from the file
            daemon.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(daemon.wait(), timeout=15) == 0
    text = log.read_text()
    assert '"event": "started"' in text
    assert db_canary not in text and site_canary not in text


async def test_credentials_missing_is_a_config_error(tmp_path: Path) -> None:
    """Started outside systemd (no CREDENTIALS_DIRECTORY): exit 2 and a message that says so."""
    config = tmp_path / "cms.yaml"
    config.write_text(
        "database_url_file: ${CREDENTIALS_DIRECTORY}/database_url\n"
        "sites:\n"
        "  - {id: a, vendor: davantis, url: 'http://192.0.2.1', username: u,\n"
        "     password_file: '${CREDENTIALS_DIRECTORY}/a'}\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cms_ingest.cli",
        "run",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(),
    )
    _out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 2
    lines = err.decode().splitlines()
    message = "systemd credentials are not available: start the daemon with LoadCredential="
    assert [line.split(": ", 2)[1] for line in lines] == [
        "database_url_file",
        "sites[0].password_file",
    ]
    assert all(message in line for line in lines)


# --------------------------------------------------------------------------- SystemdNotifier


class Receiver:
    """A bound datagram socket, read without blocking (a closed socket: nothing arrived)."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)

    def drain(self) -> list[str]:
        received = []
        while True:
            try:
                received.append(self.sock.recv(65536).decode())
            except BlockingIOError:
                return received

    def close(self) -> None:
        self.sock.close()


def abstract_name() -> str:
    return f"@cms-ingest-test-{uuid.uuid4().hex}"


def test_abstract_socket_and_every_message() -> None:
    name = abstract_name()
    receiver = Receiver("\0" + name[1:])
    try:
        notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": name})
        assert notifier.enabled and notifier.watchdog_interval_s is None
        notifier.status("waiting for the database (attempt 1)")
        notifier.ready("3 site(s) configured")
        before = monotonic_usec()
        notifier.reloading()
        notifier.ready()
        notifier.stopping()
        notifier.watchdog()
        got = receiver.drain()
        assert got[:2] == [
            "STATUS=waiting for the database (attempt 1)",
            "READY=1\nSTATUS=3 site(s) configured",
        ]
        reloading, stamp = got[2].split("\n")
        assert reloading == "RELOADING=1"
        assert before <= int(stamp.removeprefix("MONOTONIC_USEC=")) <= monotonic_usec()
        assert got[3:] == ["READY=1", "STOPPING=1", "WATCHDOG=1"]
    finally:
        receiver.close()


async def run_watchdog_for(notifier: SystemdNotifier, seconds: float, healthy: bool = True) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(notifier.run_watchdog(stop, lambda: healthy))
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.wait_for(task, timeout=2)


async def test_watchdog_pings_only_for_its_own_pid() -> None:
    name = abstract_name()
    receiver = Receiver("\0" + name[1:])
    try:
        env = {"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "100000"}  # a ping every 50 ms
        own = SystemdNotifier.from_environment({**env, "WATCHDOG_PID": str(os.getpid())})
        assert own.watchdog_interval_s == 0.05
        await run_watchdog_for(own, 0.5)
        assert receiver.drain().count("WATCHDOG=1") >= 4

        # WATCHDOG_PID names another process (we are its child): that one pings, not us.
        other = SystemdNotifier.from_environment({**env, "WATCHDOG_PID": str(os.getppid())})
        assert other.enabled and other.watchdog_interval_s is None
        await run_watchdog_for(other, 0.5)
        assert receiver.drain() == []

        # Unhealthy: the pings are withheld on purpose, so systemd restarts the daemon.
        with capture_logs() as logs:
            await run_watchdog_for(own, 0.3, healthy=False)
        assert receiver.drain() == []
        assert any(entry["event"] == "watchdog_ping_withheld" for entry in logs)
    finally:
        receiver.close()


async def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = SystemdNotifier.from_environment({"WATCHDOG_USEC": "100000"})
    assert not notifier.enabled
    with capture_logs() as logs:
        notifier.ready("x")
        notifier.status("x")
        notifier.reloading()
        notifier.stopping()
        notifier.watchdog()
        await run_watchdog_for(notifier, 0.2)  # returns as soon as it is stopped
    assert logs == []


def test_vanished_socket_warns_once_and_never_raises(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    receiver = Receiver(str(path))
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": str(path)})
    notifier.status("first")
    assert receiver.drain() == ["STATUS=first"]
    receiver.close()
    with capture_logs() as logs:
        notifier.status("closed, still there")  # ECONNREFUSED
        path.unlink()
        for _ in range(3):  # ENOENT
            notifier.ready("x")
            notifier.watchdog()
            notifier.reloading()
            notifier.stopping()
    warnings = [entry for entry in logs if entry["event"] == "sd_notify_failed"]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"
    assert len(logs) == 1
