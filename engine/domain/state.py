"""The worker's state, with one owner: everything it knows is the fold of its own events
(DESIGN §2). `apply` folds one event in, live or on replay; `admit` is the first step of a
signal: whether it is new, seen, or something a crash left half done. Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import Enum

from engine.domain.book import PositionBook
from engine.domain.control import restore_halts
from engine.domain.events import (
    ControlApplied,
    Event,
    OrderFailed,
    OrderSettled,
    OrderSubmitted,
    PositionClosed,
    PositionFunding,
    PositionOpened,
    PositionReconciled,
    SignalDead,
    SignalDecided,
)
from engine.domain.funding import SliceHistory
from engine.domain.journal import OrderJournal
from engine.domain.ledger import SignalLedger
from engine.domain.model import ZERO, Action, CloseReason, StrategyPositionId
from engine.domain.reconcile import EXTERNAL_STRATEGY
from engine.domain.risk import RiskBook, RiskLimits
from engine.domain.signals import Signal


class Admit(Enum):
    PROCEED = "proceed"  # decide it (a close cut short by a crash: what is left of it)
    REDELIVERED = "redelivered"  # decided at this very sequence: its events are stored
    DUPLICATE = "duplicate"  # its id was decided before, at another sequence
    AWAITING = "awaiting"  # an order of it has an unknown outcome: its lookup decides it
    RECOVERED = "recovered"  # opened before a crash, undecided: record the decision only


@dataclass(frozen=True, slots=True)
class Admission:
    verdict: Admit
    signal: Signal
    closed_before: Decimal | None = None  # a close signal: what it had closed before a crash


class EngineState:
    def __init__(self, limits: RiskLimits | None = None, started_at: datetime | None = None) -> None:
        self.book = PositionBook()
        self.ledger = SignalLedger()
        self.journal = OrderJournal()
        self.risk = RiskBook(limits)
        self.slice_history = SliceHistory()  # which slices were open when: funding splits
        self.attributed_orders: set[str] = set()  # venue orders already booked (reconciliation)
        self.funding_refs: set[str] = set()  # venue funding payments already attributed
        self.funding_parts: dict[str, set[str]] = {}  # payments partly stored: the parts stored
        self.funded_through: dict[str, datetime] = {}  # per symbol: the last funding time booked
        self.last_event_at: datetime | None = None
        self.started_at = started_at
        self.replayed_cash = ZERO  # closed PnL less every fee plus funding, over every trade folded in
        self._replayed_opens: set[str] = set()  # during replay only
        # Loaded from a snapshot: the slices it saw close in its last day (an open of one stored
        # again after it must not reopen it; the full replay knows that from _replayed_opens).
        self._closed_before_snapshot: set[str] = set()

    def adopt(self, other: EngineState) -> None:
        """Take `other`'s contents into this state's own objects (the worker's parts hold them)."""
        book, ledger, journal = self.book, self.ledger, self.journal
        book.positions, book.exchange, book.by_key = (
            other.book.positions,
            other.book.exchange,
            other.book.by_key,
        )
        book.triggers, book.strategy_cost, book.strategy_open = (
            other.book.triggers,
            other.book.strategy_cost,
            other.book.strategy_open,
        )
        ledger._signals, ledger._closed = other.ledger._signals, other.ledger._closed
        journal.pending, journal.booked, journal.closing = (
            other.journal.pending,
            other.journal.booked,
            other.journal.closing,
        )
        self.risk.halts, self.risk.today = other.risk.halts, other.risk.today
        self.slice_history.changes = other.slice_history.changes
        self.attributed_orders, self.funding_refs = other.attributed_orders, other.funding_refs
        self.funding_parts, self.funded_through = other.funding_parts, other.funded_through
        self.last_event_at, self.replayed_cash = other.last_event_at, other.replayed_cash
        self._closed_before_snapshot = {
            change[2]
            for changes in self.slice_history.changes.values()
            for change in changes
            if change[1] < 0
        }

    def end_replay(self) -> None:
        self._replayed_opens = set()
        self._closed_before_snapshot = set()

    def apply(self, event: Event, replay: bool = False) -> None:
        """Fold an event in. On replay the book is rebuilt from it too (live, the book applied
        it already when it made it)."""
        self.last_event_at = event.occurred_at  # live too: a snapshot covers up to its last event
        match event:
            case SignalDecided():
                self.ledger.apply(event)
            case PositionOpened():
                self._opened(event, replay)
            case PositionClosed():
                self._closed(event, replay)
            case OrderSubmitted() | OrderSettled() | OrderFailed():
                if replay:
                    self.journal.apply(event)
            case PositionReconciled():
                self.attributed_orders.update(event.venue_order_ids)
            case PositionFunding():
                self._funded(event, replay)
            case ControlApplied():
                if replay:
                    restore_halts(self.risk, event)
            case SignalDead():
                pass

    def _opened(self, event: PositionOpened, replay: bool) -> None:
        self.slice_history.record(event, self.started_at if replay and self.started_at else event.occurred_at)
        if not replay:
            self.risk.book(event.strategy_id, event.occurred_at, -event.fee)
            self.replayed_cash -= event.fee
        elif (
            event.strategy_position_id not in self._replayed_opens
            and event.strategy_position_id not in self.book.positions  # stored again, still open
            # stored again after a snapshot, of a slice it saw close in its last day
            and event.strategy_position_id not in self._closed_before_snapshot
        ):
            self._replayed_opens.add(event.strategy_position_id)
            self.book.apply(event)  # a re-stored open of a slice closed since is not reopened
            self.replayed_cash -= event.fee
            self.risk.book(event.strategy_id, event.occurred_at, -event.fee)
        self.ledger.apply(event)
        self.journal.apply(event)
        if event.strategy_id == EXTERNAL_STRATEGY:
            self.attributed_orders.update(event.exchange_order_id.split(","))

    def _closed(self, event: PositionClosed, replay: bool) -> None:
        self.slice_history.record(event, self.started_at if replay and self.started_at else event.occurred_at)
        cash = event.gross_pnl - event.exit_fee
        if replay:
            closing = self.book.positions.get(StrategyPositionId(event.strategy_position_id))
            if closing is not None and event.event_id == self.book.next_close_event_id(closing):
                self.risk.book(event.strategy_id, event.occurred_at, cash)  # once, as the book
                self.replayed_cash += cash
            self.book.apply(event)
        else:
            self.risk.book(event.strategy_id, event.occurred_at, cash)
            self.replayed_cash += cash
        self.ledger.apply(event)
        self.journal.apply(event)
        if event.close_reason in (CloseReason.MANUAL, CloseReason.LIQUIDATION):
            self.attributed_orders.update(event.exchange_order_id.split(","))

    def _funded(self, event: PositionFunding, replay: bool) -> None:
        # A payment counts as booked once all its parts are stored: a crash in the middle of
        # storing them leaves it to the next round, which books the missing parts.
        seen = self.funding_parts.setdefault(event.venue_ref, set())
        seen.add(event.event_id)
        if len(seen) >= event.parts:
            del self.funding_parts[event.venue_ref]
            self.funding_refs.update(event.venue_ref.split("+"))
            booked = self.funded_through.get(event.symbol)
            if booked is None or event.funding_time > booked:
                self.funded_through[event.symbol] = event.funding_time
        self.risk.book(event.strategy_id, event.occurred_at, event.amount)
        self.replayed_cash += event.amount

    def admit(self, signal: Signal, sequence: int) -> Admission:
        """What to do with a signal before deciding it, from what the events say of it."""
        prior = self.ledger.decided_at(signal.strategy_id, signal.id)
        if prior is not False:
            return Admission(Admit.REDELIVERED if prior == sequence else Admit.DUPLICATE, signal)
        if self.journal.pending and self.journal.awaiting(signal.strategy_id, signal.id):
            return Admission(Admit.AWAITING, signal)
        if signal.opening_side is not None and self.ledger.was_opened(signal.strategy_id, signal.id):
            return Admission(Admit.RECOVERED, signal)
        if signal.action is not Action.CLOSE:
            return Admission(Admit.PROCEED, signal)
        closed_before = self.ledger.closed_for(signal.strategy_id, signal.id)
        if closed_before is not None and signal.quantity is not None:
            # A close signal cut short by a crash: close what is left of it, no more.
            signal = signal.model_copy(update={"quantity": signal.quantity - closed_before})
        return Admission(Admit.PROCEED, signal, closed_before)
