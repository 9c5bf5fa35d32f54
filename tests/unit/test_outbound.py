"""Outbound: what other threads queue for the MQTT loop, and when that wakes the loop."""

from __future__ import annotations

import select
import threading
from collections.abc import Iterator

import pytest

from gateway.source.outbound import Outbound


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def outbound() -> Iterator[Outbound]:
    box = Outbound(clock=Clock())
    yield box
    box.close()


def readable(box: Outbound) -> bool:
    return bool(select.select([box.fileno()], [], [], 0)[0])


def test_take_returns_everything_in_queued_order(outbound: Outbound) -> None:
    done = []
    outbound.ack(1, 1)
    outbound.publish("dlq", b"x", 1, lambda ok, reason: done.append(ok))
    outbound.ack(2, 1)
    acks, publishes = outbound.take()
    assert acks == [(1, 1), (2, 1)]
    assert [(p.topic, p.payload, p.qos) for p in publishes] == [("dlq", b"x", 1)]
    assert outbound.take() == ([], [])


def test_a_sleeping_loop_gets_one_wake_byte_per_drain(outbound: Outbound) -> None:
    assert not outbound.sleeping(30, patience=0.1)
    for mid in range(1, 100):
        outbound.ack(mid, 1)
    outbound.wake()
    assert readable(outbound)
    assert len(outbound.take().acks) == 99
    assert not readable(outbound)                # the one byte was read back with the drain


def test_an_awake_loop_is_told_by_sleeping_not_by_a_byte(outbound: Outbound) -> None:
    outbound.take()                              # the loop is awake until it sleeps again
    outbound.ack(7, 1)
    outbound.wake()
    assert not readable(outbound)
    assert outbound.sleeping(30, patience=0.1)   # work queued: the loop must not wait
    assert outbound.take().acks == [(7, 1)]


def test_an_ack_rides_a_round_due_soon_but_a_publish_wakes_the_loop(outbound: Outbound) -> None:
    assert not outbound.sleeping(0.05, patience=0.1)
    outbound.ack(1, 1)
    assert not readable(outbound)
    outbound.publish("dlq", b"x", 1, lambda ok, reason: None)
    assert readable(outbound)


def test_acks_of_a_closed_connection_are_dropped_but_publishes_kept(outbound: Outbound) -> None:
    outbound.ack(1, 1)
    outbound.publish("dlq", b"x", 1, lambda ok, reason: None)
    assert outbound.drop_acks() == 1
    acks, publishes = outbound.take()
    assert acks == [] and len(publishes) == 1


def test_acks_from_many_threads_all_arrive_in_each_threads_order(outbound: Outbound) -> None:
    def send(base: int) -> None:
        for i in range(500):
            outbound.ack(base + i, 1)

    threads = [threading.Thread(target=send, args=(base,)) for base in (0, 10_000, 20_000)]
    for t in threads:
        t.start()
    taken = []
    while any(t.is_alive() for t in threads) or len(taken) < 1500:
        outbound.sleeping(0, patience=0)
        taken += [mid for mid, _ in outbound.take().acks]
    for base in (0, 10_000, 20_000):
        assert [mid for mid in taken if base <= mid < base + 500] == list(range(base, base + 500))


def test_acks_queued_together_keep_their_order_and_wake_a_sleeping_loop_once(outbound: Outbound) -> None:
    assert not outbound.sleeping(30, patience=0.1)
    outbound.ack_many([(3, 1), (4, 1), (5, 1)])
    outbound.ack_many([(6, 1)])
    assert readable(outbound)
    assert outbound.take().acks == [(3, 1), (4, 1), (5, 1), (6, 1)]
    assert not readable(outbound)
