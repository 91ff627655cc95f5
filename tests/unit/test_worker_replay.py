"""The worker's fold of its own events: what a crash between two publishes must not undo."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from engine.adapters.paper import PaperExchange
from engine.app.worker import Worker
from engine.config import load_settings
from engine.domain.events import SignalDecided
from tests.helpers import NOW, Harness, make_signal


def fresh_worker() -> Worker:
    worker = Worker(load_settings(), bus=None, gateway=PaperExchange(), clock=lambda: NOW)  # type: ignore[arg-type]
    worker.last_prices["ETHUSDT"] = Decimal("3000")
    return worker


async def history() -> Harness:
    h = Harness()
    await h.tick("ETHUSDT", "3000")
    await h.signal("s", "ETHUSDT", "buy", quantity="0.3", confidence="0.9", signal_id="o1")
    await h.signal("s", "ETHUSDT", "close", quantity="0.1", signal_id="c1")
    return h


async def test_close_stored_but_decision_lost_is_not_closed_again() -> None:
    h = await history()
    worker = fresh_worker()
    for event in h.events:  # the open, its decision is irrelevant here, and c1's close: no c1 decision
        worker._remember(event, replay=True)
    await worker.on_signal(make_signal("s", "ETHUSDT", "close", quantity="0.1", signal_id="c1"), 7)
    (decided,) = worker._outbox
    assert isinstance(decided, SignalDecided) and decided.reason_code == "recovered"
    (sp,) = worker.book.positions.values()
    assert str(sp.remaining) == "0.2"
    assert worker.gateway.orders == {}  # type: ignore[attr-defined]


async def test_an_open_stored_again_after_its_close_does_not_reopen() -> None:
    h = Harness()
    await h.tick("ETHUSDT", "3000")
    await h.signal("s", "ETHUSDT", "buy", quantity="0.1", confidence="0.9", signal_id="o1")
    await h.signal("s", "ETHUSDT", "close", signal_id="c1")
    opened, closed = h.events
    worker = fresh_worker()
    replayed: list[Any] = [opened, closed, opened]
    for event in replayed:
        worker._remember(event, replay=True)
    assert not worker.book.positions and not worker.book.exchange
