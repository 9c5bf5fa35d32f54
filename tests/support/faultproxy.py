"""An HTTP proxy in front of moto that breaks Kinesis on command, the way the real service breaks.

Why a proxy and not moto alone: moto never throttles, never fails part of a batch and never goes
away. The fault tests (7-10, 16, 19, 20, and 2's "killed after PutRecords
succeeded") need exactly those. The gateway is pointed at `proxy.url` through
AWS_ENDPOINT_URL_KINESIS; the test flips modes at run time.

Kinesis speaks AWS JSON 1.1 (`X-Amz-Target: Kinesis_20131202.<Op>`, body JSON with base64 Data);
botocore 1.44.8's model lists only the "json" protocol for Kinesis, so no CBOR appears (the self-test
checks the content type). A per-entry partial failure forwards only the entries that should succeed
and synthesises the failed ones, so failed entries are not written: exactly Kinesis' semantics.
moto does not verify SigV4, so re-encoding the body is fine. Every PutRecords request is recorded
(entry count, Kinesis-counted bytes, outcome) so tests can check the 500-entry/5 MiB limits.
"""

from __future__ import annotations

import base64
import http.client
import json
import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HOST = "127.0.0.1"
#: whole-request errors and the HTTP status the real service answers with
ERROR_STATUS = {
    "ProvisionedThroughputExceededException": 400, "LimitExceededException": 400,
    "KMSThrottlingException": 400, "AccessDeniedException": 400,
    "ResourceNotFoundException": 400, "ExpiredTokenException": 400, "KMSDisabledException": 400,
    "KMSAccessDeniedException": 400, "ValidationException": 400,
    "InvalidArgumentException": 400, "InternalFailure": 500, "ServiceUnavailable": 503,
}
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host",
        "proxy-connection", "te", "trailer", "upgrade"}


@dataclass(frozen=True)
class PutRequest:
    """What one PutRecords/PutRecord call carried and how the proxy answered it."""

    at: float
    operation: str
    stream: str
    entries: int
    kinesis_bytes: int  # sum of data + UTF-8 partition key, what Kinesis counts
    body_bytes: int
    outcome: str        # pass | partial | error:<code> | down:<kind>
    failed_entries: int = 0


@dataclass
class _Mode:
    down: str | None = None          # refuse | reset | 503
    error: str | None = None
    error_message: str = "injected by the fault proxy"
    error_status: int = 400
    partial: float = 0.0
    partial_code: str = "ProvisionedThroughputExceededException"
    delay_s: float = 0.0
    stall_s: float = 0.0
    operations: tuple[str, ...] | None = ("PutRecords", "PutRecord")
    until: float | None = None
    rng: random.Random = field(default_factory=lambda: random.Random(0))


class FaultProxy:
    """Start with `FaultProxy(moto.url).start()`; point the gateway at `.url`; call mode methods.

    Observations: `requests` (one PutRequest per PutRecords/PutRecord), `entries_log` (entries
    that reached moto: partition_key, explicit_hash_key, data), `counts` ("<Op>:<outcome>" per
    request; "entries:written" / "entries:failed" / "entries:rejected"), `content_types`.
    Modes other than down() touch only PutRecords/PutRecord unless `operations` says otherwise,
    so stream lookups at gateway start-up still work."""

    def __init__(self, upstream: str, port: int = 0) -> None:
        self.upstream = upstream.removeprefix("http://").rstrip("/")
        self._lock = threading.Lock()
        self._mode = _Mode()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._local = threading.local()
        self.port = port
        self.counts: Counter[str] = Counter()
        self.requests: list[PutRequest] = []
        self.entries_log: list[dict[str, Any]] = []  # entries forwarded and written
        self.content_types: Counter[str] = Counter()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer((HOST, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True, name=f"faultproxy-{self.port}")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            if self._thread:
                self._thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- modes (each replaces the previous one; `for_s` reverts to pass-through after it) -----

    def _set(self, for_s: float | None, **kw: Any) -> None:
        with self._lock:
            listening = self._server is not None
            self._mode = _Mode(until=time.monotonic() + for_s if for_s else None, **kw)
        if kw.get("down") == "refuse" and listening:
            self.stop()  # connection refused: nothing listens on the port any more
        elif kw.get("down") != "refuse" and not listening:
            self.start()  # same port again (SO_REUSEADDR)

    def pass_through(self) -> None:
        self._set(None)

    def down(self, kind: str = "refuse", for_s: float | None = None) -> None:
        """refuse: closed port (ECONNREFUSED); reset: accept then RST; 503: ServiceUnavailable."""
        assert kind in ("refuse", "reset", "503")
        if kind == "refuse" and for_s:
            raise ValueError("refuse has no timer (nothing listens to notice it); call pass_through")
        self._set(for_s, down=kind, operations=None)

    def error(self, code: str = "ProvisionedThroughputExceededException", *,
              status: int | None = None, message: str | None = None, for_s: float | None = None,
              operations: tuple[str, ...] | None = ("PutRecords", "PutRecord")) -> None:
        """Answer whole requests with an AWS JSON error (operations=None: every operation)."""
        self._set(for_s, error=code, operations=operations,
                  error_status=status or ERROR_STATUS.get(code, 400),
                  error_message=message or f"{code} injected by the fault proxy")

    def partial(self, fraction: float, *, seed: int = 0, for_s: float | None = None,
                code: str = "ProvisionedThroughputExceededException") -> None:
        """Fail a seeded-random `fraction` of PutRecords entries; only the rest reach moto."""
        self._set(for_s, partial=fraction, partial_code=code, rng=random.Random(seed))

    def delay(self, seconds: float, for_s: float | None = None) -> None:
        """Wait before forwarding (slow Kinesis, nothing written until the wait ends)."""
        self._set(for_s, delay_s=seconds)

    def stall(self, seconds: float, for_s: float | None = None) -> None:
        """Forward at once (records are written) but hold the response for `seconds`."""
        self._set(for_s, stall_s=seconds)

    def _current(self, op: str) -> _Mode | None:
        with self._lock:
            m = self._mode
            if m.until is not None and time.monotonic() >= m.until:
                self._mode = m = _Mode()
            if m.operations is not None and op not in m.operations:
                return None
            return m

    # --- observations --------------------------------------------------------------------------

    def put_requests(self, since: float = 0.0) -> list[PutRequest]:
        with self._lock:
            return [r for r in self.requests if r.at >= since]

    def max_entries(self) -> int:
        return max((r.entries for r in self.put_requests()), default=0)

    def max_kinesis_bytes(self) -> int:
        return max((r.kinesis_bytes for r in self.put_requests()), default=0)

    def request_rate(self, window_s: float) -> float:
        """PutRecords requests per second over the last `window_s` (tight-loop check)."""
        now = time.monotonic()
        return len(self.put_requests(since=now - window_s)) / window_s

    def _record(self, req: PutRequest) -> None:
        with self._lock:
            self.requests.append(req)
            self.counts[f"{req.operation}:{req.outcome}"] += 1
            if req.outcome in ("pass", "partial"):
                self.counts["entries:written"] += req.entries - req.failed_entries
                self.counts["entries:failed"] += req.failed_entries
            else:
                self.counts["entries:rejected"] += req.entries

    # --- forwarding ----------------------------------------------------------------------------

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection(self.upstream, timeout=60)
        return conn

    def forward(self, method: str, path: str, headers: dict[str, str],
                body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        for attempt in (0, 1):  # one retry on a stale keep-alive connection
            conn = self._conn()
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, [(k, v) for k, v in resp.getheaders()
                                     if k.lower() not in _HOP], data
            except (http.client.HTTPException, OSError):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def written_seqs(self) -> set[int]:
        """Seqs in the entries the upstream accepted: the proxy's own ledger, beside read-back."""
        from tests.support.oracle import seqs_in

        with self._lock:
            entries = list(self.entries_log)
        out: set[int] = set()
        for entry in entries:
            out.update(seqs_in(entry["data"]))
        return out

    def written(self) -> int:
        """How many entries the upstream accepted."""
        with self._lock:
            return len(self.entries_log)


def _kinesis_bytes(entries: list[dict[str, Any]]) -> int:
    return sum(len(base64.b64decode(e.get("Data", ""))) + len(e.get("PartitionKey", "").encode())
               for e in entries)


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _reply(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _aws_error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"__type": code, "message": message}).encode()
        self._reply(status, body, [("Content-Type", "application/x-amz-json-1.1"),
                                   ("x-amzn-ErrorType", code),
                                   ("x-amzn-RequestId", "faultproxy-error")])

    def _reset(self) -> None:
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True

    def do_GET(self) -> None:
        self.do_POST()

    def do_POST(self) -> None:
        p = self.owner
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        target = self.headers.get("X-Amz-Target", "")
        op = target.rpartition(".")[2] or "?"
        p.content_types[self.headers.get("Content-Type", "")] += 1
        mode = p._current(op)
        is_put = op in ("PutRecords", "PutRecord")
        doc: dict[str, Any] = json.loads(body) if is_put and body else {}
        entries = doc.get("Records", [doc] if op == "PutRecord" else [])
        stream = doc.get("StreamName") or doc.get("StreamARN") or ""

        def record(outcome: str, failed: int = 0) -> None:
            if is_put:
                p._record(PutRequest(time.monotonic(), op, stream, len(entries),
                                     _kinesis_bytes(entries), len(body), outcome, failed))

        if mode is not None and mode.down:
            record(f"down:{mode.down}")
            if mode.down == "503":
                return self._aws_error(503, "ServiceUnavailable", "injected outage")
            return self._reset()
        if mode is not None and mode.error:
            record(f"error:{mode.error}")
            return self._aws_error(mode.error_status, mode.error, mode.error_message)
        if mode is not None and mode.delay_s:
            time.sleep(mode.delay_s)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        if mode is not None and mode.partial and op == "PutRecords":
            return self._partial(mode, doc, entries, headers, record)
        status, rheaders, rbody = p.forward(self.command, self.path, headers, body)
        if is_put and status == 200:
            with p._lock:
                p.entries_log.extend(_logged(entries))
        record("pass" if status == 200 else f"upstream:{status}")
        if mode is not None and mode.stall_s and is_put:
            time.sleep(mode.stall_s)
        self._reply(status, rbody, rheaders)

    def _partial(self, mode: _Mode, doc: dict[str, Any], entries: list[dict[str, Any]],
                 headers: dict[str, str], record: Any) -> None:
        p = self.owner
        with p._lock:
            fail = [mode.rng.random() < mode.partial for _ in entries]
        keep = [e for e, f in zip(entries, fail) if not f]
        results: list[dict[str, Any]] = []
        if keep:
            sub = json.dumps({**doc, "Records": keep}).encode()
            status, rheaders, rbody = p.forward(self.command, self.path, headers, sub)
            if status != 200:
                record(f"upstream:{status}")
                return self._reply(status, rbody, rheaders)
            results = json.loads(rbody)["Records"]
            with p._lock:
                p.entries_log.extend(_logged(keep))
        it = iter(results)
        merged = [{"ErrorCode": mode.partial_code,
                   "ErrorMessage": "Rate exceeded for shard (injected by the fault proxy)"}
                  if f else next(it) for f in fail]
        n_failed = sum(fail) + sum(1 for r in results if "ErrorCode" in r)
        record("partial", sum(fail))
        out = json.dumps({"FailedRecordCount": n_failed, "Records": merged,
                          "EncryptionType": "NONE"}).encode()
        self._reply(200, out, [("Content-Type", "application/x-amz-json-1.1"),
                               ("x-amzn-RequestId", "faultproxy-partial")])


def _logged(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"partition_key": e.get("PartitionKey"), "explicit_hash_key": e.get("ExplicitHashKey"),
             "data": base64.b64decode(e.get("Data", ""))} for e in entries]
