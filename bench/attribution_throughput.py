"""Attribution throughput: events/s from EVENTS into MariaDB, against a raw batched insert of the
same rows in the same run. Targets (issue #6): >= 10,000 events/s, ratio >= 0.5.

    python -m bench.attribution_throughput [--signals N]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncmy

from bench.common import machine
from engine.adapters.embedded_nats import EmbeddedNats, free_port
from engine.adapters.mysql_sql import MultiRowInsert
from engine.adapters.mysql_store import MysqlStore
from engine.adapters.nats_bus import NatsBus
from engine.app.attribution import AttributionConsumers
from engine.config import MysqlTarget, load_settings
from engine.domain.decide import Accepted
from engine.domain.events import Event, PositionClosed, PositionOpened, SignalDecided
from engine.domain.model import Action, Outcome, derive_id
from tests.helpers import NOW, Harness

MYSQL = "mysql://root@127.0.0.1:3306/"


SYMBOL_PRICES = {"ETHUSDT": "3000", "BTCUSDT": "45000", "BNBUSDT": "600", "SOLUSDT": "150"}


async def history(signals: int, symbols: int = 1) -> list[Event]:
    """A realistic mix: opens, TP/SL closes, signal closes, rejections, and one decision each,
    over the first `symbols` symbols (the consumers side by side share them by symbol)."""
    rng = random.Random(3)
    h = Harness()
    names = list(SYMBOL_PRICES)[:symbols]
    prices = {s: Decimal(SYMBOL_PRICES[s]) for s in names}
    for symbol in names:
        await h.tick(symbol, prices[symbol])
    events: list[Event] = []
    for n in range(signals):
        symbol = names[n % len(names)]
        if n % 5 == 0:
            prices[symbol] = (prices[symbol] * Decimal(1 + rng.uniform(-0.01, 0.01))).quantize(
                Decimal("0.01")
            )
            before = len(h.events)
            await h.tick(symbol, prices[symbol])
            events.extend(h.events[before:])
        strategy = f"s{rng.randrange(8)}"
        action = rng.choice(["buy", "sell", "buy", "sell", "close"])
        size = {"quantity": "0.01"} if symbol == "ETHUSDT" else {"quote_quantity": "30"}
        fields = {**size, "confidence": "0.8", "take_profit_pct": "0.01", "stop_loss_pct": "0.01"}
        before = len(h.events)
        verdict = await h.signal(
            strategy, symbol, action, signal_id=f"b{n}", **({} if action == "close" else fields)
        )
        events.extend(h.events[before:])
        accepted = isinstance(verdict, Accepted)
        events.append(SignalDecided(
            event_id=derive_id("bench-decision", str(n)), occurred_at=NOW, signal_id=f"b{n}", strategy_id=strategy,
            symbol=symbol, action=Action(action), outcome=Outcome.ACCEPTED if accepted else verdict.outcome,  # type: ignore[union-attr]
            reason_code="accepted" if accepted else verdict.reason_code, reason="bench",  # type: ignore[union-attr]
            strategy_position_ids=list(verdict.strategy_position_ids) if accepted else [],  # type: ignore[union-attr]
        ))  # fmt: skip
    return events


async def create_db(name: str) -> MysqlTarget:
    target = MysqlTarget.parse(MYSQL + name)
    store = await MysqlStore.open(target)
    await store.migrate()
    await store.close()
    return target


async def drop_db(name: str) -> None:
    conn = await asyncmy.connect(host="127.0.0.1", port=3306, user="root", password="")
    async with conn.cursor() as cur:
        await cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()


async def through_consumer(events: list[Event], tmp: Path, consumers: int = 1) -> float:
    server = EmbeddedNats(free_port(), tmp / "nats").start()
    name = f"te_bench_{uuid.uuid4().hex[:8]}"
    try:
        target = await create_db(name)
        bus = await NatsBus.connect(server.url, "bench")
        await bus.ensure_streams()
        for i in range(0, len(events), 1000):
            await bus.publish_events(events[i : i + 1000])
        store = await MysqlStore.open(target, create_database=False, connections=max(4, consumers + 2))
        settings = load_settings(nats_url=server.url, attribution_partitions=consumers)
        consumer = AttributionConsumers(settings, bus, store)
        task = asyncio.create_task(consumer.run())
        await consumer.ready.wait()
        started, cpu_started = time.perf_counter(), time.process_time()
        while True:
            async with store.pool.acquire() as conn, conn.cursor() as cur:
                await cur.execute("SELECT COUNT(*) FROM processed_events")
                (count,) = await cur.fetchone()
                await conn.commit()
            if count >= len(events):
                break
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - started
        print(
            f"  (consumer process busy {100 * (time.process_time() - cpu_started) / elapsed:.0f} % of the time)"
        )
        consumer.stop()
        await task
        await store.close()
        await bus.close()
        return len(events) / elapsed
    finally:
        server.stop()
        await drop_db(name)


async def insert(cur: Any, sql: str, rows: list[tuple[Any, ...]]) -> None:
    """Multi-row statements rendered as the consumer renders its own (SqlLiterals)."""
    await MultiRowInsert.of(sql).run(cur, rows)


async def raw_insert(events: list[Event]) -> float:
    """The floor: the same rows, one multi-row INSERT per table (as few statements as the size
    cap allows), no idempotency, no updates, written with the consumer's own SQL rendering."""
    name = f"te_bench_{uuid.uuid4().hex[:8]}"
    await create_db(name)
    conn = await asyncmy.connect(host="127.0.0.1", port=3306, user="root", password="", database=name)
    try:
        opened = [e for e in events if isinstance(e, PositionOpened)]
        closed = [e for e in events if isinstance(e, PositionClosed)]
        decided = [e for e in events if isinstance(e, SignalDecided)]
        at = NOW.replace(tzinfo=None)
        started = time.perf_counter()
        async with conn.cursor() as cur:
            await insert(
                cur,
                "INSERT INTO processed_events (event_id, event_type, processed_at) VALUES (%s, %s, %s)",
                [(e.event_id, e.type, at) for e in events],
            )
            await insert(
                cur,
                "INSERT INTO strategy_positions (strategy_position_id, strategy_id, signal_id, symbol, position_side,"
                " exchange_position_id, status, entry_price, quantity, remaining_quantity, confidence, entry_fee,"
                " client_order_id, exchange_order_id, opened_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                [(e.strategy_position_id, e.strategy_id, e.signal_id, e.symbol, e.side.value,
                  e.exchange_position.exchange_position_id, "open", e.entry_price, e.quantity, e.quantity, e.confidence,
                  e.fee, e.client_order_id, e.exchange_order_id, at) for e in opened],
            )  # fmt: skip
            await insert(
                cur,
                "INSERT INTO position_contributions (contribution_id, exchange_position_id, strategy_position_id,"
                " strategy_id, symbol, position_side, sequence, quantity, entry_price, quantity_before,"
                " quantity_after, avg_entry_price_after, created_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                [(e.contribution.contribution_id, e.exchange_position.exchange_position_id, e.strategy_position_id,
                  e.strategy_id, e.symbol, e.side.value, e.contribution.sequence, e.quantity, e.entry_price,
                  e.exchange_position.quantity_before, e.exchange_position.quantity_after,
                  e.exchange_position.avg_entry_price, at) for e in opened],
            )  # fmt: skip
            await insert(
                cur,
                "INSERT INTO position_closes (event_id, strategy_position_id, strategy_id, exchange_position_id,"
                " symbol, position_side, closed_quantity, remaining_quantity, entry_price, exit_price, gross_pnl,"
                " entry_fee_share, exit_fee, fee, realized_pnl, close_reason, client_order_id, exchange_order_id,"
                " closed_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                [(e.event_id, e.strategy_position_id, e.strategy_id, e.exchange_position.exchange_position_id,
                  e.symbol, e.side.value, e.closed_quantity, e.remaining_quantity, e.entry_price, e.exit_price,
                  e.gross_pnl, e.entry_fee_share, e.exit_fee, e.fee, e.realized_pnl, e.close_reason.value,
                  e.client_order_id, e.exchange_order_id, at) for e in closed],
            )  # fmt: skip
            await insert(
                cur,
                "INSERT INTO signal_decisions (event_id, signal_id, strategy_id, symbol, action, outcome,"
                " reason_code, reason, strategy_position_ids, decided_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                [(e.event_id, e.signal_id, e.strategy_id, e.symbol, e.action.value, e.outcome.value,
                  e.reason_code, e.reason, "[]", at) for e in decided],
            )  # fmt: skip
        await conn.commit()
        return len(events) / (time.perf_counter() - started)
    finally:
        conn.close()  # before the drop: an open transaction's locks would make it wait forever
        await drop_db(name)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--signals", type=int, default=8000)
    parser.add_argument(
        "--symbols", type=int, default=1, help="spread the history over this many symbols (1-4)"
    )
    parser.add_argument("--consumers", default="1", help="comma-separated ATTRIBUTION_PARTITIONS to run")
    args = parser.parse_args()
    events = await history(args.signals, args.symbols)
    kinds = {
        t: sum(1 for e in events if e.type == t)
        for t in ("signal.decided", "position.opened", "position.closed")
    }
    print(f"# attribution: {len(events)} events {kinds} over {args.symbols} symbol(s) — {machine()}")
    rates: dict[int, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run, n in enumerate(int(c) for c in args.consumers.split(",")):  # alternating: 1,2,1,2
            rates.setdefault(n, []).append(await through_consumer(events, Path(tmp) / f"run{run}", n))
    raw = await raw_insert(events)
    first = max(next(iter(rates.values())))
    for n, runs in rates.items():
        shown = " / ".join(f"{rate:.0f}" for rate in runs)
        print(f"  attribution, {n} consumer(s) : {shown} events/s  (best x{max(runs) / first:.2f})")
    print(f"  raw batched insert   : {raw:8.0f} events/s")
    print(f"  ratio                : {first / raw:8.2f}   (targets: >= 10000/s, ratio >= 0.5)")


if __name__ == "__main__":
    asyncio.run(main())
