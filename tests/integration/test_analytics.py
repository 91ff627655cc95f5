"""Every analytics view and every query of docs/analytics.md, against a hand-built history whose
answers are worked out below. The history goes through the real attribution consumer."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from engine.adapters.embedded_nats import EmbeddedNats, free_port
from engine.adapters.mysql_projection import project
from engine.adapters.mysql_store import MysqlStore
from engine.adapters.nats_bus import NatsBus
from engine.app.attribution import AttributionConsumer
from engine.config import MysqlTarget, load_settings
from engine.domain.decide import Accepted
from engine.domain.events import Event, PositionOpened, SignalDecided
from engine.domain.model import Action, Outcome, PositionMode, derive_id
from tests.helpers import Harness

D = Decimal
pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]
T0 = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)
T1 = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)
DOCS = Path(__file__).parents[2] / "docs" / "analytics.md"


def docs_queries() -> dict[str, str]:
    blocks = re.findall(r"```sql\n-- name: (\w+)\n(.*?)```", DOCS.read_text(), flags=re.S)
    return {name: sql.strip() for name, sql in blocks}


class History:
    """ETHUSDT in hedge mode and BTCUSDT in one-way mode, taker fee 0.001."""

    def __init__(self) -> None:
        self.eth = Harness(taker_fee=D("0.001"))
        self.btc = Harness(mode=PositionMode.ONE_WAY, taker_fee=D("0.001"))
        self.decisions: list[SignalDecided] = []
        self.n = 0

    async def signal(
        self, h: Harness, at: datetime, strategy: str, symbol: str, action: str, **f: Any
    ) -> None:
        h.now = at
        self.n += 1
        signal_id = f"h{self.n}"
        verdict = await h.signal(strategy, symbol, action, signal_id=signal_id, **f)
        accepted = isinstance(verdict, Accepted)
        self.decisions.append(SignalDecided(
            event_id=derive_id("signal.decided", strategy, signal_id), occurred_at=at, signal_id=signal_id,
            strategy_id=strategy, symbol=symbol, action=Action(action),
            outcome=Outcome.ACCEPTED if accepted else verdict.outcome,  # type: ignore[union-attr]
            reason_code="accepted" if accepted else verdict.reason_code,  # type: ignore[union-attr]
            reason="history", strategy_position_ids=list(verdict.strategy_position_ids) if accepted else [],  # type: ignore[union-attr]
        ))  # fmt: skip

    async def tick(self, h: Harness, at: datetime, symbol: str, price: str) -> None:
        h.now = at
        await h.tick(symbol, price)

    async def build(self) -> list[Event]:
        m = timedelta(minutes=1)
        eth, btc = self.eth, self.btc
        await self.tick(eth, T0, "ETHUSDT", "2000")
        await self.signal(
            eth,
            T0,
            "A",
            "ETHUSDT",
            "buy",
            quantity="1",
            confidence="0.8",
            take_profit="2100",
            stop_loss="1900",
        )
        await self.signal(
            eth, T0 + m, "B", "ETHUSDT", "buy", quantity="1", confidence="0.7", stop_loss="1950"
        )
        await self.signal(
            eth, T0 + 2 * m, "C", "ETHUSDT", "sell", quantity="2", confidence="0.9", take_profit="1900"
        )
        await self.tick(eth, T0 + 10 * m, "ETHUSDT", "2100")  # A's TP
        await self.tick(eth, T0 + 20 * m, "ETHUSDT", "1950")  # B's SL; EP1 flat
        await self.signal(eth, T1, "C", "ETHUSDT", "close", quantity="0.5")  # partial, at 1950
        await self.tick(eth, T1 + 5 * m, "ETHUSDT", "1900")  # C's TP on the rest
        await self.signal(
            eth, T1 + 10 * m, "A", "ETHUSDT", "buy", quantity="0.5", confidence="0.8"
        )  # stays open
        await self.signal(
            eth, T1 + 11 * m, "D", "ETHUSDT", "buy", quantity="1", confidence="0.5"
        )  # low_confidence
        await self.signal(
            eth, T1 + 12 * m, "B", "ETHUSDT", "buy", quantity="1", confidence="0.9", take_profit="1800"
        )
        await self.signal(eth, T1 + 13 * m, "A", "ETHUSDT", "hold")
        await self.tick(btc, T1 + 30 * m, "BTCUSDT", "40000")
        await self.signal(btc, T1 + 30 * m, "E", "BTCUSDT", "buy", quantity="0.1", confidence="0.6")
        await self.tick(btc, T1 + 40 * m, "BTCUSDT", "41000")
        await self.signal(
            btc, T1 + 40 * m, "F", "BTCUSDT", "sell", quantity="0.1", confidence="0.9"
        )  # reverses E
        events: list[Event] = [*eth.events, *btc.events, *self.decisions]
        return sorted(events, key=lambda e: e.occurred_at)  # stable: order within an instant is kept


class Db:
    def __init__(self, store: MysqlStore, history: History) -> None:
        self.store, self.history = store, history

    async def rows(self, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        async with self.store.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(sql, params)
            names = [d[0] for d in cur.description]
            result = [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]
            await conn.commit()
            return result

    async def query(self, name: str, **params: Any) -> list[dict[str, Any]]:
        return await self.rows(docs_queries()[name], params or None)

    def ep(self, strategy: str) -> str:
        first = next(e for e in self.history.eth.events + self.history.btc.events
                     if isinstance(e, PositionOpened) and e.strategy_id == strategy)  # fmt: skip
        return first.exchange_position.exchange_position_id


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def db(tmp_path_factory: pytest.TempPathFactory, mysql_server: MysqlTarget) -> AsyncIterator[Db]:
    history = History()
    events = await history.build()
    server = EmbeddedNats(free_port(), tmp_path_factory.mktemp("nats")).start()
    name = f"te_analytics_{free_port()}"
    auth = mysql_server.user + (f":{mysql_server.password}" if mysql_server.password else "")
    target = MysqlTarget.parse(f"mysql://{auth}@{mysql_server.host}:{mysql_server.port}/{name}")
    bus = await NatsBus.connect(server.url, "analytics-test")
    store = await MysqlStore.open(target)
    try:
        await bus.ensure_streams()
        await store.migrate()
        await bus.publish_events(events)
        consumer = AttributionConsumer(load_settings(nats_url=server.url), bus, store)
        task = asyncio.create_task(consumer.run())
        helper = Db(store, history)
        deadline = asyncio.get_running_loop().time() + 20
        while (await helper.rows("SELECT COUNT(*) AS n FROM processed_events"))[0]["n"] < len(events):
            assert asyncio.get_running_loop().time() < deadline, "attribution did not catch up"
            await asyncio.sleep(0.02)
        consumer.stop()
        await task
        yield helper
    finally:
        async with store.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        await store.close()
        await bus.close()
        server.stop()


def q(value: Any, places: str = "0.0001") -> Any:
    return value.quantize(D(places)) if isinstance(value, Decimal) else value


async def test_every_docs_query_is_covered_below() -> None:
    covered = {name[len("test_q_") :] for name in globals() if name.startswith("test_q_")}
    assert set(docs_queries()) == covered


async def test_q_overall(db: Db) -> None:
    rows = {r["strategy_id"]: r for r in await db.query("overall")}
    assert [r["strategy_id"] for r in await db.query("overall")][:2] == ["C", "A"]
    assert (rows["A"]["total_positions"], rows["A"]["open_positions"], rows["A"]["closed_positions"]) == (
        2,
        1,
        1,
    )
    assert rows["A"]["total_pnl"] == D("95.9") and rows["A"]["total_fees"] == D("5.05")  # 2 + 2.1 + 0.95
    assert rows["B"]["total_pnl"] == D("-53.95") and rows["B"]["total_fees"] == D("3.95")
    assert rows["C"]["total_pnl"] == D("167.175") and rows["C"]["total_fees"] == D("7.825")
    assert rows["E"]["total_pnl"] == D("91.9") and rows["E"]["total_fees"] == D("8.1")
    assert rows["F"]["open_positions"] == 1 and rows["F"]["total_fees"] == D("4.1")


async def test_q_win_rate_and_profit_factor(db: Db) -> None:
    rows = {r["strategy_id"]: r for r in await db.query("win_rate_and_profit_factor")}
    assert (rows["A"]["winning_trades"], rows["A"]["win_rate"], rows["A"]["profit_factor"]) == (1, 1, None)
    assert (rows["B"]["losing_trades"], rows["B"]["win_rate"], rows["B"]["profit_factor"]) == (1, 0, 0)
    assert rows["F"]["win_rate"] is None  # no trade yet


async def test_q_tp_sl_hit_rates(db: Db) -> None:
    rows = {(r["strategy_id"], r["position_side"]): r for r in await db.query("tp_sl_hit_rates")}
    a, b, c, e = rows["A", "LONG"], rows["B", "LONG"], rows["C", "SHORT"], rows["E", "LONG"]
    assert (a["trades"], a["tp_exits"], a["sl_exits"], a["tp_rate"], a["avg_tp_pnl"]) == (
        1,
        1,
        0,
        1,
        D("95.9"),
    )
    assert (b["sl_exits"], b["sl_rate"], b["avg_sl_pnl"], b["avg_tp_pnl"]) == (1, 1, D("-53.95"), None)
    assert (c["tp_exits"], c["avg_tp_pnl"]) == (1, D("167.175"))  # a partial signal close, then the TP
    assert (e["other_exits"], e["tp_rate"], e["sl_rate"]) == (1, 0, 0)  # reversed


async def test_q_tp_vs_sl_for_one_strategy(db: Db) -> None:
    assert await db.query("tp_vs_sl_for_one_strategy", strategy_id="B") == [
        {"close_reason": "stop_loss", "trades": 1, "total_pnl": D("-53.95"), "avg_pnl": D("-53.95")}
    ]


async def test_q_contribution_summary(db: Db) -> None:
    rows = {(r["strategy_id"], r["symbol"]): r for r in await db.query("contribution_summary")}
    assert (rows["A", "ETHUSDT"]["contributions"], rows["A", "ETHUSDT"]["total_quantity"]) == (2, D("1.5"))
    assert q(rows["A", "ETHUSDT"]["avg_entry_price"]) == D("1966.6667")  # (2000 + 0.5 * 1900) / 1.5
    assert rows["C", "ETHUSDT"]["position_side"] == "SHORT"
    assert rows["F", "BTCUSDT"]["avg_entry_price"] == D("41000")


async def test_q_multi_strategy_positions(db: Db) -> None:
    (row,) = await db.query("multi_strategy_positions")
    assert (row["position_key"], row["status"], row["strategies"], row["strategies_in_order"]) == (
        "ETHUSDT_LONG", "closed", 2, "A,B",
    )  # fmt: skip
    assert (row["total_quantity"], row["total_pnl"], row["total_fees"]) == (D("2"), D("41.95"), D("8.05"))


async def test_q_contribution_timeline(db: Db) -> None:
    rows = await db.query("contribution_timeline", exchange_position_id=db.ep("A"))
    assert [(r["kind"], r["strategy_id"], r["quantity"], r["exchange_quantity_after"]) for r in rows] == [
        ("open", "A", D("1"), D("1")), ("open", "B", D("1"), D("2")),
        ("close", "A", D("-1"), D("1")), ("close", "B", D("-1"), D("0")),
    ]  # fmt: skip
    assert [r["realized_pnl"] for r in rows][2:] == [D("95.9"), D("-53.95")]


async def test_q_exchange_position_summary(db: Db) -> None:
    rows = await db.query("exchange_position_summary")
    assert [(r["position_key"], r["status"]) for r in rows] == [
        ("ETHUSDT_LONG", "closed"), ("ETHUSDT_SHORT", "closed"), ("ETHUSDT_LONG", "open"),
        ("BTCUSDT_LONG", "closed"), ("BTCUSDT_SHORT", "open"),
    ]  # fmt: skip
    first = rows[0]
    assert (first["contributions"], first["strategies"], first["max_quantity"]) == (2, 2, D("2"))
    assert (first["realized_pnl"], first["total_fees"], first["duration_seconds"]) == (
        D("41.95"),
        D("8.05"),
        1200,
    )
    assert rows[1]["realized_pnl"] == D("167.175") and rows[3]["realized_pnl"] == D("91.9")


async def test_q_open_vs_closed(db: Db) -> None:
    open_, closed = await db.query("open_vs_closed")  # ENUM order: open, closed
    assert (closed["status"], closed["positions"], closed["realized_pnl"]) == ("closed", 4, D("301.025"))
    assert (open_["status"], open_["positions"], open_["open_quantity"]) == ("open", 2, D("0.6"))
    assert open_["open_notional"] == D("5050")  # 0.5 * 1900 + 0.1 * 41000


async def test_q_daily_pnl(db: Db) -> None:
    rows = [(r["day"], r["strategy_id"], r["closes"], r["realized_pnl"]) for r in await db.query("daily_pnl")]
    assert rows == [
        (date(2026, 11, 20), "A", 1, D("95.9")), (date(2026, 11, 20), "B", 1, D("-53.95")),
        (date(2026, 11, 21), "C", 2, D("167.175")), (date(2026, 11, 21), "E", 1, D("91.9")),
    ]  # fmt: skip


async def test_q_best_trades(db: Db) -> None:
    rows = await db.query("best_trades", limit=3)
    assert [(r["strategy_id"], r["realized_pnl"]) for r in rows] == [
        ("C", D("167.175")),
        ("A", D("95.9")),
        ("E", D("91.9")),
    ]
    assert q(rows[0]["pnl_pct"]) == D("4.1794")  # 167.175 / 4000


async def test_q_worst_trades(db: Db) -> None:
    (worst,) = await db.query("worst_trades", limit=1)
    assert (worst["strategy_id"], worst["realized_pnl"], worst["close_reason"]) == (
        "B",
        D("-53.95"),
        "stop_loss",
    )
    assert q(worst["pnl_pct"]) == D("-2.6975")


async def test_q_strategy_comparison(db: Db) -> None:
    rows = {r["strategy_id"]: r for r in await db.query("strategy_comparison")}
    assert (rows["A"]["trades"], rows["A"]["expectancy"], rows["A"]["max_drawdown"], rows["A"]["tp_rate"]) == (
        1, D("95.9"), D("0"), 1,
    )  # fmt: skip
    assert (rows["B"]["max_drawdown"], rows["B"]["sl_rate"]) == (D("53.95"), 1)
    assert rows["F"]["trades"] == 0 and rows["F"]["expectancy"] is None


async def test_q_performance_by_key(db: Db) -> None:
    rows = await db.query("performance_by_key", min_trades=1)
    assert [(r["strategy_id"], r["position_side"], r["total_pnl"]) for r in rows] == [
        ("C", "SHORT", D("167.175")), ("A", "LONG", D("95.9")), ("E", "LONG", D("91.9")), ("B", "LONG", D("-53.95")),
    ]  # fmt: skip
    assert await db.query("performance_by_key", min_trades=2) == []


async def test_q_attribution_report(db: Db) -> None:
    rows = await db.query("attribution_report", exchange_position_id=db.ep("A"))
    assert [(r["strategy_id"], r["contributed_quantity"], r["quantity_share"], r["realized_pnl"], r["fees"]) for r in rows] == [
        ("A", D("1"), D("0.5"), D("95.9"), D("4.1")), ("B", D("1"), D("0.5"), D("-53.95"), D("3.95")),
    ]  # fmt: skip


async def test_q_co_entries(db: Db) -> None:
    assert await db.query("co_entries", minutes=5) == [
        {"strategy_a": "A", "strategy_b": "B", "co_entries": 1}
    ]
    # within two days A's second entry (day 2) also pairs with B's first (day 1)
    assert await db.query("co_entries", minutes=2 * 24 * 60) == [
        {"strategy_a": "A", "strategy_b": "B", "co_entries": 2}
    ]
    view = await db.rows(
        "SELECT strategy_a, strategy_b, co_entries, shared_positions FROM strategy_co_entries"
    )
    assert view == [{"strategy_a": "A", "strategy_b": "B", "co_entries": 1, "shared_positions": 1}]


async def test_q_equity_curve(db: Db) -> None:
    rows = await db.query("equity_curve", strategy_id="C")
    assert [(r["realized_pnl"], r["equity"], r["peak"], r["drawdown"]) for r in rows] == [
        (D("23.025"), D("23.025"), D("23.025"), D("0")), (D("144.15"), D("167.175"), D("167.175"), D("0")),
    ]  # fmt: skip
    (b,) = await db.query("equity_curve", strategy_id="B")
    assert (b["equity"], b["peak"], b["drawdown"]) == (D("-53.95"), D("0"), D("53.95"))  # peak counts from 0


async def test_q_expectancy_and_drawdown(db: Db) -> None:
    rows = {r["strategy_id"]: r for r in await db.query("expectancy_and_drawdown")}
    assert (rows["B"]["trades"], rows["B"]["expectancy"], rows["B"]["avg_loss"], rows["B"]["avg_win"]) == (
        1, D("-53.95"), D("-53.95"), None,
    )  # fmt: skip
    assert rows["B"]["max_drawdown"] == D("53.95") and rows["C"]["max_drawdown"] == 0
    assert "F" not in rows  # no trade


async def test_q_fees(db: Db) -> None:
    rows = {r["strategy_id"]: r for r in await db.query("fees")}
    assert (rows["A"]["entry_fees"], rows["A"]["exit_fees"], rows["A"]["funding_fees"], rows["A"]["total_fees"]) == (
        D("2.95"), D("2.1"), 0, D("5.05"),
    )  # fmt: skip
    # the reversal's one net order paid 8.2; E's close and F's open took half each
    assert (rows["E"]["exit_fees"], rows["F"]["entry_fees"]) == (D("4.1"), D("4.1"))


async def test_q_rejections(db: Db) -> None:
    rows = [
        (r["strategy_id"], r["outcome"], r["reason_code"], r["signals"], q(r["share"]))
        for r in await db.query("rejections")
    ]
    assert rows == [
        ("A", "ignored", "hold", 1, D("0.3333")),
        ("B", "rejected", "invalid_tp_sl", 1, D("0.5000")),
        ("D", "rejected", "low_confidence", 1, D("1.0000")),
    ]


async def test_replaying_the_history_changes_nothing(db: Db) -> None:
    before = await db.rows("SELECT * FROM strategy_performance ORDER BY strategy_id")
    events = await History().build()
    assert await db.store.write([(e, None) for e in events]) == 0
    assert await db.rows("SELECT * FROM strategy_performance ORDER BY strategy_id") == before


# --- tradeengine report ---------------------------------------------------------------------
async def test_report_terminal_tables_and_filters(db: Db) -> None:
    from rich.console import Console

    from engine.app.report import ReportFilter, gather, render_terminal

    data = await gather(db.store, ReportFilter())
    console = Console(record=True, width=200)
    render_terminal(data, console)
    text = console.export_text()
    assert "Strategy performance" in text and "Attribution per exchange position" in text
    # F has only an open position: shown, after those with trades (issue #17)
    assert [r["strategy_id"] for r in data.performance] == ["C", "A", "E", "B", "F"]
    assert "167.18" in text and "-53.95" in text  # money to the cent on a terminal
    f = data.performance[-1]
    assert (f["trades"], f["open_positions"], f["unrealized_pnl"]) == (0, 1, None)  # no price known here

    only_b = await gather(db.store, ReportFilter(strategy="B"))
    assert [r["strategy_id"] for r in only_b.performance] == ["B"] and set(only_b.equity) == {"B"}
    day_two = await gather(db.store, ReportFilter(since=T1))
    assert {r["strategy_id"] for r in day_two.performance if r["trades"]} == {"C", "E"}
    assert {r["strategy_id"] for r in day_two.performance if not r["trades"]} == {"A", "F"}  # open now
    btc = await gather(db.store, ReportFilter(symbol="BTCUSDT"))
    assert [(r["strategy_id"], r["trades"]) for r in btc.performance] == [("E", 1), ("F", 0)]
    assert {r["position_key"] for r in btc.attribution} == {"BTCUSDT_LONG", "BTCUSDT_SHORT"}


async def test_report_html_is_self_contained_with_every_chart(db: Db, tmp_path: Path) -> None:
    import json
    import re

    from engine.app.report import ReportFilter, gather, render_html

    data = await gather(db.store, ReportFilter())
    page = render_html(data, T1)
    # plotly.js inline, nothing fetched: no script or stylesheet from elsewhere
    assert "<script src=" not in page and '<link rel="stylesheet" href="http' not in page
    figures = {
        element: json.loads(data)
        for element, data in re.findall(r'Plotly.newPlot\(\s*"([a-z-]+)",\s*(\[.*?\]),\s*\{', page, re.S)
    }
    assert set(figures) == {"equity-chart", "closes-chart", "attribution-chart"}
    equity = figures["equity-chart"]
    assert sorted(t["name"] for t in equity if t.get("showlegend", True)) == ["A", "B", "C", "E"]
    assert {t["yaxis"] for t in equity if t["name"].endswith("drawdown")} == {"y2"}  # its own axis
    b = next(t for t in equity if t["name"] == "B")
    assert b["y"][0] == 0 and b["customdata"][-1] == "-53.95"  # from 0; money as in the tables
    closes = {t["name"]: t for t in figures["closes-chart"]}
    assert set(closes) >= {"take profit", "stop loss"}
    by_strategy = dict(zip(closes["take profit"]["y"], closes["take profit"]["x"], strict=True))
    assert by_strategy == {r["strategy_id"]: r["tp_closes"] for r in data.performance if r["trades"]}
    assert sum(closes["stop loss"]["x"]) == sum(r["sl_closes"] for r in data.performance if r["trades"]) > 0
    slices = [(t["name"], text) for t in figures["attribution-chart"] for text in t["text"]]
    assert len(slices) == 6 and ("B", "-53.95") in slices  # labels on the bars, not only on hover


async def test_report_charts_render_in_headless_chromium(db: Db, tmp_path: Path) -> None:
    """Look at it as a person would: render the page in Chromium (its scripts run) and find the
    charts' colours on the screen."""
    import shutil

    from PIL import Image

    from engine.app.report import (
        DRAWDOWN_COLOUR,
        PALETTE,
        SL_COLOUR,
        TP_COLOUR,
        ReportFilter,
        gather,
        render_html,
    )

    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed: `make test` installs it (scripts/ensure-system-deps)"
    page, shot = tmp_path / "report.html", tmp_path / "report.png"
    page.write_text(render_html(await gather(db.store, ReportFilter()), T1))
    proc = await asyncio.create_subprocess_exec(
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1280,2200",
        "--virtual-time-budget=10000", f"--screenshot={shot}", page.as_uri(),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert await asyncio.wait_for(proc.wait(), 90) == 0
    image = Image.open(shot).convert("RGB")
    counts = {colour: n for n, colour in image.getcolors(maxcolors=1 << 24) or []}

    def seen(colour: str) -> int:
        rgb = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
        return counts.get(rgb, 0)  # type: ignore[arg-type]

    assert seen(PALETTE[0]) > 200, "strategy A's equity line and attribution slice not drawn"
    assert seen(DRAWDOWN_COLOUR) > 500, "B's drawdown area not drawn"
    assert seen(TP_COLOUR) > 200 and seen(SL_COLOUR) > 200, "TP/SL bars not drawn"


async def test_summary_table_matches_a_full_recomputation(db: Db) -> None:
    """strategy_performance reads strategy_stats, kept incrementally; recompute it from scratch."""
    recomputed = await db.rows(
        "SELECT strategy_id, COUNT(*) AS total_positions, SUM(status = 'open') AS open_positions,"
        " SUM(status = 'closed') AS closed_positions, COALESCE(SUM(close_reason = 'take_profit'), 0) AS tp_hits,"
        " COALESCE(SUM(close_reason = 'stop_loss'), 0) AS sl_hits, SUM(status = 'closed' AND realized_pnl > 0) AS winning_trades,"
        " SUM(status = 'closed' AND realized_pnl < 0) AS losing_trades, SUM(realized_pnl) AS total_pnl,"
        " SUM(entry_fee + exit_fees) AS total_fees FROM strategy_positions GROUP BY strategy_id ORDER BY strategy_id"
    )
    view = await db.rows(
        "SELECT strategy_id, total_positions, open_positions, closed_positions, tp_hits, sl_hits, winning_trades,"
        " losing_trades, total_pnl, total_fees FROM strategy_performance ORDER BY strategy_id"
    )
    assert [{k: (int(v) if isinstance(v, Decimal) and k.endswith(("positions", "hits", "trades")) else v)
             for k, v in row.items()} for row in recomputed] == view  # fmt: skip


async def test_one_event_per_batch_projects_the_same_rows_as_one_batch(
    db: Db, mysql_server: MysqlTarget
) -> None:
    """A position opened and closed within one batch is inserted with its closes folded in; one
    opened in an earlier batch is updated. Both paths must land on the same rows."""
    name = f"te_batches_{free_port()}"
    server = mysql_server
    store = await MysqlStore.open(MysqlTarget(server.host, server.port, server.user, server.password, name))
    tables = ("strategy_positions", "exchange_positions", "strategy_stats", "position_closes")
    try:
        await store.migrate()
        for event in await History().build():
            await store.write([(event, None)])
        one_by_one = Db(store, db.history)
        for table in tables:
            sql = f"SELECT * FROM {table} ORDER BY 1"  # the primary key, in all four
            assert await one_by_one.rows(sql) == await db.rows(sql), table
    finally:
        async with store.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        await store.close()


async def test_a_batch_rendered_before_part_of_it_was_stored_is_rendered_again(
    db: Db, mysql_server: MysqlTarget
) -> None:
    """The consumer renders a batch's SQL while the batch before it is written. If some of its
    events turn out to be stored already (a redelivery), the rendering must not be used."""
    name = f"te_projected_{free_port()}"
    server = mysql_server
    store = await MysqlStore.open(MysqlTarget(server.host, server.port, server.user, server.password, name))
    try:
        await store.migrate()
        events = [(event, None) for event in await History().build()]
        rendered = project(events, await store.quoting())
        half = len(events) // 2
        assert await store.write(events[:half]) == half
        assert await store.write(events, rendered) == len(events) - half
        assert await store.write(events, rendered) == 0
        again = Db(store, db.history)
        for table in ("strategy_positions", "exchange_positions", "strategy_stats", "position_closes"):
            sql = f"SELECT * FROM {table} ORDER BY 1"
            assert await again.rows(sql) == await db.rows(sql), table
    finally:
        async with store.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        await store.close()


async def test_report_fits_80_columns_and_exports(db: Db) -> None:
    """At 80 columns no number is cut (rich's ellipsis never appears); --json keeps every figure
    in full and values open positions at the prices given."""
    from rich.console import Console

    from engine.app.report import ReportFilter, as_records, gather, render_terminal

    data = await gather(db.store, ReportFilter())
    console = Console(record=True, width=80)
    render_terminal(data, console)
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    data.value_open_positions({p["symbol"]: p["entry_price"] * 2 for p in data.open_positions})
    records = as_records(data)["performance"]
    f = next(r for r in records if r["strategy_id"] == "F")
    assert f["open_positions"] == 1 and f["unrealized_pnl"] != 0
    assert next(r for r in records if r["strategy_id"] == "C")["total_pnl"] == D("167.175")


async def test_report_html_says_what_an_empty_selection_holds_and_tables_the_attribution(db: Db) -> None:
    import re

    from engine.app.report import ReportFilter, gather, render_html

    empty = render_html(await gather(db.store, ReportFilter(strategy="nobody")), T1)
    assert "No trades and no open positions in this selection." in empty
    assert (
        "No closed trades in this selection." in empty and "No exchange position in this selection." in empty
    )
    page = render_html(await gather(db.store, ReportFilter()), T1)
    assert page.count("<tr><td>") >= 6 + 5  # the attribution table's rows beside the performance table's
    # Money to the cent, as on the terminal, wherever a person reads it: the tables, the labels
    # on the bars and what hovering shows (the charts plot the exact figure).
    tables = "".join(re.findall(r"<table.*?</table>", page, re.S))
    assert "167.18" in tables and "167.175" not in tables
    shown = re.findall(r'"(?:text|customdata)":\[([^\]]*)\]', page)
    assert shown and not [t for t in shown if "167.175" in t] and any("167.18" in t for t in shown)
