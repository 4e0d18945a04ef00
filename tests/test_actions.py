"""Actions from the `actions` table, fired by the daemon at a simulated Davantis site."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite
from tests.support import app_config, davantis_site, final, running_daemon


async def insert_action(
    db: asyncpg.Connection,
    kind: str,
    target: str,
    params: dict[str, Any] | None = None,
    **extra: Any,
) -> int:
    """What an operator's software does: a plain INSERT (the trigger wakes the daemon)."""
    columns = ["site_id", "kind", "target", "params", *extra]
    values = ["d1", kind, target, json.dumps(params or {}), *extra.values()]
    placeholders = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    return int(
        await db.fetchval(
            f"INSERT INTO actions ({', '.join(columns)}) VALUES ({placeholders}) RETURNING id",
            *values,
        )
    )


async def test_every_davantis_action_kind(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    site = DavantisSite()
    async with DavantisSimulator({"default": site}) as sim:
        config = app_config(database_url, tmp_path, [davantis_site("d1", sim.url())])
        async with running_daemon(config):
            relay_on = await final(db, await insert_action(db, "relay", "1", {"duration_s": 30}))
            assert relay_on["state"] == "succeeded", relay_on["error"]
            assert json.loads(relay_on["result"])["answer"]["status"] is True
            relay_off = await final(db, await insert_action(db, "relay", "2", {"state": False}))
            assert relay_off["state"] == "succeeded"
            assert site.relay_log == [(1, True), (2, False)]

            disarm = await final(db, await insert_action(db, "disarm", "1"))
            arm = await final(db, await insert_action(db, "arm", "1"))
            assert (disarm["state"], arm["state"]) == ("succeeded", "succeeded")
            assert site.input_log == [(1, False), (1, True)]
            assert arm["attempts"] == 1 and arm["finished_at"] is not None


async def test_refused_expired_and_invalid_actions(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    site = DavantisSite()
    async with DavantisSimulator({"default": site}) as sim:
        config = app_config(database_url, tmp_path, [davantis_site("d1", sim.url())])
        async with running_daemon(config):
            refused = await final(db, await insert_action(db, "arm", "2"))  # a hardware keyswitch
            assert refused["state"] == "failed"
            assert "controlled by hardware" in refused["error"]
            assert refused["attempts"] == 1  # a refusal is never retried
            assert site.input_log == []

            expired = await final(
                db,
                await insert_action(
                    db, "relay", "1", not_after=datetime.now(UTC) - timedelta(seconds=1)
                ),
            )
            assert expired["state"] == "expired"
            assert expired["attempts"] == 0
            assert site.relay_log == []  # never fired late

            unknown = await final(db, await insert_action(db, "self_destruct", "1"))
            assert unknown["state"] == "failed" and "relay" in unknown["error"]
            bad_target = await final(db, await insert_action(db, "relay", "siren"))
            assert bad_target["state"] == "failed" and "numeric" in bad_target["error"]
            bad_param = await final(db, await insert_action(db, "relay", "1", {"state": "on"}))
            assert bad_param["state"] == "failed" and "params.state" in bad_param["error"]
            missing = await final(db, await insert_action(db, "relay", "99"))
            assert missing["state"] == "failed" and "404" in missing["error"]
            other_site = int(
                await db.fetchval(
                    "INSERT INTO actions (site_id, kind, target) VALUES ('nowhere', 'relay', '1') RETURNING id"
                )
            )
            assert "not configured" in (await final(db, other_site))["error"]


async def test_unreachable_site_retries_then_fails(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    from cms_ingest.config import ActionsConfig

    site = DavantisSite()
    async with DavantisSimulator({"default": site}) as sim:
        config = app_config(
            database_url,
            tmp_path,
            [davantis_site("d1", sim.url())],
            actions=ActionsConfig(sweep_interval_s=0.5, running_timeout_s=5.0, max_attempts=2),
        )
        async with running_daemon(config):
            site.offline = True  # 503 to everything: the login never succeeds
            row = await final(db, await insert_action(db, "relay", "1"))
            assert row["state"] == "failed"
            assert row["attempts"] == 2
            assert "gave up after 2 attempts" in row["error"]
            assert site.relay_log == []


async def test_action_left_running_by_a_crash_is_settled_by_rule(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    site = DavantisSite()
    stale = (
        "running', claimed_until = now() - interval '1 second', attempts = 1, claimed_by = 'dead:1"
    )
    async with DavantisSimulator({"default": site}) as sim:
        crashed = await insert_action(db, "relay", "1")
        await db.execute(f"UPDATE actions SET state = '{stale}' WHERE id = $1", crashed)
        config = app_config(database_url, tmp_path, [davantis_site("d1", sim.url())])
        async with running_daemon(config):
            row = await final(db, crashed)
            # Setting a relay is idempotent: firing it again cannot do harm, so it is retried.
            assert row["state"] == "succeeded"
            assert row["attempts"] == 2
            assert site.relay_log == [(1, True)]


async def test_cli_action_waits_for_the_outcome(database_url: str, tmp_path: Path) -> None:
    import asyncio
    import sys

    site = DavantisSite()
    async with DavantisSimulator({"default": site}) as sim:
        config = app_config(database_url, tmp_path, [davantis_site("d1", sim.url())])
        config_file = tmp_path / "cms.yaml"
        config_file.write_text(
            f"database_url: {database_url}\n"
            f"data_dir: {tmp_path}\n"
            "sites:\n"
            f"  - {{id: d1, vendor: davantis, url: '{sim.url()}', username: cms, password: secret}}\n"
        )
        async with running_daemon(config):
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "cms_ingest.cli",
                "action",
                "--config",
                str(config_file),
                "d1",
                "relay",
                "2",
                "--param",
                "duration_s=10",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(process.communicate(), timeout=60)
            assert process.returncode == 0, err.decode()
            assert '"state": "succeeded"' in out.decode()
            assert site.relay_log == [(2, True)]
