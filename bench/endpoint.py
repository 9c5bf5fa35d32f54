"""A minimal Kinesis Data Streams endpoint for the benchmark: fast enough never to be the bottleneck.

Why not moto: moto's server tops out around 2k records/s here, below the gateway's rate, so a
throughput run would measure moto. This server speaks just enough of Kinesis' JSON protocol
(`X-Amz-Target: Kinesis_20131202.*`, `application/x-amz-json-1.1`) for boto3: CreateStream,
DescribeStream, DescribeStreamSummary, ListShards, PutRecord, PutRecords, GetShardIterator and
GetRecords. It ignores SigV4. botocore 1.44 sends JSON 1.1 to Kinesis (captured: its service model
lists only `json`); CBOR (`application/x-amz-cbor-1.1`, the Java SDK's choice) is refused with a
SerializationException that says so, rather than misparsed.

Speed: one asyncio.Protocol per connection (no stream objects), HTTP/1.1 keep-alive and
pipelining, TCP_NODELAY on every socket (Nagle + delayed ACK throttle small local responses),
orjson. Records are kept in memory as (receive time ns, partition key, base64 data) exactly as
received, so nothing is decoded on the hot path.

Read-back (bench only, not Kinesis): `GET /_records?stream=S&start=I&limit=N` returns
`{"records": [[recv_ns, partition_key, data_base64], ...], "next": J, "total": T}`;
`GET /_stats` returns counts per stream and request counts; `POST /_reset` forgets every record.

Throttling like Kinesis (`--throttle`, or `POST /_throttle?stream=S&on=1` at run time): each shard
of a provisioned stream takes at most 1,000 records/s and 1 MiB/s (data + partition key, what
Kinesis counts). An entry beyond that fails on its own, as Kinesis does: PutRecords answers HTTP
200 with `FailedRecordCount` and a per-entry `ProvisionedThroughputExceededException`; PutRecord
gets that error for the whole request. The limit is a token bucket per shard holding one second's
worth, refilled continuously, so a steady 1,000 records/s passes and a burst above it does not.
`GET /_stats` adds `throttle: {stream: {shards, sent, accepted, throttled, first_accept_ns,
last_accept_ns}}` for every throttled stream, so a test can tell what share of the shards'
capacity a sender used and how many of its entries were refused.

Run: `python -m bench.endpoint --port 0 --stream bench-stream` prints `{"port": P}` on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import signal
import socket
import sys
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

JSON_CT = b"application/x-amz-json-1.1"
TARGET_PREFIX = "Kinesis_20131202."
MAX_HASH = 2**128 - 1
SEQ_BASE = 49_000_000_000_000_000_000
SHARD_RECORDS_PER_S = 1000
SHARD_BYTES_PER_S = 1024 * 1024
THROTTLED = "ProvisionedThroughputExceededException"


class ShardBucket:
    """One shard's write allowance: a token bucket of one second's records and bytes."""

    __slots__ = ("at", "bytes", "records")

    def __init__(self, now: float) -> None:
        self.records = float(SHARD_RECORDS_PER_S)
        self.bytes = float(SHARD_BYTES_PER_S)
        self.at = now

    def take(self, size: int, now: float) -> bool:
        """Whether one entry of `size` Kinesis-counted bytes fits now (and if so, spend it)."""
        dt = max(0.0, now - self.at)
        self.at = now
        self.records = min(float(SHARD_RECORDS_PER_S), self.records + dt * SHARD_RECORDS_PER_S)
        self.bytes = min(float(SHARD_BYTES_PER_S), self.bytes + dt * SHARD_BYTES_PER_S)
        if self.records < 1.0 or self.bytes < size:
            return False
        self.records -= 1.0
        self.bytes -= size
        return True


class Throttle:
    """Per-shard limits of one stream, and what it was sent, accepted and refused."""

    def __init__(self, shards: int, clock: Any) -> None:
        self.clock = clock
        now = clock()
        self.buckets = [ShardBucket(now) for _ in range(shards)]
        self.sent = self.accepted = self.throttled = 0
        self.first_accept_ns = self.last_accept_ns = 0

    def admit(self, shard: int, size: int) -> bool:
        self.sent += 1
        now = self.clock()
        if self.buckets[shard].take(size, now):
            self.accepted += 1
            ns = int(now * 1e9)
            self.first_accept_ns = self.first_accept_ns or ns
            self.last_accept_ns = ns
            return True
        self.throttled += 1
        return False

    def stats(self, shards: int) -> dict[str, int]:
        return {"shards": shards, "sent": self.sent, "accepted": self.accepted, "throttled": self.throttled,
                "first_accept_ns": self.first_accept_ns, "last_accept_ns": self.last_accept_ns}


class Stream:
    """One stream: its shards' hash ranges and every record it was given, in arrival order."""

    __slots__ = ("created", "name", "records", "shards", "throttle")

    def __init__(self, name: str, shards: int = 1) -> None:
        self.name = name
        self.shards = max(1, shards)
        self.records: list[tuple[int, str, str]] = []
        self.created = time.time()
        self.throttle: Throttle | None = None

    def arn(self) -> str:
        return f"arn:aws:kinesis:us-east-1:000000000000:stream/{self.name}"

    def shard_of(self, key: str, explicit_hash_key: str | None) -> int:
        if self.shards == 1:
            return 0
        h = int(explicit_hash_key) if explicit_hash_key else int.from_bytes(
            hashlib.md5(key.encode()).digest(), "big")
        return min(self.shards - 1, h * self.shards // (MAX_HASH + 1))

    def shard_list(self) -> list[dict[str, Any]]:
        step = (MAX_HASH + 1) // self.shards
        out = []
        for i in range(self.shards):
            end = MAX_HASH if i == self.shards - 1 else (i + 1) * step - 1
            out.append({"ShardId": f"shardId-{i:012d}",
                        "HashKeyRange": {"StartingHashKey": str(i * step), "EndingHashKey": str(end)},
                        "SequenceNumberRange": {"StartingSequenceNumber": str(SEQ_BASE)}})
        return out


class ApiError(Exception):
    def __init__(self, kind: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.kind, self.message, self.status = kind, message, status


class Store:
    """All streams; the Kinesis actions and the read-back helpers."""

    def __init__(self, auto_create: bool = False, throttle: bool = False, clock: Any = time.monotonic) -> None:
        self.streams: dict[str, Stream] = {}
        self.auto_create = auto_create
        self.requests: dict[str, int] = {}
        self.throttle_new = throttle
        self.clock = clock

    def add(self, name: str, shards: int = 1) -> Stream:
        s = self.streams[name] = Stream(name, shards)
        if self.throttle_new:
            self.set_throttle(s, True)
        return s

    def set_throttle(self, s: Stream, on: bool) -> None:
        s.throttle = Throttle(s.shards, self.clock) if on else None

    def stream(self, body: dict[str, Any]) -> Stream:
        name = body.get("StreamName") or str(body.get("StreamARN", "")).rpartition("/")[2]
        s = self.streams.get(name)
        if s is None:
            if not self.auto_create or not name:
                raise ApiError("ResourceNotFoundException",
                               f"Stream {name} under account 000000000000 not found.")
            s = self.add(name)
        return s

    def create_stream(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body.get("StreamName", "")
        if name in self.streams:
            raise ApiError("ResourceInUseException", f"Stream {name} already exists")
        self.add(name, int(body.get("ShardCount") or 1))
        return {}

    def describe_stream_summary(self, body: dict[str, Any]) -> dict[str, Any]:
        s = self.stream(body)
        return {"StreamDescriptionSummary": {
            "StreamName": s.name, "StreamARN": s.arn(), "StreamStatus": "ACTIVE",
            "StreamModeDetails": {"StreamMode": "PROVISIONED"}, "RetentionPeriodHours": 24,
            "StreamCreationTimestamp": s.created, "EnhancedMonitoring": [{"ShardLevelMetrics": []}],
            "EncryptionType": "NONE", "OpenShardCount": s.shards, "ConsumerCount": 0}}

    def describe_stream(self, body: dict[str, Any]) -> dict[str, Any]:
        s = self.stream(body)
        return {"StreamDescription": {
            "StreamName": s.name, "StreamARN": s.arn(), "StreamStatus": "ACTIVE",
            "StreamModeDetails": {"StreamMode": "PROVISIONED"}, "Shards": s.shard_list(),
            "HasMoreShards": False, "RetentionPeriodHours": 24, "StreamCreationTimestamp": s.created,
            "EnhancedMonitoring": [{"ShardLevelMetrics": []}], "EncryptionType": "NONE"}}

    def list_shards(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"Shards": self.stream(body).shard_list()}

    def _entry(self, s: Stream, now: int, rec: dict[str, Any]) -> tuple[str, str]:
        key, data = rec.get("PartitionKey"), rec.get("Data")
        if not isinstance(key, str) or not 1 <= len(key) <= 256 or not isinstance(data, str):
            raise ApiError("ValidationException", "1 validation error detected: PartitionKey or Data")
        seq = SEQ_BASE + len(s.records)
        s.records.append((now, key, data))
        return str(seq), f"shardId-{s.shard_of(key, rec.get('ExplicitHashKey')):012d}"

    def _admit(self, s: Stream, rec: dict[str, Any]) -> int | None:
        """The shard index if the stream's throttle lets this entry in, else None (refused)."""
        key, data = rec.get("PartitionKey"), rec.get("Data")
        if not isinstance(key, str) or not isinstance(data, str):
            raise ApiError("ValidationException", "1 validation error detected: PartitionKey or Data")
        assert s.throttle is not None
        shard = s.shard_of(key, rec.get("ExplicitHashKey"))
        size = len(data) * 3 // 4 - data.endswith("=") - data.endswith("==") + len(key.encode())
        return shard if s.throttle.admit(shard, size) else None

    def _refusal(self, s: Stream, shard: int) -> str:
        return (f"Rate exceeded for shard shardId-{shard:012d} in stream {s.name} under account "
                "000000000000.")

    def put_record(self, body: dict[str, Any]) -> dict[str, Any]:
        s = self.stream(body)
        if s.throttle is not None and self._admit(s, body) is None:
            shard = s.shard_of(str(body.get("PartitionKey")), body.get("ExplicitHashKey"))
            raise ApiError(THROTTLED, self._refusal(s, shard))
        seq, shard = self._entry(s, time.time_ns(), body)
        return {"SequenceNumber": seq, "ShardId": shard}

    def put_records(self, body: dict[str, Any]) -> bytes:
        s = self.stream(body)
        recs = body.get("Records")
        if not isinstance(recs, list) or not 1 <= len(recs) <= 500:
            raise ApiError("ValidationException", "Records must hold 1 to 500 entries")
        now = time.time_ns()
        start = len(s.records)
        if s.throttle is not None:
            return self._put_throttled(s, recs, now)
        if s.shards == 1:
            # Hot path: validate and append in one pass; the response is built from a template.
            append = s.records.append
            for rec in recs:
                key, data = rec.get("PartitionKey"), rec.get("Data")
                if not isinstance(key, str) or not 1 <= len(key) <= 256 or not isinstance(data, str):
                    del s.records[start:]
                    raise ApiError("ValidationException", "1 validation error detected: PartitionKey or Data")
                append((now, key, data))
            parts = [b'{"SequenceNumber":"%d","ShardId":"shardId-000000000000"}' % (SEQ_BASE + i)
                     for i in range(start, start + len(recs))]
        else:
            entries = [self._entry(s, now, rec) for rec in recs]
            parts = [b'{"SequenceNumber":"%s","ShardId":"%s"}' % (q.encode(), sh.encode())
                     for q, sh in entries]
        return b'{"FailedRecordCount":0,"Records":[' + b",".join(parts) + b"]}"

    def _put_throttled(self, s: Stream, recs: list[dict[str, Any]], now: int) -> bytes:
        """PutRecords on a throttled stream: each entry admitted or refused on its own shard."""
        parts, failed = [], 0
        for rec in recs:
            shard = self._admit(s, rec)
            if shard is None:
                failed += 1
                refused = s.shard_of(str(rec.get("PartitionKey")), rec.get("ExplicitHashKey"))
                parts.append(orjson.dumps({"ErrorCode": THROTTLED, "ErrorMessage": self._refusal(s, refused)}))
                continue
            seq, sid = self._entry(s, now, rec)
            parts.append(b'{"SequenceNumber":"%s","ShardId":"%s"}' % (seq.encode(), sid.encode()))
        return b'{"FailedRecordCount":%d,"Records":[' % failed + b",".join(parts) + b"]}"

    def get_shard_iterator(self, body: dict[str, Any]) -> dict[str, Any]:
        s = self.stream(body)
        kind = body.get("ShardIteratorType", "TRIM_HORIZON")
        pos = len(s.records) if kind == "LATEST" else 0
        if kind in ("AT_SEQUENCE_NUMBER", "AFTER_SEQUENCE_NUMBER"):
            pos = int(body["StartingSequenceNumber"]) - SEQ_BASE + (kind == "AFTER_SEQUENCE_NUMBER")
        return {"ShardIterator": f"{s.name}|{body.get('ShardId', '')}|{pos}"}

    def get_records(self, body: dict[str, Any]) -> dict[str, Any]:
        name, shard, pos_text = str(body.get("ShardIterator", "")).split("|")
        s = self.stream({"StreamName": name})
        pos, limit = int(pos_text), int(body.get("Limit") or 10000)
        out, i = [], pos
        while i < len(s.records) and len(out) < limit:
            t, key, data = s.records[i]
            if s.shards == 1 or f"shardId-{s.shard_of(key, None):012d}" == shard:
                out.append({"SequenceNumber": str(SEQ_BASE + i), "ApproximateArrivalTimestamp": t / 1e9,
                            "Data": data, "PartitionKey": key})
            i += 1
        return {"Records": out, "NextShardIterator": f"{name}|{shard}|{i}", "MillisBehindLatest": 0}

    ACTIONS = {"CreateStream": create_stream, "DescribeStream": describe_stream,
               "DescribeStreamSummary": describe_stream_summary, "ListShards": list_shards,
               "PutRecord": put_record, "PutRecords": put_records,
               "GetShardIterator": get_shard_iterator, "GetRecords": get_records}

    def call(self, target: str, body_bytes: bytes) -> bytes:
        action = target[len(TARGET_PREFIX):] if target.startswith(TARGET_PREFIX) else ""
        fn = self.ACTIONS.get(action)
        if fn is None:
            raise ApiError("UnknownOperationException", f"unsupported target {target!r}")
        self.requests[action] = self.requests.get(action, 0) + 1
        try:
            body = orjson.loads(body_bytes) if body_bytes else {}
        except orjson.JSONDecodeError as exc:
            raise ApiError("SerializationException", f"body is not JSON: {exc}") from None
        result = fn(self, body)
        return result if isinstance(result, bytes) else orjson.dumps(result)

    def readback(self, query: dict[str, list[str]]) -> bytes:
        s = self.stream({"StreamName": query.get("stream", [""])[0]})
        start = int(query.get("start", ["0"])[0])
        limit = int(query.get("limit", ["50000"])[0])
        chunk = s.records[start:start + limit]
        return orjson.dumps({"records": chunk, "next": start + len(chunk), "total": len(s.records)})

    def stats(self) -> bytes:
        return orjson.dumps({"streams": {n: len(s.records) for n, s in self.streams.items()},
                             "requests": self.requests,
                             "throttle": {n: s.throttle.stats(s.shards) for n, s in self.streams.items()
                                          if s.throttle is not None}})

    def throttle(self, query: dict[str, list[str]]) -> bytes:
        """`POST /_throttle?stream=S&on=1|0`: start (with fresh counters and full buckets) or stop."""
        s = self.stream({"StreamName": query.get("stream", [""])[0]})
        self.set_throttle(s, query.get("on", ["1"])[0] not in ("0", "false", "off"))
        return b"{}"

    def reset(self) -> bytes:
        for s in self.streams.values():
            s.records = []
            if s.throttle is not None:
                self.set_throttle(s, True)
        self.requests = {}
        return b"{}"


def _response(status: int, body: bytes, ctype: bytes = JSON_CT) -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 500: b"Internal Server Error"}
    return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nx-amzn-RequestId: bench\r\n"
            b"Content-Length: %d\r\n\r\n" % (status, reason.get(status, b"Error"), ctype, len(body))) + body


class HttpProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and pipelining; only Content-Length bodies (botocore sends those)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            headers = {}
            for line in head[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            length = int(headers.get("content-length", "0"))
            if len(self.buf) < end + 4 + length:
                if headers.get("expect", "").lower() == "100-continue" and len(self.buf) == end + 4:
                    assert self.transport is not None
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                return
            body = bytes(self.buf[end + 4:end + 4 + length])
            del self.buf[:end + 4 + length]
            assert self.transport is not None
            self.transport.write(self.handle(head[0], headers, body))
            if headers.get("connection", "").lower() == "close":
                self.transport.close()
                return

    def handle(self, request_line: str, headers: dict[str, str], body: bytes) -> bytes:
        method, _, rest = request_line.partition(" ")
        path = rest.rpartition(" ")[0] or rest
        try:
            if method == "POST" and "x-amz-target" in headers:
                if "cbor" in headers.get("content-type", ""):
                    raise ApiError("SerializationException",
                                   "this bench endpoint speaks application/x-amz-json-1.1 only, not CBOR")
                return _response(200, self.store.call(headers["x-amz-target"], body))
            url = urlsplit(path)
            if url.path == "/_records":
                return _response(200, self.store.readback(parse_qs(url.query)), b"application/json")
            if url.path == "/_stats":
                return _response(200, self.store.stats(), b"application/json")
            if url.path == "/_reset" and method == "POST":
                return _response(200, self.store.reset(), b"application/json")
            if url.path == "/_throttle" and method == "POST":
                return _response(200, self.store.throttle(parse_qs(url.query)), b"application/json")
            return _response(404, b'{"message":"not found"}', b"application/json")
        except ApiError as exc:
            return _response(exc.status, orjson.dumps({"__type": exc.kind, "message": exc.message}))
        except Exception as exc:  # noqa: BLE001 - a bench server answers, it does not die
            return _response(500, orjson.dumps({"__type": "InternalFailure", "message": repr(exc)}))


async def serve(host: str, port: int, store: Store, ready: Any = None) -> None:
    """Serve until SIGTERM/SIGINT; `ready(port)` is called once listening."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: HttpProtocol(store), host, port, backlog=256)
    bound = server.sockets[0].getsockname()[1]
    if ready is not None:
        ready(bound)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.endpoint", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 = any free port (printed as JSON)")
    ap.add_argument("--stream", action="append", default=[], help="create this stream at start")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--auto-create", action="store_true", help="unknown streams spring into being")
    ap.add_argument("--throttle", action="store_true",
                    help="every stream takes at most 1,000 records/s and 1 MiB/s per shard, as Kinesis does")
    args = ap.parse_args(argv)
    store = Store(auto_create=args.auto_create, throttle=args.throttle)
    for name in args.stream:
        store.add(name, args.shards)

    def ready(port: int) -> None:
        sys.stdout.write(orjson.dumps({"port": port}).decode() + "\n")
        sys.stdout.flush()

    asyncio.run(serve(args.host, args.port, store, ready))
    return 0


if __name__ == "__main__":
    sys.exit(main())
