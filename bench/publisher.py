"""The load generator: a raw-socket MQTT 3.1.1 publisher, so the publisher is never the bottleneck.

Why not paho: paho's publish path costs tens of µs per message in Python, which on a 2-core
machine would eat the CPU the subject under test needs and cap a burst at the publisher's rate.
Pre-encoding PUBLISH packets and writing them in large chunks costs ~2 µs per message.

Every payload is the welder sample plus `seq` (0..N-1) and `t` (time.time_ns() when the packet is
handed to the kernel, to within one chunk), so publish → readable latency, loss and duplicates are
computed from the records alone. Warm-up messages carry negative `seq` values.

QoS 1: PUBACKs are counted by a reader thread (each is 4 bytes on 3.1.1); at most `window`
messages are left unacknowledged by the broker, which keeps packet ids (1..65535) unique in flight.

`python -m bench.publisher --port P --topic T --count N [--rate R] [--qos 1]` prints a JSON
summary: sent, acked, first_ns, last_ns.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from typing import Any

import orjson

WELDER: dict[str, Any] = {"name": "device123", "model": "welder", "status": "running",
                          "sensor_1": 24.5, "sensor_2": 98.3, "sensor_3": 16.1, "sensor_4": 0.9,
                          "sensor_5": 5.5, "sensor_6": 100.32}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(s: str) -> bytes:
    b = s.encode()
    return len(b).to_bytes(2, "big") + b


def payload(seq: int, t_ns: int) -> bytes:
    return orjson.dumps({**WELDER, "seq": seq, "t": t_ns})


class RawPublisher:
    """One MQTT 3.1.1 connection that only publishes."""

    def __init__(self, host: str, port: int, client_id: str, qos: int = 0, window: int = 20000) -> None:
        self.qos, self.window = qos, window
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        var = _utf8("MQTT") + bytes([4, 0x02]) + (600).to_bytes(2, "big")
        body = var + _utf8(client_id)
        self.sock.sendall(b"\x10" + _varint(len(body)) + body)
        connack = self._recv_exact(4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise ConnectionError(f"CONNACK refused: {connack.hex()}")
        self.sent = 0
        self._ack_bytes = 0
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        if qos:
            self._reader = threading.Thread(target=self._read_acks, daemon=True)
            self._reader.start()

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("broker closed the connection")
            buf += chunk
        return buf

    def _read_acks(self) -> None:
        self.sock.settimeout(None)
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            with self._cond:
                self._ack_bytes += len(chunk)
                self._cond.notify_all()

    @property
    def acked(self) -> int:
        return self._ack_bytes // 4

    def packet(self, topic: bytes, seq: int, t_ns: int) -> bytes:
        data = payload(seq, t_ns)
        if self.qos:
            mid = (self.sent % 65535) + 1
            rest = topic + mid.to_bytes(2, "big") + data
            return b"\x32" + _varint(len(rest)) + rest
        rest = topic + data
        return b"\x30" + _varint(len(rest)) + rest

    def _wait_window(self, deadline: float) -> None:
        if not self.qos:
            return
        with self._cond:
            while self.sent - self.acked >= self.window and time.monotonic() < deadline:
                self._cond.wait(0.05)

    def publish(self, topic: str, seqs: range, rate: float = 0.0, chunk: int = 500,
                timeout_s: float = 600.0) -> tuple[int, int]:
        """Publish one message per seq; rate 0 = as fast as possible. Returns (first_ns, last_ns)."""
        t = _utf8(topic)
        deadline = time.monotonic() + timeout_s
        first = last = 0
        if rate > 0:
            start = time.monotonic()
            for i, seq in enumerate(seqs):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                self._wait_window(deadline)
                last = time.time_ns()
                first = first or last
                self.sock.sendall(self.packet(t, seq, last))
                self.sent += 1
            return first, last
        seq_list = list(seqs)
        for lo in range(0, len(seq_list), chunk):
            self._wait_window(deadline)
            now = time.time_ns()
            first = first or now
            parts = []
            for seq in seq_list[lo:lo + chunk]:
                parts.append(self.packet(t, seq, now))
                self.sent += 1
            self.sock.sendall(b"".join(parts))
            last = now
        return first, last

    def wait_acked(self, timeout_s: float = 60.0) -> bool:
        if not self.qos:
            return True
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.acked < self.sent and time.monotonic() < deadline:
                self._cond.wait(0.05)
        return self.acked >= self.sent

    def close(self) -> None:
        try:
            self.sock.sendall(b"\xe0\x00")
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if self._reader is not None:
            self._reader.join(timeout=2)
        self.sock.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.publisher")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--start", type=int, default=0, help="first seq (negative for warm-up)")
    ap.add_argument("--rate", type=float, default=0.0, help="messages/s; 0 = burst")
    ap.add_argument("--qos", type=int, default=0, choices=(0, 1))
    ap.add_argument("--client-id", default="bench-publisher")
    args = ap.parse_args(argv)
    pub = RawPublisher(args.host, args.port, args.client_id, args.qos)
    first, last = pub.publish(args.topic, range(args.start, args.start + args.count), args.rate)
    done = time.time_ns()
    ok = pub.wait_acked()
    acked_ns = time.time_ns()
    pub.close()
    print(orjson.dumps({"sent": pub.sent, "acked": pub.acked if args.qos else None, "all_acked": ok,
                        "first_ns": first, "last_ns": last, "written_ns": done,
                        "acked_ns": acked_ns, "cpu": time.process_time()}).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
