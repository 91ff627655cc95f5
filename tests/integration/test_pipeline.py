"""End to end on real NATS JetStream and MariaDB: signal -> worker -> events -> MySQL views."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import pytest

from engine.domain.model import CloseReason, Outcome, PositionSide
from tests.integration.harness import Pipeline
from tests.integration.venues import VENUES, Emulator, venue_called

D = Decimal
pytestmark = pytest.mark.integration


@pytest.fixture(params=VENUES)
async def venue(request: pytest.FixtureRequest) -> AsyncIterator[Emulator | None]:
    """Every scenario here runs on the paper venue and on ccxt + the Binance USD-M emulator, the
    emulator at the paper venue's fee rate so one set of hand-computed figures holds for both
    (test_venue.py checks the venue's own fee tier)."""
    async with venue_called(request.param) as running:
        if running is not None:
            running.exchange.taker_fee = D("0.0005")
        yield running


async def test_example_1_hedge_buy_and_sell_on_one_symbol_both_execute(pipeline: Pipeline) -> None:
    await pipeline.tick("BTCUSDT", "45000")
    buy = await pipeline.publish("momentum_v1", "BTCUSDT", "BUY", quantity="0.01", confidence=0.8)
    sell = await pipeline.publish("mean_reversion_v1", "BTCUSDT", "sell", quantity="0.01", confidence=0.75)
    assert (await pipeline.decision(buy)).outcome is Outcome.ACCEPTED
    assert (await pipeline.decision(sell)).outcome is Outcome.ACCEPTED
    await pipeline.wait_events(lambda _: len(pipeline.opened()) == 2, "two opens")
    keys = {e.exchange_position.key for e in pipeline.opened()}
    assert keys == {"BTCUSDT_LONG", "BTCUSDT_SHORT"}
    await pipeline.mysql_caught_up()
    rows = await pipeline.query(
        "SELECT position_key, status, quantity FROM exchange_positions ORDER BY position_key"
    )
    assert [(r["position_key"], r["status"], r["quantity"]) for r in rows] == [
        ("BTCUSDT_LONG", "open", D("0.01")),
        ("BTCUSDT_SHORT", "open", D("0.01")),
    ]


async def test_example_2_tp_closes_one_slice_and_views_give_hand_computed_numbers(pipeline: Pipeline) -> None:
    await pipeline.tick("ETHUSDT", "3000")
    m1 = await pipeline.publish(
        "momentum_v1", "ETHUSDT", "buy", quantity="0.1", confidence=0.8, take_profit_pct=0.05
    )
    await pipeline.decision(m1)
    await pipeline.tick("ETHUSDT", "3030")
    b1 = await pipeline.publish(
        "breakout_v1", "ETHUSDT", "buy", quantity="0.2", confidence=0.7, stop_loss=2900
    )
    await pipeline.decision(b1)
    assert pipeline.opened()[-1].exchange_position.quantity_after == D("0.3")

    await pipeline.tick("ETHUSDT", "3150")  # momentum's +5% TP
    await pipeline.wait_events(lambda _: len(pipeline.closed()) == 1, "momentum TP close")
    (tp,) = pipeline.closed()
    assert (tp.strategy_id, tp.close_reason, tp.realized_pnl) == (
        "momentum_v1",
        CloseReason.TAKE_PROFIT,
        D("14.6925"),
    )
    assert tp.exchange_position.quantity_after == D("0.2")  # breakout still open
    assert pipeline.worker is not None
    assert [sp.strategy_id for sp in pipeline.worker.book.positions.values()] == ["breakout_v1"]

    await pipeline.tick("ETHUSDT", "2900")  # breakout's SL
    await pipeline.wait_events(lambda _: len(pipeline.closed()) == 2, "breakout SL close")
    sl = pipeline.closed()[1]
    assert (sl.close_reason, sl.realized_pnl, sl.exchange_position.quantity_after) == (
        CloseReason.STOP_LOSS, D("-26.593"), D("0"),
    )  # fmt: skip
    m2 = await pipeline.publish("momentum_v1", "ETHUSDT", "buy", quantity="0.1", confidence=0.8)
    await pipeline.decision(m2)
    await pipeline.mysql_caught_up()

    perf = {r["strategy_id"]: r for r in await pipeline.query("SELECT * FROM strategy_performance")}
    momentum, breakout = perf["momentum_v1"], perf["breakout_v1"]
    assert (momentum["total_positions"], momentum["open_positions"], momentum["closed_positions"]) == (
        2,
        1,
        1,
    )
    assert (
        momentum["tp_hits"],
        momentum["sl_hits"],
        momentum["winning_trades"],
        momentum["losing_trades"],
    ) == (1, 0, 1, 0)
    assert momentum["win_rate"] == 1
    assert momentum["total_pnl"] == D("14.6925")
    assert momentum["total_fees"] == D("0.4525")  # 0.15 + 0.1575 + 0.145
    assert momentum["avg_pnl_pct"].quantize(D("0.0001")) == D("4.8975")  # 14.6925 / 300
    assert momentum["profit_factor"] is None  # no losing trade
    assert momentum["avg_duration_seconds"] >= 0
    assert (
        breakout["tp_hits"],
        breakout["sl_hits"],
        breakout["winning_trades"],
        breakout["losing_trades"],
    ) == (0, 1, 0, 1)
    assert breakout["win_rate"] == 0 and breakout["profit_factor"] == 0
    assert breakout["total_pnl"] == D("-26.593") and breakout["total_fees"] == D("0.593")
    assert breakout["avg_pnl_pct"].quantize(D("0.0001")) == D("-4.3883")  # -26.593 / 606

    summary = {r["strategy_id"]: r for r in await pipeline.query("SELECT * FROM contribution_summary")}
    assert summary["momentum_v1"]["contributions"] == 2
    assert summary["momentum_v1"]["total_quantity"] == D("0.2")
    assert summary["momentum_v1"]["avg_entry_price"] == D("2950")
    assert summary["momentum_v1"]["total_pnl"] == D("14.6925")
    assert summary["breakout_v1"]["position_side"] == "LONG"
    assert summary["breakout_v1"]["avg_entry_price"] == D("3030")

    lives = await pipeline.query(
        "SELECT status, realized_pnl, total_fees, contributions FROM exchange_positions ORDER BY opened_at"
    )
    assert (lives[0]["status"], lives[0]["realized_pnl"], lives[0]["total_fees"], lives[0]["contributions"]) == (
        "closed", D("-11.9005"), D("0.9005"), 2,
    )  # fmt: skip
    assert lives[1]["status"] == "open"
    # the invariant, through MySQL: the exchange position's PnL is the sum of its slices'
    slices = await pipeline.query("SELECT SUM(realized_pnl) AS pnl FROM position_closes")
    assert slices[0]["pnl"] == lives[0]["realized_pnl"]


@pytest.mark.parametrize(
    ("settings", "second_action", "second_confidence", "expected"),
    [
        ({}, "buy", 0.7, "accepted"),
        ({"SAME_DIRECTION_CONFLICT_RESOLUTION": "strongest_wins"}, "buy", 0.7, "weaker_than_existing"),
        ({"SAME_DIRECTION_CONFLICT_RESOLUTION": "reject_duplicates"}, "buy", 0.7, "position_exists"),
        ({"POSITION_MODE": "one-way"}, "sell", 0.75, "opposite_conflict"),
        ({"POSITION_MODE_AWARE_CONFLICTS": "false"}, "sell", 0.75, "opposite_conflict"),
        ({"POSITION_MODE": "hedge"}, "sell", 0.75, "accepted"),
    ],
)
async def test_conflict_policies_through_the_worker(
    make_pipeline: Callable[..., Pipeline], settings: dict[str, str], second_action: str,
    second_confidence: float, expected: str,
) -> None:  # fmt: skip
    async with make_pipeline(**settings) as pipeline:
        await pipeline.tick("BTCUSDT", "45000")
        first = await pipeline.publish("momentum_v1", "BTCUSDT", "buy", quantity="0.001", confidence=0.8)
        await pipeline.decision(first)
        second = await pipeline.publish(
            "other_v1", "BTCUSDT", second_action, quantity="0.001", confidence=second_confidence
        )
        decision = await pipeline.decision(second)
        assert decision.reason_code == expected
        await pipeline.mysql_caught_up()
        rows = await pipeline.query(
            "SELECT outcome, reason_code FROM signal_decisions WHERE signal_id = %s", second
        )
        assert rows == [{"outcome": decision.outcome.value, "reason_code": expected}]


async def test_one_way_reversal_closes_weaker_longs_in_one_order(
    make_pipeline: Callable[..., Pipeline],
) -> None:
    async with make_pipeline(POSITION_MODE="one-way") as pipeline:
        await pipeline.tick("BTCUSDT", "45000")
        await pipeline.decision(
            await pipeline.publish("a", "BTCUSDT", "buy", quantity="0.002", confidence=0.7)
        )
        await pipeline.tick("BTCUSDT", "45500")
        rev = await pipeline.publish("b", "BTCUSDT", "sell", quantity="0.001", confidence=0.9)
        assert (await pipeline.decision(rev)).outcome is Outcome.ACCEPTED
        (closed,) = pipeline.closed()
        assert closed.close_reason is CloseReason.REVERSED and closed.gross_pnl == D("1.0000")
        opened = pipeline.opened()[-1]
        assert opened.side is PositionSide.SHORT and opened.client_order_id == closed.client_order_id


async def test_malformed_signals_are_dead_lettered_and_the_next_valid_one_executes(
    pipeline: Pipeline,
) -> None:
    await pipeline.tick("BTCUSDT", "45000")
    bad_inputs = [
        ("signals.s1.BTCUSDT", b"{not json"),
        ("signals.s1.BTCUSDT", b'{"strategy_id":"s1","symbol":"BTCUSDT","action":"buy","quantity":"abc"}'),
        ("signals.s1.BTCUSDT", b'{"strategy_id":"s1","symbol":"BTCUSDT","action":"buy","quantity":NaN}'),
        ("signals.s1.BTCUSDT", b'{"strategy_id":"s1","symbol":"BTCUSDT","action":"buy","quantity":-1}'),
        ("signals.s1.BTCUSDT", b'{"strategy_id":"intruder","symbol":"BTCUSDT","action":"buy","quantity":1}'),
        ("signals.s1.BTCUSDT", b'{"strategy_id":"s1","symbol":"BTCUSDT","action":"buy","quantity":1,"x":"'
         + b"a" * 70_000 + b'"}'),
    ]  # fmt: skip
    for subject, data in bad_inputs:
        await pipeline.publish_raw(subject, data)
    good = await pipeline.publish("s1", "BTCUSDT", "buy", quantity="0.001", confidence=0.9)
    assert (await pipeline.decision(good)).outcome is Outcome.ACCEPTED
    await pipeline.wait_events(lambda _: len(pipeline.dead()) == len(bad_inputs), "dead letters")
    codes = [d.reason_code for d in pipeline.dead()]
    assert codes == [
        "bad_json",
        "invalid_field",
        "bad_json",
        "invalid_field",
        "identity_mismatch",
        "oversize",
    ]
    assert "quantity" in pipeline.dead()[1].errors[0]
    assert pipeline.dead()[-1].payload_truncated and len(pipeline.dead()[-1].payload) == 64 * 1024
    await pipeline.mysql_caught_up()
    rows = await pipeline.query("SELECT reason_code, COUNT(*) AS n FROM dead_letters GROUP BY reason_code")
    assert {r["reason_code"]: r["n"] for r in rows} == {
        "bad_json": 2,
        "invalid_field": 2,
        "identity_mismatch": 1,
        "oversize": 1,
    }


async def test_republished_signal_executes_once(pipeline: Pipeline) -> None:
    await pipeline.tick("BTCUSDT", "45000")
    sid = await pipeline.publish("s1", "BTCUSDT", "buy", quantity="0.001", confidence=0.9, signal_id="sig-1")
    await pipeline.decision(sid)
    # Same Nats-Msg-Id inside the window: JetStream itself drops it.
    assert not await pipeline.publish_raw(
        "signals.s1.BTCUSDT",
        b'{"strategy_id":"s1","symbol":"BTCUSDT","action":"buy","quantity":0.001}',
        "sig-1",
    )
    # Same signal_id under another message id: the worker records a duplicate, executes nothing.
    again = b'{"strategy_id":"s1","symbol":"BTCUSDT","action":"buy","quantity":0.001,"signal_id":"sig-1"}'
    assert await pipeline.publish_raw("signals.s1.BTCUSDT", again, "another-msg-id")
    await pipeline.wait_events(lambda _: len(pipeline.decisions()) == 2, "duplicate decision")
    assert [d.outcome for d in pipeline.decisions()] == [Outcome.ACCEPTED, Outcome.DUPLICATE]
    assert len(pipeline.opened()) == 1
    assert pipeline.venue_order_count() == 1


async def test_seed_era_signals_without_a_quantity_are_sized_by_the_rules(
    make_pipeline: Any, venue: Emulator | None
) -> None:
    """The seed's example signals carry no quantity: DEFAULT_NOTIONAL sizes them, and
    `position_size_pct` takes a share of the paper wallet (PAPER_BALANCE; the emulator's
    balance is the venue test's)."""
    if venue is not None:
        pytest.skip("the paper wallet")
    async with make_pipeline(DEFAULT_NOTIONAL="900", PAPER_BALANCE="45000") as pipeline:
        await pipeline.tick("BTCUSDT", "45000")
        seed = {
            "strategy_id": "seed_v1",
            "symbol": "BTCUSDT",
            "action": "buy",
            "confidence": 0.8,
            "price": 45000,
        }
        await pipeline.publish_raw(
            "signals.seed_v1.BTCUSDT", json.dumps(seed | {"signal_id": "seed-1"}).encode()
        )
        assert (await pipeline.decision("seed-1")).outcome is Outcome.ACCEPTED
        share = seed | {"signal_id": "seed-2", "strategy_id": "share_v1", "position_size_pct": 0.1}
        await pipeline.publish_raw("signals.share_v1.BTCUSDT", json.dumps(share).encode())
        assert (await pipeline.decision("seed-2")).outcome is Outcome.ACCEPTED
        quantities = {e.strategy_id: e.quantity for e in pipeline.opened()}
        # 900 / 45,000; then 10 % of what the wallet has left (45,000 - 900 - fees) / 45,000
        assert quantities == {"seed_v1": Decimal("0.02"), "share_v1": Decimal("0.097")}


ORIGINAL_ATTRIBUTION_QUERY = """
SELECT exchange_position_key, strategy_id, contribution_quantity, contribution_entry_price,
       exit_price, contribution_pnl, status
FROM position_contributions
WHERE exchange_position_key = %s
ORDER BY created_at
"""
ORIGINAL_PNL_CHECK = """
SELECT ep.position_key, ep.realized_pnl, SUM(pc.contribution_pnl) AS contributions_pnl
FROM exchange_positions ep
JOIN position_contributions pc ON pc.exchange_position_id = ep.exchange_position_id
GROUP BY ep.exchange_position_id, ep.position_key, ep.realized_pnl
HAVING ABS(ep.realized_pnl - SUM(pc.contribution_pnl)) > 0.000000001
"""


async def test_the_original_systems_attribution_query_and_pnl_check_run(pipeline: Pipeline) -> None:
    await pipeline.tick("ETHUSDT", "3000")
    for strategy, qty, tp in (("momentum_v1", "0.1", "3150"), ("breakout_v1", "0.2", None)):
        fields = {"quantity": qty, "confidence": 0.9} | ({"take_profit": tp} if tp else {})
        await pipeline.decision(await pipeline.publish(strategy, "ETHUSDT", "buy", **fields))
    await pipeline.tick("ETHUSDT", "3150")  # momentum's TP
    await pipeline.wait_events(lambda _: len(pipeline.closed()) == 1, "the TP close")
    await pipeline.mysql_caught_up()
    rows = await pipeline.query(ORIGINAL_ATTRIBUTION_QUERY, "ETHUSDT_LONG")
    momentum, breakout = rows
    (tp,) = pipeline.closed()
    assert (momentum["strategy_id"], momentum["status"], momentum["contribution_pnl"], momentum["exit_price"]) == (
        "momentum_v1", "closed", tp.realized_pnl, D("3150"),
    )  # fmt: skip
    assert (momentum["contribution_quantity"], momentum["contribution_entry_price"]) == (D("0.1"), D("3000"))
    assert (breakout["status"], breakout["contribution_pnl"], breakout["exit_price"]) == ("open", 0, None)
    assert await pipeline.query(ORIGINAL_PNL_CHECK) == []
