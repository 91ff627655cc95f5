"""What the domain asks the exchange to do (intents) and what it reports back (fills)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from typing import Any

from engine.domain.model import (
    ClientOrderId,
    CloseReason,
    OrderSide,
    PositionSide,
    SignalId,
    StrategyId,
    StrategyPositionId,
)
from engine.domain.tpsl import LevelSpec


@dataclass(frozen=True, slots=True)
class OpenLeg:
    """Opens a strategy position with the filled quantity of this leg."""

    position_id: StrategyPositionId
    strategy_id: StrategyId
    signal_id: SignalId
    symbol: str
    side: PositionSide
    quantity: Decimal
    levels: LevelSpec
    price_tick: Decimal
    confidence: Decimal
    timeframe: str | None = None
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class CloseLeg:
    """Closes `quantity` of one strategy position's slice."""

    position_id: StrategyPositionId
    quantity: Decimal
    reason: CloseReason


Leg = OpenLeg | CloseLeg


@dataclass(frozen=True, slots=True)
class OrderIntent:
    """One market order. In hedge mode `position_side` names the leg at the venue; in one-way
    mode it is None and a reversal nets its closes and its open into this one order."""

    client_order_id: ClientOrderId
    symbol: str
    side: OrderSide
    quantity: Decimal
    position_side: PositionSide | None
    reduce_only: bool
    legs: tuple[Leg, ...]
    reference_price: Decimal
    signal_id: SignalId | None = None


@dataclass(frozen=True, slots=True)
class Fill:
    client_order_id: ClientOrderId
    exchange_order_id: str
    quantity: Decimal
    average_price: Decimal
    fee: Decimal


# --- one order above the venue's size limit, sent as parts -----------------------------------
MAX_ORDER_PARTS = 36  # a part's client id is the order's plus ".0" to ".z": 36 characters at most
_PART_MARKS = "0123456789abcdefghijklmnopqrstuvwxyz"


def order_parts(quantity: Decimal, max_quantity: Decimal | None, step: Decimal) -> list[Decimal]:
    """`quantity` in as few parts as the venue's per-order maximum allows, as even as the step
    lets them be (largest first), so no part falls below the venue's minimum."""
    if max_quantity is None or quantity <= max_quantity:
        return [quantity]
    count = int((quantity / max_quantity).to_integral_value(rounding=ROUND_CEILING))
    steps = int(quantity / step)
    base, extra = divmod(steps, count)
    return [(base + (1 if i < extra else 0)) * step for i in range(count)]


def part_client_id(client_order_id: ClientOrderId, index: int) -> ClientOrderId:
    return ClientOrderId(f"{client_order_id}.{_PART_MARKS[index]}")


def is_part(client_order_id: str) -> bool:
    return len(client_order_id) >= 2 and client_order_id[-2] == "."


def combined_fill(client_order_id: ClientOrderId, fills: list[Fill]) -> Fill:
    """The parts' fills as the one order's: quantities and fees added, the price averaged by
    quantity, the venue's order ids joined by commas (as reconciliation reads them)."""
    quantity = sum((f.quantity for f in fills), Decimal(0))
    return Fill(
        client_order_id=client_order_id,
        exchange_order_id=",".join(f.exchange_order_id for f in fills),
        quantity=quantity,
        average_price=sum((f.quantity * f.average_price for f in fills), Decimal(0)) / quantity,
        fee=sum((f.fee for f in fills), Decimal(0)),
    )
