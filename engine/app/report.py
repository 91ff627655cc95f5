"""`tradeengine report`: strategy performance and attribution as terminal tables or one
self-contained HTML file with inline SVG charts (no scripts, no external assets)."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from rich.console import Console
from rich.table import Table

from engine.adapters.mysql_store import MysqlStore
from engine.domain.model import PositionSide
from engine.domain.pnl import gross_pnl

# Strategy colours stay clear of the TP green, SL red and drawdown pink.
PALETTE = ["#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
TP_COLOUR, SL_COLOUR, DRAWDOWN_COLOUR = "#2ca02c", "#d62728", "#f4a6a6"


@dataclass(frozen=True)
class ReportFilter:
    strategy: str | None = None
    symbol: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def where(self, time_column: str, strategy_column: str = "strategy_id") -> tuple[str, dict[str, Any]]:
        clauses: list[str] = ["1=1"]
        params: dict[str, Any] = {}
        if self.strategy:
            clauses.append(f"{strategy_column} = %(strategy)s")
            params["strategy"] = self.strategy
        if self.symbol:
            clauses.append("symbol = %(symbol)s")
            params["symbol"] = self.symbol
        if self.since:
            clauses.append(f"{time_column} >= %(since)s")
            params["since"] = self.since.replace(tzinfo=None)
        if self.until:
            clauses.append(f"{time_column} < %(until)s")
            params["until"] = self.until.replace(tzinfo=None)
        return " AND ".join(clauses), params


@dataclass
class ReportData:
    filter: ReportFilter
    performance: list[dict[str, Any]] = field(default_factory=list)
    equity: dict[str, list[tuple[datetime, Decimal, Decimal]]] = field(default_factory=dict)
    attribution: list[dict[str, Any]] = field(default_factory=list)
    open_positions: list[dict[str, Any]] = field(default_factory=list)

    def value_open_positions(self, prices: dict[str, Decimal]) -> None:
        """Unrealized PnL (before fees) of each strategy's open positions at these prices."""
        for row in self.performance:
            mine = [p for p in self.open_positions if p["strategy_id"] == row["strategy_id"]]
            if mine and all(p["symbol"] in prices for p in mine):
                row["unrealized_pnl"] = sum(
                    (gross_pnl(PositionSide(p["position_side"]), p["entry_price"], prices[p["symbol"]],
                               p["remaining_quantity"]) for p in mine),
                    Decimal(0),
                )  # fmt: skip
            elif not mine:
                row["unrealized_pnl"] = Decimal(0)


async def gather(store: MysqlStore, flt: ReportFilter, max_positions: int = 20) -> ReportData:
    data = ReportData(flt)
    where, params = flt.where("closed_at")
    data.performance = await _rows(
        store,
        "SELECT strategy_id, COUNT(*) AS trades, SUM(realized_pnl > 0) AS wins,"  # nosec B608  # fixed column names and %(name)s placeholders
        " SUM(realized_pnl > 0) / COUNT(*) AS win_rate, SUM(realized_pnl) AS total_pnl, SUM(fees) AS fees,"
        " SUM(close_reason = 'take_profit') / COUNT(*) AS tp_rate,"
        " SUM(close_reason = 'stop_loss') / COUNT(*) AS sl_rate,"
        " SUM(CASE WHEN realized_pnl > 0 THEN realized_pnl ELSE 0 END)"
        "   / NULLIF(-SUM(CASE WHEN realized_pnl < 0 THEN realized_pnl ELSE 0 END), 0) AS profit_factor,"
        " AVG(duration_seconds) AS avg_duration_seconds"
        f" FROM strategy_trades WHERE {where} GROUP BY strategy_id ORDER BY total_pnl DESC",
        params,
    )
    funding_where, funding_params = flt.where("funding_time")
    funding = {
        row["strategy_id"]: row["funding"]
        for row in await _rows(
            store,
            f"SELECT strategy_id, SUM(amount) AS funding FROM funding_payments WHERE {funding_where}"  # nosec B608  # fixed column names and %(name)s placeholders
            " GROUP BY strategy_id",
            funding_params,
        )
    }
    for row in data.performance:
        row["funding"] = funding.get(row["strategy_id"], Decimal(0))
    # Open positions now, whatever the time window: a strategy with only open ones is shown too.
    open_where, open_params = ReportFilter(flt.strategy, flt.symbol).where("opened_at")
    data.open_positions = await _rows(
        store,
        "SELECT strategy_id, symbol, position_side, entry_price, remaining_quantity FROM strategy_positions"  # nosec B608  # fixed column names and %(name)s placeholders
        f" WHERE status = 'open' AND {open_where}",
        open_params,
    )
    shown = {row["strategy_id"] for row in data.performance}
    for strategy_id in sorted({row["strategy_id"] for row in data.open_positions} - shown):
        data.performance.append(
            {"strategy_id": strategy_id, "trades": 0, "wins": 0, "win_rate": None, "total_pnl": Decimal(0),
             "fees": Decimal(0), "tp_rate": None, "sl_rate": None, "profit_factor": None,
             "avg_duration_seconds": None, "funding": funding.get(strategy_id, Decimal(0))}
        )  # fmt: skip
    for row in data.performance:
        row["open_positions"] = sum(1 for p in data.open_positions if p["strategy_id"] == row["strategy_id"])
        row["open_notional"] = sum(
            (
                p["entry_price"] * p["remaining_quantity"]
                for p in data.open_positions
                if p["strategy_id"] == row["strategy_id"]
            ),
            Decimal(0),
        )
        row["unrealized_pnl"] = None
    closes = await _rows(
        store,
        f"SELECT strategy_id, closed_at, realized_pnl FROM position_closes WHERE {where}"  # nosec B608  # fixed column names and %(name)s placeholders
        " ORDER BY strategy_id, closed_at, event_id",
        params,
    )
    for row in closes:
        curve = data.equity.setdefault(row["strategy_id"], [])
        equity = (curve[-1][1] if curve else Decimal(0)) + row["realized_pnl"]
        peak = max([Decimal(0), equity, *(point[1] for point in curve)])
        curve.append((row["closed_at"], equity, peak - equity))
    where, params = flt.where("ep.opened_at", "a.strategy_id")
    where = where.replace("symbol =", "ep.symbol =")
    data.attribution = await _rows(
        store,
        "SELECT a.exchange_position_id, a.position_key, a.strategy_id, a.contributed_quantity, a.quantity_share,"  # nosec B608  # fixed column names and %(name)s placeholders
        " a.realized_pnl, ep.opened_at FROM exchange_position_attribution a"
        " JOIN exchange_positions ep ON ep.exchange_position_id = a.exchange_position_id"
        f" WHERE {where} AND a.exchange_position_id IN (SELECT * FROM (SELECT exchange_position_id"
        " FROM exchange_positions ORDER BY opened_at DESC LIMIT %(limit)s) recent)"
        " ORDER BY ep.opened_at, a.exchange_position_id, a.strategy_id",
        {**params, "limit": max_positions},
    )
    return data


async def _rows(store: MysqlStore, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    async with store.pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(sql, params or None)
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]
        await conn.commit()
        return rows


def fmt(value: Any, places: int = 4) -> str:
    """One way to write a figure everywhere (terminal, tables, charts): no trailing zeros."""
    if value is None:
        return "-"
    if isinstance(value, float):
        value = Decimal(repr(value))
    if isinstance(value, Decimal):
        text = f"{value:.{places}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    return str(value)


PERFORMANCE_COLUMNS = [
    ("strategy_id", "strategy"), ("trades", "trades"), ("win_rate", "win rate"), ("total_pnl", "PnL"),
    ("fees", "fees"), ("funding", "funding"), ("tp_rate", "TP rate"), ("sl_rate", "SL rate"), ("profit_factor", "profit factor"),
    ("avg_duration_seconds", "avg s"),
]  # fmt: skip


# Two tables, so each fits 80 columns without cutting a number (money to the cent).
TERMINAL_TABLES = [
    ("Strategy performance", [("strategy_id", "strategy"), ("trades", "trades"), ("win_rate", "win rate"),
                              ("total_pnl", "PnL"), ("fees", "fees"), ("funding", "funding")]),
    ("Exits and open positions", [("strategy_id", "strategy"), ("tp_rate", "TP rate"), ("sl_rate", "SL rate"),
                                  ("profit_factor", "profit f."), ("open_positions", "open"),
                                  ("open_notional", "notional"), ("unrealized_pnl", "uPnL")]),
]  # fmt: skip
MONEY = {"total_pnl", "fees", "funding", "open_notional", "unrealized_pnl"}


def render_terminal(data: ReportData, console: Console) -> None:
    if not data.performance:
        console.print(f"no trades and no open positions {_describe(data.filter)}".strip())
    for title, columns in TERMINAL_TABLES if data.performance else ():
        table = Table(title=f"{title} {_describe(data.filter)}".strip())
        for key, heading in columns:
            cells = [fmt(row[key], 2 if key in MONEY else 4) for row in data.performance]
            width = max([len(c) for c in cells] + [len(heading)]) if key != "strategy_id" else None
            table.add_column(heading, justify="left" if key == "strategy_id" else "right",
                             min_width=width, no_wrap=key != "strategy_id", overflow="fold")  # fmt: skip
        for row in data.performance:
            table.add_row(*(fmt(row[key], 2 if key in MONEY else 4) for key, _ in columns))
        console.print(table)
    if not data.attribution:
        return
    attribution = Table(title="Attribution per exchange position")
    for title in ("position", "key", "strategy", "quantity", "share", "PnL"):
        attribution.add_column(title, justify="left" if title in ("position", "key", "strategy") else "right",
                               no_wrap=title not in ("key", "strategy"), overflow="fold")  # fmt: skip
    for row in data.attribution:
        attribution.add_row(
            row["exchange_position_id"][:8], row["position_key"], row["strategy_id"],
            fmt(row["contributed_quantity"]), fmt(row["quantity_share"]), fmt(row["realized_pnl"], 2),
        )  # fmt: skip
    console.print(attribution)


def as_records(data: ReportData) -> dict[str, list[dict[str, Any]]]:
    """The report's rows for --json / --csv, every figure in full."""
    keys = [key for key, _ in PERFORMANCE_COLUMNS] + ["open_positions", "open_notional", "unrealized_pnl"]
    return {
        "performance": [{key: row.get(key) for key in keys} for row in data.performance],
        "attribution": data.attribution,
    }


def _describe(flt: ReportFilter) -> str:
    parts = [f"{k}={v}" for k, v in (("strategy", flt.strategy), ("symbol", flt.symbol),
                                      ("since", flt.since), ("until", flt.until)) if v]  # fmt: skip
    return f"({', '.join(parts)})" if parts else ""


# --- HTML ------------------------------------------------------------------------------------
def render_html(data: ReportData, generated_at: datetime) -> str:
    e = html.escape
    columns = [*PERFORMANCE_COLUMNS, ("open_positions", "open"), ("open_notional", "open notional"),
               ("unrealized_pnl", "uPnL")]  # fmt: skip
    # The same figures as the terminal and the charts: money to the cent, rates to 4 places.
    rows = "".join(
        "<tr>"
        + "".join(f"<td>{e(fmt(r.get(key), 2 if key in MONEY else 4))}</td>" for key, _ in columns)
        + "</tr>"
        for r in data.performance
    )
    head = "".join(f"<th>{e(title)}</th>" for _, title in columns)
    attribution_rows = "".join(
        f"<tr><td>{e(r['exchange_position_id'][:8])}</td><td>{e(r['position_key'])}</td><td>{e(r['strategy_id'])}</td>"
        f"<td>{e(fmt(r['contributed_quantity']))}</td><td>{e(fmt(r['quantity_share']))}</td>"
        f"<td>{e(fmt(r['realized_pnl'], 2))}</td></tr>"
        for r in data.attribution
    )
    attribution_table = (
        '<table id="attribution-table"><thead><tr><th>position</th><th>key</th><th>strategy</th><th>quantity</th>'
        f"<th>share</th><th>PnL</th></tr></thead><tbody>{attribution_rows}</tbody></table>"
        if data.attribution
        else "<p>No exchange position in this selection.</p>"
    )
    colours = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(sorted(data.equity))}
    curves = "".join(
        f"<figure><figcaption>{e(strategy)}: equity and drawdown</figcaption>"
        f"{equity_svg(points, colours[strategy])}</figure>"
        for strategy, points in sorted(data.equity.items())
    )
    legend = " ".join(
        f'<span style="color:{colour}">&#9632;</span> {e(strategy)}' for strategy, colour in colours.items()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tradeengine report</title>
<style>
body{{font-family:system-ui,sans-serif;margin:24px;color:#222}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} td:first-child,th:first-child{{text-align:left}}
figure{{display:inline-block;margin:8px}} figcaption{{font-size:13px;color:#555}}
</style></head><body>
<h1>tradeengine report {e(_describe(data.filter))}</h1>
<p>Generated {e(generated_at.isoformat())}. PnL is net of fees.</p>
<h2>Strategy performance</h2>
{
        f'<table id="performance"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'
        if data.performance
        else "<p>No trades and no open positions in this selection.</p>"
    }
<h2>Equity curve and drawdown per strategy</h2>
<p>Cumulative net PnL in the quote currency (the line) and drawdown from its peak (the shaded
area below zero), one chart per strategy; time runs left to right, from the first close to the last.</p>
<div id="equity">{curves or "<p>No closed trades in this selection.</p>"}</div>
<h2>TP vs SL rates</h2>
<div id="tpsl">{
        tp_sl_svg([r for r in data.performance if r["trades"]])
        if any(r["trades"] for r in data.performance)
        else "<p>No closed trades in this selection.</p>"
    }</div>
<h2>PnL attribution per exchange position</h2>
<div id="attribution">{attribution_svg(data.attribution, colours) if data.attribution else ""}</div>
{attribution_table}
<p class="legend">{legend}</p>
</body></html>
"""


def _scale(lo: float, hi: float, out_lo: float, out_hi: float) -> Any:
    span = (hi - lo) or 1.0
    return lambda v: out_lo + (float(v) - lo) / span * (out_hi - out_lo)


def equity_svg(
    points: list[tuple[datetime, Decimal, Decimal]], colour: str, w: int = 360, h: int = 180
) -> str:
    points = [(points[0][0], Decimal(0), Decimal(0)), *points]  # every curve starts flat at 0
    values = [float(p[1]) for p in points] + [float(-p[2]) for p in points] + [0.0]
    y = _scale(min(values), max(values), h - 20, 10)
    x = _scale(0, max(len(points) - 1, 1), 40, w - 10)
    equity = " ".join(f"{x(i):.1f},{y(p[1]):.1f}" for i, p in enumerate(points))
    drawdown = " ".join(f"{x(i):.1f},{y(-p[2]):.1f}" for i, p in enumerate(points))
    zero = y(0)
    area = f"{x(0):.1f},{zero:.1f} {drawdown} {x(len(points) - 1):.1f},{zero:.1f}"
    return (
        f'<svg class="equity" width="{w}" height="{h}" viewBox="0 0 {w} {h}" xmlns="http://www.w3.org/2000/svg">'
        f'<line x1="40" y1="{zero:.1f}" x2="{w - 10}" y2="{zero:.1f}" stroke="#999"/>'
        f'<polygon class="drawdown" points="{area}" fill="{DRAWDOWN_COLOUR}"/>'
        f'<polyline class="equity-line" points="{equity}" fill="none" stroke="{colour}" stroke-width="3"/>'
        f'<text x="2" y="14" font-size="11">{fmt(max(values), 2)}</text>'
        f'<text x="2" y="{h - 22}" font-size="11">{fmt(min(values), 2)}</text>'
        f'<text x="40" y="{h - 4}" font-size="10" fill="#555">{points[1][0]:%Y-%m-%d %H:%M}</text>'
        f'<text x="{w - 10}" y="{h - 4}" font-size="10" fill="#555" text-anchor="end">'
        f"{points[-1][0]:%Y-%m-%d %H:%M} UTC</text></svg>"
    )


def tp_sl_svg(performance: list[dict[str, Any]], w: int = 480) -> str:
    bar_h, gap = 12, 10
    h = max(40, len(performance) * (2 * bar_h + gap) + 20)
    x = _scale(0, 1, 90, w - 130)
    parts = [
        f'<svg class="tpsl" width="{w}" height="{h}" viewBox="0 0 {w} {h}" xmlns="http://www.w3.org/2000/svg">'
    ]
    for i, row in enumerate(performance):
        top = 10 + i * (2 * bar_h + gap)
        tp, sl = float(row["tp_rate"] or 0), float(row["sl_rate"] or 0)
        parts.append(
            f'<text x="0" y="{top + bar_h + 4}" font-size="12">{html.escape(row["strategy_id"])}</text>'
        )
        parts.append(
            f'<rect class="tp" x="90" y="{top}" width="{x(tp) - 90:.1f}" height="{bar_h}" fill="{TP_COLOUR}"/>'
        )
        parts.append(
            f'<rect class="sl" x="90" y="{top + bar_h}" width="{x(sl) - 90:.1f}" height="{bar_h}" fill="{SL_COLOUR}"/>'
        )
        parts.append(
            f'<text x="{x(max(tp, sl)) + 4:.1f}" y="{top + bar_h + 4}" font-size="11">TP {tp:.0%} / SL {sl:.0%}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def attribution_svg(rows: list[dict[str, Any]], colours: dict[str, str], w: int = 520) -> str:
    positions: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        positions.setdefault(row["exchange_position_id"], []).append(row)
    if not positions:
        return "<p>No exchange positions.</p>"
    extent = max(
        max(sum(float(r["realized_pnl"]) for r in rs if r["realized_pnl"] > 0),
            -sum(float(r["realized_pnl"]) for r in rs if r["realized_pnl"] < 0))
        for rs in positions.values()
    ) or 1.0  # fmt: skip
    mid, half = (w + 120) / 2, (w - 140) / 2
    bar_h, h = 16, len(positions) * 22 + 20
    parts = [
        f'<svg class="attribution" width="{w}" height="{h}" viewBox="0 0 {w} {h}" xmlns="http://www.w3.org/2000/svg">'
    ]
    parts.append(f'<line x1="{mid}" y1="0" x2="{mid}" y2="{h}" stroke="#999"/>')
    for i, (ep_id, rs) in enumerate(positions.items()):
        top = 8 + i * 22
        parts.append(
            f'<text x="0" y="{top + 12}" font-size="11">{html.escape(rs[0]["position_key"])} {ep_id[:6]}</text>'
        )
        pos = neg = mid
        for r in rs:
            width = abs(float(r["realized_pnl"])) / extent * half
            colour = colours.get(r["strategy_id"], "#888")
            label = html.escape(f"{r['strategy_id']}: {fmt(r['realized_pnl'], 2)}")
            if r["realized_pnl"] >= 0:
                parts.append(
                    f'<rect class="slice" x="{pos:.1f}" y="{top}" width="{width:.1f}" height="{bar_h}" fill="{colour}"><title>{label}</title></rect>'
                )
                pos += width
            else:
                neg -= width
                parts.append(
                    f'<rect class="slice" x="{neg:.1f}" y="{top}" width="{width:.1f}" height="{bar_h}" fill="{colour}"><title>{label}</title></rect>'
                )
    parts.append("</svg>")
    return "".join(parts)
