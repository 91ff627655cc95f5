"""The in-process paper exchange (the embedded default, `EXCHANGE=paper`).

Fills market orders in full at the last tick (or the order's reference price), charges a taker
fee, applies optional slippage, and keeps hedge or one-way positions. No random failures.
Realized PnL is tracked as cash flow per position life (flat to flat), which is exact.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from engine.adapters.gateway import OrderRejected
from engine.domain.book import PositionBook
from engine.domain.funding import FUNDING_INTERVAL_HOURS, VenueFunding, expected_funding
from engine.domain.model import (
    ZERO,
    ClientOrderId,
    Market,
    OrderSide,
    PositionKey,
    PositionMode,
    PositionSide,
)
from engine.domain.orders import Fill, OrderIntent
from engine.domain.pnl import taker_fee
from engine.domain.reasons import Reason
from engine.domain.reconcile import VenueOrder, VenuePosition
from engine.domain.stops import StopSpec, VenueStop

D = Decimal
DEFAULT_TAKER_FEE = D("0.0005")
DEFAULT_BALANCE = D("100000")
BUILTIN_MARKETS: dict[str, Market] = {
    m.symbol: m
    for m in (
        Market("BTCUSDT", D("0.001"), D("0.001"), D("5"), D("0.1")),
        Market("ETHUSDT", D("0.001"), D("0.001"), D("5"), D("0.01")),
        Market("BNBUSDT", D("0.01"), D("0.01"), D("5"), D("0.01")),
        Market("SOLUSDT", D("0.01"), D("0.01"), D("5"), D("0.01")),
        Market("XRPUSDT", D("0.1"), D("0.1"), D("5"), D("0.0001")),
        Market("ADAUSDT", D("1"), D("1"), D("5"), D("0.0001")),
        Market("DOGEUSDT", D("1"), D("1"), D("5"), D("0.00001")),
    )
}


def synthetic_markets(count: int) -> dict[str, Market]:
    """The built-in markets and `count` more, T000USDT, T001USDT, ... (about 10 USDT each), for
    rehearsals and benchmarks over many symbols (the emulator lists the same names)."""
    extra = (Market(f"T{i:03d}USDT", D("0.1"), D("0.1"), D("5"), D("0.001")) for i in range(count))
    return BUILTIN_MARKETS | {m.symbol: m for m in extra}


@dataclass(slots=True)
class PaperPosition:
    quantity: Decimal = ZERO  # signed in one-way mode, positive in hedge mode
    cash: Decimal = ZERO  # sell notional minus buy notional over the current life


class PaperExchange:
    name = "paper"
    unknown_outcome_seconds = 0.0  # in-process: an order exists the moment it is sent, or never
    send_span_seconds = 0.0
    quotes = False  # no market data of its own: its prices are the ticks it was given

    def __init__(
        self,
        mode: PositionMode = PositionMode.HEDGE,
        taker_fee: Decimal = DEFAULT_TAKER_FEE,
        slippage: Decimal = ZERO,
        markets: dict[str, Market] | None = None,
        balance: Decimal = DEFAULT_BALANCE,
        funding_rate: Decimal = ZERO,
    ) -> None:
        self.mode = mode
        self.taker_fee = taker_fee
        self.slippage = slippage
        self.markets = dict(markets or BUILTIN_MARKETS)
        self.last_prices: dict[str, Decimal] = {}
        self.holdings: dict[tuple[str, PositionSide | None], PaperPosition] = {}
        self.orders: dict[ClientOrderId, Fill] = {}
        self.realized_pnl = ZERO
        self.fees_paid = ZERO
        self.balance = balance  # the wallet before any trade (PAPER_BALANCE); no leverage
        self.cash_before_start = ZERO  # net cash of the trades a restart replayed
        self.funding_rate = funding_rate  # per 8 hours (PAPER_FUNDING_RATE); 0: no funding
        self.funding: dict[str, VenueFunding] = {}
        self.stops: dict[str, VenueStop] = {}
        self.stop_fills: list[VenueOrder] = []  # the market orders triggered stops became
        self.funding_received = ZERO

    def market(self, symbol: str) -> Market | None:
        return self.markets.get(symbol)

    def on_price(self, symbol: str, price: Decimal) -> None:
        self.last_prices[symbol] = price
        for stop in [s for s in self.stops.values() if s.key.symbol == symbol and s.status == "open"]:
            if (price <= stop.trigger) if stop.key.side is PositionSide.LONG else (price >= stop.trigger):
                self._trigger(stop, price)

    def _trigger(self, stop: VenueStop, price: Decimal) -> None:
        """A stop-market order as Binance runs one: at the trigger, a reduce-only market order
        for the stop's quantity (at most what is held), at the price that crossed it."""
        side = stop.key.side
        pos = self.holdings.get((stop.key.symbol, side if self.mode is PositionMode.HEDGE else None))
        held = ZERO if pos is None else abs(pos.quantity)
        quantity = min(stop.quantity, held)
        order_id = f"paper-stop-{len(self.stop_fills) + 1}"
        self.stops[stop.client_id] = dataclasses.replace(
            stop, status="triggered", fill_order_id=order_id if quantity else None
        )
        if not quantity or pos is None:
            return
        signed = -quantity * side.sign
        self._move(pos, signed if self.mode is PositionMode.ONE_WAY else -quantity, signed, price)
        fee = taker_fee(quantity, price, self.taker_fee)
        self.fees_paid += fee
        self.stop_fills.append(
            VenueOrder(
                client_order_id=stop.client_id, exchange_order_id=order_id, symbol=stop.key.symbol,
                side=OrderSide.closing(side), position_side=side if self.mode is PositionMode.HEDGE else None,
                quantity=quantity, average_price=price, fee=fee, liquidation=False, at=datetime.now(UTC),
            )
        )  # fmt: skip

    async def start(self, read_only: bool = False) -> None:
        return None

    async def reference_price(self, symbol: str) -> Decimal | None:
        return self.last_prices.get(symbol)

    async def venue_prices(self, symbols: list[str], kind: str) -> dict[str, Decimal]:
        return {}  # its prices are the ticks it is given

    async def watch_prices(self, symbols: list[str], kind: str) -> dict[str, Decimal]:
        raise NotImplementedError("the paper venue has no market streams")

    async def funding_since(self, symbol: str, since: datetime) -> list[VenueFunding]:
        """Funding at `funding_rate` every 8 hours (00:00, 08:00, 16:00 UTC) on what the paper
        venue holds, at the last price; each payment is made (and enters the wallet) once.
        With `funding_rate` 0, only the payments `pay_funding` made (a replay's)."""
        if self.funding_rate:
            step = timedelta(hours=FUNDING_INTERVAL_HOURS)
            boundary = datetime(since.year, since.month, since.day, tzinfo=UTC)
            while boundary <= since:
                boundary += step
            now = datetime.now(UTC)
            while boundary <= now:
                self.pay_funding(symbol, self.funding_rate, boundary)
                boundary += step
        return sorted(
            (f for f in self.funding.values() if f.symbol == symbol and f.funding_time >= since),
            key=lambda f: f.funding_time,
        )

    def pay_funding(self, symbol: str, rate: Decimal, at: datetime) -> None:
        """A funding payment at `rate` at `at` on what is held of `symbol` now, at its last price."""
        mark = self.last_prices.get(symbol)
        if mark is None:
            return
        for (held, side), pos in self.holdings.items():
            if held != symbol or not pos.quantity:
                continue
            real_side = side or (PositionSide.LONG if pos.quantity > 0 else PositionSide.SHORT)
            # On the hour as before (refs booked by earlier versions stay the same payment's).
            stamp = (
                f"{at:%Y%m%dT%H}"
                if at == at.replace(minute=0, second=0, microsecond=0)
                else f"{at:%Y%m%dT%H%M%S%f}"
            )
            ref = f"paper:{symbol}:{real_side.value}:{stamp}"
            if ref not in self.funding:
                amount = expected_funding(real_side, abs(pos.quantity), mark, rate)
                self.funding[ref] = VenueFunding(ref, symbol, amount, at, rate, mark, real_side)
                self.funding_received += amount

    async def open_stops(self, symbol: str | None) -> list[VenueStop]:
        return [s for s in self.stops.values() if symbol in (None, s.key.symbol)]

    async def place_stop(self, stop: StopSpec) -> VenueStop:
        """Kept, and triggered by the ticks the paper venue is given, like the venue's."""
        placed = VenueStop(stop.client_id, stop.client_id, stop.key, stop.trigger, stop.quantity, "open")
        self.stops[stop.client_id] = placed
        return placed

    async def cancel_stop(self, stop: VenueStop) -> None:
        self.stops.pop(stop.client_id, None)

    async def stops_since(self, symbol: str, since: datetime) -> list[VenueStop]:
        return [s for s in self.stops.values() if s.key.symbol == symbol]

    async def available_balance(self) -> Decimal:
        """The wallet plus realized PnL less fees, less the cost of what is held (no leverage)."""
        held = sum((abs(pos.cash) for pos in self.holdings.values() if pos.quantity), ZERO)
        return (
            self.balance
            + self.cash_before_start
            + self.realized_pnl
            - self.fees_paid
            + self.funding_received
            - held
        )

    async def find_order(self, client_order_id: ClientOrderId, symbol: str) -> Fill | None:
        return self.orders.get(client_order_id)

    async def positions(self) -> dict[PositionKey, VenuePosition]:
        found: dict[PositionKey, VenuePosition] = {}
        for (symbol, side), pos in self.holdings.items():
            if pos.quantity:
                real_side = side or (PositionSide.LONG if pos.quantity > 0 else PositionSide.SHORT)
                key = PositionKey(symbol, real_side)
                found[key] = VenuePosition(key, abs(pos.quantity), abs(pos.cash / pos.quantity))
        return found

    async def orders_since(self, symbol: str, since: datetime) -> list[VenueOrder]:
        """Our own orders are known to the book; what else moved a position is a stop."""
        return [o for o in self.stop_fills if o.symbol == symbol and o.at >= since]

    async def close(self) -> None:
        return None

    async def execute(self, intent: OrderIntent, not_after: datetime | None = None) -> Fill:
        known = self.orders.get(intent.client_order_id)
        if known is not None:
            return known
        market = self.markets.get(intent.symbol)
        if market is None:
            raise OrderRejected(Reason.UNKNOWN_SYMBOL, f"paper: no market {intent.symbol}")
        if market.round_quantity(intent.quantity) != intent.quantity or intent.quantity < market.min_quantity:
            raise OrderRejected(
                Reason.INVALID_QUANTITY, f"paper: quantity {intent.quantity} off step/minimum"
            )
        price = self.last_prices.get(intent.symbol, intent.reference_price)
        if self.slippage:
            price *= 1 + self.slippage if intent.side is OrderSide.BUY else 1 - self.slippage
        signed = intent.quantity if intent.side is OrderSide.BUY else -intent.quantity
        if self.mode is PositionMode.HEDGE:
            if intent.position_side is None:
                raise OrderRejected(Reason.POSITION_SIDE_REQUIRED, "paper: hedge mode needs positionSide")
            self._trade_hedge(intent, signed, price)
        else:
            self._trade_one_way(intent, signed, price)
        fee = taker_fee(intent.quantity, price, self.taker_fee)
        self.fees_paid += fee
        fill = Fill(
            client_order_id=intent.client_order_id,
            exchange_order_id=f"paper-{intent.client_order_id[2:18]}",
            quantity=intent.quantity,
            average_price=price,
            fee=fee,
        )
        self.orders[intent.client_order_id] = fill
        return fill

    def _trade_hedge(self, intent: OrderIntent, signed: Decimal, price: Decimal) -> None:
        assert intent.position_side is not None
        pos = self.holdings.setdefault((intent.symbol, intent.position_side), PaperPosition())
        delta = signed * intent.position_side.sign  # + grows the leg, - shrinks it
        if delta < 0 and -delta > pos.quantity:
            raise OrderRejected(
                Reason.REDUCE_EXCEEDS_POSITION, f"paper: {intent.quantity} exceeds {pos.quantity}"
            )
        self._move(pos, delta, signed, price)

    def _trade_one_way(self, intent: OrderIntent, signed: Decimal, price: Decimal) -> None:
        pos = self.holdings.setdefault((intent.symbol, None), PaperPosition())
        if intent.reduce_only and (pos.quantity == 0 or (pos.quantity > 0) == (signed > 0)):
            raise OrderRejected(Reason.REDUCE_ONLY_REJECTED, "paper: reduce-only order would increase")
        if pos.quantity and (pos.quantity > 0) != (signed > 0) and abs(signed) > abs(pos.quantity):
            # Crossing zero: close the old side (its life ends), then open the rest.
            closing = -pos.quantity
            self._move(pos, closing, closing, price)
            signed -= closing
        self._move(pos, signed, signed, price)

    def _move(self, pos: PaperPosition, delta: Decimal, signed: Decimal, price: Decimal) -> None:
        pos.quantity += delta
        pos.cash -= signed * price
        if pos.quantity == 0:
            self.realized_pnl += pos.cash
            pos.cash = ZERO

    def restore(self, book: PositionBook, net_cash: Decimal = ZERO) -> None:
        """After a restart, the paper venue holds what the replayed book says it holds, and its
        wallet what the replayed trades left (`net_cash`: closed PnL less every fee)."""
        self.cash_before_start = net_cash
        self.holdings.clear()
        for key, ep in book.exchange.items():
            if self.mode is PositionMode.HEDGE:
                self.holdings[(key.symbol, key.side)] = PaperPosition(ep.quantity, -ep.cost * key.side.sign)
            else:
                self.holdings[(key.symbol, None)] = PaperPosition(
                    ep.quantity * key.side.sign, -ep.cost * key.side.sign
                )

    def position(self, symbol: str, side: PositionSide) -> Decimal:
        if self.mode is PositionMode.HEDGE:
            return self.holdings.get((symbol, side), PaperPosition()).quantity
        net = self.holdings.get((symbol, None), PaperPosition()).quantity
        return max(net * side.sign, ZERO)
