"""What is wrong with which stream, as far as the sink knows: for readiness, and for the log.

Why: readiness must tell the truth before the first message arrives. A closed endpoint or a stream
that does not exist used to show only once a PutRecords failed, so ``/readyz`` said Kinesis was
fine for as long as nothing was published. Two sources now feed one answer:

- stream checks: DescribeStreamSummary on every stream of the route table at start-up and after
  each reload, and again while a check fails (``gateway.sink.scheduler`` says when);
- the requests themselves: a configuration error that holds a stream's records, or requests that
  keep failing (``gateway.sink.retry`` gives the verdict).

Invariants owned here: a stream of the route table is reported until a check or a request to it
succeeded (``not checked yet`` before either); every change of a stream's state is logged once, in
one line (no traceback for an AWS error), naming the stream and, for a check, the endpoint.
A check refused for lack of permission (``kinesis:DescribeStreamSummary``) is not a problem of
the stream: it is logged once, and the requests' own results decide.

Nothing here takes a lock; the sink calls it under its own lock.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.model import stream_target
from gateway.sink.clients import KinesisClient
from gateway.sink.retry import Verdict, classify, is_aws_error
from gateway.sink.scheduler import CHECK_AGAIN_CAP_S, CHECK_AGAIN_S

__all__ = ["NOT_CHECKED", "StreamCheck", "StreamHealth", "check_stream"]

log = logging.getLogger(__name__)

NOT_CHECKED = "not checked yet"
_WRITABLE = frozenset({"ACTIVE", "UPDATING"})
_DENIED = frozenset({"AccessDeniedException", "AccessDenied", "UnauthorizedOperation"})


@dataclass(frozen=True, slots=True)
class StreamCheck:
    """One check's answer: ``problem`` None when the stream takes writes (or could not be asked)."""

    problem: str | None
    code: str = ""
    denied: bool = False


def _one_line(text: object, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


def check_stream(client: KinesisClient, stream: str) -> StreamCheck:
    """Ask Kinesis whether ``stream`` exists and takes writes (one DescribeStreamSummary call)."""
    try:
        summary = client.describe_stream_summary(**stream_target(stream))["StreamDescriptionSummary"]
    except Exception as exc:  # noqa: BLE001 - every failure is a reason the stream is not usable
        code = classify(exc)[1]
        if code in _DENIED and getattr(exc, "response", None) is not None:
            return StreamCheck(None, code, denied=True)
        return StreamCheck(f"{code}: {_one_line(exc)}", code)
    status = summary.get("StreamStatus") if isinstance(summary, dict) else None
    if status in _WRITABLE:
        return StreamCheck(None)
    return StreamCheck(f"stream is {status or 'in an unknown state'}", str(status))


class StreamHealth:
    """Problems per stream, from checks and from requests; ``problems()`` is readiness."""

    def __init__(self, retry_cap_s: float) -> None:
        self._retry_cap_s = retry_cap_s
        self._watched: frozenset[str] = frozenset()
        self._checks: dict[str, str] = {}        # stream -> problem its last check found
        self._check_codes: dict[str, str] = {}   # stream -> code of the problem last logged
        self._requests: dict[str, str] = {}      # stream -> why its requests fail (one line)
        self._request_codes: dict[str, str] = {}

    def problems(self) -> dict[str, str]:
        """Stream -> what is wrong with it, one line each; empty when every stream is fine."""
        return {**self._checks, **self._requests}

    def watch(self, streams: Iterable[str]) -> None:
        """These are the route table's streams now: new ones are not ready until checked."""
        streams = frozenset(streams)
        for stream in streams - self._watched:
            self._checks.setdefault(stream, NOT_CHECKED)
        for stream in self._watched - streams:
            self._checks.pop(stream, None)
            self._check_codes.pop(stream, None)
        self._watched = streams

    def checked(self, stream: str, result: StreamCheck, endpoint: str) -> bool:
        """Record a check's answer; True when the stream was reported before and is fine now."""
        if stream not in self._watched:
            return False
        if result.problem is None:
            was = self._checks.pop(stream, None)
            if result.denied:
                log.warning("kinesis stream %s: cannot check it (%s from %s); grant kinesis:DescribeStreamSummary "
                            "(deploy/iam/policy.json), until then readiness follows the PutRecords results",
                            stream, result.code, endpoint)
            elif self._check_codes.pop(stream, None) is not None:
                log.info("kinesis stream %s: check succeeds again", stream)
            return was is not None and was != NOT_CHECKED
        self._checks[stream] = result.problem
        if self._check_codes.get(stream) != result.code:
            self._check_codes[stream] = result.code
            log.error("kinesis stream %s: check failed at %s: %s; checking again every %g-%gs",
                      stream, endpoint, result.problem, CHECK_AGAIN_S, CHECK_AGAIN_CAP_S)
        return False

    def request_verdict(self, stream: str, verdict: Verdict, failures: int) -> bool:
        """Track what a response says; log only changes. True when a reported stream is fine now."""
        if verdict.ok:
            recovered = self._requests.pop(stream, None) is not None
            if recovered:
                self._request_codes.pop(stream, None)
                log.info("kinesis stream %s: requests succeed again", stream)
            checked = self._checks.pop(stream, None) is not None  # a request answers what a check asks
            self._check_codes.pop(stream, None)
            return recovered or checked
        detail = _one_line(verdict.error)
        self._requests[stream] = f"{verdict.code}: {detail}"
        if self._request_codes.get(stream) == verdict.code:
            return False
        self._request_codes[stream] = verdict.code
        if verdict.held:
            log.error(
                "kinesis stream %s: %s; holding records and retrying every %gs: %s",
                stream, verdict.code, self._retry_cap_s, detail,
                exc_info=None if is_aws_error(verdict.error) else verdict.error,
            )
        else:
            log.warning("kinesis stream %s: %s, %d failures in a row; retrying", stream, verdict.code, failures)
        return False
