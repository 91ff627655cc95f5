from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from engine.domain.model import Action, PositionSide
from engine.domain.signals import MalformedSignal, Signal, parse_signal

SUBJECT = "signals.momentum_v1.BTCUSDT"


def parse(payload: object, subject: str = SUBJECT) -> Signal | MalformedSignal:
    return parse_signal(subject, json.dumps(payload).encode())


def base(**extra: object) -> dict[str, object]:
    return {"strategy_id": "momentum_v1", "symbol": "BTCUSDT", "action": "buy", "quantity": 0.01, **extra}


def test_petrosa_payload_is_accepted_and_unknown_fields_ignored() -> None:
    payload = {
        "strategy_id": "momentum_v1", "symbol": "BTCUSDT", "signal_type": "buy", "action": "BUY",
        "confidence": 0.85, "strength": "strong", "price": 45000.0, "quantity": 0.001,
        "current_price": 45010.5, "timeframe": "15m", "order_type": "market", "time_in_force": "GTC",
        "position_size_pct": 0.1, "stop_loss": 44000, "take_profit": 47000, "strategy_mode": "deterministic",
        "source": "ta_bot", "strategy": "momentum_pulse", "metadata": {"rsi": 61.2},
        "timestamp": "2026-11-25T12:00:00",
    }  # fmt: skip
    signal = parse(payload)
    assert isinstance(signal, Signal)
    assert signal.action is Action.BUY
    assert signal.confidence == Decimal("0.85")
    assert signal.quantity == Decimal("0.001")
    assert signal.current_price == Decimal("45010.5")
    assert signal.reference_price == Decimal("45000.0")
    assert signal.strength == "strong"
    assert signal.timestamp == datetime(2026, 11, 25, 12, 0, tzinfo=UTC)  # naive ISO means UTC
    assert signal.signal_id is not None and signal.signal_id.startswith("d-")


def test_floats_become_exact_decimals() -> None:
    signal = parse(base(quantity=0.1, take_profit_pct=0.05))
    assert isinstance(signal, Signal)
    assert signal.quantity == Decimal("0.1")
    assert signal.take_profit_pct == Decimal("0.05")


def test_epoch_seconds_milliseconds_and_offsets_are_utc() -> None:
    expected = datetime(2024, 11, 25, 2, 0, tzinfo=UTC)
    for stamp in (
        1732500000,
        1732500000000,
        "1732500000",
        "2024-11-25T04:00:00+02:00",
        "2024-11-25T02:00:00Z",
    ):
        signal = parse(base(timestamp=stamp))
        assert isinstance(signal, Signal), stamp
        assert signal.timestamp == expected, stamp


def test_derived_signal_id_is_deterministic_and_content_based() -> None:
    a, b, c = parse(base()), parse(base()), parse(base(quantity=0.02))
    assert isinstance(a, Signal) and isinstance(b, Signal) and isinstance(c, Signal)
    assert a.signal_id == b.signal_id != c.signal_id


def test_explicit_signal_id_kept_and_side_and_action_normalised() -> None:
    signal = parse(base(signal_id="abc-1", action=" Close ", position_side="long"))
    assert isinstance(signal, Signal)
    assert (signal.signal_id, signal.action, signal.position_side) == (
        "abc-1",
        Action.CLOSE,
        PositionSide.LONG,
    )


def errors_of(result: Signal | MalformedSignal) -> tuple[str, tuple[str, ...]]:
    assert isinstance(result, MalformedSignal), result
    return result.reason_code, result.errors


def test_every_bad_field_is_listed_with_its_name() -> None:
    code, errors = errors_of(parse(base(quantity=-1, confidence=1.5, take_profit_pct=2, action="moon")))
    assert code == "invalid_field"
    joined = "\n".join(errors)
    for name in ("quantity", "confidence", "take_profit_pct", "action"):
        assert name in joined


def test_booleans_are_not_numbers() -> None:
    code, errors = errors_of(parse(base(quantity=True)))
    assert code == "invalid_field" and "boolean" in errors[0]


def test_nan_and_infinity_are_rejected_as_bad_json() -> None:
    raw = b'{"strategy_id":"momentum_v1","symbol":"BTCUSDT","action":"buy","quantity":NaN}'
    assert errors_of(parse_signal(SUBJECT, raw))[0] == "bad_json"
    raw = b'{"strategy_id":"momentum_v1","symbol":"BTCUSDT","action":"buy","quantity":Infinity}'
    assert errors_of(parse_signal(SUBJECT, raw))[0] == "bad_json"
    assert errors_of(parse(base(quantity="NaN")))[0] == "invalid_field"


def test_buy_needs_a_size_but_close_and_hold_do_not() -> None:
    payload = base()
    del payload["quantity"]
    assert "needs quantity, quote_quantity or position_size_pct" in "".join(errors_of(parse(payload))[1])
    assert isinstance(parse(base(quote_quantity=100, quantity=None) | {"quantity": 5}), Signal)
    for action in ("close", "hold"):
        p = {"strategy_id": "momentum_v1", "symbol": "BTCUSDT", "action": action}
        assert isinstance(parse(p), Signal)


def test_subject_must_match_payload() -> None:
    assert errors_of(parse(base(), subject="signals.other.BTCUSDT"))[0] == "identity_mismatch"
    assert errors_of(parse(base(), subject="signals.momentum_v1.ETHUSDT"))[0] == "subject_mismatch"
    assert errors_of(parse(base(), subject="signals.momentum_v1"))[0] == "bad_subject"


def test_oversize_and_non_objects() -> None:
    assert errors_of(parse_signal(SUBJECT, b" " * 70_000))[0] == "oversize"
    assert errors_of(parse_signal(SUBJECT, b"[1,2]"))[0] == "bad_json"
    assert errors_of(parse_signal(SUBJECT, b"\xff\xfe"))[0] == "bad_json"


def test_bad_tokens_in_fields_rejected() -> None:
    assert (
        errors_of(parse(base(symbol="BTC.USDT"), subject="signals.momentum_v1.BTCUSDT"))[0] == "invalid_field"
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.dictionaries(st.sampled_from([*base(), "confidence", "timestamp", "take_profit"]), json_values))
def test_parse_never_raises_on_any_json_object(payload: dict[str, object]) -> None:
    result = parse(payload)
    assert isinstance(result, Signal | MalformedSignal)


@given(st.binary(max_size=300))
def test_parse_never_raises_on_any_bytes(data: bytes) -> None:
    assert isinstance(parse_signal(SUBJECT, data), Signal | MalformedSignal)


def test_price_ticks_are_checked_like_signals() -> None:
    from engine.domain.events import parse_tick

    assert parse_tick("prices.BTCUSDT", b'{"symbol":"BTCUSDT","price":"45000.5"}') == (
        "BTCUSDT",
        Decimal("45000.5"),
    )
    assert parse_tick("prices.BTCUSDT", b'{"symbol":"BTCUSDT","price":45000.1}') == (
        "BTCUSDT",
        Decimal("45000.1"),
    )
    for subject, data in [
        ("prices.BTCUSDT", b"{nope"),
        ("prices.BTCUSDT", b'{"symbol":"ETHUSDT","price":"1"}'),
        ("prices.BTCUSDT", b'{"symbol":"BTCUSDT","price":"-1"}'),
        ("prices.BTCUSDT", b'{"symbol":"BTCUSDT","price":NaN}'),
        ("prices.BTCUSDT", b'{"symbol":"BTCUSDT","price":"Infinity"}'),
        ("prices.BTCUSDT", b'{"symbol":"BTCUSDT","price":true}'),
        ("prices.BTCUSDT", b'{"symbol":"BTCUSDT","price":"abc"}'),
        ("prices.BTCUSDT", b"[1]"),
    ]:
        assert isinstance(parse_tick(subject, data), str), data
