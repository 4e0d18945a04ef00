"""`/metrics`, `/healthz`, `/readyz` (and `/status`) on the configured `listen` address."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from cms_ingest.metrics import Metrics


class Readiness:
    """Ready once the database answers and the schema is at the code's migration head."""

    def __init__(self) -> None:
        self.database_ok = False
        self.migrated = False
        self.reason = "starting"
        self._became_ready = asyncio.Event()

    @property
    def ready(self) -> bool:
        if self.database_ok and self.migrated:
            self._became_ready.set()
            return True
        return False

    def mark_ready(self) -> None:
        self.database_ok = self.migrated = True
        self.reason = ""
        self._became_ready.set()

    async def wait(self) -> None:
        """Until the daemon was ready once (migrations applied, database answering)."""
        await self._became_ready.wait()


def make_app(
    readiness: Readiness,
    status: Callable[[], dict[str, Any]],
    *,
    metrics: Metrics | None = None,
) -> web.Application:
    """The endpoints; `/metrics` serves `metrics`' registry (the daemon's)."""
    served = metrics if metrics is not None else Metrics()

    async def metrics_view(_request: web.Request) -> web.Response:
        body = await asyncio.to_thread(served.exposition)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        if readiness.ready:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready", "reason": readiness.reason}, status=503)

    async def status_view(_request: web.Request) -> web.Response:
        return web.json_response(status(), dumps=_dumps)

    app = web.Application()
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status_view)
    return app


def _dumps(value: Any) -> str:
    import json

    return json.dumps(value, default=str)


async def serve(app: web.Application, host: str, port: int, stop: asyncio.Event) -> None:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        await stop.wait()
    finally:
        await runner.cleanup()
