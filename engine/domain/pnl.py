"""PnL and fee arithmetic: the only place these formulas live (DESIGN §4.2)."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from engine.domain.model import ZERO, PositionSide

# Fee shares are rounded to this quantum; the last slice takes the exact remainder, so the
# sum of shares always equals the fee that was paid.
FEE_QUANTUM = Decimal("1e-12")
PRICE_DISPLAY_QUANTUM = Decimal("1e-8")


def gross_pnl(side: PositionSide, entry_price: Decimal, exit_price: Decimal, quantity: Decimal) -> Decimal:
    """LONG: (exit - entry) * qty; SHORT: (entry - exit) * qty."""
    return (exit_price - entry_price) * quantity * side.sign


def taker_fee(quantity: Decimal, price: Decimal, rate: Decimal) -> Decimal:
    return quantity * price * rate


def fee_share(total_fee: Decimal, part: Decimal, whole: Decimal) -> Decimal:
    if part >= whole:
        return total_fee
    return (total_fee * part / whole).quantize(FEE_QUANTUM)


def split_pro_rata(amount: Decimal, weights: Sequence[Decimal]) -> list[Decimal]:
    """Shares of `amount` proportional to `weights` that add up to `amount` exactly."""
    total = sum(weights, ZERO)
    if not weights:
        return []
    if total == 0:
        return [amount] + [ZERO] * (len(weights) - 1)
    shares = [(amount * w / total).quantize(FEE_QUANTUM) for w in weights[:-1]]
    shares.append(amount - sum(shares, ZERO))
    return shares


def average_price(cost: Decimal, quantity: Decimal) -> Decimal:
    if quantity == 0:
        return ZERO
    return (cost / quantity).quantize(PRICE_DISPLAY_QUANTUM).normalize()


def pnl_percent(realized_pnl: Decimal, entry_price: Decimal, quantity: Decimal) -> Decimal:
    notional = entry_price * quantity
    return ZERO if notional == 0 else realized_pnl / notional * 100
