"""ccxt against the Binance USD-M emulator: faults, final rejections, crashes around an order,
and reconciliation of changes the worker did not make. Real NATS, real MariaDB, real HTTP."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest
from prometheus_client import REGISTRY

from engine.adapters.embedded_nats import EmbeddedNats
from engine.adapters.gateway import ExchangeGateway, OrderUncertain
from engine.adapters.paper import PaperExchange
from engine.app.worker import Worker
from engine.domain.events import PositionFunding, PositionReconciled
from engine.domain.model import ClientOrderId, CloseReason, OrderSide, Outcome, PositionSide
from engine.domain.orders import Fill, OrderIntent
from engine.emulator.binanceusdm import Fault
from tests.integration.harness import Pipeline, eventually
from tests.integration.venues import Emulator

D = Decimal
pytestmark = pytest.mark.integration


@pytest.fixture
async def on_emulator(
    nats_server: EmbeddedNats, mysql_url: str, emulator: Emulator
) -> AsyncIterator[Pipeline]:
    async with Pipeline(
        nats_server.url, mysql_url, emulator.exchange, **emulator.venue_settings()
    ) as running:
        yield running


def buy_eth(tag: str) -> OrderIntent:
    """0.1 ETH LONG at 3000 under client order id "te" + tag x 8 (34 chars, like ours)."""
    return OrderIntent(
        ClientOrderId("te" + tag * 8),
        "ETHUSDT",
        OrderSide.BUY,
        D("0.1"),
        PositionSide.LONG,
        False,
        (),
        D("3000"),
    )


def orders_sent(emulator: Emulator) -> int:
    return emulator.exchange.request_count["POST /fapi/v1/order"]


@pytest.mark.parametrize(
    "kind", ["stall", "http_5xx", "http_5xx_empty", "http_429", "drop_before", "drop_after"]
)
async def test_an_order_hit_by_a_venue_fault_is_executed_exactly_once(
    on_emulator: Pipeline, emulator: Emulator, kind: str
) -> None:
    await on_emulator.tick("BTCUSDT", "45000")
    emulator.exchange.faults.append(Fault(kind, seconds=3.0))  # stall: past the 2 s client timeout
    sid = await on_emulator.publish(
        "s1", "BTCUSDT", "buy", quantity="0.01", confidence=0.9, take_profit_pct=0.01
    )
    decision = await on_emulator.decision(sid, timeout=20)
    assert (decision.outcome, decision.reason_code) == (Outcome.ACCEPTED, "accepted")
    assert len(emulator.exchange.orders) == 1 and not emulator.exchange.state()["duplicate_client_ids"]
    (opened,) = on_emulator.opened()
    assert (opened.quantity, opened.entry_price) == (D("0.01"), D("45000"))
    assert opened.fee == D("0.18")  # from the venue's trade (0.04 %), not ccxt's static rate
    # committed-then-lost answers are looked up, never re-sent; refusals are re-sent
    assert orders_sent(emulator) == (1 if kind in ("stall", "drop_after") else 2)
    await on_emulator.tick("BTCUSDT", "45450")  # the TP still works on the venue
    await on_emulator.wait_events(lambda _: len(on_emulator.closed()) == 1, "TP close")
    assert emulator.exchange.state()["positions"] == {}


async def test_a_venue_rejection_is_final_and_carries_the_venues_message(
    on_emulator: Pipeline, emulator: Emulator
) -> None:
    await on_emulator.tick("BTCUSDT", "45000")
    emulator.exchange.wallet = Decimal("1000")  # 1 BTC at 20x needs 2,250 of margin
    sid = await on_emulator.publish("s1", "BTCUSDT", "buy", quantity="1", confidence=0.9)
    decision = await on_emulator.decision(sid)
    assert (decision.outcome, decision.reason_code) == (Outcome.REJECTED, "insufficient_margin")
    assert decision.reason == "venue: Margin is insufficient. (code -2019)"
    assert orders_sent(emulator) == 1 and not emulator.exchange.orders
    await on_emulator.mysql_caught_up()
    rows = await on_emulator.query("SELECT reason_code FROM signal_decisions WHERE signal_id = %s", sid)
    assert rows == [{"reason_code": "insufficient_margin"}]


async def test_reconciliation_books_manual_reductions_liquidations_and_external_positions(
    on_emulator: Pipeline, emulator: Emulator
) -> None:
    wallet_before = emulator.exchange.wallet
    await on_emulator.tick("ETHUSDT", "3000")
    for strategy, qty in (("a", "0.1"), ("b", "0.3")):
        await on_emulator.decision(
            await on_emulator.publish(strategy, "ETHUSDT", "buy", quantity=qty, confidence=0.9)
        )
    worker = on_emulator.worker
    assert worker is not None
    await on_emulator.tick("ETHUSDT", "3100")
    emulator.exchange.by_hand("ETHUSDT", "LONG", "SELL", D("0.2"), liquidation=False)  # someone on the web UI
    await worker.reconcile_all()
    await on_emulator.wait_events(lambda _: len(on_emulator.closed()) == 2, "manual closes")
    manual = on_emulator.closed()
    assert {(e.strategy_id, e.closed_quantity, e.close_reason) for e in manual} == {
        ("a", D("0.05"), CloseReason.MANUAL),
        ("b", D("0.15"), CloseReason.MANUAL),
    }  # pro rata, at the venue's fill price
    assert all(e.exit_price == D("3100") for e in manual)

    await on_emulator.tick("ETHUSDT", "2000")
    emulator.exchange.liquidate("ETHUSDT", "LONG")
    emulator.exchange.by_hand("ETHUSDT", "SHORT", "SELL", D("0.5"), liquidation=False)
    await worker.reconcile_all()
    await on_emulator.wait_events(lambda _: len(on_emulator.opened()) == 3, "liquidation and external")
    liquidated = [e for e in on_emulator.closed() if e.close_reason is CloseReason.LIQUIDATION]
    assert {(e.strategy_id, e.closed_quantity, e.exit_price) for e in liquidated} == {
        ("a", D("0.05"), D("2000")),
        ("b", D("0.15"), D("2000")),
    }
    (external,) = [e for e in on_emulator.opened() if e.strategy_id == "external"]
    assert (external.side.value, external.quantity, external.entry_price) == ("SHORT", D("0.5"), D("2000"))
    findings = [e for e in on_emulator.events if isinstance(e, PositionReconciled)]
    assert [(f.kind, f.side.value, f.book_quantity, f.venue_quantity) for f in findings] == [
        ("manual_reduction", "LONG", D("0.4"), D("0.2")),
        ("liquidation", "LONG", D("0.2"), D("0")),
        ("external_increase", "SHORT", D("0"), D("0.5")),
    ]
    await worker.reconcile_all()  # nothing left to find
    await on_emulator.mysql_caught_up()
    assert len(on_emulator.closed()) == 4 and len(on_emulator.opened()) == 3
    reasons = await on_emulator.query(
        "SELECT close_reason, COUNT(*) AS n FROM position_closes GROUP BY close_reason ORDER BY close_reason"
    )
    assert [(r["close_reason"], r["n"]) for r in reasons] == [("liquidation", 2), ("manual", 2)]

    # Every fee booked is the commission the venue charged (0.04 %, not ccxt's static rate),
    # for fills we did not place too.
    assert all(e.exit_fee == e.closed_quantity * e.exit_price * D("0.0004") for e in on_emulator.closed())
    assert external.fee == D("0.5") * D("2000") * D("0.0004")
    # Flat to flat, the strategies' net PnL is the venue's realized PnL minus its commissions:
    # the emulator's own wallet says so.
    await on_emulator.tick("ETHUSDT", "1900")
    emulator.exchange.by_hand("ETHUSDT", "SHORT", "BUY", D("0.5"), liquidation=False)
    await worker.reconcile_all()
    await on_emulator.wait_events(lambda _: len(on_emulator.closed()) == 5, "the external close")
    assert emulator.exchange.state()["positions"] == {} and not worker.book.positions
    net = sum((e.realized_pnl for e in on_emulator.closed()), D(0))
    assert net == emulator.exchange.wallet - wallet_before, (net, emulator.exchange.wallet - wallet_before)


class Crash(BaseException):
    """Stands for the process dying: nothing after it runs, not even `except Exception`."""


class CrashingGateway:
    """Delegates to the real gateway but dies before or after the venue took the order."""

    def __init__(self, real: ExchangeGateway, after_sending: bool) -> None:
        self.real, self.after_sending = real, after_sending
        self.name = real.name

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)

    async def execute(self, intent: OrderIntent, not_after: datetime | None = None) -> Fill:
        if self.after_sending:
            await self.real.execute(intent, not_after)
        raise Crash


@pytest.mark.parametrize("after_sending", [True, False], ids=["after-sending", "before-sending"])
async def test_a_crash_around_an_order_neither_loses_nor_doubles_it(
    on_emulator: Pipeline, emulator: Emulator, after_sending: bool
) -> None:
    await on_emulator.tick("ETHUSDT", "3000")
    worker = on_emulator.worker
    assert worker is not None and on_emulator.worker_task is not None
    worker.gateway = CrashingGateway(worker.gateway, after_sending)  # type: ignore[assignment]
    # The signal carries its price: the restarted worker has seen no tick yet.
    sid = await on_emulator.publish("s1", "ETHUSDT", "buy", quantity="0.1", confidence=0.9, price="3000")
    with pytest.raises(Crash):
        await on_emulator.worker_task
    assert len(emulator.exchange.orders) == (1 if after_sending else 0)
    assert not on_emulator.opened() and not on_emulator.decisions()  # nothing but the journal was stored
    on_emulator.worker_task = None
    await on_emulator.stop_worker()
    restarted: Worker = await on_emulator.start_worker()
    decision = await on_emulator.decision(sid)
    assert decision.outcome is Outcome.ACCEPTED
    assert decision.reason_code == ("accepted_after_lookup" if after_sending else "accepted")
    assert len(emulator.exchange.orders) == 1 and not emulator.exchange.state()["duplicate_client_ids"]
    (opened,) = on_emulator.opened()
    assert opened.quantity == D("0.1") and restarted.book.exchange
    assert not restarted.journal.pending


async def test_the_gateway_never_leaves_the_configured_host(on_emulator: Pipeline) -> None:
    gateway = on_emulator.gateway
    assert gateway is not None
    with pytest.raises(PermissionError, match=r"only 127\.0\.0\.1"):
        await gateway.exchange.fetch("https://fapi.binance.com/fapi/v1/time")  # type: ignore[attr-defined]


async def test_a_venue_in_the_wrong_position_mode_stops_start_up_clearly(
    nats_server: EmbeddedNats, mysql_url: str, emulator: Emulator
) -> None:
    settings = emulator.venue_settings() | {"SET_POSITION_MODE": False}
    pipeline = Pipeline(nats_server.url, mysql_url, emulator.exchange, **settings)
    with pytest.raises(RuntimeError, match=r"one-way mode but POSITION_MODE=hedge.*SET_POSITION_MODE=true"):
        async with pipeline:
            pass


async def test_a_reversal_whose_open_is_refused_reports_the_closes_it_made(
    nats_server: EmbeddedNats, mysql_url: str, emulator: Emulator
) -> None:
    settings = emulator.venue_settings() | {"POSITION_MODE_AWARE_CONFLICTS": False}
    async with Pipeline(nats_server.url, mysql_url, emulator.exchange, **settings) as pipeline:
        await pipeline.tick("ETHUSDT", "3000")
        short = await pipeline.decision(
            await pipeline.publish("a", "ETHUSDT", "sell", quantity="0.1", confidence=0.7)
        )
        emulator.exchange.wallet = Decimal("1000")
        refused = await pipeline.decision(
            await pipeline.publish("b", "ETHUSDT", "buy", quantity="10", confidence=0.9)  # 1,500 margin
        )
        assert (refused.outcome, refused.reason_code) == (Outcome.REJECTED, "insufficient_margin")
        assert refused.reason.endswith("the 1 opposite position(s) had already been closed (reversed)")
        assert refused.strategy_position_ids == short.strategy_position_ids
        await pipeline.wait_events(lambda _: len(pipeline.closed()) == 1, "the reversal's close")
        assert pipeline.closed()[0].close_reason is CloseReason.REVERSED
        assert emulator.exchange.state()["positions"] == {}


async def test_a_client_order_id_the_venue_calls_duplicated_is_looked_up_not_placed_again(
    on_emulator: Pipeline, emulator: Emulator
) -> None:
    """-4116 means the venue holds an order with our id: its fill is ours, nothing is re-sent."""
    gateway = on_emulator.gateway
    assert gateway is not None
    emulator.exchange.strict_client_ids = True
    intent = buy_eth("4116")
    first = await gateway.execute(intent)
    again = await gateway.execute(intent)
    assert again == first and len(emulator.exchange.orders) == 1
    assert orders_sent(emulator) == 2  # the second send was refused with -4116, then looked up


class VenueGoesDark:
    """Delegates to the real gateway; while `dark`, an order is sent but its answer is lost
    and lookups fail, as when the venue stops answering right after taking an order."""

    def __init__(self, real: ExchangeGateway) -> None:
        self.real, self.name, self.dark, self.lost_answers = real, real.name, False, 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)

    async def execute(self, intent: OrderIntent, not_after: datetime | None = None) -> Fill:
        fill = await self.real.execute(intent, not_after)
        if self.dark:
            self.lost_answers += 1
            raise OrderUncertain("no answer")
        return fill

    async def find_order(self, client_order_id: ClientOrderId, symbol: str) -> Fill | None:
        if self.dark:
            raise ConnectionError("venue unreachable")
        return await self.real.find_order(client_order_id, symbol)


@pytest.fixture
def dark_venue(on_emulator: Pipeline) -> tuple[Worker, VenueGoesDark]:
    """The running worker, its gateway wrapped so that the venue can go dark."""
    worker = on_emulator.worker
    assert worker is not None
    venue = VenueGoesDark(worker.gateway)
    worker.gateway = venue  # type: ignore[assignment]
    return worker, venue


async def test_nothing_acts_on_a_symbol_while_an_order_of_it_has_an_unknown_outcome(
    on_emulator: Pipeline, emulator: Emulator, dark_venue: tuple[Worker, VenueGoesDark]
) -> None:
    worker, venue = dark_venue
    await on_emulator.tick("ETHUSDT", "3000")
    a = await on_emulator.publish("a", "ETHUSDT", "buy", quantity="0.1", confidence=0.9, take_profit=3100)
    await on_emulator.decision(a)
    venue.dark = True
    await on_emulator.tick("ETHUSDT", "3100")  # the TP close is sent; its answer is lost
    await eventually(lambda: venue.lost_answers == 1, what="the TP close sent, its answer lost")
    close = await on_emulator.publish("a", "ETHUSDT", "close", confidence=0.9)
    refused = await on_emulator.decision(close)
    assert (refused.outcome, refused.reason_code) == (Outcome.REJECTED, "venue_uncertain")
    assert len(emulator.exchange.orders) == 2  # the open and the TP close: nothing closed twice

    venue.dark = False
    await worker.resolve_pending()  # the reconciliation round, which does not wait out the cooldown
    later = await on_emulator.publish("b", "ETHUSDT", "buy", quantity="0.2", confidence=0.9)
    assert (await on_emulator.decision(later)).outcome is Outcome.ACCEPTED
    (tp,) = on_emulator.closed()
    assert (tp.strategy_id, tp.close_reason, tp.closed_quantity) == ("a", CloseReason.TAKE_PROFIT, D("0.1"))
    assert emulator.exchange.state()["positions"] == {"ETHUSDT_LONG": "0.2"}
    assert not worker.journal.pending


class CrashOnSecondClose:
    def __init__(self, real: ExchangeGateway) -> None:
        self.real, self.name, self.closes = real, real.name, 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)

    async def execute(self, intent: OrderIntent, not_after: datetime | None = None) -> Fill:
        if intent.reduce_only:
            self.closes += 1
            if self.closes == 2:
                raise Crash
        return await self.real.execute(intent, not_after)


async def test_a_close_signal_cut_short_by_a_crash_closes_only_what_is_left(
    on_emulator: Pipeline, emulator: Emulator
) -> None:
    """Its closes span both keys (one order each); the crash falls before the second order."""
    await on_emulator.tick("ETHUSDT", "3000")
    for action in ("buy", "sell"):
        await on_emulator.decision(
            await on_emulator.publish("a", "ETHUSDT", action, quantity="0.1", confidence=0.9)
        )
    worker = on_emulator.worker
    assert worker is not None and on_emulator.worker_task is not None
    worker.gateway = CrashOnSecondClose(worker.gateway)  # type: ignore[assignment]
    close = await on_emulator.publish("a", "ETHUSDT", "close", quantity="0.15", confidence=0.9, price="3000")
    with pytest.raises(Crash):
        await on_emulator.worker_task
    on_emulator.worker_task = None
    await on_emulator.stop_worker()
    await on_emulator.start_worker()
    decision = await on_emulator.decision(close)
    assert decision.outcome is Outcome.ACCEPTED
    await on_emulator.wait_events(lambda _: len(on_emulator.closed()) == 2, "both closes")
    assert [(e.side, e.closed_quantity) for e in on_emulator.closed()] == [
        (PositionSide.LONG, D("0.1")),
        (PositionSide.SHORT, D("0.05")),
    ]
    assert emulator.exchange.state()["positions"] == {"ETHUSDT_SHORT": "-0.05"}  # Binance signs shorts


async def test_a_symbol_waiting_on_the_venue_does_not_hold_up_another_symbols_ticks(
    on_emulator: Pipeline, emulator: Emulator
) -> None:
    await on_emulator.tick("ETHUSDT", "3000")
    await on_emulator.tick("BTCUSDT", "45000")
    eth = await on_emulator.publish("a", "ETHUSDT", "buy", quantity="0.1", confidence=0.9, take_profit=3100)
    await on_emulator.decision(eth)
    emulator.exchange.faults.append(Fault("stall", seconds=3.0))  # the next order's answer comes late
    btc = await on_emulator.publish("b", "BTCUSDT", "buy", quantity="0.01", confidence=0.9)
    await eventually(
        lambda: emulator.exchange.request_count["POST /fapi/v1/order"] == 2, what="BTC order sent"
    )
    await on_emulator.tick("ETHUSDT", "3100")  # while BTC waits on the venue
    await on_emulator.wait_events(lambda _: len(on_emulator.closed()) == 1, "ETH TP close")
    await on_emulator.decision(btc, timeout=20)
    order = [e.event_id for e in on_emulator.events]
    tp_close = on_emulator.closed()[0]
    btc_decision = next(d for d in on_emulator.decisions() if d.signal_id == btc)
    assert order.index(tp_close.event_id) < order.index(btc_decision.event_id)


async def test_a_signal_whose_order_outcome_is_unknown_is_decided_when_the_lookup_tells(
    on_emulator: Pipeline, emulator: Emulator, dark_venue: tuple[Worker, VenueGoesDark]
) -> None:
    worker, venue = dark_venue
    await on_emulator.tick("ETHUSDT", "3000")
    venue.dark = True
    sid = await on_emulator.publish("a", "ETHUSDT", "buy", quantity="0.1", confidence=0.9)
    await eventually(lambda: venue.lost_answers == 1, what="the open sent, its answer lost")
    assert not on_emulator.decisions()  # held back, not guessed
    venue.dark = False
    await worker.resolve_pending()
    decision = await on_emulator.decision(sid)
    assert (decision.outcome, decision.reason_code) == (Outcome.ACCEPTED, "accepted_after_lookup")
    (opened,) = on_emulator.opened()
    assert decision.strategy_position_ids == [opened.strategy_position_id]
    assert len(on_emulator.decisions()) == 1 and len(emulator.exchange.orders) == 1


async def test_lookups_that_fail_prove_nothing_and_nothing_is_sent_again(emulator: Emulator) -> None:
    from engine.adapters.ccxt_gateway import CcxtGateway, RetryPolicy
    from engine.domain.model import PositionMode

    gateway = CcxtGateway(
        "binanceusdm", PositionMode.HEDGE, emulator.exchange.api_key, emulator.exchange.secret,
        api_url=emulator.url, set_position_mode=True, timeout=1.0, rate_limit_ms=1,
        policy=RetryPolicy(backoff=0.05, recv_window=0.5, fill_wait=0.5),
    )  # fmt: skip
    try:
        await gateway.start()
        emulator.exchange.faults.append(Fault("drop_after"))  # placed, answer lost
        emulator.exchange.faults.append(Fault("http_5xx", method="GET", path="/fapi/v1/order", times=1000))
        intent = buy_eth("0bad")
        with pytest.raises(OrderUncertain):
            await gateway.execute(intent)
        assert len(emulator.exchange.orders) == 1 and orders_sent(emulator) == 1
    finally:
        await gateway.close()


async def test_slices_closing_together_go_in_orders_no_larger_than_the_venue_allows(
    on_emulator: Pipeline, emulator: Emulator
) -> None:
    eth = emulator.exchange.markets["ETHUSDT"]
    emulator.exchange.markets["ETHUSDT"] = dataclasses.replace(eth, max_market_qty=D("0.25"))
    await on_emulator.stop_worker()
    await on_emulator.start_worker()  # markets are read at start
    await on_emulator.tick("ETHUSDT", "3000")
    for strategy in ("a", "b", "c"):
        await on_emulator.decision(
            await on_emulator.publish(
                strategy, "ETHUSDT", "buy", quantity="0.1", confidence=0.9, take_profit=3100
            )
        )
    posts = emulator.exchange.request_count["POST /fapi/v1/order"]
    await on_emulator.tick("ETHUSDT", "3100")  # all three TPs: 0.3 in all, at most 0.25 an order
    await on_emulator.wait_events(lambda _: len(on_emulator.closed()) == 3, "three TP closes")
    assert emulator.exchange.request_count["POST /fapi/v1/order"] - posts == 2  # 0.2 and 0.1, no refusal
    assert len({e.client_order_id for e in on_emulator.closed()}) == 2
    assert emulator.exchange.state()["positions"] == {}


async def test_an_open_above_the_venues_order_limit_goes_as_parts_each_exactly_once(
    on_emulator: Pipeline, emulator: Emulator
) -> None:
    """0.6 ETH where the venue takes at most 0.25 a market order: three parts of 0.2, each its
    own client id, one strategy position; the second part's answer is lost on the way back
    and is looked up, not sent again; the close goes in parts too; flat to flat, the
    strategy's PnL is the venue's own figure."""
    eth = emulator.exchange.markets["ETHUSDT"]
    emulator.exchange.markets["ETHUSDT"] = dataclasses.replace(eth, max_market_qty=D("0.25"))
    await on_emulator.stop_worker()
    await on_emulator.start_worker()  # markets are read at start
    await on_emulator.tick("ETHUSDT", "3000")
    wallet_before = emulator.exchange.wallet
    emulator.exchange.faults.append(Fault("drop_after", after=1))  # the second part: placed, answer lost
    decision = await on_emulator.decision(
        await on_emulator.publish("big", "ETHUSDT", "buy", quantity="0.6", confidence=0.9), timeout=30
    )
    assert decision.outcome is Outcome.ACCEPTED, decision
    (opened,) = on_emulator.opened()
    assert opened.quantity == D("0.6") and len(opened.exchange_order_id.split(",")) == 3
    ids = sorted(str(o["clientOrderId"]) for o in emulator.exchange.orders.values())
    assert ids == [f"{opened.client_order_id}.{n}" for n in "012"]
    assert emulator.exchange.state()["duplicate_client_ids"] == {}
    assert emulator.exchange.state()["positions"] == {"ETHUSDT_LONG": "0.6"}
    await on_emulator.tick("ETHUSDT", "3030")
    close = await on_emulator.decision(await on_emulator.publish("big", "ETHUSDT", "close"))
    assert close.outcome is Outcome.ACCEPTED, close
    (closed,) = on_emulator.closed()
    assert closed.closed_quantity == D("0.6") and len(closed.exchange_order_id.split(",")) == 3
    assert emulator.exchange.state()["positions"] == {}
    assert closed.realized_pnl == emulator.exchange.wallet - wallet_before


def test_parts_are_even_on_the_step_and_within_the_limit() -> None:
    from engine.domain.orders import order_parts

    assert order_parts(D("0.6"), D("0.25"), D("0.001")) == [D("0.2")] * 3
    assert order_parts(D("0.101"), D("0.05"), D("0.001")) == [D("0.034"), D("0.034"), D("0.033")]
    assert order_parts(D("0.05"), D("0.05"), D("0.001")) == [D("0.05")]
    assert order_parts(D("7"), None, D("1")) == [D("7")]


async def test_a_signal_sized_by_a_share_of_the_balance_asks_the_venue(
    on_emulator: Pipeline, emulator: Emulator
) -> None:
    """The original system's strategies send `position_size_pct`, a fraction of the available
    balance: the worker asks the venue for it (ccxt fetch_balance)."""
    await on_emulator.tick("ETHUSDT", "3000")
    emulator.exchange.wallet = Decimal("30000")
    sid = await on_emulator.publish("s1", "ETHUSDT", "buy", confidence=0.9, position_size_pct="0.1")
    decision = await on_emulator.decision(sid)
    assert decision.outcome is Outcome.ACCEPTED, decision
    (opened,) = on_emulator.opened()
    assert opened.quantity == D("1")  # 10 % of 30,000 at 3,000


async def test_leverage_and_margin_type_are_set_before_trading_and_the_venues_clock_is_used(
    nats_server: EmbeddedNats, mysql_url: str, emulator: Emulator
) -> None:
    """LEVERAGE / MARGIN_TYPE (and per symbol) are set and checked before a symbol's first
    order; a venue whose clock runs 1.5 s behind ours still takes every signed request."""
    emulator.exchange.clock_offset_ms = -1500  # our stamps would be "in the future" (-1021)
    settings = emulator.venue_settings() | {
        "LEVERAGE": 5,
        "MARGIN_TYPE": "isolated",
        "LEVERAGE_BY_SYMBOL": "BTCUSDT=10",
    }
    async with Pipeline(nats_server.url, mysql_url, emulator.exchange, **settings) as pipeline:
        assert emulator.exchange.leverage == {"BTCUSDT": 10}  # configured by name: at start
        assert emulator.exchange.margin_type == {"BTCUSDT": "ISOLATED"}
        await pipeline.tick("ETHUSDT", "3000")
        sid = await pipeline.publish("s1", "ETHUSDT", "buy", quantity="0.1", confidence=0.9)
        assert (await pipeline.decision(sid)).outcome is Outcome.ACCEPTED
        assert emulator.exchange.leverage == {"BTCUSDT": 10, "ETHUSDT": 5}
        assert emulator.exchange.margin_type == {"BTCUSDT": "ISOLATED", "ETHUSDT": "ISOLATED"}
        offset = REGISTRY.get_sample_value("tradeengine_venue_clock_offset_seconds", {"venue": "binanceusdm"})
        assert offset is not None and 1.3 < offset < 1.8, offset
        # A setting the venue refuses stops that symbol's orders, not the worker.
        emulator.exchange.positions.clear()
        emulator.exchange.by_hand("SOLUSDT", "LONG", "BUY", D("1"), liquidation=False)  # cross, by hand
        refused = await pipeline.decision(
            await pipeline.publish("s1", "SOLUSDT", "buy", quantity="1", confidence=0.9, price="150")
        )
        assert (refused.outcome, refused.reason_code) == (Outcome.REJECTED, "account_settings_refused")
        assert "Margin type cannot be changed" in refused.reason


async def test_the_venues_own_prices_fire_tp_without_anyone_publishing_ticks(
    nats_server: EmbeddedNats, mysql_url: str, emulator: Emulator
) -> None:
    """PRICE_FEED (poll, on by default on a ccxt venue): the worker reads the venue's prices for
    the symbols it holds and publishes them as ticks; nobody else publishes a tick here."""
    settings = emulator.venue_settings() | {"PRICE_POLL_SECONDS": 0.2}
    async with Pipeline(nats_server.url, mysql_url, emulator.exchange, **settings) as pipeline:
        emulator.exchange.prices["ETHUSDT"] = D("3000")
        sid = await pipeline.publish(
            "s1", "ETHUSDT", "buy", quantity="0.1", confidence=0.9, price="3000", take_profit_pct="0.01"
        )
        assert (await pipeline.decision(sid)).outcome is Outcome.ACCEPTED
        worker = pipeline.worker
        assert worker is not None and worker.price_feed is not None
        await eventually(
            lambda: worker.last_prices.get("ETHUSDT") == D("3000") or None, what="the feed's tick"
        )
        moved_at = time.monotonic()
        emulator.exchange.prices["ETHUSDT"] = D("3031")  # through the TP at 3030
        await pipeline.wait_events(lambda _: len(pipeline.closed()) == 1, "the TP close")
        latency = time.monotonic() - moved_at
        (closed,) = pipeline.closed()
        assert closed.close_reason is CloseReason.TAKE_PROFIT and closed.exit_price == D("3031")
        assert worker.details()["price_feed_fresh"] is True
        print(f"price feed: venue price move to TP close {latency * 1000:.0f} ms (poll every 200 ms)")


async def test_the_last_price_survives_a_restart(pipeline: Pipeline) -> None:
    """A restarted worker knows each symbol's last price at once (NATS KV), so a signal without
    its own price is decided instead of rejected `no_price`; TP/SL wait for a new tick."""
    await pipeline.tick("ETHUSDT", "3000")
    worker = pipeline.worker
    assert worker is not None
    await eventually(
        lambda: (worker.prices.price_store is not None and not worker.prices.background) or None,
        what="the price stored",
    )
    await pipeline.stop_worker()
    restarted = await pipeline.start_worker()
    assert restarted.last_prices.get("ETHUSDT") == D("3000")
    sid = await pipeline.publish("s1", "ETHUSDT", "buy", quantity="0.1", confidence=0.9)  # no price
    decision = await pipeline.decision(sid)
    assert decision.outcome is Outcome.ACCEPTED, decision


async def test_funding_is_attributed_to_the_strategies_and_closes_the_books(
    on_emulator: Pipeline, emulator: Emulator
) -> None:
    """The venue pays funding on ETHUSDT: each strategy gets its share (position.funding), MySQL
    shows it, and flat to flat the strategies' trades plus funding equal the wallet's change."""
    wallet_before = emulator.exchange.wallet
    await on_emulator.tick("ETHUSDT", "3000")
    for strategy, action, qty in (("a", "buy", "0.1"), ("b", "buy", "0.3"), ("c", "sell", "0.2")):
        await on_emulator.decision(
            await on_emulator.publish(strategy, "ETHUSDT", action, quantity=qty, confidence=0.9)
        )
    worker = on_emulator.worker
    assert worker is not None
    emulator.exchange.pay_funding("ETHUSDT", D("0.0001"))
    # c closes and d opens before the worker polls: the payment is still c's, never d's.
    await on_emulator.decision(await on_emulator.publish("c", "ETHUSDT", "close", confidence=0.9))
    await on_emulator.decision(
        await on_emulator.publish("d", "ETHUSDT", "sell", quantity="0.5", confidence=0.9)
    )
    await worker.book_funding()
    await worker.book_funding()  # nothing new: each payment is attributed once
    funded = [e for e in on_emulator.events if isinstance(e, PositionFunding)]
    assert {(e.strategy_id, e.amount) for e in funded} == {
        ("a", D("-0.03")),
        ("b", D("-0.09")),
        ("c", D("0.06")),
    }
    assert all(e.rate == D("0.0001") and e.mark_price == D("3000") for e in funded)
    await on_emulator.mysql_caught_up()
    rows = await on_emulator.query(
        "SELECT strategy_id, total_funding, net_pnl - total_pnl AS funding_in_net FROM strategy_performance"
        " ORDER BY strategy_id"
    )
    assert [(r["strategy_id"], r["total_funding"], r["funding_in_net"]) for r in rows] == [
        ("a", D("-0.03"), D("-0.03")),
        ("b", D("-0.09"), D("-0.09")),
        ("c", D("0.06"), D("0.06")),
        ("d", D("0"), D("0")),
    ]
    fees = await on_emulator.query("SELECT strategy_id, funding_fees FROM strategy_fees ORDER BY strategy_id")
    assert [r["funding_fees"] for r in fees] == [D("0.03"), D("0.09"), D("-0.06"), D("0")]

    await on_emulator.tick("ETHUSDT", "3050")
    for strategy in ("a", "b", "d"):
        await on_emulator.decision(await on_emulator.publish(strategy, "ETHUSDT", "close", confidence=0.9))
    assert emulator.exchange.state()["positions"] == {}
    trades = sum((e.realized_pnl for e in on_emulator.closed()), D(0))
    assert trades + sum((e.amount for e in funded), D(0)) == emulator.exchange.wallet - wallet_before


def open_algos(emulator: Emulator) -> list[dict[str, object]]:
    return [a for a in emulator.exchange.algo_orders.values() if a["algoStatus"] == "NEW"]


async def test_a_protective_stop_follows_the_worst_stop_loss_of_the_key(
    on_emulator: Pipeline, emulator: Emulator
) -> None:
    """One reduce-side STOP_MARKET per exchange position, through the Algo Order API: placed
    with the first slice, moved (new first, then the old cancelled) when a slice with a wider
    stop-loss joins, cancelled when the key is flat."""
    await on_emulator.tick("ETHUSDT", "3000")
    await on_emulator.decision(
        await on_emulator.publish("a", "ETHUSDT", "buy", quantity="0.1", confidence=0.9, stop_loss="2900")
    )
    await eventually(lambda: len(open_algos(emulator)) == 1 or None, what="the stop placed")
    (stop,) = open_algos(emulator)
    assert (stop["side"], stop["positionSide"], stop["type"] if "type" in stop else stop["orderType"]) == (
        "SELL", "LONG", "STOP_MARKET",
    )  # fmt: skip
    assert (stop["triggerPrice"], stop["quantity"]) == ("2900", "0.1")
    assert str(stop["clientAlgoId"]).startswith("ts") and len(str(stop["clientAlgoId"])) == 34

    await on_emulator.decision(
        await on_emulator.publish("b", "ETHUSDT", "buy", quantity="0.3", confidence=0.9, stop_loss="2850")
    )
    await eventually(
        lambda: (
            [(a["triggerPrice"], a["quantity"]) for a in open_algos(emulator)] == [("2850", "0.4")] or None
        ),
        what="the stop moved to the worst stop-loss, for the whole position",
    )
    for strategy in ("a", "b"):
        await on_emulator.decision(await on_emulator.publish(strategy, "ETHUSDT", "close", confidence=0.9))
    await eventually(lambda: not open_algos(emulator) or None, what="the stop cancelled")
    assert emulator.exchange.request_count["POST /fapi/v1/order"] == 4  # the stops never went there


async def test_a_worker_down_while_the_price_runs_through_the_stop_restarts_flat_and_attributed(
    on_emulator: Pipeline, emulator: Emulator
) -> None:
    await on_emulator.tick("ETHUSDT", "3000")
    for strategy, qty, sl in (("a", "0.1", "2900"), ("b", "0.3", "2850")):
        await on_emulator.decision(
            await on_emulator.publish(strategy, "ETHUSDT", "buy", quantity=qty, confidence=0.9, stop_loss=sl)
        )
    await eventually(
        lambda: [a["triggerPrice"] for a in open_algos(emulator)] == ["2850"] or None, what="stop"
    )
    await on_emulator.stop_worker()  # nobody watches the ticks now
    emulator.exchange.set_price("ETHUSDT", D("2840"))  # through every stop-loss and the venue's stop
    assert emulator.exchange.state()["positions"] == {}  # the venue closed it
    await on_emulator.start_worker()
    await on_emulator.wait_events(lambda _: len(on_emulator.closed()) == 2, "the stop's closes booked")
    closes = {e.strategy_id: e for e in on_emulator.closed()}
    assert {s: (e.close_reason, e.closed_quantity, e.exit_price) for s, e in closes.items()} == {
        "a": (CloseReason.STOP_LOSS, D("0.1"), D("2840")),
        "b": (CloseReason.STOP_LOSS, D("0.3"), D("2840")),
    }
    assert sum((e.exit_fee for e in closes.values()), D(0)) == D("0.4") * D("2840") * D("0.0004")
    findings = [e for e in on_emulator.events if isinstance(e, PositionReconciled)]
    assert [f.kind for f in findings] == ["protective_stop"]
    worker = on_emulator.worker
    assert worker is not None and not worker.book.positions


async def test_the_venues_market_streams_fire_tp_through_websockets(
    nats_server: EmbeddedNats, mysql_url: str, emulator: Emulator
) -> None:
    """PRICE_FEED=stream: the worker subscribes to the venue's market streams (ccxt.pro; the
    emulator serves Binance's raw stream endpoint, moved by EXCHANGE_WS_URL) and publishes what
    they push as ticks."""
    ws_url = emulator.url.replace("http://", "ws://") + "/ws"
    settings = emulator.venue_settings() | {"PRICE_FEED": "stream", "EXCHANGE_WS_URL": ws_url}
    async with Pipeline(nats_server.url, mysql_url, emulator.exchange, **settings) as pipeline:
        emulator.exchange.set_price("ETHUSDT", D("3000"))
        sid = await pipeline.publish(
            "s1", "ETHUSDT", "buy", quantity="0.1", confidence=0.9, price="3000", take_profit_pct="0.01"
        )
        assert (await pipeline.decision(sid)).outcome is Outcome.ACCEPTED
        worker = pipeline.worker
        assert worker is not None
        await eventually(lambda: emulator.exchange.streams or None, what="the worker subscribed")
        moved_at = time.monotonic()
        emulator.exchange.set_price("ETHUSDT", D("3031"))  # through the TP at 3030
        await pipeline.wait_events(lambda _: len(pipeline.closed()) == 1, "the TP close")
        latency = time.monotonic() - moved_at
        (closed,) = pipeline.closed()
        assert closed.close_reason is CloseReason.TAKE_PROFIT and closed.exit_price == D("3031")
        assert worker.details()["price_feed_fresh"] is True
        assert emulator.exchange.request_count.get("GET /fapi/v2/ticker/price", 0) == 0  # no polling
        print(f"stream feed: venue price move to TP close {latency * 1000:.0f} ms")


async def test_the_paper_venue_triggers_protective_stops_as_the_venue_does(make_pipeline: Any) -> None:
    """PROTECTIVE_STOPS=on with the paper venue: its stop at 5 % below the entry (the slice has
    no stop-loss of its own) triggers on a tick through it, and reconciliation books the fill
    to the slice as a stop-loss with the venue's fee."""
    async with make_pipeline(
        PROTECTIVE_STOPS="on", PROTECTIVE_STOP_PCT="0.05", RECONCILE_INTERVAL_SECONDS="0.2"
    ) as pipeline:
        await pipeline.tick("BTCUSDT", "45000")
        sid = await pipeline.publish("naked", "BTCUSDT", "buy", quantity="0.01", confidence=0.9)
        assert (await pipeline.decision(sid)).outcome is Outcome.ACCEPTED
        paper = pipeline.gateway
        assert isinstance(paper, PaperExchange)
        stop = await eventually(
            lambda: next(iter(paper.stops.values()), None), what="the protective stop placed"
        )
        assert stop.trigger == D("42750") and stop.quantity == D("0.01")
        await pipeline.tick("BTCUSDT", "42000")
        await pipeline.wait_events(lambda _: len(pipeline.closed()) == 1, "the stop's fill booked")
        (closed,) = pipeline.closed()
        assert (closed.close_reason, closed.exit_price, closed.closed_quantity) == (
            CloseReason.STOP_LOSS, D("42000"), D("0.01"),
        )  # fmt: skip
        assert closed.exit_fee == D("0.01") * D("42000") * paper.taker_fee
        assert paper.position("BTCUSDT", PositionSide.LONG) == 0
