"""The worker's fold of its own events: what a crash between two publishes must not undo."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from engine.adapters.paper import PaperExchange
from engine.app.worker import Worker
from engine.config import load_settings
from engine.domain.events import SignalDecided
from engine.domain.model import Action, CloseReason, Outcome, SameDirectionPolicy
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


async def test_a_decision_stored_before_its_open_does_not_hide_the_open_on_replay() -> None:
    """An order whose outcome was unknown: its open may be stored after a decision."""
    h = Harness()
    await h.tick("ETHUSDT", "3000")
    await h.signal("s", "ETHUSDT", "buy", quantity="0.1", confidence="0.9", signal_id="o1")
    (opened,) = h.events
    decided = SignalDecided(
        event_id="d1", occurred_at=NOW, signal_id="o1", strategy_id="s", symbol="ETHUSDT", action=Action.BUY,
        outcome=Outcome.REJECTED, reason_code="venue_uncertain", reason="old worker", signal_sequence=1,
    )  # fmt: skip
    worker = fresh_worker()
    for event in (decided, opened):
        worker._remember(event, replay=True)
    assert len(worker.book.positions) == 1


async def test_only_a_close_signals_own_closes_shorten_its_redelivery() -> None:
    h = Harness(same_direction=SameDirectionPolicy.ACCUMULATE, aware=False)
    await h.tick("ETHUSDT", "3000")
    await h.signal("s", "ETHUSDT", "buy", quantity="0.3", confidence="0.7", signal_id="o1")
    await h.signal("s", "ETHUSDT", "sell", quantity="0.5", confidence="0.9", signal_id="r1")  # reverses o1
    reversed_close = next(e for e in h.events if getattr(e, "close_reason", None) is CloseReason.REVERSED)
    worker = fresh_worker()
    for event in h.events:
        if event is reversed_close or (event.type == "position.opened" and event.signal_id == "o1"):
            worker._remember(event, replay=True)  # the crash fell before r1's open was stored
    assert worker.ledger.closed_for("s", "r1") is None  # a reversal's close is not a close signal's
    await worker.on_signal(
        make_signal("s", "ETHUSDT", "sell", quantity="0.5", confidence="0.9", signal_id="r1"), 9
    )
    opened = [e for e in worker._outbox if e.type == "position.opened"]
    assert [str(e.quantity) for e in opened] == ["0.5"]  # the whole open, not 0.5 - 0.3


async def test_log_lines_about_a_signal_carry_its_ids() -> None:
    from types import SimpleNamespace

    from engine.logs import SIGNAL_CONTEXT, merge_signal_context

    worker = fresh_worker()
    seen: list[dict[str, Any]] = []

    async def on_signal(signal: Any, sequence: int) -> None:
        seen.append(merge_signal_context(None, "info", {"event": "x"}))  # type: ignore[arg-type]

    worker.signals.on_signal = on_signal  # type: ignore[method-assign]
    msg = SimpleNamespace(
        subject="signals.s.ETHUSDT",
        data=b'{"strategy_id": "s", "symbol": "ETHUSDT", "action": "sell", "quantity": 1, "signal_id": "x1"}',
        reply="$JS.ACK.SIGNALS.tradeengine-worker.1.3.3.0.0",
        headers=None,
    )
    await worker.on_signal_message(msg)  # type: ignore[arg-type]
    assert seen == [
        {"event": "x", "signal_id": "x1", "strategy_id": "s", "symbol": "ETHUSDT", "side": "SHORT"}
    ]
    assert SIGNAL_CONTEXT.get() is None  # nothing leaks into the next signal's lines


async def test_a_newer_tick_never_lands_before_an_older_one_still_in_flight() -> None:
    import asyncio
    from types import SimpleNamespace

    def tick(price: str) -> Any:
        return SimpleNamespace(
            subject="prices.BTCUSDT", data=f'{{"symbol":"BTCUSDT","price":"{price}"}}'.encode()
        )

    worker = fresh_worker()
    lock = worker.locks["BTCUSDT"]
    await lock.acquire()  # a signal on the symbol is being decided
    await worker.on_price_message(tick("100"))  # queued behind it
    for _ in range(100):  # until its runner has taken it off the queue to wait for the lock
        if not worker.prices.ticks["BTCUSDT"]:
            break
        await asyncio.sleep(0)
    assert not worker.prices.ticks["BTCUSDT"] and "BTCUSDT" not in worker.last_prices
    lock.release()
    await worker.on_price_message(tick("101"))  # arrives before the runner resumes
    await asyncio.gather(*worker.prices.tick_runners.values())
    assert worker.last_prices["BTCUSDT"] == Decimal("101")
    assert worker.gateway.last_prices["BTCUSDT"] == Decimal("101")  # type: ignore[attr-defined]


async def test_slices_the_venue_refuses_to_close_together_are_closed_one_by_one() -> None:
    from engine.domain.model import PositionSide

    h = Harness()
    await h.tick("ETHUSDT", "3000")
    await h.signal(
        "a", "ETHUSDT", "buy", quantity="0.1", confidence="0.9", take_profit="3100", signal_id="o1"
    )
    await h.signal(
        "b", "ETHUSDT", "buy", quantity="0.2", confidence="0.9", take_profit="3100", signal_id="o2"
    )
    worker = fresh_worker()
    for event in h.events:
        worker._remember(event, replay=True)
    paper: PaperExchange = worker.gateway  # type: ignore[assignment]
    paper.restore(worker.book)
    paper.holdings[("ETHUSDT", PositionSide.LONG)].quantity = Decimal("0.15")  # someone closed 0.15 by hand

    class Bus:
        async def publish_events(self, events: Any) -> None:
            return None

    worker.bus = Bus()  # type: ignore[assignment]
    await worker.on_price("ETHUSDT", Decimal("3100"))  # both TPs: 0.3 together exceeds the venue's 0.15
    remaining = {sp.strategy_id: sp for sp in worker.book.positions.values()}
    assert set(remaining) == {"b"}  # a's 0.1 fitted on its own; b's 0.2 does not
    assert worker.book.triggers.is_armed(remaining["b"].id)  # b keeps its TP for the next tick
    assert paper.position("ETHUSDT", PositionSide.LONG) == Decimal("0.05")
