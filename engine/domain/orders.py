"""What the domain asks the exchange to do (intents) and what it reports back (fills)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
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
