"""Funding of perpetual futures, attributed to the strategies that held the position (issue #14).

Pure: a venue's funding payment on a symbol and the book as it stands come in; one
`position.funding` event per open slice comes out, the amounts adding up to the payment exactly.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from engine.domain.book import PositionBook
from engine.domain.events import PositionClosed, PositionFunding, PositionOpened
from engine.domain.model import ZERO, PositionKey, PositionSide, StrategyId, StrategyPositionId, derive_id
from engine.domain.pnl import split_pro_rata
from engine.domain.reconcile import EXTERNAL_STRATEGY

FUNDING_INTERVAL_HOURS = 8  # Binance USD-M perpetuals: 00:00, 08:00 and 16:00 UTC
UNATTRIBUTED = "funding-unattributed"


@dataclass(frozen=True, slots=True)
class SliceAt:
    """An open slice as it stood at a funding time."""

    strategy_position_id: StrategyPositionId
    strategy_id: StrategyId
    side: PositionSide
    remaining: Decimal
    exchange_position_id: str


class SliceHistory:
    """What the book looked like at a recent moment: funding is split over the slices open at
    its funding time, which the venue reports later (within a poll, or after a restart), when
    the book may have moved on. Keeps only the opens and closes of the last day and undoes
    them from the book as it stands; nothing for positions that did not change."""

    def __init__(self, keep: timedelta = timedelta(days=1)) -> None:
        self.keep = keep
        # symbol -> (time, +1 opened / -1 closed, slice id, strategy, side, quantity moved,
        # exchange position), oldest first
        self.changes: dict[str, deque[tuple[datetime, int, str, str, PositionSide, Decimal, str]]] = {}

    def record(self, event: PositionOpened | PositionClosed, now: datetime) -> None:
        if event.occurred_at < now - self.keep:
            return  # a replay of old history: no funding will be split over it any more
        # Plain tuples: this runs for every open and close (a frozen dataclass costs 3x).
        if isinstance(event, PositionOpened):
            moved, sign = event.quantity, 1
        else:
            moved, sign = event.closed_quantity, -1
        changes = self.changes.get(event.symbol)
        if changes is None:
            changes = self.changes[event.symbol] = deque()
        changes.append((event.occurred_at, sign, event.strategy_position_id, event.strategy_id, event.side,
                        moved, event.exchange_position.exchange_position_id))  # fmt: skip

    def open_at(self, book: PositionBook, symbol: str, when: datetime) -> list[SliceAt]:
        """The symbol's slices open at `when`: the book now, with later changes undone."""
        held = {
            sp.id: SliceAt(sp.id, sp.strategy_id, sp.side, sp.remaining, sp.exchange_position_id)
            for side in (PositionSide.LONG, PositionSide.SHORT)
            for sp in book.keyed(PositionKey(symbol, side))
        }
        for at, sign, position_id, strategy_id, side, moved, exchange_position_id in reversed(
            self.changes.get(symbol, ())
        ):
            if at <= when:
                break
            spid = StrategyPositionId(position_id)
            known = held.get(spid)
            remaining = (known.remaining if known else ZERO) - sign * moved
            if remaining > 0:
                held[spid] = SliceAt(spid, StrategyId(strategy_id), side, remaining, exchange_position_id)
            else:
                held.pop(spid, None)
        return list(held.values())

    def symbols(self, book: PositionBook) -> set[str]:
        """Symbols held now or changed within the last day."""
        return {key.symbol for key in book.exchange} | {s for s, changes in self.changes.items() if changes}

    def earliest(self, book: PositionBook, symbol: str) -> datetime | None:
        """Since when the symbol may have been paid funding that concerns the book."""
        times = [ep.opened_at for key, ep in book.exchange.items() if key.symbol == symbol and ep.opened_at]
        changes = self.changes.get(symbol)
        if changes:
            times.append(changes[0][0])
        return min(times, default=None)

    def prune(self, now: datetime) -> None:
        for changes in self.changes.values():
            while changes and changes[0][0] < now - self.keep:
                changes.popleft()


@dataclass(frozen=True, slots=True)
class VenueFunding:
    """One funding payment as the venue books it. `amount` is signed: positive = received."""

    ref: str  # the venue's id of the payment (Binance: the income's tranId): unique
    symbol: str
    amount: Decimal
    funding_time: datetime
    rate: Decimal | None = None
    mark_price: Decimal | None = None
    side: PositionSide | None = None  # where the venue says which position paid


def by_funding_time(payments: list[VenueFunding], known: set[str]) -> list[VenueFunding]:
    """The payments not yet booked, those of one symbol and funding time made one (a venue may
    list a hedge-mode account's LONG and SHORT payments as two rows without saying which is
    which); the refs of a merged payment are joined with '+'."""
    groups: dict[tuple[str, datetime, PositionSide | None], list[VenueFunding]] = {}
    for payment in payments:
        if payment.ref not in known:
            groups.setdefault((payment.symbol, payment.funding_time, payment.side), []).append(payment)
    merged = []
    for (symbol, at, side), group in sorted(groups.items(), key=lambda item: item[0][1]):
        first = group[0]
        merged.append(
            VenueFunding(
                "+".join(sorted(p.ref for p in group)),
                symbol,
                sum((p.amount for p in group), ZERO),
                at,
                first.rate,
                first.mark_price,
                side,
            )
        )
    return merged


def expected_funding(side: PositionSide, quantity: Decimal, mark_price: Decimal, rate: Decimal) -> Decimal:
    """What a position pays (negative) or receives at a funding rate: longs pay shorts when the
    rate is positive."""
    return -side.sign * rate * quantity * mark_price


def split_funding(payment: VenueFunding, slices: list[SliceAt], now: datetime) -> list[PositionFunding]:
    """The payment over the symbol's slices open at its funding time: between the two sides by
    what each is expected to pay at the payment's rate (the residual spread by size; by
    notional when the rate is unknown), within a side pro rata to each slice's quantity. With
    nothing open, one event for the `external` strategy keeps the books whole."""
    sides = [
        side
        for side in (PositionSide.LONG, PositionSide.SHORT)
        if (payment.side is None or side is payment.side) and any(s.side is side for s in slices)
    ]
    if not sides:
        return [_event(payment, None, payment.side or PositionSide.LONG, payment.amount, now)]
    per_side = _between_sides(payment, slices, sides)
    events: list[PositionFunding] = []
    for side, amount in zip(sides, per_side, strict=True):
        held = [s for s in slices if s.side is side]
        for sp, share in zip(held, split_pro_rata(amount, [s.remaining for s in held]), strict=True):
            events.append(_event(payment, sp, side, share, now))
    for event in events:
        event.parts = len(events)
    return events


def _between_sides(payment: VenueFunding, slices: list[SliceAt], sides: list[PositionSide]) -> list[Decimal]:
    if len(sides) == 1:
        return [payment.amount]
    quantities = [sum((s.remaining for s in slices if s.side is side), ZERO) for side in sides]
    if payment.rate is None or payment.rate == 0 or payment.mark_price is None:
        return split_pro_rata(payment.amount, quantities)
    mark = payment.mark_price
    expected = [
        expected_funding(side, q, mark, payment.rate) for side, q in zip(sides, quantities, strict=True)
    ]
    residual = payment.amount - sum(expected, ZERO)
    spread = split_pro_rata(residual, [abs(e) for e in expected])
    return [e + r for e, r in zip(expected, spread, strict=True)]


def _event(
    payment: VenueFunding, sp: SliceAt | None, side: PositionSide, amount: Decimal, now: datetime
) -> PositionFunding:
    position_id = sp.strategy_position_id if sp is not None else UNATTRIBUTED
    return PositionFunding(
        event_id=derive_id("position.funding", payment.ref, position_id),
        occurred_at=now,
        strategy_position_id=position_id,
        strategy_id=sp.strategy_id if sp is not None else EXTERNAL_STRATEGY,
        symbol=payment.symbol,
        side=side,
        amount=amount,
        rate=payment.rate,
        mark_price=payment.mark_price,
        funding_time=payment.funding_time,
        exchange_position_id=sp.exchange_position_id if sp is not None else None,
        venue_ref=payment.ref,
    )
