"""Per-tick cost of TP/SL triggering with 100, 10,000 and 100,000 open positions on one symbol.

Target: the 100k book costs at most 2x the 100 book per tick (no scan of all positions)."""

from __future__ import annotations

import random
import time
from decimal import Decimal

from bench.common import machine, median
from engine.domain.book import PositionBook
from engine.domain.events import ContributionRef, ExchangePositionRef, PositionOpened
from engine.domain.model import PositionSide
from tests.helpers import NOW

TICKS = 20_000


def build_book(n: int, rng: random.Random) -> PositionBook:
    book = PositionBook()
    qty_total = Decimal(0)
    for i in range(n):
        side = PositionSide.LONG if i % 2 else PositionSide.SHORT
        entry = Decimal(3000)
        # levels 5..25% away, so the bench ticks (within +-2%) never fire them
        dist = Decimal(rng.randint(150, 750))
        tp, sl = (entry + dist, entry - dist) if side is PositionSide.LONG else (entry - dist, entry + dist)
        qty = Decimal("0.01")
        qty_total += qty
        book.apply(
            PositionOpened(
                event_id=f"e{i}", occurred_at=NOW, strategy_position_id=f"sp{i}", strategy_id=f"s{i % 8}",
                signal_id=f"sig{i}", symbol="ETHUSDT", side=side, quantity=qty, entry_price=entry,
                take_profit_price=tp, stop_loss_price=sl, fee=Decimal("0.015"), client_order_id="c",
                exchange_order_id="x", confidence=Decimal("0.8"),
                exchange_position=ExchangePositionRef(
                    exchange_position_id=f"ep-{side.value}", key=f"ETHUSDT_{side.value}",
                    quantity_before=qty_total - qty, quantity_after=qty_total, avg_entry_price=entry,
                ),
                contribution=ContributionRef(contribution_id=f"c{i}", sequence=i + 1),
            )
        )  # fmt: skip
    return book


def per_tick_ns(book: PositionBook, prices: list[Decimal]) -> float:
    fire = book.fire_triggers
    started = time.perf_counter_ns()
    for price in prices:
        fire("ETHUSDT", price)
    return (time.perf_counter_ns() - started) / len(prices)


def main() -> None:
    rng = random.Random(7)
    prices = [Decimal(3000 + rng.randint(-60, 60)) for _ in range(TICKS)]
    print(f"# TP/SL per-tick cost ({TICKS} ticks within +-2%, no level crossed) — {machine()}")
    results: dict[int, float] = {}
    for n in (100, 10_000, 100_000):
        book = build_book(n, rng)
        samples = [per_tick_ns(book, prices) for _ in range(5)]
        results[n] = median(samples)
        print(f"open positions {n:>7}: {results[n]:8.0f} ns/tick (median of 5)")
    print(f"ratio 100k / 100 = {results[100_000] / results[100]:.2f} (target <= 2.0)")

    book = build_book(100_000, rng)
    crossing = [Decimal(3000 + step) for step in range(150, 760, 10)]
    started = time.perf_counter_ns()
    fired = sum(len(book.fire_triggers("ETHUSDT", p)) for p in crossing)
    elapsed = time.perf_counter_ns() - started
    print(f"rising through all LONG TPs / SHORT SLs: {fired} fired in {elapsed / 1e6:.1f} ms "
          f"({elapsed / max(fired, 1):.0f} ns per fired position)")  # fmt: skip


if __name__ == "__main__":
    main()
