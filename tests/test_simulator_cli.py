"""The simulators' command line as the benchmark drives it: every site on its own port,
SIGUSR2 adding a backlog to every site, SIGUSR1 dumping every site's state with the pauses
between its polls (`--track-gaps`, `--track-request`)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import Any

import aiohttp
from yarl import URL


async def line_of(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    return (await asyncio.wait_for(process.stdout.readline(), timeout=20)).decode().strip()


async def json_line(process: asyncio.subprocess.Process, key: str) -> dict[str, Any]:
    while True:
        line = await line_of(process)
        if line.startswith("{") and key in (record := json.loads(line)):
            return dict(record)


async def test_port_per_site_backlog_and_a_dump_with_the_pauses_between_polls() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cms_ingest.simulators.davantis",
        "--sites", "3",
        "--port", "0",
        "--port-per-site",
        "--backlog", "4",
        "--track-gaps", "0.3",
        "--track-request", "GET /alarms",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        urls = [await line_of(process) for _ in range(3)]
        assert await line_of(process) == "READY"
        ports = {URL(url).port for url in urls}
        assert len(ports) == 3, f"one port per site: {urls}"
        async with aiohttp.ClientSession() as http:
            for url in urls:  # each port serves its own site (and no other's path)
                async with http.get(f"{url}/_sim/state") as response:
                    assert response.status == 200
                    assert (await response.json())["alarms"] == 0
            process.send_signal(signal.SIGUSR2)
            assert (await json_line(process, "backlog"))["backlog"] == 12
            token = await login(http, urls[0])
            for _ in range(2):  # two polls of site 0, the second after a pause
                async with http.get(
                    f"{urls[0]}/alarms", headers={"Authorization": f"Bearer {token}"}
                ) as response:
                    assert response.status == 200
                await asyncio.sleep(0.5)
        process.send_signal(signal.SIGUSR1)
        dump = await json_line(process, "dump")
        sites = list(dump["sites"].values())
        assert [site["alarms"] for site in sites] == [4, 4, 4]
        assert [len(site["gaps"]) for site in sites] == [1, 0, 0], "login is not a poll"
        ((since, until),) = sites[0]["gaps"]
        assert 0.45 <= until - since < 5
    finally:
        process.terminate()
        await process.wait()


async def login(http: aiohttp.ClientSession, url: str) -> str:
    async with http.post(
        f"{url}/oauth/token",
        data={"grant_type": "password", "username": "cms", "password": "secret"},
    ) as response:
        assert response.status == 200, await response.text()
        return str((await response.json())["access_token"])
