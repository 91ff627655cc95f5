"""The projection of events into rows: which statements a batch of events makes (pure, no I/O)."""

from __future__ import annotations

import json
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from engine.adapters.mysql_sql import MultiRowInsert, SqlLiterals, finish, finish_cooperatively, utc_naive
from engine.domain.events import (
    ControlApplied,
    Event,
    PositionClosed,
    PositionFunding,
    PositionOpened,
    SignalDead,
    SignalDecided,
)
from engine.domain.model import ZERO


def first_of_each(
    events: Sequence[tuple[Event, int | None]], seen: set[str]
) -> list[tuple[Event, int | None]]:
    """The events whose id is not in `seen`, each id once (the first delivery of it)."""
    fresh: list[tuple[Event, int | None]] = []
    for event, seq in events:
        if event.event_id not in seen:
            seen.add(event.event_id)
            fresh.append((event, seq))
    return fresh


@dataclass(frozen=True, slots=True)
class ProjectedBatch:
    """A batch's statements, rendered without a connection: all but strategy_stats, whose
    deltas read the positions back after this batch's statements have run."""

    events: list[tuple[Event, int | None]]  # their processed_events rows are rendered when written
    statements: list[str]
    opened: list[PositionOpened]
    closed: list[PositionClosed]
    no_backslash_escapes: bool


def project(events: Sequence[tuple[Event, int | None]], no_backslash_escapes: bool) -> ProjectedBatch:
    """The statements writing `events` (repeats within the batch dropped), as if none of them
    had been stored before; `MysqlStore.write` checks that they were not."""
    return finish(_projection(events, no_backslash_escapes))


async def project_cooperatively(
    events: Sequence[tuple[Event, int | None]], no_backslash_escapes: bool
) -> ProjectedBatch:
    """`project`, giving the event loop a turn about every millisecond: rendering a batch takes
    tens of milliseconds, and the writer must not wait that long to send MySQL its next
    statement."""
    return await finish_cooperatively(_projection(events, no_backslash_escapes))


def _projection(
    events: Sequence[tuple[Event, int | None]], no_backslash_escapes: bool
) -> Generator[None, None, ProjectedBatch]:
    fresh = first_of_each(events, seen=set())
    literals = SqlLiterals(no_backslash_escapes)
    statements: list[str] = []
    decided = [e for e, _ in fresh if isinstance(e, SignalDecided)]
    opened = [e for e, _ in fresh if isinstance(e, PositionOpened)]
    closed = [e for e, _ in fresh if isinstance(e, PositionClosed)]
    dead = [e for e, _ in fresh if isinstance(e, SignalDead)]
    if decided:
        statements += yield from _INSERT_DECISION.statement_steps(literals, map(_decision_row, decided))
    if dead:
        statements += yield from _INSERT_DEAD.statement_steps(literals, map(_dead_row, dead))
    controls = [e for e, _ in fresh if isinstance(e, ControlApplied)]
    if controls:
        statements += yield from _INSERT_CONTROL.statement_steps(literals, map(_control_row, controls))
    if opened or closed:
        rows = _strategy_position_rows(opened, closed)
        yield
        statements += yield from _UPSERT_STRATEGY_POSITION.statement_steps(literals, rows)
    if opened:
        statements += yield from _INSERT_CONTRIBUTION.statement_steps(
            literals, map(_contribution_row, opened)
        )
    if closed:
        statements += yield from _INSERT_CLOSE.statement_steps(literals, map(_close_row, closed))
    funded = [e for e, _ in fresh if isinstance(e, PositionFunding)]
    if funded:
        statements += yield from _INSERT_FUNDING.statement_steps(literals, map(_funding_row, funded))
        totals: dict[str, Decimal] = {}
        for f in funded:
            totals[f.strategy_id] = totals.get(f.strategy_id, ZERO) + f.amount
        statements += yield from _ADD_STRATEGY_FUNDING.statement_steps(literals, totals.items())
    if closed:
        # The original attribution query's columns on the contribution (migration 008).
        ids = sorted({e.strategy_position_id for e in closed})
        yield
        statements.append(
            # By the slices' own index (migration 009): a scan would lock every contribution,
            # those another attribution consumer is writing included.
            "UPDATE position_contributions c FORCE INDEX (ix_contribution_position) JOIN strategy_positions sp"  # nosec B608  # ids rendered by SqlLiterals (asyncmy escaping, tested)
            " ON sp.strategy_position_id = c.strategy_position_id"
            " SET c.status = sp.status, c.contribution_pnl = sp.realized_pnl,"
            " c.exit_price = IF(sp.closed_quantity > 0, sp.exit_notional / sp.closed_quantity, NULL)"
            f" WHERE c.strategy_position_id IN {literals.row(ids)}"
        )
    positional = [e for e, _ in fresh if isinstance(e, PositionOpened | PositionClosed)]
    if positional:
        statements += yield from _UPSERT_EXCHANGE_POSITION.statement_steps(
            literals, _fold_exchange_positions(positional)
        )
    return ProjectedBatch(fresh, statements, opened, closed, no_backslash_escapes)


_INSERT_DECISION = MultiRowInsert.of(
    "INSERT INTO signal_decisions (event_id, signal_id, strategy_id, symbol, action, outcome,"
    " reason_code, reason, confidence, strategy_position_ids, decided_at, risk_limit, risk_figure)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)


def _decision_row(e: SignalDecided) -> tuple[Any, ...]:
    return (
        e.event_id, e.signal_id, e.strategy_id, e.symbol, e.action.value, e.outcome.value, e.reason_code,
        e.reason[:1024], e.confidence, json.dumps(e.strategy_position_ids), utc_naive(e.occurred_at),
        e.limit, e.figure,
    )  # fmt: skip


_INSERT_CONTROL = MultiRowInsert.of(
    "INSERT INTO control_actions (event_id, command_id, command, strategy_id, symbol, outcome, cause,"
    " reason, closed_positions, halted, applied_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)


def _control_row(e: ControlApplied) -> tuple[Any, ...]:
    halted = [{"strategy_id": h.strategy_id, "symbol": h.symbol, "cause": h.cause,
               "until": h.until.isoformat() if h.until else None} for h in e.halted]  # fmt: skip
    return (
        e.event_id, e.command_id, e.command, e.strategy_id, e.symbol, e.outcome, e.cause, e.reason[:1024],
        json.dumps(e.closed_positions), json.dumps(halted), utc_naive(e.occurred_at),
    )  # fmt: skip


_INSERT_DEAD = MultiRowInsert.of(
    "INSERT INTO dead_letters (event_id, subject, reason_code, errors, payload, strategy_id, received_at)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s)"
)


def _dead_row(e: SignalDead) -> tuple[Any, ...]:
    return (
        e.event_id, e.subject[:255], e.reason_code, json.dumps(e.errors), e.payload,
        e.strategy_id[:64] if e.strategy_id else None,
        utc_naive(e.received_at),
    )  # fmt: skip


# One statement for the batch's opens and closes. A position opened in this batch is inserted
# with its closes of the batch already folded in (most positions open and close within one
# batch); one opened earlier exists, so only the UPDATE part runs, adding the batch's deltas.
_UPSERT_STRATEGY_POSITION = MultiRowInsert.of(
    "INSERT INTO strategy_positions (strategy_position_id, strategy_id, signal_id, symbol, position_side,"
    " exchange_position_id, status, entry_price, quantity, remaining_quantity, take_profit_price,"
    " stop_loss_price, confidence, entry_fee, client_order_id, exchange_order_id, timeframe, metadata,"
    " opened_at, closed_quantity, exit_fees, exit_notional, gross_pnl, realized_pnl, close_reason, closed_at)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,"
    " %s, %s, %s)"
    " ON DUPLICATE KEY UPDATE remaining_quantity = VALUES(remaining_quantity),"
    " closed_quantity = closed_quantity + VALUES(closed_quantity), exit_fees = exit_fees + VALUES(exit_fees),"
    " exit_notional = exit_notional + VALUES(exit_notional), gross_pnl = gross_pnl + VALUES(gross_pnl),"
    " realized_pnl = realized_pnl + VALUES(realized_pnl), close_reason = VALUES(close_reason),"
    " status = VALUES(status), closed_at = VALUES(closed_at)"
)


def _strategy_position_rows(
    opened: list[PositionOpened], closed: list[PositionClosed]
) -> list[tuple[Any, ...]]:
    closes = _fold_strategy_closes(closed)
    rows: list[tuple[Any, ...]] = []
    for e in opened:
        c = closes.pop(e.strategy_position_id, None) or _FoldedCloses(remaining=e.quantity)
        rows.append((
            e.strategy_position_id, e.strategy_id, e.signal_id, e.symbol, e.side.value,
            e.exchange_position.exchange_position_id, c.status, e.entry_price, e.quantity, c.remaining,
            e.take_profit_price, e.stop_loss_price, e.confidence, e.fee, e.client_order_id, e.exchange_order_id,
            e.timeframe, json.dumps(e.metadata, default=str) if e.metadata is not None else None,
            utc_naive(e.occurred_at), *c.deltas(),
        ))  # fmt: skip
    for position_id, c in closes.items():
        # Opened in an earlier batch: the columns before remaining_quantity's deltas only
        # fill the INSERT part, which never runs (an open precedes its closes in the stream).
        rows.append((
            position_id, "", "", "", "LONG", "", c.status, 0, 0, c.remaining, None, None, 0, 0, "", "", None,
            None, c.last_at, *c.deltas(),
        ))  # fmt: skip
    return rows


_INSERT_CONTRIBUTION = MultiRowInsert.of(
    "INSERT INTO position_contributions (contribution_id, exchange_position_id, strategy_position_id,"
    " strategy_id, symbol, position_side, sequence, quantity, entry_price, quantity_before,"
    " quantity_after, avg_entry_price_after, created_at)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)


def _contribution_row(e: PositionOpened) -> tuple[Any, ...]:
    ep = e.exchange_position
    return (
        e.contribution.contribution_id, ep.exchange_position_id, e.strategy_position_id, e.strategy_id,
        e.symbol, e.side.value, e.contribution.sequence, e.quantity, e.entry_price, ep.quantity_before,
        ep.quantity_after, ep.avg_entry_price, utc_naive(e.occurred_at),
    )  # fmt: skip


_INSERT_CLOSE = MultiRowInsert.of(
    "INSERT INTO position_closes (event_id, strategy_position_id, strategy_id, exchange_position_id, symbol,"
    " position_side, closed_quantity, remaining_quantity, entry_price, exit_price, exchange_quantity_after,"
    " gross_pnl, entry_fee_share, exit_fee, fee, realized_pnl, close_reason, client_order_id,"
    " exchange_order_id, signal_id, closed_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,"
    " %s, %s, %s, %s, %s, %s, %s, %s)"
)


def _close_row(e: PositionClosed) -> tuple[Any, ...]:
    return (
        e.event_id, e.strategy_position_id, e.strategy_id, e.exchange_position.exchange_position_id, e.symbol,
        e.side.value, e.closed_quantity, e.remaining_quantity, e.entry_price, e.exit_price,
        e.exchange_position.quantity_after, e.gross_pnl, e.entry_fee_share, e.exit_fee, e.fee, e.realized_pnl, e.close_reason.value, e.client_order_id,
        e.exchange_order_id, e.signal_id, utc_naive(e.occurred_at),
    )  # fmt: skip


@dataclass(slots=True)
class _FoldedCloses:
    """One strategy position's closes in a batch: its final state and the sums to add."""

    remaining: Decimal
    closed_quantity: Decimal = ZERO
    exit_fees: Decimal = ZERO
    exit_notional: Decimal = ZERO
    gross_pnl: Decimal = ZERO
    realized_pnl: Decimal = ZERO
    close_reason: str | None = None
    last_at: datetime | None = None

    @property
    def status(self) -> str:
        return "closed" if self.remaining == 0 else "open"

    def deltas(self) -> tuple[Any, ...]:
        closed_at = self.last_at if self.remaining == 0 else None
        return (
            self.closed_quantity, self.exit_fees, self.exit_notional, self.gross_pnl, self.realized_pnl,
            self.close_reason, closed_at,
        )  # fmt: skip


def _fold_strategy_closes(closed: list[PositionClosed]) -> dict[str, _FoldedCloses]:
    folded: dict[str, _FoldedCloses] = {}
    for e in closed:
        c = folded.get(e.strategy_position_id)
        if c is None:
            c = folded[e.strategy_position_id] = _FoldedCloses(remaining=e.remaining_quantity)
        c.remaining = e.remaining_quantity
        c.closed_quantity += e.closed_quantity
        c.exit_fees += e.exit_fee
        c.exit_notional += e.exit_price * e.closed_quantity
        c.gross_pnl += e.gross_pnl
        c.realized_pnl += e.realized_pnl
        c.close_reason = e.close_reason.value
        c.last_at = utc_naive(e.occurred_at)
    return folded


_INSERT_FUNDING = MultiRowInsert.of(
    "INSERT INTO funding_payments (event_id, strategy_position_id, strategy_id, symbol, position_side,"
    " exchange_position_id, amount, rate, mark_price, funding_time, venue_ref, recorded_at)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)


_ADD_STRATEGY_FUNDING = MultiRowInsert.of(
    "INSERT INTO strategy_stats (strategy_id, total_funding) VALUES (%s, %s)"
    " ON DUPLICATE KEY UPDATE total_funding = total_funding + VALUES(total_funding)"
)


def _funding_row(e: PositionFunding) -> tuple[Any, ...]:
    return (
        e.event_id, e.strategy_position_id, e.strategy_id, e.symbol, e.side.value, e.exchange_position_id,
        e.amount, e.rate, e.mark_price, utc_naive(e.funding_time), e.venue_ref[:128], utc_naive(e.occurred_at),
    )  # fmt: skip


_UPSERT_EXCHANGE_POSITION = MultiRowInsert.of(
    "INSERT INTO exchange_positions (exchange_position_id, position_key, symbol, position_side, status,"
    " quantity, max_quantity, avg_entry_price, contributions, realized_pnl, total_fees, opened_at, closed_at,"
    " updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON DUPLICATE KEY UPDATE status = VALUES(status), quantity = VALUES(quantity),"
    " max_quantity = GREATEST(max_quantity, VALUES(max_quantity)),"
    " avg_entry_price = IF(VALUES(quantity) = 0, avg_entry_price, VALUES(avg_entry_price)),"
    " contributions = contributions + VALUES(contributions), realized_pnl = realized_pnl + VALUES(realized_pnl),"
    " total_fees = total_fees + VALUES(total_fees), closed_at = VALUES(closed_at),"
    " updated_at = VALUES(updated_at)"
)


def _fold_exchange_positions(events: list[PositionOpened | PositionClosed]) -> list[tuple[Any, ...]]:
    """Per exchange position: final state from the batch's last event, deltas summed in order."""
    folded: dict[str, list[Any]] = {}
    for e in events:
        ep = e.exchange_position
        at = utc_naive(e.occurred_at)
        row = folded.get(ep.exchange_position_id)
        if row is None:
            row = folded[ep.exchange_position_id] = [
                ep.exchange_position_id, ep.key, e.symbol, e.side.value, "open", 0, 0, 0, 0, 0, 0, at, None, at,
            ]  # fmt: skip
        flat = ep.quantity_after == 0
        row[4] = "closed" if flat else "open"
        row[5] = ep.quantity_after
        row[6] = max(row[6], ep.quantity_after)
        if not flat:  # a flat position keeps the average it was closed at
            row[7] = ep.avg_entry_price
        if isinstance(e, PositionOpened):
            row[8] += 1
            row[10] += e.fee
        else:
            row[9] += e.realized_pnl
            row[10] += e.exit_fee
        row[12] = at if flat else None
        row[13] = at
    return [tuple(row) for row in folded.values()]
