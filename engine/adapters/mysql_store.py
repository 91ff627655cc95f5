"""MySQL / MariaDB projection of the EVENTS stream (asyncmy): connections, migrations, and the
writer that stores a batch's statements once. Idempotent by event id. The statements come from
`mysql_projection` (which rows) and `mysql_sql` (their text)."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncmy
import asyncmy.errors
import structlog

from engine.adapters.mysql_projection import ProjectedBatch, first_of_each, project
from engine.adapters.mysql_sql import MultiRowInsert, SqlLiterals, no_backslash_escapes, utc_naive
from engine.config import MysqlTarget
from engine.domain.events import (
    Event,
    PositionClosed,
    PositionOpened,
    encode_event,
)
from engine.domain.model import CloseReason
from engine.domain.pnl import pnl_percent
from engine.domain.signals import safe_text

log = structlog.get_logger(__name__)


MIGRATION_FILE = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


# table exists, duplicate column, duplicate key name, duplicate foreign key
ALREADY_DONE_ERRORS = {1050, 1060, 1061, 1826}


def migrations_dir() -> Path:
    """MIGRATIONS_DIR, else the package's own (a link to migrations/ in the repository, the
    files themselves in an installed wheel)."""
    configured = os.environ.get("MIGRATIONS_DIR")
    return Path(configured) if configured else Path(__file__).resolve().parents[1] / "migrations"


def _statements(sql: str) -> list[str]:
    body = "\n".join(line for line in sql.splitlines() if not line.strip().startswith("--"))
    return [part.strip() for part in body.split(";") if part.strip()]


async def ensure_database(target: MysqlTarget, connect_timeout: float = 5.0) -> None:
    conn = await asyncmy.connect(
        host=target.host,
        port=target.port,
        user=target.user,
        password=target.password,
        connect_timeout=connect_timeout,
        read_timeout=30.0,
        ssl=target.ssl_context(),
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
        self.no_backslash_escapes = False  # the server's quoting mode, as last seen

    @classmethod
    async def open(
        cls,
        target: MysqlTarget,
        create_database: bool = True,
        connect_timeout: float = 5.0,
        read_timeout: float | None = 60.0,
        connections: int = 4,
    ) -> MysqlStore:
        """A pool of up to `connections` whose connections give up on a silent server:
        `connect_timeout` to connect, `read_timeout` for each answer (a half-open connection
        otherwise waits for ever)."""
        if create_database:
            await ensure_database(target, connect_timeout)
        pool = await asyncmy.create_pool(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            host=target.host,
            port=target.port,
            user=target.user,
            password=target.password,
            db=target.database,
            autocommit=False,
            minsize=1,
            maxsize=connections,
            init_command="SET time_zone = '+00:00'",
            ssl=target.ssl_context(),
        )
        return cls(pool, target)

    async def close(self) -> None:
        self.pool.close()
        await self.pool.wait_closed()

    async def ping(self) -> bool:
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("SELECT 1")
            return (await cur.fetchone()) is not None

    async def check_migrated(self, directory: Path | None = None) -> None:
        """Without DDL rights: stop with one clear line unless every migration is applied."""
        wanted = sorted(p.stem for p in (directory or migrations_dir()).glob("*.sql"))
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            try:
                await cur.execute("SELECT version FROM schema_migrations")
                done = {row[0] for row in await cur.fetchall()}
            except Exception:
                done = set()
        missing = [version for version in wanted if version not in done]
        if missing:
            raise RuntimeError(
                f"database {self.target.database} lacks migrations {', '.join(missing)}: run `tradeengine migrate`"
                " as its owner (MIGRATE_ON_START=false here)"
            )

    async def migrate(
        self, directory: Path | None = None, progress: Callable[[str, int, int], None] | None = None
    ) -> list[str]:
        """Apply the ordered SQL files not yet applied; returns the versions applied now.

        MySQL commits every DDL statement on its own, so a file can stop half-way (a lost
        connection, a kill). Each statement done is recorded, and a rerun resumes after the
        last one recorded. A named lock keeps two starting processes from migrating at once."""
        directory = directory or migrations_dir()
        applied_now: list[str] = []
        async with self.pool.acquire() as conn:
            async with conn.cursor() as cur:
                await cur.execute("SELECT GET_LOCK('tradeengine_migrate', 120)")
                (locked,) = await cur.fetchone()
            if locked != 1:
                raise RuntimeError("another process has been migrating this database for 120 s; try again")
            try:
                async with conn.cursor() as cur:
                    await cur.execute(
                        "CREATE TABLE IF NOT EXISTS schema_migrations ("
                        " version VARCHAR(64) NOT NULL PRIMARY KEY, applied_at DATETIME(6) NOT NULL)"
                    )
                    await cur.execute(
                        "CREATE TABLE IF NOT EXISTS schema_migration_steps ("
                        " version VARCHAR(64) NOT NULL, step INT NOT NULL, PRIMARY KEY (version, step))"
                    )
                    await cur.execute("SELECT version FROM schema_migrations")
                    done = {row[0] for row in await cur.fetchall()}
                await conn.commit()
                todo = [
                    path
                    for path in sorted(directory.glob("*.sql"))
                    if MIGRATION_FILE.match(path.name) and path.stem not in done
                ]
                for n, path in enumerate(todo):
                    if progress is not None:
                        progress(path.stem, n, len(todo))
                    await self._apply_file(conn, path)
                    applied_now.append(path.stem)
                    log.info("mysql.migrated", version=path.stem)
            finally:
                async with conn.cursor() as cur:
                    await cur.execute("SELECT RELEASE_LOCK('tradeengine_migrate')")
        return applied_now

    @staticmethod
    async def _apply_file(conn: Any, path: Path) -> None:
        async with conn.cursor() as cur:
            await cur.execute("SELECT step FROM schema_migration_steps WHERE version = %s", (path.stem,))
            steps_done = {row[0] for row in await cur.fetchall()}
            if steps_done:
                log.warning("mysql.migration_resumed", version=path.stem, steps_done=len(steps_done))
            text = await asyncio.to_thread(path.read_text)
            # The first statement this run executes may have been applied by a run killed
            # before it could record it (even the file's very first statement).
            resuming = True
            for step, statement in enumerate(_statements(text)):
                if step in steps_done:
                    continue
                try:
                    await cur.execute(statement)
                except asyncmy.errors.OperationalError as exc:
                    # A kill can land between a DDL statement (committed on its own) and the
                    # record of it.
                    if not (resuming and exc.args and exc.args[0] in ALREADY_DONE_ERRORS):
                        raise
                    log.warning("mysql.migration_step_already_applied", version=path.stem, step=step)
                resuming = False
                await cur.execute(
                    "INSERT INTO schema_migration_steps (version, step) VALUES (%s, %s)", (path.stem, step)
                )
                await conn.commit()
            await cur.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (%s, %s)",
                (path.stem, utc_naive(datetime.now(UTC))),
            )
        await conn.commit()

    async def quarantine(self, event: Event, stream_seq: int | None, error: str) -> None:
        await self._quarantine_row(
            event.event_id[:64], event.type, stream_seq, error, encode_event(event).decode()
        )

    async def quarantine_raw(self, subject: str, data: bytes, stream_seq: int, error: str) -> None:
        """A message on an event subject that is no event of ours: kept as it came, by stream
        sequence (its id cannot be trusted, or read)."""
        text = data[: 4 * 1024 * 1024].decode("utf-8", errors="replace")
        await self._quarantine_row(
            f"seq-{stream_seq}", "undecodable", stream_seq, f"{subject}: {error}", text
        )

    async def _quarantine_row(
        self, event_id: str, event_type: str, stream_seq: int | None, error: str, payload: str
    ) -> None:
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                "INSERT IGNORE INTO quarantined_events"
                " (event_id, event_type, stream_seq, error, payload, quarantined_at)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (
                    event_id,
                    event_type[:32],
                    stream_seq,
                    safe_text(error, 4000),
                    safe_text(payload, 16 * 1024 * 1024),
                    utc_naive(datetime.now(UTC)),
                ),
            )
            await conn.commit()

    async def write(
        self, events: Sequence[tuple[Event, int | None]], projected: ProjectedBatch | None = None
    ) -> int:
        """Project a batch in one transaction; returns how many events were new.

        Idempotent: events already in processed_events (or repeated in the batch) are skipped.
        One multi-row statement per table instead of one per event: the running totals of
        strategy and exchange positions are folded per row in Python, in event order, and
        applied with INSERT ... ON DUPLICATE KEY UPDATE.

        `projected` is these events rendered beforehand (`project`), e.g. while the previous
        batch was being written, in the quoting mode the server had then. Their event ids are
        claimed first, stamped with the time of writing; when every one of them is new (the
        usual case) the rest follows, with no dedupe query. Otherwise (or if the server's
        quoting mode changed since) the batch is checked and rendered again."""
        if not events:
            return 0
        async with self.pool.acquire() as conn:
            try:
                async with conn.cursor() as cur:
                    quoting = self.no_backslash_escapes = no_backslash_escapes(conn)
                    if projected is not None and projected.no_backslash_escapes != quoting:
                        projected = None  # rendered for the other mode: its escaping is wrong here
                    if projected is not None and await _claim(cur, projected) != len(projected.events):
                        await conn.rollback()  # some were stored before: the careful way
                        projected = None
                    if projected is None:
                        projected = project(await _unseen(cur, events), quoting)
                        claimed = await _claim(cur, projected)
                        if claimed != len(projected.events):
                            if len(projected.events) == 1:
                                # Stored already, by MySQL's own comparison of ids (which
                                # ignores case), or by another writer since the check.
                                await conn.rollback()
                                return 0
                            # Which ones is not known: the caller writes the batch in parts.
                            raise ConcurrentWrite(
                                f"{len(projected.events) - claimed} of the batch's events were stored"
                                " meanwhile, or match stored ids only as MySQL compares them"
                            )
                    for statement in projected.statements:
                        await cur.execute(statement)  # no args: asyncmy leaves the text as it is
                    if projected.opened or projected.closed:
                        stats = await _fold_strategy_stats(cur, projected.opened, projected.closed)
                        await _UPSERT_STRATEGY_STATS.run(cur, stats)
                await conn.commit()
            except BaseException:
                await conn.rollback()
                raise
        return len(projected.events)

    async def quoting(self) -> bool:
        """Whether the server's sql_mode has NO_BACKSLASH_ESCAPES (see `project`). `write` keeps
        `no_backslash_escapes` up to date with what each transaction saw."""
        async with self.pool.acquire() as conn:
            self.no_backslash_escapes = no_backslash_escapes(conn)
        return self.no_backslash_escapes


class ConcurrentWrite(Exception):
    """Some of a batch's events turned out to be stored while it was being written: by another
    writer, or under ids MySQL holds equal (its collation ignores case). Written in parts, one
    event at a time at the end, each is then either written or found stored."""


async def _claim(cur: Any, projected: ProjectedBatch) -> int:
    """Insert the batch's processed_events rows; returns how many were new."""
    now = utc_naive(datetime.now(UTC))
    rows = [(e.event_id, e.type, seq, now) for e, seq in projected.events]
    claimed = 0
    for statement in _CLAIM_PROCESSED.statements(SqlLiterals(projected.no_backslash_escapes), rows):
        claimed += await cur.execute(statement)
    return claimed


async def _unseen(cur: Any, events: Sequence[tuple[Event, int | None]]) -> list[tuple[Event, int | None]]:
    ids = list(dict.fromkeys(e.event_id for e, _ in events))
    in_list = SqlLiterals(no_backslash_escapes(cur.connection)).row(ids)
    await cur.execute(f"SELECT event_id FROM processed_events WHERE event_id IN {in_list}")  # nosec B608  # ids rendered by SqlLiterals (asyncmy escaping, tested)
    return first_of_each(events, seen={row[0] for row in await cur.fetchall()})


# A row that exists already is left as it is and not counted: the count says how many are new.
_CLAIM_PROCESSED = MultiRowInsert.of(
    "INSERT INTO processed_events (event_id, event_type, stream_seq, processed_at) VALUES (%s, %s, %s, %s)"
    " ON DUPLICATE KEY UPDATE event_id = event_id"
)


_DB_QUANTUM = Decimal("1e-18")


_UPSERT_STRATEGY_STATS = MultiRowInsert.of(
    "INSERT INTO strategy_stats (strategy_id, total_positions, open_positions, closed_positions, tp_hits, sl_hits,"
    " winning_trades, losing_trades, total_pnl, total_fees, winning_pnl, losing_pnl, sum_trade_pnl_pct,"
    " sum_trade_seconds) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON DUPLICATE KEY UPDATE total_positions = total_positions + VALUES(total_positions),"
    " open_positions = open_positions + VALUES(open_positions),"
    " closed_positions = closed_positions + VALUES(closed_positions), tp_hits = tp_hits + VALUES(tp_hits),"
    " sl_hits = sl_hits + VALUES(sl_hits), winning_trades = winning_trades + VALUES(winning_trades),"
    " losing_trades = losing_trades + VALUES(losing_trades), total_pnl = total_pnl + VALUES(total_pnl),"
    " total_fees = total_fees + VALUES(total_fees), winning_pnl = winning_pnl + VALUES(winning_pnl),"
    " losing_pnl = losing_pnl + VALUES(losing_pnl),"
    " sum_trade_pnl_pct = sum_trade_pnl_pct + VALUES(sum_trade_pnl_pct),"
    " sum_trade_seconds = sum_trade_seconds + VALUES(sum_trade_seconds)"
)


async def _fold_strategy_stats(
    cur: Any, opened: list[PositionOpened], closed: list[PositionClosed]
) -> list[tuple[Any, ...]]:
    """Per-strategy deltas of this batch. A trade's totals are read back from strategy_positions,
    which this transaction has already brought up to date (its earlier closes included)."""
    zero = Decimal(0)
    stats: dict[str, list[Any]] = {}

    def row(strategy_id: str) -> list[Any]:
        return stats.setdefault(
            strategy_id, [strategy_id, 0, 0, 0, 0, 0, 0, 0, zero, zero, zero, zero, zero, zero]
        )

    for o in opened:
        r = row(o.strategy_id)
        r[1] += 1
        r[2] += 1
        r[9] += o.fee
    finals = {}
    for c in closed:
        r = row(c.strategy_id)
        r[8] += c.realized_pnl
        r[9] += c.exit_fee
        if c.remaining_quantity == 0:
            finals[c.strategy_position_id] = c
    if finals:
        marks = ", ".join(["%s"] * len(finals))
        await cur.execute(
            "SELECT strategy_position_id, realized_pnl, entry_price, quantity,"  # nosec B608  # only %s placeholders are joined
            " TIMESTAMPDIFF(MICROSECOND, opened_at, closed_at) / 1000000"
            f" FROM strategy_positions WHERE strategy_position_id IN ({marks})",
            list(finals),
        )
        for position_id, pnl, entry_price, quantity, seconds in await cur.fetchall():
            final = finals[position_id]
            r = row(final.strategy_id)
            r[2] -= 1
            r[3] += 1
            r[4] += final.close_reason is CloseReason.TAKE_PROFIT
            r[5] += final.close_reason is CloseReason.STOP_LOSS
            r[6] += pnl > 0
            r[7] += pnl < 0
            r[10] += pnl if pnl > 0 else zero
            r[11] += pnl if pnl < 0 else zero
            # A close whose open was quarantined has no entry notional: no percentage, no error.
            r[12] += pnl_percent(pnl, entry_price, quantity).quantize(_DB_QUANTUM)  # DECIMAL(36,18)
            r[13] += seconds or zero
    # In one order: consumers writing side by side (ATTRIBUTION_PARTITIONS) lock these rows alike.
    return [tuple(r) for r in sorted(stats.values(), key=lambda r: str(r[0]))]
