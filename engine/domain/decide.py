"""From a validated signal to a verdict: checks in DESIGN §4.1 order, then order intents.

Pure: the book, the market rules, the last price and `now` come in as arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from engine.domain.book import PositionBook, StrategyPosition
from engine.domain.conflicts import Conflict, ConflictPolicy, resolve_conflicts
from engine.domain.model import (
    ZERO,
    Action,
    CloseReason,
    Market,
    OrderSide,
    Outcome,
    PositionKey,
    PositionMode,
    SignalId,
    StrategyPositionId,
    amount,
    derive_client_order_id,
    derive_id,
)
from engine.domain.orders import MAX_ORDER_PARTS, CloseLeg, Leg, OpenLeg, OrderIntent
from engine.domain.reasons import Reason
from engine.domain.risk import Breach, RiskBook
from engine.domain.signals import Signal
from engine.domain.tpsl import LevelSpec


@dataclass(frozen=True, slots=True)
class Rules:
    conflicts: ConflictPolicy = field(default_factory=ConflictPolicy)
    min_confidence: Decimal = Decimal("0.6")
    max_signal_age: timedelta = timedelta(seconds=300)
    allowed_strategies: frozenset[str] = frozenset()
    allowed_symbols: frozenset[str] = frozenset()
    max_notional_per_key: Decimal | None = None
    max_total_notional: Decimal | None = None
    max_order_notional: Decimal | None = Decimal(1_000_000)
    # A signal's own price is believed only this close (a fraction) to the trusted price.
    price_band: Decimal | None = Decimal("0.1")
    max_clock_skew: timedelta = timedelta(seconds=60)
    default_notional: Decimal | None = None  # sizes buy/sell signals that carry no size


@dataclass(frozen=True, slots=True)
class Accepted:
    orders: tuple[OrderIntent, ...]
    strategy_position_ids: tuple[str, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class Refused:
    outcome: Outcome
    reason_code: str
    reason: str
    limit: Decimal | None = None  # a risk limit's value, and the figure the signal would reach
    figure: Decimal | None = None


Verdict = Accepted | Refused


def strategy_position_id_for(signal: Signal) -> StrategyPositionId:
    return StrategyPositionId(derive_id("strategy-position", signal.strategy_id, signal.id))


def decide(
    signal: Signal,
    book: PositionBook,
    market: Market | None,
    last_price: Decimal | None,
    now: datetime,
    rules: Rules,
    balance: Decimal | None = None,
    own_price_allowed: bool = True,
    risk: RiskBook | None = None,
) -> Verdict:
    """`balance`: the account's available balance, needed only to size a signal by
    `position_size_pct`. `own_price_allowed`: whether an opening signal's own price may stand
    in when there is no trusted price (the paper venue, which has no prices of its own).
    `risk`: halts, the day's losses and the per-strategy limits (openings only)."""
    if rules.allowed_strategies and signal.strategy_id not in rules.allowed_strategies:
        return _reject(Reason.STRATEGY_NOT_ALLOWED, f"strategy {signal.strategy_id} is not on the allow-list")
    if rules.allowed_symbols and signal.symbol not in rules.allowed_symbols:
        return _reject(Reason.SYMBOL_NOT_ALLOWED, f"symbol {signal.symbol} is not on the allow-list")
    if risk is not None and signal.opening_side is not None:
        breach = risk.refuse_opening(signal.strategy_id, signal.symbol, now)
        if breach is not None:
            return _breach(breach)
    if market is None:
        return _reject(Reason.UNKNOWN_SYMBOL, f"the venue has no market {signal.symbol}")
    if signal.timestamp is not None and signal.timestamp - now > rules.max_clock_skew:
        ahead = (signal.timestamp - now).total_seconds()
        return _reject(
            Reason.FUTURE_TIMESTAMP,
            f"signal is dated {ahead:.0f}s ahead of the worker's clock; limit {rules.max_clock_skew.total_seconds():.0f}s",
        )
    if signal.timestamp is not None and now - signal.timestamp > rules.max_signal_age:
        age = (now - signal.timestamp).total_seconds()
        return _reject(
            Reason.STALE, f"signal is {age:.0f}s old; limit {rules.max_signal_age.total_seconds():.0f}s"
        )
    if signal.action is Action.HOLD:
        return Refused(Outcome.IGNORED, Reason.HOLD, "hold recorded; nothing to do")
    # The trusted price (a tick, or the venue's mark) wins; a signal's own price stands in only
    # where the venue offers none (the paper venue before its first tick).
    price = last_price or signal.reference_price
    if signal.action is Action.CLOSE:
        return _decide_close(signal, book, market, price)
    if last_price is None and not own_price_allowed:
        return _reject(Reason.NO_PRICE, "no fresh price from the venue; a signal's own price is not trusted")
    own = signal.reference_price
    if last_price is not None and own is not None and rules.price_band is not None:
        if abs(own - last_price) > last_price * rules.price_band:
            return _reject(
                Reason.PRICE_OUT_OF_BAND,
                f"signal price {amount(own)} is more than {amount(rules.price_band * 100)}% from the "
                f"last trusted price {amount(last_price)}",
            )
    return _decide_open(signal, book, market, price, rules, balance, risk, now)


def _reject(code: str, reason: str) -> Refused:
    return Refused(Outcome.REJECTED, code, reason)


def _breach(breach: Breach) -> Refused:
    return Refused(Outcome.REJECTED, breach.reason_code, breach.reason, breach.limit, breach.figure)


def _decide_close(signal: Signal, book: PositionBook, market: Market, price: Decimal | None) -> Verdict:
    targets = book.open_of(signal.strategy_id, signal.symbol, signal.position_side)
    if not targets:
        return Refused(Outcome.IGNORED, Reason.NOTHING_TO_CLOSE, "the strategy has no open position here")
    if price is None:
        return _reject(Reason.NO_PRICE, "no price tick seen and the signal carries no price")
    wanted = signal.quantity
    closing: list[tuple[StrategyPosition, Decimal, CloseReason]] = []
    for sp in targets:
        qty = sp.remaining if wanted is None else min(sp.remaining, market.round_quantity(wanted))
        if qty <= 0:
            break
        closing.append((sp, qty, CloseReason.SIGNAL))
        if wanted is not None:
            wanted -= qty
    if not closing:
        return _reject(
            Reason.BELOW_MIN_QUANTITY, f"close quantity rounds to zero at step {amount(market.quantity_step)}"
        )
    orders = closes_by_key(closing, price, signal.id, market.max_quantity)
    ids = tuple(str(sp.id) for sp, _, _ in closing)
    return Accepted(orders, ids, f"closing {len(closing)} position(s)")


def close_intent(
    sp: StrategyPosition,
    qty: Decimal,
    reason: CloseReason,
    price: Decimal,
    signal_id: SignalId | None,
) -> OrderIntent:
    """One order closing one strategy's slice."""
    return _close_order([(sp, qty, reason)], price, signal_id)


def closes_by_key(
    closing: Sequence[tuple[StrategyPosition, Decimal, CloseReason]],
    price: Decimal,
    signal_id: SignalId | None,
    max_quantity: Decimal | None = None,
) -> tuple[OrderIntent, ...]:
    """One order per key for these slice closes (a leg each, in the order given): a burst of
    TP/SL hits or a close signal over many slices is one trip to the venue, not one per slice.
    An order grows only up to the venue's `max_quantity`; then the next one starts. The fill
    and its fee are split over the legs by `PositionBook.settle`."""
    orders: dict[PositionKey, list[list[tuple[StrategyPosition, Decimal, CloseReason]]]] = {}
    filled: dict[PositionKey, Decimal] = {}  # quantity of each key's last order so far
    for close in closing:
        key = PositionKey(close[0].symbol, close[0].side)
        chunks = orders.setdefault(key, [[]])
        size = filled.get(key, ZERO) + close[1]
        if chunks[-1] and max_quantity is not None and size > max_quantity:
            chunks.append([])
            size = close[1]
        chunks[-1].append(close)
        filled[key] = size
    return tuple(_close_order(chunk, price, signal_id) for chunks in orders.values() for chunk in chunks)


def _close_order(
    closing: Sequence[tuple[StrategyPosition, Decimal, CloseReason]],
    price: Decimal,
    signal_id: SignalId | None,
) -> OrderIntent:
    """Without a signal (TP/SL, reconciliation) the client order id comes from the slices and
    their close counts, so a retry of the same closes reuses it."""
    id_parts: list[str] = []
    for sp, _, reason in closing:
        id_parts += (signal_id if signal_id is not None else f"{reason.value}#{sp.closes + 1}", sp.id)
    first = closing[0][0]
    return OrderIntent(
        client_order_id=derive_client_order_id(*id_parts, "close"),
        symbol=first.symbol,
        side=OrderSide.closing(first.side),
        quantity=sum((qty for _, qty, _ in closing), ZERO),
        position_side=first.side,
        reduce_only=True,
        legs=tuple(CloseLeg(sp.id, qty, reason) for sp, qty, reason in closing),
        reference_price=price,
        signal_id=signal_id,
    )


def _decide_open(
    signal: Signal,
    book: PositionBook,
    market: Market,
    price: Decimal | None,
    rules: Rules,
    balance: Decimal | None,
    risk: RiskBook | None,
    now: datetime,
) -> Verdict:
    side = signal.opening_side
    assert side is not None
    if signal.confidence < rules.min_confidence:
        return _reject(
            Reason.LOW_CONFIDENCE,
            f"confidence {amount(signal.confidence)} below minimum {amount(rules.min_confidence)}",
        )
    if price is None:
        return _reject(Reason.NO_PRICE, "no price tick seen and the signal carries no price")
    # Sizing: an explicit quantity, else a notional, else a share of the available balance,
    # else the worker's DEFAULT_NOTIONAL.
    if signal.quantity is not None:
        raw_qty = signal.quantity
    elif signal.quote_quantity is not None:
        raw_qty = signal.quote_quantity / price
    elif signal.position_size_pct is not None:
        if balance is None or balance <= 0:
            return _reject(
                Reason.NO_BALANCE,
                "position_size_pct needs the account's available balance, and none is known",
            )
        raw_qty = balance * signal.position_size_pct / price
    elif rules.default_notional is not None:
        raw_qty = rules.default_notional / price
    else:
        return _reject(
            Reason.NO_SIZE, "no quantity, quote_quantity or position_size_pct, and no DEFAULT_NOTIONAL"
        )
    qty = market.round_quantity(raw_qty)
    if qty < market.min_quantity or qty <= 0:
        return _reject(
            Reason.BELOW_MIN_QUANTITY, f"quantity {amount(qty)} below minimum {amount(market.min_quantity)}"
        )
    if qty * price < market.min_notional:
        return _reject(
            Reason.BELOW_MIN_NOTIONAL,
            f"notional {amount(qty * price)} below minimum {amount(market.min_notional)}",
        )
    if market.max_quantity is not None and qty > market.max_quantity * MAX_ORDER_PARTS:
        # Above the venue's limit on one market order (Binance: MARKET_LOT_SIZE maxQty) the
        # order goes as parts, up to MAX_ORDER_PARTS of them; beyond that it is refused here.
        return _reject(
            Reason.ABOVE_MAX_QUANTITY,
            f"quantity {amount(qty)} above {MAX_ORDER_PARTS} orders of the venue's "
            f"{amount(market.max_quantity)} per market order",
        )
    if rules.max_order_notional is not None and qty * price > rules.max_order_notional:
        return _reject(
            Reason.ORDER_TOO_LARGE,
            f"notional {amount(qty * price)} above the order limit {amount(rules.max_order_notional)}",
        )
    levels = LevelSpec(signal.take_profit, signal.stop_loss, signal.take_profit_pct, signal.stop_loss_pct)
    misplaced = levels.misplaced(side, price)
    if misplaced:
        return _reject(Reason.INVALID_TP_SL, misplaced)

    key = PositionKey(signal.symbol, side)
    added = qty * price
    # Risk before conflicts (DESIGN §4.1): over the key's limit is a risk rejection, whatever
    # else the signal would meet. The total limit waits for the conflicts: a reversal frees
    # the notional of the positions it closes.
    if rules.max_notional_per_key is not None and book.key_cost(key) + added > rules.max_notional_per_key:
        return Refused(
            Outcome.REJECTED,
            Reason.RISK_LIMIT_KEY,
            f"{key} notional would exceed {amount(rules.max_notional_per_key)}",
            rules.max_notional_per_key,
            book.key_cost(key) + added,
        )
    if risk is not None:
        breach = risk.refuse_size(
            signal.strategy_id,
            added,
            book.strategy_cost.get(signal.strategy_id, ZERO),
            book.strategy_open.get(signal.strategy_id, 0),
            now,
        )
        if breach is not None:
            return _breach(breach)
    verdict = resolve_conflicts(
        signal.confidence,
        book.keyed(key),
        book.keyed(PositionKey(signal.symbol, side.opposite)),
        rules.conflicts,
    )
    if isinstance(verdict, Conflict):
        return _reject(verdict.reason_code, verdict.reason)

    released = sum((sp.entry_price * sp.remaining for sp in verdict.reverse), ZERO)
    if rules.max_total_notional is not None:
        total = book.total_cost() - released + added
        if total > rules.max_total_notional:
            return Refused(
                Outcome.REJECTED,
                Reason.RISK_LIMIT_TOTAL,
                f"total notional would exceed {amount(rules.max_total_notional)}",
                rules.max_total_notional,
                total,
            )

    open_leg = OpenLeg(
        position_id=strategy_position_id_for(signal),
        strategy_id=signal.key_strategy,
        signal_id=signal.id,
        symbol=signal.symbol,
        side=side,
        quantity=qty,
        levels=levels,
        price_tick=market.price_tick,
        confidence=signal.confidence,
        timeframe=signal.timeframe,
        metadata=signal.metadata,
    )
    orders = _open_orders(signal, open_leg, verdict.reverse, price, rules.conflicts.position_mode, market)
    reason = f"opened {amount(qty)} {side.value}" + (
        f", reversed {len(verdict.reverse)}" if verdict.reverse else ""
    )
    return Accepted(orders, (open_leg.position_id, *(sp.id for sp in verdict.reverse)), reason)


def _open_orders(
    signal: Signal,
    open_leg: OpenLeg,
    reverse: tuple[StrategyPosition, ...],
    price: Decimal,
    mode: PositionMode,
    market: Market,
) -> tuple[OrderIntent, ...]:
    side = open_leg.side
    if mode is PositionMode.ONE_WAY:
        # The venue nets: one order takes the symbol from the old side to the new one.
        legs: list[Leg] = [CloseLeg(sp.id, sp.remaining, CloseReason.REVERSED) for sp in reverse]
        legs.append(open_leg)
        total = sum((leg.quantity for leg in legs), ZERO)
        return (
            OrderIntent(
                client_order_id=derive_client_order_id(signal.id, signal.strategy_id, "open"),
                symbol=signal.symbol,
                side=OrderSide.opening(side),
                quantity=total,
                position_side=None,
                reduce_only=False,
                legs=tuple(legs),
                reference_price=price,
                signal_id=signal.id,
            ),
        )
    closes = closes_by_key(
        [(sp, sp.remaining, CloseReason.REVERSED) for sp in reverse], price, signal.id, market.max_quantity
    )
    opening = OrderIntent(
        client_order_id=derive_client_order_id(signal.id, signal.strategy_id, "open"),
        symbol=signal.symbol,
        side=OrderSide.opening(side),
        quantity=open_leg.quantity,
        position_side=side,
        reduce_only=False,
        legs=(open_leg,),
        reference_price=price,
        signal_id=signal.id,
    )
    return (*closes, opening)
