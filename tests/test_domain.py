"""The domain's own behaviour: `Alarm.changed` is `dataclasses.replace`, only faster."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cms_ingest.domain import Alarm, EventType, MediaKind, MediaRequest

ALARM = Alarm(
    site_id="s1",
    vendor="davantis",
    source_id="7",
    event_type=EventType.INTRUSION,
    vendor_event="1",
    description="Intrusion",
    occurred_at=datetime(2026, 12, 5, 17, 5, tzinfo=UTC),
    camera_id="3",
    camera_name="Gate",
    armed=True,
    priority=1,
    raw={"id": 7},
    media=(MediaRequest(MediaKind.SNAPSHOT, {"id": 7}),),
    group_of=None,
)
# A new value for every field: a field `changed` forgot or put in another's place shows.
NEW_VALUES: dict[str, Any] = {
    "site_id": "s2",
    "vendor": "camtrace",
    "source_id": "8",
    "event_type": EventType.MOTION,
    "vendor_event": "2",
    "description": "Motion",
    "occurred_at": datetime(2026, 12, 6, tzinfo=UTC),
    "camera_id": "4",
    "camera_name": "Door",
    "armed": False,
    "priority": 6,
    "raw": {"id": 8},
    "media": (),
    "group_of": "5",
}


def test_every_field_is_covered() -> None:
    assert set(NEW_VALUES) == {field.name for field in dataclasses.fields(Alarm)}


@pytest.mark.parametrize("name", sorted(NEW_VALUES))
def test_changed_is_dataclasses_replace(name: str) -> None:
    change = {name: NEW_VALUES[name]}
    assert ALARM.changed(**change) == dataclasses.replace(ALARM, **change)
    assert ALARM.changed(priority=3, group_of="1") == dataclasses.replace(
        ALARM, priority=3, group_of="1"
    )
    assert ALARM.changed() == ALARM


@pytest.mark.parametrize(
    "change", [{"priority": 0}, {"occurred_at": datetime(2026, 12, 5) + timedelta(hours=1)}]
)
def test_changed_checks_like_the_constructor(change: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="alarm 7"):
        ALARM.changed(**change)
