"""Funding of perpetual futures, attributed to the strategies that held the position (issue #14).

Pure: a venue's funding payment on a symbol and the book as it stands come in; one
`position.funding` event per open slice comes out, the amounts adding up to the payment exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from engine.domain.book import PositionBook, StrategyPosition
from engine.domain.events import PositionFunding
from engine.domain.model import ZERO, PositionKey, PositionSide, derive_id
from engine.domain.pnl import split_pro_rata
from engine.domain.reconcile import EXTERNAL_STRATEGY

FUNDING_INTERVAL_HOURS = 8  # Binance USD-M perpetuals: 00:00, 08:00 and 16:00 UTC
UNATTRIBUTED = "funding-unattributed"


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


def split_funding(payment: VenueFunding, book: PositionBook, now: datetime) -> list[PositionFunding]:
    """The payment over the symbol's open slices: between the two sides by what each is expected
    to pay at the payment's rate (the residual spread by size; by notional when the rate is
    unknown), within a side pro rata to each slice's quantity. With nothing open, one event
    for the `external` strategy keeps the books whole."""
    keys = [
        PositionKey(payment.symbol, side)
        for side in (PositionSide.LONG, PositionSide.SHORT)
        if (payment.side is None or side is payment.side) and book.keyed(PositionKey(payment.symbol, side))
    ]
    if not keys:
        return [_event(payment, None, payment.side or PositionSide.LONG, payment.amount, now)]
    per_key = _between_sides(payment, book, keys)
    events: list[PositionFunding] = []
    for key, amount in zip(keys, per_key, strict=True):
        slices = list(book.keyed(key))
        for sp, share in zip(slices, split_pro_rata(amount, [sp.remaining for sp in slices]), strict=True):
            events.append(_event(payment, sp, key.side, share, now))
    return events


def _between_sides(payment: VenueFunding, book: PositionBook, keys: list[PositionKey]) -> list[Decimal]:
    if len(keys) == 1:
        return [payment.amount]
    quantities = [sum((sp.remaining for sp in book.keyed(key)), ZERO) for key in keys]
    mark = payment.mark_price or book.exchange[keys[0]].avg_entry_price
    if payment.rate is None or payment.rate == 0:
        return split_pro_rata(payment.amount, [q * mark for q in quantities])
    expected = [
        expected_funding(key.side, q, mark, payment.rate) for key, q in zip(keys, quantities, strict=True)
    ]
    residual = payment.amount - sum(expected, ZERO)
    spread = split_pro_rata(residual, [abs(e) for e in expected])
    return [e + r for e, r in zip(expected, spread, strict=True)]


def _event(
    payment: VenueFunding, sp: StrategyPosition | None, side: PositionSide, amount: Decimal, now: datetime
) -> PositionFunding:
    position_id = sp.id if sp is not None else UNATTRIBUTED
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
