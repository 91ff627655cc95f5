from __future__ import annotations

import json
from decimal import Decimal

import jsonschema
from hypothesis import given
from hypothesis import strategies as st

from engine.domain.events import (
    ContributionRef,
    ExchangePositionRef,
    PositionClosed,
    PositionOpened,
    SignalDecided,
    decode_event,
    encode_event,
    event_adapter,
)
from engine.domain.model import Action, Outcome, PositionSide
from engine.schemas_gen import SCHEMA_DIR, render
from tests.helpers import NOW, Harness


def test_checked_in_schemas_match_the_models() -> None:
    for filename, text in render().items():
        path = SCHEMA_DIR / filename
        assert path.exists(), f"{filename} missing: run `make schemas`"
        assert path.read_text() == text, f"{filename} is stale: run `make schemas`"


async def test_real_events_validate_against_their_schemas() -> None:
    h = Harness()
    await h.tick("ETHUSDT", "3000")
    await h.signal("a", "ETHUSDT", "buy", quantity="0.1", confidence="0.8", take_profit_pct="0.05")
    await h.tick("ETHUSDT", "3150")
    opened, closed = h.events
    for event, name in ((opened, "position_opened"), (closed, "position_closed")):
        schema = json.loads((SCHEMA_DIR / f"{name}.json").read_text())
        document = json.loads(encode_event(event))
        jsonschema.validate(document, schema)
        assert isinstance(document["entry_price"], str)  # amounts travel as decimal strings
        assert Decimal(document["entry_price"]) == Decimal("3000")
        assert document["occurred_at"].endswith("Z")


async def test_the_fast_encoder_writes_what_pydantic_writes_and_reads_back_the_same_event() -> None:
    h = Harness()
    await h.tick("BTCUSDT", "45000")
    await h.signal(
        "a", "BTCUSDT", "buy", quantity="0.003", confidence="0.8", take_profit_pct="0.01",
        timeframe="5m", metadata={"note": "x", "weight": Decimal("0.25"), "tags": ["a", 1]},
    )  # fmt: skip
    await h.signal("b", "BTCUSDT", "sell", quantity="0.002", confidence="0.7", stop_loss="46000")
    await h.tick("BTCUSDT", "45500")
    await h.signal("b", "BTCUSDT", "close")
    decided = SignalDecided(
        event_id="e1", occurred_at=NOW, signal_id="s1", strategy_id="a", symbol="BTCUSDT",
        action=Action.BUY, outcome=Outcome.ACCEPTED, reason_code="accepted", reason="opened",
        strategy_position_ids=["p1"], confidence=Decimal("1E+1"), signal_sequence=7,
    )  # fmt: skip
    events = [*h.events, decided]
    assert {type(e) for e in events} == {PositionOpened, PositionClosed, SignalDecided}
    for event in events:
        encoded = encode_event(event)
        assert encoded == event_adapter(type(event)).dump_json(event)
        assert decode_event(encoded) == event
    assert b'"confidence":"10"' in encode_event(decided)  # never exponent notation


def test_metadata_beyond_64_bit_integers_still_encodes() -> None:
    event = PositionOpened(
        event_id="e1", occurred_at=NOW, strategy_position_id="p1", strategy_id="a", signal_id="s1",
        symbol="BTCUSDT", side=PositionSide.LONG, quantity=Decimal("0.001"), entry_price=Decimal("45000"),
        take_profit_price=None, stop_loss_price=None, fee=Decimal("0.02"), client_order_id="c1",
        exchange_order_id="x1", confidence=Decimal("0.9"),
        exchange_position=ExchangePositionRef(
            exchange_position_id="ep1", key="BTCUSDT_LONG", quantity_before=Decimal(0),
            quantity_after=Decimal("0.001"), avg_entry_price=Decimal("45000"),
        ),
        contribution=ContributionRef(contribution_id="c1", sequence=1),
        metadata={"big": 10**30},
    )  # fmt: skip
    assert json.loads(encode_event(event))["metadata"] == {"big": 10**30}
    assert decode_event(encode_event(event)) == event


@given(st.decimals(allow_nan=False, allow_infinity=False))
def test_amounts_are_written_in_plain_notation_whatever_their_exponent(value: Decimal) -> None:
    from engine.domain.model import json_default

    assert json_default(value) == format(value, "f")


GOOD = {"strategy_id": "s1", "symbol": "BTCUSDT", "action": "buy", "quantity": "0.01"}
BAD_FIELDS: list[dict[str, object]] = [
    {"quantity": -1},
    {"quantity": 0},
    {"quantity": "-1"},
    {"quantity": "0"},
    {"quantity": "abc"},
    {"quantity": True},
    {"quantity": "NaN"},
    {"quantity": 1e12},
    {"quantity": "Infinity"},
    {"confidence": 5},
    {"confidence": -0.1},
    {"confidence": "2"},
    {"confidence": "1.5"},
    {"take_profit_pct": 1.5},
    {"take_profit_pct": 0},
    {"stop_loss_pct": "1"},
    {"position_size_pct": 2},
    {"stop_loss": -5},
    {"price": 0},
    {"take_profit": "0.0"},
    {"quote_quantity": "-3"},
    {"strategy_id": "a.b"},
    {"strategy_id": "x" * 65},
    {"symbol": ""},
    {"signal_id": "has space"},
    {"action": "buyy"},
    {"position_side": "UP"},
    {"timeframe": "x" * 17},
]
GOOD_FIELDS: list[dict[str, object]] = [
    {},
    {"quantity": 0.5},
    {"quantity": "1e-3"},
    {"confidence": "0.75"},
    {"confidence": 1},
    {"confidence": "1"},
    {"take_profit_pct": "0.05", "stop_loss_pct": 0.02},
    {"price": "45000.5"},
    {"timestamp": 1764590400},
    {"timestamp": "2026-12-01T12:00:00Z"},
    {"position_side": "LONG"},
    {"signal_id": "abc-1"},
]


def test_the_signal_schema_refuses_what_the_worker_refuses() -> None:
    """A standard validator enforces the schema: every golden bad field fails it exactly as it
    fails the worker, and good payloads pass both."""
    from engine.domain.signals import MalformedSignal, parse_signal

    schema = json.loads((SCHEMA_DIR / "signal.json").read_text())
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    for fields in BAD_FIELDS:
        payload = GOOD | fields
        subject = f"signals.{payload.get('strategy_id')}.{payload.get('symbol')}"
        assert isinstance(parse_signal(subject, json.dumps(payload).encode()), MalformedSignal), fields
        assert not validator.is_valid(payload), fields
    for fields in GOOD_FIELDS:
        payload = GOOD | fields
        assert not isinstance(
            parse_signal("signals.s1.BTCUSDT", json.dumps(payload).encode()), MalformedSignal
        )
        assert validator.is_valid(payload), (fields, [e.message for e in validator.iter_errors(payload)])
