"""The venue's own prices as ticks (issue #14): on a ccxt venue nobody else need publish
`prices.<symbol>` for TP/SL to fire. Every `PRICE_POLL_SECONDS` the feed asks the venue, in one
request, for the prices of the symbols the worker cares about (open positions, recent signals)
and publishes each as a tick, which the worker takes like any other."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal

import structlog

from engine import metrics
from engine.domain.model import decimal_text

log = structlog.get_logger(__name__)

STREAM_WAIT = 10.0  # seconds without an update from a stream before it counts as failing
PriceSource = Callable[[list[str]], Awaitable[dict[str, Decimal]]]
Publish = Callable[[str, bytes], Awaitable[None]]


class PriceFeed:
    def __init__(
        self, source: PriceSource, publish: Publish, symbols: Callable[[], set[str]], every: float, name: str
    ) -> None:
        self.source, self.publish, self.symbols, self.every, self.name = source, publish, symbols, every, name
        self.last_success: float | None = None  # monotonic time of the last answered poll
        self._failing_since: float | None = None

    def fresh(self, now: float) -> bool:
        """Whether the feed has answered recently enough for readiness (5 polls, at least 10 s)."""
        return self.last_success is not None and now - self.last_success <= max(5 * self.every, 10.0)

    async def run(self, stopping: asyncio.Event) -> None:
        """Poll every `every` seconds; with `every` 0 the source is a stream, which answers
        when the venue pushes an update."""
        while not stopping.is_set():
            started = time.monotonic()
            wanted = self.symbols()
            if wanted:
                await self.poll(sorted(wanted))
            else:
                self.last_success = started  # nothing to watch is not a stale feed
            pause = self.every - (time.monotonic() - started) if self.every else (0.0 if wanted else 1.0)
            if pause > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), pause)

    async def poll(self, symbols: list[str]) -> None:
        try:
            prices = await asyncio.wait_for(self.source(symbols), None if self.every else STREAM_WAIT)
        except Exception as exc:
            now = time.monotonic()
            if self._failing_since is None:
                self._failing_since = now
                log.warning("price_feed.failed", source=self.name, error=repr(exc)[:300])
            if not self.every:
                await asyncio.sleep(1.0)  # a stream that fails is opened again, not in a tight loop
            return
        if self._failing_since is not None:
            log.info(
                "price_feed.recovered",
                source=self.name,
                after_seconds=round(time.monotonic() - self._failing_since, 1),
            )
            self._failing_since = None
        stamp = time.time()
        try:
            for symbol, price in prices.items():
                tick = {
                    "symbol": symbol,
                    "price": decimal_text(price),
                    "timestamp": stamp,
                    "source": self.name,
                }
                await self.publish(f"prices.{symbol}", json.dumps(tick).encode())
        except Exception as exc:  # NATS away (its buffer full): the next poll publishes again
            log.warning("price_feed.publish_failed", source=self.name, error=repr(exc)[:300])
            return
        self.last_success = time.monotonic()
        metrics.child(metrics.PRICE_FEED_POLLED, self.name).set(stamp)
