"""Secrets never leak: canary passwords and tokens through logins, failures and a crash."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import asyncpg

from cms_ingest.simulators.camstreamer import CamStreamerAccount, CamStreamerSimulator
from cms_ingest.simulators.camtrace import CamTraceSimulator, CamTraceSite
from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite
from cms_ingest.simulators.exacq import ExacqSimulator, ExacqSite
from cms_ingest.simulators.videoloft import VideoloftAccount, VideoloftSimulator
from tests.conftest import eventually
from tests.support import daemon_process, final, free_port, log_events, ready

CANARIES = {
    "DAV_PW": "canaryDAVpw1111",
    "CT_PW": "canaryCTpw2222",
    "VL_PW": "canaryVLpw3333",
    "EX_PW": "canaryEXpw4444",
    "CS_TOKEN": "canaryCStok5555",
    "CS_DEVICE": "canaryCSdev6666",
    "WRONG_PW": "canaryWRONG7777",
    "DB_PW": "canaryDBpw8888",
}


async def test_no_secret_reaches_logs_tables_or_files(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    c = CANARIES
    dav = DavantisSite(password=c["DAV_PW"], media_delay=0)
    ct = CamTraceSite(password=c["CT_PW"], media_delay=0)
    vl = VideoloftAccount(password=c["VL_PW"], media_delay=0, tail_s=0)
    ex = ExacqSite(password=c["EX_PW"])
    cs = CamStreamerAccount(token=c["CS_TOKEN"], device_token=c["CS_DEVICE"])
    async with (
        DavantisSimulator({"default": dav}) as dsim,
        CamTraceSimulator({"default": ct}) as csim,
        VideoloftSimulator(vl) as vsim,
        ExacqSimulator({"default": ex}) as esim,
        CamStreamerSimulator({"default": cs}) as ssim,
    ):
        port = free_port()
        config = tmp_path / "cms.yaml"
        config.write_text(
            "database_url: ${DATABASE_URL}\n"
            f"data_dir: {tmp_path / 'data'}\n"
            f"listen: 127.0.0.1:{port}\n"
            "log_level: debug\nlog_format: json\n"
            "defaults: {poll_interval: 0.3, username: cms}\n"
            "sites:\n"
            f"  - {{id: dav, vendor: davantis, url: '{dsim.url()}', password: '${{DAV_PW}}'}}\n"
            f"  - {{id: davbad, vendor: davantis, url: '{dsim.url()}', password: '${{WRONG_PW}}'}}\n"
            f"  - {{id: ct, vendor: camtrace, url: '{csim.url()}', password: '${{CT_PW}}'}}\n"
            f"  - {{id: ctbad, vendor: camtrace, url: '{csim.url()}', password: '${{WRONG_PW}}'}}\n"
            f"  - {{id: vl, vendor: videoloft, url: '{vsim.url}', username: cms@example.com, password: '${{VL_PW}}'}}\n"
            f"  - {{id: ex, vendor: exacq, url: '{esim.url()}', password: '${{EX_PW}}'}}\n"
            f"  - {{id: exbad, vendor: exacq, url: '{esim.url()}', password: '${{WRONG_PW}}'}}\n"
            f"  - {{id: cs, vendor: camstreamer, url: '{ssim.url()}', token: '${{CS_TOKEN}}',\n"
            f"      options: {{daily_limit: 1000000, device_access_token: '${{CS_DEVICE}}',\n"
            f"                 device_url_template: '{ssim.device_url_template()}'}}}}\n"
        )
        # The database URL carries a password too (ignored by trust auth, but never logged).
        db_url = database_url.replace("postgres@", f"postgres:{c['DB_PW']}@", 1)
        env = {**os.environ, **c, "DATABASE_URL": db_url}
        log = tmp_path / "daemon.log"

        def logins() -> dict[str, int]:
            """What grows when the daemon authenticates with a secret again."""
            return {
                "dav": dav.logins + dav.refreshes,
                "ex": ex.logins,
                "vl": vl.logins + vl.cookie_logins,
            }

        async with daemon_process(config, log, env) as daemon:
            await eventually(lambda: ready(port), timeout=30, what="daemon ready")
            await eventually(
                lambda: _cursors(db, {"dav", "ct", "ex"}), timeout=20, what="first polls"
            )
            dav.add_alarm()
            ct.add_alarm()
            ex.activate_event(1, 11)
            await eventually(lambda: _alarms(db, 3), timeout=20, what="alarms from every vendor")
            before = logins()
            dav.expire_access_tokens()
            ct.expire_all_digests()
            ex.expire_sessions()
            vl.expire_tokens()
            cs.expire_tokens()  # the static token is refused: the site fails, loudly and cleanly
            actions = await db.fetch(
                "INSERT INTO actions (site_id, kind, target, params) VALUES "
                "('cs', 'output', 'ACCC8EE8A9CA', '{\"duration_s\": 0.1}'), "
                "('ex', 'soft_trigger', '3', '{\"duration_s\": 1}') RETURNING id"
            )
            # The expired credentials met: Davantis renewed its token, Exacq logged in again,
            # CamTrace's stale digest was refused; both actions carried out.
            await eventually(
                lambda: (
                    logins()["dav"] > before["dav"]
                    and ct.state()["faults"]["expire_digests"] == 0
                    and logins()["ex"] > before["ex"]
                ),
                what="expired credentials renewed",
            )
            for row in actions:
                action = await final(db, row["id"])
                assert action["state"] == "succeeded", dict(action)
            daemon.send_signal(signal.SIGKILL)  # a crash mid-flight (polls go on meanwhile)
            await daemon.wait()
        before = logins()
        async with daemon_process(config, log, env) as daemon:
            await eventually(lambda: ready(port), timeout=30, what="daemon ready again")
            # The new process logs in to every device again, with the same secrets (CamTrace
            # has no login: WSSE on every request, so a new alarm polled proves it).
            await eventually(
                lambda: all(n > before[site] for site, n in logins().items()),
                timeout=15,
                what="logins after the restart",
            )
            ct.add_alarm()
            await eventually(lambda: _alarms(db, 2, "ct"), timeout=15, what="a CamTrace alarm")
            daemon.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(daemon.wait(), timeout=15) == 0

    written = [log.read_text(errors="replace")]
    for table in ("alarms", "alarm_media", "actions", "site_state"):
        rows = await db.fetch(f"SELECT * FROM {table}")
        written.append(json.dumps([dict(r) for r in rows], default=str))
    written += [str(path) for path in (tmp_path / "data").rglob("*")]
    everything = "\n".join(written)
    # The log is real: it records the failures of the sites with a wrong secret or an expired
    # token, the actions, and both runs.
    failing = {e["site_id"] for e in log_events(log, "site_failing")}
    assert {"davbad", "ctbad", "exbad", "cs"} <= failing, failing
    assert len(log_events(log, "action_succeeded")) == 2
    assert len(log_events(log, "started")) == 2 and len(log_events(log, "stopped")) == 1
    for name, secret in CANARIES.items():
        assert secret not in everything, f"{name} leaked"


async def _alarms(db: asyncpg.Connection, n: int, site_id: str | None = None) -> bool:
    count = await db.fetchval(
        "SELECT count(*) FROM alarms WHERE vendor <> 'cms' AND site_id = coalesce($1, site_id)",
        site_id,
    )
    return int(count) >= n


async def _cursors(db: asyncpg.Connection, sites: set[str]) -> bool:
    rows = await db.fetch("SELECT site_id FROM site_state WHERE cursor IS NOT NULL")
    return sites <= {r["site_id"] for r in rows}
