"""Funding split over the strategies that held the position (issue #14): known answers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from engine.adapters.paper import PaperExchange
from engine.domain.funding import UNATTRIBUTED, SliceAt, SliceHistory, VenueFunding, split_funding
from engine.domain.model import PositionSide
from tests.helpers import Harness

D = Decimal
AT = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def open_now(h: Harness) -> list[SliceAt]:
    return SliceHistory().open_at(h.book, "ETHUSDT", AT)


async def book_with(*slices: tuple[str, str, str]) -> Harness:
    h = Harness()
    await h.tick("ETHUSDT", "3000")
    for strategy, action, qty in slices:
        await h.signal(strategy, "ETHUSDT", action, quantity=qty, confidence="0.9")
    return h


async def test_one_side_is_split_pro_rata_to_quantity() -> None:
    h = await book_with(("a", "buy", "0.1"), ("b", "buy", "0.3"))
    payment = VenueFunding("v:1", "ETHUSDT", D("-0.12"), AT, D("0.0001"), D("3000"))
    events = split_funding(payment, open_now(h), AT)
    assert {e.strategy_id: e.amount for e in events} == {"a": D("-0.03"), "b": D("-0.09")}
    assert all(e.side is PositionSide.LONG and e.funding_time == AT for e in events)
    assert len({e.event_id for e in events}) == 2


async def test_both_sides_get_what_the_rate_says_and_the_residual_by_size() -> None:
    h = await book_with(("a", "buy", "0.1"), ("b", "buy", "0.3"), ("c", "sell", "0.2"))
    # longs 0.4 pay 0.12, the short 0.2 receives 0.06: the venue's net on the symbol is -0.06
    payment = VenueFunding("v:2", "ETHUSDT", D("-0.06"), AT, D("0.0001"), D("3000"))
    events = {e.strategy_id: e.amount for e in split_funding(payment, open_now(h), AT)}
    assert events == {"a": D("-0.03"), "b": D("-0.09"), "c": D("0.06")}
    assert sum(events.values()) == D("-0.06")
    # the venue booked 0.018 more than the rate says: spread over the sides by size
    off = {e.strategy_id: e.amount for e in split_funding(
        VenueFunding("v:3", "ETHUSDT", D("-0.042"), AT, D("0.0001"), D("3000")), open_now(h), AT)}  # fmt: skip
    assert sum(off.values()) == D("-0.042")
    assert off["c"] == D("0.066")  # a third of the residual: its expected share is 0.06 of 0.18


async def test_a_payment_the_venue_names_the_side_of_goes_to_that_side() -> None:
    h = await book_with(("a", "buy", "0.1"), ("c", "sell", "0.2"))
    payment = VenueFunding("v:4", "ETHUSDT", D("0.06"), AT, D("0.0001"), D("3000"), PositionSide.SHORT)
    (event,) = split_funding(payment, open_now(h), AT)
    assert (event.strategy_id, event.amount) == ("c", D("0.06"))


async def test_nothing_open_books_it_to_external_so_the_books_stay_whole() -> None:
    h = await book_with()
    (event,) = split_funding(VenueFunding("v:5", "ETHUSDT", D("-1"), AT), open_now(h), AT)
    assert (event.strategy_id, event.strategy_position_id, event.amount) == (
        "external",
        UNATTRIBUTED,
        D("-1"),
    )


@pytest.mark.parametrize("rate", [D("0.0001"), D("-0.0003")])
async def test_the_paper_venue_pays_funding_every_eight_hours_once(rate: Decimal) -> None:
    paper = PaperExchange(funding_rate=rate)
    h = Harness()
    h.paper = paper
    await h.tick("ETHUSDT", "3000")
    await h.signal("a", "ETHUSDT", "buy", quantity="1", confidence="0.9")
    since = datetime.now(UTC) - timedelta(hours=16, minutes=1)
    first = await paper.funding_since("ETHUSDT", since)
    assert len(first) == 2 and all(f.amount == -rate * 3000 and f.side is PositionSide.LONG for f in first)
    again = await paper.funding_since("ETHUSDT", since)
    assert again == first and paper.funding_received == -rate * 3000 * 2  # made once, listed again


async def test_funding_is_split_over_the_slices_open_at_its_time_not_now() -> None:
    """a held 0.1 at the funding time; since then b opened and a closed: the payment is a's."""
    h = Harness()
    history = SliceHistory()
    await h.tick("ETHUSDT", "3000")
    h.now = AT - timedelta(hours=1)
    await h.signal("a", "ETHUSDT", "buy", quantity="0.1", confidence="0.9")
    h.now = AT + timedelta(seconds=20)
    await h.signal("b", "ETHUSDT", "buy", quantity="0.3", confidence="0.9")
    await h.signal("a", "ETHUSDT", "close", confidence="0.9")
    for event in h.events:
        history.record(event, AT)
    held = history.open_at(h.book, "ETHUSDT", AT)
    assert [(s.strategy_id, s.remaining) for s in held] == [("a", D("0.1"))]
    (event,) = split_funding(VenueFunding("v:6", "ETHUSDT", D("-0.03"), AT, D("0.0001"), D("3000")), held, AT)
    assert (event.strategy_id, event.amount) == ("a", D("-0.03"))
    assert [(s.strategy_id, s.remaining) for s in history.open_at(h.book, "ETHUSDT", h.now)] == [
        ("b", D("0.3"))
    ]


class MemoryBus:
    """Keeps what the worker publishes."""

    def __init__(self) -> None:
        self.events: list[object] = []
        self.on_reconnect: list[object] = []

    async def publish_events(self, events: list[object]) -> None:
        self.events.extend(events)


async def test_a_payment_stored_only_in_part_before_a_crash_is_completed_not_doubled() -> None:
    from engine.app.worker import Worker
    from engine.config import load_settings
    from engine.domain.events import PositionFunding

    at = datetime.now(UTC) - timedelta(minutes=30)
    h = Harness()
    h.now = at - timedelta(hours=1)
    await h.tick("ETHUSDT", "3000")
    await h.signal("a", "ETHUSDT", "buy", quantity="0.1", confidence="0.9")
    await h.signal("b", "ETHUSDT", "buy", quantity="0.3", confidence="0.9")
    payment = VenueFunding("v:7", "ETHUSDT", D("-0.12"), at, D("0.0001"), D("3000"))

    class Venue(PaperExchange):
        async def funding_since(self, symbol: str, since: datetime) -> list[VenueFunding]:
            return [payment] if symbol == "ETHUSDT" and since <= at else []

    bus = MemoryBus()
    worker = Worker(load_settings(), bus, Venue())  # type: ignore[arg-type]
    parts = split_funding(payment, SliceHistory().open_at(h.book, "ETHUSDT", at), at)
    assert [p.parts for p in parts] == [2, 2]
    for event in [*h.events, parts[0]]:  # the crash stored a's part only
        worker._remember(event, replay=True)  # type: ignore[arg-type]
    await worker.book_funding()
    booked = [e for e in bus.events if isinstance(e, PositionFunding)]
    assert [(e.strategy_id, e.amount, e.event_id) for e in booked] == [("b", D("-0.09"), parts[1].event_id)]
    await worker.book_funding()  # complete now: nothing more
    assert len([e for e in bus.events if isinstance(e, PositionFunding)]) == 1
