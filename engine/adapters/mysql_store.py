"""MySQL / MariaDB projection of the EVENTS stream (asyncmy). Idempotent by event id."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncmy
import structlog

from engine.config import MysqlTarget
from engine.domain.events import Event, PositionClosed, PositionOpened, SignalDead, SignalDecided

log = structlog.get_logger(__name__)
MIGRATION_FILE = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


def migrations_dir() -> Path:
    configured = os.environ.get("MIGRATIONS_DIR")
    return Path(configured) if configured else Path(__file__).resolve().parents[2] / "migrations"


def _utc(value: datetime) -> datetime:
    """MySQL DATETIME has no zone: we store naive UTC."""
    return value.astimezone(UTC).replace(tzinfo=None)


def _statements(sql: str) -> list[str]:
    body = "\n".join(line for line in sql.splitlines() if not line.strip().startswith("--"))
    return [part.strip() for part in body.split(";") if part.strip()]


async def ensure_database(target: MysqlTarget) -> None:
    conn = await asyncmy.connect(
        host=target.host, port=target.port, user=target.user, password=target.password
    )
    try:
        async with conn.cursor() as cur:
            await cur.execute(
                f"CREATE DATABASE IF NOT EXISTS `{target.database}` "
                "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
            )
    finally:
        conn.close()


class MysqlStore:
    def __init__(self, pool: Any, target: MysqlTarget) -> None:
        self.pool = pool
        self.target = target

    @classmethod
    async def open(cls, target: MysqlTarget, create_database: bool = True) -> MysqlStore:
        if create_database:
            await ensure_database(target)
        pool = await asyncmy.create_pool(
            host=target.host,
            port=target.port,
            user=target.user,
            password=target.password,
            db=target.database,
            autocommit=False,
            minsize=1,
            maxsize=4,
            init_command="SET time_zone = '+00:00'",
        )
        return cls(pool, target)

    async def close(self) -> None:
        self.pool.close()
        await self.pool.wait_closed()

    async def ping(self) -> bool:
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("SELECT 1")
            return (await cur.fetchone()) is not None

    async def migrate(self, directory: Path | None = None) -> list[str]:
        """Apply the ordered SQL files not yet applied; returns the versions applied now."""
        directory = directory or migrations_dir()
        applied_now: list[str] = []
        async with self.pool.acquire() as conn:
            async with conn.cursor() as cur:
                await cur.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version VARCHAR(64) NOT NULL PRIMARY KEY, applied_at DATETIME(6) NOT NULL)"
                )
                await cur.execute("SELECT version FROM schema_migrations")
                done = {row[0] for row in await cur.fetchall()}
            for path in sorted(directory.glob("*.sql")):
                if not MIGRATION_FILE.match(path.name) or path.stem in done:
                    continue
                async with conn.cursor() as cur:
                    for statement in _statements(path.read_text()):
                        await cur.execute(statement)
                    await cur.execute(
                        "INSERT INTO schema_migrations (version, applied_at) VALUES (%s, %s)",
                        (path.stem, _utc(datetime.now(UTC))),
                    )
                await conn.commit()
                applied_now.append(path.stem)
                log.info("mysql.migrated", version=path.stem)
        return applied_now

    async def write(self, events: Sequence[tuple[Event, int | None]]) -> int:
        """Apply a batch in one transaction; returns how many events were new."""
        new = 0
        async with self.pool.acquire() as conn:
            try:
                async with conn.cursor() as cur:
                    for event, stream_seq in events:
                        await cur.execute(
                            "INSERT IGNORE INTO processed_events (event_id, event_type, stream_seq, processed_at)"
                            " VALUES (%s, %s, %s, %s)",
                            (event.event_id, event.type, stream_seq, _utc(datetime.now(UTC))),
                        )
                        if cur.rowcount == 0:
                            continue  # already projected: a replay changes nothing
                        new += 1
                        await _PROJECTORS[event.type](cur, event)
                await conn.commit()
            except BaseException:
                await conn.rollback()
                raise
        return new


async def _decided(cur: Any, e: SignalDecided) -> None:
    await cur.execute(
        "INSERT INTO signal_decisions (event_id, signal_id, strategy_id, symbol, action, outcome,"
        " reason_code, reason, confidence, strategy_position_ids, decided_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            e.event_id, e.signal_id, e.strategy_id, e.symbol, e.action.value, e.outcome.value,
            e.reason_code, e.reason[:1024], e.confidence, json.dumps(e.strategy_position_ids),
            _utc(e.occurred_at),
        ),
    )  # fmt: skip


async def _opened(cur: Any, e: PositionOpened) -> None:
    ep = e.exchange_position
    at = _utc(e.occurred_at)
    await cur.execute(
        "INSERT INTO exchange_positions (exchange_position_id, position_key, symbol, position_side, status,"
        " quantity, max_quantity, avg_entry_price, contributions, total_fees, opened_at, updated_at)"
        " VALUES (%s, %s, %s, %s, 'open', %s, %s, %s, 1, %s, %s, %s)"
        " ON DUPLICATE KEY UPDATE status = 'open', quantity = VALUES(quantity),"
        " max_quantity = GREATEST(max_quantity, VALUES(quantity)), avg_entry_price = VALUES(avg_entry_price),"
        " contributions = contributions + 1, total_fees = total_fees + VALUES(total_fees),"
        " closed_at = NULL, updated_at = VALUES(updated_at)",
        (
            ep.exchange_position_id, ep.key, e.symbol, e.side.value, ep.quantity_after, ep.quantity_after,
            ep.avg_entry_price, e.fee, at, at,
        ),
    )  # fmt: skip
    await cur.execute(
        "INSERT INTO strategy_positions (strategy_position_id, strategy_id, signal_id, symbol, position_side,"
        " exchange_position_id, status, entry_price, quantity, remaining_quantity, take_profit_price,"
        " stop_loss_price, confidence, entry_fee, client_order_id, exchange_order_id, timeframe, metadata,"
        " opened_at) VALUES (%s, %s, %s, %s, %s, %s, 'open', %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            e.strategy_position_id, e.strategy_id, e.signal_id, e.symbol, e.side.value,
            ep.exchange_position_id, e.entry_price, e.quantity, e.quantity, e.take_profit_price,
            e.stop_loss_price, e.confidence, e.fee, e.client_order_id, e.exchange_order_id, e.timeframe,
            json.dumps(e.metadata, default=str) if e.metadata is not None else None, at,
        ),
    )  # fmt: skip
    await cur.execute(
        "INSERT INTO position_contributions (contribution_id, exchange_position_id, strategy_position_id,"
        " strategy_id, symbol, position_side, sequence, quantity, entry_price, quantity_before,"
        " quantity_after, avg_entry_price_after, created_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            e.contribution.contribution_id, ep.exchange_position_id, e.strategy_position_id, e.strategy_id,
            e.symbol, e.side.value, e.contribution.sequence, e.quantity, e.entry_price, ep.quantity_before,
            ep.quantity_after, ep.avg_entry_price, at,
        ),
    )  # fmt: skip


async def _closed(cur: Any, e: PositionClosed) -> None:
    ep = e.exchange_position
    at = _utc(e.occurred_at)
    await cur.execute(
        "INSERT INTO position_closes (event_id, strategy_position_id, strategy_id, exchange_position_id, symbol,"
        " position_side, closed_quantity, remaining_quantity, entry_price, exit_price, gross_pnl,"
        " entry_fee_share, exit_fee, fee, realized_pnl, close_reason, client_order_id, exchange_order_id,"
        " signal_id, closed_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,"
        " %s, %s, %s)",
        (
            e.event_id, e.strategy_position_id, e.strategy_id, ep.exchange_position_id, e.symbol,
            e.side.value, e.closed_quantity, e.remaining_quantity, e.entry_price, e.exit_price, e.gross_pnl,
            e.entry_fee_share, e.exit_fee, e.fee, e.realized_pnl, e.close_reason.value, e.client_order_id,
            e.exchange_order_id, e.signal_id, at,
        ),
    )  # fmt: skip
    finished = e.remaining_quantity == 0
    await cur.execute(
        "UPDATE strategy_positions SET remaining_quantity = %s, closed_quantity = closed_quantity + %s,"
        " exit_fees = exit_fees + %s, exit_notional = exit_notional + %s, gross_pnl = gross_pnl + %s,"
        " realized_pnl = realized_pnl + %s, close_reason = %s, status = %s, closed_at = %s"
        " WHERE strategy_position_id = %s",
        (
            e.remaining_quantity, e.closed_quantity, e.exit_fee, e.exit_price * e.closed_quantity,
            e.gross_pnl, e.realized_pnl, e.close_reason.value, "closed" if finished else "open",
            at if finished else None, e.strategy_position_id,
        ),
    )  # fmt: skip
    flat = ep.quantity_after == 0
    await cur.execute(
        "UPDATE exchange_positions SET quantity = %s, avg_entry_price = %s, realized_pnl = realized_pnl + %s,"
        " total_fees = total_fees + %s, status = %s, closed_at = %s, updated_at = %s"
        " WHERE exchange_position_id = %s",
        (
            ep.quantity_after, ep.avg_entry_price, e.realized_pnl, e.exit_fee, "closed" if flat else "open",
            at if flat else None, at, ep.exchange_position_id,
        ),
    )  # fmt: skip


async def _dead(cur: Any, e: SignalDead) -> None:
    await cur.execute(
        "INSERT INTO dead_letters (event_id, subject, reason_code, errors, payload, strategy_id, received_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (e.event_id, e.subject[:255], e.reason_code, json.dumps(e.errors), e.payload, e.strategy_id,
         _utc(e.received_at)),
    )  # fmt: skip


_PROJECTORS: dict[str, Any] = {
    "signal.decided": _decided,
    "position.opened": _opened,
    "position.closed": _closed,
    "signal.dead": _dead,
}
