"""The book against the venue: periodic lookups of orders with unknown outcomes, reconciliation
of positions (DESIGN §4.2), and funding payments split over the slices (issue #14)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from datetime import datetime, timedelta

import structlog

from engine import metrics
from engine.app.orders import OrderDesk
from engine.app.runtime import Runtime
from engine.domain.events import PositionReconciled
from engine.domain.funding import by_funding_time, split_funding
from engine.domain.model import derive_id
from engine.domain.reconcile import reconcile

log = structlog.get_logger(__name__)
ORDER_HISTORY_REACH = timedelta(days=6, hours=20)


class Reconciler:
    def __init__(self, rt: Runtime, desk: OrderDesk) -> None:
        self.rt, self.desk = rt, desk
        # Stable for the worker's life: taken once (the parts run per signal and per tick).
        self.settings, self.clock, self.journaled = rt.settings, rt.clock, rt.journaled
        self.emit, self.remember, self.check_lease = rt.emit, rt.remember, rt.check_lease
        self.locks, self.last_prices, self.price_seen_at = rt.locks, rt.last_prices, rt.price_seen_at
        self.state = rt.state
        self.book, self.journal = rt.state.book, rt.state.journal
        self.reconciled_at: dict[str, datetime] = {}
        # The last event known at start: the venue's orders since then are what was missed.
        self.known_until: datetime | None = None

    async def keep_reconciling(self) -> None:
        """Periodically, and after a NATS reconnect: settle open orders, then reconcile."""
        every = self.settings.reconcile_interval_seconds
        while not self.rt.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.rt.wake_reconcile.wait(), every or None)
            self.rt.wake_reconcile.clear()
            if self.rt.stopping.is_set():
                return
            try:
                await self.desk.resolve_pending()
                await self.reconcile_all()
            except Exception as exc:  # the venue may be down; try again next round
                log.warning("reconcile.failed", error=repr(exc))

    async def keep_funding(self) -> None:
        """Every FUNDING_POLL_SECONDS, book the venue's new funding payments on the symbols held,
        split over the slices that were open (issue #14)."""
        every = self.settings.funding_poll_seconds
        if not every:
            return
        while not self.rt.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.rt.stopping.wait(), every)
            if self.rt.stopping.is_set():
                return
            try:
                await self.book_funding()
            except Exception as exc:  # the venue may be down; the next round asks again
                log.warning("funding.failed", error=repr(exc)[:300])

    async def book_funding(self) -> None:
        """Ask the venue for new funding payments on every symbol held now or within the last
        day, and split each over the slices open at its funding time."""
        now = self.clock()
        self.state.slice_history.prune(now)
        for symbol in sorted(self.state.slice_history.symbols(self.book)):
            booked = self.state.funded_through.get(symbol)
            first = self.state.slice_history.earliest(self.book, symbol) or now
            since = booked + timedelta(microseconds=1) if booked is not None else first - timedelta(minutes=1)
            payments = await self.rt.gateway.funding_since(symbol, since)
            async with self.locks[symbol]:
                for payment in by_funding_time(payments, self.state.funding_refs):
                    held = self.state.slice_history.open_at(self.book, symbol, payment.funding_time)
                    stored = self.state.funding_parts.get(payment.ref, set())
                    for event in split_funding(payment, held, self.clock()):
                        if event.event_id in stored:
                            continue  # this part was stored before a crash
                        log.info(
                            "position.funding",
                            strategy_id=event.strategy_id,
                            symbol=symbol,
                            amount=str(event.amount),
                            rate=str(event.rate),
                        )
                        self.remember(event)
                        self.emit(event)
        await self.rt.flush()

    async def reconcile_all(self) -> None:
        """Make the book hold what the venue holds; every difference is a finding (DESIGN §4.2)."""
        snapshot = {k: v.quantity for k, v in (await self.rt.gateway.positions()).items()}
        held = {k: ep.quantity for k, ep in self.book.exchange.items()}
        # Only symbols that differ in this snapshot are looked at again, under their lock.
        differing = {k.symbol for k in snapshot.keys() | held.keys() if snapshot.get(k) != held.get(k)}
        now = self.clock()
        for symbol in {k.symbol for k in snapshot.keys() | held.keys()} - differing:
            self.reconciled_at[symbol] = now
        for symbol in sorted(differing):
            async with self.locks[symbol]:  # no order of ours is in flight on it
                if self.journal.pending_on(symbol):
                    continue  # an order with an unknown outcome: look it up first
                await self.reconcile_symbol(symbol)
        await self.rt.flush()

    async def reconcile_symbol(self, symbol: str) -> None:
        market = self.rt.gateway.market(symbol)
        if market is None:
            return
        now = self.clock()
        venue = {k: v for k, v in (await self.rt.gateway.positions()).items() if k.symbol == symbol}
        held = {k: ep.quantity for k, ep in self.book.exchange.items() if k.symbol == symbol}
        if {k: v.quantity for k, v in venue.items()} == held:
            self.reconciled_at[symbol] = now
            return
        since = self.reconciled_at.get(symbol) or self.known_until or now - timedelta(days=1)
        # Venues keep a limited order history (Binance: 7 days); older is out of reach anyway.
        since = max(since - timedelta(seconds=60), now - ORDER_HISTORY_REACH)
        listed = await self.rt.gateway.orders_since(symbol, since)
        stop_fills = await self.rt.stops.fills(symbol, since) if self.rt.stops is not None else set()
        external = [
            dataclasses.replace(o, protective_stop=True) if o.exchange_order_id in stop_fills else o
            for o in listed
            if o.exchange_order_id not in self.state.attributed_orders
        ]
        findings = reconcile(
            self.book,
            symbol,
            venue,
            external,
            market,
            self.settings.external_close_attribution,
            self.last_prices.get(symbol),
        )
        for finding in findings:
            metrics.RECONCILIATION_FINDINGS.labels(finding.kind.value).inc()
            log.warning(
                "reconcile.finding",
                kind=finding.kind.value,
                key=str(finding.key),
                book_quantity=str(finding.book_quantity),
                venue_quantity=str(finding.venue_quantity),
                slices=len(finding.settlements),
            )
            order_ids = sorted(finding.venue_order_ids)
            self.state.attributed_orders.update(order_ids)
            self.emit(
                PositionReconciled(
                    event_id=derive_id("position.reconciled", str(finding.key), now.isoformat(), *order_ids),
                    occurred_at=now,
                    kind=finding.kind.value,
                    symbol=finding.key.symbol,
                    side=finding.key.side,
                    book_quantity=finding.book_quantity,
                    venue_quantity=finding.venue_quantity,
                    strategy_position_ids=[
                        leg.position_id for intent, _ in finding.settlements for leg in intent.legs
                    ],
                    venue_order_ids=order_ids,
                )
            )
            for intent, fill in finding.settlements:
                self.desk.book_fill(intent, fill)
        self.reconciled_at[symbol] = now
