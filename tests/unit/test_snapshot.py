"""A snapshot is the state, exactly: dumped to JSON and loaded back into a fresh state, every
part of it equals the original and behaves the same (TP/SL fire, signals are admitted alike);
the events after it apply as they would have; a stored-again open of a slice it saw close does
not reopen it."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import orjson
import pytest

from engine.domain import snapshot
from engine.domain.events import SignalDecided
from engine.domain.model import Action, Outcome
from engine.domain.risk import Halt, HaltCause, RiskLimits, Scope, StrategyLimits
from engine.domain.state import Admit, EngineState
from tests.helpers import NOW, Harness, make_signal

D = Decimal


async def history() -> Harness:
    h = Harness()
    await h.tick("ETHUSDT", "3000")
    await h.signal(
        "a", "ETHUSDT", "buy", quantity="0.3", confidence="0.9", take_profit="3300", signal_id="o1"
    )
    await h.signal("b", "ETHUSDT", "buy", quantity="0.2", confidence="0.9", stop_loss="2900", signal_id="o2")
    await h.signal("a", "ETHUSDT", "close", quantity="0.1", signal_id="c1")
    await h.signal("c", "ETHUSDT", "sell", quantity="0.4", confidence="0.9", signal_id="o3")
    await h.tick("ETHUSDT", "3000")
    return h


def round_trip(state: EngineState) -> EngineState:
    copy = EngineState(RiskLimits(StrategyLimits(daily_loss=D(100))), NOW)
    copy.adopt(snapshot.load(orjson.loads(snapshot.to_json(snapshot.dump(state)))))
    return copy


async def test_a_snapshot_is_the_state() -> None:
    h = await history()
    state = EngineState(RiskLimits(StrategyLimits(daily_loss=D(100))), NOW)
    for event in h.events:
        state.apply(event, replay=True)
    state.apply(SignalDecided(event_id="d1", occurred_at=NOW, signal_id="o1", strategy_id="a", symbol="ETHUSDT",
                              action=Action.BUY, outcome=Outcome.ACCEPTED, reason_code="accepted", reason="",
                              signal_sequence=4))  # fmt: skip
    state.risk.halt(Halt(Scope("b"), HaltCause.OPERATOR, "review", NOW, NOW + timedelta(hours=1)))
    state.end_replay()
    copy = round_trip(state)

    assert list(copy.book.positions.values()) == list(state.book.positions.values())
    assert {k: list(v) for k, v in copy.book.by_key.items()} == {
        k: list(v) for k, v in state.book.by_key.items()
    }
    assert copy.book.exchange == state.book.exchange
    assert (copy.book.strategy_cost, copy.book.strategy_open) == (
        state.book.strategy_cost,
        state.book.strategy_open,
    )
    assert (copy.ledger._signals, copy.ledger._closed) == (state.ledger._signals, state.ledger._closed)
    assert (copy.journal.pending, copy.journal.booked, copy.journal.closing) == (
        state.journal.pending, state.journal.booked, state.journal.closing,
    )  # fmt: skip
    assert copy.risk.halts == state.risk.halts and copy.risk.today == state.risk.today
    assert copy.slice_history.changes == state.slice_history.changes
    assert copy.replayed_cash == state.replayed_cash and copy.last_event_at == state.last_event_at

    # It behaves alike: the same TP/SL fire, the same signals are known.
    assert [sp.id for sp, _ in copy.book.fire_triggers("ETHUSDT", D("3300"))] == [
        sp.id for sp, _ in state.book.fire_triggers("ETHUSDT", D("3300"))
    ]
    seen = make_signal("a", "ETHUSDT", "buy", quantity="0.3", confidence="0.9", signal_id="o1")
    assert copy.admit(seen, 4).verdict is state.admit(seen, 4).verdict is Admit.REDELIVERED
    close = make_signal("a", "ETHUSDT", "close", quantity="0.25", signal_id="c1")
    assert copy.admit(close, 9).signal.quantity == state.admit(close, 9).signal.quantity == D("0.15")


async def test_events_after_a_snapshot_apply_as_if_replayed_whole() -> None:
    h = await history()
    await h.tick("ETHUSDT", "3300")  # a's TP
    await h.signal("b", "ETHUSDT", "close", signal_id="c2")
    cut = 4
    whole = EngineState()
    for event in h.events:
        whole.apply(event, replay=True)
    whole.end_replay()
    before = EngineState()
    for event in h.events[:cut]:
        before.apply(event, replay=True)
    before.end_replay()
    resumed = round_trip(before)
    for event in h.events[cut:]:
        resumed.apply(event, replay=True)
    resumed.end_replay()
    assert list(resumed.book.positions.values()) == list(whole.book.positions.values())
    assert resumed.book.exchange == whole.book.exchange
    assert resumed.ledger._signals == whole.ledger._signals


async def test_an_open_stored_again_after_a_snapshot_of_its_close_does_not_reopen() -> None:
    h = Harness()
    await h.tick("ETHUSDT", "3000")
    await h.signal("s", "ETHUSDT", "buy", quantity="0.1", confidence="0.9", signal_id="o1")
    await h.signal("s", "ETHUSDT", "close", signal_id="c1")
    opened, closed = h.events
    state = EngineState(started_at=NOW)
    for event in (opened, closed):
        state.apply(event, replay=True)
    state.end_replay()
    resumed = EngineState(started_at=NOW)
    resumed.adopt(snapshot.load(orjson.loads(snapshot.to_json(snapshot.dump(state)))))
    resumed.apply(opened, replay=True)  # stored again, after the snapshot
    assert not resumed.book.positions and not resumed.book.exchange


async def test_the_snapshot_written_in_pieces_is_the_same_document() -> None:
    h = await history()
    state = EngineState()
    for event in h.events:
        state.apply(event, replay=True)
    whole = orjson.loads(snapshot.to_json(snapshot.dump(state)))
    assert orjson.loads(b"".join(snapshot.json_pieces(state, chunk=2))) == whole


async def test_cash_and_the_last_event_are_kept_live_as_on_replay() -> None:
    """A snapshot taken while the worker runs holds the trades' cash and the last event time of
    everything folded in, live or replayed, and a re-stored open counts once."""
    h = await history()
    replayed, live = EngineState(), EngineState()
    for event in h.events:
        replayed.apply(event, replay=True)
        live.apply(event, replay=False)
    replayed.apply(h.events[0], replay=True)  # an open stored twice
    assert live.replayed_cash == replayed.replayed_cash != 0
    assert live.last_event_at == replayed.last_event_at == h.events[-1].occurred_at


def test_a_snapshot_that_kept_no_days_tally_is_refused_under_a_days_loss_limit() -> None:
    data = orjson.loads(snapshot.to_json(snapshot.dump(EngineState())))
    assert snapshot.load(data, RiskLimits()) is not None
    try:
        snapshot.load(data, RiskLimits(StrategyLimits(daily_loss=D(10))))
    except ValueError as exc:
        assert "day's tally" in str(exc)
    else:
        raise AssertionError("loaded a snapshot without the tally a limit needs")


def test_the_ledger_packs_to_bytes_and_back_and_refuses_parts_that_do_not_fit() -> None:
    state = EngineState()
    for n in range(1_000):  # sequences past 32 bits and the executed-only mark among them
        state.ledger.apply(
            SignalDecided(
                event_id=f"e{n}", occurred_at=NOW, signal_id=f"s{n}", strategy_id="a", symbol="BTCUSDT",
                action=Action.HOLD, outcome=Outcome.IGNORED, reason_code="hold", reason="",
                signal_sequence=n * 2**33 or None,
            )
        )  # fmt: skip
    state.ledger._signals[b"x" * 16] = -1
    copy = EngineState()
    copy.ledger.unpack(*state.ledger.packed())
    assert copy.ledger._signals == state.ledger._signals
    assert copy.ledger.decided_at("a", "s7") == 7 * 2**33
    keys, sequences = state.ledger.packed()
    assert sequences[8:16] == (2**33).to_bytes(8, "little", signed=True)  # little-endian on any host
    assert sequences[-8:] == (-1).to_bytes(8, "little", signed=True)
    with pytest.raises(ValueError, match="bytes of keys"):
        copy.ledger.unpack(keys[:-1], sequences)


def test_a_snapshot_of_the_format_before_is_still_read() -> None:
    """Format 1 kept the ledger as [hex key, sequence] pairs: the first start after an upgrade
    loads it rather than replaying the whole stream."""
    state = EngineState()
    state.ledger.apply(
        SignalDecided(
            event_id="e", occurred_at=NOW, signal_id="s1", strategy_id="a", symbol="BTCUSDT",
            action=Action.HOLD, outcome=Outcome.IGNORED, reason_code="hold", reason="", signal_sequence=12,
        )
    )  # fmt: skip
    data = orjson.loads(snapshot.to_json(snapshot.dump(state)))
    keys, _ = state.ledger.packed()
    data["format"] = 1
    data["ledger"] = {"signals": [[keys.hex(), 12]], "closed": data["ledger"]["closed"]}
    assert snapshot.load(data).ledger.decided_at("a", "s1") == 12
    data["format"] = 0
    with pytest.raises(ValueError, match="format 0"):
        snapshot.load(data)
