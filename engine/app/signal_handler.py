"""A signal, from its delivery to its decision: parse (a dead letter if it cannot be), admit
(seen before, or half done before a crash), decide, place the orders, record the outcome."""

from __future__ import annotations

import time

import structlog
from nats.aio.msg import Msg

from engine import metrics
from engine.adapters.gateway import OrderRejected, OrderUncertain
from engine.adapters.leases import LeaseLost
from engine.adapters.nats_consumers import jetstream_sequences
from engine.app.decisions import Decisions
from engine.app.orders import OrderDesk
from engine.app.prices import Prices
from engine.app.runtime import Runtime
from engine.domain.decide import Accepted, Rules, decide, strategy_position_id_for
from engine.domain.events import PendingDecision
from engine.domain.model import Action, Outcome, derive_id
from engine.domain.orders import CloseLeg
from engine.domain.reasons import Reason
from engine.domain.signals import MalformedSignal, Signal, parse_signal
from engine.domain.state import Admit
from engine.logs import SIGNAL_CONTEXT

log = structlog.get_logger(__name__)


class SignalHandler:
    def __init__(
        self, rt: Runtime, rules: Rules, decisions: Decisions, desk: OrderDesk, prices: Prices
    ) -> None:
        self.rt, self.rules, self.decisions, self.desk, self.prices = rt, rules, decisions, desk, prices
        # Stable for the worker's life: taken once (the parts run per signal and per tick).
        self.settings, self.clock, self.journaled = rt.settings, rt.clock, rt.journaled
        self.emit, self.remember, self.check_lease = rt.emit, rt.remember, rt.check_lease
        self.locks, self.last_prices, self.price_seen_at = rt.locks, rt.last_prices, rt.price_seen_at
        self.state = rt.state
        self.book, self.journal, self.ledger = rt.state.book, rt.state.journal, rt.state.ledger

    async def on_signal_message(self, msg: Msg) -> None:
        await self.handle(msg.subject, msg.data, msg.headers, jetstream_sequences(msg)[0])

    async def handle(self, subject: str, data: bytes, headers: dict[str, str] | None, sequence: int) -> None:
        """Decide one delivery (a message, or a record of a replay). Nothing a publisher sends
        may stop the worker: whatever goes wrong before the signal is known is a dead letter,
        whatever goes wrong after it is an `internal_error` decision, and the batch is acked
        either way."""
        try:
            parsed = parse_signal(
                subject,
                data,
                self.settings.max_signal_bytes,
                self.settings.default_notional is not None,
                self.settings.signal_partitions,
            )
        except Exception as exc:  # parse_signal contains every error it knows of; this is a bug
            log.exception("signal.parse_internal_error", subject=subject)
            parsed = MalformedSignal(Reason.INTERNAL_ERROR, (f"payload: {type(exc).__name__}",))
        if isinstance(parsed, MalformedSignal):
            self.emit(self.decisions.dead_letter(subject, data, headers, parsed, sequence))
            return
        side = parsed.opening_side or parsed.position_side
        context = SIGNAL_CONTEXT.set(
            {
                "signal_id": parsed.signal_id,
                "strategy_id": parsed.strategy_id,
                "symbol": parsed.symbol,
                "side": side.value if side else None,
            }
        )
        try:
            async with self.locks[parsed.symbol]:
                try:
                    await self.on_signal(parsed, sequence)
                except LeaseLost:
                    raise  # not this signal's fault: the worker stops, the next holder decides it
                except Exception as exc:  # a bug must cost one signal, not the worker
                    log.exception("signal.internal_error")
                    self.decisions.decide(
                        parsed, sequence, Outcome.REJECTED, Reason.INTERNAL_ERROR, repr(exc)[:500], ()
                    )
        finally:
            SIGNAL_CONTEXT.reset(context)

    async def on_signal(self, signal: Signal, sequence: int) -> None:
        if self.prices.feed is not None:
            self.prices.interest[signal.symbol] = time.monotonic()  # the feed watches it a while
        admission = self.state.admit(signal, sequence)
        match admission.verdict:
            case Admit.REDELIVERED:
                metrics.REDELIVERED_SKIPPED.inc()
                log.info("signal.redelivered")  # its events are already stored
                return
            case Admit.DUPLICATE:
                self.decisions.decide(
                    signal, sequence, Outcome.DUPLICATE, Reason.DUPLICATE_SIGNAL_ID,
                    "signal_id was already decided; not executed again", (),
                    event_id=derive_id("signal.duplicate", signal.strategy_id, signal.id, str(sequence)),
                )  # fmt: skip
                return
            case Admit.AWAITING:
                log.info("signal.awaiting_venue")  # the lookup of its order records its decision
                return
            case Admit.RECOVERED:
                # A crash fell between the fill's events and the decision: finish the record.
                self.decisions.decide(
                    signal, sequence, Outcome.ACCEPTED, Reason.RECOVERED,
                    "executed before a restart; decision recorded now", (strategy_position_id_for(signal),),
                )  # fmt: skip
                return
        signal, closed_before = admission.signal, admission.closed_before

        if self.journal.pending and not await self.desk.resolve_symbol(signal.symbol):
            # The book may be wrong about this symbol until the venue tells us what happened.
            self.decisions.decide(
                signal,
                sequence,
                Outcome.REJECTED,
                Reason.VENUE_UNCERTAIN,
                f"an earlier order on {signal.symbol} has an unknown outcome at the venue; "
                "nothing is placed on this symbol until it is looked up",
                (),
            )
            return

        now = self.clock()
        verdict = decide(
            signal,
            self.book,
            self.rt.gateway.market(signal.symbol),
            (
                await self.prices.trusted_price(signal.symbol)
                if self.rt.gateway.quotes and signal.action is not Action.HOLD
                else self.last_prices.get(signal.symbol)
            ),
            now,
            self.rules,
            await self.prices.available_balance() if signal.sized_by_balance else None,
            own_price_allowed=not self.rt.gateway.quotes,
            risk=self.state.risk,
        )
        if not isinstance(verdict, Accepted):
            if closed_before is not None:  # nothing left to do: it all happened before a restart
                self.decisions.decide(
                    signal,
                    sequence,
                    Outcome.ACCEPTED,
                    Reason.RECOVERED,
                    "closed before a restart; decision recorded now",
                    (),
                )
                return
            self.decisions.decide(
                signal,
                sequence,
                verdict.outcome,
                verdict.reason_code,
                verdict.reason,
                (),
                limit=verdict.limit,
                figure=verdict.figure,
            )
            return
        if signal.opening_side is not None:
            self.state.risk.charge(signal.strategy_id, now)
        refused, done = await self.execute(signal, sequence, verdict)
        if refused is None:
            self.decisions.decide(
                signal,
                sequence,
                Outcome.ACCEPTED,
                Reason.ACCEPTED,
                verdict.reason,
                verdict.strategy_position_ids,
            )
            return
        if isinstance(refused, OrderUncertain) and self.journaled:
            # No decision yet: the journal holds the order and the signal's decision, and the
            # lookup that resolves the order records it (accepted if filled, else rejected).
            log.warning("signal.awaiting_venue", error=str(refused))
            return
        if isinstance(refused, OrderUncertain):  # the paper venue failed in a way it never should
            refused = OrderRejected(Reason.VENUE_ERROR, str(refused))
        reason = str(refused)
        if done:
            # A hedge-mode reversal closes first, then opens: the closes stand, and the record
            # says so rather than pretending nothing happened.
            reason += f"; the {len(done)} opposite position(s) had already been closed (reversed)"
        self.decisions.decide(signal, sequence, Outcome.REJECTED, refused.reason_code, reason, tuple(done))

    async def execute(
        self, signal: Signal, sequence: int, verdict: Accepted
    ) -> tuple[OrderRejected | OrderUncertain | None, list[str]]:
        """Place the verdict's orders in turn; stop at the first refusal or unknown outcome.
        Returns it and the strategy positions the orders placed before it closed."""
        done: list[str] = []
        for n, intent in enumerate(verdict.orders):
            pending = None
            if self.journaled:
                pending = PendingDecision(
                    strategy_id=signal.strategy_id,
                    signal_id=signal.id,
                    symbol=signal.symbol,
                    action=signal.action,
                    confidence=signal.confidence,
                    signal_sequence=sequence,
                    strategy_position_ids=list(verdict.strategy_position_ids),
                    closed_before=list(done),
                    reason=verdict.reason,
                    later_orders=len(verdict.orders) - n - 1,
                )
            outcome = await self.desk.place(intent, pending)
            if outcome is not None:
                return outcome, done
            done.extend(leg.position_id for leg in intent.legs if isinstance(leg, CloseLeg))
        return None, done
