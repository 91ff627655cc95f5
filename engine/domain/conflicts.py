"""Conflict rules (DESIGN §4.1), all in one place.

A key is (symbol, side): buy opens LONG, sell opens SHORT. In hedge mode with awareness on,
the two keys of a symbol never conflict. Otherwise an opening signal must beat every open
opposite position's confidence to reverse them. Same-direction policies apply per key.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from decimal import Decimal

from engine.domain.book import StrategyPosition
from engine.domain.model import PositionMode, SameDirectionPolicy
from engine.domain.reasons import Reason


@dataclass(frozen=True, slots=True)
class ConflictPolicy:
    position_mode: PositionMode = PositionMode.HEDGE
    mode_aware: bool = True
    same_direction: SameDirectionPolicy = SameDirectionPolicy.ACCUMULATE
    max_accumulations: int = 10

    @property
    def opposite_sides_conflict(self) -> bool:
        return self.position_mode is PositionMode.ONE_WAY or not self.mode_aware


@dataclass(frozen=True, slots=True)
class Proceed:
    """Open the new position after closing `reverse` (empty unless a reversal wins)."""

    reverse: tuple[StrategyPosition, ...] = ()


@dataclass(frozen=True, slots=True)
class Conflict:
    reason_code: str
    reason: str


def resolve_conflicts(
    confidence: Decimal,
    same_side: Collection[StrategyPosition],
    opposite_side: Collection[StrategyPosition],
    policy: ConflictPolicy,
) -> Proceed | Conflict:
    reverse: tuple[StrategyPosition, ...] = ()
    if policy.opposite_sides_conflict and opposite_side:
        strongest = max(sp.confidence for sp in opposite_side)
        if confidence <= strongest:
            return Conflict(
                Reason.OPPOSITE_CONFLICT,
                f"confidence {confidence} does not beat {strongest} of {len(opposite_side)} "
                "open opposite position(s)",
            )
        reverse = tuple(opposite_side)

    if same_side:
        match policy.same_direction:
            case SameDirectionPolicy.REJECT_DUPLICATES:
                return Conflict(
                    Reason.POSITION_EXISTS, f"{len(same_side)} position(s) already open on this key"
                )
            case SameDirectionPolicy.STRONGEST_WINS:
                strongest = max(sp.confidence for sp in same_side)
                if confidence <= strongest:
                    return Conflict(
                        Reason.WEAKER_THAN_EXISTING,
                        f"confidence {confidence} does not beat open position's {strongest}",
                    )
            case SameDirectionPolicy.ACCUMULATE:
                if len(same_side) >= policy.max_accumulations:
                    return Conflict(
                        Reason.MAX_ACCUMULATIONS,
                        f"{len(same_side)} positions open on this key; limit {policy.max_accumulations}",
                    )
    return Proceed(reverse)
