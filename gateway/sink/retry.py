"""What to do when a PutRecords request fails, and how long to wait before trying again.

The client's own retries are only a first layer (docs/delivery.md): it never retries partial
failures, gives up on KMSThrottlingException at once, and stops after 3 attempts. Everything the
client raises therefore lands here and is sorted into one of three actions: the lean client's
errors (``gateway.sink.errors``), and botocore's when a boto3 client is used (tests, tools),
recognised without importing botocore into a process that does not already have it. Nothing
in this module drops data: the worst a failure can earn is HOLD, which keeps the records and
retries slowly until an operator fixes the configuration.
"""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from gateway.model import PUT, Failed
from gateway.sink.batching import Entry, SettlementBatch, StreamState
from gateway.sink.errors import AwsError, ServiceError, TransportError

__all__ = [
    "EXPIRED",
    "UNHEALTHY_AFTER",
    "Action",
    "Retry",
    "Rng",
    "Verdict",
    "backoff_delay",
    "classify",
    "is_aws_error",
    "settle_response",
]

T = TypeVar("T")

EXPIRED = Failed("delivery time budget exceeded", permanent=False, code="ttl_exceeded")
# A stream whose requests fail as a whole this many times in a row is reported unhealthy.
UNHEALTHY_AFTER = 5


class Action(enum.Enum):
    """How the sink treats a whole-request failure."""

    RETRY = "retry"  # transient: back off with full jitter, resend the whole batch
    HOLD = "hold"  # configuration: keep the records, retry at the cap, report unhealthy
    BISECT = "bisect"  # a record in the batch is invalid: split to find it


class Rng(Protocol):
    """The slice of random.Random the sink uses; tests inject a scripted one."""

    def uniform(self, a: float, b: float) -> float: ...


_THROTTLING = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "LimitExceededException",
        "KMSThrottlingException",
        "ThrottlingException",
        "Throttling",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "SlowDown",
    }
)
_TRANSIENT = frozenset(
    {
        "InternalFailure",
        "InternalFailureException",
        "InternalServerError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
        "ExpiredToken",
        "ExpiredTokenException",
        "RequestExpired",
        "IDPCommunicationError",
        "ResourceInUseException",
    }
)
_INVALID_REQUEST = frozenset(
    {
        "ValidationException",
        "InvalidArgumentException",
        "SerializationException",
    }
)


def classify(exc: BaseException) -> tuple[Action, str]:
    """Sort a failed request into an action plus a short, bounded error code for logs/metrics.

    Anything unrecognised is HOLD rather than a drop: an unknown failure must never turn into
    silent data loss, and a slow retry at the cap is cheap.
    """
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and (isinstance(exc, ServiceError) or _is_botocore(exc, "ClientError")):
        error = response.get("Error", {}) or {}
        code = str(error.get("Code") or "UnknownError")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if code in _INVALID_REQUEST:
            return Action.BISECT, code
        if code in _THROTTLING or code in _TRANSIENT:
            return Action.RETRY, code
        if isinstance(status, int) and status >= 500:
            return Action.RETRY, code
        return Action.HOLD, code
    if isinstance(exc, TransportError) or _is_botocore(exc, "ConnectionError", "HTTPClientError"):
        # EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError, ReadTimeoutError,
        # SSL and proxy errors: the request may or may not have reached Kinesis, so resending
        # can duplicate (accepted: at-least-once).
        return Action.RETRY, type(exc).__name__
    # No credentials, a credential source that failed, no region, anything unknown: hold.
    if isinstance(exc, AwsError):
        return Action.HOLD, type(exc).__name__
    return Action.HOLD, type(exc).__name__


def is_aws_error(exc: BaseException | None) -> bool:
    """An error AWS or its client reported (logged in one line, no traceback), not a bug."""
    return isinstance(exc, AwsError) or (exc is not None and _is_botocore(exc, "ClientError", "BotoCoreError"))


def _is_botocore(exc: BaseException, *names: str) -> bool:
    """Whether ``exc`` is one of botocore's exception classes ``names``; False when botocore was
    never imported (the running gateway)."""
    module = sys.modules.get("botocore.exceptions")
    if module is None:
        return False
    classes = tuple(c for c in (getattr(module, name, None) for name in names) if isinstance(c, type))
    return bool(classes) and isinstance(exc, classes)


def backoff_delay(attempt: int, base_s: float, cap_s: float, rng: Rng) -> float:
    """Full-jitter exponential backoff: uniform(0, min(cap, base * 2**attempt)).

    Full jitter (rather than equal jitter) spreads many senders that failed together, which
    is the usual case when a shard throttles; `attempt` is clamped so the power cannot overflow.
    """
    ceiling = min(cap_s, base_s * (2 ** min(max(attempt, 0), 62)))
    return rng.uniform(0.0, ceiling)


@dataclass(frozen=True)
class Retry:
    """The retry tunables settle_response needs (from SinkConfig) plus the jitter source."""

    base_s: float
    cap_s: float
    ttl_s: float
    linger_s: float
    rng: Rng

    def delay(self, attempt: int) -> float:
        return backoff_delay(attempt, self.base_s, self.cap_s, self.rng)


@dataclass(frozen=True)
class Verdict:
    """What a response says about the stream's health: ok, or trouble with a code."""

    ok: bool
    code: str = ""
    held: bool = False
    error: BaseException | None = None


_OK = Verdict(ok=True)


def settle_response(
    s: StreamState[T],
    batch: list[Entry[T]],
    response: Any,
    error: BaseException | None,
    now: float,
    retry: Retry,
) -> tuple[SettlementBatch[T], Verdict | None]:
    """Apply one PutRecords result to the stream: settle what is done, requeue the rest.

    Partial failures requeue only the failed entries, each after its own backoff (an entry
    fails unless it carries a SequenceNumber and no ErrorCode, whatever FailedRecordCount says;
    real Kinesis always sends the count, but a wrong guess here would ack unwritten data); a whole
    request that failed pauses the stream (backoff, or the cap while held) and puts the batch
    back at the front; an invalid request is split in halves until the bad entry is alone.
    """
    out: SettlementBatch[T] = SettlementBatch()
    results = response.get("Records") if isinstance(response, dict) else None
    if error is None and not (
        isinstance(results, list)
        and len(results) == len(batch)
        and all(isinstance(result, dict) for result in results)
    ):
        error = RuntimeError("malformed PutRecords response")
    if error is None:
        assert isinstance(results, list)  # checked just above
        s.failures = 0
        retried: list[Entry[T]] = []
        # Each entry settles by its own result, never by FailedRecordCount: an entry is held by
        # Kinesis only when it has a SequenceNumber and no ErrorCode; anything else is retried.
        for entry, result in zip(batch, results, strict=True):
            if result.get("ErrorCode") or not result.get("SequenceNumber"):
                retried.append(entry)
                continue
            if entry.shard is not None and result.get("ShardId") not in (None, entry.shard):
                s.map_stale = True  # an aggregate landed elsewhere: the shard map is stale
            out.add(entry, PUT)
        for entry in _expire(retried, now, retry.ttl_s, out):
            s.delay(entry, now + retry.delay(entry.attempts - 1))
        return out, _OK
    action, code = classify(error)
    if action is Action.BISECT:
        if len(batch) == 1:
            out.add(batch[0], Failed(f"rejected by Kinesis ({code})", permanent=True, code="rejected_by_kinesis"))
        else:
            half = len(batch) // 2
            s.splits.appendleft(batch[half:])
            s.splits.appendleft(batch[:half])
        return out, None
    if code == "ResourceNotFoundException":
        s.map_stale = True
    s.requeue_front(_expire(batch, now, retry.ttl_s, out), now - retry.linger_s)
    s.failures += 1
    if action is Action.HOLD:
        s.paused_until = now + retry.cap_s
        return out, Verdict(ok=False, code=code, held=True, error=error)
    s.paused_until = now + retry.delay(s.failures - 1)
    if s.failures >= UNHEALTHY_AFTER:
        return out, Verdict(ok=False, code=code, held=False, error=error)
    return out, None


def _expire(entries: list[Entry[T]], now: float, ttl_s: float, out: SettlementBatch[T]) -> list[Entry[T]]:
    """Count an attempt on each entry; fail those past the delivery budget, keep the rest."""
    keep: list[Entry[T]] = []
    for entry in entries:
        entry.attempts += 1
        if ttl_s > 0 and now - entry.born > ttl_s:
            out.add(entry, EXPIRED)
        else:
            keep.append(entry)
            out.retried += entry.count
    return keep
