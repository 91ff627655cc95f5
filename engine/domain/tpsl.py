"""Take-profit / stop-loss levels and the trigger index that fires them on price ticks.

The index keeps two heaps per symbol, so a tick costs O(log n) per fired position and O(1)
otherwise, whatever the number of open positions (no scan per tick).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal

from engine.domain.model import CloseReason, PositionSide, StrategyPositionId, intern_decimal


@dataclass(frozen=True, slots=True)
class LevelSpec:
    """TP/SL as a strategy sent them: absolute prices win over fractions."""

    take_profit: Decimal | None = None
    stop_loss: Decimal | None = None
    take_profit_pct: Decimal | None = None
    stop_loss_pct: Decimal | None = None

    def resolve(
        self, side: PositionSide, entry_price: Decimal, price_tick: Decimal
    ) -> tuple[Decimal | None, Decimal | None]:
        take_profit = self.take_profit
        stop_loss = self.stop_loss
        if take_profit is None and self.take_profit_pct is not None:
            take_profit = _on_tick(entry_price * (1 + side.sign * self.take_profit_pct), price_tick)
        if stop_loss is None and self.stop_loss_pct is not None:
            stop_loss = _on_tick(entry_price * (1 - side.sign * self.stop_loss_pct), price_tick)
        return take_profit, stop_loss

    def misplaced(self, side: PositionSide, reference_price: Decimal) -> str | None:
        """Why the absolute levels lie on the wrong side of the price, or None."""
        tp, sl = self.take_profit, self.stop_loss
        if side is PositionSide.LONG:
            if tp is not None and tp <= reference_price:
                return f"LONG take_profit {tp} must be above price {reference_price}"
            if sl is not None and sl >= reference_price:
                return f"LONG stop_loss {sl} must be below price {reference_price}"
        else:
            if tp is not None and tp >= reference_price:
                return f"SHORT take_profit {tp} must be below price {reference_price}"
            if sl is not None and sl <= reference_price:
                return f"SHORT stop_loss {sl} must be above price {reference_price}"
        return None


def _on_tick(price: Decimal, tick: Decimal) -> Decimal:
    return (price / tick).to_integral_value(rounding=ROUND_HALF_EVEN) * tick


@dataclass(slots=True)
class _SymbolHeaps:
    rising: list[tuple[Decimal, int, StrategyPositionId, CloseReason]] = field(default_factory=list)
    falling: list[tuple[Decimal, int, StrategyPositionId, CloseReason]] = field(default_factory=list)


class TriggerIndex:
    """Armed TP/SL levels. `rising` fires when price >= level, `falling` when price <= level."""

    def __init__(self) -> None:
        self._heaps: dict[str, _SymbolHeaps] = {}
        self._armed: dict[StrategyPositionId, int] = {}
        self._counter = 0
        self._stale = 0

    def __len__(self) -> int:
        return len(self._armed)

    def arm(
        self,
        symbol: str,
        side: PositionSide,
        position_id: StrategyPositionId,
        take_profit: Decimal | None,
        stop_loss: Decimal | None,
    ) -> None:
        if take_profit is None and stop_loss is None:
            return
        self._counter += 1
        token = self._counter
        self._armed[position_id] = token
        heaps = self._heaps.setdefault(symbol, _SymbolHeaps())
        long_side = side is PositionSide.LONG
        if take_profit is not None:
            if long_side:
                heapq.heappush(heaps.rising, (take_profit, token, position_id, CloseReason.TAKE_PROFIT))
            else:
                heapq.heappush(
                    heaps.falling, (intern_decimal(-take_profit), token, position_id, CloseReason.TAKE_PROFIT)
                )
        if stop_loss is not None:
            if long_side:
                heapq.heappush(
                    heaps.falling, (intern_decimal(-stop_loss), token, position_id, CloseReason.STOP_LOSS)
                )
            else:
                heapq.heappush(heaps.rising, (stop_loss, token, position_id, CloseReason.STOP_LOSS))

    def disarm(self, position_id: StrategyPositionId) -> None:
        if self._armed.pop(position_id, None) is not None:
            self._stale += 2

    def is_armed(self, position_id: StrategyPositionId) -> bool:
        return position_id in self._armed

    def may_fire(self, symbol: str, price: Decimal) -> bool:
        """Could `fire` return anything at this price? O(1); a level disarmed since may say yes."""
        heaps = self._heaps.get(symbol)
        if heaps is None:
            return False
        return bool(heaps.rising and heaps.rising[0][0] <= price) or bool(
            heaps.falling and -heaps.falling[0][0] >= price
        )

    def fire(self, symbol: str, price: Decimal) -> list[tuple[StrategyPositionId, CloseReason]]:
        """Disarm and return every position whose level this price reached, in level order."""
        heaps = self._heaps.get(symbol)
        if heaps is None:
            return []
        fired: list[tuple[StrategyPositionId, CloseReason]] = []
        rising, falling = heaps.rising, heaps.falling
        while rising and rising[0][0] <= price:
            _, token, position_id, reason = heapq.heappop(rising)
            self._take(position_id, token, reason, fired)
        while falling and -falling[0][0] >= price:
            _, token, position_id, reason = heapq.heappop(falling)
            self._take(position_id, token, reason, fired)
        if self._stale > 1024 and self._stale > len(self._armed):
            self._compact()
        return fired

    def _take(
        self,
        position_id: StrategyPositionId,
        token: int,
        reason: CloseReason,
        fired: list[tuple[StrategyPositionId, CloseReason]],
    ) -> None:
        if self._armed.get(position_id) == token:
            del self._armed[position_id]
            self._stale += 1  # the position's other level is still in a heap
            fired.append((position_id, reason))
        else:
            self._stale -= 1

    def _compact(self) -> None:
        for heaps in self._heaps.values():
            heaps.rising = [e for e in heaps.rising if self._armed.get(e[2]) == e[1]]
            heaps.falling = [e for e in heaps.falling if self._armed.get(e[2]) == e[1]]
            heapq.heapify(heaps.rising)
            heapq.heapify(heaps.falling)
        self._stale = 0
