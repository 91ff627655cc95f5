from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from engine.domain.model import CloseReason, PositionSide, StrategyPositionId
from engine.domain.tpsl import LevelSpec, TriggerIndex

D = Decimal


def test_levels_from_fractions_round_to_the_tick() -> None:
    spec = LevelSpec(take_profit_pct=D("0.05"), stop_loss_pct=D("0.02"))
    assert spec.resolve(PositionSide.LONG, D("3000"), D("0.01")) == (D("3150.00"), D("2940.00"))
    assert spec.resolve(PositionSide.SHORT, D("3000"), D("0.01")) == (D("2850.00"), D("3060.00"))
    assert LevelSpec(take_profit=D("3100"), take_profit_pct=D("0.5")).resolve(
        PositionSide.LONG, D("3000"), D("0.01")
    ) == (D("3100"), None)


def test_misplaced_levels() -> None:
    assert LevelSpec(take_profit=D("99")).misplaced(PositionSide.LONG, D("100"))
    assert LevelSpec(stop_loss=D("101")).misplaced(PositionSide.LONG, D("100"))
    assert LevelSpec(take_profit=D("101")).misplaced(PositionSide.SHORT, D("100"))
    assert LevelSpec(stop_loss=D("99")).misplaced(PositionSide.SHORT, D("100"))
    assert LevelSpec(D("101"), D("99")).misplaced(PositionSide.LONG, D("100")) is None
    assert LevelSpec(D("99"), D("101")).misplaced(PositionSide.SHORT, D("100")) is None


position = st.tuples(
    st.sampled_from(list(PositionSide)),
    st.one_of(st.none(), st.integers(1, 40)),
    st.one_of(st.none(), st.integers(1, 40)),
)


@given(st.lists(position, max_size=60), st.lists(st.integers(0, 80), max_size=30), st.data())
def test_index_fires_exactly_what_a_full_scan_would(
    positions: list[tuple[PositionSide, int | None, int | None]], ticks: list[int], data: st.DataObject
) -> None:
    index = TriggerIndex()
    armed: dict[StrategyPositionId, tuple[PositionSide, int | None, int | None]] = {}
    for n, (side, offset_tp, offset_sl) in enumerate(positions):
        pid = StrategyPositionId(f"p{n}")
        tp = None if offset_tp is None else 40 + side.sign * offset_tp
        sl = None if offset_sl is None else 40 - side.sign * offset_sl
        index.arm("X", side, pid, None if tp is None else D(tp), None if sl is None else D(sl))
        if tp is not None or sl is not None:
            armed[pid] = (side, tp, sl)
    for pid in data.draw(st.lists(st.sampled_from(sorted(armed) or ["none"]), max_size=10)):
        index.disarm(StrategyPositionId(pid))
        armed.pop(StrategyPositionId(pid), None)
    for price in ticks:
        expected = {}
        for pid, (side, tp, sl) in armed.items():
            long = side is PositionSide.LONG
            if tp is not None and (price >= tp if long else price <= tp):
                expected[pid] = CloseReason.TAKE_PROFIT
            elif sl is not None and (price <= sl if long else price >= sl):
                expected[pid] = CloseReason.STOP_LOSS
        may_fire = index.may_fire("X", D(price))
        fired = dict(index.fire("X", D(price)))
        assert fired == expected
        assert may_fire or not fired  # the worker skips the index only when nothing can fire
        for pid in fired:
            del armed[pid]
    assert len(index) == len(armed)
