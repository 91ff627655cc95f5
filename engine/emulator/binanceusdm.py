"""A Binance USD-M futures emulator: the REST subset the ccxt gateway uses, on 127.0.0.1.

It keeps orders, positions (hedge or one-way), fills, fees and realized PnL in memory, answers
with Binance's error bodies `{code, msg}` and HTTP statuses, and takes faults from a control
API under `/emulator/` (commit-then-stall, 5xx with and without body, 429, dropped
connections, liquidations and changes made "by hand"). Client order ids follow Binance: they
must be unique only among open orders, and market orders never stay open, so sending the same
id twice places two orders. The emulator counts them, which is how tests prove exactly-once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import itertools
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

D = Decimal
ZERO = D(0)
STARTING_WALLET = D("1000000")
# The account's fee tier (a discounted one, as many desks have): deliberately not ccxt's default
# rate (0.05 %), so a client that guesses fees from ccxt's static market data is caught here.
TAKER_FEE = D("0.0004")
MAKER_FEE = D("0.0002")
LEVERAGE = 20


DEFAULT_MAX_MARKET_QTY = D("100000")


@dataclass(frozen=True, slots=True)
class EmulatedMarket:
    symbol: str
    base: str
    step: Decimal
    min_qty: Decimal
    tick: Decimal
    min_notional: Decimal
    price: Decimal
    max_market_qty: Decimal = DEFAULT_MAX_MARKET_QTY  # MARKET_LOT_SIZE maxQty


MARKETS = {
    m.symbol: m
    for m in (
        EmulatedMarket("BTCUSDT", "BTC", D("0.001"), D("0.001"), D("0.1"), D("5"), D("45000")),
        EmulatedMarket("ETHUSDT", "ETH", D("0.001"), D("0.001"), D("0.01"), D("5"), D("3000")),
        EmulatedMarket("BNBUSDT", "BNB", D("0.01"), D("0.01"), D("0.01"), D("5"), D("600")),
        EmulatedMarket("SOLUSDT", "SOL", D("0.01"), D("0.01"), D("0.01"), D("5"), D("150")),
        EmulatedMarket("XRPUSDT", "XRP", D("0.1"), D("0.1"), D("0.0001"), D("5"), D("0.6")),
    )
}


CONDITIONAL_TYPES = frozenset(
    {"STOP", "STOP_MARKET", "TAKE_PROFIT", "TAKE_PROFIT_MARKET", "TRAILING_STOP_MARKET"}
)
_CLIENT_ID = re.compile(r"[\.A-Z\:/a-z0-9_-]{1,36}")


class BinanceError(Exception):
    def __init__(self, code: int, msg: str, status: int = 400) -> None:
        super().__init__(msg)
        self.code, self.msg, self.status = code, msg, status


@dataclass(slots=True)
class Position:
    amount: Decimal = ZERO  # signed: + long, - short (hedge legs keep their own sign)
    entry: Decimal = ZERO
    updated: int = 0


@dataclass(slots=True)
class Fault:
    kind: str  # stall | http_5xx | http_5xx_empty | http_429 | drop_before | drop_after | late
    method: str = "POST"
    path: str = "/fapi/v1/order"
    times: int = 1
    seconds: float = 0.0
    after: int = 0  # matching requests let through untouched before this fault acts


@dataclass(slots=True)
class Exchange:
    api_key: str = "emulator-key"
    secret: str = "emulator-secret"
    dual_side: bool = False
    # Binance refuses a client order id only while an order with it is open (-4116); market
    # orders never stay open. `strict_client_ids` refuses any reuse, as some venues do.
    strict_client_ids: bool = False
    wallet: Decimal = STARTING_WALLET
    taker_fee: Decimal = TAKER_FEE
    maker_fee: Decimal = MAKER_FEE
    # How far the venue's clock is from this host's (ms): a venue behind us refuses requests
    # stamped more than 1 s ahead of it (-1021) unless the client adjusts for the difference.
    clock_offset_ms: int = 0
    leverage: dict[str, int] = field(default_factory=dict)  # per symbol; LEVERAGE when unset
    margin_type: dict[str, str] = field(default_factory=dict)  # per symbol: ISOLATED / CROSSED
    markets: dict[str, EmulatedMarket] = field(default_factory=lambda: dict(MARKETS))
    prices: dict[str, Decimal] = field(default_factory=lambda: {s: m.price for s, m in MARKETS.items()})
    positions: dict[tuple[str, str], Position] = field(default_factory=dict)
    orders: dict[int, dict[str, Any]] = field(default_factory=dict)
    trades: list[dict[str, Any]] = field(default_factory=list)
    client_ids: Counter[str] = field(default_factory=Counter)
    faults: list[Fault] = field(default_factory=list)
    request_count: Counter[str] = field(default_factory=Counter)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1_000_001))
    late: list[asyncio.Task[None]] = field(default_factory=list)  # requests still on their way
    late_outcomes: Counter[str] = field(default_factory=Counter)  # executed / refused on arrival
    income: list[dict[str, Any]] = field(default_factory=list)  # /fapi/v1/income rows (funding)
    algo_orders: dict[int, dict[str, Any]] = field(default_factory=dict)  # conditional (stop) orders
    # Market streams (wss://fstream.binance.com/ws): each connection's subscribed streams and
    # the queue its sender reads.
    streams: list[tuple[set[str], asyncio.Queue[dict[str, Any]]]] = field(default_factory=list)
    funding_rates: list[dict[str, Any]] = field(default_factory=list)  # /fapi/v1/fundingRate rows

    # --- trading ------------------------------------------------------------------------
    def place(self, p: dict[str, str]) -> dict[str, Any]:
        market = self._market(p.get("symbol", ""))
        side = p.get("side", "")
        if side not in ("BUY", "SELL"):
            raise BinanceError(-1117, "Invalid side.")
        if p.get("type") in CONDITIONAL_TYPES:
            raise BinanceError(
                -4120,
                "Order type not supported for this endpoint. Please use the Algo Order API endpoints instead.",
            )
        if p.get("type") != "MARKET":
            raise BinanceError(-1116, "Invalid orderType.")
        position_side = p.get("positionSide", "BOTH")
        if self.dual_side and "reduceOnly" in p:
            raise BinanceError(-1106, "Parameter 'reduceonly' sent when not required.")
        if (position_side == "BOTH") == self.dual_side or position_side not in ("BOTH", "LONG", "SHORT"):
            raise BinanceError(-4061, "Order's position side does not match user's setting.")
        qty = _decimal(p.get("quantity"), "quantity")
        if qty <= 0:
            raise BinanceError(-4003, "Quantity less than or equal to zero.")
        if qty % market.step:
            raise BinanceError(-1111, "Precision is over the maximum defined for this asset.")
        if qty < market.min_qty:
            raise BinanceError(-4004, "Quantity less than minimum quantity.")
        if qty > market.max_market_qty:
            raise BinanceError(-4005, "Quantity greater than maximum quantity.")
        price = self.prices[market.symbol]
        signed = qty if side == "BUY" else -qty
        key = (market.symbol, position_side)
        pos = self.positions.setdefault(key, Position())
        reducing = _reduces(position_side, pos.amount, signed)
        if p.get("reduceOnly") == "true" and not (pos.amount and (pos.amount > 0) != (signed > 0)):
            raise BinanceError(-2022, "ReduceOnly Order is rejected.")
        if position_side != "BOTH" and reducing and qty > abs(pos.amount):
            raise BinanceError(-2022, "ReduceOnly Order is rejected.")
        if not reducing and qty * price < market.min_notional:
            raise BinanceError(
                -4164,
                f"Order's notional must be no smaller than {market.min_notional} (unless you choose reduce only).",
            )
        if not reducing and qty * price / self.leverage_of(market.symbol) > self.available():
            raise BinanceError(-2019, "Margin is insufficient.")
        client_id = p.get("newClientOrderId") or f"emu-{next(self.ids)}"
        if self.strict_client_ids and client_id in self.client_ids:
            raise BinanceError(-4116, "ClientOrderId is duplicated.")
        order = self._fill(
            market, key, side, position_side, qty, price, client_id, p.get("reduceOnly") == "true"
        )
        if p.get("newOrderRespType") == "RESULT":
            return order
        # Binance's default ACK answer: the order is accepted, its fill not reported yet.
        return order | {"status": "NEW", "executedQty": "0", "avgPrice": "0.00", "cumQuote": "0.00000"}

    def _fill(
        self,
        market: EmulatedMarket,
        key: tuple[str, str],
        side: str,
        position_side: str,
        qty: Decimal,
        price: Decimal,
        client_id: str,
        reduce_only: bool,
        orig_type: str = "MARKET",
    ) -> dict[str, Any]:
        order_id = next(self.ids)
        now = _ms()
        pos = self.positions.setdefault(key, Position())
        signed = qty if side == "BUY" else -qty
        realized = _trade(pos, signed, price)
        fee = qty * price * self.taker_fee
        self.wallet += realized - fee
        pos.updated = now
        self.client_ids[client_id] += 1
        order = {
            "orderId": order_id,
            "symbol": market.symbol,
            "status": "FILLED",
            "clientOrderId": client_id,
            "price": "0",
            "avgPrice": str(price),
            "origQty": str(qty),
            "executedQty": str(qty),
            "cumQuote": str(qty * price),
            "timeInForce": "GTC",
            "type": "MARKET",
            "reduceOnly": reduce_only,
            "closePosition": False,
            "side": side,
            "positionSide": position_side,
            "stopPrice": "0",
            "workingType": "CONTRACT_PRICE",
            "priceProtect": False,
            "origType": orig_type,
            "time": now,
            "updateTime": now,
        }
        self.orders[order_id] = order
        self.trades.append(
            {
                "symbol": market.symbol,
                "id": next(self.ids),
                "orderId": order_id,
                "side": side,
                "price": str(price),
                "qty": str(qty),
                "realizedPnl": str(realized),
                "marginAsset": "USDT",
                "quoteQty": str(qty * price),
                "commission": str(fee),
                "commissionAsset": "USDT",
                "time": now,
                "positionSide": position_side,
                "buyer": side == "BUY",
                "maker": False,
            }
        )
        return order

    def now_ms(self) -> int:
        return _ms() + self.clock_offset_ms

    def leverage_of(self, symbol: str) -> int:
        return self.leverage.get(symbol, LEVERAGE)

    def set_leverage(self, p: dict[str, str]) -> dict[str, Any]:
        market = self._market(p.get("symbol", ""))
        try:
            wanted = int(p.get("leverage", ""))
        except ValueError:
            raise BinanceError(
                -1102, "Mandatory parameter 'leverage' was not sent, was empty/null, or malformed."
            ) from None
        if not 1 <= wanted <= 125:
            raise BinanceError(-4028, f"Leverage {wanted} is not valid")
        self.leverage[market.symbol] = wanted
        return {"leverage": wanted, "maxNotionalValue": "1000000", "symbol": market.symbol}

    def set_margin_type(self, p: dict[str, str]) -> dict[str, Any]:
        market = self._market(p.get("symbol", ""))
        wanted = p.get("marginType", "").upper()
        if wanted not in ("ISOLATED", "CROSSED"):
            raise BinanceError(-1116, "Invalid marginType.")
        if self.margin_type.get(market.symbol, "CROSSED") == wanted:
            raise BinanceError(-4046, "No need to change margin type.")
        if any(pos.amount for (s, _), pos in self.positions.items() if s == market.symbol):
            raise BinanceError(-4048, "Margin type cannot be changed if there exists position.")
        self.margin_type[market.symbol] = wanted
        return {"code": 200, "msg": "success"}

    # --- conditional orders: Binance's Algo Order API (POST /fapi/v1/order refuses them) -----
    def set_price(self, symbol: str, price: Decimal) -> None:
        """The market moves: subscribers of its streams hear of it, and open stop orders on the
        symbol whose trigger it crossed fire."""
        self.prices[symbol] = price
        self._stream_price(symbol, price)
        for algo in [
            a for a in self.algo_orders.values() if a["symbol"] == symbol and a["algoStatus"] == "NEW"
        ]:
            trigger = D(algo["triggerPrice"])
            if (price <= trigger) if algo["side"] == "SELL" else (price >= trigger):
                self._trigger(algo, price)

    def _stream_price(
        self, symbol: str, price: Decimal, only: tuple[set[str], asyncio.Queue[dict[str, Any]]] | None = None
    ) -> None:
        now, lower = self.now_ms(), symbol.lower()
        ticker = {
            "e": "24hrTicker", "E": now, "s": symbol, "p": "0", "P": "0", "w": str(price), "c": str(price),
            "Q": "0", "o": str(price), "h": str(price), "l": str(price), "v": "0", "q": "0",
            "O": now - 86_400_000, "C": now, "F": 0, "L": 0, "n": 0,
        }  # fmt: skip
        mark = {
            "e": "markPriceUpdate", "E": now, "s": symbol, "p": str(price), "i": str(price),
            "P": str(price), "r": "0.00010000", "T": (now // 28_800_000 + 1) * 28_800_000,
        }  # fmt: skip
        mini = {
            "e": "24hrMiniTicker", "E": now, "s": symbol, "c": str(price), "o": str(price), "h": str(price),
            "l": str(price), "v": "0", "q": "0",
        }  # fmt: skip
        for subscribed, queue in [only] if only is not None else self.streams:
            if f"{lower}@ticker" in subscribed:
                queue.put_nowait(ticker)
            if f"{lower}@miniticker" in subscribed:
                queue.put_nowait(mini)
            if f"{lower}@markprice" in subscribed or f"{lower}@markprice@1s" in subscribed:
                queue.put_nowait(mark)

    def _trigger(self, algo: dict[str, Any], price: Decimal) -> None:
        """A triggered STOP_MARKET becomes a MARKET order in the matching engine, with an order
        id of its own (`actualOrderId`): it reduces the position, never beyond it."""
        algo["algoStatus"], algo["triggerTime"] = "TRIGGERING", self.now_ms()
        key = (algo["symbol"], algo["positionSide"])
        amount = self.positions.get(key, Position()).amount
        # A stop only reduces: a SELL stop needs a long to sell, a BUY stop a short to buy back.
        held = amount if algo["side"] == "SELL" else -amount
        qty = held if algo["closePosition"] else min(D(algo["quantity"]), held)
        if qty <= 0:
            algo["algoStatus"] = "EXPIRED"  # nothing left to protect
            return
        order = self._fill(
            self._market(algo["symbol"]), key, algo["side"], algo["positionSide"], qty, price,
            f"algo-{algo['algoId']}", True, "STOP_MARKET",
        )  # fmt: skip
        algo.update(
            algoStatus="FINISHED", actualOrderId=str(order["orderId"]), actualPrice=str(price),
            updateTime=self.now_ms(),
        )  # fmt: skip

    def place_algo(self, p: dict[str, str]) -> dict[str, Any]:
        market = self._market(p.get("symbol", ""))
        if p.get("algoType") != "CONDITIONAL":
            raise BinanceError(
                -1102, "Mandatory parameter 'algoType' was not sent, was empty/null, or malformed."
            )
        kind, side = p.get("type", ""), p.get("side", "")
        if kind != "STOP_MARKET":
            raise BinanceError(-1116, "Invalid orderType.")  # the emulator keeps protective stops only
        if side not in ("BUY", "SELL"):
            raise BinanceError(-1117, "Invalid side.")
        position_side = p.get("positionSide", "BOTH")
        if (position_side == "BOTH") == self.dual_side:
            raise BinanceError(-4061, "Order's position side does not match user's setting.")
        if self.dual_side and "reduceOnly" in p:
            raise BinanceError(-1106, "Parameter 'reduceonly' sent when not required.")
        close_position = p.get("closePosition") == "true"
        if close_position and ("quantity" in p or "reduceOnly" in p):
            raise BinanceError(-4137, "quantity and reduceOnly must not be sent with closePosition.")
        if "triggerPrice" not in p:
            raise BinanceError(
                -1102, "Mandatory parameter 'triggerprice' was not sent, was empty/null, or malformed."
            )
        trigger = _decimal(p["triggerPrice"], "triggerPrice")
        quantity = ZERO if close_position else _decimal(p.get("quantity"), "quantity")
        client_id = p.get("clientAlgoId") or f"emu-algo-{next(self.ids)}"
        if not _CLIENT_ID.fullmatch(client_id):
            raise BinanceError(-4015, "Client order id is not valid.")
        if any(
            a["clientAlgoId"] == client_id and a["algoStatus"] == "NEW" for a in self.algo_orders.values()
        ):
            raise BinanceError(-4116, "ClientOrderId is duplicated.")
        price = self.prices[market.symbol]
        if (price <= trigger) if side == "SELL" else (price >= trigger):
            raise BinanceError(-2021, "Order would immediately trigger.")
        algo_id, now = next(self.ids), self.now_ms()
        algo = {
            "algoId": algo_id, "clientAlgoId": client_id, "algoType": "CONDITIONAL", "orderType": kind,
            "symbol": market.symbol, "side": side, "positionSide": position_side, "timeInForce": "GTC",
            "quantity": str(quantity), "algoStatus": "NEW", "triggerPrice": str(trigger), "price": "0",
            "workingType": p.get("workingType", "CONTRACT_PRICE"), "priceMatch": "NONE",
            "closePosition": close_position, "priceProtect": p.get("priceProtect") == "true",
            "reduceOnly": p.get("reduceOnly") == "true", "createTime": now, "updateTime": now,
            "triggerTime": 0, "goodTillDate": 0, "actualOrderId": "", "actualPrice": "",
        }  # fmt: skip
        self.algo_orders[algo_id] = algo
        return dict(algo)

    def _find_algo(self, p: dict[str, str]) -> dict[str, Any] | None:
        if "algoId" in p:
            return self.algo_orders.get(int(p["algoId"]))
        if "clientAlgoId" in p:
            found = [a for a in self.algo_orders.values() if a["clientAlgoId"] == p["clientAlgoId"]]
            return found[-1] if found else None
        raise BinanceError(-1102, "Param 'algoId' or 'clientAlgoId' must be sent, but both were empty/null!")

    def query_algo(self, p: dict[str, str]) -> dict[str, Any]:
        algo = self._find_algo(p)
        if algo is None:
            raise BinanceError(-2013, "Order does not exist.")
        return dict(algo)

    def cancel_algo(self, p: dict[str, str]) -> dict[str, Any]:
        algo = self._find_algo(p)
        if algo is None or algo["algoStatus"] != "NEW":
            raise BinanceError(-2011, "Unknown order sent.")
        algo["algoStatus"], algo["updateTime"] = "CANCELED", self.now_ms()
        return {
            "algoId": algo["algoId"],
            "clientAlgoId": algo["clientAlgoId"],
            "code": "200",
            "msg": "success",
        }

    def all_algos(self, p: dict[str, str]) -> list[dict[str, Any]]:
        """History of a symbol's algo orders (Binance: symbol required, 7-day window)."""
        market = self._market(p.get("symbol", ""))
        start = int(p.get("startTime", str(self.now_ms() - 7 * 86_400_000)))
        rows = [
            dict(a) for a in self.algo_orders.values()
            if a["symbol"] == market.symbol and a["updateTime"] >= start
            and a["algoId"] >= int(p.get("algoId", "0"))
        ]  # fmt: skip
        return rows[: int(p.get("limit", "500"))]

    def open_algos(self, p: dict[str, str]) -> list[dict[str, Any]]:
        return [
            dict(a) for a in self.algo_orders.values()
            if a["algoStatus"] == "NEW" and a["symbol"] == p.get("symbol", a["symbol"])
        ]  # fmt: skip

    def pay_funding(self, symbol: str, rate: Decimal) -> dict[str, Any]:
        """A funding event at `rate` on `symbol`: every open position pays (or receives) rate x
        its notional at the mark price, longs paying shorts when the rate is positive; one
        income row per position, as the account's income history lists them."""
        market = self._market(symbol)
        mark, now = self.prices[market.symbol], self.now_ms()
        self.funding_rates.append(
            {"symbol": market.symbol, "fundingTime": now, "fundingRate": str(rate), "markPrice": str(mark)}
        )
        paid = ZERO
        for (s, _), pos in sorted(self.positions.items()):
            if s != market.symbol or not pos.amount:
                continue
            income = -pos.amount * mark * rate
            self.wallet += income
            paid += income
            self.income.append(
                {
                    "symbol": s, "incomeType": "FUNDING_FEE", "income": str(income), "asset": "USDT",
                    "time": now, "info": "FUNDING_FEE", "tranId": next(self.ids), "tradeId": "",
                }
            )  # fmt: skip
        return {"symbol": market.symbol, "rate": str(rate), "mark": str(mark), "paid": str(paid)}

    def income_rows(self, p: dict[str, str]) -> list[dict[str, Any]]:
        rows = [
            r for r in self.income
            if r["symbol"] == p.get("symbol", r["symbol"]) and r["incomeType"] == p.get("incomeType", r["incomeType"])
            and int(p.get("startTime", "0")) <= r["time"] <= int(p.get("endTime", str(2**62)))
        ]  # fmt: skip
        return rows[: int(p.get("limit", "100"))]

    def funding_rate_rows(self, p: dict[str, str]) -> list[dict[str, Any]]:
        rows = [
            r for r in self.funding_rates
            if r["symbol"] == p.get("symbol", r["symbol"])
            and int(p.get("startTime", "0")) <= r["fundingTime"] <= int(p.get("endTime", str(2**62)))
        ]  # fmt: skip
        return rows[: int(p.get("limit", "100"))]

    def available(self) -> Decimal:
        margin = sum(
            (abs(p.amount) * p.entry / self.leverage_of(s) for (s, _), p in self.positions.items()), ZERO
        )
        return self.wallet + self.unrealized() - margin

    def unrealized(self) -> Decimal:
        return sum(((self.prices[s] - p.entry) * p.amount for (s, _), p in self.positions.items()), ZERO)

    def find(self, p: dict[str, str]) -> dict[str, Any]:
        self._market(p.get("symbol", ""))
        if "orderId" in p:
            order = self.orders.get(int(p["orderId"]))
        elif "origClientOrderId" in p:
            order = next(
                (o for o in reversed(self.orders.values()) if o["clientOrderId"] == p["origClientOrderId"]),
                None,
            )
        else:
            raise BinanceError(
                -1102, "Param 'orderId' or 'origClientOrderId' must be sent, but both were empty/null!"
            )
        if order is None or order["symbol"] != p["symbol"]:
            raise BinanceError(-2013, "Order does not exist.")
        return order

    def by_hand(
        self, symbol: str, position_side: str, side: str, qty: Decimal, liquidation: bool
    ) -> dict[str, Any]:
        """A trade the worker did not order: a person on the web UI, or the liquidation engine."""
        market = self._market(symbol)
        prefix = "autoclose-" if liquidation else "web_"
        return self._fill(
            market,
            (symbol, position_side),
            side,
            position_side,
            qty,
            self.prices[symbol],
            f"{prefix}{next(self.ids)}",
            liquidation,
            "LIQUIDATION" if liquidation else "MARKET",
        )

    def liquidate(self, symbol: str, position_side: str) -> dict[str, Any]:
        pos = self.positions.get((symbol, position_side))
        if pos is None or not pos.amount:
            raise BinanceError(-2022, "nothing to liquidate")
        side = "SELL" if pos.amount > 0 else "BUY"
        return self.by_hand(symbol, position_side, side, abs(pos.amount), liquidation=True)

    def _market(self, symbol: str) -> EmulatedMarket:
        market = self.markets.get(symbol)
        if market is None:
            raise BinanceError(-1121, "Invalid symbol.")
        return market

    # --- read models --------------------------------------------------------------------
    def position_rows(self, symbol: str | None) -> list[dict[str, Any]]:
        sides = ("LONG", "SHORT") if self.dual_side else ("BOTH",)
        rows = []
        for s in self.markets if symbol is None else (symbol,):
            for ps in sides:
                pos = self.positions.get((s, ps), Position())
                mark = self.prices[s]
                rows.append(
                    {
                        "symbol": s,
                        "positionAmt": str(pos.amount),
                        "entryPrice": str(pos.entry),
                        "breakEvenPrice": str(pos.entry),
                        "markPrice": str(mark),
                        "unRealizedProfit": str((mark - pos.entry) * pos.amount),
                        "liquidationPrice": "0",
                        "leverage": str(self.leverage_of(s)),
                        "maxNotionalValue": "1000000",
                        "marginType": "isolated" if self.margin_type.get(s) == "ISOLATED" else "cross",
                        "isolatedMargin": "0",
                        "isAutoAddMargin": "false",
                        "positionSide": ps,
                        "notional": str(pos.amount * mark),
                        "isolatedWallet": "0",
                        "updateTime": pos.updated,
                    }
                )
        return rows

    def account(self) -> dict[str, Any]:
        unrealized = self.unrealized()
        available = self.available()
        asset = {
            "asset": "USDT",
            "walletBalance": str(self.wallet),
            "unrealizedProfit": str(unrealized),
            "marginBalance": str(self.wallet + unrealized),
            "maintMargin": "0",
            "initialMargin": "0",
            "positionInitialMargin": "0",
            "openOrderInitialMargin": "0",
            "crossWalletBalance": str(self.wallet),
            "crossUnPnl": str(unrealized),
            "availableBalance": str(available),
            "maxWithdrawAmount": str(available),
            "marginAvailable": True,
            "updateTime": _ms(),
        }
        return {
            "totalWalletBalance": str(self.wallet),
            "totalUnrealizedProfit": str(unrealized),
            "totalMarginBalance": str(self.wallet + unrealized),
            "availableBalance": str(available),
            "maxWithdrawAmount": str(available),
            "assets": [asset],
            "positions": [],
        }

    def set_max_market_qty(self, symbol: str, quantity: Decimal) -> None:
        """MARKET_LOT_SIZE maxQty of a market: orders above it are refused -4005."""
        self.markets[symbol] = dataclasses.replace(self.markets[symbol], max_market_qty=quantity)

    def state(self) -> dict[str, Any]:
        return {
            "dual_side": self.dual_side,
            "positions": {
                f"{s}_{ps}": str(p.amount) for (s, ps), p in sorted(self.positions.items()) if p.amount
            },
            "orders": len(self.orders),
            "duplicate_client_ids": {c: n for c, n in self.client_ids.items() if n > 1},
            # orders sent as parts of a larger one (client id ending ".<mark>")
            "order_parts": sum(1 for c in self.client_ids if len(c) > 2 and c[-2] == "."),
            "wallet": str(self.wallet),
            "requests": dict(self.request_count),
            "late_requests": dict(self.late_outcomes),
        }


def _trade(pos: Position, signed: Decimal, price: Decimal) -> Decimal:
    """Apply a fill to a position; returns the realized PnL of the part that reduced it."""
    realized = ZERO
    if pos.amount and (pos.amount > 0) != (signed > 0):
        closing = min(abs(signed), abs(pos.amount))
        direction = 1 if pos.amount > 0 else -1
        realized = (price - pos.entry) * closing * direction
        pos.amount += closing * direction * -1
        signed += closing * direction  # what is left opens the other way (one-way mode)
        if not pos.amount:
            pos.entry = ZERO
    if signed:
        total = pos.amount + signed
        pos.entry = (pos.entry * abs(pos.amount) + price * abs(signed)) / abs(total)
        pos.amount = total
    return realized


def _reduces(position_side: str, amount: Decimal, signed: Decimal) -> bool:
    if position_side == "LONG":
        return signed < 0
    if position_side == "SHORT":
        return signed > 0
    return bool(amount) and (amount > 0) != (signed > 0)


def _decimal(raw: str | None, name: str) -> Decimal:
    try:
        return D(raw or "")
    except ArithmeticError:
        raise BinanceError(-1100, f"Illegal characters found in parameter '{name}'.") from None


def _ms() -> int:
    return int(time.time() * 1000)


def exchange_info(markets: dict[str, EmulatedMarket]) -> dict[str, Any]:
    return {
        "timezone": "UTC",
        "serverTime": _ms(),
        "futuresType": "U_MARGINED",
        "rateLimits": [],
        "exchangeFilters": [],
        "assets": [{"asset": "USDT", "marginAvailable": True, "autoAssetExchange": "-10000"}],
        "symbols": [
            {
                "symbol": m.symbol,
                "pair": m.symbol,
                "contractType": "PERPETUAL",
                "deliveryDate": 4133404800000,
                "onboardDate": 1569398400000,
                "status": "TRADING",
                "maintMarginPercent": "2.5000",
                "requiredMarginPercent": "5.0000",
                "baseAsset": m.base,
                "quoteAsset": "USDT",
                "marginAsset": "USDT",
                "pricePrecision": -m.tick.as_tuple().exponent,  # type: ignore[operator]
                "quantityPrecision": -m.step.as_tuple().exponent,  # type: ignore[operator]
                "baseAssetPrecision": 8,
                "quotePrecision": 8,
                "underlyingType": "COIN",
                "underlyingSubType": [],
                "triggerProtect": "0.0500",
                "liquidationFee": "0.012500",
                "marketTakeBound": "0.05",
                "filters": [
                    {
                        "filterType": "PRICE_FILTER",
                        "minPrice": str(m.tick),
                        "maxPrice": "1000000",
                        "tickSize": str(m.tick),
                    },
                    {
                        "filterType": "LOT_SIZE",
                        "stepSize": str(m.step),
                        "maxQty": "100000",
                        "minQty": str(m.min_qty),
                    },
                    {
                        "filterType": "MARKET_LOT_SIZE",
                        "stepSize": str(m.step),
                        "maxQty": str(m.max_market_qty),
                        "minQty": str(m.min_qty),
                    },
                    {"filterType": "MAX_NUM_ORDERS", "limit": 200},
                    {"filterType": "MIN_NOTIONAL", "notional": str(m.min_notional)},
                    {
                        "filterType": "PERCENT_PRICE",
                        "multiplierUp": "1.0500",
                        "multiplierDown": "0.9500",
                        "multiplierDecimal": "4",
                    },
                ],
                "orderTypes": [
                    "LIMIT",
                    "MARKET",
                    "STOP",
                    "STOP_MARKET",
                    "TAKE_PROFIT",
                    "TAKE_PROFIT_MARKET",
                    "TRAILING_STOP_MARKET",
                ],
                "timeInForce": ["GTC", "IOC", "FOK", "GTX"],
            }
            for m in markets.values()
        ],
    }


# --- HTTP ----------------------------------------------------------------------------------
EXCHANGE_KEY: web.AppKey[Exchange] = web.AppKey("exchange", Exchange)


def _error(exc: BinanceError) -> web.Response:
    return web.json_response({"code": exc.code, "msg": exc.msg}, status=exc.status)


async def _params(request: web.Request, signed: bool) -> dict[str, str]:
    body = await request.text() if request.method in ("POST", "PUT") else ""
    raw = "&".join(part for part in (request.query_string, body) if part)
    if signed:
        exchange = request.app[EXCHANGE_KEY]
        if request.headers.get("X-MBX-APIKEY") != exchange.api_key:
            raise BinanceError(-2015, "Invalid API-key, IP, or permissions for action.", 401)
        payload, _, signature = raw.rpartition("&signature=")
        expected = hmac.new(exchange.secret.encode(), payload.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(signature, expected):
            raise BinanceError(-1022, "Signature for this request is not valid.")
    params = dict(parse_qsl(raw, keep_blank_values=True))
    if signed:
        # Binance refuses a request that reaches it later than its receive window: an order
        # whose answer was lost is executed now or never.
        stamp, window = int(params.get("timestamp", "0")), int(params.get("recvWindow", "5000"))
        if not stamp - 1000 <= request.app[EXCHANGE_KEY].now_ms() <= stamp + window:
            raise BinanceError(-1021, "Timestamp for this request is outside of the recvWindow.")
    return params


@web.middleware
async def faults_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    exchange = request.app[EXCHANGE_KEY]
    exchange.request_count[f"{request.method} {request.path}"] += 1
    if request.path.startswith("/emulator/"):
        return await handler(request)  # type: ignore[no-any-return]
    fault = next((f for f in exchange.faults if f.method == request.method and f.path == request.path), None)
    if fault is not None and fault.after > 0:
        fault.after -= 1
        fault = None
    if fault is not None:
        fault.times -= 1
        if fault.times <= 0:
            exchange.faults.remove(fault)
        match fault.kind:
            case "http_5xx":
                return web.json_response(
                    {"code": -1000, "msg": "An unknown error occured while processing the request."},
                    status=503,
                )
            case "http_5xx_empty":
                return web.Response(status=502, text="")
            case "http_429":
                return web.json_response(
                    {"code": -1003, "msg": "Too many requests; current limit is 2400 requests per minute."},
                    status=429,
                )
            case "drop_before":
                return _drop(request)
            case "drop_after":
                await handler(request)
                return _drop(request)
            case "stall":
                response = await handler(request)  # committed at the venue, answered too late
                await asyncio.sleep(fault.seconds)
                return response  # type: ignore[no-any-return]
            case "late":
                # The client loses the connection at once, but its request reaches the
                # matching engine `seconds` later (a slow path inside the venue), where it is
                # executed if its receive window is still open, as Binance does.
                await request.read()  # kept by aiohttp for the handler
                exchange.late.append(asyncio.create_task(_arrive_late(request, handler, fault.seconds)))
                return _drop(request)
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except BinanceError as exc:
        return _error(exc)


async def _arrive_late(request: web.Request, handler: Any, seconds: float) -> None:
    await asyncio.sleep(seconds)
    response = await handler(request)  # a refusal (receive window closed) goes to nobody
    outcome = "executed" if response.status == 200 else "refused"
    request.app[EXCHANGE_KEY].late_outcomes[outcome] += 1


def _drop(request: web.Request) -> web.Response:
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=500)  # never reaches the client: the connection is gone


def build_app(exchange: Exchange | None = None) -> web.Application:
    app = web.Application(middlewares=[faults_middleware])
    app[EXCHANGE_KEY] = exchange or Exchange()
    ex = app[EXCHANGE_KEY]

    async def wrap(request: web.Request, signed: bool, fn: Any) -> web.Response:
        try:
            return web.json_response(fn(await _params(request, signed)))
        except BinanceError as exc:
            return _error(exc)

    def public(fn: Any) -> Any:
        async def handle(request: web.Request) -> web.Response:
            return await wrap(request, False, fn)

        return handle

    def private(fn: Any) -> Any:
        async def handle(request: web.Request) -> web.Response:
            return await wrap(request, True, fn)

        return handle

    def control(action: Any) -> Any:
        async def handle(request: web.Request) -> web.Response:
            return await _control(request, action)

        return handle

    async def state(request: web.Request) -> web.Response:
        return web.json_response(ex.state())

    async def market_stream(request: web.Request) -> web.WebSocketResponse:
        """Binance's raw market stream endpoint: SUBSCRIBE / UNSUBSCRIBE to `<symbol>@ticker`,
        `<symbol>@miniTicker` and `<symbol>@markPrice[@1s]`, then an event per price change and
        each second (and the current price at once)."""
        ws = web.WebSocketResponse(heartbeat=30)
        await ws.prepare(request)
        subscribed: set[str] = set()
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        entry = (subscribed, queue)
        ex.streams.append(entry)

        async def send() -> None:
            while True:
                await ws.send_json(await queue.get())

        async def every_second() -> None:  # Binance pushes ticker and mark streams each second
            while True:
                await asyncio.sleep(1.0)
                for name in list(subscribed):
                    symbol = name.split("@")[0].upper()
                    if symbol in ex.prices:
                        ex._stream_price(symbol, ex.prices[symbol], only=entry)

        sender = asyncio.create_task(send())
        pulse = asyncio.create_task(every_second())
        try:
            async for message in ws:
                if message.type != web.WSMsgType.TEXT:
                    continue
                request_body = message.json()
                names = [str(n).lower() for n in request_body.get("params", [])]
                if request_body.get("method") == "SUBSCRIBE":
                    subscribed.update(names)
                    await ws.send_json({"result": None, "id": request_body.get("id")})
                    for name in names:
                        symbol = name.split("@")[0].upper()
                        if symbol in ex.prices:
                            ex._stream_price(symbol, ex.prices[symbol])
                elif request_body.get("method") == "UNSUBSCRIBE":
                    subscribed.difference_update(names)
                    await ws.send_json({"result": None, "id": request_body.get("id")})
        finally:
            sender.cancel()
            pulse.cancel()
            ex.streams.remove(entry)
        return ws

    def set_dual(p: dict[str, str]) -> dict[str, Any]:
        wanted = p.get("dualSidePosition") == "true"
        if wanted == ex.dual_side:
            raise BinanceError(-4059, "No need to change position side.")
        if any(pos.amount for pos in ex.positions.values()):
            raise BinanceError(-4068, "Position side cannot be changed if there exists position.")
        ex.dual_side = wanted
        return {"code": 200, "msg": "success"}

    def commission_rate(p: dict[str, str]) -> dict[str, Any]:
        market = ex._market(p.get("symbol", ""))
        return {
            "symbol": market.symbol,
            "makerCommissionRate": str(ex.maker_fee),
            "takerCommissionRate": str(ex.taker_fee),
        }

    def cancel(p: dict[str, str]) -> dict[str, Any]:
        try:
            ex.find(p)
        except BinanceError:
            raise BinanceError(-2011, "Unknown order sent.") from None
        raise BinanceError(-2011, "Unknown order sent.")  # market orders are filled, never open

    def since(rows: list[dict[str, Any]], p: dict[str, str], stamp: str) -> list[dict[str, Any]]:
        start = int(p.get("startTime", "0"))
        chosen = [r for r in rows if r["symbol"] == p.get("symbol") and r[stamp] >= start]
        if "orderId" in p and stamp == "time" and "id" in (chosen[0] if chosen else {}):
            chosen = [r for r in chosen if r["orderId"] == int(p["orderId"])]
        limit = int(p.get("limit", "500"))
        # Binance: from startTime on, the oldest `limit`; without it, the most recent `limit`.
        return chosen[:limit] if "startTime" in p else chosen[-limit:]

    routes = [
        web.get("/fapi/v1/ping", public(lambda p: {})),
        web.get("/fapi/v1/time", public(lambda p: {"serverTime": ex.now_ms()})),
        web.post("/fapi/v1/leverage", private(ex.set_leverage)),
        web.post("/fapi/v1/marginType", private(ex.set_margin_type)),
        web.get("/fapi/v1/exchangeInfo", public(lambda p: exchange_info(ex.markets))),
        web.get("/fapi/v1/ticker/price", public(lambda p: _ticker(ex, p))),
        web.get("/fapi/v1/premiumIndex", public(lambda p: _premium_index(ex, p))),
        web.get("/fapi/v2/ticker/price", public(lambda p: _ticker(ex, p))),
        web.get("/fapi/v1/positionSide/dual", private(lambda p: {"dualSidePosition": ex.dual_side})),
        web.post("/fapi/v1/positionSide/dual", private(set_dual)),
        web.post("/fapi/v1/order", private(ex.place)),
        web.get("/fapi/v1/order", private(ex.find)),
        web.delete("/fapi/v1/order", private(cancel)),
        web.get("/fapi/v1/openOrders", private(lambda p: [])),
        web.get("/fapi/v1/allOrders", private(lambda p: since(list(ex.orders.values()), p, "updateTime"))),
        web.get("/fapi/v1/userTrades", private(lambda p: since(ex.trades, p, "time"))),
        web.get("/fapi/v2/positionRisk", private(lambda p: ex.position_rows(p.get("symbol")))),
        web.get("/fapi/v3/positionRisk", private(lambda p: ex.position_rows(p.get("symbol")))),
        web.get("/fapi/v2/account", private(lambda p: ex.account())),
        web.get("/fapi/v3/account", private(lambda p: ex.account())),
        web.get("/fapi/v2/balance", private(lambda p: ex.account()["assets"])),
        web.get("/fapi/v1/leverageBracket", private(lambda p: _brackets(p, ex.markets))),
        web.get("/fapi/v1/commissionRate", private(commission_rate)),
        web.get("/fapi/v1/income", private(ex.income_rows)),
        web.post("/fapi/v1/algoOrder", private(ex.place_algo)),
        web.get("/fapi/v1/algoOrder", private(ex.query_algo)),
        web.delete("/fapi/v1/algoOrder", private(ex.cancel_algo)),
        web.get("/fapi/v1/openAlgoOrders", private(ex.open_algos)),
        web.get("/fapi/v1/allAlgoOrders", private(ex.all_algos)),
        web.get("/fapi/v1/fundingRate", public(ex.funding_rate_rows)),
        # --- control, for tests and rehearsals -------------------------------------------
        web.get("/emulator/state", state),
        # Binance's stream routes: the raw one and the split public / market ones ccxt.pro uses.
        *(
            web.get(f"{prefix}/ws{tail}", market_stream)
            for prefix in ("", "/market", "/public")
            for tail in ("", "/{stream}")
        ),
        web.post(
            "/emulator/price",
            control(lambda b: ex.set_price(b["symbol"], D(str(b["price"])))),
        ),
        web.post("/emulator/fault", control(lambda b: ex.faults.append(Fault(**b)))),
        web.post(
            "/emulator/max-market-qty",
            control(lambda b: ex.set_max_market_qty(b["symbol"], D(str(b["max_market_qty"])))),
        ),
        web.post("/emulator/funding", control(lambda b: ex.pay_funding(b["symbol"], D(str(b["rate"]))))),
        web.post(
            "/emulator/liquidate",
            control(lambda b: ex.liquidate(b["symbol"], b["positionSide"])),
        ),
        web.post(
            "/emulator/by-hand",
            control(
                lambda b: ex.by_hand(b["symbol"], b["positionSide"], b["side"], D(str(b["quantity"])), False)
            ),
        ),
    ]
    app.add_routes(routes)
    return app


def _ticker(ex: Exchange, p: dict[str, str]) -> Any:
    return _one_or_all(
        [{"symbol": s, "price": str(price), "time": _ms()} for s, price in ex.prices.items()], p
    )


def _one_or_all(rows: list[dict[str, Any]], p: dict[str, str]) -> Any:
    """Binance's market-data answers: the symbol's row when one is asked for, else all rows."""
    if "symbol" not in p:
        return rows
    found = [r for r in rows if r["symbol"] == p["symbol"]]
    if not found:
        raise BinanceError(-1121, "Invalid symbol.")
    return found[0]


def _premium_index(ex: Exchange, p: dict[str, str]) -> Any:
    """Mark prices: the emulator's mark is its last price (no index, no premium)."""
    rows = [
        {
            "symbol": s,
            "markPrice": str(price),
            "indexPrice": str(price),
            "estimatedSettlePrice": str(price),
            "lastFundingRate": "0.00010000",
            "interestRate": "0.00010000",
            "nextFundingTime": (_ms() // 28_800_000 + 1) * 28_800_000,
            "time": _ms(),
        }
        for s, price in ex.prices.items()
    ]
    return _one_or_all(rows, p)


def _brackets(p: dict[str, str], markets: dict[str, EmulatedMarket]) -> list[dict[str, Any]]:
    bracket = {
        "bracket": 1,
        "initialLeverage": 125,
        "notionalCap": 50000,
        "notionalFloor": 0,
        "maintMarginRatio": 0.004,
        "cum": 0.0,
    }
    return [{"symbol": s, "brackets": [bracket]} for s in markets if p.get("symbol", s) == s]


async def _control(request: web.Request, action: Any) -> web.Response:
    try:
        result = action(await request.json())
    except BinanceError as exc:
        return _error(exc)
    return web.json_response(result if isinstance(result, dict) else {"ok": True})


async def serve(host: str, port: int, exchange: Exchange | None = None) -> web.AppRunner:
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError("the emulator listens on loopback only")
    runner = web.AppRunner(build_app(exchange), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def synthetic_markets(count: int) -> dict[str, EmulatedMarket]:
    """The five listed markets and `count` more (T000USDT, T001USDT, ... at 10 USDT), for
    runs over many symbols."""
    extra = (
        EmulatedMarket(f"T{i:03d}USDT", f"T{i:03d}", D("0.1"), D("0.1"), D("0.001"), D("5"), D("10"))
        for i in range(count)
    )
    return dict(MARKETS) | {m.symbol: m for m in extra}


async def main(
    port: int,
    dual_side: bool,
    api_key: str,
    secret: str,
    taker_fee: Decimal = TAKER_FEE,
    extra_markets: int = 0,
) -> None:
    markets = synthetic_markets(extra_markets)
    exchange = Exchange(
        api_key=api_key,
        secret=secret,
        dual_side=dual_side,
        taker_fee=taker_fee,
        markets=markets,
        prices={s: m.price for s, m in markets.items()},
    )
    runner = await serve("127.0.0.1", port, exchange)
    print(f"binanceusdm emulator on http://127.0.0.1:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
