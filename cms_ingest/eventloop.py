"""The event loop the daemon runs on: uvloop unless the config says `event_loop: asyncio`.

uvloop (libuv under asyncio's API) is the daemon's default because the idle poll is almost
all event-loop work (a timer, a socket write, a read, a parse): at 4,000 sites polled once a
second on two cores it took the daemon from 66 % of polls on schedule to 99 %, at 0.78x the
CPU per poll of a bare aiohttp loop on asyncio's own loop (`bench/sites.py --baseline`).
asyncio's loop stays one setting away for debugging (`PYTHONASYNCIODEBUG`, loop internals)
and for platforms uvloop does not support.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

import structlog

T = TypeVar("T")
EventLoopKind = Literal["uvloop", "asyncio"]
DEFAULT_EVENT_LOOP: EventLoopKind = "uvloop"

log = structlog.get_logger(__name__)


def loop_factory(kind: EventLoopKind) -> Callable[[], asyncio.AbstractEventLoop]:
    """A factory of the loop `kind` names; asyncio's own when uvloop cannot be imported."""
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError as exc:  # a platform uvloop does not build for
            log.warning("uvloop_unavailable", error=str(exc), note="running on asyncio's loop")
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], kind: EventLoopKind) -> T:
    """`asyncio.run(main)` on the loop `kind` names."""
    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        return runner.run(main)


def running_loop_name() -> str:
    """ "uvloop" or "asyncio": what the running loop is, for the start-up log line."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"
