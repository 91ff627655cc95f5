"""`tradeengine report`: strategy performance and attribution as terminal tables or one
self-contained HTML file with inline SVG charts (no scripts, no external assets)."""

from __future__ import annotations

import html
from collections.abc import Callable
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


REPORT_STEPS = ("performance", "funding", "open positions", "equity", "attribution")


async def gather(
    store: MysqlStore,
    flt: ReportFilter,
    max_positions: int = 20,
    progress: Callable[[str, int, int], None] = lambda step, n, total: None,
) -> ReportData:
    """The report's figures, in REPORT_STEPS (one query each; `progress` is told before each)."""
    steps = iter(enumerate(REPORT_STEPS))

    def next_step() -> None:
        n, step = next(steps)
        progress(step, n, len(REPORT_STEPS))

    data = ReportData(flt)
    next_step()
    where, params = flt.where("closed_at")
    data.performance = await _rows(
        store,
        "SELECT strategy_id, COUNT(*) AS trades, SUM(realized_pnl > 0) AS wins,"  # nosec B608  # fixed column names and %(name)s placeholders
        " SUM(realized_pnl > 0) / COUNT(*) AS win_rate, SUM(realized_pnl) AS total_pnl, SUM(fees) AS fees,"
        " SUM(close_reason = 'take_profit') / COUNT(*) AS tp_rate,"
        " SUM(close_reason = 'stop_loss') / COUNT(*) AS sl_rate,"
        " SUM(close_reason = 'take_profit') AS tp_closes, SUM(close_reason = 'stop_loss') AS sl_closes,"
        " SUM(close_reason = 'signal') AS signal_closes, SUM(close_reason = 'reversed') AS reversed_closes,"
        " SUM(close_reason IN ('manual', 'liquidation')) AS manual_closes,"
        " SUM(CASE WHEN realized_pnl > 0 THEN realized_pnl ELSE 0 END)"
        "   / NULLIF(-SUM(CASE WHEN realized_pnl < 0 THEN realized_pnl ELSE 0 END), 0) AS profit_factor,"
        " AVG(duration_seconds) AS avg_duration_seconds"
        f" FROM strategy_trades WHERE {where} GROUP BY strategy_id ORDER BY total_pnl DESC",
        params,
    )
    next_step()
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
    next_step()
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
    next_step()
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
    next_step()
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
# Close reasons as a person reads them, and their colours in the closes chart.
CLOSE_KINDS = [("tp_closes", "take profit", TP_COLOUR), ("sl_closes", "stop loss", SL_COLOUR),
               ("signal_closes", "signal", "#1f77b4"), ("reversed_closes", "reversed", "#9467bd"),
               ("manual_closes", "manual / liquidation", "#7f7f7f")]  # fmt: skip
QUOTE = "USDT"  # linear futures settle in it: every money axis is in it


def render_html(data: ReportData, generated_at: datetime) -> str:
    """One self-contained page (plotly.js inline, nothing fetched): tables and Plotly charts
    with the same figures as the terminal (money to the cent)."""
    import plotly.graph_objects as go  # only the HTML report pays for plotly
    from plotly.subplots import make_subplots

    e = html.escape
    columns = [*PERFORMANCE_COLUMNS, ("open_positions", "open"), ("open_notional", "open notional"),
               ("unrealized_pnl", "uPnL")]  # fmt: skip
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
        f"<th>share</th><th>PnL ({QUOTE})</th></tr></thead><tbody>{attribution_rows}</tbody></table>"
        if data.attribution
        else "<p>No exchange position in this selection.</p>"
    )
    strategies = sorted({*data.equity, *(r["strategy_id"] for r in data.performance),
                         *(r["strategy_id"] for r in data.attribution)})  # fmt: skip
    colours = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(strategies)}

    equity = "<p>No closed trades in this selection.</p>"
    if data.equity:
        figure = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.62, 0.38], vertical_spacing=0.08,
                               subplot_titles=("cumulative net PnL", "drawdown from the peak"))  # fmt: skip
        # Every curve spans the selection: flat at 0 until its first close, level after its last.
        start = min(curve[0][0] for curve in data.equity.values())
        end = max(curve[-1][0] for curve in data.equity.values())
        for strategy, closed in sorted(data.equity.items()):
            points = [(start, Decimal(0), Decimal(0)), *closed]
            if closed[-1][0] < end:
                points.append((end, closed[-1][1], closed[-1][2]))
            times = [p[0] for p in points]
            figure.add_trace(go.Scatter(
                x=times, y=[float(p[1]) for p in points], name=strategy, legendgroup=strategy,
                mode="lines+markers", line={"color": colours[strategy], "width": 3, "shape": "hv"},
                customdata=[fmt(p[1], 2) for p in points],
                hovertemplate=f"{e(strategy)}<br>%{{x|%Y-%m-%d %H:%M}} UTC<br>%{{customdata}} {QUOTE}<extra></extra>",
            ), row=1, col=1)  # fmt: skip
            figure.add_trace(go.Scatter(
                x=times, y=[-float(p[2]) for p in points], name=f"{strategy} drawdown", legendgroup=strategy,
                showlegend=False, mode="lines", fill="tozeroy", fillcolor=DRAWDOWN_COLOUR,
                line={"color": colours[strategy], "width": 1, "shape": "hv"},
                customdata=[fmt(-p[2], 2) for p in points],
                hovertemplate=f"{e(strategy)} drawdown<br>%{{customdata}} {QUOTE}<extra></extra>",
            ), row=2, col=1)  # fmt: skip
        figure.update_yaxes(title_text=QUOTE, row=1, col=1)
        figure.update_yaxes(title_text=QUOTE, row=2, col=1)
        figure.update_xaxes(title_text="time (UTC)", row=2, col=1)
        figure.update_layout(height=520, legend={"title": {"text": "strategy"}})
        equity = _chart(figure, "equity-chart")

    traded = [r for r in data.performance if r["trades"]]
    closes = "<p>No closed trades in this selection.</p>"
    if traded:
        names = [r["strategy_id"] for r in traded][::-1]  # the best on top
        figure = go.Figure()
        for key, label, colour in CLOSE_KINDS:
            counts = [int(r.get(key) or 0) for r in traded][::-1]
            if any(counts):
                figure.add_trace(go.Bar(y=names, x=counts, name=label, orientation="h", marker_color=colour,
                                        text=[str(c) if c else "" for c in counts], textposition="auto",
                                        hovertemplate=f"%{{y}}: %{{x}} {label} close(s)<extra></extra>"))  # fmt: skip
        figure.update_layout(barmode="stack", height=120 + 40 * len(traded), legend={"title": {"text": "closed by"}},
                             xaxis={"title": {"text": "closed slices"}, "dtick": 1},
                             yaxis={"automargin": True})  # fmt: skip
        closes = _chart(figure, "closes-chart")

    attribution = ""
    if data.attribution:
        labels: dict[str, str] = {}
        for r in data.attribution:
            labels.setdefault(
                r["exchange_position_id"], f"{r['position_key']} {r['exchange_position_id'][:6]}"
            )
        figure = go.Figure()
        for strategy in strategies:
            mine = [r for r in data.attribution if r["strategy_id"] == strategy]
            if mine:
                figure.add_trace(go.Bar(
                    y=[labels[r["exchange_position_id"]] for r in mine], x=[float(r["realized_pnl"]) for r in mine],
                    name=strategy, orientation="h", marker_color=colours[strategy],
                    text=[fmt(r["realized_pnl"], 2) for r in mine], textposition="auto",
                    hovertemplate=f"{e(strategy)}: %{{text}} {QUOTE}<extra></extra>",
                ))  # fmt: skip
        figure.update_layout(barmode="relative", height=120 + 36 * len(labels), showlegend=True,
                             legend={"title": {"text": "strategy"}},
                             xaxis={"title": {"text": f"realized PnL, net of fees ({QUOTE})"}, "zeroline": True},
                             yaxis={"automargin": True, "categoryorder": "array",
                                    "categoryarray": list(labels.values())[::-1]})  # fmt: skip
        attribution = _chart(figure, "attribution-chart")

    return f"""{_page_head("tradeengine report")}
<h1>tradeengine report {e(_describe(data.filter))}</h1>
<p>Generated {e(generated_at.isoformat())}. PnL is net of fees, in {QUOTE}.</p>
<h2>Strategy performance</h2>
{
        f'<table id="performance"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'
        if data.performance
        else "<p>No trades and no open positions in this selection.</p>"
    }
<h2>Equity and drawdown</h2>
<div id="equity">{equity}</div>
<h2>How slices were closed</h2>
<div id="closes">{closes}</div>
<h2>PnL attribution per exchange position</h2>
<div id="attribution">{attribution}</div>
{attribution_table}
</body></html>
"""


def _chart(figure: Any, element_id: str) -> str:
    figure.update_layout(template="plotly_white", font={"family": "system-ui, sans-serif", "size": 13},
                         margin={"l": 10, "r": 30, "t": 40, "b": 10})  # fmt: skip
    config = {"displaylogo": False, "responsive": True}
    return str(figure.to_html(full_html=False, include_plotlyjs=False, config=config, div_id=element_id))


def _page_head(title: str) -> str:
    """A page's head: plotly.js inline, nothing fetched."""
    from plotly.offline import get_plotlyjs

    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} td:first-child,th:first-child{{text-align:left}}
</style>
<script>{get_plotlyjs()}</script></head><body>"""


def render_replay_html(results: dict[str, Any], source: str, generated_at: datetime) -> str:
    """`tradeengine replay --html`: every configuration's equity (net PnL of all its strategies
    over time) on one chart, the configuration in force drawn bold, and the totals side by side."""
    import plotly.graph_objects as go

    e = html.escape
    totals = []
    for label, result in results.items():
        figures = result["strategies"].values()
        money = (sum((f[k] for f in figures), Decimal(0)) for k in ("net_pnl", "fees", "funding"))
        counts = (sum(f["trades"] for f in figures), sum(f["open_at_end"] for f in figures),
                  sum(sum(f["rejected"].values()) for f in figures))  # fmt: skip
        totals.append((label, result["in_force"], *money, *counts))
    rows = "".join(
        f"<tr><td>{'* ' if live else ''}{e(label)}</td><td>{e(fmt(net, 2))}</td><td>{e(fmt(fees, 2))}</td>"
        f"<td>{e(fmt(funding, 2))}</td><td>{trades}</td><td>{still_open}</td><td>{rejected}</td></tr>"
        for label, live, net, fees, funding, trades, still_open, rejected in sorted(
            totals, key=lambda t: -t[2]
        )
    )
    table = (
        f'<table id="configurations"><thead><tr><th>configuration</th><th>net PnL ({QUOTE})</th><th>fees</th>'
        "<th>funding</th><th>trades</th><th>open at the end</th><th>rejected</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )
    curves = [(label, r) for label, r in results.items() if r["equity"]]
    chart = "<p>No configuration closed a trade.</p>"
    if curves:
        figure = go.Figure()
        start = min(r["equity"][0][0] for _, r in curves)
        for i, (label, result) in enumerate(curves):
            points = [[start, Decimal(0)], *result["equity"]]
            figure.add_trace(go.Scatter(
                x=[p[0] for p in points], y=[float(p[1]) for p in points],
                name=("* " if result["in_force"] else "") + label, mode="lines",
                line={"color": PALETTE[i % len(PALETTE)], "width": 4 if result["in_force"] else 2, "shape": "hv"},
                customdata=[fmt(p[1], 2) for p in points],
                hovertemplate=f"{e(label)}<br>%{{x|%Y-%m-%d %H:%M}} UTC<br>%{{customdata}} {QUOTE}<extra></extra>",
            ))  # fmt: skip
        figure.update_layout(height=560, legend={"title": {"text": "configuration"}},
                             xaxis={"title": {"text": "time (UTC)"}},
                             yaxis={"title": {"text": f"net PnL, all strategies ({QUOTE})"}})  # fmt: skip
        chart = _chart(figure, "replay-equity-chart")
    return f"""{_page_head("tradeengine replay")}
<h1>tradeengine replay</h1>
<p>Generated {e(generated_at.isoformat())} from {e(source)}. PnL is net of fees and funding, in {QUOTE};
* marks the configuration in force.</p>
<h2>Equity of each configuration</h2>
<div id="equity">{chart}</div>
<h2>Configurations, best first</h2>
{table}
</body></html>
"""
