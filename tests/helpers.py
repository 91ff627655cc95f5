"""A synchronous-feeling driver of the domain core plus the paper venue, for unit tests.

It does what the worker does per signal (decide, execute each intent, settle the fill) with no
NATS and no clock: `now` is a field the test moves."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from engine.adapters.paper import PaperExchange
from engine.domain.book import PositionBook
from engine.domain.conflicts import ConflictPolicy
from engine.domain.decide import Accepted, Refused, Rules, closes_by_key, decide
from engine.domain.events import PositionClosed, PositionOpened
from engine.domain.model import PositionMode, SameDirectionPolicy
from engine.domain.signals import Signal, parse_signal

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def make_signal(strategy_id: str, symbol: str, action: str, **fields: Any) -> Signal:
    payload = {"strategy_id": strategy_id, "symbol": symbol, "action": action, **fields}
    parsed = parse_signal(f"signals.{strategy_id}.{symbol}", json.dumps(payload, default=str).encode())
    assert isinstance(parsed, Signal), parsed
    return parsed


@dataclass
class Harness:
    mode: PositionMode = PositionMode.HEDGE
    aware: bool = True
    same_direction: SameDirectionPolicy = SameDirectionPolicy.ACCUMULATE
    taker_fee: Decimal = Decimal("0.0005")
    min_confidence: Decimal = Decimal("0.6")
    max_accumulations: int = 10
    now: datetime = NOW
    book: PositionBook = field(default_factory=PositionBook)
    events: list[PositionOpened | PositionClosed] = field(default_factory=list)
    paper: PaperExchange = field(init=False)
    rules: Rules = field(init=False)
    prices: dict[str, Decimal] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.paper = PaperExchange(self.mode, self.taker_fee)
        self.rules = Rules(
            conflicts=ConflictPolicy(self.mode, self.aware, self.same_direction, self.max_accumulations),
            min_confidence=self.min_confidence,
        )

    async def signal(self, strategy_id: str, symbol: str, action: str, **fields: Any) -> Accepted | Refused:
        signal = make_signal(strategy_id, symbol, action, **fields)
        verdict = decide(
            signal, self.book, self.paper.market(symbol), self.prices.get(symbol), self.now, self.rules
        )
        if isinstance(verdict, Accepted):
            for intent in verdict.orders:
                fill = await self.paper.execute(intent)
                self.events.extend(self.book.settle(intent, fill, self.now))
        return verdict

    async def tick(self, symbol: str, price: str | Decimal) -> list[PositionClosed]:
        value = Decimal(price)
        self.prices[symbol] = value
        self.paper.on_price(symbol, value)
        closed: list[PositionClosed] = []
        fired = [(sp, sp.remaining, reason) for sp, reason in self.book.fire_triggers(symbol, value)]
        for intent in closes_by_key(fired, value, None) if fired else ():
            fill = await self.paper.execute(intent)
            for event in self.book.settle(intent, fill, self.now):
                assert isinstance(event, PositionClosed)
                closed.append(event)
        self.events.extend(closed)
        return closed

    def opened(self) -> list[PositionOpened]:
        return [e for e in self.events if isinstance(e, PositionOpened)]

    def closed(self) -> list[PositionClosed]:
        return [e for e in self.events if isinstance(e, PositionClosed)]
