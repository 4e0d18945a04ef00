"""structlog set-up: JSON lines unless on a terminal, secrets redacted before rendering.

Context (`site_id`, `vendor`, `task`) is bound per asyncio task with contextvars, so every
line a poller writes names its site without passing a logger around.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

SECRET_KEYS = frozenset(
    {
        "password",
        "passwd",
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "secret",
        "client_secret",
        "authorization",
        "api_key",
        "apikey",
        "session",
        "sessionid",
        "session_id",
        "cookie",
        "database_url",
    }
)
REDACTED = "[redacted]"
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<pw>[^@/\s]+)@")
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&](?:token|access_token|refresh_token|password|p|sessionid|s|api_key)=)[^&\s\"']+",
    re.IGNORECASE,
)
_BEARER = re.compile(r"(?P<kind>Bearer|Basic|ManythingToken)\s+[A-Za-z0-9._~+/=*:-]+")


def redact_text(text: str) -> str:
    """Mask URL passwords, secret query parameters and Authorization values in free text."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    text = _QUERY_SECRET.sub(lambda m: f"{m['key']}{REDACTED}", text)
    return _BEARER.sub(lambda m: f"{m['kind']} {REDACTED}", text)


def _redact_value(key: str, value: Any) -> Any:
    if key.lower() in SECRET_KEYS and value not in (None, ""):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value("", v) for v in value]
    return value


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: the last step before rendering, so nothing escapes it."""
    for key in list(event_dict):
        event_dict[key] = _redact_value(key, event_dict[key])
    return event_dict


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    json_output = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_output
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    exception_step: Any = (
        # Tracebacks as structured data without local variables: locals may hold secrets.
        structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        if json_output
        else structlog.processors.format_exc_info
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            exception_step,
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Libraries log through the standard library: keep their warnings, drop their chatter.
    logging.basicConfig(level=logging.WARNING, stream=stream, force=True)


def get_logger(**context: Any) -> Any:
    return structlog.get_logger("cms_ingest").bind(**context)
