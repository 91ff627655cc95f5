"""The original system's hedge tests restated as behaviour, plus the policy table."""

from __future__ import annotations

from decimal import Decimal

import pytest

from engine.domain.decide import Accepted, Refused
from engine.domain.events import PositionClosed
from engine.domain.model import (
    CloseReason,
    Outcome,
    PositionKey,
    PositionMode,
    PositionSide,
    SameDirectionPolicy,
)
from tests.helpers import Harness

D = Decimal
LONG = PositionKey("BTCUSDT", PositionSide.LONG)
SHORT = PositionKey("BTCUSDT", PositionSide.SHORT)


def rejected(verdict: Accepted | Refused, code: str) -> bool:
    return (
        isinstance(verdict, Refused) and verdict.outcome is Outcome.REJECTED and verdict.reason_code == code
    )


async def test_hedge_buy_then_weaker_sell_both_execute() -> None:
    h = Harness()
    await h.tick("BTCUSDT", "45000")
    assert isinstance(
        await h.signal("momentum_v1", "BTCUSDT", "buy", quantity="0.01", confidence="0.8"), Accepted
    )
    assert isinstance(
        await h.signal("mean_reversion_v1", "BTCUSDT", "sell", quantity="0.01", confidence="0.75"), Accepted
    )
    assert h.book.exchange[LONG].quantity == D("0.01")
    assert h.book.exchange[SHORT].quantity == D("0.01")
    assert h.book.exchange[LONG].id != h.book.exchange[SHORT].id
    assert h.paper.position("BTCUSDT", PositionSide.LONG) == D("0.01")
    assert h.paper.position("BTCUSDT", PositionSide.SHORT) == D("0.01")


@pytest.mark.parametrize(
    ("mode", "aware"),
    [(PositionMode.ONE_WAY, True), (PositionMode.HEDGE, False), (PositionMode.ONE_WAY, False)],
)
async def test_opposite_weaker_signal_is_a_conflict_outside_aware_hedge(
    mode: PositionMode, aware: bool
) -> None:
    h = Harness(mode=mode, aware=aware)
    await h.tick("BTCUSDT", "45000")
    await h.signal("momentum_v1", "BTCUSDT", "buy", quantity="0.01", confidence="0.8")
    assert rejected(await h.signal("mean_reversion_v1", "BTCUSDT", "sell", quantity="0.01", confidence="0.75"),
                    "opposite_conflict")  # fmt: skip
    assert rejected(
        await h.signal("mean_reversion_v1", "BTCUSDT", "sell", quantity="0.01", confidence="0.8"),
        "opposite_conflict",
    )  # fmt: skip  -- equal confidence does not win
    assert SHORT not in h.book.exchange


@pytest.mark.parametrize("mode", [PositionMode.ONE_WAY, PositionMode.HEDGE])
async def test_stronger_opposite_signal_reverses(mode: PositionMode) -> None:
    h = Harness(mode=mode, aware=False)
    await h.tick("BTCUSDT", "45000")
    await h.signal("a", "BTCUSDT", "buy", quantity="0.01", confidence="0.7")
    await h.signal("b", "BTCUSDT", "buy", quantity="0.02", confidence="0.65")
    verdict = await h.signal("c", "BTCUSDT", "sell", quantity="0.005", confidence="0.9")
    assert isinstance(verdict, Accepted)
    closes = [e for e in h.events if isinstance(e, PositionClosed)]
    assert {e.strategy_id for e in closes} == {"a", "b"}
    assert all(e.close_reason is CloseReason.REVERSED for e in closes)
    assert LONG not in h.book.exchange and h.book.exchange[SHORT].quantity == D("0.005")
    assert h.paper.position("BTCUSDT", PositionSide.SHORT) == D("0.005")
    assert h.paper.position("BTCUSDT", PositionSide.LONG) == 0
    # one-way venues net the reversal into a single order; hedge venues need one per key
    assert len(verdict.orders) == (1 if mode is PositionMode.ONE_WAY else 2)
    assert len(h.paper.orders) == 2 + len(verdict.orders)


@pytest.mark.parametrize(
    ("policy", "outcome"),
    [
        (SameDirectionPolicy.ACCUMULATE, None),
        (SameDirectionPolicy.STRONGEST_WINS, "weaker_than_existing"),
        (SameDirectionPolicy.REJECT_DUPLICATES, "position_exists"),
    ],
)
async def test_buy_then_weaker_buy(policy: SameDirectionPolicy, outcome: str | None) -> None:
    h = Harness(same_direction=policy)
    await h.tick("BTCUSDT", "45000")
    await h.signal("momentum_v1", "BTCUSDT", "buy", quantity="0.01", confidence="0.8")
    verdict = await h.signal("breakout_v1", "BTCUSDT", "buy", quantity="0.01", confidence="0.7")
    if outcome is None:
        assert isinstance(verdict, Accepted)
        assert h.book.exchange[LONG].quantity == D("0.02")
        assert h.book.exchange[LONG].contributions == 2
    else:
        assert rejected(verdict, outcome)
        assert h.book.exchange[LONG].quantity == D("0.01")


async def test_strongest_wins_accepts_a_stronger_signal_without_closing_others() -> None:
    h = Harness(same_direction=SameDirectionPolicy.STRONGEST_WINS)
    await h.tick("BTCUSDT", "45000")
    await h.signal("a", "BTCUSDT", "buy", quantity="0.01", confidence="0.7")
    assert isinstance(await h.signal("b", "BTCUSDT", "buy", quantity="0.01", confidence="0.71"), Accepted)
    assert len(h.book.open_on(LONG)) == 2


async def test_reject_duplicates_allows_again_once_flat() -> None:
    h = Harness(same_direction=SameDirectionPolicy.REJECT_DUPLICATES)
    await h.tick("BTCUSDT", "45000")
    await h.signal("a", "BTCUSDT", "buy", quantity="0.01", confidence="0.7")
    await h.signal("a", "BTCUSDT", "close")
    assert isinstance(await h.signal("b", "BTCUSDT", "buy", quantity="0.01", confidence="0.7"), Accepted)


async def test_accumulation_limit() -> None:
    h = Harness(max_accumulations=3)
    await h.tick("BTCUSDT", "45000")
    for i in range(3):
        assert isinstance(
            await h.signal(f"s{i}", "BTCUSDT", "buy", quantity="0.001", confidence="0.8"), Accepted
        )
    assert rejected(
        await h.signal("s9", "BTCUSDT", "buy", quantity="0.001", confidence="0.8"), "max_accumulations"
    )


async def test_complex_hedge_scenario_ends_long_0_003_at_45666_67_and_short_0_001() -> None:
    h = Harness()
    await h.tick("BTCUSDT", "45000")
    await h.signal("momentum_v1", "BTCUSDT", "buy", quantity="0.001", confidence="0.8")
    await h.signal("mean_reversion_v1", "BTCUSDT", "sell", quantity="0.001", confidence="0.75")
    await h.tick("BTCUSDT", "46000")
    await h.signal("breakout_v1", "BTCUSDT", "buy", quantity="0.001", confidence="0.9")
    await h.signal("trend_v1", "BTCUSDT", "buy", quantity="0.001", confidence="0.85")
    long_ep, short_ep = h.book.exchange[LONG], h.book.exchange[SHORT]
    assert long_ep.quantity == D("0.003")
    assert long_ep.avg_entry_price.quantize(D("0.01")) == D("45666.67")
    assert short_ep.quantity == D("0.001")
    assert short_ep.avg_entry_price == D("45000")
    assert [e.contribution.sequence for e in h.opened() if e.side is PositionSide.LONG] == [1, 2, 3]
    assert h.paper.position("BTCUSDT", PositionSide.LONG) == D("0.003")


async def test_checks_before_conflicts() -> None:
    h = Harness()
    assert rejected(await h.signal("a", "BTCUSDT", "buy", quantity="0.01"), "no_price")
    await h.tick("BTCUSDT", "45000")
    assert rejected(
        await h.signal("a", "BTCUSDT", "buy", quantity="0.01", confidence="0.5"), "low_confidence"
    )
    assert rejected(await h.signal("a", "NOPEUSDT", "buy", quantity="0.01"), "unknown_symbol")
    assert rejected(await h.signal("a", "BTCUSDT", "buy", quantity="0.0001"), "below_min_quantity")
    assert rejected(
        await h.signal("a", "BTCUSDT", "buy", quantity="0.001", take_profit="44000"), "invalid_tp_sl"
    )
    assert rejected(
        await h.signal("a", "BTCUSDT", "sell", quantity="0.001", stop_loss="44000"), "invalid_tp_sl"
    )
    assert rejected(
        await h.signal("a", "BTCUSDT", "buy", quantity="0.01", timestamp="2026-11-25T11:00:00Z"), "stale"
    )
    hold = await h.signal("a", "BTCUSDT", "hold")
    assert isinstance(hold, Refused) and hold.outcome is Outcome.IGNORED
    nothing = await h.signal("a", "BTCUSDT", "close")
    assert isinstance(nothing, Refused) and nothing.reason_code == "nothing_to_close"
    assert not h.paper.orders


async def test_quote_quantity_is_rounded_down_to_the_step() -> None:
    h = Harness()
    await h.tick("BTCUSDT", "45000")
    assert isinstance(await h.signal("a", "BTCUSDT", "buy", quote_quantity="100"), Accepted)
    assert h.opened()[0].quantity == D("0.002")  # 100 / 45000 = 0.00222.. -> 0.002
