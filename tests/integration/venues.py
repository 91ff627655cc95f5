"""The venues scenario suites run on: the paper venue, and ccxt against the Binance USD-M emulator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from engine.adapters.embedded_nats import free_port
from engine.emulator.binanceusdm import Exchange, serve

VENUES = ["paper", "binanceusdm"]


@dataclass
class Emulator:
    """A Binance USD-M emulator served from this test's event loop on a free loopback port."""

    exchange: Exchange
    url: str

    def venue_settings(self) -> dict[str, object]:
        return {
            "EXCHANGE": "binanceusdm",
            "EXCHANGE_API_URL": self.url,
            "EXCHANGE_API_KEY": self.exchange.api_key,
            "EXCHANGE_API_SECRET": self.exchange.secret,
            "SET_POSITION_MODE": True,
            "ORDER_TIMEOUT_SECONDS": 2,
            "RECONCILE_INTERVAL_SECONDS": 0,
            "EXCHANGE_RATE_LIMIT_MS": 1,
            "EXCHANGE_RECV_WINDOW_MS": 1000,
            "ORDER_SEND_SPAN_SECONDS": 4,
        }


@asynccontextmanager
async def running_emulator() -> AsyncIterator[Emulator]:
    exchange = Exchange()
    port = free_port()
    runner = await serve("127.0.0.1", port, exchange)
    try:
        yield Emulator(exchange, f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


@asynccontextmanager
async def venue_called(name: str) -> AsyncIterator[Emulator | None]:
    """None for the paper venue, else a running emulator."""
    if name == "paper":
        yield None
        return
    async with running_emulator() as running:
        yield running
