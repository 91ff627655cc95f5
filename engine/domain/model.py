"""Value types shared by the whole domain: sides, keys, identifiers and market rules."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal
from enum import StrEnum
from typing import Any, NamedTuple, NewType

StrategyId = NewType("StrategyId", str)
SignalId = NewType("SignalId", str)
StrategyPositionId = NewType("StrategyPositionId", str)
ExchangePositionId = NewType("ExchangePositionId", str)
ContributionId = NewType("ContributionId", str)
ClientOrderId = NewType("ClientOrderId", str)
EventId = NewType("EventId", str)

# Every identifier we derive is a UUIDv5 under this namespace, so a replay after a crash
# derives the very same ids and JetStream / MySQL deduplicate them.
ID_NAMESPACE = uuid.UUID("6f1c7a52-3d0b-4c55-9a44-1f8e2b7d9c10")

ZERO = Decimal(0)


_NAMESPACE_BYTES = ID_NAMESPACE.bytes
# The RFC 4122 variant puts 10 in the top bits of the 17th hex digit: 0-f -> 8, 9, a, b.
_VARIANT_DIGIT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def derive_id(*parts: str) -> str:
    """uuid.uuid5(ID_NAMESPACE, "\x1f".join(parts)) as a string, without building UUID objects
    (this runs several times per signal on the hot path)."""
    h = hashlib.sha1(_NAMESPACE_BYTES + "\x1f".join(parts).encode(), usedforsecurity=False).hexdigest()
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT_DIGIT[h[16]]}{h[17:20]}-{h[20:32]}"


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


# One decoder for every payload: `json.loads(..., parse_float=...)` builds a new one per call.
_EXACT_JSON = json.JSONDecoder(parse_float=Decimal, parse_constant=_no_constants)


def load_json_exact(data: bytes) -> Any:
    """JSON (UTF-8) with every fraction as an exact Decimal; NaN and Infinity are refused.
    Raises ValueError (UnicodeDecodeError included) for anything else."""
    return _EXACT_JSON.decode(data.decode())


def decimal_text(value: Decimal) -> str:
    """The decimal in fixed-point notation, as the wire and MySQL want it: `str()` is twice as
    fast as `format()`, but writes "1E-8" (or "1e-8", as the context has it) for some values."""
    text = str(value)
    return text if "E" not in text and "e" not in text else format(value, "f")


def json_default(value: object) -> str:
    """orjson's `default` for what it cannot write itself: decimals, as `decimal_text`."""
    if isinstance(value, Decimal):
        return decimal_text(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


_DECIMALS: dict[Decimal, Decimal] = {}
_DECIMAL_CACHE_LIMIT = 1 << 16


def amount(value: Decimal) -> str:
    """A decimal as people read it in a reason: 50, not 5E+1; 0.1, not 0.10000."""
    text = decimal_text(value)
    return text.rstrip("0").rstrip(".") if "." in text else text


def intern_decimal(value: Decimal) -> Decimal:
    """One shared object per distinct value: a book of 100k positions repeats the same
    quantities, confidences and (tick-rounded) prices over and over."""
    found = _DECIMALS.get(value)
    if found is not None and str(found) == str(value):  # 0.10 and 0.1 are equal, not the same
        return found
    if len(_DECIMALS) >= _DECIMAL_CACHE_LIMIT:
        _DECIMALS.clear()
    _DECIMALS[value] = value
    return value


def derive_client_order_id(*parts: str) -> ClientOrderId:
    """Venue-safe (Binance: [.A-Za-z0-9:/_-]{1,36}) and deterministic: 'te' + 32 hex chars."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]
    return ClientOrderId(f"te{digest}")


class Action(StrEnum):
    BUY = "buy"
    SELL = "sell"
    CLOSE = "close"
    HOLD = "hold"


class PositionSide(StrEnum):
    LONG = "LONG"
    SHORT = "SHORT"

    @property
    def opposite(self) -> PositionSide:
        return PositionSide.SHORT if self is PositionSide.LONG else PositionSide.LONG

    @property
    def sign(self) -> int:
        return 1 if self is PositionSide.LONG else -1


class OrderSide(StrEnum):
    BUY = "buy"
    SELL = "sell"

    @staticmethod
    def opening(side: PositionSide) -> OrderSide:
        return OrderSide.BUY if side is PositionSide.LONG else OrderSide.SELL

    @staticmethod
    def closing(side: PositionSide) -> OrderSide:
        return OrderSide.SELL if side is PositionSide.LONG else OrderSide.BUY


class PositionMode(StrEnum):
    HEDGE = "hedge"
    ONE_WAY = "one-way"


class SameDirectionPolicy(StrEnum):
    ACCUMULATE = "accumulate"
    STRONGEST_WINS = "strongest_wins"
    REJECT_DUPLICATES = "reject_duplicates"


class CloseReason(StrEnum):
    TAKE_PROFIT = "take_profit"
    STOP_LOSS = "stop_loss"
    SIGNAL = "signal"
    MANUAL = "manual"
    LIQUIDATION = "liquidation"
    REVERSED = "reversed"


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"


class PositionKey(NamedTuple):
    """A named tuple, not a dataclass: it is built and hashed several times per signal, and a
    tuple does both in C."""

    symbol: str
    side: PositionSide

    def __str__(self) -> str:
        return f"{self.symbol}_{self.side.value}"


@dataclass(frozen=True, slots=True)
class Market:
    """What a venue allows for one symbol; quantities are rounded down to the step."""

    symbol: str
    quantity_step: Decimal
    min_quantity: Decimal
    min_notional: Decimal
    price_tick: Decimal
    max_quantity: Decimal | None = None  # per market order (Binance: MARKET_LOT_SIZE maxQty)

    def round_quantity(self, quantity: Decimal) -> Decimal:
        steps = (quantity / self.quantity_step).to_integral_value(rounding=ROUND_DOWN)
        return (steps * self.quantity_step).normalize() if steps else ZERO
