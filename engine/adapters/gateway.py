"""The port every exchange adapter implements."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Protocol

from engine.domain.funding import VenueFunding
from engine.domain.model import ClientOrderId, Market, PositionKey
from engine.domain.orders import Fill, OrderIntent
from engine.domain.reconcile import VenueOrder, VenuePosition
from engine.domain.stops import StopSpec, VenueStop


class OrderRejected(Exception):
    """The venue refused the order for good; `reason_code` feeds the decision."""

    def __init__(self, reason_code: str, message: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class StopRefused(Exception):
    """The venue would not take the stop (e.g. the price is already beyond it: -2021)."""


class OrderUncertain(Exception):
    """The venue may or may not hold the order (timeouts, lost answers, an unreachable venue
    after every bounded retry). Only a later lookup by client order id can tell."""


class ExchangeGateway(Protocol):
    name: str
    # How long after an order is journaled a request for it may still reach the venue and
    # execute; until then a lookup that finds nothing proves nothing (0: in-process venues).
    unknown_outcome_seconds: float
    # No request of one order is sent later than this after it was journaled.
    send_span_seconds: float

    async def start(self, read_only: bool = False) -> None:
        """Load markets and check (or set) the position mode; before the first order. With
        `read_only` (a desk view): markets only, nothing about the account checked or set."""
        ...

    def market(self, symbol: str) -> Market | None: ...

    def on_price(self, symbol: str, price: Decimal) -> None: ...

    # Whether `reference_price` asks the venue (a real market) or only echoes our own ticks.
    quotes: bool

    async def reference_price(self, symbol: str) -> Decimal | None:
        """The venue's own price for `symbol` (Binance: the mark price), for pre-trade checks
        when no fresh tick is at hand; None if it has none."""
        ...

    async def venue_prices(self, symbols: list[str], kind: str) -> dict[str, Decimal]:
        """The venue's `last` or `mark` price of each symbol it knows, in one request (the
        price feed); empty where the venue has no market data of its own."""
        ...

    async def funding_since(self, symbol: str, since: datetime) -> list[VenueFunding]:
        """Funding payments on `symbol` booked by the venue from `since` on, oldest first."""
        ...

    async def open_stops(self, symbol: str | None) -> list[VenueStop]:
        """Our stop orders open at the venue (on `symbol`, or everywhere)."""
        ...

    async def place_stop(self, stop: StopSpec) -> VenueStop:
        """Place a reduce-side stop-market order for `stop.key`. Raises StopRefused."""
        ...

    async def cancel_stop(self, stop: VenueStop) -> None:
        """Cancel it; one already gone (triggered, canceled) is not an error."""
        ...

    async def stops_since(self, symbol: str, since: datetime) -> list[VenueStop]:
        """Our stop orders on `symbol` touched since `since`, open or not: a triggered one
        names the market order it became (`fill_order_id`)."""
        ...

    async def watch_prices(self, symbols: list[str], kind: str) -> dict[str, Decimal]:
        """The next prices the venue's market streams push for `symbols` (websockets): returns
        when there is an update."""
        ...

    async def available_balance(self) -> Decimal | None:
        """What the account can still put into new positions, in the quote currency (USDT),
        for signals sized by `position_size_pct`; None if unknown."""
        ...

    async def execute(self, intent: OrderIntent, not_after: datetime | None = None) -> Fill:
        """Place the order and return its fill. Raises OrderRejected (final) or
        OrderUncertain (look the client order id up later before placing it again). No
        request for it leaves after `not_after` (then: OrderUncertain)."""
        ...

    async def find_order(self, client_order_id: ClientOrderId, symbol: str) -> Fill | None:
        """The fill of our order with this client order id, or None if the venue has none."""
        ...

    async def positions(self) -> dict[PositionKey, VenuePosition]:
        """The venue's open positions by key (quantity > 0)."""
        ...

    async def orders_since(self, symbol: str, since: datetime) -> list[VenueOrder]:
        """Filled orders on `symbol` since `since`, ours and others (manual, liquidation)."""
        ...

    async def close(self) -> None: ...
