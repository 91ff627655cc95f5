"""The worker's state as the domain owns it: `admit` says what a signal is before it is decided,
`apply` folds events in once, live or replayed, without NATS or a venue."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from engine.domain.events import SignalDecided
from engine.domain.model import Action, Outcome
from engine.domain.risk import RiskLimits, StrategyLimits
from engine.domain.state import Admit, EngineState
from tests.helpers import NOW, Harness, make_signal


def decided(signal_id: str, sequence: int) -> SignalDecided:
    return SignalDecided(
        event_id=f"d-{signal_id}", occurred_at=NOW, signal_id=signal_id, strategy_id="s", symbol="ETHUSDT",
        action=Action.BUY, outcome=Outcome.ACCEPTED, reason_code="accepted", reason="", signal_sequence=sequence,
    )  # fmt: skip


async def test_admission_of_new_seen_and_half_done_signals() -> None:
    h = Harness()
    await h.tick("ETHUSDT", "3000")
    await h.signal("s", "ETHUSDT", "buy", quantity="0.3", confidence="0.9", signal_id="o1")
    await h.signal("s", "ETHUSDT", "close", quantity="0.1", signal_id="c1")
    state = EngineState()
    for event in h.events:
        state.apply(event, replay=True)
    state.apply(decided("d1", 5))

    new = make_signal("s", "ETHUSDT", "buy", quantity="0.1", confidence="0.9", signal_id="n1")
    assert state.admit(new, 9).verdict is Admit.PROCEED
    seen = make_signal("s", "ETHUSDT", "buy", quantity="0.1", confidence="0.9", signal_id="d1")
    assert state.admit(seen, 5).verdict is Admit.REDELIVERED
    assert state.admit(seen, 6).verdict is Admit.DUPLICATE
    opened = make_signal("s", "ETHUSDT", "buy", quantity="0.3", confidence="0.9", signal_id="o1")
    assert state.admit(opened, 3).verdict is Admit.RECOVERED  # filled before a crash, undecided
    close = make_signal("s", "ETHUSDT", "close", quantity="0.25", signal_id="c1")
    admission = state.admit(close, 4)
    assert admission.verdict is Admit.PROCEED and admission.closed_before == Decimal("0.1")
    assert admission.signal.quantity == Decimal("0.15")  # what is left of it, no more


async def test_a_day_of_losses_is_counted_once_however_often_an_event_is_stored() -> None:
    h = Harness()
    await h.tick("ETHUSDT", "3000")
    await h.signal("s", "ETHUSDT", "buy", quantity="0.1", confidence="0.9", signal_id="o1")
    await h.signal("s", "ETHUSDT", "close", signal_id="c1")
    opened, closed = h.events
    state = EngineState(RiskLimits(StrategyLimits(daily_loss=Decimal(1000))))
    for event in (opened, closed, closed, opened):  # stored twice, beyond NATS's dedupe window
        state.apply(event, replay=True)
    expected = opened.fee + closed.exit_fee - closed.gross_pnl
    assert state.risk.today.loss("s", NOW) == expected
    assert not state.book.positions
    assert state.risk.today.loss("s", NOW + timedelta(days=1)) == 0
