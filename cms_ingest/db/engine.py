"""Connecting to PostgreSQL: the configured server, or an embedded one; and migrating it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event, text
from sqlalchemy.engine import URL, Connection, ExceptionContext, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from cms_ingest.db.errors import raises_unavailable

MIGRATION_LOCK_KEY = 0x636D_7369  # "cmsi": one migrator at a time across daemons


DEFAULT_PORT = 5432
_SCHEMES = ("postgres", "postgresql", "postgresql+asyncpg")
# scheme://[user[:password]@] then the host list, as SQLAlchemy's own URL pattern splits it.
_HOSTSPEC = re.compile(
    r"(?P<head>[\w+]+://(?:[^:/]*(?::[^@]*)?@)?)(?P<hosts>[^/?]*)(?P<rest>.*)", re.S
)
_Host = tuple[str, int | None]


def async_url(url: str) -> str:
    """Any accepted PostgreSQL URL as SQLAlchemy's asyncpg URL.

    Several hosts (libpq's `h1:p1,h2:p2`, `?host=h1,h2&port=p1,p2` or repeated `?host=h:p`)
    become `?host=h1,h2&port=p1,p2`, every port explicit, which the asyncpg dialect hands to
    asyncpg as lists; `target_session_attrs` and the other parameters pass through as given.
    """
    parsed, hosts = _parse(url)
    parsed = parsed.set(drivername="postgresql+asyncpg")
    if hosts:
        parsed = _with_hosts(parsed, hosts, bracket_ipv6=False)
    return parsed.render_as_string(hide_password=False)


def plain_url(url: str) -> str:
    """The libpq/asyncpg form (postgresql://...) for asyncpg.connect (LISTEN).

    Several hosts are written `?host=h1,[::1]&port=p1,p2`: the form asyncpg's DSN parser takes.
    """
    parsed, hosts = _parse(url)
    parsed = parsed.set(drivername="postgresql")
    if hosts:
        parsed = _with_hosts(parsed, hosts, bracket_ipv6=True)
    return parsed.render_as_string(hide_password=False)


def _parse(url: str) -> tuple[URL, list[tuple[str, int]] | None]:
    """The URL and, when it names several hosts, those hosts with their ports.

    Error messages show the scheme, host names and ports, never the URL (it may hold a password).
    """
    split = _HOSTSPEC.match(url)
    specs: list[_Host] | None
    if split is not None and "," in split["hosts"]:
        specs = [_split_host(unquote(spec)) for spec in split["hosts"].split(",")]
        parsed = make_url(split["head"] + split["rest"])
        if "host" in parsed.query or "port" in parsed.query:
            raise ValueError(
                "database URL: hosts given both before the database name and as host=/port="
            )
    else:
        parsed = make_url(url)
        specs = _query_hosts(parsed)
    if parsed.drivername not in _SCHEMES:
        raise ValueError(f"not a PostgreSQL URL: scheme {parsed.drivername!r}")
    if specs is None:
        return parsed, None
    ports = _query_list(parsed, "port")
    if ports and len(ports) not in (1, len(specs)):
        raise ValueError(
            f"database URL: {len(specs)} hosts but {len(ports)} ports; give one port for all "
            "or one per host"
        )
    hosts: list[tuple[str, int]] = []
    for index, (host, inline) in enumerate(specs):
        port = inline
        if port is None and ports:
            port = _port(ports[index if len(ports) > 1 else 0])
        hosts.append((host, DEFAULT_PORT if port is None else port))
    return parsed.difference_update_query(["host", "port"]), hosts


def _query_list(parsed: URL, key: str) -> list[str]:
    value = parsed.query.get(key)
    if value is None:
        return []
    values = [value] if isinstance(value, str) else list(value)
    return [part for item in values for part in item.split(",")]


def _query_hosts(parsed: URL) -> list[_Host] | None:
    """Hosts given as `?host=`: None for none or one (left as given, as before)."""
    entries = _query_list(parsed, "host")
    if len(entries) < 2:
        return None
    # libpq's `host=` takes bare names with `port=` beside; SQLAlchemy's also takes `host=h:p`.
    inline = "port" not in parsed.query
    return [_split_host(entry) if inline else (_bare(entry), None) for entry in entries]


def _split_host(spec: str) -> _Host:
    """`host`, `host:port`, `[v6]`, `[v6]:port`, a bare IPv6 address or a socket directory."""
    if spec.startswith("["):
        match = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", spec)
        if match is None:
            raise ValueError(f"database URL: bad host {spec!r}")
        return match[1], _port(match[2]) if match[2] else None
    if spec.count(":") > 1 and re.fullmatch(r"[0-9A-Fa-f:.]+(%\w+)?", spec):
        return spec, None  # a bare IPv6 address: no port can follow it
    host, colon, port = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if not host:
        raise ValueError("database URL: empty host in the host list")
    if ":" in host and not host.startswith("/"):
        raise ValueError(f"database URL: bad host {spec!r} (write IPv6 addresses as [addr])")
    return host, _port(port) if colon else None


def _bare(host: str) -> str:
    if not host:
        raise ValueError("database URL: empty host in the host list")
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"database URL: bad port {text!r}")
    return int(text)


def _with_hosts(parsed: URL, hosts: list[tuple[str, int]], *, bracket_ipv6: bool) -> URL:
    def name(host: str) -> str:
        return f"[{host}]" if bracket_ipv6 and ":" in host and not host.startswith("/") else host

    return parsed.set(host=None, port=None).update_query_dict(
        {
            "host": ",".join(name(host) for host, _ in hosts),
            "port": ",".join(str(port) for _, port in hosts),
        }
    )


APPLICATION_NAME = "cms-ingest"


def create_engine(
    url: str, *, pool_size: int = 10, idle_in_transaction_s: float = 30.0
) -> AsyncEngine:
    """One small pool for the whole daemon: sites never get a connection each; their
    commits are batched by the alarm writer.

    `idle_in_transaction_s`: a daemon frozen inside a transaction (SIGSTOP, a paused VM)
    would keep its lease rows locked, and no other daemon could take those sites over; the
    server ends such a session after this long. Our transactions wait on nothing but the
    database, so the daemon sets it well under lease_ttl.
    """
    settings = {
        "application_name": APPLICATION_NAME,
        "idle_in_transaction_session_timeout": f"{int(idle_in_transaction_s * 1000)}ms",
    }
    engine = create_async_engine(
        async_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={"server_settings": settings, "timeout": 10},
    )
    event.listen(engine.sync_engine, "handle_error", _not_primary_is_a_disconnect)
    return engine


# read_only_sql_transaction: the server stopped being a primary under an open session
# (fenced read-only, or demoted without a restart). pool_pre_ping cannot see it, since
# the session still answers; treating it as a disconnect empties the pool, and the new
# connections go where target_session_attrs=read-write finds the primary now.
NOT_PRIMARY_SQLSTATES = frozenset({"25006"})


def _not_primary_is_a_disconnect(context: ExceptionContext) -> None:
    if getattr(context.original_exception, "sqlstate", None) in NOT_PRIMARY_SQLSTATES:
        context.is_disconnect = True


@contextlib.asynccontextmanager
async def embedded_postgres(data_dir: Path) -> AsyncIterator[str]:
    """An embedded PostgreSQL under `data_dir/pgdata`, stopped on exit; yields its URL."""
    with warnings.catch_warnings():  # pgserver's platformdirs warns about XDG_RUNTIME_DIR
        warnings.simplefilter("ignore")
        import pgserver

    pgdata = data_dir / "pgdata"
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    server = await asyncio.to_thread(
        pgserver.get_server,  # type: ignore[attr-defined]
        pgdata,
        cleanup_mode="stop",
    )
    try:
        yield str(server.get_uri())
    finally:
        await asyncio.to_thread(server.cleanup)


def migrations_dir() -> Path:
    """The alembic scripts: shipped inside the wheel, or the source tree's `migrations/`."""
    package = Path(__file__).resolve().parent.parent  # cms_ingest/, from cms_ingest/db/
    for candidate in (package / "_migrations", package.parent / "migrations"):
        if (candidate / "env.py").exists():
            return candidate
    raise FileNotFoundError("alembic migrations not found next to the cms_ingest package")


def alembic_config() -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(migrations_dir()))
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


INSUFFICIENT_PRIVILEGE = "42501"  # SQLSTATE


class MigrationNeeded(RuntimeError):
    """The schema is behind the code, and this database user may not change it.

    The daemon's own role (`cms_daemon`, deploy/sql/roles.sql) has no DDL rights: the
    migrations are run by `cms-ingest migrate` as `cms_migrator`.
    """

    def __init__(self, current: str | None, head: str | None, user: str, reason: str) -> None:
        self.current = current
        self.head = head
        self.user = user
        super().__init__(
            f"database schema at {current or 'nothing (no tables yet)'}, code needs {head}, "
            f"and database user {user!r} may not migrate it ({reason}); run `cms-ingest "
            "migrate` with the migrator's database_url (see deploy/sql/roles.sql)"
        )


def _privilege_refusal(exc: BaseException) -> str | None:
    """The server's message when `exc` is, or wraps, SQLSTATE 42501; None otherwise."""
    message: str | None = None
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "sqlstate", None) == INSUFFICIENT_PRIVILEGE:
            message = str(error).rpartition(">: ")[2]  # the driver adapter's "<class ...>: "
        error = getattr(error, "orig", None) or error.__cause__
    return message


def _upgrade(connection: Connection) -> None:
    head = head_revision()
    # The usual start has nothing to do, and finding that out only reads alembic_version:
    # a daemon whose database user has no DDL rights starts against a current schema.
    if _current(connection) == head:
        return
    connection.rollback()
    # A session-level lock, released only after the migration committed: the next
    # migrator then sees the finished schema and has nothing left to do.
    connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    connection.commit()
    try:
        current = _current(connection)
        if current == head:
            return
        config = alembic_config()
        config.attributes["connection"] = connection
        try:
            command.upgrade(config, "head")
        except Exception as exc:
            reason = _privilege_refusal(exc)
            if reason is None:
                raise
            connection.rollback()
            user = connection.execute(text("SELECT current_user")).scalar()
            raise MigrationNeeded(current, head, str(user), reason) from exc
        connection.commit()
    finally:
        connection.rollback()
        connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
        connection.commit()


@raises_unavailable
async def migrate(engine: AsyncEngine) -> None:
    """Apply every pending migration (safe when several daemons start at once).

    Raises `MigrationNeeded` when the schema is behind and the database user may not migrate
    it (the daemon's `cms_daemon`): the message says what to run.
    """
    async with engine.connect() as connection:
        await connection.run_sync(_upgrade)
        await connection.commit()


def _current(connection: Connection) -> Any:
    return MigrationContext.configure(connection).get_current_revision()


@raises_unavailable
async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as connection:
        revision = await connection.run_sync(_current)
    return None if revision is None else str(revision)
