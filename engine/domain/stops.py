"""Protective stops at the venue (issue #14): TP/SL are virtual, enforced by the worker on
ticks, so while the worker is down nothing protects a position. For each exchange position the
worker keeps one reduce-side stop order at the venue: at the worst stop-loss of the key's open
slices (or `PROTECTIVE_STOP_PCT` beyond the average entry for slices without one), for the
key's whole quantity. Pure: what the stop should be, from the book."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

from engine.domain.book import PositionBook
from engine.domain.model import Market, PositionKey, PositionSide, decimal_text

STOP_CLIENT_ID_PREFIX = "ts"  # ours, and told apart from orders ("te")


@dataclass(frozen=True, slots=True)
class StopSpec:
    """The stop a key should have at the venue. The client id derives from the position and the
    stop's level and size: placing it again is recognised, and a moved stop has a new id."""

    client_id: str
    key: PositionKey
    trigger: Decimal
    quantity: Decimal


@dataclass(frozen=True, slots=True)
class VenueStop:
    """A stop order of ours as the venue lists it."""

    client_id: str
    venue_id: str
    key: PositionKey
    trigger: Decimal
    quantity: Decimal
    status: str  # open, triggered, canceled, expired, rejected
    fill_order_id: str | None = None  # the market order a triggered stop became


def stop_client_id(*parts: str) -> str:
    """Binance: [.A-Za-z0-9:/_-]{1,36}: 'ts' + 32 hex characters."""
    return STOP_CLIENT_ID_PREFIX + hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def protective_stop(
    book: PositionBook, key: PositionKey, market: Market, fallback_pct: Decimal | None
) -> StopSpec | None:
    """The stop `key` should have now, or None (flat, or no level to protect at)."""
    ep = book.exchange.get(key)
    slices = list(book.keyed(key))
    if ep is None or not slices or ep.quantity <= 0:
        return None
    levels = [sp.stop_loss for sp in slices if sp.stop_loss is not None]
    if fallback_pct is not None and any(sp.stop_loss is None for sp in slices):
        levels.append(ep.avg_entry_price * (1 - key.side.sign * fallback_pct))
    if not levels:
        return None
    worst = min(levels) if key.side is PositionSide.LONG else max(levels)
    # Rounded away from the position onto the price tick: never tighter than asked.
    rounding = ROUND_FLOOR if key.side is PositionSide.LONG else ROUND_CEILING
    trigger = (worst / market.price_tick).to_integral_value(rounding=rounding) * market.price_tick
    if trigger <= 0:
        return None
    quantity = ep.quantity
    client_id = stop_client_id(
        "protective-stop", str(key), ep.id, decimal_text(trigger), decimal_text(quantity)
    )
    return StopSpec(client_id, key, trigger.normalize(), quantity)
