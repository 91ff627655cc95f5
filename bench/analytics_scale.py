"""strategy_performance over 1,000,000 strategy positions on the local MariaDB (target < 1 s).

Rows are generated straight into a scratch database (not through events: this measures the
view and its indexes). Also times the other per-strategy views on the same data.

    python -m bench.analytics_scale [--positions N]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import asyncmy

from bench.common import machine, median
from engine.adapters.mysql_store import MysqlStore, migrations_dir
from engine.config import MysqlTarget

CHUNK = 100_000
# Generated on the server (a recursive CTE works on MySQL 8 and MariaDB), with ascending ids:
# a Python client inserting a million rows measures the client, not the view.
GENERATE = """
INSERT INTO strategy_positions (strategy_position_id, strategy_id, signal_id, symbol, position_side,
    exchange_position_id, status, entry_price, quantity, remaining_quantity, confidence, entry_fee, exit_fees,
    realized_pnl, close_reason, client_order_id, exchange_order_id, opened_at, closed_at)
WITH RECURSIVE seq (n) AS (SELECT %(start)s UNION ALL SELECT n + 1 FROM seq WHERE n < %(stop)s)
SELECT LPAD(n, 36, '0'), CONCAT('strategy_', n MOD 20), CONCAT('s', n), IF(n MOD 3 = 0, 'BTCUSDT', 'ETHUSDT'),
    IF(n MOD 2 = 0, 'LONG', 'SHORT'), 'ep', IF(n MOD 10 = 0, 'open', 'closed'), 1000 + n MOD 4000, 0.1,
    IF(n MOD 10 = 0, 0.1, 0), 0.8, 0.2, IF(n MOD 10 = 0, 0, 0.2),
    IF(n MOD 10 = 0, 0, ((n * 7919) MOD 11001 - 5000) / 100),
    IF(n MOD 10 = 0, NULL, ELT(1 + n MOD 4, 'take_profit', 'stop_loss', 'signal', 'reversed')), 'c', 'x',
    TIMESTAMP('2026-01-01') + INTERVAL n * 30 SECOND,
    IF(n MOD 10 = 0, NULL, TIMESTAMP('2026-01-01') + INTERVAL n * 30 SECOND + INTERVAL 1 + n MOD 600 MINUTE)
FROM seq
"""


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--positions", type=int, default=1_000_000)
    args = parser.parse_args()
    name = f"te_scale_{uuid.uuid4().hex[:8]}"
    target = MysqlTarget.parse(f"mysql://root@127.0.0.1:3306/{name}")
    store = await MysqlStore.open(target)
    # Rows go in before the summary migration, whose backfill then builds strategy_stats from them,
    # as it would on a database that predates it.
    with tempfile.TemporaryDirectory() as early:
        for path in sorted(migrations_dir().glob("*.sql")):
            if path.name < "004":
                shutil.copy(path, early)
        await store.migrate(Path(early))
    conn = await asyncmy.connect(host="127.0.0.1", user="root", password="", database=name)
    try:
        started = time.perf_counter()
        async with conn.cursor() as cur:
            await cur.execute("SET SESSION max_recursive_iterations = 10000000")  # MariaDB
            for offset in range(0, args.positions, CHUNK):
                stop = min(offset + CHUNK, args.positions) - 1
                await cur.execute(GENERATE, {"start": offset, "stop": stop})
                await conn.commit()
            await cur.execute("ANALYZE TABLE strategy_positions")
            await cur.fetchall()
        load = time.perf_counter() - started
        started = time.perf_counter()
        await store.migrate()
        backfill = time.perf_counter() - started
        await store.close()
        print(f"# analytics at scale: {args.positions:,} strategy positions (20 strategies) — {machine()}")
        print(f"  generated and loaded in {load:.0f} s; strategy_stats backfilled in {backfill:.1f} s")
        for view, runs in (
            ("strategy_performance", 5),
            ("strategy_symbol_side_performance", 1),
            ("strategy_fees", 1),
        ):
            timings = []
            async with conn.cursor() as cur:
                for _ in range(runs):
                    t = time.perf_counter()
                    await cur.execute(f"SELECT * FROM {view}")
                    await cur.fetchall()
                    timings.append(time.perf_counter() - t)
            print(f"  {view:<34} median {median(timings) * 1000:7.0f} ms of {runs}"
                  + ("   (target < 1000 ms)" if view == "strategy_performance" else ""))  # fmt: skip
    finally:
        async with conn.cursor() as cur:
            await cur.execute(f"DROP DATABASE `{name}`")
        conn.close()


if __name__ == "__main__":
    asyncio.run(main())
