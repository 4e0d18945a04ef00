"""Helpers for tests that run the daemon in-process against simulators."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from cms_ingest.config import ActionsConfig, AppConfig, MediaConfig, SiteConfig
from cms_ingest.runtime.daemon import Daemon, run_daemon


def davantis_site(site_id: str, url: str, **overrides: Any) -> SiteConfig:
    values: dict[str, Any] = {
        "id": site_id,
        "vendor": "davantis",
        "url": url,
        "username": "cms",
        "password": SecretStr("secret"),
        "poll_interval": 0.1,
        "request_timeout_s": 2.0,
    }
    values.update(overrides)
    return SiteConfig(**values)


def camtrace_site(site_id: str, url: str, **overrides: Any) -> SiteConfig:
    values: dict[str, Any] = {
        "id": site_id,
        "vendor": "camtrace",
        "url": url,
        "username": "cms",
        "password": SecretStr("secret"),
        "poll_interval": 0.1,
        "request_timeout_s": 2.0,
    }
    values.update(overrides)
    return SiteConfig(**values)


def videoloft_site(site_id: str, url: str, **overrides: Any) -> SiteConfig:
    values: dict[str, Any] = {
        "id": site_id,
        "vendor": "videoloft",
        "url": url,
        "username": "cms@example.com",
        "password": SecretStr("secret"),
        "poll_interval": 0.1,
        "request_timeout_s": 2.0,
    }
    values.update(overrides)
    return SiteConfig(**values)


def exacq_site(site_id: str, url: str, **overrides: Any) -> SiteConfig:
    values: dict[str, Any] = {
        "id": site_id,
        "vendor": "exacq",
        "url": url,
        "username": "cms",
        "password": SecretStr("secret"),
        "poll_interval": 0.1,
        "request_timeout_s": 2.0,
    }
    values.update(overrides)
    return SiteConfig(**values)


def camstreamer_site(site_id: str, url: str, **overrides: Any) -> SiteConfig:
    values: dict[str, Any] = {
        "id": site_id,
        "vendor": "camstreamer",
        "url": url,
        "token": SecretStr("api-token"),
        "poll_interval": 1.2,
        "request_timeout_s": 2.0,
    }
    values.update(overrides)
    return SiteConfig(**values)


def app_config(
    database_url: str, data_dir: Path, sites: list[SiteConfig], **overrides: Any
) -> AppConfig:
    values: dict[str, Any] = {
        "database_url": SecretStr(database_url),
        "data_dir": data_dir,
        "listen": "127.0.0.1:0",
        "media": MediaConfig(retry_base_s=0.2, retry_max_s=0.5),
        "actions": ActionsConfig(sweep_interval_s=0.5, running_timeout_s=5.0),
        "sites": sites,
    }
    values.update(overrides)
    return AppConfig(**values)


@contextlib.asynccontextmanager
async def running_daemon(config: AppConfig) -> AsyncIterator[Daemon]:
    """The daemon in this event loop, ready (migrated, pollers started); stopped on exit."""
    stop = asyncio.Event()
    started: asyncio.Queue[Daemon] = asyncio.Queue()
    task = asyncio.create_task(run_daemon(config, stop=stop, on_started=started.put_nowait))
    try:
        daemon = await asyncio.wait_for(started.get(), timeout=30)
        await asyncio.wait_for(daemon.readiness.wait(), timeout=30)
        await asyncio.wait_for(daemon.first_polls(), timeout=30)
        yield daemon
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)
