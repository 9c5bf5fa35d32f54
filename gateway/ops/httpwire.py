"""HTTP/1.1 on the wire for the probe listener: a request head parsed, an answer's bytes built.

No sockets here (``gateway.ops.http`` owns them), so each rule is a plain function a unit test can
call. What is accepted is the least a probe or a scraper sends: a request line with a method token
and ``HTTP/1.x``, header lines with a colon, an optional small ``Content-Length`` body that is read
and dropped, and no chunked bodies; anything else is a ``Refused`` with the status to answer.
Every answer says ``Connection: close`` and ``Cache-Control: no-store``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

__all__ = ["JSON", "MAX_BODY_BYTES", "MAX_HEAD_BYTES", "Refused", "json_body", "parse_head", "response"]

JSON = "application/json"
MAX_HEAD_BYTES = 8192  # request line and headers; probes and scrapers send a few hundred
MAX_BODY_BYTES = 8192  # nothing here takes a body; a small one is read and dropped
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # what RFC 9110 allows as a method


class Refused(Exception):
    """A request this listener answers with an error status and no further work."""

    def __init__(self, status: int, message: str, allow: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.allow = status, message, allow


def parse_head(buffer: bytearray) -> tuple[str, str, int] | None:
    """(method, path, body bytes still to read and drop) once the head is whole, else None."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEAD_BYTES:
            raise Refused(431, "request header fields too large")
        return None
    if end > MAX_HEAD_BYTES:
        raise Refused(431, "request header fields too large")
    lines = buffer[:end].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[2].startswith("HTTP/1."):
        raise Refused(400, "bad request")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise Refused(400, "bad request")
        headers[name.strip().lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise Refused(400, "bad request")
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit():
        raise Refused(400, "bad request")
    if int(length_text) > MAX_BODY_BYTES:
        raise Refused(413, "request too large")
    missing = int(length_text) - (len(buffer) - end - 4)
    return parts[0], urlsplit(parts[1]).path, max(0, missing)


def response(status: int, content_type: str, body: bytes, head: bool,
              extra: Mapping[str, str] | None = None) -> bytes:
    """The whole answer: status line, headers and (unless ``head``) the body."""
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "Server: mqtt-kinesis-gateway",
             f"Date: {formatdate(usegmt=True)}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}", "Cache-Control: no-store", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else body)


def json_body(value: Mapping[str, Any]) -> bytes:
    """Compact, key-sorted JSON and a newline: the same bytes for the same answer."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode() + b"\n"
