"""Bars of the price history (issue #18): whatever ticks come, each symbol's interval gives one
bar whose points are its ticks while there are at most four, else its first and last tick and its
first highest and lowest, in the order they came, so a replay of the bars reaches every level the
ticks reached, in the same order."""

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
        if len(mine) <= 4:
            assert points == mine  # a quiet interval is kept whole
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


async def test_the_recorder_stores_in_chunks_and_keeps_what_failed_for_the_next_try() -> None:
    """An in-memory sink stands for JetStream: a failed store keeps the bars, a later one stores
    each chunk once, and a stored chunk is not sent again after a failure."""
    import asyncio

    from engine.app.price_history import STORE_CHUNK, PriceHistoryRecorder

    class Sink:
        def __init__(self) -> None:
            self.stored: list[str] = []
            self.fail_after: int | None = 0  # chunks accepted before the next failure

        async def publish_stored(self, messages: list[tuple[str, bytes, str]], stream: str) -> None:
            assert stream == "PRICE_HISTORY" and len(messages) <= STORE_CHUNK
            if self.fail_after == 0:
                self.fail_after = None
                raise ConnectionError("NATS away")
            if self.fail_after is not None:
                self.fail_after -= 1
            self.stored += [msg_id for _, _, msg_id in messages]

    now = [T0]
    sink = Sink()
    recorder = PriceHistoryRecorder(sink, 1, lambda: now[0])  # type: ignore[arg-type]
    for n in range(2 * STORE_CHUNK + 10):  # one tick a second: each closes the bar before it
        now[0] = T0 + timedelta(seconds=n)
        recorder.observe("BTCUSDT", Decimal(100 + n % 7))
    await recorder.store()  # NATS away: nothing stored, nothing lost
    assert sink.stored == [] and len(recorder.unstored) == 2 * STORE_CHUNK + 9
    sink.fail_after = 1  # one chunk goes through, then NATS is away again
    await recorder.store()
    assert len(sink.stored) == STORE_CHUNK and len(recorder.unstored) == STORE_CHUNK + 9
    stopping = asyncio.Event()
    stopping.set()
    await recorder.keep(stopping)  # the end: what is left, and the bar still open
    assert len(sink.stored) == len(set(sink.stored)) == 2 * STORE_CHUNK + 10 and recorder.unstored == []
