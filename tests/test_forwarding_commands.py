"""Forwarders in the config, `cms-ingest forward-test` and `cms-ingest status`."""

from __future__ import annotations

import asyncio
import io
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import SecretStr

from cms_ingest.config import AppConfig, ConfigError, load_config_text
from cms_ingest.db.engine import create_engine
from cms_ingest.db.store import Store
from cms_ingest.domain import Alarm, CommitTerms, EventType, PollCommit
from cms_ingest.status import run_status
from tests.sia_receiver import sia_receiver
from tests.support import free_port

SITES = """
sites:
  - {id: s1, vendor: davantis, url: 'http://127.0.0.1:1', username: a, password: b}
"""


def load(text: str, base_dir: Path, **environ: str) -> AppConfig:
    return load_config_text(SITES + text, base_dir=base_dir, environ=environ)


def test_a_forwarder_reads_its_key_from_a_file_and_checks_it(tmp_path: Path) -> None:
    (tmp_path / "dc09.key").write_text("00112233445566778899AABBCCDDEEFF\n")
    config = load(
        """
forwarders:
  - {name: cms, primary: '10.0.0.5:12000', backup: '[::1]:12001', account: 'ab12',
     aes_key_file: dc09.key, format: ADM-CID, sites: [s1], event_types: [intrusion],
     codes: {intrusion: {cid: '1134'}}, zones: {front: 7}}
""",
        tmp_path,
    )
    forwarder = config.forwarder("cms")
    assert forwarder.key() == bytes.fromhex("00112233445566778899AABBCCDDEEFF")
    assert forwarder.account == "AB12"
    assert forwarder.code_of(EventType.INTRUSION).cid == "1134"
    assert forwarder.code_of(EventType.INTRUSION).sia == "BA"
    assert forwarder.zone_of("front") == 7
    assert forwarder.zone_of("12") == 12
    assert forwarder.zone_of("lobby") == 0
    assert "0011" not in repr(config)


def test_bad_forwarders_are_reported_without_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(
            """
forwarders:
  - {name: cms, primary: 'nohost', account: 'xyz', aes_key: 'secretsecret12', sites: [s9],
     codes: {intrusion: {sia: 'ba'}}}
""",
            tmp_path,
        )
    message = str(caught.value)
    assert "forwarders[0].primary" in message
    assert "forwarders[0].account" in message
    assert "secretsecret12" not in message
    with pytest.raises(ConfigError, match="unknown site"):
        load(
            "forwarders:\n  - {name: cms, primary: 'h:1', account: '123', sites: [s9]}\n", tmp_path
        )
    with pytest.raises(ConfigError, match="128, 192 or 256"):
        load(
            "forwarders:\n  - {name: c, primary: 'h:1', account: '123', aes_key: '${K}'}\n",
            tmp_path,
            K="abcd",
        )
    assert load("forwarders:\n", tmp_path).forwarders == []


async def test_forward_test_prints_the_receivers_answer(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "cms.yaml"
    config.write_text(
        SITES + f"forwarders:\n  - {{name: cms, primary: '127.0.0.1:{port}', account: '1234', "
        "ack_timeout_s: 2}\n"
    )
    async with sia_receiver(port, [("1234", None)]) as receiver:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cms_ingest.cli",
            "forward-test",
            "--config",
            str(config),
            "cms",
            stdout=asyncio.subprocess.PIPE,
            env=dict(os.environ),
        )
        out, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, out
    assert f"127.0.0.1:{port} answered ACK" in out.decode()
    assert [m.code for m in receiver.raw] == ["RX"]


async def test_status_shows_each_forwarders_queue(database_url: str, tmp_path: Path) -> None:
    config = load(
        "forwarders:\n  - {name: cms, primary: '127.0.0.1:9', account: '1234'}\n", tmp_path
    ).model_copy(update={"database_url": SecretStr(database_url), "listen": "127.0.0.1:9"})
    store = Store(create_engine(database_url, pool_size=1), routes=[config.forwarders[0].route()])
    alarm = Alarm("s1", "davantis", "a1", EventType.INTRUSION, "x", "d", datetime.now(UTC))
    await store.commit_polls(
        [PollCommit("s1", "davantis", [alarm], None)], {"s1": CommitTerms(media_deadline_s=60)}
    )
    await store.engine.dispose()
    out = io.StringIO()
    await run_status(config, out=out)
    lines = out.getvalue().splitlines()
    header = next(line for line in lines if line.startswith("forwarder"))
    row = next(line for line in lines if line.startswith("cms "))
    assert header.split()[:6] == ["forwarder", "receiver", "owner", "link", "path", "pending"]
    assert row.split()[5] == "1"  # one pending delivery
