"""TLS end to end: the real daemon and `cms-ingest probe` against simulators served over HTTPS
with a self-signed certificate.

One simulator, one port, one certificate, several sites that differ only by their `tls:`
policy. They share the daemon's single connection pool, so these tests also prove a
connection made under one site's policy is never reused by a site with a stricter one.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from cms_ingest.metrics import Metrics
from cms_ingest.simulators.camtrace import CamTraceSimulator, CamTraceSite
from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite
from tests.conftest import eventually
from tests.support import (
    app_config,
    camtrace_site,
    davantis_site,
    running_daemon,
    self_signed_certificate,
)

WRONG_PIN = "00" * 32


class Certificate:
    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key
        self.pin = hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A self-signed certificate for 127.0.0.1, as a device ships with."""
    cert, key = self_signed_certificate(tmp_path_factory.mktemp("device-tls"))
    return Certificate(cert, key)


# Site id -> its `tls:` (a callable of the certificate), per vendor.
POLICIES: dict[str, Any] = {
    "noca": lambda c: {},  # verification on (the default), the device's CA unknown
    "ca": lambda c: {"ca_file": c.cert},
    "pin": lambda c: {"pin_sha256": c.pin},
    "badpin": lambda c: {"pin_sha256": WRONG_PIN},
}


@pytest.fixture
async def https_davantis(certificate: Certificate) -> AsyncIterator[DavantisSimulator]:
    sites = {name: DavantisSite(media_delay=0) for name in POLICIES}
    simulator = DavantisSimulator(sites)
    url = await simulator.start(ssl_context=certificate.server_context())
    assert url.startswith("https://127.0.0.1:")
    try:
        yield simulator
    finally:
        await simulator.stop()


def _polls(metrics: Metrics, site_id: str, vendor: str, outcome: str) -> float:
    return metrics.sample("cms_ingest_polls_total", site_id=site_id, vendor=vendor, outcome=outcome)


async def _count(db: asyncpg.Connection, site_id: str) -> int:
    return int(await db.fetchval("SELECT count(*) FROM alarms WHERE site_id = $1", site_id))


async def _has_cursor(db: asyncpg.Connection, site_id: str) -> bool:
    value = await db.fetchval("SELECT cursor FROM site_state WHERE site_id = $1", site_id)
    return value is not None


async def test_tls_policy_per_site_against_https_devices(
    database_url: str,
    db: asyncpg.Connection,
    tmp_path: Path,
    certificate: Certificate,
    https_davantis: DavantisSimulator,
) -> None:
    """No CA: fails; CA file: ingests; right pin: ingests; wrong pin: fails loudly, once.

    Davantis and CamTrace both, side by side in one daemon, so the failing sites are seen
    not to disturb the working ones."""
    ct_sites = {"noca": CamTraceSite(media_delay=0), "pin": CamTraceSite(media_delay=0)}
    ct_sim = CamTraceSimulator(ct_sites)
    await ct_sim.start(ssl_context=certificate.server_context())
    dav = https_davantis
    try:
        sites = [
            davantis_site(f"tls-{name}", dav.url(name), tls=tls(certificate))
            for name, tls in POLICIES.items()
        ]
        sites += [
            camtrace_site("tls-ct-noca", ct_sim.url("noca")),
            camtrace_site("tls-ct-pin", ct_sim.url("pin"), tls={"pin_sha256": certificate.pin}),
        ]
        config = app_config(database_url, tmp_path, sites)
        with capture_logs() as logs:
            async with running_daemon(config) as daemon:
                for site_id in ("tls-ca", "tls-pin", "tls-ct-pin"):
                    await eventually(lambda s=site_id: _has_cursor(db, s), what=f"{site_id} cursor")
                for site in dav.sites.values():
                    site.add_alarms(3)
                for ct in ct_sites.values():
                    ct.add_alarms(2, recording=False)
                for site_id, n in (("tls-ca", 3), ("tls-pin", 3), ("tls-ct-pin", 2)):
                    await eventually(
                        lambda s=site_id, n=n: _has(db, s, n), what=f"{site_id}: {n} alarms"
                    )
                # Let the failing sites fail several polls: still one warning each.
                for site_id, vendor in (
                    ("tls-noca", "davantis"),
                    ("tls-badpin", "davantis"),
                    ("tls-ct-noca", "camtrace"),
                ):
                    await eventually(
                        lambda s=site_id, v=vendor: _polls(daemon.metrics, s, v, "tls_error") >= 3,
                        what=f"{site_id}: three failed polls",
                    )
                assert daemon.sites is not None
                health = {key: site.health for key, site in daemon.sites.by_id.items()}
                assert health["tls-ca"].up and health["tls-pin"].up and health["tls-ct-pin"].up
                for site_id in ("tls-noca", "tls-ct-noca"):
                    assert health[site_id].up is False
                    assert "TLS certificate not trusted" in (health[site_id].last_error or "")
                assert health["tls-badpin"].up is False
                assert "does not match the configured pin" in (
                    health["tls-badpin"].last_error or ""
                )
                # /status shows the same (what an operator's dashboard reads).
                status = _status(daemon)
                assert "pin" in status["tls-badpin"]["last_error"]
                assert status["tls-ca"]["up"] is True
                metrics = daemon.metrics
                assert _polls(metrics, "tls-ca", "davantis", "tls_error") == 0
                assert _polls(metrics, "tls-badpin", "davantis", "ok") == 0
                up = "cms_ingest_site_up"
                assert metrics.sample(up, site_id="tls-badpin", vendor="davantis") == 0
                assert metrics.sample(up, site_id="tls-pin", vendor="davantis") == 1

        # Nothing from the failing sites, and they were never even sent a request: the TLS
        # check happens before any HTTP (a password never goes to an unverified peer).
        for site_id in ("tls-noca", "tls-badpin", "tls-ct-noca"):
            assert await _count(db, site_id) == 0
            assert not await _has_cursor(db, site_id)
        assert dav.site("noca").requests == {} and dav.site("noca").logins == 0
        assert dav.site("badpin").requests == {} and dav.site("badpin").logins == 0
        assert ct_sites["noca"].requests == {}
        assert await _count(db, "tls-ca") == 3 and await _count(db, "tls-pin") == 3
        # Loud but once: one warning per failing site, naming the site and the reason.
        failing = [e for e in logs if e["event"] == "site_failing"]
        by_site = {e["site_id"]: e for e in failing}
        assert sorted(e["site_id"] for e in failing) == ["tls-badpin", "tls-ct-noca", "tls-noca"]
        assert by_site["tls-badpin"]["log_level"] == "warning"
        assert "does not match the configured pin" in by_site["tls-badpin"]["error"]
        assert "TLS certificate not trusted" in by_site["tls-noca"]["error"]
    finally:
        await ct_sim.stop()


async def _has(db: asyncpg.Connection, site_id: str, n: int) -> bool:
    return await _count(db, site_id) >= n


def _status(daemon: Any) -> dict[str, dict[str, Any]]:
    """Each site's health as `/status` renders it."""
    return {site["site_id"]: site for site in daemon.status()["sites"]}


async def _probe(config: Path, site_id: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cms_ingest.cli",
        "probe",
        "--config",
        str(config),
        site_id,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    return await process.wait(), out.decode()


async def test_probe_reports_tls_failures(
    tmp_path: Path, certificate: Certificate, https_davantis: DavantisSimulator
) -> None:
    for site in https_davantis.sites.values():
        site.add_alarms(1)
    config = tmp_path / "cms.yaml"
    dav = https_davantis
    config.write_text(
        "sites:\n"
        f"  - {{id: noca, vendor: davantis, url: '{dav.url('noca')}', username: cms,"
        " password: secret}\n"
        f"  - {{id: pin, vendor: davantis, url: '{dav.url('pin')}', username: cms,"
        f" password: secret, tls: {{pin_sha256: '{certificate.pin}'}}}}\n"
        f"  - {{id: badpin, vendor: davantis, url: '{dav.url('badpin')}', username: cms,"
        f" password: secret, tls: {{pin_sha256: '{WRONG_PIN}'}}}}\n"
    )
    results = await asyncio.gather(*(_probe(config, s) for s in ("noca", "pin", "badpin")))
    (noca_code, noca), (pin_code, pin), (bad_code, bad) = results
    assert noca_code == 1, noca
    assert "[FAIL] authentication and first poll" in noca
    assert "TlsFailure" in noca and "TLS certificate not trusted" in noca
    assert bad_code == 1, bad
    assert "[FAIL] authentication and first poll" in bad
    assert "TlsFailure" in bad and "does not match the configured pin" in bad
    assert pin_code == 0, pin  # the same device, pinned: every check passes
    assert "[PASS] one snapshot" in pin
    assert dav.site("noca").logins == 0 and dav.site("badpin").logins == 0
