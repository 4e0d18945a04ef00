"""Our event taxonomy in SIA DC-03 codes and Contact ID events, with per-forwarder overrides.

Video alarms are pulses: a camera does not report "person gone", so most types have no
restore. The pairs that do (camera offline/online, comm lost/restored, disarmed/armed) use
the restore form: Contact ID qualifier 3, the SIA restore code. Each default is listed in
the README ("Forwarding to alarm-handling software"); `codes:` in a forwarder overrides any.

Imports nothing of ours but the domain.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from cms_ingest.domain import EventType


@dataclass(frozen=True, slots=True)
class EventCode:
    """How one event type is sent: a SIA code, and a Contact ID qualifier and event."""

    sia: str  # two capital letters
    cid: str  # qualifier and event: "1130" (new burglary), "3350" (communication restored)

    @property
    def cid_qualifier(self) -> int:
        return int(self.cid[0])

    @property
    def cid_event(self) -> int:
        return int(self.cid[1:])


_SIA_RE = re.compile(r"[A-Z]{2}")
_CID_RE = re.compile(r"[136][0-9]{3}")

DEFAULT_CODES: Mapping[EventType, EventCode] = {
    EventType.INTRUSION: EventCode("BA", "1130"),  # burglary
    EventType.PERSON: EventCode("BA", "1130"),  # a person where one should not be
    EventType.VEHICLE: EventCode("UA", "1150"),  # untyped zone alarm / 24-hour auxiliary
    EventType.MOTION: EventCode("UA", "1150"),
    EventType.AUDIO: EventCode("UA", "1150"),
    EventType.ANALYTICS: EventCode("UA", "1150"),
    EventType.INPUT: EventCode("UA", "1140"),  # a contact: general alarm
    EventType.SABOTAGE: EventCode("TA", "1137"),  # tamper
    EventType.VIDEO_LOSS: EventCode("IA", "1330"),  # equipment failure / peripheral trouble
    EventType.CAMERA_OFFLINE: EventCode("EM", "1330"),  # device missing / peripheral trouble
    EventType.CAMERA_ONLINE: EventCode("EN", "3330"),  # its restore
    EventType.DISARMED: EventCode("OP", "1401"),  # opening by user
    EventType.ARMED: EventCode("CL", "3401"),  # closing by user
    EventType.COMM_LOST: EventCode("YC", "1350"),  # communication failure
    EventType.COMM_RESTORED: EventCode("YK", "3350"),  # communication restored
    EventType.SYSTEM: EventCode("YX", "1300"),  # service required / system trouble
    EventType.OTHER: EventCode("UA", "1150"),
}
TEST_CODE = EventCode("RX", "1601")  # manual test: `cms-ingest forward-test`


def check_sia(code: str) -> str:
    if not _SIA_RE.fullmatch(code):
        raise ValueError(f"SIA code {code!r} must be two capital letters, e.g. BA")
    return code


def check_cid(code: str) -> str:
    if not _CID_RE.fullmatch(code):
        raise ValueError(
            f"Contact ID {code!r} must be a qualifier (1 new, 3 restore, 6 previous) and a "
            "3-digit event, e.g. 1130"
        )
    return code


def code_for(
    event_type: EventType, overrides: Mapping[EventType, Mapping[str, str]] | None = None
) -> EventCode:
    """The default for `event_type`, with a forwarder's override (`sia`, `cid` keys) over it."""
    base = DEFAULT_CODES.get(event_type, DEFAULT_CODES[EventType.OTHER])
    override = (overrides or {}).get(event_type, {})
    return EventCode(override.get("sia", base.sia), override.get("cid", base.cid))
