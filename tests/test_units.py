"""Pure pieces: retry policy, durations, media sniffing, log redaction."""

from __future__ import annotations

import io
import json
import random

import pytest

from cms_ingest.logs import configure_logging, get_logger, redact_text
from cms_ingest.mediafiles import relative_path, sniff
from cms_ingest.retry import RetryPolicy
from cms_ingest.units import parse_duration


def test_retry_policy_grows_caps_and_jitters() -> None:
    policy = RetryPolicy(base=1.0, factor=2.0, cap=10.0, jitter=0.5)
    assert [policy.ceiling(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert policy.ceiling(10_000) == 10  # no float overflow after days of failures
    rng = random.Random(1)
    delays = [policy.delay(3, rng) for _ in range(200)]
    assert all(2.0 <= d <= 4.0 for d in delays)
    assert max(delays) - min(delays) > 1.0  # spread, so sites that failed together don't sync
    assert RetryPolicy(base=1, jitter=0).delay(2) == 2.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (90, 90.0),
        ("90", 90.0),
        ("90s", 90.0),
        ("15m", 900.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1h30m", 5400.0),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "2 weeks", "-5", True, "h2", "1x"])
def test_bad_durations_say_how(text: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("head", "ext", "ctype"),
    [
        (b"\xff\xd8\xff\xe0rest", "jpg", "image/jpeg"),
        (b"\x89PNG\r\n\x1a\nrest", "png", "image/png"),
        (b"\x00\x00\x00\x18ftypmp42", "mp4", "video/mp4"),
        (b"\x1a\x45\xdf\xa3rest", "mkv", "video/x-matroska"),
        (b"RIFF\x00\x00\x00\x00AVI LIST", "avi", "video/x-msvideo"),
        (b"\x30\x26\xb2\x75\x8e\x66\xcf\x11rest", "wmv", "video/x-ms-wmv"),
        (b"<html>not media</html>", "bin", "application/octet-stream"),
    ],
)
def test_extension_comes_from_magic_bytes(head: bytes, ext: str, ctype: str) -> None:
    assert sniff(head) == (ext, ctype)


def test_media_path_is_ours() -> None:
    from datetime import datetime, timedelta, timezone

    local = datetime(2026, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=2)))  # 2025-12-31 UTC
    assert relative_path("site-a", 42, "video", local, "mp4") == "site-a/2025/12/31/42-video.mp4"


def test_redaction_of_free_text() -> None:
    text = (
        "GET https://cms:hunter2@10.0.0.1/x?token=abc123&x=1 "
        "Authorization: Bearer eyJhbGciOi.secret and postgresql://u:pw@db/cms"
    )
    redacted = redact_text(text)
    for secret in ("hunter2", "abc123", "eyJhbGciOi.secret", ":pw@"):
        assert secret not in redacted
    assert "x=1" in redacted and "10.0.0.1" in redacted


def test_log_lines_are_json_and_never_carry_secrets() -> None:
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    log = get_logger(site_id="s1", vendor="davantis")
    log.info("login", password="hunter2", refresh_token="r-123", detail={"access_token": "a-9"})
    try:
        raise RuntimeError("failed for https://u:pw-77@host/")
    except RuntimeError:
        log.exception("crash")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["site_id"] == "s1" and lines[0]["event"] == "login"
    text = stream.getvalue()
    for secret in ("hunter2", "r-123", "a-9", "pw-77"):
        assert secret not in text
