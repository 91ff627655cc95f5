"""Reconciliation, the order journal and the venue error policy: pure code, exhaustively."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import ccxt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.adapters.ccxt_gateway import classify, reason_code, rewrite_urls, venue_message
from engine.domain.events import PositionClosed, PositionOpened
from engine.domain.journal import OrderJournal, intent_of
from engine.domain.model import CloseReason, OrderSide, PositionKey, PositionSide
from engine.domain.orders import Fill
from engine.domain.reconcile import (
    EXTERNAL_STRATEGY,
    ExternalCloseAttribution,
    FindingKind,
    VenueOrder,
    VenuePosition,
    allocate,
    reconcile,
)
from tests.helpers import NOW, Harness

D = Decimal
ETH_LONG = PositionKey("ETHUSDT", PositionSide.LONG)
RULES = list(ExternalCloseAttribution)


async def three_slices() -> Harness:
    """LONG ETH: a 0.1 @ 3000, b 0.2 @ 3030, c 0.3 @ 3060 (opened in that order)."""
    h = Harness()
    for strategy, qty, price in (("a", "0.1", "3000"), ("b", "0.2", "3030"), ("c", "0.3", "3060")):
        await h.tick("ETHUSDT", price)
        await h.signal(strategy, "ETHUSDT", "buy", quantity=qty, confidence="0.8")
    return h


def venue_order(
    side: OrderSide, qty: str, price: str, *, liquidation: bool = False, cid: str = "web_1"
) -> VenueOrder:
    return VenueOrder(
        cid, "9001", "ETHUSDT", side, PositionSide.LONG, D(qty), D(price), D("0.01"), liquidation, NOW
    )


def settle_findings(h: Harness, findings: list) -> list[PositionOpened | PositionClosed]:  # type: ignore[type-arg]
    events = []
    for finding in findings:
        for intent, fill in finding.settlements:
            events.extend(h.book.settle(intent, fill, NOW))
    return events


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (ExternalCloseAttribution.FIFO, {"a": D("0.1"), "b": D("0.2"), "c": D("0.03")}),
        (ExternalCloseAttribution.LIFO, {"c": D("0.3"), "b": D("0.03")}),
        (ExternalCloseAttribution.PRO_RATA, {"a": D("0.055"), "b": D("0.11"), "c": D("0.165")}),
    ],
)
async def test_a_manual_reduction_is_attributed_by_the_configured_rule(
    rule: ExternalCloseAttribution, expected: dict[str, Decimal]
) -> None:
    h = await three_slices()
    venue = {ETH_LONG: VenuePosition(ETH_LONG, D("0.27"), D("3040"))}
    sold = venue_order(OrderSide.SELL, "0.33", "3100")
    (finding,) = reconcile(h.book, "ETHUSDT", venue, [sold], h.paper.market("ETHUSDT"), rule, None)  # type: ignore[arg-type]
    assert finding.kind is FindingKind.MANUAL_REDUCTION
    events = settle_findings(h, [finding])
    closed = {e.strategy_id: e.closed_quantity for e in events if isinstance(e, PositionClosed)}
    assert closed == expected
    assert all(isinstance(e, PositionClosed) and e.close_reason is CloseReason.MANUAL for e in events)
    assert all(e.exit_price == D("3100") for e in events if isinstance(e, PositionClosed))
    assert h.book.exchange[ETH_LONG].quantity == D("0.27")
    assert sum(e.exit_fee for e in events if isinstance(e, PositionClosed)) == D("0.01")


async def test_a_liquidation_closes_every_slice_at_the_liquidation_price() -> None:
    h = await three_slices()
    liquidated = venue_order(OrderSide.SELL, "0.6", "2500", liquidation=True, cid="autoclose-1")
    findings = reconcile(h.book, "ETHUSDT", {}, [liquidated], h.paper.market("ETHUSDT"), RULES[0], None)  # type: ignore[arg-type]
    assert [f.kind for f in findings] == [FindingKind.LIQUIDATION]
    events = settle_findings(h, findings)
    assert {e.strategy_id for e in events} == {"a", "b", "c"}
    assert all(isinstance(e, PositionClosed) and e.close_reason is CloseReason.LIQUIDATION for e in events)
    assert all(isinstance(e, PositionClosed) and e.exit_price == D("2500") for e in events)
    assert ETH_LONG not in h.book.exchange and not h.book.positions


async def test_an_unexplained_increase_becomes_a_position_of_strategy_external() -> None:
    h = await three_slices()
    venue = {ETH_LONG: VenuePosition(ETH_LONG, D("0.8"), D("3070"))}
    bought = venue_order(OrderSide.BUY, "0.2", "3100")
    (finding,) = reconcile(h.book, "ETHUSDT", venue, [bought], h.paper.market("ETHUSDT"), RULES[0], None)  # type: ignore[arg-type]
    assert finding.kind is FindingKind.EXTERNAL_INCREASE
    (opened,) = settle_findings(h, [finding])
    assert isinstance(opened, PositionOpened)
    assert (opened.strategy_id, opened.quantity, opened.entry_price) == (
        EXTERNAL_STRATEGY,
        D("0.2"),
        D("3100"),
    )
    assert opened.take_profit_price is None and opened.stop_loss_price is None
    assert h.book.exchange[ETH_LONG].quantity == D("0.8")


async def test_without_venue_orders_the_increase_is_priced_so_costs_add_up() -> None:
    h = await three_slices()  # book cost 0.1*3000 + 0.2*3030 + 0.3*3060 = 1824
    venue = {ETH_LONG: VenuePosition(ETH_LONG, D("0.7"), D("3060"))}  # venue cost 2142
    (finding,) = reconcile(h.book, "ETHUSDT", venue, [], h.paper.market("ETHUSDT"), RULES[0], None)  # type: ignore[arg-type]
    (opened,) = settle_findings(h, [finding])
    assert isinstance(opened, PositionOpened) and opened.entry_price == D("3180")


async def test_our_own_orders_and_matching_books_find_nothing() -> None:
    h = await three_slices()
    venue = {ETH_LONG: VenuePosition(ETH_LONG, D("0.6"), D("3040"))}
    ours = venue_order(OrderSide.SELL, "0.1", "3100", cid="te0123")
    assert reconcile(h.book, "ETHUSDT", venue, [ours], h.paper.market("ETHUSDT"), RULES[0], None) == []  # type: ignore[arg-type]


@given(
    remaining=st.lists(st.integers(1, 10_000), min_size=1, max_size=12),
    take=st.integers(0, 200_000),
    rule=st.sampled_from(RULES),
)
def test_allocation_is_exact_and_never_exceeds_a_slice(
    remaining: list[int], take: int, rule: ExternalCloseAttribution
) -> None:
    slices = [D(r).scaleb(-3) for r in remaining]
    quantity = D(take).scaleb(-3)
    shares = allocate(quantity, slices, rule, D("0.001"))
    assert sum(shares) == min(quantity, sum(slices))
    assert all(D(0) <= s <= r for s, r in zip(shares, slices, strict=True))
    assert all(s % D("0.001") == 0 for s in shares)


async def test_the_journal_knows_which_orders_need_a_lookup_and_what_is_left_to_book() -> None:
    h = Harness()
    await h.tick("ETHUSDT", "3000")
    await h.signal("a", "ETHUSDT", "buy", quantity="0.1", confidence="0.8")
    await h.signal("b", "ETHUSDT", "sell", quantity="0.1", confidence="0.8")
    from engine.domain.decide import close_intent

    long_sp = next(sp for sp in h.book.positions.values() if sp.side is PositionSide.LONG)
    intent = close_intent(long_sp, long_sp.remaining, CloseReason.TAKE_PROFIT, D("3100"), None)
    journal = OrderJournal()
    submitted = journal.submit(intent, NOW)
    assert list(journal.pending) == [intent.client_order_id]
    assert intent_of(submitted) == intent  # what a restart needs to settle the fill
    fill = Fill(intent.client_order_id, "1", D("0.1"), D("3100"), D("0.155"))
    assert journal.unbooked_part(intent, fill) == (intent, fill)
    for event in h.book.settle(intent, fill, NOW):
        journal.apply(event)
    assert journal.unbooked_part(intent, fill) is None  # the crash fell after the events
    journal.settled(intent, fill, NOW)
    assert not journal.pending
    failed = journal.failed(intent, "not_placed", "gone", NOW)
    assert not journal.pending and failed.event_id != submitted.event_id
    again = journal.submit(intent, NOW + timedelta(seconds=1))  # an id never filled may go again
    assert again.event_id != submitted.event_id  # a second submission is its own record
    assert journal.failed(intent, "x", "y", NOW).event_id != failed.event_id


async def test_a_multi_leg_close_cut_short_by_a_crash_books_the_rest_of_the_fee_exactly() -> None:
    from engine.domain.decide import closes_by_key

    h = Harness()
    await h.tick("ETHUSDT", "3000")
    await h.signal("a", "ETHUSDT", "buy", quantity="0.1", confidence="0.8")
    await h.signal("b", "ETHUSDT", "buy", quantity="0.2", confidence="0.8")
    first, second = h.book.positions.values()
    (intent,) = closes_by_key(
        [
            (first, first.remaining, CloseReason.TAKE_PROFIT),
            (second, second.remaining, CloseReason.TAKE_PROFIT),
        ],
        D("3100"),
        None,
    )
    journal = OrderJournal()
    journal.submit(intent, NOW)
    fill = Fill(intent.client_order_id, "1", D("0.3"), D("3100"), D("1"))  # a fee that splits in thirds
    stored, _lost = h.book.settle(intent, fill, NOW)  # the crash fell between the two close events
    journal.apply(stored)
    rest = journal.unbooked_part(intent, fill)
    assert rest is not None
    rest_intent, rest_fill = rest
    assert [leg.position_id for leg in rest_intent.legs] == [second.id]
    assert rest_fill.quantity == D("0.2")
    assert isinstance(stored, PositionClosed)
    assert stored.exit_fee + rest_fill.fee == fill.fee  # to the last digit


@pytest.mark.parametrize(
    ("exc", "kind", "code"),
    [
        (
            ccxt.InsufficientFunds('binanceusdm {"code":-2019,"msg":"Margin is insufficient."}'),
            "final",
            "insufficient_margin",
        ),
        (
            ccxt.ExchangeError(
                'binanceusdm {"code":-4164,"msg":"Order\'s notional must be no smaller than 5"}'
            ),
            "final",
            "below_min_notional",
        ),
        (
            ccxt.OperationRejected('binanceusdm {"code":-4061,"msg":"side"}'),
            "final",
            "position_side_mismatch",
        ),
        (ccxt.BadRequest('binanceusdm {"code":-1106,"msg":"reduceonly"}'), "final", "parameter_not_required"),
        (ccxt.BadSymbol("binanceusdm does not have market symbol FOO"), "final", "venue_bad_symbol"),
        (
            ccxt.AuthenticationError('binanceusdm {"code":-1022,"msg":"Signature"}'),
            "final",
            "venue_code_1022",
        ),
        (
            ccxt.InvalidOrder('binanceusdm {"code":-4116,"msg":"ClientOrderId is duplicated."}'),
            "ambiguous",
            None,
        ),
        (ccxt.RateLimitExceeded("429"), "retry", None),
        (ccxt.DDoSProtection('binanceusdm 429 {"code":-1003,"msg":"Too many"}'), "retry", None),
        (ccxt.InvalidNonce('{"code":-1021,"msg":"ahead"}'), "retry", None),
        (ccxt.RequestTimeout("POST timed out"), "ambiguous", None),
        (ccxt.ExchangeNotAvailable("502 Bad Gateway"), "ambiguous", None),
        (ccxt.OperationFailed('binanceusdm {"code":-1000,"msg":"unknown"}'), "ambiguous", None),
        (ccxt.ExchangeError("connection reset"), "ambiguous", None),
    ],
)
def test_venue_errors_are_classified_by_what_they_mean_for_the_order(
    exc: Exception, kind: str, code: str | None
) -> None:
    assert classify(exc) == kind
    if code is not None:
        assert reason_code(exc) == code


def test_venue_message_and_url_rewrite() -> None:
    assert venue_message(
        ccxt.InsufficientFunds('binanceusdm {"code":-2019,"msg":"Margin is insufficient."}')
    ) == ("venue: Margin is insufficient. (code -2019)")
    urls = {"fapiPrivate": "https://fapi.binance.com/fapi/v1", "nested": {"x": "https://a.b/c?d=1"}, "n": 3}
    assert rewrite_urls(urls, "http://127.0.0.1:8099") == {
        "fapiPrivate": "http://127.0.0.1:8099/fapi/v1",
        "nested": {"x": "http://127.0.0.1:8099/c?d=1"},
        "n": 3,
    }


def test_venue_orders_know_whose_they_are_and_which_way_they_move() -> None:
    sold = venue_order(OrderSide.SELL, "1", "1")
    assert not sold.ours and sold.moves(ETH_LONG, reducing=True) and not sold.moves(ETH_LONG, reducing=False)
    assert venue_order(OrderSide.BUY, "1", "1", cid="te00").ours
    assert datetime(2026, 1, 1, tzinfo=UTC) < sold.at
