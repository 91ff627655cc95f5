"""The order journal: write-ahead records of orders sent to real venues (DESIGN §4.3).

An order is journaled (`order.submitted`) before it is sent and closed by `order.settled`
after its fill's position events, or by `order.failed`. Folding the EVENTS stream through
`OrderJournal` tells a restarted worker which orders may be at the venue without their
outcome booked; it looks each up by client order id before anything is sent again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from engine.domain.events import (
    JournalLeg,
    OrderFailed,
    OrderSettled,
    OrderSubmitted,
    PendingDecision,
    PositionClosed,
    PositionOpened,
)
from engine.domain.model import (
    ZERO,
    ClientOrderId,
    OrderSide,
    SignalId,
    StrategyId,
    StrategyPositionId,
    derive_id,
)
from engine.domain.orders import CloseLeg, Fill, Leg, OpenLeg, OrderIntent
from engine.domain.tpsl import LevelSpec


def to_journal_leg(leg: Leg) -> JournalLeg:
    if isinstance(leg, CloseLeg):
        return JournalLeg(kind="close", position_id=leg.position_id, quantity=leg.quantity, reason=leg.reason)
    return JournalLeg(
        kind="open",
        position_id=leg.position_id,
        quantity=leg.quantity,
        strategy_id=leg.strategy_id,
        signal_id=leg.signal_id,
        side=leg.side,
        take_profit=leg.levels.take_profit,
        stop_loss=leg.levels.stop_loss,
        take_profit_pct=leg.levels.take_profit_pct,
        stop_loss_pct=leg.levels.stop_loss_pct,
        price_tick=leg.price_tick,
        confidence=leg.confidence,
        timeframe=leg.timeframe,
        metadata=leg.metadata,
    )


def from_journal_leg(leg: JournalLeg, symbol: str) -> Leg:
    pid = StrategyPositionId(leg.position_id)
    if leg.kind == "close":
        assert leg.reason is not None
        return CloseLeg(pid, leg.quantity, leg.reason)
    assert leg.side is not None and leg.strategy_id is not None and leg.signal_id is not None
    return OpenLeg(
        position_id=pid,
        strategy_id=StrategyId(leg.strategy_id),
        signal_id=SignalId(leg.signal_id),
        symbol=symbol,
        side=leg.side,
        quantity=leg.quantity,
        levels=LevelSpec(leg.take_profit, leg.stop_loss, leg.take_profit_pct, leg.stop_loss_pct),
        price_tick=leg.price_tick or Decimal("0.00000001"),
        confidence=leg.confidence if leg.confidence is not None else ZERO,
        timeframe=leg.timeframe,
        metadata=leg.metadata,
    )


def intent_of(e: OrderSubmitted) -> OrderIntent:
    return OrderIntent(
        client_order_id=ClientOrderId(e.client_order_id),
        symbol=e.symbol,
        side=OrderSide(e.side),
        quantity=e.quantity,
        position_side=e.position_side,
        reduce_only=e.reduce_only,
        legs=tuple(from_journal_leg(leg, e.symbol) for leg in e.legs),
        reference_price=e.reference_price,
        signal_id=SignalId(e.signal_id) if e.signal_id else None,
    )


@dataclass(slots=True)
class OrderJournal:
    pending: dict[ClientOrderId, OrderSubmitted] = field(default_factory=dict)
    # Legs of pending orders whose position events are already stored (a crash can fall
    # between the events of one fill): their quantities and fee shares, by position id.
    booked: dict[ClientOrderId, dict[str, tuple[Decimal, Decimal]]] = field(default_factory=dict)
    # Slices a pending order closes: nothing else may close them until its outcome is known.
    closing: dict[str, ClientOrderId] = field(default_factory=dict)

    def submit(
        self, intent: OrderIntent, at: datetime, decision: PendingDecision | None = None
    ) -> OrderSubmitted:
        event = OrderSubmitted(
            # Its own id per submission (an id never filled may be sent again later); it is
            # stored before the order is sent, so no replay has to derive it again.
            event_id=derive_id("order.submitted", intent.client_order_id, at.isoformat()),
            occurred_at=at,
            client_order_id=intent.client_order_id,
            symbol=intent.symbol,
            side=intent.side.value,
            quantity=intent.quantity,
            position_side=intent.position_side,
            reduce_only=intent.reduce_only,
            reference_price=intent.reference_price,
            signal_id=intent.signal_id,
            legs=[to_journal_leg(leg) for leg in intent.legs],
            decision=decision,
        )
        self.apply(event)
        return event

    def settled(self, intent: OrderIntent, fill: Fill, at: datetime) -> OrderSettled:
        event = OrderSettled(
            event_id=derive_id("order.settled", intent.client_order_id),
            occurred_at=at,
            client_order_id=intent.client_order_id,
            symbol=intent.symbol,
            exchange_order_id=fill.exchange_order_id,
            filled_quantity=fill.quantity,
            average_price=fill.average_price,
            fee=fill.fee,
        )
        self.apply(event)
        return event

    def failed(self, intent: OrderIntent, reason_code: str, reason: str, at: datetime) -> OrderFailed:
        submitted = self.pending.get(intent.client_order_id)
        event = OrderFailed(
            event_id=derive_id("order.failed", submitted.event_id if submitted else intent.client_order_id),
            occurred_at=at,
            client_order_id=intent.client_order_id,
            symbol=intent.symbol,
            reason_code=reason_code,
            reason=reason[:500],
        )
        self.apply(event)
        return event

    def apply(
        self, event: OrderSubmitted | OrderSettled | OrderFailed | PositionOpened | PositionClosed
    ) -> None:
        cid = ClientOrderId(event.client_order_id)
        match event:
            case OrderSubmitted():
                self.pending[cid] = event
                self.booked.pop(cid, None)
                for leg in event.legs:
                    if leg.kind == "close":
                        self.closing[leg.position_id] = cid
            case OrderSettled():
                self._resolved(cid)
            case OrderFailed():
                self._resolved(cid)
            case PositionOpened():
                if cid in self.pending:
                    self.booked.setdefault(cid, {})[event.strategy_position_id] = (event.quantity, event.fee)
            case PositionClosed():
                if cid in self.pending:
                    self.booked.setdefault(cid, {})[event.strategy_position_id] = (
                        event.closed_quantity,
                        event.exit_fee,
                    )

    def _resolved(self, cid: ClientOrderId) -> None:
        done = self.pending.pop(cid, None)
        self.booked.pop(cid, None)
        for leg in done.legs if done else ():
            if self.closing.get(leg.position_id) == cid:
                del self.closing[leg.position_id]

    def awaiting(self, strategy_id: str, signal_id: str) -> bool:
        """Is this signal's decision held back by one of its orders with an unknown outcome?"""
        return any(
            p.decision is not None
            and p.decision.signal_id == signal_id
            and p.decision.strategy_id == strategy_id
            for p in self.pending.values()
        )

    def pending_on(self, symbol: str) -> list[OrderSubmitted]:
        return [p for p in self.pending.values() if p.symbol == symbol] if self.pending else []

    def unbooked_part(self, intent: OrderIntent, fill: Fill) -> tuple[OrderIntent, Fill] | None:
        """The legs of `intent` whose events are not stored yet, and the matching rest of the
        fill; None when every leg is booked."""
        done = self.booked.get(intent.client_order_id, {})
        if not done:
            return intent, fill
        legs = tuple(leg for leg in intent.legs if leg.position_id not in done)
        booked = sum((qty for qty, _ in done.values()), ZERO)
        rest = fill.quantity - booked
        if not legs or rest <= 0:
            return None
        # The rest of the fee, not a share of it recomputed: with the shares already stored it
        # adds up to the fee paid, to the last digit.
        fee = fill.fee - sum((fee for _, fee in done.values()), ZERO)
        return (
            OrderIntent(
                client_order_id=intent.client_order_id,
                symbol=intent.symbol,
                side=intent.side,
                quantity=intent.quantity - booked,
                position_side=intent.position_side,
                reduce_only=intent.reduce_only,
                legs=legs,
                reference_price=intent.reference_price,
                signal_id=intent.signal_id,
            ),
            Fill(fill.client_order_id, fill.exchange_order_id, rest, fill.average_price, fee),
        )
