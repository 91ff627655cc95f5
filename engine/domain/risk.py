"""Risk limits, halts and the day's loss (issue #15): pure, with `now` passed in.

The worker keeps one `RiskBook`. `decide` asks it whether a signal may open and, once sized,
whether the strategy's notional, position count and order rate allow it; the worker charges
the order rate on acceptance and feeds it every fill, fee and funding payment of the day.
Halts and the day's loss block openings only: a close, a TP/SL and a flatten still go out,
because they take risk off.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import TypeVar

from engine.domain.model import ZERO, amount
from engine.domain.reasons import Reason

_T = TypeVar("_T")


class HaltCause(StrEnum):
    OPERATOR = "operator"  # control.halt / control.flatten
    DAILY_LOSS = "daily_loss"  # the strategy's or the account's loss of the day crossed its limit


@dataclass(frozen=True, slots=True)
class Scope:
    """Everything, a strategy, a symbol, or a strategy on a symbol."""

    strategy_id: str | None = None
    symbol: str | None = None

    def covers(self, strategy_id: str, symbol: str) -> bool:
        return (self.strategy_id is None or self.strategy_id == strategy_id) and (
            self.symbol is None or self.symbol == symbol
        )

    def within(self, other: Scope) -> bool:
        """Whether every signal this scope covers, `other` covers too."""
        return (other.strategy_id is None or other.strategy_id == self.strategy_id) and (
            other.symbol is None or other.symbol == self.symbol
        )

    def overlaps(self, other: Scope) -> bool:
        """Whether some signal falls in both scopes."""
        return (
            self.strategy_id is None or other.strategy_id is None or self.strategy_id == other.strategy_id
        ) and (self.symbol is None or other.symbol is None or self.symbol == other.symbol)

    def __str__(self) -> str:
        parts = [f"strategy {self.strategy_id}"] if self.strategy_id else []
        parts += [f"symbol {self.symbol}"] if self.symbol else []
        return " on ".join(parts) if parts else "everything"


@dataclass(frozen=True, slots=True)
class Halt:
    scope: Scope
    cause: HaltCause
    reason: str
    since: datetime
    until: datetime | None = None  # a day's-loss halt ends at the next UTC midnight

    def active(self, now: datetime) -> bool:
        return self.until is None or now < self.until


@dataclass(frozen=True, slots=True)
class StrategyLimits:
    """A strategy's limits; None is no limit."""

    max_notional: Decimal | None = None  # open notional at entry prices, over every key
    max_positions: int | None = None  # open strategy positions
    orders_per_minute: int | None = None  # openings; a token bucket as deep as the rate
    symbols: frozenset[str] | None = None  # the symbols it may open on
    daily_loss: Decimal | None = None  # realized PnL, fees and funding since 00:00 UTC

    def over(self, base: StrategyLimits) -> StrategyLimits:
        """These limits where set, `base` elsewhere."""
        return StrategyLimits(
            max_notional=_first(self.max_notional, base.max_notional),
            max_positions=_first(self.max_positions, base.max_positions),
            orders_per_minute=_first(self.orders_per_minute, base.orders_per_minute),
            symbols=_first(self.symbols, base.symbols),
            daily_loss=_first(self.daily_loss, base.daily_loss),
        )


def _first(mine: _T | None, theirs: _T | None) -> _T | None:
    return mine if mine is not None else theirs


@dataclass(frozen=True, slots=True)
class RiskLimits:
    default: StrategyLimits = field(default_factory=StrategyLimits)
    strategies: Mapping[str, StrategyLimits] = field(default_factory=dict)
    account_daily_loss: Decimal | None = None

    def of(self, strategy_id: str) -> StrategyLimits:
        own = self.strategies.get(strategy_id)
        return self.default if own is None else own.over(self.default)

    @property
    def watches_daily_loss(self) -> bool:
        return (
            self.account_daily_loss is not None
            or self.default.daily_loss is not None
            or any(limits.daily_loss is not None for limits in self.strategies.values())
        )


@dataclass(frozen=True, slots=True)
class Breach:
    """A limit a signal would cross: its reason code, the limit and the figure it reached."""

    reason_code: str
    reason: str
    limit: Decimal | None = None
    figure: Decimal | None = None


@dataclass(slots=True)
class TokenBucket:
    per_minute: int
    tokens: float
    at: datetime

    def refill(self, now: datetime) -> None:
        elapsed = max((now - self.at).total_seconds(), 0.0)
        self.tokens = min(float(self.per_minute), self.tokens + elapsed * self.per_minute / 60)
        self.at = now


def next_midnight(now: datetime) -> datetime:
    return datetime.combine(now.date() + timedelta(days=1), time(), now.tzinfo)


@dataclass(slots=True)
class DayTally:
    """The money each strategy made or lost today (UTC): fills' PnL less fees, plus funding.
    Yesterday's figures are dropped when the first amount of a new day comes."""

    day: date | None = None
    by_strategy: dict[str, Decimal] = field(default_factory=dict)
    account: Decimal = ZERO

    def add(self, strategy_id: str, at: datetime, amount: Decimal) -> None:
        day = at.date()
        if self.day is None or day > self.day:
            self.day, self.by_strategy, self.account = day, {}, ZERO
        elif day < self.day:
            return  # an amount of an earlier day, come late: that day is over
        self.by_strategy[strategy_id] = self.by_strategy.get(strategy_id, ZERO) + amount
        self.account += amount

    def loss(self, strategy_id: str | None, now: datetime) -> Decimal:
        """Today's loss as a positive figure (a gain is a negative loss)."""
        if self.day != now.date():
            return ZERO
        made = self.account if strategy_id is None else self.by_strategy.get(strategy_id, ZERO)
        return -made


class RiskBook:
    def __init__(self, limits: RiskLimits | None = None) -> None:
        self.limits = limits or RiskLimits()
        # No limit set (the default): the checks cost a comparison per signal.
        self._limited = self.limits != RiskLimits()
        self._watch_losses = self.limits.watches_daily_loss
        self.halts: dict[Scope, Halt] = {}
        self.today = DayTally()
        self._buckets: dict[str, TokenBucket] = {}

    # --- halts ---------------------------------------------------------------------------
    def halt(self, halt: Halt) -> bool:
        """Put a halt in force; False when the same scope was already halted for the same cause."""
        before = self.halts.get(halt.scope)
        self.halts[halt.scope] = halt
        return before is None or before.cause is not halt.cause or not before.active(halt.since)

    def resume(self, scope: Scope) -> list[Halt]:
        """Lift every halt within `scope` (resuming everything lifts them all); the lifted ones."""
        lifted = [h for s, h in self.halts.items() if s.within(scope)]
        for h in lifted:
            del self.halts[h.scope]
        return lifted

    def in_force(self, now: datetime) -> list[Halt]:
        return [h for h in self.halts.values() if h.active(now)]

    def halted(self, strategy_id: str, symbol: str, now: datetime) -> Halt | None:
        for h in self.halts.values():
            if h.scope.covers(strategy_id, symbol) and h.active(now):
                return h
        return None

    # --- checks --------------------------------------------------------------------------
    def refuse_opening(self, strategy_id: str, symbol: str, now: datetime) -> Breach | None:
        """Checks that need no size: halts, the day's loss, the strategy's symbols."""
        if not self._limited and not self.halts:
            return None
        if self.halts:
            halt = self.halted(strategy_id, symbol, now)
            if halt is not None:
                code = Reason.HALTED if halt.cause is HaltCause.OPERATOR else Reason.DAILY_LOSS_LIMIT
                return Breach(code, f"{halt.scope} is halted: {halt.reason}")
        limits = self.limits.of(strategy_id)
        for who, limit in ((strategy_id, limits.daily_loss), (None, self.limits.account_daily_loss)):
            if limit is not None:
                lost = self.today.loss(who, now)
                if lost >= limit:
                    whose = f"strategy {who}" if who else "the account"
                    return Breach(
                        Reason.DAILY_LOSS_LIMIT,
                        f"{whose} lost {amount(lost)} today (PnL, fees and funding since 00:00 UTC); "
                        f"the limit is {amount(limit)}",
                        limit,
                        lost,
                    )
        if limits.symbols is not None and symbol not in limits.symbols:
            return Breach(Reason.SYMBOL_NOT_ALLOWED, f"strategy {strategy_id} may not trade {symbol}")
        return None

    def refuse_size(
        self, strategy_id: str, added: Decimal, open_notional: Decimal, open_positions: int, now: datetime
    ) -> Breach | None:
        """Checks on a sized opening: the strategy's notional, position count and order rate."""
        if not self._limited:
            return None
        limits = self.limits.of(strategy_id)
        if limits.max_notional is not None and open_notional + added > limits.max_notional:
            return Breach(
                Reason.RISK_LIMIT_STRATEGY,
                f"strategy {strategy_id} notional would be {amount(open_notional + added)}, above "
                f"its limit {amount(limits.max_notional)}",
                limits.max_notional,
                open_notional + added,
            )
        if limits.max_positions is not None and open_positions + 1 > limits.max_positions:
            return Breach(
                Reason.RISK_LIMIT_POSITIONS,
                f"strategy {strategy_id} has {open_positions} open positions; its limit is {limits.max_positions}",
                Decimal(limits.max_positions),
                Decimal(open_positions + 1),
            )
        if limits.orders_per_minute is not None:
            bucket = self._bucket(strategy_id, limits.orders_per_minute, now)
            if bucket.tokens < 1:
                return Breach(
                    Reason.RATE_LIMITED,
                    f"strategy {strategy_id} opened {limits.orders_per_minute} positions in the last "
                    f"minute; its limit is {limits.orders_per_minute} a minute",
                    Decimal(limits.orders_per_minute),
                    Decimal(limits.orders_per_minute + 1),
                )
        return None

    def charge(self, strategy_id: str, now: datetime) -> None:
        """An opening was accepted: it takes a token of the strategy's order rate."""
        if not self._limited:
            return
        per_minute = self.limits.of(strategy_id).orders_per_minute
        if per_minute is not None:
            self._bucket(strategy_id, per_minute, now).tokens -= 1

    def _bucket(self, strategy_id: str, per_minute: int, now: datetime) -> TokenBucket:
        bucket = self._buckets.get(strategy_id)
        if bucket is None or bucket.per_minute != per_minute:
            bucket = self._buckets[strategy_id] = TokenBucket(per_minute, float(per_minute), now)
        bucket.refill(now)
        return bucket

    # --- the day's loss ------------------------------------------------------------------
    def book(self, strategy_id: str, at: datetime, amount: Decimal) -> None:
        if self._watch_losses:
            self.today.add(strategy_id, at, amount)

    def losses_past_limit(self, strategies: Iterable[str], now: datetime) -> list[Halt]:
        """Halts the day's losses call for that are not in force yet: the account's, else each
        strategy's whose loss reached its limit."""
        found: list[Halt] = []
        until = next_midnight(now)
        candidates: list[tuple[Scope, Decimal | None, Decimal]] = [
            (Scope(), self.limits.account_daily_loss, self.today.loss(None, now))
        ]
        candidates += [
            (Scope(strategy_id=s), self.limits.of(s).daily_loss, self.today.loss(s, now)) for s in strategies
        ]
        for scope, limit, lost in candidates:
            if limit is None or lost < limit:
                continue
            current = self.halts.get(scope)
            if current is not None and current.active(now):
                continue
            whose = "the account" if scope.strategy_id is None else f"strategy {scope.strategy_id}"
            found.append(
                Halt(
                    scope,
                    HaltCause.DAILY_LOSS,
                    f"{whose} lost {amount(lost)} today, limit {amount(limit)}; halted until 00:00 UTC",
                    now,
                    until,
                )
            )
        return found
