"""Whatever bytes arrive, parsing never raises and what the worker stores about them can always
be encoded (issue #13): the pure half of the poison-message guarantees."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncmy.errors
import orjson
from hypothesis import example, given, settings
from hypothesis import strategies as st

from engine.adapters.leases import Holder
from engine.adapters.paper import BUILTIN_MARKETS
from engine.app.attribution import is_outage
from engine.domain.book import PositionBook
from engine.domain.dead_letters import dead_letter
from engine.domain.decide import Accepted, Refused, Rules, amount, decide
from engine.domain.events import encode_event, parse_tick
from engine.domain.model import json_default
from engine.domain.signals import MalformedSignal, Signal, json_too_deep, parse_signal, text_problem
from tests.helpers import make_signal

SUBJECT = "signals.s1.BTCUSDT"
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
signal_like = st.fixed_dictionaries(
    {"strategy_id": st.just("s1"), "symbol": st.just("BTCUSDT")},
    optional={
        "action": st.sampled_from(["buy", "sell", "close", "hold", "BUY", " buy", "x"]) | json_values,
        "quantity": json_values
        | st.decimals(allow_nan=False, allow_infinity=False).map(str)
        | st.builds(lambda m, e: f"{m}E{e}", st.integers(-9, 9), st.integers(-999_999_999, 999_999_999)),
        "take_profit": st.builds(lambda m, e: f"{m}e{e}", st.integers(1, 9), st.integers(-(10**9), 10**9)),
        "confidence": json_values,
        "signal_id": st.text(max_size=140),
        "timestamp": json_values | st.text(max_size=40),
        "metadata": json_values,
        "price": json_values,
    },
)


def store_of(data: bytes, headers: dict[str, str] | None = None) -> bytes:
    """What the worker would store for these bytes: a dead letter, or (for a valid signal) a
    decision; encoded as the worker encodes it."""
    parsed = parse_signal(SUBJECT, data)
    if isinstance(parsed, MalformedSignal):
        return encode_event(dead_letter(SUBJECT, data, headers, parsed, 7, NOW))
    assert isinstance(parsed, Signal)
    # As events write it: every decimal in full (decimal_text), metadata included.
    return orjson.dumps(parsed.model_dump(), default=json_default)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_and_always_encode(data: bytes) -> None:
    assert store_of(data)


@settings(max_examples=400, deadline=None)
@given(signal_like)
def test_arbitrary_signal_shaped_payloads_never_raise_and_always_encode(payload: dict[str, object]) -> None:
    for ensure_ascii in (True, False):
        try:
            data = json.dumps(payload, ensure_ascii=ensure_ascii).encode()
        except UnicodeEncodeError:
            continue  # not representable as UTF-8 bytes at all
        assert store_of(data)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=20))
def test_escaped_text_of_any_code_point_is_either_refused_or_storable(text: str) -> None:
    data = json.dumps(
        {"strategy_id": "s1", "symbol": "BTCUSDT", "action": "hold", "metadata": {"t": text}}
    ).encode()
    parsed = parse_signal(SUBJECT, data)
    if isinstance(parsed, Signal):
        assert parsed.metadata is not None
        parsed.metadata["t"].encode("utf-8")  # a storable string
    else:
        assert parsed.reason_code == "bad_text"


def test_depth_is_checked_before_parsing() -> None:
    assert json_too_deep(b"[" * 17 + b"]" * 17)
    assert not json_too_deep(b"[" * 16 + b"]" * 16)
    assert not json_too_deep(b'{"a":"[[[[[[[[[[[[[[[[[[[[[[[[[["}')  # brackets in strings do not count
    assert not json_too_deep(b'{"a":"\\"[[[[[[[[[[[[[[[[[[[[[[["}')
    bad = parse_signal(SUBJECT, b"[" * 60_000)
    assert isinstance(bad, MalformedSignal) and bad.reason_code == "too_deep"


def test_text_problems_name_the_place() -> None:
    assert text_problem({"metadata": {"k": ["ok", "\ud800"]}}) == (
        "payload.metadata.k[1]: contains a lone surrogate, which is not Unicode text"
    )
    assert text_problem({"a": "x\x00"}) == "payload.a: contains NUL (\\u0000)"
    assert text_problem({"a": "😀 \u202e"}) is None


def test_ids_are_not_stripped_and_amounts_fit_the_database() -> None:
    def reason(**fields: object) -> str:
        payload = {"strategy_id": "s1", "symbol": "BTCUSDT", "action": "buy", "quantity": "1"} | fields
        parsed = parse_signal(SUBJECT, json.dumps(payload).encode())
        return parsed.reason_code if isinstance(parsed, MalformedSignal) else "ok"

    assert reason(signal_id="x ") == "invalid_field"
    assert reason(signal_id="x") == "ok"
    assert reason(quantity="999999999.999") == "ok"
    assert reason(quantity="1000000000") == "invalid_field"
    assert reason(quantity="-1000000000") == "invalid_field"
    assert reason(strategy="s" * 65) == "invalid_field"


def test_dead_letters_keep_only_traceable_headers_and_plain_text() -> None:
    bad = MalformedSignal("invalid_field", ("x: \ud800 bad",), strategy_id="\udfff", signal_id="a" * 500)
    headers = {
        "Nats-Msg-Id": "s1:abc",
        "X-Api-Key": "secret-1",
        "Authorization": "Bearer t",
        "traceparent": "00-1",
    }
    dead = dead_letter(SUBJECT, b'{"x":"\\ud800"}\x00\xff', headers, bad, 3, NOW)
    assert dead.headers == {"Nats-Msg-Id": "s1:abc", "traceparent": "00-1"}
    assert dead.signal_id is not None and len(dead.signal_id) == 128
    encoded = encode_event(dead)
    assert b"secret-1" not in encoded and b"Bearer" not in encoded
    json.loads(encoded)


def test_decide_refuses_future_dates_prices_out_of_band_and_orders_above_the_limit() -> None:
    book, market = PositionBook(), BUILTIN_MARKETS["BTCUSDT"]

    def verdict(last: str | None, **fields: object) -> str:
        signal = make_signal("s1", "BTCUSDT", "buy", quantity="0.01", confidence="0.9", **fields)
        result = decide(signal, book, market, Decimal(last) if last else None, NOW, Rules())
        return result.reason_code if isinstance(result, Refused) else "accepted"

    assert verdict("45000", timestamp=(NOW + timedelta(days=365 * 7000)).isoformat()) == "future_timestamp"
    assert verdict("45000", timestamp=(NOW + timedelta(seconds=30)).isoformat()) == "accepted"
    assert verdict("45000", current_price="1") == "price_out_of_band"
    assert verdict("45000", price="44000") == "accepted"  # within 10 %
    assert verdict(None, price="1000") == "accepted"  # no trusted price: the paper venue uses the signal's
    big = make_signal("s1", "BTCUSDT", "buy", quantity="50", confidence="0.9")
    refused = decide(big, book, market, Decimal("45000"), NOW, Rules())
    assert isinstance(refused, Refused) and refused.reason_code == "order_too_large"
    assert refused.reason == "notional 2250000 above the order limit 1000000"


def test_amounts_read_as_people_write_them() -> None:
    assert [amount(Decimal(x)) for x in ("5E+1", "0.10000", "50.00", "0", "1E-8")] == [
        "50",
        "0.1",
        "50",
        "0",
        "0.00000001",
    ]


def test_ticks_outside_what_the_database_holds_are_refused() -> None:
    assert isinstance(parse_tick("prices.BTCUSDT", b'{"symbol":"BTCUSDT","price":"1000000000"}'), str)
    assert parse_tick("prices.BTCUSDT", b'{"symbol":"BTCUSDT","price":"999999999"}') == (
        "BTCUSDT",
        Decimal("999999999"),
    )


def test_outages_are_told_apart_from_errors_of_the_events() -> None:
    assert is_outage(asyncmy.errors.OperationalError(2013, "Lost connection"))
    assert is_outage(asyncmy.errors.OperationalError(1213, "Deadlock"))
    assert is_outage(asyncmy.errors.OperationalError(1142, "INSERT command denied"))
    assert is_outage(asyncmy.errors.InterfaceError(0, "Not connected"))
    assert is_outage(ConnectionResetError())
    assert not is_outage(asyncmy.errors.OperationalError(4025, "CONSTRAINT `metadata` failed"))
    assert not is_outage(asyncmy.errors.DataError(1264, "Out of range"))
    assert not is_outage(asyncmy.errors.IntegrityError(1452, "foreign key"))
    assert not is_outage(ArithmeticError("division by zero"))
    assert not is_outage(ValueError("bad"))


def test_a_lease_holder_is_gone_only_when_this_host_sees_its_process_end() -> None:
    me = Holder.this_process()
    assert not me.gone()
    assert dataclasses.replace(me, started="1").gone()  # same pid, another start: a restart
    # Another kernel boot or pid namespace (a container sharing the host name): never seen gone.
    assert not dataclasses.replace(me, started="1", machine="other-boot:pid:[1]").gone()
    assert not dataclasses.replace(me, started="1", machine="").gone()
    decoded = Holder.decode(me.encode())
    assert decoded is not None and dataclasses.replace(decoded, renewed=0.0) == me
    assert Holder.decode(b"not json") is None


@settings(max_examples=200, deadline=None)
@given(
    st.integers(-(10**9), 10**9),
    st.sampled_from(["quantity", "price", "stop_loss", "metadata"]),
    st.booleans(),
)
@example(-999_999_999, "stop_loss", False)
@example(-999_999_999, "quantity", True)
@example(999_999, "metadata", True)
def test_no_exponent_makes_a_stored_event_large(exponent: int, field: str, bare: bool) -> None:
    """An amount is written out in full in every event: whatever the exponent, as a JSON
    number or as a string, what the worker stores stays small."""
    value = f"1E{exponent}"
    body: dict[str, object] = {"strategy_id": "s1", "symbol": "BTCUSDT", "action": "buy", "quantity": "0.01"}
    body[field] = {"x": value} if field == "metadata" else value
    data = json.dumps(body)
    if bare:
        data = data.replace(f'"{value}"', value)  # a JSON number, not a string
    assert len(store_of(data.encode())) < 10_000


def test_an_open_above_what_the_venue_takes_in_parts_is_refused_before_sending() -> None:
    market = dataclasses.replace(BUILTIN_MARKETS["BTCUSDT"], max_quantity=Decimal("0.01"))
    parts = make_signal("s1", "BTCUSDT", "buy", quantity="0.36", confidence="0.9")
    assert isinstance(decide(parts, PositionBook(), market, Decimal("100"), NOW, Rules()), Accepted)
    signal = make_signal("s1", "BTCUSDT", "buy", quantity="0.361", confidence="0.9")
    refused = decide(signal, PositionBook(), market, Decimal("100"), NOW, Rules())
    assert isinstance(refused, Refused) and refused.reason_code == "above_max_quantity"
    assert refused.reason == "quantity 0.361 above 36 orders of the venue's 0.01 per market order"
