"""The record of what became of each signal: one `signal.decided` per signal, or a dead letter."""

from __future__ import annotations

from decimal import Decimal

import structlog

from engine import metrics
from engine.app.runtime import Runtime
from engine.domain.dead_letters import dead_letter
from engine.domain.events import SignalDead, SignalDecided
from engine.domain.model import Action, Outcome, derive_id
from engine.domain.signals import MalformedSignal, Signal

log = structlog.get_logger(__name__)


class Decisions:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        # Stable for the worker's life: taken once (the parts run per signal and per tick).
        self.settings, self.clock, self.journaled = rt.settings, rt.clock, rt.journaled
        self.emit, self.remember, self.check_lease = rt.emit, rt.remember, rt.check_lease
        self.locks, self.last_prices, self.price_seen_at = rt.locks, rt.last_prices, rt.price_seen_at

    def decide(
        self,
        signal: Signal,
        sequence: int,
        outcome: Outcome,
        reason_code: str,
        reason: str,
        position_ids: tuple[str, ...],
        event_id: str | None = None,
        limit: Decimal | None = None,
        figure: Decimal | None = None,
    ) -> None:
        self.record(
            signal.strategy_id,
            signal.id,
            signal.symbol,
            signal.action,
            signal.confidence,
            sequence,
            outcome,
            reason_code,
            reason,
            position_ids,
            event_id,
            limit,
            figure,
        )

    def record(
        self,
        strategy_id: str,
        signal_id: str,
        symbol: str,
        action: Action,
        confidence: Decimal,
        sequence: int,
        outcome: Outcome,
        reason_code: str,
        reason: str,
        position_ids: tuple[str, ...],
        event_id: str | None = None,
        limit: Decimal | None = None,
        figure: Decimal | None = None,
    ) -> None:
        decided = SignalDecided(
            event_id=event_id or derive_id("signal.decided", strategy_id, signal_id),
            occurred_at=self.clock(),
            signal_id=signal_id,
            strategy_id=strategy_id,
            symbol=symbol,
            action=action,
            outcome=outcome,
            reason_code=reason_code,
            reason=reason,
            strategy_position_ids=list(position_ids),
            confidence=confidence,
            signal_sequence=sequence,
            limit=limit,
            figure=figure,
        )
        metrics.child(metrics.SIGNALS, outcome.value, reason_code).inc()
        log.info("signal.decided", outcome=outcome.value, reason_code=reason_code, reason=reason)
        self.remember(decided)
        self.emit(decided)

    def dead_letter(
        self, subject: str, data: bytes, headers: dict[str, str] | None, bad: MalformedSignal, sequence: int
    ) -> SignalDead:
        metrics.DEAD_LETTERS.labels(bad.reason_code).inc()
        log.warning("signal.dead", subject=subject, reason_code=bad.reason_code, errors=list(bad.errors))
        return dead_letter(subject, data, headers, bad, sequence, self.clock())
