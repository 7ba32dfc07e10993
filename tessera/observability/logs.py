"""Log format, secret redaction and the request id, the same in every process.

`configure_logging(level, fmt)` installs one stderr handler on the root
logger: JSON lines (one object per record) when stderr is not a terminal,
plain text when it is (`--log-format auto`), or what the flag says.
Every record passes `RedactSecrets` first, whichever format, so a token,
a TLS-PSK key or a database password that slipped into a message or a
traceback never reaches the log. The fields a record carries through
`extra=` (request_id, volume_id, rpc, ...) become JSON keys; the request
id of the call being served comes from a context variable, so lines logged
deep inside a handler carry it too.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import json
import logging
import re
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from tessera import __version__

FORMATS = ("auto", "json", "text")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
#: what a JSON line may carry besides ts, level, logger and msg (the contract's list)
FIELDS = (
    "request_id",
    "volume_id",
    "node_id",
    "rpc",
    "route",
    "method",
    "status",
    "code",
    "duration_ms",
)
REDACTED = "[REDACTED]"

#: the request id of the RPC / HTTP request this thread or task serves
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
#: a request id a client sends is echoed back and logged: keep it short and plain
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# ---- redaction ---------------------------------------------------------------------

#: secret values this process knows (its bearer token): scrubbed wherever they appear
_known: set[str] = set()
_SECRET_KEY = (
    r"[A-Za-z0-9_.-]*(?:token|psk|password|passwd|secret|authorization|credential)[A-Za-z0-9_.-]*"
)
_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # Authorization: Bearer <token>
    (re.compile(r"(?i)\b(bearer\s+)(?!token\b|<)[^\s\"',;]+"), rf"\g<1>{REDACTED}"),
    # postgresql://user:password@host/db (a DB URL in an error or a flag dump)
    (re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/@\"']*:)[^\s@/\"']+@"), rf"\g<1>{REDACTED}@"),
    # a CSI request's `secrets` map: as JSON / a dict repr, and in protobuf text format
    (re.compile(r"(?i)([\"']secrets[\"']\s*:\s*)\{[^{}]*\}"), rf"\g<1>{REDACTED}"),
    (re.compile(r"\b(secrets\s*)\{[^{}]*\}"), rf"\g<1>{REDACTED}"),
    # "psk_key": "abc", 'token': 'abc'  (JSON, Python reprs of dicts)
    (
        re.compile(rf"(?i)([\"']{_SECRET_KEY}[\"']\s*:\s*)([\"'])(?:(?!\2).)*\2"),
        rf"\g<1>\g<2>{REDACTED}\g<2>",
    ),
    # token=abc, psk_key=abc (a --tls-psk=FILE path goes too: harmless); never `word: text`,
    # which is prose ("missing bearer token: send ...")
    (
        re.compile(rf"(?i)(?<![\w-])({_SECRET_KEY}\s*=\s*)(?![\"'\[{{])[^\s,;&)}}\]]+"),
        rf"\g<1>{REDACTED}",
    ),
    # a TLS-PSK key (32 bytes in hex) however it got there: `identity:hexkey` lines
    (re.compile(r"(?<![0-9A-Za-z])[0-9a-fA-F]{48,}(?![0-9A-Za-z])"), REDACTED),
]


def register_secret(value: str) -> None:
    """Scrub `value` (a token the process read) from every later log line."""
    if len(value) >= 8:  # a short value would scrub ordinary words
        _known.add(value)


def redact(text: str) -> str:
    """`text` with every known secret and every secret-shaped value replaced."""
    for secret in _known:
        if secret in text:
            text = text.replace(secret, REDACTED)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactSecrets(logging.Filter):
    """Handler filter: render the message once, redacted, and drop the args.

    On the handler, not a logger: a handler filter sees the records of every
    logger that propagates to it (uvicorn's, SQLAlchemy's, ours).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a bad format string: log what we have
            message = f"{record.msg!r} {record.args!r}"
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        record.exc_info = None  # formatters use the redacted exc_text
        return True


# ---- formats -------------------------------------------------------------------------


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    found = {name: getattr(record, name) for name in FIELDS if hasattr(record, name)}
    if "request_id" not in found and (current := _request_id.get()):
        found["request_id"] = current
    return found


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (RFC 3339, UTC), level, logger, msg, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        line: dict[str, Any] = {
            "ts": ts.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_fields(record))
        if record.exc_text:
            line["exc"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The plain format for a person at a terminal; the request id at the end when known."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", "") or _request_id.get()
        return f"{text} [{request_id}]" if request_id else text


def configure_logging(level: str = "INFO", fmt: str = "auto") -> logging.Handler:
    """Route every logger to one redacting stderr handler in the chosen format."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactSecrets())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler


def add_flags(parser: argparse.ArgumentParser, *, log_level: bool = False) -> None:
    """`--version` and `--log-format` (and `--log-level` where the parser lacks it)."""
    parser.add_argument("--version", action="version", version=f"{parser.prog} {__version__}")
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default="auto",
        help="json lines, plain text, or auto: text on a terminal, else json",
    )
    if log_level:
        parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LEVELS)


# ---- request ids ---------------------------------------------------------------------


def request_id_from(presented: str | bytes | None) -> str:
    """The client's id when it is a plain short token, else a new one."""
    if isinstance(presented, bytes):
        presented = presented.decode("latin-1")
    if presented and _REQUEST_ID.fullmatch(presented):
        return presented
    return uuid.uuid4().hex


@contextlib.contextmanager
def request_scope(request_id: str) -> Iterator[str]:
    """Lines logged while serving this call carry `request_id`."""
    token = _request_id.set(request_id)
    try:
        yield request_id
    finally:
        _request_id.reset(token)


def current_request_id() -> str:
    return _request_id.get()
