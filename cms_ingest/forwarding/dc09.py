"""SIA DC-09 (ANSI/SIA DC-09-2013) messages, as an alarm transmitter sends them: pure code.

A message travels as ``LF crc len body CR``: `crc` is the CRC-16/ARC (poly 0xA001, reflected,
init 0) of `body` as 4 upper-case hex digits, `len` the body's length as 4 hex digits. The body::

    "SIA-DCS"0001R0L0#1234[#1234|Nri1/BA001][V42][H12:00:00,12-03-2026]_12:00:05,12-03-2026

is the message type in quotes (``*`` inside the quotes when encrypted), the sequence number
(0001-9999; 0000 for a NULL supervision message), receiver ``R`` and line ``L`` (hex), the
account, then the data in brackets, the extended-data blocks in brackets, and the timestamp
(``_HH:MM:SS,MM-DD-YYYY``, GMT). When encrypted, everything after the ``[`` is AES-CBC (zero
IV) of ``pad|data...timestamp`` in hex, the pad random characters making it a multiple of 16
bytes.

The receiver answers ``"ACK"`` (``"*ACK"`` when encrypted), ``"NAK"`` with its own timestamp
(our timestamp was outside its window, or the message was unreadable), or ``"DUH"`` (it does
not understand the message). `parse_answer` reads them.

This module imports nothing of ours (the domain would be allowed).
"""

from __future__ import annotations

import enum
import re
import secrets
import string
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

MAX_SEQUENCE = 9999
TIMESTAMP_FORMAT = "%H:%M:%S,%m-%d-%Y"
LF = b"\n"
CR = b"\r"
# Receivers read a message in one go (pysiaalarm reads 1000 bytes at a time): texts are cut
# so that the longest message, encrypted (hex doubles it), stays under 1000 bytes.
MAX_TEXT = 64
MAX_XDATA = 200
MAX_FRAME = 1000
_ZERO_IV = bytes(16)
# Pad characters: anything but the separators a receiver looks for (`|`, `[`, `]`).
_PAD_ALPHABET = string.ascii_letters + string.digits
_HEX_ID_RE = re.compile(r"[0-9A-F]{1,6}")
_ACCOUNT_RE = re.compile(r"[0-9A-F]{3,16}")
_UNSAFE_TEXT_RE = re.compile(r"[^ -~]|[\[\]|^_\"]")  # non-printable ASCII and separators


class MessageFormat(enum.StrEnum):
    SIA_DCS = "SIA-DCS"  # SIA DC-03 data: event code letters and zone
    ADM_CID = "ADM-CID"  # Ademco Contact ID data: qualifier, event, partition, zone
    NULL = "NULL"  # link supervision, no data


class AnswerKind(enum.StrEnum):
    ACK = "ACK"
    NAK = "NAK"
    DUH = "DUH"
    RSP = "RSP"  # an ACK with data for us (treated as ACK)


class BadAnswer(ValueError):
    """Bytes from the receiver that are not a DC-09 answer (bad frame, CRC, or content)."""


@dataclass(frozen=True, slots=True)
class SiaEvent:
    """One event in SIA DC-03 terms: a two-letter code on a zone (and area)."""

    code: str  # two letters, e.g. "BA"
    zone: int = 0
    area: int = 1


@dataclass(frozen=True, slots=True)
class ContactIdEvent:
    """One event in Contact ID terms: qualifier 1 (new) / 3 (restore), a 3-digit event,
    partition and zone."""

    qualifier: int  # 1 new event or opening, 3 restore or closing, 6 previous
    event: int  # 100..999, e.g. 130 burglary
    zone: int = 0
    partition: int = 1


Event = SiaEvent | ContactIdEvent


@dataclass(frozen=True, slots=True)
class Answer:
    kind: AnswerKind
    sequence: str
    encrypted: bool
    timestamp: datetime | None  # the receiver's clock, when it sent it in clear (a NAK does)
    text: str  # the body as received, for logs and `forward-test`


def crc16(data: bytes) -> int:
    """CRC-16/ARC: polynomial 0xA001 (reflected 0x8005), initial value 0, as DC-09 uses."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def check_account(account: str) -> str:
    """An account number as DC-09 carries it: 3 to 16 hex digits, upper case."""
    value = account.strip().upper()
    if not _ACCOUNT_RE.fullmatch(value):
        raise ValueError("an account must be 3 to 16 hex digits")
    return value


def check_hex_id(value: str, what: str) -> str:
    """A receiver or line number: 1 to 6 hex digits, upper case."""
    text = value.strip().upper()
    if not _HEX_ID_RE.fullmatch(text):
        raise ValueError(f"a {what} number must be 1 to 6 hex digits")
    return text


def safe_text(value: str, limit: int = MAX_TEXT) -> str:
    """Text a receiver can carry: printable ASCII without DC-09's separators, cut to `limit`."""
    cleaned = _UNSAFE_TEXT_RE.sub(" ", value.encode("ascii", "replace").decode("ascii"))
    return " ".join(cleaned.split())[:limit]


def format_timestamp(moment: datetime) -> str:
    """``HH:MM:SS,MM-DD-YYYY`` in GMT (without the leading underscore)."""
    return moment.astimezone(UTC).strftime(TIMESTAMP_FORMAT)


def event_data(account: str, event: Event) -> str:
    """The data between the brackets (unencrypted), after ``#account|``."""
    if isinstance(event, SiaEvent):
        if not re.fullmatch(r"[A-Z]{2}", event.code):
            raise ValueError(f"SIA event code {event.code!r} is not two capital letters")
        zone_text = f"{min(max(event.zone, 0), 9999):03d}"
        return f"#{account}|Nri{min(max(event.area, 0), 99)}/{event.code}{zone_text}"
    qualifier, number = event.qualifier, event.event
    if qualifier not in (1, 3, 6) or not 0 <= number <= 999:
        raise ValueError(f"Contact ID event {qualifier}{number:03d} is not valid")
    partition = min(max(event.partition, 0), 99)
    zone = min(max(event.zone, 0), 999)
    return f"#{account}|{qualifier}{number:03d} {partition:02d} {zone:03d}"


def build_message(
    *,
    message_format: MessageFormat,
    sequence: int,
    receiver: str,
    line: str,
    account: str,
    event: Event | None,
    extended: list[tuple[str, str]] | None = None,
    sent_at: datetime,
    key: bytes | None = None,
) -> bytes:
    """One framed message. `extended`: (identifier, value) blocks such as ``("V", "42")``;
    `sent_at`: the timestamp the receiver judges (our clock corrected by its offset);
    `key`: the AES key (16, 24 or 32 bytes), or None for a plain message."""
    if not 0 <= sequence <= MAX_SEQUENCE:
        raise ValueError(f"sequence {sequence} is not in 0..{MAX_SEQUENCE}")
    if message_format is MessageFormat.NULL:
        data = ""
    elif event is None:
        raise ValueError(f"a {message_format} message needs an event")
    else:
        data = event_data(account, event)
    blocks = "".join(
        f"[{identifier}{safe_text(value, MAX_XDATA)}]" for identifier, value in extended or []
    )
    content = f"{data}]{blocks}_{format_timestamp(sent_at)}"
    flag = "*" if key is not None else ""
    head = f'"{flag}{message_format.value}"{sequence:04d}R{receiver}L{line}#{account}['
    if key is not None:
        content = encrypt(key, content)
    body = (head + content).encode("ascii")
    return LF + f"{crc16(body):04X}{len(body):04X}".encode("ascii") + body + CR


def encrypt(key: bytes, content: str) -> str:
    """``pad|content`` AES-CBC encrypted with a zero IV, as upper-case hex."""
    plain = "|" + content
    pad = (-len(plain)) % 16
    plain = "".join(secrets.choice(_PAD_ALPHABET) for _ in range(pad)) + plain
    encryptor = Cipher(algorithms.AES(key), modes.CBC(_ZERO_IV)).encryptor()
    sealed = encryptor.update(plain.encode("ascii")) + encryptor.finalize()
    return sealed.hex().upper()


def decrypt(key: bytes, hex_text: str) -> str:
    """The plain text of an encrypted part (pad included)."""
    try:
        sealed = bytes.fromhex(hex_text)
    except ValueError:
        raise BadAnswer("encrypted part is not hex") from None
    if not sealed or len(sealed) % 16:
        raise BadAnswer("encrypted part is not a whole number of AES blocks")
    decryptor = Cipher(algorithms.AES(key), modes.CBC(_ZERO_IV)).decryptor()
    return (decryptor.update(sealed) + decryptor.finalize()).decode("ascii", "replace")


_ANSWER_RE = re.compile(
    r'"(?P<star>\*?)(?P<kind>ACK|NAK|DUH|RSP)"(?P<seq>\d{4})(?P<rest>.*)$', re.DOTALL
)
_TIMESTAMP_RE = re.compile(r"_(\d{2}:\d{2}:\d{2},\d{2}-\d{2}-\d{4})\s*$")


def unframe(frame: bytes) -> str:
    """The body of one frame (without LF and CR), its CRC and length checked."""
    text = frame.strip(b"\r\n")
    if len(text) < 8:
        raise BadAnswer("answer too short")
    head, body = text[:8], text[8:]
    try:
        crc, length = int(head[:4], 16), int(head[4:], 16)
    except ValueError:
        raise BadAnswer("answer header is not hex") from None
    if crc != crc16(body):
        raise BadAnswer("answer CRC mismatch")
    if length != len(body):
        raise BadAnswer("answer length mismatch")
    return body.decode("ascii", "replace")


def parse_answer(frame: bytes, key: bytes | None = None) -> Answer:
    """Read one framed answer; raises BadAnswer for anything else. With `key`, the
    timestamp of an encrypted answer is read from its decrypted part."""
    body = unframe(frame)
    match = _ANSWER_RE.match(body)
    if match is None:
        raise BadAnswer("not an ACK, NAK, DUH or RSP")
    encrypted = bool(match["star"])
    rest = match["rest"]
    if encrypted and key is not None and "[" in rest:
        rest = decrypt(key, rest.split("[", 1)[1].strip())
    stamp = _TIMESTAMP_RE.search(rest)
    timestamp = None
    if stamp is not None:
        try:
            timestamp = datetime.strptime(stamp[1], TIMESTAMP_FORMAT).replace(tzinfo=UTC)
        except ValueError:
            timestamp = None
    return Answer(AnswerKind(match["kind"]), match["seq"], encrypted, timestamp, body)


class FrameReader:
    """Cuts a byte stream into frames (LF ... CR); bytes outside frames are dropped."""

    def __init__(self, limit: int = 4096) -> None:
        self._buffer = b""
        self._limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames: list[bytes] = []
        while True:
            start = self._buffer.find(LF)
            if start < 0:
                self._buffer = b""
                return frames
            end = self._buffer.find(CR, start)
            if end < 0:
                self._buffer = self._buffer[start:]
                if len(self._buffer) > self._limit:
                    self._buffer = b""  # a runaway frame: drop it
                return frames
            frames.append(self._buffer[start : end + 1])
            self._buffer = self._buffer[end + 1 :]


def parse_key(text: str, encoding: str) -> bytes:
    """An AES key from the config: ``hex`` (32, 48 or 64 hex digits, the DC-09 norm) or
    ``text`` (16, 24 or 32 characters used as bytes, as pysiaalarm and Home Assistant do).
    Errors never quote the key."""
    value = text.strip()
    if encoding == "hex":
        try:
            key = bytes.fromhex(value)
        except ValueError:
            raise ValueError("the AES key is not hex digits") from None
    else:
        key = value.encode("utf-8")
    if len(key) not in (16, 24, 32):
        unit = "hex digits (32, 48 or 64)" if encoding == "hex" else "characters (16, 24 or 32)"
        raise ValueError(f"the AES key must be 128, 192 or 256 bits: {unit}")
    return key
