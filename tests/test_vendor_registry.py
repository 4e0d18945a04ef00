"""A vendor is added in `vendors/` only: one registered at run time is configured, checked,
built, probed and polled by the unchanged config, `check-config`, probe and daemon.

The fake vendor below is what a new vendor module would declare: an options model, a default
poll interval, a credential rule, a config check and one action kind. Its client makes its
own alarms, so no device is needed; everything after the client is the real daemon against
the real PostgreSQL.
"""

from __future__ import annotations

import io
import json
import textwrap
from collections.abc import Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from pydantic import Field

from cms_ingest.cli import main
from cms_ingest.config import ConfigError, load_checked, load_config, vendor_problems
from cms_ingest.db.store import Store
from cms_ingest.domain import Action, ActionResult, Alarm, EventType, MediaKind
from cms_ingest.probe import run_probe
from cms_ingest.sitehttp import SiteHttp
from cms_ingest.vendors import build_client, register, registered, supported_vendors
from cms_ingest.vendors.base import (
    ActionSpec,
    Cursor,
    Download,
    MediaProbe,
    PollResult,
    SiteOptions,
    VendorContext,
)
from cms_ingest.vendors.registry import GivenCredentials, Vendor
from tests.conftest import eventually
from tests.support import final, running_daemon

NAME = "fakevendor"
ALARMS = 3  # the fake device has this many alarms, then stays quiet


class FakeOptions(SiteOptions):
    channel: int = Field(default=1, ge=1)


def needs_username(vendor: str, given: GivenCredentials) -> list[tuple[str, str]]:
    if "username" in given.fields:
        return []
    return [("username", f"{vendor} needs a username (the device's operator account)")]


def check_channel(url: str, options: Mapping[str, Any]) -> list[tuple[str, str]]:
    if options.get("channel") == 13:
        return [("channel", "channel 13 is reserved on this device")]
    return []


class FakeClient:
    """A device with ALARMS alarms, one new per poll, and a chime."""

    vendor = NAME
    actions: Mapping[str, ActionSpec] = {"chime": ActionSpec(idempotent=True)}

    def __init__(self, context: VendorContext, options: FakeOptions) -> None:
        self.context = context
        self.options = options

    async def poll(self, cursor: Cursor | None) -> PollResult:
        done = int((cursor or {}).get("n", 0))
        if done >= ALARMS:
            return PollResult(alarms=[], cursor={"n": done})
        number = done + 1
        alarm = Alarm(
            site_id=self.context.site_id,
            vendor=NAME,
            source_id=f"fake-{number}",
            event_type=EventType.INTRUSION,
            vendor_event="fake_intrusion",
            description=f"alarm {number} on channel {self.options.channel}",
            occurred_at=datetime.now(UTC),
            camera_id=str(self.options.channel),
        )
        return PollResult(alarms=[alarm], cursor={"n": number})

    async def media_status(self, kind: MediaKind, locator: Mapping[str, Any]) -> MediaProbe:
        return MediaProbe(state="unavailable", detail="the fake device records nothing")

    def download(self, path: str) -> AbstractAsyncContextManager[Download]:
        raise NotImplementedError("the fake device has no media")

    async def perform(self, action: Action) -> ActionResult:
        return ActionResult(result={"chimed": action.target, "channel": self.options.channel})

    async def close(self) -> None:
        return None


FAKE = Vendor(
    name=NAME,
    client=FakeClient,
    options=FakeOptions,
    default_poll_interval_s=0.05,
    credentials=needs_username,
    actions=FakeClient.actions,
    check=check_channel,
)


@pytest.fixture
def fake_vendor() -> Iterator[Vendor]:
    with registered(FAKE) as vendor:
        yield vendor


def site_yaml(**fields: Any) -> str:
    values: dict[str, Any] = {"id": "fake-site", "vendor": NAME, "url": "http://127.0.0.1:9"}
    values.update(fields)
    return "  - {" + ", ".join(f"{key}: {value}" for key, value in values.items()) + "}\n"


def write_config(folder: Path, site: str, top: str = "") -> Path:
    path = folder / "cms.yaml"
    path.write_text(textwrap.dedent(top) + "sites:\n" + site, encoding="utf-8")
    return path


def problems_of(path: Path) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        load_checked(path)
    return {problem.path: problem.message for problem in caught.value.problems}


def test_registered_vendor_loads_with_its_defaults(fake_vendor: Vendor, tmp_path: Path) -> None:
    config = load_checked(write_config(tmp_path, site_yaml(username="op")))
    (site,) = config.sites
    assert site.vendor == NAME
    assert site.poll_interval == 0.05  # the entry's default, not SiteConfig's 1.0
    assert site.options == {"restore_after_s": 10.0, "channel": 1}
    assert NAME in supported_vendors()


def test_registered_vendor_rules_are_reported_as_usual(fake_vendor: Vendor, tmp_path: Path) -> None:
    missing_username = write_config(tmp_path, site_yaml(options="{channel: 0}"))
    assert problems_of(missing_username) == {
        "sites[0].username": f"{NAME} needs a username (the device's operator account)",
        "sites[0].options.channel": "input should be greater than or equal to 1",
    }
    unknown_option = write_config(tmp_path, site_yaml(username="op", options="{chanel: 2}"))
    assert problems_of(unknown_option) == {
        "sites[0].options.chanel": "unknown key 'chanel' (did you mean 'channel'?)"
    }
    reserved = write_config(tmp_path, site_yaml(username="op", options="{channel: 13}"))
    assert problems_of(reserved) == {
        "sites[0].options.channel": "channel 13 is reserved on this device"
    }


def test_check_config_accepts_and_refuses_it(
    fake_vendor: Vendor, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_config(tmp_path, site_yaml(username="op"))
    assert main(["check-config", str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: valid (1 site(s))\n"

    reserved = write_config(tmp_path, site_yaml(username="op", options="{channel: 13}"))
    assert main(["check-config", str(reserved)]) == 2
    assert "sites[0].options.channel: channel 13 is reserved" in capsys.readouterr().out


def test_unregistered_vendor_is_refused_with_the_registered_list(tmp_path: Path) -> None:
    path = write_config(tmp_path, site_yaml(username="op"))
    with registered(FAKE):
        config = load_config(path)  # loads while registered...
    assert problems_of(path) == {  # ...and is an unknown vendor once it is not
        "sites[0].vendor": f"{NAME!r} is not valid; expected 'davantis', 'camtrace', "
        "'videoloft', 'exacq' or 'camstreamer'"
    }
    (problem,) = vendor_problems(config)
    assert problem.path == "sites[0].vendor"
    assert problem.message.startswith(f"vendor {NAME!r} is not supported by this build yet")


def test_a_name_is_registered_once(fake_vendor: Vendor) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register(FAKE)


async def test_build_client_builds_it_with_validated_options(fake_vendor: Vendor) -> None:
    async with aiohttp.ClientSession() as session:
        context = VendorContext(
            site_id="fake-site",
            http=SiteHttp(session, "http://127.0.0.1:9", timeout_s=1.0),
            problems=_NoProblems(),
        )
        client = build_client(NAME, context, {"channel": "4"})
    assert isinstance(client, FakeClient)
    assert client.options.channel == 4  # parsed by the entry's options model


async def test_probe_commissions_it(fake_vendor: Vendor, tmp_path: Path) -> None:
    config = load_checked(write_config(tmp_path, site_yaml(username="op")))
    out = io.StringIO()
    assert await run_probe(config.site("fake-site"), out=out) == 0
    report = out.getvalue()
    assert f"probing fake-site ({NAME})" in report
    assert "[PASS] authentication and first poll" in report
    assert "cursor {'n': 1}" in report


async def test_the_daemon_polls_it_and_fires_its_action(
    fake_vendor: Vendor,
    tmp_path: Path,
    database_url: str,
    db: asyncpg.Connection,
    store: Store,
) -> None:
    top = f"""\
    database_url: {database_url}
    data_dir: {tmp_path / "data"}
    listen: 127.0.0.1:0
    """
    config = load_checked(write_config(tmp_path, site_yaml(username="op"), top))

    async with running_daemon(config):

        async def all_alarms() -> list[asyncpg.Record]:
            rows = await db.fetch(
                "SELECT source_id, vendor, event_type FROM alarms WHERE site_id = 'fake-site'"
                " ORDER BY source_id"
            )
            return rows if len(rows) == ALARMS else []

        rows = await eventually(all_alarms, what="the fake device's alarms")
        assert [tuple(row) for row in rows] == [
            (f"fake-{n}", NAME, "intrusion") for n in range(1, ALARMS + 1)
        ]

        action_id = await store.enqueue_action(
            site_id="fake-site", kind="chime", target="hall", params={}, requested_by="test"
        )
        row = await final(db, action_id)
        assert row["state"] == "succeeded"
        assert json.loads(row["result"]) == {"chimed": "hall", "channel": 1}


class _NoProblems:
    def bad_input(self, what: str, detail: str) -> None:
        raise AssertionError(f"unexpected bad input {what}: {detail}")

    def clock_skew(self, seconds: float) -> None:
        return None

    def device_reset(self, detail: str) -> None:
        raise AssertionError(f"unexpected device reset: {detail}")
