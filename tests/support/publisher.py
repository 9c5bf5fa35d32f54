"""A publisher that stamps each message with a sequence number and records what the broker acked.

This is the source side of the common oracle (docs/delivery.md#how-the-guarantees-are-tested): a seq counts as "acked" only
when its PUBACK arrived with a success reason code, because only then did the broker take
ownership; the oracle then demands every acked seq in Kinesis.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from tests.support.services import HOST

WELDER = {"name": "device123", "model": "welder", "status": "running", "sensor_1": 24.5,
          "sensor_2": 98.3, "sensor_3": 16.1, "sensor_4": 0.9, "sensor_5": 5.5, "sensor_6": 100.32}
_ids = itertools.count()


def welder_payload(seq: int) -> bytes:
    """The seed's welder payload plus the seq the oracle looks for."""
    return json.dumps({**WELDER, "name": f"device{seq % 7}", "seq": seq}).encode()


_MAX_OUTSTANDING = 30_000


class Publisher:
    """paho (VERSION2) client with its own loop thread; `acked` holds the seqs the broker PUBACKed."""

    def __init__(self, host: str = HOST, port: int = 1883, *, topic: str = "welder/1/data",
                 qos: int = 1, protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5,
                 client_id: str | None = None, payload: Callable[[int], bytes] = welder_payload,
                 topic_for: Callable[[int], str] | None = None, max_inflight: int = 1000,
                 username: str | None = None, password: str | None = None) -> None:
        self.host, self.port, self.topic, self.qos = host, port, topic, qos
        self.payload, self.topic_for = payload, topic_for
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"test-pub-{next(_ids)}",
                                  protocol=protocol)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.max_inflight_messages_set(max_inflight)
        self.client.max_queued_messages_set(0)
        self.client.on_publish = self._on_publish
        self.client.on_connect = self._on_connect
        self._lock = threading.Lock()
        self._mid_to_seq: dict[int, int] = {}
        self._early: dict[int, Any] = {}
        self._connected = threading.Event()
        self.sent: set[int] = set()
        self.acked: set[int] = set()
        self.refused: dict[int, str] = {}

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not rc.is_failure:
            self._connected.set()

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        if self.qos == 0:
            return
        with self._lock:
            seq = self._mid_to_seq.pop(mid, None)
            if seq is None:  # PUBACK raced ahead of publish() returning the mid
                self._early[mid] = rc
                return
            self._settle(seq, rc)

    def _settle(self, seq: int, rc: Any) -> None:
        if rc.is_failure:
            self.refused[seq] = str(rc)
        else:
            self.acked.add(seq)

    def connect(self, timeout: float = 10.0) -> Publisher:
        self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(timeout):
            raise TimeoutError(f"publisher could not connect to {self.host}:{self.port}")
        return self

    def publish(self, seq: int) -> None:
        topic = self.topic_for(seq) if self.topic_for else self.topic
        # Not under self._lock: paho calls on_publish while holding its own out-message lock,
        # so holding ours across client.publish() would invert the lock order and deadlock.
        info = self.client.publish(topic, self.payload(seq), qos=self.qos)
        with self._lock:
            self.sent.add(seq)
            if self.qos == 0:
                return
            rc = self._early.pop(info.mid, None)
            if rc is None:
                self._mid_to_seq[info.mid] = seq
            else:
                self._settle(seq, rc)

    def publish_range(self, seqs: Iterable[int] | int, rate: float | None = None) -> None:
        """Publish seqs (an int n means range(n)); `rate` msg/s paces them, None = flat out."""
        items = range(seqs) if isinstance(seqs, int) else seqs
        start = time.monotonic()
        for i, seq in enumerate(items):
            if rate:
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            # MQTT packet ids are 16 bits: with 65,535 publishes outstanding paho would reuse the id
            # of one still queued and lose track of it. Keep well below that.
            while len(self._mid_to_seq) >= _MAX_OUTSTANDING:
                time.sleep(0.005)
            self.publish(seq)

    def publish_in_background(self, seqs: Iterable[int] | int,
                              rate: float | None = None) -> threading.Thread:
        """Same as publish_range on a daemon thread, so the test can break things meanwhile."""
        t = threading.Thread(target=self.publish_range, args=(seqs, rate), daemon=True)
        t.start()
        return t

    def wait_acked(self, timeout: float = 60.0) -> bool:
        """True when every QoS>0 seq sent got a PUBACK (success or refusal) within timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._mid_to_seq:
                    return True
            time.sleep(0.02)
        return False

    @property
    def unacked(self) -> set[int]:
        with self._lock:
            return set(self._mid_to_seq.values())

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Publisher:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()
