"""What the worker's parts share, as a port: the runner (`Worker`) provides it. A part asks it
for the settings, the venue, the clock and the state, takes a symbol's lock, and hands it the
events it makes; the runner owns storing them, acks, leases and tasks."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from engine.adapters.gateway import ExchangeGateway
    from engine.adapters.nats_bus import NatsBus
    from engine.app.protective_stops import ProtectiveStops
    from engine.config import Settings
    from engine.domain.events import Event
    from engine.domain.state import EngineState


class Runtime(Protocol):
    settings: Settings
    gateway: ExchangeGateway
    bus: NatsBus
    clock: Callable[[], datetime]
    state: EngineState
    journaled: bool  # real venues journal every order before sending it (DESIGN §4.3)
    stops: ProtectiveStops | None
    locks: defaultdict[str, asyncio.Lock]  # per symbol: one order or tick at a time
    last_prices: dict[str, Decimal]
    price_seen_at: dict[str, float]  # monotonic time of each symbol's last price
    stopping: asyncio.Event
    wake_reconcile: asyncio.Event

    def emit(self, event: Event) -> None:
        """Queue an event for storing, in order."""

    def remember(self, event: Event, replay: bool = False) -> None:
        """Fold an event into the state (and count it)."""

    async def flush(self) -> None:
        """Store every queued event."""

    def flush_soon(self) -> None:
        """Store the queued events in the background."""

    def check_lease(self) -> None:
        """Raise unless this worker may still place and store."""
