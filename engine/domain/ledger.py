"""Which signals have been decided or executed: the dedupe memory of DESIGN §4.3.

Rebuilt on start from the worker's own events, so a redelivered signal is never executed
twice, and one whose events were only partly published before a crash is recognised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.domain.events import PositionOpened, SignalDecided
from engine.domain.model import Outcome


@dataclass(slots=True)
class SignalLedger:
    # (strategy_id, signal_id) -> stream sequence of the signal message that was decided
    decided: dict[tuple[str, str], int | None] = field(default_factory=dict)
    # signals whose open order filled (the decision may not have been published yet)
    executed: set[tuple[str, str]] = field(default_factory=set)

    def decided_at(self, strategy_id: str, signal_id: str) -> int | bool | None:
        """The decided message's stream sequence (None if unknown), or False if undecided."""
        key = (strategy_id, signal_id)
        return self.decided[key] if key in self.decided else False

    def was_executed(self, strategy_id: str, signal_id: str) -> bool:
        return (strategy_id, signal_id) in self.executed

    def apply(self, event: SignalDecided | PositionOpened) -> None:
        if isinstance(event, PositionOpened):
            self.executed.add((event.strategy_id, event.signal_id))
        elif event.outcome is not Outcome.DUPLICATE:
            self.decided[(event.strategy_id, event.signal_id)] = event.signal_sequence
