"""The daemon sizes its connection pool by its sites and raises its open-files limit to
carry it (a process's limit, so shown in child processes with limits of their own)."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from cms_ingest.sitehttp import connection_limit

PROBE = (
    "import resource; from cms_ingest.sitehttp import raise_open_files_limit as r; "
    "print(*r({wanted}), *resource.getrlimit(resource.RLIMIT_NOFILE))"
)


def limits_after(wanted: int, soft: int, hard: int) -> list[int]:
    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(wanted=wanted)],
        preexec_fn=lower,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return [int(value) for value in out.split()]


@pytest.mark.skipif(
    resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 4096, reason="hard limit below 4096 here"
)
def test_the_soft_limit_is_raised_up_to_the_hard_limit_never_past_it() -> None:
    assert limits_after(3000, 256, 4096) == [3000, 4096, 3000, 4096]
    assert limits_after(10000, 256, 4096) == [4096, 4096, 4096, 4096], "capped by the hard one"
    assert limits_after(100, 256, 4096) == [256, 4096, 256, 4096], "never lowered"


def test_every_site_gets_connections_of_its_own() -> None:
    assert connection_limit(10) == 1000
    assert connection_limit(8000) == 32000
