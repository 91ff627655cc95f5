"""The price history replays are made of (issue #18): ticks sampled into bars of a fixed
interval, one bar per symbol and interval.

A bar keeps what TP/SL on ticks needs from its interval: the first and the last tick, the first
highest and the first lowest, each with its own time, in the order they came (at most four
points). Replayed, a bar's points fire the same levels the interval's ticks fired, in the same
order; an interval with at most four ticks replays exactly. Pure: ticks and times in, bars out.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
from pydantic import TypeAdapter

from engine.domain.events import Amount, UtcTime
from engine.domain.model import decimal_text

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class PricePoint:
    at: UtcTime
    price: Amount


@dataclass(frozen=True, slots=True)
class PriceBar:
    """`price_history.<symbol>` (PRICE_HISTORY stream): one interval of one symbol's ticks."""

    symbol: str
    start: UtcTime
    interval_seconds: int
    points: tuple[PricePoint, ...]  # in time order: open, the first high and low, close
    ticks: int  # ticks the bar was made of

    @property
    def msg_id(self) -> str:
        """One bar per symbol and interval, whichever process (or two) recorded it."""
        return f"bar:{self.symbol}:{self.interval_seconds}:{int((self.start - EPOCH).total_seconds())}"


Tick = tuple[int, datetime, Decimal]  # (its number within the bar, time, price)


@dataclass(slots=True)
class _Building:
    start: datetime
    end: datetime
    first: Tick
    high: Tick  # the first highest
    low: Tick  # the first lowest
    last: Tick
    ticks: int

    def bar(self, symbol: str, interval_seconds: int) -> PriceBar:
        kept = sorted({t[0]: t for t in (self.first, self.high, self.low, self.last)}.values())
        return PriceBar(
            symbol,
            self.start,
            interval_seconds,
            tuple(PricePoint(at, price) for _, at, price in kept),
            self.ticks,
        )


class BarMaker:
    """Bars of `interval_seconds` from ticks as they come. `observe` returns the bar a tick
    closed (its symbol's previous interval); `due` the bars whose interval has ended by `now`;
    `drain` every bar still open."""

    def __init__(self, interval_seconds: int) -> None:
        if interval_seconds < 1:
            raise ValueError("a bar's interval is at least one second")
        self.interval_seconds = interval_seconds
        self._step = timedelta(seconds=interval_seconds)
        self._open: dict[str, _Building] = {}

    def bar_start(self, at: datetime) -> datetime:
        elapsed = int((at - EPOCH).total_seconds()) // self.interval_seconds * self.interval_seconds
        return EPOCH + timedelta(seconds=elapsed)

    def observe(self, symbol: str, price: Decimal, at: datetime) -> PriceBar | None:
        building = self._open.get(symbol)
        if building is not None:
            if at < building.start:
                at = building.start  # a clock stepping back: the tick joins the open bar
            if at < building.end:  # most ticks: their symbol's bar is open
                tick = (building.ticks, at, price)
                building.ticks += 1
                if price > building.high[2]:
                    building.high = tick
                elif price < building.low[2]:
                    building.low = tick
                building.last = tick
                return None
        closed = None if building is None else building.bar(symbol, self.interval_seconds)
        start = self.bar_start(at)
        tick = (0, at, price)
        self._open[symbol] = _Building(start, start + self._step, tick, tick, tick, tick, 1)
        return closed

    def due(self, now: datetime) -> list[PriceBar]:
        ended = [s for s, b in self._open.items() if b.start + self._step <= now]
        return [self._open.pop(s).bar(s, self.interval_seconds) for s in sorted(ended)]

    def drain(self) -> list[PriceBar]:
        bars = [b.bar(s, self.interval_seconds) for s, b in sorted(self._open.items())]
        self._open.clear()
        return bars


_BAR = TypeAdapter(PriceBar)


def encode_bar(bar: PriceBar) -> bytes:
    return orjson.dumps(bar, default=_decimal, option=orjson.OPT_UTC_Z)


def decode_bar(data: bytes) -> PriceBar:
    return _BAR.validate_json(data)


def _decimal(value: object) -> str:
    if isinstance(value, Decimal):
        return decimal_text(value)
    raise TypeError(f"{type(value).__name__} is not JSON")
