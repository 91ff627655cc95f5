"""Orders at the venue (DESIGN §4.3): send one and book its fill; with a real venue, journal it
first, and look up by client order id an order whose outcome is unknown instead of sending it
again. A lookup that finds an order holds back nothing more: the decision it waited for is
recorded then (`decide_after_lookup`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import datetime, timedelta

import structlog

from engine import metrics
from engine.adapters.gateway import OrderRejected, OrderUncertain
from engine.app.decisions import Decisions
from engine.app.runtime import Runtime
from engine.domain.events import OrderSubmitted, PendingDecision
from engine.domain.journal import intent_of
from engine.domain.model import ClientOrderId, Outcome, StrategyPositionId
from engine.domain.orders import CloseLeg, Fill, OrderIntent
from engine.domain.reasons import Reason

log = structlog.get_logger(__name__)
LATE_LOOKUP_EVERY = 1.0  # seconds between lookups of an order whose request may still arrive
LOOKUP_COOLDOWN = 5.0  # seconds between lookups on a symbol whose venue did not answer


class OrderDesk:
    def __init__(self, rt: Runtime, decisions: Decisions) -> None:
        self.rt, self.decisions = rt, decisions
        # Stable for the worker's life: taken once (the parts run per signal and per tick).
        self.settings, self.clock, self.journaled = rt.settings, rt.clock, rt.journaled
        self.emit, self.remember, self.check_lease = rt.emit, rt.remember, rt.check_lease
        self.locks, self.last_prices, self.price_seen_at = rt.locks, rt.last_prices, rt.price_seen_at
        self.book, self.journal, self.ledger = rt.state.book, rt.state.journal, rt.state.ledger
        self.not_found_yet: set[str] = set()  # journaled orders a late request may still place
        self.redelivered_from: int | None = None  # at start: signals from here come again
        self.lookup_cooldown: dict[str, float] = {}

    async def place(
        self, intent: OrderIntent, decision: PendingDecision | None = None
    ) -> OrderRejected | OrderUncertain | None:
        """Send one order and book its fill; None when booked. With a real venue the order is
        journaled (and stored) first, and an order the journal still holds open is looked up
        by client order id instead of being sent again (DESIGN §4.3)."""
        self.check_lease()
        if self.journaled:
            journaled = self.journal.pending.get(intent.client_order_id)
            if journaled is not None:
                try:
                    known = await self.rt.gateway.find_order(intent.client_order_id, intent.symbol)
                except Exception as exc:
                    return OrderUncertain(f"{intent.client_order_id}: lookup failed ({exc!r})")
                final = self.outcome_final(journaled)
                if known is not None and (known.quantity >= journaled.quantity or final):
                    # Booked as sent, not as planned now; the signal being handled decides.
                    self.book_journaled(journaled, known, decide=False)
                    return None
                if not final:
                    self.wake_when_final(journaled)
                    return OrderUncertain(
                        f"{intent.client_order_id}: an earlier request may still reach the venue"
                    )
            journaled_at = self.clock()
            self.emit(self.journal.submit(intent, journaled_at, decision))
            await self.rt.flush()  # stored before it is sent
            # No request of it may leave later than a restarted worker assumes (the journal
            # entry's time plus the send span), however long storing it took.
            not_after: datetime | None = journaled_at + timedelta(seconds=self.rt.gateway.send_span_seconds)
        else:
            not_after = None
        self.check_lease()  # storing the journal entry may have taken long enough to lose it
        started = time.perf_counter()
        try:
            fill = await self.rt.gateway.execute(intent, not_after)
        except OrderRejected as exc:
            metrics.ORDER_ERRORS.labels(self.rt.gateway.name, exc.reason_code).inc()
            log.warning("order.rejected", reason_code=exc.reason_code, error=str(exc))
            if self.journaled:
                self.emit(self.journal.failed(intent, exc.reason_code, str(exc), self.clock()))
            return exc
        except Exception as exc:  # OrderUncertain, or anything unforeseen: the journal keeps it
            metrics.ORDER_ERRORS.labels(self.rt.gateway.name, "uncertain").inc()
            log.error("order.uncertain", client_order_id=intent.client_order_id, error=repr(exc))
            return exc if isinstance(exc, OrderUncertain) else OrderUncertain(repr(exc))
        metrics.child(metrics.ORDER_LATENCY, self.rt.gateway.name).observe(time.perf_counter() - started)
        self.book_fill(intent, fill)
        if self.journaled:
            self.emit(self.journal.settled(intent, fill, self.clock()))
        return None

    def book_fill(self, intent: OrderIntent, fill: Fill) -> None:
        for event in self.book.settle(intent, fill, self.clock()):
            self.remember(event)
            self.emit(event)

    def book_journaled(self, submitted: OrderSubmitted, fill: Fill, decide: bool) -> None:
        """Book a fill found at the venue for a journaled order, minus legs already booked,
        then (with `decide`) the decision it held back, then the record that closes it: if a
        crash stores only part of this, the entry is looked up again."""
        intent = intent_of(submitted)
        rest = self.journal.unbooked_part(intent, fill)
        if rest is not None:
            self.book_fill(*rest)
        if decide:
            self.decide_after_lookup(submitted, filled=True)
        self.emit(self.journal.settled(intent, fill, self.clock()))
        self.rearm_still_open(intent)

    def decide_after_lookup(self, submitted: OrderSubmitted, filled: bool) -> None:
        """Record the decision an unknown venue outcome held back, now that it is known."""
        pending = submitted.decision
        if pending is None or self.ledger.decided_at(pending.strategy_id, pending.signal_id) is not False:
            return
        if filled and not pending.later_orders:
            outcome, code, reason = Outcome.ACCEPTED, Reason.ACCEPTED_AFTER_LOOKUP, pending.reason
            ids = pending.strategy_position_ids
        elif filled:
            outcome, code = Outcome.REJECTED, Reason.PARTLY_PLACED
            reason = f"an order was filled after an unknown outcome; the {pending.later_orders} after it were not sent"
            ids = [*pending.closed_before, *(leg.position_id for leg in submitted.legs)]
        elif self.redelivered_from is not None and pending.signal_sequence >= self.redelivered_from:
            return  # its redelivery decides it afresh
        else:
            outcome, code, reason = Outcome.REJECTED, Reason.NOT_PLACED, "the venue never placed the order"
            ids = pending.closed_before
        self.decisions.record(
            pending.strategy_id,
            pending.signal_id,
            pending.symbol,
            pending.action,
            pending.confidence,
            pending.signal_sequence,
            outcome,
            code,
            reason,
            tuple(ids),
        )

    async def resolve_pending_at_start(self) -> None:
        """Resolve the journal before taking signals. An order of a signal that will be
        redelivered is waited for while a request of it may still reach the venue: deciding
        "not placed" sooner would let the redelivery send it a second time (issue #14)."""
        while True:
            self.not_found_yet.clear()
            await self.resolve_pending()
            assert self.redelivered_from is not None
            waiting = [
                p
                for p in self.journal.pending.values()
                if p.client_order_id in self.not_found_yet
                and p.decision is not None
                and p.decision.signal_sequence >= self.redelivered_from
            ]
            if not waiting or self.rt.stopping.is_set():
                return
            log.info(
                "worker.waiting_for_venue",
                orders=len(waiting),
                why="a request of these orders may still reach the venue; their signals wait",
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.rt.stopping.wait(), LATE_LOOKUP_EVERY)

    async def resolve_pending(self) -> None:
        """Look up every journaled order without an outcome: book it if the venue filled it,
        mark it failed if the venue never placed it (its signal may then place it again)."""
        for symbol in sorted({p.symbol for p in self.journal.pending.values()}):
            async with self.locks[symbol]:
                await self.resolve_symbol(symbol, cooldown=False)
        await self.rt.flush()

    async def resolve_symbol(self, symbol: str, *, cooldown: bool = True) -> bool:
        """Resolve the symbol's pending orders (its lock held); True when none is left. After
        a failed lookup the symbol waits LOOKUP_COOLDOWN before asking again, so an unreachable
        venue costs each signal of that symbol a rejection, not a minute of everyone's time."""
        if cooldown and time.monotonic() < self.lookup_cooldown.get(symbol, 0.0):
            return not self.journal.pending_on(symbol)
        for submitted in self.journal.pending_on(symbol):
            cid = ClientOrderId(submitted.client_order_id)
            intent = intent_of(submitted)
            try:
                fill = await self.rt.gateway.find_order(cid, symbol)
            except Exception as exc:
                log.warning("order.lookup_failed", client_order_id=cid, error=repr(exc))
                self.lookup_cooldown[symbol] = time.monotonic() + LOOKUP_COOLDOWN
                break
            if fill is not None and (fill.quantity >= submitted.quantity or self.outcome_final(submitted)):
                log.info("order.found_at_venue", client_order_id=cid, quantity=str(fill.quantity))
                self.book_journaled(submitted, fill, decide=True)
            elif not self.outcome_final(submitted):
                # Not found, or found short: an order sent in parts may have a part whose
                # request is still on its way.
                # A request of this order may still reach the venue (receive window, clock
                # margin): "not found" proves nothing yet. Look again once it cannot.
                self.not_found_yet.add(cid)
                log.info(
                    "order.not_found_yet", client_order_id=cid, look_again_in=self.wake_when_final(submitted)
                )
            else:
                log.info("order.not_placed", client_order_id=cid)
                self.decide_after_lookup(submitted, filled=False)
                self.emit(
                    self.journal.failed(
                        intent, Reason.NOT_PLACED, "the venue has no such order", self.clock()
                    )
                )
                self.rearm_still_open(intent)
        return not self.journal.pending_on(symbol)

    def outcome_final(self, submitted: OrderSubmitted) -> bool:
        closes_at = submitted.occurred_at + timedelta(seconds=self.rt.gateway.unknown_outcome_seconds)
        return self.clock() >= closes_at

    def wake_when_final(self, submitted: OrderSubmitted) -> float:
        """Wake the lookup round again soon (a late request may show up at the venue any
        moment), at the latest when the order's requests can no longer execute; returns the
        delay in seconds."""
        closes_at = submitted.occurred_at + timedelta(seconds=self.rt.gateway.unknown_outcome_seconds)
        delay = min(max((closes_at - self.clock()).total_seconds(), 0.0) + 0.1, LATE_LOOKUP_EVERY)
        asyncio.get_running_loop().call_later(delay, self.rt.wake_reconcile.set)
        return round(delay, 1)

    def rearm_still_open(self, intent: OrderIntent) -> None:
        """Slices a resolved close left open (not placed, or partly filled) get their TP/SL back."""
        for leg in intent.legs:
            if isinstance(leg, CloseLeg) and leg.position_id in self.book.positions:
                self.book.rearm(self.book.positions[StrategyPositionId(leg.position_id)])
