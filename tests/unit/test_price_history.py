"""Bars of the price history (issue #18): whatever ticks come, each symbol's interval gives one
bar whose points are its first and last tick and its first highest and lowest, in the order they
came, so a replay of the bars reaches every level the ticks reached, in the same order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from engine.domain.price_history import BarMaker, PriceBar, PricePoint, decode_bar, encode_bar

T0 = datetime(2026, 12, 1, tzinfo=UTC)
ticks = st.lists(
    st.tuples(
        st.sampled_from(["BTCUSDT", "ETHUSDT"]),
        st.integers(min_value=0, max_value=5_000),  # milliseconds after the previous tick
        st.integers(min_value=1, max_value=50).map(lambda n: Decimal(n) / 10),
    ),
    max_size=200,
)


def bars_of(
    seq: list[tuple[str, int, Decimal]], interval: int
) -> tuple[list[PriceBar], list[tuple[str, datetime, Decimal]]]:
    maker, at, seen, bars = BarMaker(interval), T0, [], []
    for symbol, gap, price in seq:
        at += timedelta(milliseconds=gap)
        seen.append((symbol, at, price))
        closed = maker.observe(symbol, price, at)
        if closed is not None:
            bars.append(closed)
    bars += maker.due(at + timedelta(seconds=interval)) + maker.drain()
    return bars, seen


@given(ticks, st.sampled_from([1, 5, 60]))
def test_one_bar_per_symbol_and_interval_keeping_the_extremes_in_order(
    seq: list[tuple[str, int, Decimal]], interval: int
) -> None:
    bars, seen = bars_of(seq, interval)
    assert sum(bar.ticks for bar in bars) == len(seen)
    assert len({(bar.symbol, bar.start) for bar in bars}) == len(bars)
    for bar in bars:
        mine = [(at, price) for symbol, at, price in seen
                if symbol == bar.symbol and bar.start <= at < bar.start + timedelta(seconds=interval)]  # fmt: skip
        assert len(mine) == bar.ticks and 1 <= len(bar.points) <= 4
        prices = [price for _, price in mine]
        points = [(p.at, p.price) for p in bar.points]
        assert points[0] == mine[0] and points[-1] == mine[-1]
        assert max(prices) in {p for _, p in points} and min(prices) in {p for _, p in points}
        assert [p.at for p in bar.points] == sorted(p.at for p in bar.points)
        first_high = next(t for t in mine if t[1] == max(prices))
        first_low = next(t for t in mine if t[1] == min(prices))
        assert first_high in points and first_low in points
        assert int(bar.start.timestamp()) % interval == 0
        assert decode_bar(encode_bar(bar)) == bar
    if len(seen) and all(gap >= 1000 * interval for _, gap, _ in seq):
        assert len(bars) == len(seen)  # one tick an interval: every tick kept, exactly


def test_a_bar_is_due_once_its_interval_has_ended_and_its_id_names_it() -> None:
    maker = BarMaker(10)
    assert maker.observe("BTCUSDT", Decimal("100"), T0 + timedelta(seconds=3)) is None
    assert maker.due(T0 + timedelta(seconds=9)) == []
    (bar,) = maker.due(T0 + timedelta(seconds=10))
    assert bar == PriceBar("BTCUSDT", T0, 10, (PricePoint(T0 + timedelta(seconds=3), Decimal("100")),), 1)
    assert bar.msg_id == f"bar:BTCUSDT:10:{int(T0.timestamp())}"
    assert maker.drain() == []
