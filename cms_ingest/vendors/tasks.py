"""Background work a vendor client needs beyond the calls made to it (a long-poll held open
between polls), started through its context so that whoever built the client knows it.

The daemon's implementation (`cms_ingest.runtime.vendortasks`) runs each task on its
supervisor: named, restarted with backoff and logged with its traceback when it crashes,
stopped with the client. `LocalTasks` below serves a client built outside the daemon (the
probe, the fuzz harness, tests).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

TaskBody = Callable[[asyncio.Event], Awaitable[None]]

STOP_GRACE_S = 2.0  # a stopped task still running after this is cancelled


class VendorTasks(Protocol):
    """A vendor client's background tasks, by a name unique within the client."""

    async def start(self, name: str, run: TaskBody) -> None:
        """Run `run(stop)` in the background as `name` until it is stopped. `run` may loop
        as long as it is needed and must return soon after its `stop` event is set."""
        ...

    def running(self, name: str) -> bool:
        """True from `start` until `stop`, unless the task ended on its own and will not be
        restarted: then the client may start it again."""
        ...

    async def stop(self, name: str) -> None:
        """Stop `name` (its `stop` is set; cancelled after STOP_GRACE_S); nothing if unknown."""
        ...

    async def stop_all(self) -> None:
        """Stop every task of the client (when it is closed)."""
        ...


class LocalTasks:
    """`VendorTasks` as plain asyncio tasks, tracked and stopped with the client.

    A task that crashes is handed to the event loop's exception handler (logged with its
    traceback; the fuzz harness counts it) and not restarted: `running` turns False, so the
    client starts it again when it next needs it.
    """

    def __init__(self) -> None:
        self._tasks: dict[str, tuple[asyncio.Task[None], asyncio.Event]] = {}

    async def start(self, name: str, run: TaskBody) -> None:
        if self.running(name):
            raise ValueError(f"vendor task {name!r} is already running")
        stop = asyncio.Event()
        task = asyncio.create_task(_run(run, stop), name=f"vendor:{name}")
        task.add_done_callback(_report_crash)
        self._tasks[name] = (task, stop)

    def running(self, name: str) -> bool:
        entry = self._tasks.get(name)
        return entry is not None and not entry[0].done()

    async def stop(self, name: str) -> None:
        entry = self._tasks.pop(name, None)
        if entry is not None:
            await _stop([entry])

    async def stop_all(self) -> None:
        entries = list(self._tasks.values())
        self._tasks.clear()
        await _stop(entries)

    def retire(self) -> None:
        """Stop every task without waiting (a client being replaced)."""
        for task, stop in self._tasks.values():
            stop.set()
            task.cancel()
        self._tasks.clear()


async def _run(run: TaskBody, stop: asyncio.Event) -> None:
    await run(stop)


async def _stop(entries: list[tuple[asyncio.Task[None], asyncio.Event]]) -> None:
    for _task, stop in entries:
        stop.set()
    tasks = [task for task, _stop in entries if not task.done()]
    if not tasks:
        return
    _done, pending = await asyncio.wait(tasks, timeout=STOP_GRACE_S)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=STOP_GRACE_S)


def _report_crash(task: asyncio.Task[Any]) -> None:
    if task.cancelled() or task.exception() is None:
        return
    task.get_loop().call_exception_handler(
        {
            "message": f"vendor task {task.get_name()} crashed",
            "exception": task.exception(),
            "task": task,
        }
    )
