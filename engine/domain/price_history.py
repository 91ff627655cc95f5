"""The price history replays are made of (issue #18): ticks sampled into bars of a fixed
interval, one bar per symbol and interval.

A bar keeps every tick of its interval while there are at most four; past that, what TP/SL on
ticks needs: the first and the last tick, the first highest and the first lowest, each with its
own time, in the order they came. Replayed, a bar's points reach the levels the interval's ticks
reached, in the same order; an interval with at most four ticks replays exactly. Pure: ticks and
times in, bars out.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
from pydantic import TypeAdapter

from engine.domain.events import Amount, UtcTime
from engine.domain.model import json_default

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
    # In time order: every tick while there are at most four; else open, first high and low, close.
    points: tuple[PricePoint, ...]
    ticks: int  # ticks the bar was made of

    @property
    def msg_id(self) -> str:
        """One bar per symbol and interval, whichever process (or two) recorded it."""
        return f"bar:{self.symbol}:{self.interval_seconds}:{int((self.start - EPOCH).total_seconds())}"


Tick = tuple[int, datetime, Decimal]  # (its number within the bar, time, price)


RAW_TICKS = 4  # a bar keeps every tick up to this many, then the first, extremes and last


@dataclass(slots=True)
class _Building:
    start: datetime
    end: datetime
    # Every tick while there are at most RAW_TICKS; then [first, first high, first low, last].
    kept: list[Tick]
    ticks: int

    def add(self, tick: Tick) -> None:
        kept = self.kept
        if self.ticks < RAW_TICKS:
            kept.append(tick)
        else:
            if self.ticks == RAW_TICKS:  # the fifth tick: from here on only what TP/SL needs
                kept[:] = [kept[0], max(kept, key=_price), min(kept, key=_price), kept[-1]]
            price = tick[2]
            if price > kept[1][2]:
                kept[1] = tick
            elif price < kept[2][2]:
                kept[2] = tick
            kept[3] = tick
        self.ticks += 1

    def bar(self, symbol: str, interval_seconds: int) -> PriceBar:
        kept = sorted({t[0]: t for t in self.kept}.values())
        return PriceBar(
            symbol,
            self.start,
            interval_seconds,
            tuple(PricePoint(at, price) for _, at, price in kept),
            self.ticks,
        )


def _price(tick: Tick) -> Decimal:
    return tick[2]


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
                building.add((building.ticks, at, price))
                return None
        closed = None if building is None else building.bar(symbol, self.interval_seconds)
        start = self.bar_start(at)
        self._open[symbol] = _Building(start, start + self._step, [(0, at, price)], 1)
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
    return orjson.dumps(bar, default=json_default, option=orjson.OPT_UTC_Z)


def decode_bar(data: bytes) -> PriceBar:
    return _BAR.validate_json(data)
