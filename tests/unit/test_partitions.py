"""Partitions by symbol and the rule that spreads them over workers (issue #16)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.domain.partitions import (
    event_symbol,
    fair_share,
    lane_name,
    partition_of,
    plan,
    signal_filter,
    signal_transform,
)
from engine.domain.reasons import DeadLetter
from engine.domain.signals import MalformedSignal, Signal, parse_signal


def test_partition_is_fnv1a_of_the_symbol() -> None:
    # The published FNV-1a 32 test vectors (a test on a real nats-server checks the same function).
    assert partition_of("BTCUSDT", 1) == 0
    assert partition_of("", 1 << 32) == 0x811C9DC5
    assert partition_of("a", 1 << 32) == 0xE40C292C
    assert partition_of("foobar", 1 << 32) == 0xBF9CF968
    assert {partition_of(f"S{i}USDT", 8) for i in range(200)} == set(range(8))


def test_one_partition_keeps_the_subjects_as_published() -> None:
    assert signal_transform(1) is None
    assert signal_filter(None) == "signals.>"
    assert lane_name("tradeengine-worker", None) == "tradeengine-worker"
    assert signal_transform(3) == (
        "signals.*.*",
        "signals.{{wildcard(1)}}.{{wildcard(2)}}.{{partition(3,2)}}",
    )
    assert signal_filter(2) == "signals.*.*.2"
    assert lane_name("tradeengine-worker", 2) == "tradeengine-worker-p2"


def test_events_name_their_symbol() -> None:
    assert event_symbol("decisions.BTCUSDT") == "BTCUSDT"
    assert event_symbol("positions.opened.ETHUSDT.LONG") == "ETHUSDT"
    assert event_symbol("orders.settled.SOLUSDT") == "SOLUSDT"
    assert event_symbol("deadletter.signals") is None
    assert event_symbol("risk.halt") is None


PAYLOAD = b'{"strategy_id": "s1", "symbol": "BTCUSDT", "action": "buy", "quantity": "0.01", "confidence": "0.9", "signal_id": "p-1"}'


def test_a_mapped_subject_is_accepted_only_with_the_symbols_own_partition() -> None:
    own = partition_of("BTCUSDT", 4)
    parsed = parse_signal(f"signals.s1.BTCUSDT.{own}", PAYLOAD, partitions=4)
    assert isinstance(parsed, Signal) and parsed.symbol == "BTCUSDT" and parsed.strategy_id == "s1"
    assert isinstance(parse_signal("signals.s1.BTCUSDT", PAYLOAD, partitions=4), Signal)
    wrong = parse_signal(f"signals.s1.BTCUSDT.{(own + 1) % 4}", PAYLOAD, partitions=4)
    assert isinstance(wrong, MalformedSignal) and wrong.reason_code is DeadLetter.BAD_SUBJECT
    assert "SIGNAL_PARTITIONS=4" in wrong.errors[0]
    # Back to one worker after partitions: it reads what any partition left.
    assert isinstance(parse_signal(f"signals.s1.BTCUSDT.{(own + 1) % 4}", PAYLOAD), Signal)
    assert isinstance(parse_signal("signals.s1.BTCUSDT.x", PAYLOAD), MalformedSignal)


def _settle(
    partitions: int, workers: int, held: dict[int, set[int]], rounds: int = 50
) -> dict[int, set[int]]:
    """Workers apply `plan` in turn until nothing moves; returns who holds what."""
    for _ in range(rounds):
        moved = False
        for worker in range(workers):
            taken = frozenset(p for other, ps in held.items() if other != worker for p in ps)
            step = plan(partitions, frozenset(held[worker]), taken, workers, worker * 7919)
            for p in step.release:
                held[worker].discard(p)
                moved = True
            for p in step.take:
                assert p not in taken
                held[worker].add(p)
                moved = True
        if not moved:
            return held
    raise AssertionError(f"no steady state: {held}")


@settings(max_examples=300, deadline=None)
@given(partitions=st.integers(1, 64), workers=st.integers(1, 12))
def test_workers_settle_on_every_partition_held_once_within_the_fair_share(
    partitions: int, workers: int
) -> None:
    held = _settle(partitions, workers, {w: set() for w in range(workers)})
    all_held = [p for ps in held.values() for p in ps]
    assert sorted(all_held) == list(range(partitions))  # each once, none left
    assert max(len(ps) for ps in held.values()) <= fair_share(partitions, workers)


@settings(max_examples=200, deadline=None)
@given(partitions=st.integers(2, 48), workers=st.integers(2, 8), data=st.data())
def test_a_dead_workers_partitions_go_to_the_others_and_nothing_else_moves(
    partitions: int, workers: int, data: st.DataObject
) -> None:
    held = _settle(partitions, workers, {w: set() for w in range(workers)})
    dead = data.draw(st.integers(0, workers - 1))
    orphans = held.pop(dead)
    before = {w: set(ps) for w, ps in held.items()}
    survivors = {i: held[w] for i, w in enumerate(sorted(held))}
    after = _settle(partitions, workers - 1, survivors)
    for i, w in enumerate(sorted(before)):
        assert before[w] <= after[i], "a survivor gave up a partition it held"
    gained = set().union(*after.values()) - set().union(*before.values())
    assert gained == orphans


@settings(max_examples=200, deadline=None)
@given(partitions=st.integers(1, 48), workers=st.integers(1, 8))
def test_a_joining_worker_gets_only_what_others_hold_above_their_share(partitions: int, workers: int) -> None:
    held = _settle(partitions, workers, {w: set() for w in range(workers)})
    held[workers] = set()
    share = fair_share(partitions, workers + 1)
    excess = sum(max(0, len(ps) - share) for ps in held.values())
    before = {w: set(ps) for w, ps in held.items()}
    after = _settle(partitions, workers + 1, held)
    moved = sum(len(before[w] - after[w]) for w in before)
    assert moved == excess
    assert sorted(p for ps in after.values() for p in ps) == list(range(partitions))


@settings(max_examples=200, deadline=None)
@given(partitions=st.integers(2, 32), counted=st.integers(2, 40), data=st.data())
def test_partitions_free_for_longer_than_a_lease_are_taken_whatever_the_shares(
    partitions: int, counted: int, data: st.DataObject
) -> None:
    """A lone worker that counts peers which cannot take anything (another desk's, or a stuck
    one) still ends up holding every partition once they are overdue."""
    held: set[int] = set()
    for _ in range(partitions + 1):
        free = frozenset(range(partitions)) - held
        step = plan(partitions, frozenset(held), frozenset(), counted, data.draw(st.integers(0, 99)), free,
                    hungry=False)  # fmt: skip
        assert not step.release
        held |= set(step.take)
    assert held == set(range(partitions))
