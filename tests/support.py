"""Helpers for tests that run the daemon, in-process or as a real process, against simulators."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from cms_ingest.config import ActionsConfig, AppConfig, MediaConfig, SiteConfig
from cms_ingest.runtime.daemon import Daemon, run_daemon

# What each vendor's simulator accepts by default.
CREDENTIALS: dict[str, dict[str, Any]] = {
    "davantis": {"username": "cms", "password": SecretStr("secret")},
    "camtrace": {"username": "cms", "password": SecretStr("secret")},
    "videoloft": {"username": "cms@example.com", "password": SecretStr("secret")},
    "exacq": {"username": "cms", "password": SecretStr("secret")},
    "camstreamer": {"token": SecretStr("api-token"), "poll_interval": 1.2},
}


def site_config(vendor: str, site_id: str, url: str, **overrides: Any) -> SiteConfig:
    """A site polling fast against a simulator, with the simulator's default credentials."""
    values: dict[str, Any] = {
        "id": site_id,
        "vendor": vendor,
        "url": url,
        "poll_interval": 0.1,
        "request_timeout_s": 2.0,
        **CREDENTIALS[vendor],
    }
    values.update(overrides)
    return SiteConfig(**values)


def davantis_site(site_id: str, url: str, **overrides: Any) -> SiteConfig:
    return site_config("davantis", site_id, url, **overrides)


def camtrace_site(site_id: str, url: str, **overrides: Any) -> SiteConfig:
    return site_config("camtrace", site_id, url, **overrides)


def videoloft_site(site_id: str, url: str, **overrides: Any) -> SiteConfig:
    return site_config("videoloft", site_id, url, **overrides)


def exacq_site(site_id: str, url: str, **overrides: Any) -> SiteConfig:
    return site_config("exacq", site_id, url, **overrides)


def camstreamer_site(site_id: str, url: str, **overrides: Any) -> SiteConfig:
    return site_config("camstreamer", site_id, url, **overrides)


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


async def spawn_daemon(
    config: Path, log: Path, env: Mapping[str, str] | None = None
) -> asyncio.subprocess.Process:
    """`cms-ingest run --config CONFIG` as a real process, its output appended to `log`.

    `env` defaults to ours with SITE_PASSWORD=secret (the simulators' password)."""
    with log.open("ab") as handle:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cms_ingest.cli",
            "run",
            "--config",
            str(config),
            stdout=handle,
            stderr=handle,
            env=dict(env) if env is not None else {**os.environ, "SITE_PASSWORD": "secret"},
        )


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, as a device ships with: (cert, key) PEM
    files. Skips the test when openssl is not installed."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = folder / "device.pem", folder / "device.key"
    request = ["-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"]
    names = ["-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        ["openssl", "req", *request, *names, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key
