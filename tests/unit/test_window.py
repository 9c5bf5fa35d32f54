"""WindowWatch: telling a broker that waits for our acks from one that has nothing to send."""

from __future__ import annotations

from gateway.source.window import WindowWatch


def test_a_window_of_one_is_seen_at_the_second_message() -> None:
    watch = WindowWatch()
    assert not watch.drained(1, now=0.0)          # one held: could be a trickle
    assert watch.drained(1, now=0.3)              # one held again, never more: the broker waits


def test_a_wide_window_at_a_low_rate_keeps_pacing() -> None:
    watch = WindowWatch()
    held = [3, 5, 2, 6, 4, 7, 1, 5, 8, 3, 6, 2]   # what a trickle leaves unacked at each read
    assert not any(watch.drained(n, now=i * 0.1) for i, n in enumerate(held))


def test_the_judgment_holds_for_a_while_after_the_last_sign() -> None:
    watch = WindowWatch(hold_s=1.0)
    watch.drained(4, now=0.0)
    assert watch.drained(4, now=0.1)
    assert watch.drained(2, now=0.5)              # a partial refill: still the same broker
    assert watch.bound(now=1.0)
    assert not watch.bound(now=1.2)


def test_more_held_than_ever_means_the_window_is_wider() -> None:
    watch = WindowWatch()
    watch.drained(2, now=0.0)
    assert watch.drained(2, now=0.1)
    assert not watch.drained(3, now=0.2)


def test_nothing_held_is_no_evidence_and_a_new_connection_forgets() -> None:
    watch = WindowWatch()
    watch.drained(1, now=0.0)
    assert not watch.drained(0, now=0.1)
    assert not watch.drained(1, now=0.2)          # the streak restarted
    assert watch.drained(1, now=0.3)
    watch.new_connection()
    assert not watch.bound(now=0.3)
    assert not watch.drained(1, now=0.4)


def test_a_stream_answered_faster_than_it_arrives_is_released_after_the_hold() -> None:
    watch = WindowWatch(hold_s=1.0)
    watch.drained(1, now=0.0)
    assert watch.drained(1, now=0.3)              # judged a window of one
    for i in range(1, 90):                        # acked at once, each message shows one held again
        watch.drained(1, now=0.3 + i * 0.01)
    assert not watch.bound(now=1.31)              # signs of our own making did not extend it
    assert not watch.drained(1, now=1.4)          # paced again: one fresh sign is not enough...
    assert not watch.drained(10, now=1.5)         # ...and with the linger back, the messages pile up


def test_a_real_window_of_one_is_renewed_at_once_with_a_growing_hold() -> None:
    watch = WindowWatch(hold_s=1.0)
    watch.drained(1, now=0.0)
    assert watch.drained(1, now=0.3)              # bound until 1.3
    assert not watch.drained(1, now=1.35)         # expired: fresh signs needed
    assert watch.drained(1, now=1.65)             # renewed straight on: hold 2 s
    assert watch.bound(now=3.6)
    assert not watch.bound(now=3.7)
    watch.drained(1, now=3.7)
    assert watch.drained(1, now=4.0)              # and again: hold 4 s
    assert watch.bound(now=7.9)


def paced(watch: WindowWatch, counts: list[int], start: float, received: int, interval: float = 0.1,
          ) -> tuple[list[bool], float, int]:
    """Paced reads that each find `count` new messages held (acked fast, before the next read)."""
    seen = []
    for i, count in enumerate(counts):
        received += count
        seen.append(watch.drained(count, now=start + i * interval, received=received))
    return seen, start + len(counts) * interval, received


def test_a_steady_stream_acked_fast_is_disproven_by_its_rate_and_not_bound_again() -> None:
    watch = WindowWatch(hold_s=1.0)
    seen, now, received = paced(watch, [10, 10], 0.0, 0)   # 100 msg/s, 10 per paced read: looks like a window
    assert seen == [False, True]
    for i in range(90):                                    # bound, acked at once: still 100 msg/s
        received += 1
        watch.drained(1, now=now + i * 0.01, received=received)
    seen, now, received = paced(watch, [10] * 20, now + 1.0, received)
    assert not any(seen), "the same count, shown to be the stream's rate, must not bind again"
    seen, _, _ = paced(watch, [10, 10], now + 30.0, received)
    assert seen == [False, True], "...for a while: a window misjudged is tested again"


def test_a_real_window_sends_faster_once_acked_at_once_and_stays_detectable() -> None:
    watch = WindowWatch(hold_s=1.0)
    seen, now, received = paced(watch, [10, 10], 0.0, 0)   # a window of 10 per paced read: 100 msg/s
    assert seen == [False, True]
    for i in range(90):                                    # acked at once: the broker refills at once
        received += 10
        watch.drained(10, now=now + i * 0.01, received=received)
    seen, _, _ = paced(watch, [10, 10], now + 1.0, received)
    assert seen == [False, True], "a window that sped up when acked is renewed"


def test_a_quiet_spell_during_a_hold_disproves_nothing() -> None:
    watch = WindowWatch(hold_s=1.0)
    seen, now, received = paced(watch, [10, 10], 0.0, 0)
    assert seen[-1]
    watch.drained(1, now=now + 0.01, received=received + 1)   # then nothing for the rest of the hold
    seen, _, _ = paced(watch, [10, 10], now + 5.0, received + 1)
    assert seen == [False, True]


def test_a_window_of_one_is_never_disproven_by_a_slow_stream() -> None:
    watch = WindowWatch(hold_s=1.0)
    seen, now, received = paced(watch, [1, 1], 0.0, 0)
    assert seen == [False, True]
    for i in range(9):                                      # 10 msg/s, bound or not
        received += 1
        watch.drained(1, now=now + i * 0.1, received=received)
    seen, _, _ = paced(watch, [1, 1], now + 1.0, received)
    assert seen == [False, True]
