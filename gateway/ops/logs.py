"""Logging: one event per line, JSON for machines, text for people, secrets redacted.

In a container the platform collects stdout, so the default there is JSON lines (``ts``,
``level``, ``logger``, ``message`` plus context passed as ``extra={"route": ..., "stream": ...}``).
On a terminal the same events are printed as text. Either way an exception becomes one line
(type, message and where it was raised): a multi-line traceback splits into many events in every
log pipeline and is unreadable in ``kubectl logs``.

Secrets are never logged on purpose; as a second line of defence every registered secret value is
replaced by ``***`` in everything a record formats to, including exceptions and context fields.

A flood of bad messages must not flood the log either: ``RateLimitedLog`` writes a line per key
(a route and reason) at most once per interval and tells what it held back as a count.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable, Hashable, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import IO, Any, Generic, Literal, TypeVar

__all__ = ["JsonFormatter", "RateLimitedLog", "TextFormatter", "configure_logging", "log_uncaught_exceptions",
           "register_secret"]

REDACTED = "***"
MIN_SECRET_LENGTH = 4
"""Shorter values are not registered: redacting every "abc" would mangle the log, not protect it."""

NOISY_LOGGERS = ("botocore", "boto3", "urllib3", "s3transfer", "paho", "watchdog")

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName"}
_secrets: tuple[str, ...] = ()
_secrets_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Redact ``value`` from every log line from now on (longest secrets are replaced first)."""
    global _secrets
    if not value or len(value) < MIN_SECRET_LENGTH:
        return
    with _secrets_lock:
        if value not in _secrets:
            _secrets = tuple(sorted({*_secrets, value}, key=len, reverse=True))


def redact(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _one_line(text: str) -> str:
    return text.replace("\r", "").replace("\n", "\\n")


def _exception_text(exc_info: Any) -> str | None:
    """``Type: message (at file.py:12 in func)``; the innermost frame is where it was raised."""
    if not exc_info or exc_info is True:
        return None
    exc_type, exc, tb = exc_info
    if exc_type is None:
        return None
    text = exc_type.__name__ + (f": {exc}" if str(exc) else "")
    frames = traceback.extract_tb(tb) if tb is not None else []
    if frames:
        last = frames[-1]
        text += f" (at {last.filename.rsplit('/', 1)[-1]}:{last.lineno} in {last.name})"
    return _one_line(text)


def _context(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in record.__dict__.items()
            if key not in _STANDARD and not key.startswith("_")}


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, context keys, exception."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key, value in _context(record).items():
            if value is not None and not isinstance(value, (bool, int, float)):
                value = redact(value if isinstance(value, str) else str(value))
            event.setdefault(key, value)
        exception = _exception_text(record.exc_info)
        if exception:
            event["exception"] = redact(exception)
        if record.stack_info:
            event["stack"] = redact(record.stack_info)
        return json.dumps(event, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``ts LEVEL logger: message key=value ... | Type: message (at file:line in func)``."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [f"{_timestamp(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"]
        parts += [f"{key}={value}" for key, value in _context(record).items()]
        line = " ".join(parts)
        exception = _exception_text(record.exc_info)
        if exception:
            line += " | " + exception
        return redact(_one_line(line))


class _GatewayHandler(logging.StreamHandler):
    """Marks the handler this module installed, so configuring twice replaces it (and only it)."""


def configure_logging(fmt: Literal["auto", "json", "text"] = "auto", level: str = "INFO",
                      stream: IO[str] | None = None) -> str:
    """Install the one root handler; returns the format chosen ("json" or "text").

    ``auto`` means text when ``stream`` is a terminal and JSON otherwise (a container).
    """
    stream = sys.stdout if stream is None else stream
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError("LOG_LEVEL: expected DEBUG, INFO, WARNING, ERROR or CRITICAL,"
                         f" got {level!r}")
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        fmt = "text" if isatty is not None and isatty() else "json"
    if fmt not in ("json", "text"):
        raise ValueError(f"LOG_FORMAT: expected auto, json or text, got {fmt!r}")
    handler = _GatewayHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _GatewayHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in NOISY_LOGGERS:  # botocore at DEBUG prints request details; paho every packet
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    logging.captureWarnings(True)
    return fmt


def log_uncaught_exceptions(logger: logging.Logger | None = None) -> None:
    """Route uncaught exceptions (main and other threads) through logging: one line, redacted."""
    target = logger or logging.getLogger("gateway")

    def main_hook(exc_type: type[BaseException], exc: BaseException,
                  tb: TracebackType | None) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
            return
        target.critical("uncaught exception", exc_info=(exc_type, exc, tb))

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        target.critical("uncaught exception in thread %s", name, exc_info=args.exc_value)

    sys.excepthook = main_hook
    threading.excepthook = thread_hook



K = TypeVar("K", bound=Hashable)


class RateLimitedLog(Generic[K]):
    """A warning per key at most every ``interval_s``; what was held back is told as a count.

    The count goes with the key's next line (``(and N more like it before this)``), or, for a
    caller that ticks ``flush``, in a summary line of its own once the interval has passed, so
    every held-back message shows up in the log either way.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log, self._interval_s, self._clock = logger, interval_s, clock
        self._last: dict[K, tuple[float, int]] = {}   # key -> (when last logged, held back since)
        self._lock = threading.Lock()

    def warning(self, key: K, text: str, **context: Any) -> None:
        """Log ``text`` (with ``context`` as the record's extra fields) unless ``key`` logged within the interval."""
        now = self._clock()
        with self._lock:
            last, held = self._last.get(key, (float("-inf"), 0))
            if now - last < self._interval_s:
                self._last[key] = (last, held + 1)
                return
            self._last[key] = (now, 0)
        more = f" (and {held} more like it before this)" if held else ""
        self._log.warning("%s%s", text, more, extra=context or None)

    def flush(self, summary: Callable[[K, int], tuple[str, Mapping[str, Any]]], everything: bool = False) -> None:
        """Log ``summary(key, held)`` (its text and extra fields) for each key that held lines back
        for a whole interval (``everything``: for each that held any, as at shutdown)."""
        now = self._clock()
        due: list[tuple[K, int]] = []
        with self._lock:
            for key, (last, held) in self._last.items():
                if held and (everything or now - last >= self._interval_s):
                    due.append((key, held))
                    self._last[key] = (now, 0)
        for key, held in due:
            text, context = summary(key, held)
            self._log.warning("%s", text, extra=dict(context) or None)
