"""The worker's state as plain data, and back (issue #16: a restart independent of history).

A snapshot is the state after every event up to a stream sequence, so a start loads it and
replays only the events after that sequence. JSON-able values only (decimals as strings, times
ISO-8601, the dedupe ledger as base64 of packed bytes): nothing in it can run code, whoever
wrote the bytes. `FORMAT` changes whenever the shape does; a snapshot of a format not in
`READS` is ignored and the whole stream replayed.
"""

from __future__ import annotations

import base64
import itertools
import sys
from collections import deque
from collections.abc import Iterator
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import orjson

from engine.domain.book import ExchangePosition, StrategyPosition
from engine.domain.events import OrderSubmitted, event_adapter
from engine.domain.model import (
    ClientOrderId,
    ExchangePositionId,
    PositionKey,
    PositionSide,
    StrategyId,
    StrategyPositionId,
    json_default,
)
from engine.domain.risk import DayTally, Halt, HaltCause, RiskLimits, Scope
from engine.domain.state import EngineState

FORMAT = 2  # 2: the ledger's decided signals packed (base64 of bytes), not a list of pairs
READS = (1, 2)  # 1 is still read: the first start after an upgrade needs no whole replay


def _D(value: str | None) -> Decimal | None:
    return None if value is None else Decimal(value)


def _T(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def to_json(data: dict[str, Any]) -> bytes:
    """`dump`'s data as JSON: decimals as their text, times ISO-8601, written by orjson in C
    (100,000 positions make no string of their own on the way)."""
    return orjson.dumps(data, default=json_default)


def json_pieces(state: EngineState, chunk: int = 5_000) -> Iterator[bytes]:
    """`to_json(dump(state))` in pieces, the positions a chunk at a time: a snapshot of 100,000
    positions never holds them all as rows at once (the worker's memory target)."""
    data = dump(state, with_positions=False)
    yield b'{"positions":['
    rows = _position_rows(state)
    first = True
    while True:
        part = list(itertools.islice(rows, chunk))
        if not part:
            break
        text = to_json(part)  # type: ignore[arg-type]
        yield (b"" if first else b",") + text[1:-1]
        first = False
    yield b"]," + to_json(data)[1:]


def _position_rows(state: EngineState) -> Iterator[list[Any]]:
    for keyed in state.book.by_key.values():  # per key, oldest first
        for sp in keyed.values():
            yield [sp.id, sp.strategy_id, sp.symbol, sp.side, sp.entry_price, sp.quantity, sp.remaining,
                   sp.take_profit, sp.stop_loss, sp.entry_fee, sp.entry_fee_left, sp.confidence,
                   sp.exchange_position_id, sp.opened_at, sp.closes, sp.realized_pnl]  # fmt: skip


def dump(state: EngineState, with_positions: bool = True) -> dict[str, Any]:
    """The state as JSON-able data (decimals and times as they are; `to_json` writes them)."""
    book = state.book
    exchange = [
        [ep.id, ep.key.symbol, ep.key.side, ep.quantity, ep.cost, ep.contributions, ep.opened_at]
        for ep in book.exchange.values()
    ]  # fmt: skip
    ledger = state.ledger
    keys, sequences = ledger.packed()
    journal = state.journal
    submitted = event_adapter(OrderSubmitted)
    risk = state.risk
    return {
        "format": FORMAT,
        **({"positions": list(_position_rows(state))} if with_positions else {}),
        "exchange": exchange,
        "ledger": {
            "keys": base64.b64encode(keys).decode(),
            "sequences": base64.b64encode(sequences).decode(),
            "closed": [[k.hex(), v] for k, v in ledger._closed.items()],
        },
        "journal": {
            "pending": [submitted.dump_python(e, mode="json") for e in journal.pending.values()],
            "booked": {cid: {pid: [q, f] for pid, (q, f) in legs.items()} for cid, legs in journal.booked.items()},
            "closing": dict(journal.closing),
        },
        "halts": [
            [h.scope.strategy_id, h.scope.symbol, h.cause, h.reason, h.since, h.until] for h in risk.halts.values()
        ],
        "today": {
            "day": None if risk.today.day is None else risk.today.day.isoformat(),
            "by_strategy": dict(risk.today.by_strategy),
            "account": risk.today.account,
        },
        "slice_history": {symbol: [list(change) for change in changes]
                          for symbol, changes in state.slice_history.changes.items()},
        "attributed_orders": sorted(state.attributed_orders),
        "funding_refs": sorted(state.funding_refs),
        "funding_parts": {ref: sorted(parts) for ref, parts in state.funding_parts.items()},
        "funded_through": dict(state.funded_through),
        "last_event_at": state.last_event_at,
        "replayed_cash": state.replayed_cash,
        # The day's tally is kept only under a day's-loss limit: a start with one needs a
        # snapshot that kept it.
        "tally_kept": state.risk.limits.watches_daily_loss,
    }  # fmt: skip


def load(
    data: dict[str, Any], limits: RiskLimits | None = None, started_at: datetime | None = None
) -> EngineState:
    """The state a snapshot holds; ValueError if it is not one this version reads."""
    shape = data.get("format")
    if type(shape) is not int or shape not in READS:  # not True or 1.0, which equal 1
        raise ValueError(f"snapshot format {shape!r}, this version reads {READS}")
    if limits is not None and limits.watches_daily_loss and not data.get("tally_kept"):
        raise ValueError("the snapshot kept no day's tally, and a day's-loss limit needs one")
    state = EngineState(limits, started_at)
    book = state.book
    for row in data["exchange"]:
        ep_id, symbol, side, quantity, cost, contributions, opened_at = row
        key = PositionKey(sys.intern(symbol), PositionSide(side))
        book.exchange[key] = ExchangePosition(
            ExchangePositionId(ep_id), key, Decimal(quantity), Decimal(cost), contributions, _T(opened_at)
        )
    for row in data["positions"]:
        (pid, sid, symbol, side, entry, quantity, remaining, tp, sl, fee, fee_left, confidence, ep_id, opened_at,
         closes, realized) = row  # fmt: skip
        sp = StrategyPosition(
            id=StrategyPositionId(pid), strategy_id=StrategyId(sys.intern(sid)), symbol=sys.intern(symbol),
            side=PositionSide(side), entry_price=Decimal(entry), quantity=Decimal(quantity),
            remaining=Decimal(remaining), take_profit=_D(tp), stop_loss=_D(sl), entry_fee=Decimal(fee),
            entry_fee_left=Decimal(fee_left), confidence=Decimal(confidence),
            exchange_position_id=ExchangePositionId(ep_id), opened_at=_T(opened_at) or datetime.min,
            closes=closes, realized_pnl=Decimal(realized),
        )  # fmt: skip
        book.positions[sp.id] = sp
        book.by_key.setdefault(sp.key, {})[sp.id] = sp
        book.strategy_cost[sp.strategy_id] = book.strategy_cost.get(sp.strategy_id, Decimal(0)) + (
            sp.entry_price * sp.remaining
        )
        book.strategy_open[sp.strategy_id] = book.strategy_open.get(sp.strategy_id, 0) + 1
        book.triggers.arm(sp.symbol, sp.side, sp.id, sp.take_profit, sp.stop_loss)
    ledger = data["ledger"]
    if shape == 1:
        state.ledger.restore((bytes.fromhex(k), v) for k, v in ledger["signals"])
    else:
        state.ledger.unpack(
            base64.b64decode(ledger["keys"], validate=True),
            base64.b64decode(ledger["sequences"], validate=True),
        )
    state.ledger._closed = {bytes.fromhex(k): Decimal(v) for k, v in ledger["closed"]}
    journal = data["journal"]
    submitted = event_adapter(OrderSubmitted)
    for raw in journal["pending"]:
        event = submitted.validate_python(raw)
        state.journal.pending[ClientOrderId(event.client_order_id)] = event
    state.journal.booked = {
        ClientOrderId(cid): {pid: (Decimal(q), Decimal(f)) for pid, (q, f) in legs.items()}
        for cid, legs in journal["booked"].items()
    }
    state.journal.closing = {pid: ClientOrderId(cid) for pid, cid in journal["closing"].items()}
    for strategy_id, symbol, cause, reason, since, until in data["halts"]:
        scope = Scope(strategy_id, symbol)
        state.risk.halts[scope] = Halt(scope, HaltCause(cause), reason, _T(since) or datetime.min, _T(until))
    today = data["today"]
    state.risk.today = DayTally(
        None if today["day"] is None else date.fromisoformat(today["day"]),
        {s: Decimal(v) for s, v in today["by_strategy"].items()},
        Decimal(today["account"]),
    )
    for symbol, changes in data["slice_history"].items():
        state.slice_history.changes[symbol] = deque(
            (datetime.fromisoformat(t), sign, pid, sid, PositionSide(side), Decimal(q), ep)
            for t, sign, pid, sid, side, q, ep in changes
        )
    state.attributed_orders = set(data["attributed_orders"])
    state.funding_refs = set(data["funding_refs"])
    state.funding_parts = {ref: set(parts) for ref, parts in data["funding_parts"].items()}
    state.funded_through = {symbol: t for symbol, raw in data["funded_through"].items() if (t := _T(raw))}
    state.last_event_at = _T(data["last_event_at"])
    state.replayed_cash = Decimal(data["replayed_cash"])
    return state
