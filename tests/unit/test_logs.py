"""Log lines: JSON or text, one event per line, exceptions on one line, secrets redacted."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import warnings
from collections.abc import Iterator

import pytest

from gateway.ops import logs
from gateway.ops.logs import RateLimitedLog, configure_logging, log_uncaught_exceptions, register_secret


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    secrets = logs._secrets
    hooks = (threading.excepthook, sys.excepthook)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logs._secrets = secrets
    threading.excepthook, sys.excepthook = hooks
    logging.captureWarnings(False)


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_json_lines_parse_with_the_documented_fields_and_context() -> None:
    out = io.StringIO()
    assert configure_logging("json", "INFO", out) == "json"
    logging.getLogger("gateway.sink").info("batch sent: %d records", 500,
                                           extra={"route": "r1", "stream": "s1", "topic": "a/b"})
    [line] = lines(out)
    event = json.loads(line)
    assert event["message"] == "batch sent: 500 records"
    assert (event["level"], event["logger"]) == ("INFO", "gateway.sink")
    assert (event["route"], event["stream"], event["topic"]) == ("r1", "s1", "a/b")
    assert event["ts"].endswith("Z") and event["ts"][10] == "T"


def test_auto_is_text_on_a_terminal_and_json_otherwise() -> None:
    assert configure_logging("auto", "INFO", Tty()) == "text"
    assert configure_logging("auto", "INFO", io.StringIO()) == "json"


def test_level_filters_and_noisy_libraries_are_quiet() -> None:
    out = io.StringIO()
    configure_logging("json", "DEBUG", out)
    logging.getLogger("botocore.endpoint").debug("Sending http request: headers")
    logging.getLogger("urllib3.connectionpool").info("Starting new HTTPS connection")
    logging.getLogger("gateway.app").debug("kept")
    assert [json.loads(line)["message"] for line in lines(out)] == ["kept"]


def test_a_registered_secret_never_appears_in_json_or_text() -> None:
    register_secret("hunter2-pass")
    for fmt in ("json", "text"):
        out = io.StringIO()
        configure_logging(fmt, "INFO", out)  # type: ignore[arg-type]
        log = logging.getLogger("gateway.source")
        log.warning("connect as gw with hunter2-pass", extra={"detail": "pw=hunter2-pass"})
        try:
            raise ConnectionError("auth failed for hunter2-pass")
        except ConnectionError:
            log.exception("connect failed")
        text = out.getvalue()
        assert "hunter2-pass" not in text
        assert text.count("***") == 3


def test_short_values_are_not_registered_as_secrets() -> None:
    out = io.StringIO()
    configure_logging("text", "INFO", out)
    register_secret("ab")
    register_secret("")
    register_secret(None)
    logging.getLogger("gateway").info("about a table")
    assert "about a table" in out.getvalue()


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_exception_is_rendered_on_one_line(fmt: str) -> None:
    out = io.StringIO()
    configure_logging(fmt, "INFO", out)  # type: ignore[arg-type]
    try:
        raise ValueError("bad value\nsecond line")
    except ValueError:
        logging.getLogger("gateway.pipeline").exception("routing failed")
    [line] = lines(out)
    assert "Traceback" not in line
    rendered = json.loads(line)["exception"] if fmt == "json" else line
    assert "ValueError: bad value\\nsecond line (at test_logs.py:" in rendered


def test_multi_line_message_stays_one_text_line() -> None:
    out = io.StringIO()
    configure_logging("text", "INFO", out)
    logging.getLogger("gateway").info("one\ntwo", extra={"route": "r"})
    [line] = lines(out)
    assert line.endswith("gateway: one\\ntwo route=r")


def test_configuring_twice_keeps_one_handler() -> None:
    out = io.StringIO()
    configure_logging("json", "INFO", io.StringIO())
    configure_logging("json", "INFO", out)
    logging.getLogger("gateway").info("once")
    ours = [h for h in logging.getLogger().handlers if isinstance(h, logs._GatewayHandler)]
    assert len(lines(out)) == 1 and len(ours) == 1


def test_warnings_are_logged_as_one_event() -> None:
    out = io.StringIO()
    configure_logging("json", "INFO", out)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)
    [line] = lines(out)
    assert json.loads(line)["logger"] == "py.warnings"


def test_uncaught_thread_exception_is_logged_as_one_line() -> None:
    out = io.StringIO()
    configure_logging("json", "INFO", out)
    log_uncaught_exceptions()

    def crash() -> None:
        raise RuntimeError("loop died")

    thread = threading.Thread(target=crash, name="mqtt-loop")
    thread.start()
    thread.join()
    [line] = lines(out)
    event = json.loads(line)
    assert event["level"] == "CRITICAL" and "mqtt-loop" in event["message"]
    assert event["exception"].startswith("RuntimeError: loop died")


def test_bad_level_or_format_is_a_one_line_error() -> None:
    with pytest.raises(ValueError, match="LOG_LEVEL"):
        configure_logging("json", "LOUD", io.StringIO())
    with pytest.raises(ValueError, match="LOG_FORMAT"):
        configure_logging("xml", "INFO", io.StringIO())  # type: ignore[arg-type]


def test_a_rate_limited_key_logs_once_per_interval_and_its_next_line_counts_what_was_held_back(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    limited: RateLimitedLog[str] = RateLimitedLog(logging.getLogger("gateway.test"), 10.0, lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="gateway.test"):
        for _ in range(3):
            limited.warning("a", "bad record", route="a")
        limited.warning("b", "other reason")      # another key has its own interval
        now[0] += 10.0
        limited.warning("a", "bad record", route="a")
    assert [r.getMessage() for r in caplog.records] == [
        "bad record", "other reason", "bad record (and 2 more like it before this)"]
    assert caplog.records[0].route == "a"  # type: ignore[attr-defined]


def test_flush_tells_what_a_key_held_back_once_its_interval_has_passed(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limited: RateLimitedLog[str] = RateLimitedLog(logging.getLogger("gateway.test"), 10.0, lambda: now[0])

    def summary(key: str, held: int) -> tuple[str, dict[str, str]]:
        return f"{held} more of {key}", {"route": key}

    with caplog.at_level(logging.WARNING, logger="gateway.test"):
        limited.warning("a", "bad record")
        limited.warning("a", "bad record")
        limited.flush(summary)                    # the interval has not passed
        now[0] += 10.0
        limited.flush(summary)
        limited.flush(summary, everything=True)   # nothing held back since
        limited.warning("a", "bad record")        # the summary counted as a's line: held back
        limited.flush(summary, everything=True)
    assert [r.getMessage() for r in caplog.records] == ["bad record", "1 more of a", "1 more of a"]
