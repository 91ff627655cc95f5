"""Real venues through ccxt (`EXCHANGE=binanceusdm` and other ccxt derivatives venues).

Every order carries a client order id derived from its signal or slice, so the venue itself
can tell us whether an order whose answer we lost exists. The retry policy follows the error
class (DESIGN §4.3): rejections are final; throttling is retried with the same id after a
pause; an ambiguous outcome is looked up by client order id before anything is sent again.
ccxt is imported here only, and this module only when a ccxt venue is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import ccxt.async_support as ccxt_async
import structlog
from ccxt.base.errors import (
    AuthenticationError,
    BadRequest,
    BadSymbol,
    DDoSProtection,
    ExchangeError,
    InsufficientFunds,
    InvalidNonce,
    InvalidOrder,
    NetworkError,
    OperationFailed,
    OperationRejected,
    OrderNotFound,
    PermissionDenied,
    RateLimitExceeded,
)

from engine import metrics
from engine.adapters.gateway import OrderRejected, OrderUncertain, StopRefused
from engine.domain.funding import VenueFunding
from engine.domain.model import (
    ZERO,
    ClientOrderId,
    Market,
    OrderSide,
    PositionKey,
    PositionMode,
    PositionSide,
    decimal_text,
)
from engine.domain.orders import (
    MAX_ORDER_PARTS,
    Fill,
    OrderIntent,
    combined_fill,
    is_part,
    order_parts,
    part_client_id,
)
from engine.domain.pnl import taker_fee
from engine.domain.reasons import Reason
from engine.domain.reconcile import VenueOrder, VenuePosition
from engine.domain.stops import STOP_CLIENT_ID_PREFIX, StopSpec, VenueStop

log = structlog.get_logger(__name__)
T = TypeVar("T")
D = Decimal

FINAL_CLASSES: tuple[type[Exception], ...] = (
    InsufficientFunds,
    InvalidOrder,
    BadRequest,
    OperationRejected,
    BadSymbol,
    AuthenticationError,
    PermissionDenied,
)
RETRY_CLASSES: tuple[type[Exception], ...] = (RateLimitExceeded, DDoSProtection, InvalidNonce)
# Binance codes behind a plain ExchangeError / OperationFailed: which mean "not placed, retry"
# and which mean "we cannot tell"; every other venue code is a final rejection.
VENUE_RETRY_CODES = {-1003, -1015, -1021}
VENUE_AMBIGUOUS_CODES = {-1000, -1001, -1006, -1007, -1008, -4116}
VENUE_REASONS = {
    -1106: Reason.PARAMETER_NOT_REQUIRED,
    -1111: Reason.INVALID_PRECISION,
    -1121: Reason.UNKNOWN_SYMBOL,
    -2019: Reason.INSUFFICIENT_MARGIN,
    -2022: Reason.REDUCE_ONLY_REJECTED,
    -4003: Reason.INVALID_QUANTITY,
    -4004: Reason.BELOW_MIN_QUANTITY,
    -4005: Reason.ABOVE_MAX_QUANTITY,
    -4061: Reason.POSITION_SIDE_MISMATCH,
    -4164: Reason.BELOW_MIN_NOTIONAL,
}
_CODE = re.compile(r'"code"\s*:\s*(-?\d+)')


# The moment after which an order's request must not leave (see `_guard_requests`).
SEND_DEADLINE: ContextVar[datetime | None] = ContextVar("SEND_DEADLINE", default=None)


class PastSendDeadline(Exception):
    """An order request reached the wire after its send deadline and was not sent."""


@dataclass(frozen=True, slots=True)
class AccountSettings:
    """LEVERAGE / MARGIN_TYPE, global and per symbol; None leaves the account as it is."""

    leverage: int | None = None
    margin_type: str | None = None  # "isolated" or "cross" (ccxt's names)
    leverage_by_symbol: dict[str, int] = field(default_factory=dict)
    margin_type_by_symbol: dict[str, str] = field(default_factory=dict)

    def leverage_of(self, symbol: str) -> int | None:
        return self.leverage_by_symbol.get(symbol, self.leverage)

    def margin_type_of(self, symbol: str) -> str | None:
        return self.margin_type_by_symbol.get(symbol, self.margin_type)

    def overridden(self) -> set[str]:
        return set(self.leverage_by_symbol) | set(self.margin_type_by_symbol)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 5
    backoff: float = 0.25  # seconds, doubled per attempt
    max_backoff: float = 4.0
    fill_wait: float = 10.0  # how long a placed market order may take to report its fill
    # The venue refuses a request older than this when it reaches the matching engine, so an
    # order not found once this much (plus a margin) has passed since sending will never be.
    recv_window: float = 5.0
    # No attempt of one order is sent later than this after the first: so a process that
    # restarts knows, from the journal alone, when the last request can no longer execute.
    send_span: float = 30.0
    # How far the venue's clock may run behind ours (its receive window closes that much later).
    clock_margin: float = 2.0

    @property
    def unknown_outcome_seconds(self) -> float:
        """After journaling an order, how long its requests may still reach the venue and
        execute: before then, "no such order" does not mean it will never exist."""
        return self.send_span + self.recv_window + self.clock_margin


def venue_code(exc: Exception) -> int | None:
    found = _CODE.search(str(exc))
    return int(found.group(1)) if found else None


def classify(exc: Exception) -> str:
    """'final' (never placed, do not retry), 'retry' (not placed, send again with the same
    client order id) or 'ambiguous' (look the order up before sending anything)."""
    if isinstance(exc, OrderNotFound):
        return "ambiguous"
    code = venue_code(exc)
    if code in VENUE_AMBIGUOUS_CODES:
        return "ambiguous"
    if code in VENUE_RETRY_CODES or isinstance(exc, RETRY_CLASSES):
        return "retry"
    if isinstance(exc, FINAL_CLASSES):
        return "final"
    if isinstance(exc, NetworkError):  # RequestTimeout, ExchangeNotAvailable, ...
        return "ambiguous"
    if code is not None and isinstance(exc, ExchangeError | OperationFailed):
        return "final"  # the venue answered with a reason of its own
    return "ambiguous"  # a plain ExchangeError / OperationFailed from the transport


def reason_code(exc: Exception) -> str:
    code = venue_code(exc)
    if code in VENUE_REASONS:
        return VENUE_REASONS[code]
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()
    return f"venue_{snake}" if code is None else f"venue_code_{-code}"


def venue_message(exc: Exception) -> str:
    """The venue's own `msg` when it sent one, else ccxt's text."""
    text = str(exc)
    start = text.find("{")
    if start >= 0:
        try:
            body = json.loads(text[start:])
            if isinstance(body, dict) and "msg" in body:
                return f"venue: {body['msg']} (code {body.get('code')})"
        except ValueError:
            pass
    return f"venue: {text[:300]}"


def rewrite_urls(urls: Any, base: str, schemes: tuple[str, ...] = ("http://", "https://")) -> Any:
    """Every endpoint of these schemes moved to `base`'s scheme and host, paths kept
    (EXCHANGE_API_URL for REST, EXCHANGE_WS_URL for websockets)."""
    target = urlsplit(base)
    if isinstance(urls, dict):
        return {name: rewrite_urls(value, base, schemes) for name, value in urls.items()}
    if isinstance(urls, str) and urls.startswith(schemes):
        parts = urlsplit(urls)
        return urlunsplit((target.scheme, target.netloc, parts.path, parts.query, parts.fragment))
    return urls


class CcxtGateway:
    def __init__(
        self,
        exchange_id: str,
        mode: PositionMode,
        api_key: str | None,
        secret: str | None,
        sandbox: bool = False,
        api_url: str | None = None,
        set_position_mode: bool = False,
        timeout: float = 10.0,
        policy: RetryPolicy | None = None,
        rate_limit_ms: float | None = None,  # ccxt's client-side throttle; by default the venue's
        account: AccountSettings | None = None,
        ws_url: str | None = None,
    ) -> None:
        if not hasattr(ccxt_async, exchange_id):
            raise ValueError(f"ccxt has no exchange {exchange_id!r}")
        self.name = exchange_id
        self.mode = mode
        self.policy = policy or RetryPolicy()
        self.account = account or AccountSettings()
        self._configured: set[str] = set()  # symbols whose leverage and margin type are set
        self.unknown_outcome_seconds = self.policy.unknown_outcome_seconds
        self.send_span_seconds = self.policy.send_span
        self.set_position_mode = set_position_mode
        config: dict[str, Any] = {} if rate_limit_ms is None else {"rateLimit": rate_limit_ms}
        self.exchange: Any = getattr(ccxt_async, exchange_id)(
            config
            | {
                "apiKey": api_key or "",
                "secret": secret or "",
                "enableRateLimit": True,
                "timeout": int(timeout * 1000),
                "options": {
                    "fetchCurrencies": False,
                    "defaultType": "swap",
                    "warnOnFetchOpenOrdersWithoutSymbol": False,
                    "recvWindow": int(self.policy.recv_window * 1000),
                    # Stamp requests with the venue's clock, not ours: a host clock running
                    # ahead would otherwise fail every signed request (-1021).
                    "adjustForTimeDifference": True,
                },
            }
        )
        if sandbox:
            self.exchange.set_sandbox_mode(True)
        if api_url:
            self.exchange.urls["api"] = rewrite_urls(self.exchange.urls["api"], api_url)
        self._guard_requests(urlsplit(api_url).netloc if api_url else None)
        self._markets: dict[str, Market] = {}
        self._unified: dict[str, str] = {}
        self._ws_url = ws_url
        self._streams: Any = None
        self._taker: dict[str, Decimal] = {}  # ccxt's static rates: a fallback only
        self._venue_taker: dict[str, Decimal] = {}  # the account's own, as the venue states them
        self.settlement_asset = "USDT"  # linear USD-M swaps settle in it
        self.stop_working_type = "CONTRACT_PRICE"  # or MARK_PRICE (TPSL_PRICE=mark)

    def _guard_requests(self, allowed: str | None) -> None:
        """Checks on every request as it leaves, after ccxt's throttle and signature: with
        EXCHANGE_API_URL set, no request may go to any other host; and an order request past
        its send deadline (SEND_DEADLINE, set around an order's attempts) is not sent at all,
        however long it queued behind other requests in the throttle."""
        original = self.exchange.fetch

        async def fetch(url: str, method: str = "GET", headers: Any = None, body: Any = None) -> Any:
            if allowed is not None and urlsplit(url).netloc != allowed:
                raise PermissionError(
                    f"refusing a request to {urlsplit(url).netloc}: only {allowed} is allowed"
                )
            deadline = SEND_DEADLINE.get()
            if deadline is not None and method == "POST" and datetime.now(UTC) > deadline:
                raise PastSendDeadline(f"not sent: past its send deadline {deadline.isoformat()}")
            return await original(url, method, headers, body)

        self.exchange.fetch = fetch

    # --- start-up ------------------------------------------------------------------------
    async def start(self, read_only: bool = False) -> None:
        """Load the markets; unless `read_only` (a desk view), check the position mode and set
        the account settings configured by symbol."""
        await self._call(self.exchange.load_markets)
        for unified, m in self.exchange.markets.items():
            if not m.get("swap") or not m.get("linear") or not m.get("active", True):
                continue
            amount_step = _dec(m["precision"]["amount"])
            self._unified[m["id"]] = unified
            self._taker[m["id"]] = _dec(m.get("taker") or "0.0005")
            self._markets[m["id"]] = Market(
                symbol=m["id"],
                quantity_step=amount_step,
                min_quantity=_dec(m["limits"]["amount"]["min"] or amount_step),
                min_notional=_dec(m["limits"]["cost"]["min"] or 0),
                price_tick=_dec(m["precision"]["price"]),
                max_quantity=_max_market_quantity(m["limits"]),
            )
        self._record_clock_offset()
        if read_only:
            return
        await self._check_position_mode()
        for symbol in sorted(self.account.overridden()):  # the symbols configured by name: now
            await self.configure(symbol)
        log.info(
            "venue.ready",
            venue=self.name,
            markets=len(self._markets),
            mode=self.mode.value,
            clock_offset_ms=self.exchange.options.get("timeDifference", 0),
        )

    def _record_clock_offset(self) -> None:
        offset_ms = int(self.exchange.options.get("timeDifference") or 0)
        metrics.child(metrics.VENUE_CLOCK_OFFSET, self.name).set(offset_ms / 1000)

    async def configure(self, symbol: str) -> None:
        """Set the symbol's margin type and leverage as configured, once, and check what the
        venue answered: an order must not go out with whatever the account had."""
        if symbol in self._configured or symbol not in self._unified:
            return
        unified = self._unified[symbol]
        margin, leverage = self.account.margin_type_of(symbol), self.account.leverage_of(symbol)
        try:
            if margin is not None:
                answer = await self._call(lambda: self.exchange.set_margin_mode(margin, unified))
                code = (answer or {}).get("code")
                if code not in (None, 200, "200", -4046, "-4046"):
                    raise OrderRejected(Reason.MARGIN_TYPE_NOT_SET, f"{symbol}: venue answered {answer}")
            if leverage is not None:
                answer = await self._call(lambda: self.exchange.set_leverage(leverage, unified))
                if int((answer or {}).get("leverage", -1)) != leverage:
                    raise OrderRejected(Reason.LEVERAGE_NOT_SET, f"{symbol}: venue answered {answer}")
        except OrderRejected:
            raise
        except Exception as exc:
            if classify(exc) == "final":  # e.g. -4048: a position of the other margin type is open
                raise OrderRejected(Reason.ACCOUNT_SETTINGS_REFUSED, venue_message(exc)) from exc
            raise OrderRejected(Reason.ACCOUNT_SETTINGS_UNKNOWN, f"{symbol}: {exc!r}"[:300]) from exc
        log.info("venue.symbol_configured", symbol=symbol, margin_type=margin, leverage=leverage)
        self._configured.add(symbol)

    async def _check_position_mode(self) -> None:
        if not self.exchange.has.get("fetchPositionMode"):
            return
        any_symbol = next(iter(self._unified.values()), None)
        info = await self._call(lambda: self.exchange.fetch_position_mode(any_symbol))
        hedged = bool(info.get("hedged"))
        wanted = self.mode is PositionMode.HEDGE
        if hedged == wanted:
            return
        if not self.set_position_mode:
            raise RuntimeError(
                f"{self.name} is in {'hedge' if hedged else 'one-way'} mode but POSITION_MODE={self.mode.value}; "
                "change it at the venue or start with SET_POSITION_MODE=true"
            )
        try:
            await self._call(lambda: self.exchange.set_position_mode(wanted))
        except ExchangeError as exc:
            if venue_code(exc) != -4059:  # "No need to change position side": already set
                raise
        log.info("venue.position_mode_set", venue=self.name, mode=self.mode.value)

    # --- the port ------------------------------------------------------------------------
    def market(self, symbol: str) -> Market | None:
        return self._markets.get(symbol)

    def on_price(self, symbol: str, price: Decimal) -> None:
        return None

    quotes = True

    async def reference_price(self, symbol: str) -> Decimal | None:
        unified = self._unified.get(symbol)
        if unified is None:
            return None
        ticker = await self._call(lambda: self.exchange.fetch_mark_price(unified))
        raw = ticker.get("markPrice") or (ticker.get("info") or {}).get("markPrice") or ticker.get("last")
        price = _dec(raw) if raw is not None else ZERO
        return price if price > 0 else None

    async def venue_prices(self, symbols: list[str], kind: str) -> dict[str, Decimal]:
        """The venue's `last` (Binance: /fapi/v2/ticker/price) or `mark` (premiumIndex) price
        of each symbol, in one request."""
        unified = {self._unified[s]: s for s in symbols if s in self._unified}
        if not unified:
            return {}
        found: dict[str, Decimal] = {}
        if kind == "mark":
            tickers = await self._call(lambda: self.exchange.fetch_mark_prices(list(unified)))
            for name, ticker in tickers.items():
                raw = ticker.get("markPrice") or (ticker.get("info") or {}).get("markPrice")
                if name in unified and raw is not None:
                    found[unified[name]] = _dec(raw)
        else:
            prices = await self._call(lambda: self.exchange.fetch_last_prices(list(unified)))
            for name, row in prices.items():
                if name in unified and row.get("price") is not None:
                    found[unified[name]] = _dec(row["price"])
        return {s: p for s, p in found.items() if p > 0}

    async def funding_since(self, symbol: str, since: datetime) -> list[VenueFunding]:
        """The account's funding payments on `symbol` (Binance: GET /fapi/v1/income, FUNDING_FEE),
        each with the rate and mark price of its funding time (GET /fapi/v1/fundingRate)."""
        unified = self._unified.get(symbol)
        if unified is None:
            return []
        since_ms = int(since.timestamp() * 1000)
        paid = await self._call(lambda: self.exchange.fetch_funding_history(unified, since_ms, 1000))
        if not paid:
            return []
        rates = await self._call(
            lambda: self.exchange.fetch_funding_rate_history(unified, since_ms - 60_000, 1000)
        )
        found = []
        for row in paid:
            at = int(row.get("timestamp") or 0)
            # The payment and the rate of one funding time carry (nearly) the same stamp.
            nearest = min(rates, key=lambda r: abs(int(r.get("timestamp") or 0) - at), default=None)
            close_enough = nearest is not None and abs(int(nearest.get("timestamp") or 0) - at) <= 60_000
            rate = (
                _dec(nearest["fundingRate"])
                if close_enough and nearest and nearest.get("fundingRate") is not None
                else None
            )
            mark_raw = ((nearest or {}).get("info") or {}).get("markPrice") if close_enough else None
            found.append(
                VenueFunding(
                    ref=f"{self.name}:{row.get('id') or (row.get('info') or {}).get('tranId')}",
                    symbol=symbol,
                    amount=_dec(row.get("amount") or (row.get("info") or {}).get("income") or 0),
                    funding_time=datetime.fromtimestamp(at / 1000, UTC),
                    rate=rate,
                    mark_price=_dec(mark_raw) if mark_raw not in (None, "", "0") else None,
                )
            )
        return found

    # --- protective stops: Binance's Algo Order API, as ccxt 4.5 drives it ---------------
    # (docs/research/binance-algo-orders.md: conditional orders go to POST /fapi/v1/algoOrder;
    # fetching or cancelling them needs {"trigger": True}, or ccxt asks /fapi/v1/order.)
    async def open_stops(self, symbol: str | None) -> list[VenueStop]:
        unified = self._unified.get(symbol) if symbol else None
        if symbol and unified is None:
            return []
        rows = await self._call(
            lambda: self.exchange.fetch_open_orders(unified, None, None, {"trigger": True})
        )
        return [stop for row in rows if (stop := self._stop_of(row)) is not None]

    async def place_stop(self, stop: StopSpec) -> VenueStop:
        unified = self._unified[stop.key.symbol]
        params: dict[str, Any] = {
            "stopLossPrice": decimal_text(stop.trigger),
            "clientOrderId": stop.client_id,
            "workingType": self.stop_working_type,
        }
        if self.mode is PositionMode.HEDGE:
            params["positionSide"] = stop.key.side.value
        else:
            params["reduceOnly"] = True
        side = OrderSide.closing(stop.key.side).value
        try:
            row = await self._call(
                lambda: self.exchange.create_order(
                    unified, "market", side, float(stop.quantity), None, params
                )
            )
        except Exception as exc:
            code = venue_code(exc)
            if code in (-4116, -20132):  # placed before (a retry, a restart): it is open already
                for known in await self.open_stops(stop.key.symbol):
                    if known.client_id == stop.client_id:
                        return known
            raise StopRefused(venue_message(exc)) from exc
        placed = self._stop_of(row)
        if placed is None:
            raise StopRefused(f"unreadable answer for stop {stop.client_id}")
        return placed

    async def cancel_stop(self, stop: VenueStop) -> None:
        unified = self._unified[stop.key.symbol]
        try:
            await self._call(lambda: self.exchange.cancel_order(stop.venue_id, unified, {"trigger": True}))
        except OrderNotFound:
            return  # triggered or cancelled already
        except Exception as exc:
            if venue_code(exc) in (-2011, -2013, -20124):
                return
            raise

    async def stops_since(self, symbol: str, since: datetime) -> list[VenueStop]:
        unified = self._unified.get(symbol)
        if unified is None:
            return []
        # Binance: GET /fapi/v1/allAlgoOrders (symbol required; 7 days at most).
        since_ms = max(int(since.timestamp() * 1000), int(time.time() * 1000) - 7 * 86_400_000 + 60_000)
        rows = await self._call(
            lambda: self.exchange.fetch_orders(unified, since_ms, None, {"trigger": True})
        )
        return [stop for row in rows if (stop := self._stop_of(row)) is not None]

    def _stop_of(self, row: dict[str, Any]) -> VenueStop | None:
        info = row.get("info") or {}
        client_id = str(info.get("clientAlgoId") or row.get("clientOrderId") or "")
        symbol = info.get("symbol")
        if not client_id.startswith(STOP_CLIENT_ID_PREFIX) or symbol not in self._markets:
            return None
        order_side = OrderSide(str(info.get("side", row.get("side", ""))).lower())
        position_side = _position_side(info)
        side = position_side or (PositionSide.LONG if order_side is OrderSide.SELL else PositionSide.SHORT)
        status = {"NEW": "open", "TRIGGERING": "open", "TRIGGERED": "triggered", "FINISHED": "triggered"}.get(
            str(info.get("algoStatus")), str(info.get("algoStatus", "")).lower()
        )
        return VenueStop(
            client_id=client_id,
            venue_id=str(info.get("algoId") or row.get("id")),
            key=PositionKey(symbol, side),
            trigger=_dec(info.get("triggerPrice") or row.get("triggerPrice") or 0),
            quantity=_dec(info.get("quantity") or row.get("amount") or 0),
            status=status,
            fill_order_id=str(info.get("actualOrderId")) if info.get("actualOrderId") else None,
        )

    async def available_balance(self) -> Decimal | None:
        balance = await self._call(self.exchange.fetch_balance)
        free = (balance.get("free") or {}).get(self.settlement_asset)
        return _dec(free) if free is not None else None

    async def execute(self, intent: OrderIntent, not_after: datetime | None = None) -> Fill:
        """One order; above the venue's per-order maximum (Binance: MARKET_LOT_SIZE maxQty),
        its parts in turn, each with its own client id (the order's plus `.0`, `.1`, ...), each
        exactly-once as any order. A part refused after others filled ends the order with what
        filled; a part of unknown outcome leaves the whole to the journal's lookup, which
        gathers the parts (`find_order`) and sends no part after it."""
        market = self._markets.get(intent.symbol)
        if market is None:
            raise OrderRejected(Reason.UNKNOWN_SYMBOL, f"{self.name} lists no linear swap {intent.symbol}")
        parts = order_parts(intent.quantity, market.max_quantity, market.quantity_step)
        if len(parts) == 1:
            return await self._execute_one(intent, not_after)
        if len(parts) > MAX_ORDER_PARTS:
            raise OrderRejected(
                Reason.ABOVE_MAX_QUANTITY,
                f"{intent.quantity} needs more than {MAX_ORDER_PARTS} orders of {market.max_quantity}",
            )
        fills: list[Fill] = []
        for index, quantity in enumerate(parts):
            part = dataclasses.replace(
                intent, client_order_id=part_client_id(intent.client_order_id, index), quantity=quantity
            )
            try:
                fills.append(await self._execute_one(part, not_after))
            except OrderRejected as refused:
                if not fills:
                    raise
                log.warning("venue.order_parts_stopped", client_order_id=intent.client_order_id,
                            filled_parts=len(fills), parts=len(parts), error=str(refused))  # fmt: skip
                break
        return combined_fill(intent.client_order_id, fills)

    async def _execute_one(self, intent: OrderIntent, not_after: datetime | None) -> Fill:
        market = self._markets[intent.symbol]
        if market.round_quantity(intent.quantity) != intent.quantity or intent.quantity < market.min_quantity:
            raise OrderRejected(
                Reason.INVALID_QUANTITY,
                f"quantity {intent.quantity} is off the step {market.quantity_step} or below {market.min_quantity}",
            )
        if not intent.reduce_only and intent.quantity * intent.reference_price < market.min_notional:
            raise OrderRejected(
                Reason.BELOW_MIN_NOTIONAL,
                f"notional {intent.quantity * intent.reference_price} is below the venue minimum {market.min_notional}",
            )
        await self.configure(intent.symbol)  # before the first order on the symbol (refusal: final)
        params: dict[str, Any] = {"newClientOrderId": intent.client_order_id}
        if self.mode is PositionMode.HEDGE:
            # Binance refuses reduceOnly next to positionSide (-1106): the side says it all.
            params["positionSide"] = (intent.position_side or PositionSide.LONG).value
        elif intent.reduce_only:
            params["reduceOnly"] = True
        unified = self._unified[intent.symbol]
        delay = self.policy.backoff
        first_sent = time.monotonic()
        for attempt in range(1, self.policy.attempts + 1):
            late = (not_after is not None and datetime.now(UTC) > not_after) or (
                attempt > 1 and time.monotonic() - first_sent > self.policy.send_span
            )
            if late:
                # Sending now would outlive what a restarted process assumes (see send_span):
                # the journal and a lookup decide instead.
                raise OrderUncertain(f"{intent.client_order_id}: past its send span, not sent again")
            deadline = SEND_DEADLINE.set(not_after)
            try:
                order = await self.exchange.create_order(
                    unified, "market", intent.side.value, float(intent.quantity), None, dict(params)
                )
            except PastSendDeadline as exc:
                raise OrderUncertain(f"{intent.client_order_id}: {exc}") from exc
            except Exception as exc:
                kind = classify(exc)
                metrics.ORDER_ERRORS.labels(self.name, type(exc).__name__).inc()
                log.warning(
                    "venue.order_error",
                    attempt=attempt,
                    kind=kind,
                    error=type(exc).__name__,
                    message=venue_message(exc),
                    client_order_id=intent.client_order_id,
                )
                if kind == "final":
                    raise OrderRejected(reason_code(exc), venue_message(exc)) from exc
                if venue_code(exc) == -1021:  # our stamp and the venue's clock disagree: measure again
                    with contextlib.suppress(Exception):
                        await self.exchange.load_time_difference()
                        self._record_clock_offset()
                if kind == "ambiguous":
                    found = await self._await_unknown_outcome(intent, time.monotonic())
                    if found is not None:
                        return found
                    # The venue says it has no such order, and the request is too old to be
                    # executed any more: sending it again cannot make a second order.
                else:
                    await asyncio.sleep(delay)
                delay = min(delay * 2, self.policy.max_backoff)
                continue
            finally:
                SEND_DEADLINE.reset(deadline)
            try:
                return await self._fill_of(str(order["id"]), unified, intent.symbol)
            except OrderRejected:
                raise
            except Exception as exc:  # placed, but its fill could not be read: look it up later
                raise OrderUncertain(f"{intent.client_order_id}: placed, fill unknown ({exc!r})") from exc
        raise OrderRejected(
            Reason.VENUE_UNAVAILABLE,
            f"{self.name} kept refusing for now after {self.policy.attempts} attempts",
        )

    async def find_order(self, client_order_id: ClientOrderId, symbol: str) -> Fill | None:
        """The order, or the parts of it sent (in turn: the first part not found ends them)."""
        found = await self._find_one(client_order_id, symbol)
        if found is not None or is_part(client_order_id):
            return found
        fills: list[Fill] = []
        for index in range(MAX_ORDER_PARTS):
            part = await self._find_one(part_client_id(client_order_id, index), symbol)
            if part is None:
                break
            fills.append(part)
        return combined_fill(client_order_id, fills) if fills else None

    async def _find_one(self, client_order_id: ClientOrderId, symbol: str) -> Fill | None:
        unified = self._unified.get(symbol)
        if unified is None:
            return None
        try:
            order = await self._call(
                lambda: self.exchange.fetch_order(None, unified, {"origClientOrderId": client_order_id})
            )
        except OrderNotFound:
            return None
        if float(order.get("filled") or 0) == 0 and order.get("status") != "open":
            return None  # canceled or expired with nothing filled: as good as never placed
        return await self._fill_of(str(order["id"]), unified, symbol)

    async def _await_unknown_outcome(self, intent: OrderIntent, failed_at: float) -> Fill | None:
        """After an answer we cannot read: look the order up until it shows, or until the
        venue has said "no such order" after its receive window closed on the request (then
        it never will be executed). A lookup that fails proves nothing: if no lookup succeeds
        in time, the outcome stays unknown (OrderUncertain)."""
        # The request was stamped before it failed: its window closes by failed_at + window.
        closes_at = failed_at + self.policy.recv_window + 1.0
        gives_up_at = closes_at + self.policy.fill_wait
        delay = self.policy.backoff
        while True:
            await asyncio.sleep(delay)
            try:
                found = await self.find_order(intent.client_order_id, intent.symbol)
            except Exception as exc:
                if time.monotonic() > gives_up_at:
                    raise OrderUncertain(
                        f"{intent.client_order_id}: lookup failed ({type(exc).__name__})"
                    ) from exc
            else:
                if found is not None or time.monotonic() > closes_at:
                    return found  # found, or absent for good
            delay = min(delay * 2, self.policy.max_backoff, max(closes_at - time.monotonic(), 0.05))

    async def _fill_of(self, order_id: str, unified: str, symbol: str) -> Fill:
        """The order's own filled amount and average (never a create answer's `price`, which
        is "0" for market orders) and its fee from the trades."""
        deadline = time.monotonic() + self.policy.fill_wait
        while True:
            order = await self._call(lambda: self.exchange.fetch_order(order_id, unified))
            if order.get("status") in ("closed", "canceled", "expired", "rejected"):
                break
            if time.monotonic() > deadline:
                raise OrderUncertain(
                    f"order {order_id} still {order.get('status')} after {self.policy.fill_wait}s"
                )
            await asyncio.sleep(0.05)
        filled, average = _filled_at(order)
        if filled <= 0 or average <= 0:
            raise OrderRejected(
                Reason.NOT_FILLED, f"{self.name} order {order_id} ended {order.get('status')} unfilled"
            )
        trades = await self._call(
            lambda: self.exchange.fetch_my_trades(unified, None, None, {"orderId": order_id})
        )
        fee = await self._fee_of(trades, unified, symbol) if trades else None
        if fee is None:
            fee = taker_fee(filled, average, await self.taker_rate(symbol))
        return Fill(
            client_order_id=ClientOrderId(_client_id(order)),
            exchange_order_id=order_id,
            quantity=filled,
            average_price=average,
            fee=fee,
        )

    async def positions(self) -> dict[PositionKey, VenuePosition]:
        rows = await self._call(lambda: self.exchange.fetch_positions(list(self._unified.values())))
        found: dict[PositionKey, VenuePosition] = {}
        for row in rows:
            info = row.get("info") or {}
            symbol = info.get("symbol") or self.exchange.market(row["symbol"])["id"]
            amount = _dec(info.get("positionAmt", row.get("contracts") or 0))
            if not amount or symbol not in self._markets:
                continue
            side = _position_side(info) or (PositionSide.LONG if amount > 0 else PositionSide.SHORT)
            key = PositionKey(symbol, side)
            found[key] = VenuePosition(
                key, abs(amount), _dec(info.get("entryPrice", row.get("entryPrice") or 0))
            )
        return found

    async def orders_since(self, symbol: str, since: datetime) -> list[VenueOrder]:
        """Filled orders since `since`, each with the commission the venue charged for it (its
        trades), or, for an order whose trades are out of reach, the account's own rate."""
        unified = self._unified.get(symbol)
        if unified is None:
            return []
        since_ms = int(since.timestamp() * 1000)
        rows = await self._paged(lambda start: self.exchange.fetch_orders(unified, start, 1000), since_ms)
        trades_by_order: dict[str, list[Any]] = {}
        for trade in await self._trades_since(unified, since_ms):
            trades_by_order.setdefault(
                str(trade.get("order") or (trade.get("info") or {}).get("orderId")), []
            ).append(trade)
        rate = await self.taker_rate(symbol)
        orders = []
        for row in rows:
            info = row.get("info") or {}
            filled, average = _filled_at(row)
            if filled <= 0:
                continue
            client_id = _client_id(row)
            trades = trades_by_order.get(str(row["id"]))
            charged = await self._fee_of(trades, unified, symbol) if trades else None
            orders.append(
                VenueOrder(
                    client_order_id=client_id,
                    exchange_order_id=str(row["id"]),
                    symbol=symbol,
                    side=OrderSide(row["side"]),
                    position_side=_position_side(info),
                    quantity=filled,
                    average_price=average,
                    fee=charged if charged is not None else taker_fee(filled, average, rate),
                    liquidation=client_id.startswith(("autoclose", "adl_autoclose"))
                    or info.get("origType") == "LIQUIDATION",
                    at=datetime.fromtimestamp((row.get("timestamp") or 0) / 1000, UTC),
                )
            )
        return orders

    async def _trades_since(self, unified: str, since_ms: int) -> list[Any]:
        """The account's trades on a symbol from `since_ms` on, oldest first, page by page."""
        return await self._paged(lambda start: self.exchange.fetch_my_trades(unified, start, 1000), since_ms)

    async def _paged(
        self, fetch: Callable[[int], Awaitable[list[Any]]], since_ms: int, limit: int = 1000, pages: int = 20
    ) -> list[Any]:
        """Rows from `since_ms` on, oldest first, asking again from just after the last row
        while pages come back full (Binance answers at most `limit` rows a request)."""
        found: list[Any] = []
        start = since_ms
        for _ in range(pages):
            page = await self._call(lambda start=start: fetch(start))  # type: ignore[misc]
            found += page
            if len(page) < limit:
                break
            start = int(page[-1].get("timestamp") or start) + 1
        return found

    async def _fee_of(self, trades: list[Any], unified: str, symbol: str) -> Decimal | None:
        """The commission of these trades in the quote currency; a commission paid in another
        asset (e.g. BNB) is counted at the account's taker rate on the trade's notional."""
        quote = self.exchange.markets[unified].get("quote")
        fee = ZERO
        for trade in trades:
            cost = trade.get("fee") or {}
            info = trade.get("info") or {}
            raw = info.get("commission", cost.get("cost"))
            asset = info.get("commissionAsset", cost.get("currency"))
            if asset in (None, quote) and raw is not None:
                fee += _dec(raw)
            else:
                fee += _dec(info.get("quoteQty", 0)) * await self.taker_rate(symbol)
        return fee

    async def taker_rate(self, symbol: str) -> Decimal:
        """The account's taker commission rate on `symbol`, as the venue states it (Binance:
        GET /fapi/v1/commissionRate, which reflects the account's fee tier and discounts), read
        once per symbol; ccxt's static market rate only if the venue will not say."""
        known = self._venue_taker.get(symbol)
        if known is not None:
            return known
        unified = self._unified[symbol]
        try:
            answer = await self._call(lambda: self.exchange.fetch_trading_fee(unified))
            rate = _dec((answer.get("info") or {}).get("takerCommissionRate", answer.get("taker")))
        except Exception as exc:
            log.warning("venue.commission_rate_unknown", symbol=symbol, error=repr(exc)[:300])
            return self._taker[symbol]
        self._venue_taker[symbol] = rate
        return rate

    async def close(self) -> None:
        await self.exchange.close()
        if self._streams is not None:
            await self._streams.close()

    async def watch_prices(self, symbols: list[str], kind: str) -> dict[str, Decimal]:
        """The next prices the venue's market streams push for `symbols` (Binance:
        `<symbol>@ticker`, or `<symbol>@markPrice@1s`), through ccxt.pro; waits for an update."""
        unified = {self._unified[s]: s for s in symbols if s in self._unified}
        if not unified:
            return {}
        streams = self._market_streams()
        if kind == "mark":
            tickers = await streams.watch_mark_prices(list(unified))
        else:
            tickers = await streams.watch_tickers(list(unified))
        found: dict[str, Decimal] = {}
        for name, ticker in tickers.items():
            raw = (
                (ticker.get("markPrice") or (ticker.get("info") or {}).get("p"))
                if kind == "mark"
                else ticker.get("last")
            )
            if name in unified and raw is not None and _dec(raw) > 0:
                found[unified[name]] = _dec(raw)
        return found

    def _market_streams(self) -> Any:
        """A ccxt.pro client for the public market streams, sharing the REST client's markets;
        with EXCHANGE_WS_URL every websocket URL moves there (paths kept)."""
        if self._streams is None:
            import ccxt.pro as ccxt_pro

            streams = getattr(ccxt_pro, self.name)({"options": {"defaultType": "swap"}})
            if self._ws_url is not None:
                streams.urls["api"]["ws"] = rewrite_urls(
                    streams.urls["api"]["ws"], self._ws_url, ("ws://", "wss://")
                )
            streams.set_markets(self.exchange.markets)
            self._streams = streams
        return self._streams

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        """Reads are safe to repeat: retry throttling and network errors, bounded."""
        delay = self.policy.backoff
        for attempt in range(1, self.policy.attempts + 1):
            try:
                return await call()
            except (NetworkError, OperationFailed) as exc:
                if attempt == self.policy.attempts or classify(exc) == "final":
                    raise
                log.info("venue.read_retry", attempt=attempt, error=type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.policy.max_backoff)
        raise AssertionError("unreachable")


def _filled_at(order: dict[str, Any]) -> tuple[Decimal, Decimal]:
    """(filled quantity, average price) of a ccxt order, from the venue's own strings when
    it sent them (Binance: executedQty, avgPrice), else from ccxt's floats."""
    info = order.get("info") or {}
    return (
        _dec(info.get("executedQty", order.get("filled") or 0)),
        _dec(info.get("avgPrice", order.get("average") or 0)),
    )


def _client_id(order: dict[str, Any]) -> str:
    return str(order.get("clientOrderId") or (order.get("info") or {}).get("clientOrderId") or "")


def _position_side(info: dict[str, Any]) -> PositionSide | None:
    """The hedge-mode leg an order or position row names; None for one-way ("BOTH")."""
    raw = info.get("positionSide")
    return PositionSide(raw) if raw in ("LONG", "SHORT") else None


def _dec(value: Any) -> Decimal:
    """ccxt hands numbers back as floats; their shortest repr is the venue's decimal string."""
    return value if isinstance(value, Decimal) else D(str(value))


def _max_market_quantity(limits: dict[str, Any]) -> Decimal | None:
    """The most one market order may carry: Binance's MARKET_LOT_SIZE (ccxt's limits.market),
    else the plain amount limit; None when the venue states neither."""
    for kind in ("market", "amount"):
        top = (limits.get(kind) or {}).get("max")
        if top:
            return _dec(top)
    return None
