"""Records from a long-poll body, whatever its framing.

Framing of the long-poll is not known publicly: SSE `data:` lines, newline-delimited JSON
and back-to-back JSON objects are all accepted (`StreamDecoder`, linear, bounded).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from cms_ingest.vendors.common import (
    MAX_JSON_DEPTH,
    finite_float,
    json_deeper_than,
    no_json_constant,
)

# A long-poll record is a few hundred bytes; one this long without its end is hostile, and
# re-reading it on every chunk would cost time quadratic in its size.
MAX_LIVE_RECORD_CHARS = 1024 * 1024

# What decides where a JSON record ends: brackets, quotes, escapes, and line breaks.
_STRUCTURE = re.compile(r'\\.?|["{}\[\]\n]', re.DOTALL)


@dataclass(slots=True)
class _OpenRecord:
    """A record begun but not yet complete: its text so far and where its scan stands."""

    parts: list[str] = field(default_factory=list)
    size: int = 0
    depth: int = 0
    in_string: bool = False
    escaped: bool = False  # the last part ended with a backslash inside a string


class StreamDecoder:
    """Records from a long-poll body: SSE `data:` lines, NDJSON or back-to-back JSON.

    Read like any device JSON (`common.load_json`): NaN, Infinity and numbers past a float
    become None, and a record nested deeper than MAX_JSON_DEPTH is unreadable. Parsing is
    linear: each character is scanned once for where its record ends (text is never copied
    again per chunk), and a record is decoded once, when complete. A record still without its
    end after MAX_LIVE_RECORD_CHARS is unreadable and dropped up to the next line break.
    """

    def __init__(self, max_record: int = MAX_LIVE_RECORD_CHARS) -> None:
        self._head = ""  # text not yet known to start a record (prefixes, blanks, a line)
        self._open: _OpenRecord | None = None
        self._max_record = max_record
        self._skipping = False  # inside an unreadable record: drop up to the next line break
        self._decoder = json.JSONDecoder(parse_constant=no_json_constant, parse_float=finite_float)

    def feed(self, chunk: str) -> tuple[list[Any], list[str]]:
        """(complete records, unreadable fragments) after adding `chunk`."""
        records: list[Any] = []
        garbage: list[str] = []
        while chunk:
            if self._skipping:
                line_end = chunk.find("\n")
                if line_end < 0:
                    break
                self._skipping = False
                chunk = chunk[line_end + 1 :]
            elif self._open is not None:
                chunk = self._continue_record(chunk, records, garbage)
            else:
                chunk = self._start(self._head + chunk, garbage)
        return records, garbage

    def _start(self, text: str, garbage: list[str]) -> str:
        """Consume prefixes, comments and garbage lines; what remains after a record starts."""
        self._head = ""
        while True:
            text = text.lstrip()
            if not text:
                return ""
            if text.startswith("data:"):
                text = text[5:]
                continue
            if text[0] in "{[":
                self._open = _OpenRecord()
                return text
            line_end = text.find("\n")
            if line_end < 0:
                if len(text) > self._max_record:
                    garbage.append(text[:200])
                    self._skipping = True
                    return ""
                self._head = text  # "data" or a line not complete yet
                return ""
            if not (text[0] == ":" or text.startswith(("event:", "id:", "retry:"))):
                garbage.append(text[:line_end][:200])
            text = text[line_end + 1 :]

    def _continue_record(self, chunk: str, records: list[Any], garbage: list[str]) -> str:
        """Scan `chunk` as the continuation of the open record; the text after it ends."""
        record = self._open
        assert record is not None
        start = 0
        if record.escaped:
            record.escaped, start = False, 1
        end = self._scan(record, chunk, start)
        if end is None:
            record.parts.append(chunk)
            record.size += len(chunk)
            if record.size > self._max_record:
                garbage.append("".join(record.parts)[:200])
                self._drop_open(chunk)
            return ""
        if end < 0:  # broken or nested too deep: unreadable up to its line break
            garbage.append(("".join(record.parts) + chunk)[:200].split("\n", 1)[0])
            return self._drop_open(chunk)
        text = "".join(record.parts) + chunk[:end]
        self._open = None
        self._decode(text, records, garbage)
        return chunk[end:]

    def _drop_open(self, chunk: str) -> str:
        """Forget the open record; what follows the next line break of `chunk`."""
        self._open = None
        line_end = chunk.find("\n")
        if line_end < 0:
            self._skipping = True
            return ""
        return chunk[line_end + 1 :]

    @staticmethod
    def _scan(record: _OpenRecord, chunk: str, start: int) -> int | None:
        """Index in `chunk` just past the record's closing bracket; None while incomplete;
        -1 when it cannot be one record (nested too deep, or a record starting on a line of
        its own inside it)."""
        for match in _STRUCTURE.finditer(chunk, start):
            mark = match.group()
            if mark[0] == "\\":
                record.escaped = len(mark) == 1  # the escaped character is in the next chunk
                continue
            if record.in_string:
                record.in_string = mark != '"'
                continue
            if mark == '"':
                record.in_string = True
            elif mark in "{[":
                record.depth += 1
                if record.depth > MAX_JSON_DEPTH:
                    return -1
            elif mark in "}]":
                record.depth -= 1
                if record.depth == 0:
                    return match.end()
            elif chunk.startswith(("{", "data:"), match.end()):  # a line break
                return -1
        return None

    def _decode(self, text: str, records: list[Any], garbage: list[str]) -> None:
        try:
            record, _ = self._decoder.raw_decode(text)
        except (json.JSONDecodeError, RecursionError):
            garbage.append(text[:200])
            return
        if json_deeper_than(record, MAX_JSON_DEPTH):
            garbage.append(text[:200])
        else:
            records.append(record)
