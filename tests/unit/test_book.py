"""Position book and PnL attribution: hand-computed cases and property-based invariants."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from engine.domain.book import PositionBook
from engine.domain.events import PositionOpened
from engine.domain.model import ZERO, CloseReason, PositionKey, PositionMode, PositionSide
from tests.helpers import Harness

D = Decimal
ETH_LONG = PositionKey("ETHUSDT", PositionSide.LONG)


async def test_example_2_momentum_tp_closes_only_its_slice() -> None:
    h = Harness()
    await h.tick("ETHUSDT", "3000")
    await h.signal("momentum_v1", "ETHUSDT", "buy", quantity="0.1", confidence="0.8", take_profit_pct="0.05")
    await h.tick("ETHUSDT", "3030")
    await h.signal("breakout_v1", "ETHUSDT", "buy", quantity="0.2", confidence="0.7")
    momentum, breakout = h.opened()
    assert momentum.take_profit_price == D("3150.00") and momentum.fee == D("0.15")
    assert breakout.exchange_position.quantity_after == D("0.3")
    assert breakout.exchange_position.avg_entry_price == D("3020")
    assert breakout.contribution.sequence == 2
    assert breakout.exchange_position.exchange_position_id == momentum.exchange_position.exchange_position_id

    assert await h.tick("ETHUSDT", "3149.99") == []
    (closed,) = await h.tick("ETHUSDT", "3150")
    assert closed.strategy_id == "momentum_v1" and closed.close_reason is CloseReason.TAKE_PROFIT
    assert closed.closed_quantity == D("0.1") and closed.remaining_quantity == 0
    assert closed.gross_pnl == D("15.000")  # (3150 - 3000) * 0.1
    assert closed.entry_fee_share == D("0.15")
    assert closed.exit_fee == D("0.157500")  # 0.1 * 3150 * 0.0005
    assert closed.realized_pnl == D("14.6925")
    assert closed.exchange_position.quantity_after == D("0.2")
    assert closed.exchange_position.avg_entry_price == D("3030")
    assert [sp.strategy_id for sp in h.book.open_on(ETH_LONG)] == ["breakout_v1"]
    assert h.paper.position("ETHUSDT", PositionSide.LONG) == D("0.2")


async def test_partial_closes_accumulate_and_fee_shares_add_up_exactly() -> None:
    h = Harness()
    await h.tick("ETHUSDT", "3000")
    await h.signal("s", "ETHUSDT", "buy", quantity="0.3", confidence="0.9")
    entry_fee = h.opened()[0].fee
    await h.tick("ETHUSDT", "3100")
    await h.signal("s", "ETHUSDT", "close", quantity="0.1", signal_id="c1")
    await h.tick("ETHUSDT", "2900")
    await h.signal("s", "ETHUSDT", "close", quantity="0.1", signal_id="c2")
    await h.signal("s", "ETHUSDT", "close", signal_id="c3")
    closes = h.closed()
    assert [c.remaining_quantity for c in closes] == [D("0.2"), D("0.1"), D("0")]
    assert sum((c.entry_fee_share for c in closes), ZERO) == entry_fee
    assert [c.gross_pnl for c in closes] == [D("10.0"), D("-10.0"), D("-10.0")]
    assert not h.book.positions and not h.book.exchange
    assert len({c.event_id for c in closes}) == 3


async def test_short_pnl_and_stop_loss() -> None:
    h = Harness()
    await h.tick("BTCUSDT", "50000")
    await h.signal(
        "s", "BTCUSDT", "sell", quantity="0.01", confidence="0.9", stop_loss_pct="0.02", take_profit="45000"
    )
    (opened,) = h.opened()
    assert (opened.take_profit_price, opened.stop_loss_price) == (D("45000"), D("51000.0"))
    assert await h.tick("BTCUSDT", "50999.9") == []
    (closed,) = await h.tick("BTCUSDT", "51200")
    assert closed.close_reason is CloseReason.STOP_LOSS
    assert closed.gross_pnl == D("-12.000")  # (50000 - 51200) * 0.01


async def test_replay_rebuilds_the_same_book() -> None:
    h = Harness()
    await h.tick("ETHUSDT", "3000")
    await h.signal("a", "ETHUSDT", "buy", quantity="0.1", confidence="0.8", take_profit="3100")
    await h.signal("b", "ETHUSDT", "sell", quantity="0.2", confidence="0.8", stop_loss="3100")
    await h.signal("c", "ETHUSDT", "buy", quantity="0.3", confidence="0.8")
    await h.signal("c", "ETHUSDT", "close", quantity="0.1")
    replayed = PositionBook()
    replayed.replay(h.events)
    replayed.replay(h.events)  # a second replay (duplicates) changes nothing
    assert {k: (v.quantity, v.cost) for k, v in replayed.exchange.items()} == {
        k: (v.quantity, v.cost) for k, v in h.book.exchange.items()
    }
    assert {p: (sp.remaining, sp.entry_fee_left) for p, sp in replayed.positions.items()} == {
        p: (sp.remaining, sp.entry_fee_left) for p, sp in h.book.positions.items()
    }
    assert [pid for pid, _ in replayed.triggers.fire("ETHUSDT", D("3100"))] == [
        pid for pid, _ in h.book.triggers.fire("ETHUSDT", D("3100"))
    ]


STRATEGIES = ["a", "b", "c"]
operation = st.one_of(
    st.tuples(st.just("open"), st.sampled_from(STRATEGIES), st.sampled_from(["buy", "sell"]),
              st.integers(1, 50), st.integers(60, 100), st.one_of(st.none(), st.integers(1, 9))),
    st.tuples(st.just("close"), st.sampled_from(STRATEGIES), st.one_of(st.none(), st.integers(1, 30))),
    st.tuples(st.just("tick"), st.integers(2500, 3500)),
)  # fmt: skip


@given(
    ops=st.lists(operation, min_size=1, max_size=40),
    mode=st.sampled_from([PositionMode.HEDGE, PositionMode.ONE_WAY]),
    aware=st.booleans(),
)
async def test_strategy_pnl_adds_up_to_the_venue_pnl_exactly(
    ops: list[tuple[object, ...]], mode: PositionMode, aware: bool
) -> None:
    """DESIGN §4.2 invariant: flat to flat, the strategies' net PnL equals the venue's
    realized PnL minus fees, to the last digit; and at every step book == venue."""
    h = Harness(mode=mode, aware=aware)
    await h.tick("ETHUSDT", "3000")
    for n, op in enumerate(ops):
        if op[0] == "open":
            _, strategy, action, qty, conf, tp = op
            fields = {"quantity": D(qty) / 100, "confidence": D(conf) / 100, "signal_id": f"o{n}"}
            if tp is not None:
                fields["take_profit_pct"] = D(tp) / 100
            await h.signal(str(strategy), "ETHUSDT", str(action), **fields)
        elif op[0] == "close":
            _, strategy, qty = op
            extra = {"quantity": D(qty) / 100} if qty is not None else {}
            await h.signal(str(strategy), "ETHUSDT", "close", signal_id=f"c{n}", **extra)
        else:
            await h.tick("ETHUSDT", D(str(op[1])))
        for side in PositionSide:
            ep = h.book.exchange.get(PositionKey("ETHUSDT", side))
            assert h.paper.position("ETHUSDT", side) == (ep.quantity if ep else 0)
            assert ep is None or ep.quantity == sum((sp.remaining for sp in h.book.open_on(ep.key)), ZERO)
        if mode is PositionMode.ONE_WAY or not aware:
            assert len(h.book.exchange) <= 1  # all open positions on one side of the symbol
    for strategy in STRATEGIES:
        await h.signal(strategy, "ETHUSDT", "close", signal_id=f"final-{strategy}")
    assert not h.book.exchange and not h.book.positions
    strategies_net = sum((e.realized_pnl for e in h.closed()), ZERO)
    assert strategies_net == h.paper.realized_pnl - h.paper.fees_paid
    assert sum((e.fee for e in h.closed()), ZERO) == h.paper.fees_paid


@given(st.lists(st.text(max_size=40), min_size=1, max_size=4))
def test_derived_ids_are_rfc4122_uuid5(parts: list[str]) -> None:
    import uuid

    from engine.domain.model import ID_NAMESPACE, derive_id

    assert derive_id(*parts) == str(uuid.uuid5(ID_NAMESPACE, "\x1f".join(parts)))


async def test_a_close_leg_whose_slice_is_gone_does_not_grow_the_open_leg() -> None:
    from engine.domain.decide import Accepted, decide
    from tests.helpers import NOW, make_signal

    h = Harness(mode=PositionMode.ONE_WAY)
    await h.tick("ETHUSDT", "3000")
    await h.signal("a", "ETHUSDT", "sell", quantity="0.1", confidence="0.7")
    reversal = decide(
        make_signal("b", "ETHUSDT", "buy", quantity="0.2", confidence="0.9"),
        h.book, h.paper.market("ETHUSDT"), D("3000"), NOW, h.rules,
    )  # fmt: skip
    assert isinstance(reversal, Accepted)
    (intent,) = reversal.orders  # one net order: close a's 0.1 SHORT, open b's 0.2 LONG
    await h.signal("a", "ETHUSDT", "close")  # a's slice closes by other means first
    fill = await h.paper.execute(intent)
    (opened,) = h.book.settle(intent, fill, NOW)
    assert isinstance(opened, PositionOpened) and opened.quantity == D("0.2")
    assert opened.fee == D("0.3")  # its own 0.2 x 3000 x 0.05 %, not the whole order's fee


async def test_slices_hit_on_one_tick_close_in_one_order_per_key_and_keep_their_own_pnl() -> None:
    h = Harness()
    await h.tick("ETHUSDT", "3000")
    await h.signal("a", "ETHUSDT", "buy", quantity="0.1", confidence="0.8", take_profit_pct="0.01")
    await h.signal("b", "ETHUSDT", "buy", quantity="0.3", confidence="0.8", take_profit="3020")
    await h.signal("c", "ETHUSDT", "sell", quantity="0.2", confidence="0.8", stop_loss="3025")
    await h.signal("d", "ETHUSDT", "buy", quantity="0.2", confidence="0.8")  # no levels: stays
    orders_before = len(h.paper.orders)
    closed = await h.tick("ETHUSDT", "3030")
    assert len(h.paper.orders) == orders_before + 2  # LONG's two TPs in one order, SHORT's SL in another
    by_strategy = {e.strategy_id: e for e in closed}
    assert set(by_strategy) == {"a", "b", "c"}
    assert (
        by_strategy["a"].client_order_id
        == by_strategy["b"].client_order_id
        != by_strategy["c"].client_order_id
    )
    assert by_strategy["a"].close_reason is by_strategy["b"].close_reason is CloseReason.TAKE_PROFIT
    assert by_strategy["c"].close_reason is CloseReason.STOP_LOSS
    assert by_strategy["a"].gross_pnl == D("3.0") and by_strategy["b"].gross_pnl == D("9.0")
    long_order = h.paper.orders[by_strategy["a"].client_order_id]  # type: ignore[index]
    assert long_order.quantity == D("0.4")
    assert by_strategy["a"].exit_fee + by_strategy["b"].exit_fee == long_order.fee
    assert by_strategy["b"].exit_fee == 3 * by_strategy["a"].exit_fee
    assert [sp.strategy_id for sp in h.book.positions.values()] == ["d"]


async def test_a_close_signal_over_both_sides_sends_one_order_per_key() -> None:
    from engine.domain.decide import Accepted

    h = Harness()
    await h.tick("ETHUSDT", "3000")
    for n, action in enumerate(("buy", "buy", "sell")):
        await h.signal("a", "ETHUSDT", action, quantity="0.1", confidence="0.8", signal_id=f"o{n}")
    verdict = await h.signal("a", "ETHUSDT", "close")
    assert isinstance(verdict, Accepted) and len(verdict.strategy_position_ids) == 3
    assert [(o.position_side, len(o.legs), o.quantity) for o in verdict.orders] == [
        (PositionSide.LONG, 2, D("0.2")),
        (PositionSide.SHORT, 1, D("0.1")),
    ]
    assert not h.book.positions and not h.book.exchange


async def test_closes_of_one_key_are_chunked_at_the_venues_maximum_order_size() -> None:
    from engine.domain.decide import closes_by_key

    h = Harness()
    await h.tick("ETHUSDT", "3000")
    for n, qty in enumerate(("0.1", "0.1", "0.4", "0.1")):
        await h.signal("a", "ETHUSDT", "buy", quantity=qty, confidence="0.8", signal_id=f"o{n}")
    closing = [(sp, sp.remaining, CloseReason.TAKE_PROFIT) for sp in h.book.positions.values()]
    orders = closes_by_key(closing, D("3100"), None, max_quantity=D("0.25"))
    # in order, each as large as the limit allows; a slice above it goes alone (the venue decides)
    assert [o.quantity for o in orders] == [D("0.2"), D("0.4"), D("0.1")]
    assert [leg.position_id for o in orders for leg in o.legs] == [sp.id for sp, _, _ in closing]
    assert len(closes_by_key(closing, D("3100"), None)) == 1  # no limit stated: one order
