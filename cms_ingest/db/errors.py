"""Failures the store tells apart: a commit refused for a value in it (`is_data_error`)."""

from __future__ import annotations

import asyncpg


def is_data_error(exc: BaseException) -> bool:
    """Whether a failed commit was refused for a value in it (PostgreSQL's class 22 "data
    exception", or a value that could not even be encoded), not for the database failing.
    Such a commit fails the same way every time: retrying it as an outage would stall the
    site for good."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, asyncpg.DataError | UnicodeError | OverflowError):
            return True
        if isinstance(error, ValueError | TypeError) and not isinstance(error, OSError):
            return True
        orig = getattr(error, "orig", None)  # SQLAlchemy's wrapper of the driver's error
        pending += [orig if isinstance(orig, BaseException) else None, error.__cause__]
    return False
