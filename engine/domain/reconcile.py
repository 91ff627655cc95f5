"""Reconciliation (DESIGN §4.2): what the venue holds against what the book says it holds.

A reduction we did not order is attributed to the key's open strategy positions by the
configured rule (reason `manual`), a liquidation closes them all (`liquidation`), and an
increase we did not order becomes a position of strategy `external`. The result is a list
of (intent, fill) pairs the book settles like any other fill, so attribution stays exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from engine.domain.book import PositionBook
from engine.domain.decide import close_intent
from engine.domain.model import (
    ZERO,
    CloseReason,
    Market,
    OrderSide,
    PositionKey,
    PositionSide,
    SignalId,
    StrategyId,
    StrategyPositionId,
    derive_client_order_id,
    derive_id,
)
from engine.domain.orders import Fill, OpenLeg, OrderIntent
from engine.domain.pnl import PRICE_DISPLAY_QUANTUM, split_pro_rata
from engine.domain.tpsl import LevelSpec

EXTERNAL_STRATEGY = StrategyId("external")
OUR_CLIENT_ID_PREFIX = "te"


class ExternalCloseAttribution(StrEnum):
    PRO_RATA = "pro_rata"
    FIFO = "fifo"
    LIFO = "lifo"


class FindingKind(StrEnum):
    MANUAL_REDUCTION = "manual_reduction"
    LIQUIDATION = "liquidation"
    PROTECTIVE_STOP = "protective_stop"
    EXTERNAL_INCREASE = "external_increase"


@dataclass(frozen=True, slots=True)
class VenuePosition:
    key: PositionKey
    quantity: Decimal  # > 0
    entry_price: Decimal


@dataclass(frozen=True, slots=True)
class VenueOrder:
    """A filled order as the venue lists it; ours carry our client order id prefix."""

    client_order_id: str
    exchange_order_id: str
    symbol: str
    side: OrderSide
    position_side: PositionSide | None  # None on one-way venues
    quantity: Decimal
    average_price: Decimal
    fee: Decimal
    liquidation: bool
    at: datetime
    protective_stop: bool = False  # the market order one of our stops at the venue became

    @property
    def ours(self) -> bool:
        return self.client_order_id.startswith(OUR_CLIENT_ID_PREFIX)

    def moves(self, key: PositionKey, reducing: bool) -> bool:
        """Does this order reduce (or increase) `key`?"""
        if self.symbol != key.symbol or (self.position_side not in (None, key.side)):
            return False
        closing = self.side is OrderSide.closing(key.side)
        return closing if reducing else not closing


@dataclass(frozen=True, slots=True)
class Finding:
    kind: FindingKind
    key: PositionKey
    book_quantity: Decimal
    venue_quantity: Decimal
    settlements: tuple[tuple[OrderIntent, Fill], ...]
    venue_order_ids: tuple[str, ...] = ()  # the venue's orders this finding accounts for


def reconcile(
    book: PositionBook,
    symbol: str,
    venue: Mapping[PositionKey, VenuePosition],
    external: Sequence[VenueOrder],
    market: Market,
    rule: ExternalCloseAttribution,
    fallback_price: Decimal | None,
) -> list[Finding]:
    """What to book so that `book` holds on `symbol` exactly what `venue` holds."""
    findings = []
    for side in (PositionSide.LONG, PositionSide.SHORT):
        key = PositionKey(symbol, side)
        held = book.exchange[key].quantity if key in book.exchange else ZERO
        at_venue = venue[key].quantity if key in venue else ZERO
        if held > at_venue:
            findings.append(_reduction(book, key, held, at_venue, external, market, rule, fallback_price))
        elif at_venue > held:
            findings.append(_increase(book, key, held, venue[key], external, market, fallback_price))
    return findings


def _reduction(
    book: PositionBook,
    key: PositionKey,
    held: Decimal,
    at_venue: Decimal,
    external: Sequence[VenueOrder],
    market: Market,
    rule: ExternalCloseAttribution,
    fallback_price: Decimal | None,
) -> Finding:
    orders = [o for o in external if not o.ours and o.moves(key, reducing=True)]
    liquidated = at_venue == 0 and any(o.liquidation for o in orders)
    stopped = not liquidated and any(o.protective_stop for o in orders)
    reason = (
        CloseReason.LIQUIDATION if liquidated else CloseReason.STOP_LOSS if stopped else CloseReason.MANUAL
    )
    price, fee, order_id = _priced(
        orders, held - at_venue, fallback_price or book.exchange[key].avg_entry_price
    )
    open_positions = book.open_on(key)
    shares = allocate(held - at_venue, [sp.remaining for sp in open_positions], rule, market.quantity_step)
    intents = [
        close_intent(sp, qty, reason, price, None)
        for sp, qty in zip(open_positions, shares, strict=True)
        if qty > 0
    ]
    fees = split_pro_rata(fee, [i.quantity for i in intents])
    settlements = tuple(
        (intent, Fill(intent.client_order_id, order_id, intent.quantity, price, f))
        for intent, f in zip(intents, fees, strict=True)
    )
    kind = (
        FindingKind.LIQUIDATION
        if liquidated
        else FindingKind.PROTECTIVE_STOP
        if stopped
        else FindingKind.MANUAL_REDUCTION
    )
    return Finding(kind, key, held, at_venue, settlements, tuple(o.exchange_order_id for o in orders))


def _increase(
    book: PositionBook,
    key: PositionKey,
    held: Decimal,
    venue: VenuePosition,
    external: Sequence[VenueOrder],
    market: Market,
    fallback_price: Decimal | None,
) -> Finding:
    delta = venue.quantity - held
    orders = [o for o in external if not o.ours and o.moves(key, reducing=False)]
    # Without the venue's orders, the entry price that makes our cost add up to the venue's.
    implied = ((venue.entry_price * venue.quantity - book.key_cost(key)) / delta).quantize(
        PRICE_DISPLAY_QUANTUM
    )
    fallback = implied if implied > 0 else (fallback_price or venue.entry_price)
    price, fee, order_id = _priced(orders, delta, fallback)
    ep = book.exchange.get(key)
    sequence = (ep.contributions if ep else 0) + 1
    position_id = StrategyPositionId(derive_id("external", str(key), str(sequence), order_id, str(delta)))
    leg = OpenLeg(
        position_id=position_id,
        strategy_id=EXTERNAL_STRATEGY,
        signal_id=SignalId(f"reconcile-{position_id}"),
        symbol=key.symbol,
        side=key.side,
        quantity=delta,
        levels=LevelSpec(),
        price_tick=market.price_tick,
        confidence=ZERO,
    )
    intent = OrderIntent(
        client_order_id=derive_client_order_id("external", position_id),
        symbol=key.symbol,
        side=OrderSide.opening(key.side),
        quantity=delta,
        position_side=key.side,
        reduce_only=False,
        legs=(leg,),
        reference_price=price,
    )
    fill = Fill(intent.client_order_id, order_id, delta, price, fee)
    return Finding(
        FindingKind.EXTERNAL_INCREASE,
        key,
        held,
        venue.quantity,
        ((intent, fill),),
        tuple(o.exchange_order_id for o in orders),
    )


def _priced(
    orders: Sequence[VenueOrder], quantity: Decimal, fallback: Decimal
) -> tuple[Decimal, Decimal, str]:
    """(volume-weighted price, fee share of `quantity`, order ids) of the venue's orders."""
    total = sum((o.quantity for o in orders), ZERO)
    if total <= 0:
        return fallback, ZERO, "reconciliation"
    # Not rounded: the closes booked at this price must add up to what the venue paid out.
    price = sum((o.average_price * o.quantity for o in orders), ZERO) / total
    fee = sum((o.fee for o in orders), ZERO) * min(quantity, total) / total
    ids = ",".join(o.exchange_order_id for o in orders)[:64]
    return price, fee, ids


def allocate(
    quantity: Decimal, remaining: Sequence[Decimal], rule: ExternalCloseAttribution, step: Decimal
) -> list[Decimal]:
    """Split `quantity` over slices (in opening order) without exceeding any; sums exactly
    to min(quantity, sum(remaining)). Pro rata shares are whole multiples of the market's
    quantity step, the rounding remainder going to the oldest slices."""
    quantity = min(quantity, sum(remaining, ZERO))
    if rule is ExternalCloseAttribution.PRO_RATA:
        total = sum(remaining, ZERO)
        if total <= 0:
            return [ZERO for _ in remaining]
        unit = step
        shares = [(quantity * r / total // unit) * unit for r in remaining]
        left = quantity - sum(shares, ZERO)
        for i, r in enumerate(remaining):  # the rounding remainder goes to the oldest first
            take = min(left, r - shares[i])
            shares[i] += take
            left -= take
        return shares
    order = (
        range(len(remaining)) if rule is ExternalCloseAttribution.FIFO else reversed(range(len(remaining)))
    )
    shares = [ZERO] * len(remaining)
    left = quantity
    for i in order:
        shares[i] = min(left, remaining[i])
        left -= shares[i]
    return shares
