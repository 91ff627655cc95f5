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
    from engine.domain.events import _encode_default

    assert _encode_default(value) == format(value, "f")
