"""The port every exchange adapter implements."""

from __future__ import annotations

from decimal import Decimal
from typing import Protocol

from engine.domain.model import ClientOrderId, Market
from engine.domain.orders import Fill, OrderIntent


class OrderRejected(Exception):
    """The venue refused the order for good; `reason_code` feeds the decision."""

    def __init__(self, reason_code: str, message: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class ExchangeGateway(Protocol):
    name: str

    def market(self, symbol: str) -> Market | None: ...

    def on_price(self, symbol: str, price: Decimal) -> None: ...

    async def execute(self, intent: OrderIntent) -> Fill:
        """Place the order (idempotent per client order id) and return its fill."""
        ...

    async def find_order(self, client_order_id: ClientOrderId) -> Fill | None: ...

    async def close(self) -> None: ...
