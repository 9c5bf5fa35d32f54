"""The values every stage shares: the message, the record, the outcomes, and Kinesis's limits.

Why one module: these facts were once defined in several places with several validators, and
two copies of a limit drift. Every other module imports them from here; nothing here does I/O or
imports anything of the gateway's, so it sits at the bottom of the layering (see
docs/architecture.md).

Invariants owned here:
- a ``Record`` is built only by the router, and only when it satisfies every per-record limit
  Kinesis checks (key of 1-256 characters, explicit hash key a decimal in 0..2^128-1); the sink
  trusts it and checks only what only the sink knows (the stream's own maximum record size);
- every outcome carries a ``code`` from a small fixed vocabulary (``REASON_CODES``), so metric
  labels never depend on the wording of a message.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import orjson

__all__ = [
    "MAX_HASH_KEY", "MAX_PARTITION_KEY_CHARS", "MAX_RECORD_BYTES", "MAX_REQUEST_BYTES",
    "MAX_REQUEST_RECORDS", "PUT", "REASON_CODES", "Failed", "Message", "Record", "Rejected",
    "RoutingOutcome", "Settlement", "Skipped", "dead_letter_envelope", "is_hash_key", "is_stream_arn", "now_ms",
    "record_size", "stream_target",
]

# -- Kinesis PutRecords limits (docs/delivery.md) -------------------------------------------------

MAX_REQUEST_RECORDS: Final = 500
MAX_REQUEST_BYTES: Final = 5 * 1024 * 1024
MAX_RECORD_BYTES: Final = 1024 * 1024          # data + the partition key's UTF-8 bytes
MAX_PARTITION_KEY_CHARS: Final = 256
MAX_HASH_KEY: Final = 2**128 - 1
_MAX_HASH_KEY_DIGITS: Final = len(str(MAX_HASH_KEY))


def is_hash_key(text: Any) -> bool:
    """True for a valid ExplicitHashKey: a decimal in 0..2^128-1 written without leading zeros."""
    return (isinstance(text, str) and 0 < len(text) <= _MAX_HASH_KEY_DIGITS and text.isascii()
            and text.isdecimal() and (text == "0" or text[0] != "0") and int(text) <= MAX_HASH_KEY)


def is_stream_arn(stream: str) -> bool:
    """A stream is named either by its name or by its ARN; ARNs are the ones that start so."""
    return stream.startswith("arn:")


def stream_target(stream: str) -> dict[str, str]:
    """The request parameter that names ``stream``: ``StreamARN`` for an ARN, else ``StreamName``."""
    return {"StreamARN": stream} if is_stream_arn(stream) else {"StreamName": stream}


def record_size(partition_key: str, data: bytes) -> int:
    """What Kinesis counts against a record's limit: the data plus the key's UTF-8 bytes."""
    return len(data) + (len(partition_key) if partition_key.isascii() else len(partition_key.encode()))


def now_ms() -> int:
    """Wall-clock milliseconds, the unit of a message's receipt time."""
    return time.time_ns() // 1_000_000


# -- reason codes: the bounded vocabulary of metric labels ----------------------------------------

REASON_CODES: Final = frozenset({
    "not_json", "key_missing", "key_empty", "key_type", "key_too_long", "hash_key", "too_large",
    "expression_error", "ttl_exceeded", "rejected_by_kinesis", "stream_unusable", "dead_letter_failed",
    "invalid_topic", "intake_error", "other", "expression_too_large",
})


# -- what flows: message in, record out -------------------------------------------------------------

class Message(NamedTuple):
    """One MQTT message as the gateway sees it: paho's types never travel past the source."""

    topic: str
    payload: bytes
    qos: int
    received_ms: int
    retain: bool = False
    user_properties: tuple[tuple[str, str], ...] = ()  # MQTT 5, in the order sent
    content_type: str | None = None  # MQTT 5


class Record(NamedTuple):
    """One Kinesis record. ``size`` is what Kinesis counts: data plus the key's UTF-8 bytes."""

    route: str
    stream: str
    partition_key: str
    data: bytes
    explicit_hash_key: str | None = None
    size: int = 0


class Rejected(NamedTuple):
    """The route matched, but no record can be made; ``reason`` never quotes the payload."""

    route: str
    reason: str
    code: str = "other"


class Skipped(NamedTuple):
    """The route's ``filter`` expression was falsy for this message."""

    route: str
    reason: str = "filter"


RoutingOutcome = Record | Rejected | Skipped
"""What routing one message through one matching route yields."""


# -- what comes back: the settlement of a record ---------------------------------------------------

PUT: Final = "put"
"""The settlement of a record Kinesis holds."""


@dataclass(frozen=True, slots=True)
class Failed:
    """A record the sink gives up on; the pipeline sends it to the route's dead letter.

    ``permanent`` is False for a give-up that a later attempt might not repeat (a time budget ran
    out); ``code`` labels the metric.
    """

    reason: str
    permanent: bool
    code: str = field(default="other", compare=False)


Settlement = str | Failed
"""``PUT`` or a ``Failed``: how a record left the sink."""


# -- the dead-letter envelope ----------------------------------------------------------------------

# A dead-letter envelope keeps at most this much of the payload and of the topic, so that even the
# envelope of an oversize message fits in one Kinesis record (1 MiB): base64 makes 512 KiB into
# 683 KiB, and a topic of 4096 characters is at most 24 KiB of escaped JSON.
_DEAD_LETTER_PAYLOAD_BYTES: Final = 512 * 1024
_DEAD_LETTER_TOPIC_CHARS: Final = 4096


def dead_letter_envelope(topic: str, payload: bytes, received_ms: int, route: str, reason: str) -> bytes:
    """The dead-letter record: JSON that Firehose/Athena read, with the payload kept verbatim.

    One format for every writer of dead letters (the pipeline for rejected messages, the spool's
    sender for records Kinesis refused), so a dead-letter stream holds one shape."""
    body: dict[str, Any] = {"route": route, "topic": topic[:_DEAD_LETTER_TOPIC_CHARS], "reason": reason,
                            "received_ms": received_ms, "payload_bytes": len(payload)}
    if len(topic) > _DEAD_LETTER_TOPIC_CHARS:
        body["topic_truncated"] = True
    if len(payload) > _DEAD_LETTER_PAYLOAD_BYTES:
        payload = payload[:_DEAD_LETTER_PAYLOAD_BYTES]
        body["payload_truncated"] = True
    body["payload_base64"] = base64.b64encode(payload).decode("ascii")
    return orjson.dumps(body) + b"\n"
