"""The drain pacer: per-stream token buckets from the open shard count, with an injected clock."""

from __future__ import annotations

from gateway.spool.pacing import SHARD_BYTES_PER_S, Pacer


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def sent_over(pacer: Pacer, clock: Clock, stream: str, seconds: float, size: int = 100, step: float = 0.01) -> int:
    """Records ``take`` lets through when asked as often as it allows, over ``seconds``."""
    sent, end = 0, clock.now + seconds
    while clock.now < end:
        while pacer.take(stream, 1, size) == 0.0:
            sent += 1
        clock.now += step
    return sent


def test_a_stream_is_paced_at_1000_records_per_second_per_open_shard() -> None:
    clock = Clock()
    pacer = Pacer(clock, burst_s=0.2, headroom=1.0)
    pacer.set_shards("four", 4)
    sent = sent_over(pacer, clock, "four", 10.0)
    assert 40_000 <= sent <= 40_000 + 4 * 1000 * 0.2 + 40


def test_bytes_are_paced_at_1_mib_per_second_per_shard() -> None:
    clock = Clock()
    pacer = Pacer(clock, headroom=1.0)
    pacer.set_shards("one", 1)
    size = 10_000
    sent = sent_over(pacer, clock, "one", 10.0, size=size)
    assert 10 * SHARD_BYTES_PER_S <= sent * size <= 10.3 * SHARD_BYTES_PER_S


def test_an_unknown_stream_is_paced_as_one_shard() -> None:
    clock = Clock()
    pacer = Pacer(clock, headroom=1.0)
    assert not pacer.known("s")
    assert pacer.rate("s") == (1000, SHARD_BYTES_PER_S)


def test_a_record_bigger_than_the_bucket_goes_once_the_bucket_is_full() -> None:
    clock = Clock()
    pacer = Pacer(clock, burst_s=0.2)
    assert pacer.take("s", 1, SHARD_BYTES_PER_S) == 0.0   # full bucket: it runs into debt
    wait = pacer.take("s", 1, SHARD_BYTES_PER_S)
    assert wait > 0.0
    clock.now += 1.2
    assert pacer.take("s", 1, SHARD_BYTES_PER_S) == 0.0


def test_a_wait_is_how_long_until_the_record_fits() -> None:
    clock = Clock()
    pacer = Pacer(clock, burst_s=0.2)
    while pacer.take("s", 1, 1) == 0.0:
        pass
    wait = pacer.take("s", 1, 1)
    assert 0.0 < wait <= 0.0011
    clock.now += wait
    assert pacer.take("s", 1, 1) == 0.0


def test_throttling_halves_the_rate_at_most_once_a_second_and_it_recovers_without() -> None:
    clock = Clock()
    pacer = Pacer(clock, decrease=0.5, cooldown_s=1.0, recover_s=10.0, floor=0.1)
    pacer.take("s", 1, 1)        # the stream is being paced: a throttle says the pace is too high
    pacer.throttled("s")
    pacer.throttled("s")
    assert pacer.factor("s") == 0.5
    clock.now += 1.0
    pacer.take("s", 1, 1)
    pacer.throttled("s")
    assert pacer.factor("s") == 0.25
    for _ in range(10):
        clock.now += 1.0
        pacer.take("s", 1, 1)
        pacer.throttled("s")
    assert pacer.factor("s") == 0.1, "never below the floor"
    clock.now += 1.0
    pacer.rate("s")
    clock.now += 5.0
    assert 0.55 <= pacer.factor("s") <= 0.65
    clock.now += 10.0
    assert pacer.factor("s") == 1.0


def test_aggregated_records_count_only_by_bytes() -> None:
    clock = Clock()
    pacer = Pacer(clock, burst_s=0.2)
    sent = 0
    while pacer.take("s", 0, 100) == 0.0:
        sent += 1
    assert sent > 1000, "records/s does not bind records that are packed into aggregates"


def test_the_pace_keeps_headroom_below_the_shards_limit() -> None:
    pacer = Pacer(Clock())
    pacer.set_shards("two", 2)
    assert pacer.rate("two") == (2 * 1000 * 0.95, 2 * SHARD_BYTES_PER_S * 0.95)


def test_retries_while_nothing_is_being_paced_do_not_lower_the_rate() -> None:
    """An outage's retries, or those of records handed over before it, say nothing about the pace."""
    clock = Clock()
    pacer = Pacer(clock, cooldown_s=1.0)
    pacer.take("s", 1, 1)
    clock.now += 5.0
    pacer.throttled("s")
    assert pacer.factor("s") == 1.0
    pacer.take("s", 1, 1)
    pacer.throttled("s", 1)
    assert pacer.factor("s") < 1.0


def test_retried_entries_are_charged_to_the_allowance_at_most_a_second_of_it() -> None:
    clock = Clock()
    pacer = Pacer(clock, burst_s=0.2, headroom=1.0)
    pacer.throttled("s", 10_000)
    assert pacer.take("s", 1, 1) > 0.0
    clock.now += 0.9
    assert pacer.take("s", 1, 1) > 0.0
    clock.now += 0.11           # one second's worth of debt is paid off in one second
    assert pacer.take("s", 1, 1) == 0.0


def test_the_hand_over_window_is_a_few_seconds_of_the_rate() -> None:
    pacer = Pacer(Clock(), headroom=1.0, window_s=3.0)
    pacer.set_shards("s", 2)
    assert pacer.take_many("s", [(1, 1)], (5999, 0)) == (1, 0.0)
    assert pacer.take_many("s", [(1, 1)], (6000, 0)) == (0, 0.0)
    assert pacer.take_many("s", [(1, 1)], (0, 6 * SHARD_BYTES_PER_S)) == (0, 0.0)


def test_taking_many_grants_what_asking_one_by_one_grants_and_stops_at_the_window() -> None:
    one_by_one, at_once = Pacer(Clock(), burst_s=0.2, window_s=0.01), Pacer(Clock(), burst_s=0.2, window_s=0.01)
    for pacer in (one_by_one, at_once):
        pacer.set_shards("s", 1)
    costs = [(1, 300), (0, 5000), (1, 50_000), (1, 200_000), (1, 10)] * 40
    granted, wait = 0, 0.0
    for records, n_bytes in costs:
        wait = one_by_one.take("s", records, n_bytes)
        if wait > 0.0:
            break
        granted += 1
    assert 0 < granted < len(costs) and wait > 0.0
    assert at_once.take_many("s", costs) == (granted, wait)
    # the window counts what this call granted too: 9.5 records (window_s × rate) at most, from none
    assert Pacer(Clock(), window_s=0.01).take_many("s", [(1, 1)] * 20, (0, 0))[0] == 10
