"""A vendor client's background tasks on the daemon's supervisor.

Each task runs as `vendor:<site_id>:<name>`: listed with the daemon's other tasks, logged
with its traceback and restarted with backoff when it crashes (`task_crashed`), and stopped
when its client is closed or replaced.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from cms_ingest.runtime.tasks import TaskSupervisor
from cms_ingest.vendors.tasks import STOP_GRACE_S, TaskBody


@dataclass(slots=True)
class _Handle:
    """One task's stop signal, as the supervisor hands it to the body."""

    stop: asyncio.Event | None = None  # known once the body first ran
    stopping: bool = False

    def request_stop(self) -> None:
        self.stopping = True
        if self.stop is not None:
            self.stop.set()

    def body(self, run: TaskBody) -> TaskBody:
        async def guarded(stop: asyncio.Event) -> None:
            self.stop = stop
            if self.stopping:  # stopped before it ever ran
                stop.set()
                return
            await run(stop)

        return guarded


@dataclass(slots=True)
class SupervisedTasks:
    """`VendorTasks` of one site's client, run on the daemon's `TaskSupervisor`."""

    supervisor: TaskSupervisor
    site_id: str
    _handles: dict[str, _Handle] = field(default_factory=dict)
    _retired: bool = False

    def _task_name(self, name: str) -> str:
        return f"vendor:{self.site_id}:{name}"

    async def start(self, name: str, run: TaskBody) -> None:
        if self._retired:
            raise RuntimeError(f"{self.site_id}: the client was replaced; {name!r} not started")
        if self.running(name):
            raise ValueError(f"vendor task {name!r} is already running")
        task_name = self._task_name(name)
        if task_name in self.supervisor.names:
            # The same task of this site's previous client, told to stop when it was
            # replaced and not yet gone: it goes first (the supervisor knows one per name).
            await self.supervisor.stop_tasks([task_name], timeout=STOP_GRACE_S)
        handle = _Handle()
        self._handles[name] = handle
        self.supervisor.start(task_name, handle.body(run))

    def running(self, name: str) -> bool:
        # A crashed task is still running: the supervisor restarts it.
        return name in self._handles and self._task_name(name) in self.supervisor.names

    async def stop(self, name: str) -> None:
        if self._handles.pop(name, None) is not None and not self._retired:
            await self.supervisor.stop_tasks([self._task_name(name)], timeout=STOP_GRACE_S)

    async def stop_all(self) -> None:
        names = list(self._handles)
        self._handles.clear()
        if not self._retired:
            await self.supervisor.stop_tasks(
                [self._task_name(name) for name in names], timeout=STOP_GRACE_S
            )

    def retire(self) -> None:
        """The client is being replaced: every task is told to stop now, without waiting.
        The supervisor's entries are left to the next client of the site (which may start
        tasks of the same names) and to the daemon's shutdown."""
        self._retired = True
        for handle in self._handles.values():
            handle.request_stop()
