"""Writing a downloaded media file safely: temp file, size cap, fsync, atomic rename.

File names are ours (`<alarm id>-<kind>.<ext>`), the folder is the site and the alarm's UTC
date, and the extension comes from the file's magic bytes, not from anything the device says.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

# (magic test, extension, content type); the first match wins.
_SIGNATURES: tuple[tuple[str, bytes, int, str, str], ...] = (
    ("prefix", b"\xff\xd8\xff", 0, "jpg", "image/jpeg"),
    ("prefix", b"\x89PNG\r\n\x1a\n", 0, "png", "image/png"),
    ("prefix", b"GIF8", 0, "gif", "image/gif"),
    ("prefix", b"\x1a\x45\xdf\xa3", 0, "mkv", "video/x-matroska"),
    ("prefix", b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", 0, "wmv", "video/x-ms-wmv"),
    ("at", b"ftyp", 4, "mp4", "video/mp4"),
    ("riff", b"AVI ", 8, "avi", "video/x-msvideo"),
    ("riff", b"WEBP", 8, "webp", "image/webp"),
)


class MediaTooLarge(Exception):
    pass


@dataclass(frozen=True, slots=True)
class StoredFile:
    path: str  # relative to the media root
    content_type: str
    size_bytes: int
    sha256: str


def sniff(head: bytes) -> tuple[str, str]:
    """(extension, content type) from a file's first bytes."""
    for test, magic, offset, ext, ctype in _SIGNATURES:
        if test == "prefix" and head.startswith(magic):
            return ext, ctype
        if test == "at" and head[offset : offset + len(magic)] == magic:
            return ext, ctype
        if test == "riff" and head.startswith(b"RIFF") and head[8:12] == magic:
            return ext, ctype
    if len(head) > 188 and head[0] == 0x47 and head[188] == 0x47:
        return "ts", "video/mp2t"
    return "bin", "application/octet-stream"


def relative_path(site_id: str, alarm_id: int, kind: str, occurred_at: datetime, ext: str) -> str:
    day = occurred_at.astimezone(UTC)
    return f"{site_id}/{day:%Y}/{day:%m}/{day:%d}/{alarm_id}-{kind}.{ext}"


async def store_stream(
    chunks: AsyncIterator[bytes],
    *,
    root: Path,
    site_id: str,
    alarm_id: int,
    kind: str,
    occurred_at: datetime,
    max_bytes: int,
) -> StoredFile:
    """Stream to `root/.partial`, then rename into place. Nothing half-written is ever visible."""
    partial_dir = root / ".partial"
    await asyncio.to_thread(partial_dir.mkdir, parents=True, exist_ok=True)
    temp = partial_dir / f"{alarm_id}-{kind}-{uuid.uuid4().hex}.part"
    digest = hashlib.sha256()
    size = 0
    head = b""
    handle = await asyncio.to_thread(temp.open, "wb")
    try:
        async for chunk in chunks:
            size += len(chunk)
            if size > max_bytes:
                raise MediaTooLarge(f"larger than the {max_bytes}-byte cap (media.max_bytes)")
            if len(head) < 512:
                head += chunk[: 512 - len(head)]
            digest.update(chunk)
            await asyncio.to_thread(handle.write, chunk)
        await asyncio.to_thread(_flush_and_sync, handle)
    except BaseException:
        handle.close()
        temp.unlink(missing_ok=True)
        raise
    handle.close()
    ext, content_type = sniff(head)
    relative = relative_path(site_id, alarm_id, kind, occurred_at, ext)
    await asyncio.to_thread(_move_into_place, temp, root / relative)
    return StoredFile(relative, content_type, size, digest.hexdigest())


def _flush_and_sync(handle: IO[bytes]) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def _move_into_place(temp: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(temp, final)
    directory = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)
