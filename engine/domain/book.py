"""The position book (DESIGN §4.2): exchange positions, strategy positions, contributions.

Live trading and crash recovery go through the same door: `settle` builds events from a fill
and hands each to `apply`; recovery replays the stored events through `apply` alone.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from engine.domain.events import (
    ContributionRef,
    ExchangePositionRef,
    PositionClosed,
    PositionOpened,
)
from engine.domain.model import (
    ZERO,
    CloseReason,
    ExchangePositionId,
    PositionKey,
    PositionSide,
    StrategyId,
    StrategyPositionId,
    derive_id,
    intern_decimal,
)
from engine.domain.orders import CloseLeg, Fill, OpenLeg, OrderIntent
from engine.domain.pnl import average_price, fee_share, gross_pnl, split_pro_rata
from engine.domain.tpsl import TriggerIndex


@dataclass(slots=True)
class StrategyPosition:
    """One strategy's virtual slice of an exchange position; owns its own PnL math."""

    id: StrategyPositionId
    strategy_id: StrategyId
    symbol: str
    side: PositionSide
    entry_price: Decimal
    quantity: Decimal
    remaining: Decimal
    take_profit: Decimal | None
    stop_loss: Decimal | None
    entry_fee: Decimal
    entry_fee_left: Decimal
    confidence: Decimal
    exchange_position_id: ExchangePositionId
    opened_at: datetime
    closes: int = 0
    realized_pnl: Decimal = ZERO

    @property
    def key(self) -> PositionKey:
        return PositionKey(self.symbol, self.side)

    def price_close(self, quantity: Decimal, exit_price: Decimal) -> tuple[Decimal, Decimal]:
        """(gross PnL, entry-fee share) of closing `quantity` at `exit_price`."""
        share = (
            self.entry_fee_left
            if quantity >= self.remaining
            else fee_share(self.entry_fee, quantity, self.quantity)
        )
        return gross_pnl(self.side, self.entry_price, exit_price, quantity), share


@dataclass(slots=True)
class ExchangePosition:
    """The venue's aggregated position on a key: the sum of its open strategy slices."""

    id: ExchangePositionId
    key: PositionKey
    quantity: Decimal = ZERO
    cost: Decimal = ZERO  # sum of entry_price * remaining over its open slices
    contributions: int = 0
    opened_at: datetime | None = None

    @property
    def avg_entry_price(self) -> Decimal:
        return average_price(self.cost, self.quantity)

    def ref(self, before: Decimal) -> ExchangePositionRef:
        return ExchangePositionRef(
            exchange_position_id=self.id,
            key=str(self.key),
            quantity_before=before,
            quantity_after=self.quantity,
            avg_entry_price=self.avg_entry_price,
        )


@dataclass(slots=True)
class PositionBook:
    positions: dict[StrategyPositionId, StrategyPosition] = field(default_factory=dict)
    exchange: dict[PositionKey, ExchangePosition] = field(default_factory=dict)
    # Insertion-ordered: iteration is FIFO by opening time.
    by_key: dict[PositionKey, dict[StrategyPositionId, StrategyPosition]] = field(default_factory=dict)
    triggers: TriggerIndex = field(default_factory=TriggerIndex)
    # Per strategy, for its risk limits: open notional at entry prices, and open slices.
    strategy_cost: dict[str, Decimal] = field(default_factory=dict)
    strategy_open: dict[str, int] = field(default_factory=dict)

    # --- queries -------------------------------------------------------------------------
    def keyed(self, key: PositionKey) -> Collection[StrategyPosition]:
        """The key's open slices without copying them (conflict rules mostly need the count)."""
        keyed = self.by_key.get(key)
        return keyed.values() if keyed else ()

    def open_on(self, key: PositionKey) -> list[StrategyPosition]:
        keyed = self.by_key.get(key)
        return list(keyed.values()) if keyed else []

    def open_of(self, strategy_id: str, symbol: str, side: PositionSide | None) -> list[StrategyPosition]:
        sides = (side,) if side else (PositionSide.LONG, PositionSide.SHORT)
        return [
            sp for s in sides for sp in self.open_on(PositionKey(symbol, s)) if sp.strategy_id == strategy_id
        ]

    def key_cost(self, key: PositionKey) -> Decimal:
        ep = self.exchange.get(key)
        return ep.cost if ep else ZERO

    def total_cost(self) -> Decimal:
        return sum((ep.cost for ep in self.exchange.values()), ZERO)

    # --- live path -----------------------------------------------------------------------
    def settle(self, intent: OrderIntent, fill: Fill, at: datetime) -> list[PositionOpened | PositionClosed]:
        """Turn a fill into events leg by leg (closes first, as ordered) and apply each."""
        remaining = fill.quantity
        allocations: list[tuple[OpenLeg | CloseLeg, Decimal]] = []
        for leg in intent.legs:
            take = min(leg.quantity, remaining)
            if take > 0:
                allocations.append((leg, take))
                remaining -= take
        fees = split_pro_rata(fill.fee, [qty for _, qty in allocations])
        events: list[PositionOpened | PositionClosed] = []
        for (leg, qty), fee in zip(allocations, fees, strict=True):
            event: PositionOpened | PositionClosed
            if isinstance(leg, CloseLeg) and leg.position_id not in self.positions:
                # Closed since by other means: its share of the fill (and fee) is nobody
                # else's; reconciliation sees the venue's side of it.
                continue
            if isinstance(leg, OpenLeg):
                event = self._opened(leg, qty, fill, fee, intent, at)
            else:
                event = self._closed(leg, qty, fill, fee, intent, at)
            self.apply(event, trusted=True)
            events.append(event)
        return events

    def _opened(
        self,
        leg: OpenLeg,
        qty: Decimal,
        fill: Fill,
        fee: Decimal,
        intent: OrderIntent,
        at: datetime,
    ) -> PositionOpened:
        key = PositionKey(leg.symbol, leg.side)
        ep = self.exchange.get(key)
        before = ep.quantity if ep else ZERO
        cost_after = (ep.cost if ep else ZERO) + fill.average_price * qty
        sequence = (ep.contributions if ep else 0) + 1
        ep_id = ep.id if ep else ExchangePositionId(derive_id("exchange-position", str(key), leg.position_id))
        take_profit, stop_loss = leg.levels.resolve(leg.side, fill.average_price, leg.price_tick)
        return PositionOpened(
            event_id=derive_id("position.opened", leg.position_id),
            occurred_at=at,
            strategy_position_id=leg.position_id,
            strategy_id=leg.strategy_id,
            signal_id=leg.signal_id,
            symbol=leg.symbol,
            side=leg.side,
            quantity=qty,
            entry_price=fill.average_price,
            take_profit_price=take_profit,
            stop_loss_price=stop_loss,
            fee=fee,
            client_order_id=intent.client_order_id,
            exchange_order_id=fill.exchange_order_id,
            confidence=leg.confidence,
            exchange_position=ExchangePositionRef(
                exchange_position_id=ep_id,
                key=str(key),
                quantity_before=before,
                quantity_after=before + qty,
                avg_entry_price=average_price(cost_after, before + qty),
            ),
            contribution=ContributionRef(
                contribution_id=derive_id("contribution", leg.position_id), sequence=sequence
            ),
            timeframe=leg.timeframe,
            metadata=leg.metadata,
        )

    def _closed(
        self,
        leg: CloseLeg,
        qty: Decimal,
        fill: Fill,
        exit_fee: Decimal,
        intent: OrderIntent,
        at: datetime,
    ) -> PositionClosed:
        sp = self.positions[leg.position_id]
        qty = min(qty, sp.remaining)
        gross, entry_share = sp.price_close(qty, fill.average_price)
        ep = self.exchange[sp.key]
        after = ep.quantity - qty
        cost_after = ep.cost - sp.entry_price * qty
        return PositionClosed(
            event_id=self.next_close_event_id(sp),
            occurred_at=at,
            strategy_position_id=sp.id,
            strategy_id=sp.strategy_id,
            symbol=sp.symbol,
            side=sp.side,
            closed_quantity=qty,
            remaining_quantity=sp.remaining - qty,
            entry_price=sp.entry_price,
            exit_price=fill.average_price,
            gross_pnl=gross,
            entry_fee_share=entry_share,
            exit_fee=exit_fee,
            fee=entry_share + exit_fee,
            realized_pnl=gross - entry_share - exit_fee,
            close_reason=leg.reason,
            client_order_id=intent.client_order_id,
            exchange_order_id=fill.exchange_order_id,
            exchange_position=ExchangePositionRef(
                exchange_position_id=ep.id,
                key=str(ep.key),
                quantity_before=ep.quantity,
                quantity_after=after,
                avg_entry_price=average_price(cost_after, after),
            ),
            signal_id=intent.signal_id,
        )

    @staticmethod
    def next_close_event_id(sp: StrategyPosition) -> str:
        """Close events are numbered per slice, so replays and retries derive the same id."""
        return derive_id("position.closed", sp.id, str(sp.closes + 1))

    # --- the one place state changes -----------------------------------------------------
    def apply(self, event: PositionOpened | PositionClosed, trusted: bool = False) -> None:
        """`trusted` events were just built by `settle` from this very state, so the
        duplicate check (needed for replays) can be skipped."""
        if isinstance(event, PositionOpened):
            self._apply_opened(event)
        else:
            self._apply_closed(event, trusted)

    def replay(self, events: Iterable[PositionOpened | PositionClosed]) -> None:
        for event in events:
            self.apply(event)

    def _apply_opened(self, e: PositionOpened) -> None:
        pid = StrategyPositionId(e.strategy_position_id)
        if pid in self.positions:
            return
        key = PositionKey(sys.intern(e.symbol), e.side)
        ep = self.exchange.get(key)
        if ep is None:
            ep = ExchangePosition(
                id=ExchangePositionId(e.exchange_position.exchange_position_id),
                key=key,
                opened_at=e.occurred_at,
            )
            self.exchange[key] = ep
        ep.quantity += e.quantity
        ep.cost += e.entry_price * e.quantity
        ep.contributions = e.contribution.sequence
        quantity = intern_decimal(e.quantity)
        take_profit = None if e.take_profit_price is None else intern_decimal(e.take_profit_price)
        stop_loss = None if e.stop_loss_price is None else intern_decimal(e.stop_loss_price)
        sp = self.positions[pid] = StrategyPosition(
            id=pid,
            # Interned: 100k positions share a handful of strategy and symbol strings.
            strategy_id=StrategyId(sys.intern(e.strategy_id)),
            symbol=ep.key.symbol,
            side=e.side,
            entry_price=intern_decimal(e.entry_price),
            quantity=quantity,
            remaining=quantity,
            take_profit=take_profit,
            stop_loss=stop_loss,
            entry_fee=e.fee,
            entry_fee_left=e.fee,
            confidence=intern_decimal(e.confidence),
            exchange_position_id=ep.id,
            opened_at=e.occurred_at,
        )
        self.by_key.setdefault(key, {})[pid] = sp
        self.strategy_cost[sp.strategy_id] = self.strategy_cost.get(sp.strategy_id, ZERO) + (
            sp.entry_price * quantity
        )
        self.strategy_open[sp.strategy_id] = self.strategy_open.get(sp.strategy_id, 0) + 1
        self.triggers.arm(key.symbol, e.side, pid, take_profit, stop_loss)

    def _apply_closed(self, e: PositionClosed, trusted: bool = False) -> None:
        pid = StrategyPositionId(e.strategy_position_id)
        sp = self.positions.get(pid)
        if sp is None or (not trusted and e.event_id != self.next_close_event_id(sp)):
            return  # a duplicate delivery of a close already applied
        sp.remaining -= e.closed_quantity
        sp.entry_fee_left -= e.entry_fee_share
        sp.realized_pnl += e.realized_pnl
        sp.closes += 1
        ep = self.exchange[sp.key]
        ep.quantity -= e.closed_quantity
        ep.cost -= sp.entry_price * e.closed_quantity
        self.strategy_cost[sp.strategy_id] -= sp.entry_price * e.closed_quantity
        if sp.remaining <= 0:
            self.strategy_open[sp.strategy_id] -= 1
            del self.positions[pid]
            keyed = self.by_key[sp.key]
            del keyed[pid]
            if not keyed:
                del self.by_key[sp.key]
            self.triggers.disarm(pid)
        if ep.quantity <= 0:
            del self.exchange[sp.key]

    def rearm(self, sp: StrategyPosition) -> None:
        """Put a fired position's levels back, e.g. when its close order was refused."""
        self.triggers.arm(sp.symbol, sp.side, sp.id, sp.take_profit, sp.stop_loss)

    def fire_triggers(self, symbol: str, price: Decimal) -> list[tuple[StrategyPosition, CloseReason]]:
        return [(self.positions[pid], reason) for pid, reason in self.triggers.fire(symbol, price)]
