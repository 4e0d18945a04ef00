"""Small value types shared by config and vendor options."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(d|h|m|s)", re.IGNORECASE)
_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(value: object) -> float:
    """Seconds from `90`, `"90s"`, `"15m"`, `"2h"`, `"1d"`, `"1h30m"`.

    Raises ValueError naming the accepted forms, so a config error says how to fix it.
    """
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or text like '90s', '15m', '2h'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        else:
            parts = _DURATION_PART.findall(text)
            if not parts or "".join(n + u for n, u in parts).lower() != text.lower():
                raise ValueError(
                    f"{value!r} is not a duration: use seconds or text like '90s', '15m', '2h'"
                )
            seconds = sum(float(n) * _SECONDS[u.lower()] for n, u in parts)
    else:
        raise ValueError("a duration is a number of seconds or text like '90s', '15m', '2h'")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
