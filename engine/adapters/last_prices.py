"""The last price of each symbol, kept in NATS KV (`tradeengine_prices`) so a restarted worker
has a reference price and a freshness for every symbol at once, instead of none until the next
tick (a signal without its own price would be rejected `no_price` meanwhile)."""

from __future__ import annotations

import json
import time
from decimal import Decimal

import structlog
from nats.js.client import JetStreamContext
from nats.js.errors import NoKeysError
from nats.js.kv import KeyValue

from engine.adapters.leases import open_bucket

log = structlog.get_logger(__name__)
PRICES_BUCKET = "tradeengine_prices"
WRITE_EVERY = 5.0  # seconds between writes of one symbol's price: a restart needs a recent one, not each


class LastPrices:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self._written_at: dict[str, float] = {}

    @classmethod
    async def open(cls, js: JetStreamContext, max_age_days: float = 7.0, replicas: int = 1) -> LastPrices:
        return cls(await open_bucket(js, PRICES_BUCKET, max_age_days * 86_400.0, replicas))

    def due(self, symbol: str, now: float) -> bool:
        """Whether this symbol's price should be written now (and, if so, mark it written)."""
        if now - self._written_at.get(symbol, 0.0) < WRITE_EVERY:
            return False
        self._written_at[symbol] = now
        return True

    async def write(self, symbol: str, price: Decimal, at: float) -> None:
        await self.kv.put(symbol, json.dumps({"price": str(price), "at": at}).encode())

    async def read_all(self) -> dict[str, tuple[Decimal, float]]:
        """symbol -> (price, its age in seconds)."""
        try:
            keys = await self.kv.keys()
        except NoKeysError:
            return {}
        found: dict[str, tuple[Decimal, float]] = {}
        for key in keys:
            try:
                entry = await self.kv.get(key)
                fields = json.loads(entry.value or b"")
                price = Decimal(str(fields["price"]))
                age = max(time.time() - float(fields["at"]), 0.0)
            except Exception as exc:  # one bad entry must not cost the others
                log.warning("prices.unreadable", symbol=key, error=repr(exc)[:200])
                continue
            if price.is_finite() and price > 0:
                found[key] = (price, age)
        return found
