"""Keeps one protective stop order per exchange position at the venue (issue #14), so a position
is protected while the worker is down. The venue is the record of which stops are open: they are
read back at start and after every reconciliation; a stop is placed, moved (new one first, then
the old one cancelled) and cancelled as the key's slices open and close. A client id derived from
the position, level and size makes a retried or repeated placement the same order."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal

import structlog

from engine import metrics
from engine.adapters.gateway import ExchangeGateway, StopRefused
from engine.domain.book import PositionBook
from engine.domain.model import PositionKey, decimal_text
from engine.domain.stops import VenueStop, protective_stop

log = structlog.get_logger(__name__)
RESYNC_EVERY = 30.0  # seconds: every key is checked against the venue this often anyway


class ProtectiveStops:
    def __init__(
        self,
        gateway: ExchangeGateway,
        book: Callable[[], PositionBook],
        lock: Callable[[str], asyncio.Lock],
        fallback_pct: Decimal | None,
        check_lease: Callable[[], None] = lambda: None,
    ) -> None:
        """`check_lease` raises when this worker may no longer act at the venue: called before
        every stop placed or cancelled, as before every order."""
        self.gateway, self.book, self.lock, self.fallback_pct = gateway, book, lock, fallback_pct
        self.check_lease = check_lease
        self.placed: dict[PositionKey, VenueStop] = {}  # our open stop per key, as last known
        self._dirty: set[PositionKey] = set()
        self._wake = asyncio.Event()
        self._refused: defaultdict[PositionKey, str] = defaultdict(str)  # last refusal, logged once
        self._loaded = False

    def touch(self, key: PositionKey) -> None:
        """The key's slices changed: its stop is looked at soon."""
        self._dirty.add(key)
        self._wake.set()

    async def load(self) -> None:
        """What the venue holds of ours; duplicates for one key (a crash between placing a new
        stop and cancelling the old) are cancelled but for the newest."""
        found: dict[PositionKey, list[VenueStop]] = defaultdict(list)
        for stop in await self.gateway.open_stops(None):
            found[stop.key].append(stop)
        self.placed = {}
        for key, stops in found.items():
            *older, newest = sorted(stops, key=lambda s: int(s.venue_id) if s.venue_id.isdigit() else 0)
            self.placed[key] = newest
            for stale in older:
                self.check_lease()
                await self.gateway.cancel_stop(stale)
        for key in set(self.placed) | set(self.book().exchange):
            self.touch(key)
        self._loaded = True
        log.info("stops.loaded", open_at_venue=len(self.placed))

    async def keep(self, stopping: asyncio.Event) -> None:
        stopped = asyncio.ensure_future(stopping.wait())
        try:
            while not stopping.is_set():
                woken = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait(
                    {woken, stopped}, timeout=RESYNC_EVERY, return_when=asyncio.FIRST_COMPLETED
                )
                woken.cancel()
                await self._round(stopping)
        finally:
            stopped.cancel()

    async def _round(self, stopping: asyncio.Event) -> None:
        self._wake.clear()
        if stopping.is_set():
            return
        if not self._loaded:
            try:
                await self.load()
            except Exception as exc:  # the venue may be away: no stop is placed blind meanwhile
                log.warning("stops.load_failed", error=repr(exc)[:300])
                return
        if not self._dirty:
            self._dirty = set(self.placed) | set(self.book().exchange)
        dirty, self._dirty = self._dirty, set()
        for key in sorted(dirty):
            try:
                await self.sync(key)
            except Exception as exc:  # the venue may be away: the key is looked at again
                self._dirty.add(key)
                log.warning("stops.sync_failed", key=str(key), error=repr(exc)[:300])

    async def sync(self, key: PositionKey) -> None:
        """Make the venue hold the stop the key should have, and no other of ours. The book is
        read under the symbol's lock; the venue is asked outside it, so a slow venue never
        holds up the symbol's ticks and signals."""
        market = self.gateway.market(key.symbol)
        async with self.lock(key.symbol):
            wanted = protective_stop(self.book(), key, market, self.fallback_pct) if market else None
        at_venue = [stop for stop in await self.gateway.open_stops(key.symbol) if stop.key == key]
        current = self.placed.get(key)
        if current is not None and all(stop.client_id != current.client_id for stop in at_venue):
            current = None  # gone at the venue without a fill we know of (cancelled, expired)
        if wanted is not None:  # already there (an answer lost, a restart): adopted, not placed again
            current = next((stop for stop in at_venue if stop.client_id == wanted.client_id), current)
        if wanted is not None and (current is None or current.client_id != wanted.client_id):
            try:
                self.check_lease()
                current = await self.gateway.place_stop(wanted)
            except StopRefused as exc:
                if self._refused[key] != str(exc):
                    self._refused[key] = str(exc)
                    log.warning(
                        "stops.refused", key=str(key), trigger=decimal_text(wanted.trigger), error=str(exc)
                    )
                metrics.STOPS.labels("refused").inc()
                return  # the worker's own stop-loss still acts on ticks; tried again on change
            self._refused.pop(key, None)
            metrics.STOPS.labels("placed").inc()
            log.info(
                "stops.placed",
                key=str(key),
                trigger=decimal_text(current.trigger),
                quantity=decimal_text(current.quantity),
            )
        if wanted is None:
            self.placed.pop(key, None)
        elif current is not None:
            self.placed[key] = current
        # Whatever else of ours the venue holds for this key goes: a stop left by a crash
        # between placing a new one and cancelling the old, or one placed by a request whose
        # answer was lost.
        for stale in at_venue:
            if wanted is None or stale.client_id != wanted.client_id:
                self.check_lease()
                await self.gateway.cancel_stop(stale)
                metrics.STOPS.labels("cancelled").inc()

    async def fills(self, symbol: str, since: datetime) -> set[str]:
        """The venue's orders that our stops on `symbol` became when they triggered since
        `since` (the venue's own history, so a restart knows them too). A triggered stop is
        forgotten; its key gets a new one if a position is left."""
        fills: set[str] = set()
        try:
            history = await self.gateway.stops_since(symbol, since)
        except Exception as exc:  # a venue without (or refusing) the history: manual, as before
            log.warning("stops.history_failed", symbol=symbol, error=repr(exc)[:300])
            return fills
        for state in history:
            if state.status != "triggered" or not state.fill_order_id:
                continue
            fills.add(state.fill_order_id)
            if self.placed.get(state.key) is not None and self.placed[state.key].client_id == state.client_id:
                del self.placed[state.key]
                metrics.STOPS.labels("triggered").inc()
                log.warning("stops.triggered", key=str(state.key), order=state.fill_order_id)
            self.touch(state.key)
        return fills
