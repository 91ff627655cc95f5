"""The price history (issue #18): the ticks a worker takes, as bars of PRICE_HISTORY_INTERVAL
seconds in the PRICE_HISTORY stream, kept PRICE_HISTORY_DAYS, for `tradeengine replay`.

Each worker records the symbols it runs (a partition, its own), so each bar has one recorder; a
bar's Nats-Msg-Id is its symbol and interval, so a takeover that records the same interval
again stores nothing twice. Recording never holds up a tick: a tick only updates its bar; the
bars are stored by a task of their own once their interval has ended."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING

import structlog

from engine.adapters.nats_bus import PRICE_HISTORY_STREAM
from engine.domain.price_history import BarMaker, PriceBar, encode_bar

if TYPE_CHECKING:
    from engine.adapters.nats_bus import NatsBus

log = structlog.get_logger(__name__)
UNSTORED_LIMIT = 100_000  # bars kept for the next try while NATS is away; the oldest go first
STORE_CHUNK = 1000


class PriceHistoryRecorder:
    def __init__(self, bus: NatsBus, interval_seconds: int, clock: Callable[[], datetime]) -> None:
        self.bus, self.clock = bus, clock
        self.maker = BarMaker(interval_seconds)
        self.unstored: list[PriceBar] = []

    def observe(self, symbol: str, price: Decimal) -> None:
        closed = self.maker.observe(symbol, price, self.clock())
        if closed is not None:
            self._keep([closed])

    async def keep(self, stopping: asyncio.Event) -> None:
        """Store the bars whose interval has ended, every interval; at the end, the bars still
        open too (a successor recording the rest of their interval is refused as a duplicate:
        the interval keeps the part recorded here)."""
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.maker.interval_seconds)
            self._keep(self.maker.due(self.clock()))
            await self.store()
        self._keep(self.maker.drain())
        await self.store()

    def _keep(self, bars: list[PriceBar]) -> None:
        self.unstored.extend(bars)
        if len(self.unstored) > UNSTORED_LIMIT:  # NATS away for long: the oldest bars go first
            del self.unstored[: len(self.unstored) - UNSTORED_LIMIT]

    async def store(self) -> None:
        """In chunks, each dropped once JetStream has acked it: a backlog after an outage never
        holds the event publisher's lock for long, and a chunk stored before a failure is not
        sent again."""
        while self.unstored:
            chunk = self.unstored[:STORE_CHUNK]
            try:
                await self.bus.publish_stored(
                    [(f"price_history.{bar.symbol}", encode_bar(bar), bar.msg_id) for bar in chunk],
                    stream=PRICE_HISTORY_STREAM,
                )
            except Exception as exc:  # NATS away: tried again next interval; trading goes on
                log.warning("price_history.store_failed", bars=len(self.unstored), error=repr(exc)[:300])
                return
            del self.unstored[: len(chunk)]
