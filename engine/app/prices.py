"""Prices: ticks in order per symbol, TP/SL fired by them, the venue's own prices (the feed, the
trusted price for pre-trade checks, the last price kept across restarts), and flatten."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque
from collections.abc import Coroutine
from decimal import Decimal
from typing import Any

import structlog
from nats.aio.msg import Msg

from engine import metrics
from engine.adapters.gateway import OrderRejected, OrderUncertain
from engine.adapters.last_prices import WRITE_EVERY, LastPrices
from engine.app.orders import OrderDesk
from engine.app.price_feed import PriceFeed
from engine.app.price_history import PriceHistoryRecorder
from engine.app.runtime import Runtime
from engine.config import PriceFeedMode
from engine.domain.decide import close_intent, closes_by_key
from engine.domain.events import parse_tick
from engine.domain.model import CloseReason, StrategyPositionId
from engine.domain.orders import CloseLeg, OrderIntent
from engine.domain.risk import Scope

log = structlog.get_logger(__name__)
STALE_PRICE_LIMIT = 600.0  # seconds: a tick this old still stands in when the venue gives no price
TICK_BACKLOG_LIMIT = 10_000  # per symbol, while its lock is held by a slow venue call
FLATTEN_PASSES = 5


class Prices:
    def __init__(self, rt: Runtime, desk: OrderDesk) -> None:
        self.rt, self.desk = rt, desk
        # Stable for the worker's life: taken once (the parts run per signal and per tick).
        self.settings, self.clock, self.journaled = rt.settings, rt.clock, rt.journaled
        self.emit, self.remember, self.check_lease = rt.emit, rt.remember, rt.check_lease
        self.locks, self.last_prices, self.price_seen_at = rt.locks, rt.last_prices, rt.price_seen_at
        self.book, self.journal = rt.state.book, rt.state.journal
        self.feed: PriceFeed | None = None
        self.price_store: LastPrices | None = None
        self.interest: dict[str, float] = {}  # symbol -> monotonic time of its last signal
        self.ticks: defaultdict[str, deque[Decimal]] = defaultdict(deque)
        self.tick_runners: dict[str, asyncio.Task[None]] = {}
        self.background: set[asyncio.Task[Any]] = set()
        self.trailing_writes: set[str] = set()  # symbols with a write of their last price pending
        self.history: PriceHistoryRecorder | None = None  # PRICE_HISTORY_DAYS > 0, under NATS

    async def on_price_message(self, msg: Msg) -> None:
        """Queue the tick for its symbol: a symbol whose order waits on the venue must not hold
        up the ticks (and the TP/SL) of every other symbol. Each symbol's ticks run in order."""
        tick = parse_tick(msg.subject, msg.data)
        if isinstance(tick, str):
            metrics.BAD_TICKS.inc()
            log.warning("price.invalid", subject=msg.subject, error=tick)
            return
        symbol, price = tick
        if self.rt.gateway.market(symbol) is None:
            # Nothing can trade it here: no metric series, lock or queue for a made-up symbol.
            metrics.UNLISTED_TICKS.inc()
            return
        if self.history is not None:
            self.history.observe(symbol, price)
        queue = self.ticks[symbol]
        runner = self.tick_runners.get(symbol)
        idle = runner is None or runner.done()  # a live runner may hold a tick taken off the queue
        if (
            idle
            and not queue
            and not self.locks[symbol].locked()
            and not self.book.triggers.may_fire(symbol, price)
        ):
            # Most ticks: nothing ahead of this one and no level reached; recording the price
            # needs no task and no lock.
            self.record_price(symbol, price)
            return
        if len(queue) >= TICK_BACKLOG_LIMIT:
            queue.popleft()  # a stalled symbol keeps its newest prices
            metrics.TICKS_DROPPED.inc()
        queue.append(price)
        if idle:
            self.tick_runners[symbol] = asyncio.create_task(self.run_ticks(symbol))

    async def run_ticks(self, symbol: str) -> None:
        queue = self.ticks[symbol]
        while queue:
            try:
                await self.on_price(symbol, queue.popleft())
            except Exception:  # a bug must cost one tick, not the symbol's price feed
                log.exception("price.internal_error", symbol=symbol)

    def record_price(self, symbol: str, price: Decimal) -> None:
        metrics.PRICE_TICKS.inc()
        metrics.child(metrics.LAST_TICK, symbol).set(time.time())
        self.last_prices[symbol] = price
        now = self.price_seen_at[symbol] = time.monotonic()
        self.rt.gateway.on_price(symbol, price)
        store = self.price_store
        if store is None:
            return
        if store.due(symbol, now):
            self.in_background(store.write(symbol, price, time.time()))
        elif symbol not in self.trailing_writes:
            # Written at most every WRITE_EVERY seconds, and the last price of a burst too: the
            # desk view and a restart see where a quiet market stopped.
            self.trailing_writes.add(symbol)
            self.in_background(self._write_later(store, symbol))

    async def _write_later(self, store: LastPrices, symbol: str) -> None:
        try:
            await asyncio.sleep(WRITE_EVERY)
        finally:
            self.trailing_writes.discard(symbol)
        if store.due(symbol, time.monotonic()):
            await store.write(symbol, self.last_prices[symbol], time.time())

    def in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Work nobody waits for (a failure is logged, never raised)."""

        async def guarded() -> None:
            try:
                await work
            except Exception as exc:
                log.warning("worker.background_failed", error=repr(exc)[:300])

        task = asyncio.create_task(guarded())
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def restore_prices(self) -> None:
        """The last price of every symbol as the previous process left it, with its age: a
        reference for pre-trade checks at once (a stale one is replaced by the venue's mark);
        never a trigger for TP/SL, which wait for a new tick."""
        try:
            self.price_store = await LastPrices.open(self.rt.bus.js, replicas=self.rt.bus.replicas)
            stored = await self.price_store.read_all()
        except Exception as exc:
            log.warning("prices.restore_failed", error=repr(exc)[:300])
            return
        now = time.monotonic()
        for symbol, (price, age) in stored.items():
            if symbol not in self.last_prices and self.rt.gateway.market(symbol) is not None:
                self.last_prices[symbol] = price
                self.price_seen_at[symbol] = now - age
                self.rt.gateway.on_price(symbol, price)
        log.info("prices.restored", symbols=len(stored))

    def feed_symbols(self) -> set[str]:
        """Open positions' symbols and those with a signal in the last PRICE_INTEREST_SECONDS."""
        horizon = time.monotonic() - self.settings.price_interest_seconds
        for symbol in [s for s, at in self.interest.items() if at < horizon]:
            del self.interest[symbol]
        return {key.symbol for key in self.book.exchange} | set(self.interest)

    def start_feed(self) -> asyncio.Task[None] | None:
        mode = self.settings.price_feed
        if mode is PriceFeedMode.OFF or (mode is PriceFeedMode.AUTO and not self.rt.gateway.quotes):
            return None
        if not self.rt.gateway.quotes:
            log.warning(
                "price_feed.unavailable", venue=self.rt.gateway.name, why="the venue has no prices of its own"
            )
            return None
        kind = self.settings.tpsl_price.value
        streaming = mode is PriceFeedMode.STREAM

        async def source(symbols: list[str]) -> dict[str, Decimal]:
            if streaming:
                return await self.rt.gateway.watch_prices(symbols, kind)
            return await self.rt.gateway.venue_prices(symbols, kind)

        async def publish(subject: str, payload: bytes) -> None:
            await self.rt.bus.nc.publish(subject, payload)

        every = 0.0 if streaming else self.settings.price_poll_seconds
        self.feed = PriceFeed(source, publish, self.feed_symbols, every, f"{self.rt.gateway.name}:{kind}")
        log.info("price_feed.started", source=self.feed.name, mode=mode.value, every=every)
        return asyncio.create_task(self.feed.run(self.rt.stopping))

    async def available_balance(self) -> Decimal | None:
        """The account's available balance, asked only for a signal sized by it."""
        try:
            return await self.rt.gateway.available_balance()
        except Exception as exc:
            log.warning("venue.balance_failed", error=repr(exc)[:300])
            return None

    async def trusted_price(self, symbol: str) -> Decimal | None:
        """On a venue that quotes, the price pre-trade checks use: the last tick while it is
        fresh, else the venue's own (mark) price; None when the venue gives neither. (A venue
        without prices of its own, paper, has only the ticks it was given, however old.)"""
        last = self.last_prices.get(symbol)
        seen = self.price_seen_at.get(symbol)
        if (
            last is not None
            and seen is not None
            and time.monotonic() - seen <= self.settings.price_max_age_seconds
        ):
            return last
        try:
            quoted = await self.rt.gateway.reference_price(symbol)
        except Exception as exc:
            log.warning("price.reference_failed", symbol=symbol, error=repr(exc)[:300])
            quoted = None
        if quoted is None:
            # The venue gives none: a tick of the last few minutes still stands in; an older
            # one (a price restored from days ago) must not size an order or pass a limit.
            recent = seen is not None and time.monotonic() - seen <= STALE_PRICE_LIMIT
            return last if recent else None
        self.last_prices[symbol] = quoted
        self.price_seen_at[symbol] = time.monotonic()
        return quoted

    async def on_price(self, symbol: str, price: Decimal) -> None:
        async with self.locks[symbol]:
            self.record_price(symbol, price)
            fired = self.book.fire_triggers(symbol, price)
            # A slice whose close has an unknown outcome is left to its lookup, not the price.
            closing = [
                (sp, sp.remaining, reason) for sp, reason in fired if sp.id not in self.journal.closing
            ]
            market = self.rt.gateway.market(symbol)
            max_quantity = market.max_quantity if market else None
            for intent in closes_by_key(closing, price, None, max_quantity) if closing else ():
                await self.close_fired(intent, price)
        if fired:
            self.rt.flush_soon()  # nothing waits on these: let ticks in a burst share one flush

    async def close_fired(self, intent: OrderIntent, price: Decimal) -> None:
        """Close the slices a tick reached (its lock held). If the venue refuses them together,
        each goes on its own: one slice it will not close must not keep the others open."""
        outcome = await self.desk.place(intent)
        if isinstance(outcome, OrderRejected):
            log.warning("trigger.close_refused", client_order_id=intent.client_order_id, error=str(outcome))
            self.rt.wake_reconcile.set()  # the venue may have closed it already (a protective stop)
            if len(intent.legs) > 1:
                for leg in intent.legs:
                    sp = self.book.positions.get(StrategyPositionId(leg.position_id))
                    if sp is not None and isinstance(leg, CloseLeg):
                        await self.close_fired(close_intent(sp, sp.remaining, leg.reason, price, None), price)
                return
        if not isinstance(outcome, OrderUncertain):
            self.desk.rearm_still_open(intent)  # refused, or partly filled: TP/SL stay on the rest
        # An uncertain close stays disarmed until its lookup says it was never placed.

    async def flatten(self, scope: Scope) -> list[str]:
        """Close every open slice in the scope at market, reason `manual`: one order per key
        (split at the venue's size limit), under each symbol's lock. Returns the slices closed."""
        closed: list[str] = []
        # Passes until the scope holds nothing more to close: a signal that passed its checks
        # before the halt may open a position (under its symbol's lock) while a pass runs.
        for _ in range(FLATTEN_PASSES):
            closed_before = len(closed)
            symbols = sorted(
                {sp.symbol for sp in self.book.positions.values() if scope.covers(sp.strategy_id, sp.symbol)}
            )
            for symbol in symbols:
                closed += await self.flatten_symbol(scope, symbol)
            if len(closed) == closed_before:
                break
        return closed

    async def flatten_symbol(self, scope: Scope, symbol: str) -> list[str]:
        async with self.locks[symbol]:
            closing = [
                (sp, sp.remaining, CloseReason.MANUAL)
                for sp in list(self.book.positions.values())
                if sp.symbol == symbol
                and scope.covers(sp.strategy_id, symbol)
                and sp.id not in self.journal.closing
            ]
            if not closing:
                return []
            price = (
                await self.trusted_price(symbol) if self.rt.gateway.quotes else self.last_prices.get(symbol)
            ) or closing[0][0].entry_price  # the paper venue before any tick: no better price
            market = self.rt.gateway.market(symbol)
            for intent in closes_by_key(closing, price, None, market.max_quantity if market else None):
                await self.close_fired(intent, price)
            return [sp.id for sp, _, _ in closing if sp.id not in self.book.positions]
