"""One partition's view of a shared venue account (issue #16).

Several partitions trade one account, each its own symbols. The account-wide questions (open
positions, open stops) come back with only this partition's symbols in them: another
partition's position is that partition's to reconcile, never a "manual open" of this one.
Everything else goes to the venue as it is; the process starts and closes the venue once.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from decimal import Decimal

from engine.adapters.gateway import ExchangeGateway
from engine.domain.funding import VenueFunding
from engine.domain.model import ClientOrderId, Market, PositionKey
from engine.domain.orders import Fill, OrderIntent
from engine.domain.reconcile import VenueOrder, VenuePosition
from engine.domain.stops import StopSpec, VenueStop


class PartitionVenue:
    def __init__(self, venue: ExchangeGateway, owns: Callable[[str], bool]) -> None:
        self.venue, self.owns = venue, owns
        self.name = venue.name
        self.unknown_outcome_seconds = venue.unknown_outcome_seconds
        self.send_span_seconds = venue.send_span_seconds
        self.quotes = venue.quotes

    async def start(self, read_only: bool = False) -> None:
        """Started by the process, before its partitions."""

    async def close(self) -> None:
        """Closed by the process, after its partitions."""

    def market(self, symbol: str) -> Market | None:
        return self.venue.market(symbol)

    def on_price(self, symbol: str, price: Decimal) -> None:
        self.venue.on_price(symbol, price)

    async def reference_price(self, symbol: str) -> Decimal | None:
        return await self.venue.reference_price(symbol)

    async def venue_prices(self, symbols: list[str], kind: str) -> dict[str, Decimal]:
        return await self.venue.venue_prices(symbols, kind)

    async def watch_prices(self, symbols: list[str], kind: str) -> dict[str, Decimal]:
        return await self.venue.watch_prices(symbols, kind)

    async def funding_since(self, symbol: str, since: datetime) -> list[VenueFunding]:
        return await self.venue.funding_since(symbol, since)

    async def open_stops(self, symbol: str | None) -> list[VenueStop]:
        return [stop for stop in await self.venue.open_stops(symbol) if self.owns(stop.key.symbol)]

    async def place_stop(self, stop: StopSpec) -> VenueStop:
        return await self.venue.place_stop(stop)

    async def cancel_stop(self, stop: VenueStop) -> None:
        await self.venue.cancel_stop(stop)

    async def stops_since(self, symbol: str, since: datetime) -> list[VenueStop]:
        return await self.venue.stops_since(symbol, since)

    async def available_balance(self) -> Decimal | None:
        return await self.venue.available_balance()

    async def execute(self, intent: OrderIntent, not_after: datetime | None = None) -> Fill:
        return await self.venue.execute(intent, not_after)

    async def find_order(self, client_order_id: ClientOrderId, symbol: str) -> Fill | None:
        return await self.venue.find_order(client_order_id, symbol)

    async def positions(self) -> dict[PositionKey, VenuePosition]:
        return {key: held for key, held in (await self.venue.positions()).items() if self.owns(key.symbol)}

    async def orders_since(self, symbol: str, since: datetime) -> list[VenueOrder]:
        return await self.venue.orders_since(symbol, since)
