"""AckTracker: acks leave in arrival order, once, only for the connection they belong to."""

from __future__ import annotations

import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.source.acks import AckTracker, Ticket


class Wire:
    """The tracker's outlet (Outbound in the gateway): records the acks released to it."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, int]] = []

    def ack_many(self, acks: list[tuple[int, int]]) -> None:
        self.sent.extend(acks)

    @property
    def mids(self) -> list[int]:
        return [mid for mid, _ in self.sent]


def make(clock: int = 1000) -> tuple[AckTracker, Wire]:
    wire = Wire()
    tracker = AckTracker(wire, clock_ms=lambda: clock)
    tracker.new_connection()
    return tracker, wire


def test_out_of_order_settles_release_acks_in_arrival_order() -> None:
    tracker, wire = make()
    t1, t2, t3 = (tracker.arrived(mid, 1, 1) for mid in (11, 12, 13))
    tracker.settle([t3])
    tracker.settle([t2])
    assert wire.sent == []
    tracker.settle([t1])
    assert wire.sent == [(11, 1), (12, 1), (13, 1)]
    assert tracker.pending == 0


def test_ack_is_released_only_when_every_part_is_settled() -> None:
    tracker, wire = make()
    ticket = tracker.arrived(5, 1, 3)
    tracker.settle([ticket, ticket])
    assert wire.sent == [] and not ticket.complete
    tracker.settle([ticket])
    assert wire.sent == [(5, 1)] and ticket.done


def test_message_without_records_is_acked_at_once() -> None:
    tracker, wire = make()
    ticket = tracker.arrived(7, 1, 0)
    assert wire.sent == [(7, 1)] and ticket.done


def test_message_without_records_waits_behind_an_earlier_incomplete_one() -> None:
    tracker, wire = make()
    first = tracker.arrived(1, 1, 1)
    tracker.arrived(2, 1, 0)
    assert wire.sent == []
    tracker.settle([first])
    assert wire.mids == [1, 2]


def test_qos0_messages_never_ack_and_never_hold_back_others() -> None:
    tracker, wire = make()
    q0 = tracker.arrived(0, 0, 1)
    q1 = tracker.arrived(8, 1, 1)
    done = tracker.settle([q1])
    assert wire.sent == [(8, 1)]
    done += tracker.settle([q0])
    assert wire.sent == [(8, 1)]
    assert q0.done and done == [q1, q0]


def test_qos2_ticket_is_acked_with_its_qos() -> None:
    tracker, wire = make()
    tracker.settle([tracker.arrived(3, 2, 1)])
    assert wire.sent == [(3, 2)]


def test_acks_owed_to_an_earlier_connection_are_never_sent() -> None:
    tracker, wire = make()
    old_first = tracker.arrived(1, 1, 1)
    old_second = tracker.arrived(2, 1, 1)
    tracker.settle([old_second])
    tracker.new_connection()
    new = tracker.arrived(1, 1, 1)          # the broker may reuse the packet id
    tracker.settle([old_first])
    assert wire.sent == []
    tracker.settle([new])
    assert wire.sent == [(1, 1)]
    assert old_first.done and old_second.done and tracker.pending == 0


def test_stale_ticket_does_not_release_the_new_connections_head() -> None:
    tracker, wire = make()
    old = tracker.arrived(9, 1, 1)
    tracker.new_connection()
    new_first = tracker.arrived(10, 1, 1)
    new_second = tracker.arrived(11, 1, 1)
    tracker.settle([new_second, old])
    assert wire.sent == []
    tracker.settle([new_first])
    assert wire.mids == [10, 11]


def test_settling_more_often_than_parts_is_ignored() -> None:
    tracker, wire = make()
    ticket = tracker.arrived(4, 1, 1)
    tracker.settle([ticket, ticket, ticket])
    tracker.settle([ticket])
    assert wire.sent == [(4, 1)]


def test_done_tickets_carry_their_receipt_time_for_latency() -> None:
    tracker, _ = make(clock=123)
    ticket = tracker.arrived(1, 1, 1)
    explicit = tracker.arrived(2, 1, 1, received_ms=99)
    done = tracker.settle([explicit, ticket])
    assert done == [ticket, explicit]
    assert [t.received_ms for t in done] == [123, 99]


def test_failing_outlet_does_not_block_later_acks() -> None:
    sent: list[int] = []

    class Flaky:
        def ack_many(self, acks: list[tuple[int, int]]) -> None:
            if acks[0][0] == 1:
                raise OSError("socket gone")
            sent.extend(mid for mid, _ in acks)

    tracker = AckTracker(Flaky())
    a, b = tracker.arrived(1, 1, 1), tracker.arrived(2, 1, 1)
    assert tracker.settle([a]) == [a]
    assert tracker.settle([b]) == [b]
    assert sent == [2]


def test_one_settle_hands_every_ack_it_releases_to_the_outlet_at_once_in_order() -> None:
    calls: list[list[tuple[int, int]]] = []
    tracker = AckTracker(type("Outlet", (), {"ack_many": lambda self, acks: calls.append(list(acks))})())
    tickets = [tracker.arrived(mid, 1, 1) for mid in (5, 6, 7)]
    tracker.settle(tickets[1:])
    assert calls == []                      # 6 and 7 wait behind 5
    tracker.settle(tickets[:1])
    assert calls == [[(5, 1), (6, 1), (7, 1)]]


def test_negative_parts_is_refused() -> None:
    tracker, _ = make()
    try:
        tracker.arrived(1, 1, -1)
    except ValueError as exc:
        assert "parts" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("negative parts accepted")


def test_concurrent_settles_from_many_threads_keep_arrival_order() -> None:
    tracker, wire = make()
    tickets = [tracker.arrived(mid, 1, 2) for mid in range(1, 2001)]
    halves = [tickets[::-1], tickets[::2] + tickets[1::2]]
    barrier = threading.Barrier(len(halves))

    def run(order: list[Ticket]) -> None:
        barrier.wait()
        for i in range(0, len(order), 7):
            tracker.settle(order[i:i + 7])

    threads = [threading.Thread(target=run, args=(order,)) for order in halves]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wire.mids == list(range(1, 2001))


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[tuple[int, int]], list[int]]:
    """Messages as (qos, parts) and a shuffled list of settlement events (ticket indexes)."""
    msgs = draw(st.lists(st.tuples(st.sampled_from([0, 1, 1, 2]), st.integers(0, 3)),
                         min_size=1, max_size=30))
    events = [i for i, (_, parts) in enumerate(msgs) for _ in range(parts)]
    order = draw(st.permutations(events))
    cut = draw(st.integers(0, len(order)))       # only a prefix of the settlements happens
    return msgs, list(order[:cut])


@settings(max_examples=300, deadline=None)
@given(scenarios(), st.integers(1, 5))
def test_any_settle_order_acks_a_prefix_of_arrival_and_all_fully_settled(
        scenario: tuple[list[tuple[int, int]], list[int]], batch: int) -> None:
    msgs, order = scenario
    tracker, wire = make()
    tickets = [tracker.arrived(mid, qos, parts) for mid, (qos, parts) in enumerate(msgs, start=1)]
    for i in range(0, len(order), batch):
        tracker.settle([tickets[j] for j in order[i:i + batch]])
        acked_mids = wire.mids
        ackable = [mid for mid, (qos, _) in enumerate(msgs, start=1) if qos > 0]
        assert acked_mids == ackable[:len(acked_mids)]           # always a prefix, never a gap

    settled_count = [0] * len(msgs)
    for j in order:
        settled_count[j] += 1
    ackable = [mid for mid, (qos, _) in enumerate(msgs, start=1) if qos > 0]
    expected: list[int] = []
    for mid in ackable:                                          # the longest fully settled prefix
        if settled_count[mid - 1] < msgs[mid - 1][1]:
            break
        expected.append(mid)
    assert wire.mids == expected
    assert len(set(wire.mids)) == len(wire.mids)                 # each ack once
    if len(order) == sum(parts for _, parts in msgs):             # everything settled → all acked
        assert wire.mids == ackable and tracker.pending == 0
