"""Attribution as several consumers (issue #16): with ATTRIBUTION_PARTITIONS=2 two consumers
write side by side, each its own symbols' events (so each position's events stay in order), and
MySQL ends equal to the events. A new layout starts where the one before had got to: nothing is
read again from the stream's start."""

from __future__ import annotations

from typing import Any

import pytest

from engine.domain.events import PositionClosed, PositionOpened
from tests.integration.harness import Pipeline, eventually_async

pytestmark = pytest.mark.integration
SYMBOLS = {"BTCUSDT": "45000", "ETHUSDT": "3000", "BNBUSDT": "600", "SOLUSDT": "150", "XRPUSDT": "0.6"}
SIZES = {"BTCUSDT": "0.001", "ETHUSDT": "0.01", "BNBUSDT": "0.05", "SOLUSDT": "0.1", "XRPUSDT": "10"}


async def trade(pipeline: Pipeline, tag: str) -> None:
    """A buy on every symbol by two strategies, then a move through each one's take-profit."""
    for symbol, price in SYMBOLS.items():
        await pipeline.tick(symbol, price)
    for n, symbol in enumerate(SYMBOLS):
        for strategy in ("s1", "s2"):
            await pipeline.decision(
                await pipeline.publish(
                    strategy,
                    symbol,
                    "buy",
                    quantity=SIZES[symbol],
                    confidence="0.9",
                    take_profit_pct="0.01",
                    signal_id=f"{tag}-{strategy}-{n}",
                )
            )
    for symbol, price in SYMBOLS.items():
        await pipeline.tick(symbol, str(float(price) * 1.02))


async def test_two_consumers_write_their_own_symbols_and_a_new_layout_starts_at_the_old_floor(
    make_pipeline: Any,
) -> None:
    async with make_pipeline() as first:
        await trade(first, "one")
        await first.mysql_caught_up()
        floor = await first.stored_event_count()
        assert first.client is not None
        js = first.client.jetstream()

        async def acked() -> bool:
            info = await js.consumer_info("EVENTS", "tradeengine-attribution")
            return bool(info.ack_floor and info.ack_floor.stream_seq == floor)

        await eventually_async(acked, what="the one consumer's acks")

    async with make_pipeline(ATTRIBUTION_PARTITIONS=2) as second:
        assert second.client is not None and second.attribution is not None
        js = second.client.jetstream()
        for k in (0, 1):
            info = await js.consumer_info("EVENTS", f"tradeengine-attribution-p{k}")
            assert info.config.opt_start_seq == floor + 1  # where the one consumer had got to
        await trade(second, "two")
        await second.wait_events(
            lambda events: sum(isinstance(e, PositionClosed) for e in events) == 20, "TPs"
        )
        await second.mysql_caught_up()
        total = await second.stored_event_count()
        consumers = second.attribution.consumers

        async def all_written() -> bool:
            return sum(c.persisted for c in consumers) == total - floor

        await eventually_async(all_written, what="each event of the new layout written once")
        shares = [c.persisted for c in consumers]
        assert all(shares), shares  # both wrote their share
        rows = await second.query(
            "SELECT strategy_id, total_positions, closed_positions, total_pnl FROM strategy_stats ORDER BY strategy_id"
        )
        opened = [e for e in second.events if isinstance(e, PositionOpened)]
        closed = [e for e in second.events if isinstance(e, PositionClosed)]
        assert [(r["strategy_id"], r["total_positions"], r["closed_positions"]) for r in rows] == [
            (s, sum(e.strategy_id == s for e in opened), sum(e.strategy_id == s for e in closed))
            for s in ("s1", "s2")
        ]
        for r in rows:  # realized PnL of every close, once, whichever consumer wrote it
            assert r["total_pnl"] == sum(e.realized_pnl for e in closed if e.strategy_id == r["strategy_id"])
