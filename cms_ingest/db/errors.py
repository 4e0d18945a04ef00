"""What the storage adapters raise when the database itself fails, told apart from our bugs.

`DatabaseUnavailable` is a connection-level failure: the server cannot be reached, went away,
is shutting down or starting up, became read-only in a failover, refused our login, or the
pool had no connection in time. Callers wait and retry it. Anything else (a bug in our SQL, a
constraint we did not expect) propagates unchanged, so the supervisor logs it with its
traceback and restarts the task with backoff instead of retrying it for ever as an outage.

Every adapter method that touches the database is wrapped with `@raises_unavailable`: the
mapping is made here and nowhere else.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, ParamSpec, TypeVar

import asyncpg
from sqlalchemy import exc as sa_exc


class DatabaseUnavailable(Exception):
    """The database cannot be used right now; the message is the underlying error's."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause) or type(cause).__name__)
        self.cause = cause


# SQLSTATE classes of a server we cannot use now: 08 connection exception, 28 login refused,
# 53 insufficient resources (too many connections, disk full), 57 operator intervention
# (shutdown, crash recovery, starting up, a cancelled backend).
_UNAVAILABLE_CLASSES = frozenset({"08", "28", "53", "57"})
# read_only_sql_transaction (a primary demoted under us), idle_in_transaction_session_timeout
# (the server ended a session frozen inside a transaction).
_UNAVAILABLE_STATES = frozenset({"25006", "25P03"})
_CONNECTION_EXCEPTIONS: tuple[type[BaseException], ...] = (
    DatabaseUnavailable,
    OSError,  # refused, reset, unreachable; TimeoutError is one too
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,  # used after the connection closed
    asyncpg.InternalClientError,  # TargetServerAttributeNotMatched: no primary right now
    sa_exc.TimeoutError,  # the pool had no connection to give in time
    sa_exc.DisconnectionError,
    sa_exc.OperationalError,
)


def is_connection_failure(exc: BaseException) -> bool:
    """Whether `exc`, or an error it wraps (SQLAlchemy's `orig`, `__cause__`), says the
    database is unreachable or unusable now rather than that our statement is wrong."""
    return any(_says_unavailable(error) for error in _wrapped(exc))


def _wrapped(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every error it wraps (SQLAlchemy's `orig`, `__cause__`), each once."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        orig = getattr(error, "orig", None)  # SQLAlchemy's wrapper of the driver's error
        pending += [orig if isinstance(orig, BaseException) else None, error.__cause__]


def _says_unavailable(error: BaseException) -> bool:
    if isinstance(error, _CONNECTION_EXCEPTIONS):
        return True
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    sqlstate = getattr(error, "sqlstate", None)
    if not isinstance(sqlstate, str):
        return False
    return sqlstate in _UNAVAILABLE_STATES or sqlstate[:2] in _UNAVAILABLE_CLASSES


_P = ParamSpec("_P")
_R = TypeVar("_R")


def raises_unavailable(
    method: Callable[_P, Awaitable[_R]],
) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """Wrap an adapter method: a connection-level failure becomes `DatabaseUnavailable`
    (chained to the original); every other exception passes through untouched."""

    @functools.wraps(method)
    async def guarded(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await method(*args, **kwargs)
        except DatabaseUnavailable:
            raise
        except Exception as exc:
            if is_connection_failure(exc):
                raise DatabaseUnavailable(exc) from exc
            raise

    return guarded


def is_data_error(exc: BaseException) -> bool:
    """Whether a failed commit was refused for a value in it (PostgreSQL's class 22 "data
    exception", or a value that could not even be encoded), not for the database failing.
    Such a commit fails the same way every time: retrying it as an outage would stall the
    site for good."""
    if isinstance(exc, DatabaseUnavailable):
        return False
    return any(_says_bad_value(error) for error in _wrapped(exc))


def _says_bad_value(error: BaseException) -> bool:
    if isinstance(error, asyncpg.DataError | UnicodeError | OverflowError):
        return True
    return isinstance(error, ValueError | TypeError) and not isinstance(error, OSError)
