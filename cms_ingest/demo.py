"""`cms-ingest demo`: the whole path on one machine, with nothing to set up.

An embedded PostgreSQL, one simulated site of every vendor this build supports (on loopback),
the daemon against them, and a live view of alarms, media and actions as they arrive. The
demo also plays operator: every so often it asks for a siren relay, and once for an arming
change on a hardware keyswitch (which the device refuses, as it should).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from pydantic import SecretStr

from cms_ingest.config import AppConfig, SiteConfig
from cms_ingest.db.engine import create_engine
from cms_ingest.db.notify import Listener
from cms_ingest.db.store import Store
from cms_ingest.logs import configure_logging
from cms_ingest.runtime.daemon import Daemon, run_daemon
from cms_ingest.simulators.camstreamer import CamStreamerAccount, CamStreamerSimulator
from cms_ingest.simulators.camtrace import CamTraceSimulator, CamTraceSite
from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite
from cms_ingest.simulators.exacq import ExacqSimulator, ExacqSite
from cms_ingest.simulators.videoloft import VideoloftAccount, VideoloftSimulator

OPERATOR_EVERY_S = 20.0
DEMO_PASSWORD = "demo-secret"  # noqa: S105 - the simulated site's password, on loopback only
DEMO_TOKEN = "demo-api-token"  # noqa: S105 - the simulated account's token, on loopback only
DEMO_DEVICE_TOKEN = "demo-device-token"  # noqa: S105 - likewise


def demo_config(
    data_dir: Path, listen: str, urls: dict[str, str], device_template: str
) -> AppConfig:
    """One site per simulated vendor, each on its own loopback port."""
    davantis = SiteConfig(
        id="demo-davantis",
        name="Demo warehouse (simulated Davantis)",
        vendor="davantis",
        url=urls["davantis"],
        username="cms",
        password=SecretStr(DEMO_PASSWORD),
        poll_interval=0.5,
    )
    camtrace = SiteConfig(
        id="demo-camtrace",
        name="Demo depot (simulated CamTrace)",
        vendor="camtrace",
        url=urls["camtrace"],
        username="cms",
        password=SecretStr(DEMO_PASSWORD),
        poll_interval=1.0,
        options={"input_types": ["porte1"]},
    )
    videoloft = SiteConfig(
        id="demo-videoloft",
        name="Demo branch offices (simulated Videoloft account)",
        vendor="videoloft",
        url=urls["videoloft"],
        username="cms@example.com",
        password=SecretStr(DEMO_PASSWORD),
        poll_interval=0.5,
        options={"tail_s": 3.0},
    )
    exacq = SiteConfig(
        id="demo-exacq",
        name="Demo mall (simulated exacqVision)",
        vendor="exacq",
        url=urls["exacq"],
        username="cms",
        password=SecretStr(DEMO_PASSWORD),
        poll_interval=1.0,
        options={"pre_seconds": 2, "post_seconds": 3},
    )
    camstreamer = SiteConfig(
        id="demo-camstreamer",
        name="Demo camera fleet (simulated CamStreamer cloud account)",
        vendor="camstreamer",
        url=urls["camstreamer"],
        token=SecretStr(DEMO_TOKEN),
        poll_interval=2.0,
        options={
            "offline_grace_s": 4,
            "clip_seconds": 10,
            "daily_limit": 1_000_000,  # a demo plan: status every 2 s instead of every 10
            "device_url_template": device_template,
            "device_access_token": DEMO_DEVICE_TOKEN,
        },
    )
    return AppConfig(
        data_dir=data_dir,
        listen=listen,
        sites=[davantis, camtrace, videoloft, exacq, camstreamer],
    )


class LiveView:
    """Prints each alarm, media file and action outcome as one line, as it happens."""

    def __init__(self, store: Store, out: TextIO) -> None:
        self._store = store
        self._out = out
        self._alarm_ids: asyncio.Queue[int] = asyncio.Queue()
        self._since = datetime.now(UTC)

    def on_alarm(self, _channel: str, payload: str) -> None:
        if payload.isdigit():
            self._alarm_ids.put_nowait(int(payload))

    def line(self, kind: str, text: str) -> None:
        stamp = datetime.now().strftime("%H:%M:%S")
        self._out.write(f"{stamp}  {kind:<7} {text}\n")
        self._out.flush()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._show_alarms()
            await self._show_changes()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5)

    async def _show_alarms(self) -> None:
        ids: list[int] = []
        while not self._alarm_ids.empty():
            ids.append(self._alarm_ids.get_nowait())
        for alarm in await self._store.alarms_by_id(ids) if ids else []:
            camera = alarm["camera_name"] or alarm["camera_id"] or "-"
            self.line(
                "ALARM",
                f"#{alarm['id']} {alarm['site_id']} p{alarm['priority']} {alarm['event_type']:<9} "
                f"camera {camera!r}: {alarm['description']}",
            )

    async def _show_changes(self) -> None:
        now = datetime.now(UTC)
        for media in await self._store.media_changed_since(self._since):
            detail = (
                f"{media['path']} ({media['size_bytes']} bytes, {media['content_type']})"
                if media["state"] == "ready"
                else media["last_error"] or ""
            )
            self.line(
                "MEDIA", f"alarm #{media['alarm_id']} {media['kind']} {media['state']}: {detail}"
            )
        for action in await self._store.actions_finished_since(self._since):
            outcome = action["error"] or _short(action["result"])
            self.line(
                "ACTION",
                f"#{action['id']} {action['kind']} {action['target']} on {action['site_id']}: "
                f"{action['state']} ({outcome})",
            )
        self._since = now


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) < 80 else text[:77] + "..."


async def play_operator(store: Store, view: LiveView, stop: asyncio.Event) -> None:
    """Ask for a siren now and then, and once for a change the device must refuse."""
    round_no = 0
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=OPERATOR_EVERY_S)
        if stop.is_set():
            return
        round_no += 1
        site_id, kind, target, params, note = _operator_request(round_no)
        action_id = await store.enqueue_action(
            site_id=site_id, kind=kind, target=target, params=params, requested_by="demo"
        )
        view.line("REQUEST", f"#{action_id} operator asks: {note}")


def _operator_request(round_no: int) -> tuple[str, str, str, dict[str, Any], str]:
    """What the demo operator asks for on its Nth round: (site, kind, target, params, note)."""
    if round_no == 2:
        return (
            "demo-davantis",
            "disarm",
            "2",
            {},
            "disarm via the hardware keyswitch input (the device will refuse)",
        )
    requests: list[tuple[str, str, str, dict[str, Any], str]] = [
        ("demo-davantis", "relay", "1", {"duration_s": 30}, "siren relay 1 on"),
        ("demo-exacq", "soft_trigger", "3", {"duration_s": 5}, "exacq soft trigger 3 held 5 s"),
        ("demo-videoloft", "snapshot_request", "12345.1", {}, "Videoloft thumbnail request"),
        ("demo-camtrace", "command", "7", {}, "CamTrace command 7 (floodlight)"),
        (
            "demo-camstreamer",
            "output",
            "ACCC8EE8A9CA",
            {"port": 1, "duration_s": 3},
            "CamStreamer camera output 1 for 3 s",
        ),
    ]
    return requests[round_no % len(requests)]


async def run_demo(
    *, data_dir: Path, duration: float | None, listen: str, out: TextIO = sys.stdout
) -> int:
    log_file = await asyncio.to_thread(_open_log, data_dir)
    configure_logging("info", "json", stream=log_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    davantis = DavantisSimulator({"default": DavantisSite(password=DEMO_PASSWORD, media_delay=3.0)})
    camtrace = CamTraceSimulator(
        {"default": CamTraceSite(password=DEMO_PASSWORD, media_delay=1.0, slice_after_s=4.0)}
    )
    videoloft = VideoloftSimulator(
        VideoloftAccount(password=DEMO_PASSWORD, media_delay=1.0, tail_s=3.0)
    )
    exacq = ExacqSimulator({"default": ExacqSite(password=DEMO_PASSWORD, export_seconds=2.0)})
    camstreamer = CamStreamerSimulator(
        {
            "default": CamStreamerAccount(
                token=DEMO_TOKEN, device_token=DEMO_DEVICE_TOKEN, prepare_seconds=2.0
            )
        }
    )
    urls = {
        "exacq": await exacq.start(),
        "camstreamer": await camstreamer.start(),
        "davantis": await davantis.start(),
        "camtrace": await camtrace.start(),
        "videoloft": await videoloft.start(),
    }
    davantis.site().add_alarms(3)  # history before the daemon starts: not ingested (no backfill)
    config = demo_config(data_dir, listen, urls, camstreamer.device_url_template())
    started: asyncio.Queue[Daemon] = asyncio.Queue()
    daemon_task = asyncio.create_task(run_daemon(config, stop=stop, on_started=started.put_nowait))
    out.write(
        f"cms-ingest demo: data in {data_dir}, logs in {data_dir / 'demo.log'}, "
        f"metrics on http://{listen}/metrics\n"
        f"simulated sites: Davantis at {urls['davantis']}, CamTrace at {urls['camtrace']}, "
        f"Videoloft at {urls['videoloft']}, exacqVision at {urls['exacq']}, "
        f"CamStreamer at {urls['camstreamer']}; Ctrl-C to stop.\n\n"
    )
    try:
        daemon = await _wait_started(started, daemon_task)
        if daemon is None:
            return 1
        await _wait_ready(daemon, daemon_task)
        await daemon.first_polls()
        store = Store(create_engine(daemon.url, pool_size=2))
        view = LiveView(store, out)
        listener = Listener(daemon.url, ["cms_alarms"], on_notify=view.on_alarm)
        davantis.start_generator(0.25, events=(1, 2, 3, 10, 11))
        camtrace.start_generator(0.15)
        videoloft.start_generator(0.1)
        exacq.start_generator(0.05)
        camstreamer.start_generator(0.02, offline_s=(8, 15))
        helpers = [
            asyncio.create_task(listener.run(stop)),
            asyncio.create_task(view.run(stop)),
            asyncio.create_task(play_operator(store, view, stop)),
        ]
        view.line("READY", "daemon running; alarms will appear as the simulated site raises them")
        davantis.site().add_alarm(event=11, camera=1)  # something to see at once
        camtrace.site().add_alarm(camera=2, description="MOTION Alarm")
        await _first_live_alert(videoloft)
        exacq.site().end_event_later(exacq.site().activate_event(1, 11), 4.0)
        camstreamer.site().disconnect("ACCC8EE8A9CB")  # offline, then back after 10 s
        asyncio.get_running_loop().call_later(10.0, camstreamer.site().connect, "ACCC8EE8A9CB")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=duration)
        stop.set()
        await asyncio.gather(*helpers, return_exceptions=True)
        await store.engine.dispose()
        await daemon_task
        return 0
    finally:
        stop.set()
        for simulator in (davantis, camtrace, videoloft, exacq, camstreamer):
            await simulator.stop_generator()
            await simulator.stop()
        if not daemon_task.done():
            await asyncio.wait([daemon_task], timeout=10)
        log_file.close()


async def _first_live_alert(videoloft: VideoloftSimulator) -> None:
    """A Videoloft alert once the daemon's long-polls are open (it is delivered live)."""
    for _ in range(50):
        if videoloft.account.open_live > 0:
            break
        await asyncio.sleep(0.1)
    videoloft.account.add_alert("12345.1", duration_s=1.0)


def _open_log(data_dir: Path) -> TextIO:
    data_dir.mkdir(parents=True, exist_ok=True)
    return (data_dir / "demo.log").open("a", encoding="utf-8")


async def _wait_started(
    started: asyncio.Queue[Daemon], daemon_task: asyncio.Task[None]
) -> Daemon | None:
    getter = asyncio.ensure_future(started.get())
    await asyncio.wait([getter, daemon_task], return_when=asyncio.FIRST_COMPLETED, timeout=120)
    if getter.done():
        return getter.result()
    getter.cancel()
    if daemon_task.done() and daemon_task.exception():
        raise daemon_task.exception()  # type: ignore[misc]
    return None


async def _wait_ready(daemon: Daemon, daemon_task: asyncio.Task[None]) -> None:
    ready = asyncio.ensure_future(daemon.readiness.wait())
    await asyncio.wait([ready, daemon_task], return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
