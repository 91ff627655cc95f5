"""MySQL / MariaDB projection of the EVENTS stream (asyncmy). Idempotent by event id."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import asyncmy
import asyncmy.errors
import structlog
from asyncmy.constants.SERVER_STATUS import SERVER_STATUS_NO_BACKSLASH_ESCAPES
from asyncmy.converters import escape_bytes_prefixed, escape_item, escape_string

from engine.config import MysqlTarget
from engine.domain.events import (
    ControlApplied,
    Event,
    PositionClosed,
    PositionFunding,
    PositionOpened,
    SignalDead,
    SignalDecided,
    encode_event,
)
from engine.domain.model import ZERO, CloseReason, decimal_text
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


def _utc(value: datetime) -> datetime:
    """MySQL DATETIME has no zone: we store naive UTC."""
    return value.astimezone(UTC).replace(tzinfo=None)


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
    ) -> MysqlStore:
        """A pool whose connections give up on a silent server: `connect_timeout` to connect,
        `read_timeout` for each answer (a half-open connection otherwise waits for ever)."""
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
            maxsize=4,
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

    async def migrate(self, directory: Path | None = None) -> list[str]:
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
                for path in sorted(directory.glob("*.sql")):
                    if not MIGRATION_FILE.match(path.name) or path.stem in done:
                        continue
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
                (path.stem, _utc(datetime.now(UTC))),
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
                    _utc(datetime.now(UTC)),
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
    now = _utc(datetime.now(UTC))
    rows = [(e.event_id, e.type, seq, now) for e, seq in projected.events]
    claimed = 0
    for statement in _CLAIM_PROCESSED.statements(SqlLiterals(projected.no_backslash_escapes), rows):
        claimed += await cur.execute(statement)
    return claimed


def no_backslash_escapes(conn: Any) -> bool:
    return bool(conn.server_status & SERVER_STATUS_NO_BACKSLASH_ESCAPES)


class SqlLiterals:
    """Values written as SQL literals exactly as asyncmy's `Connection.literal` writes them (a
    test compares the two), at under half the cost: asyncmy's per-value dispatch was a third of
    the attribution consumer's CPU (bench/RESULTS.md). Strings still go through asyncmy's own
    escaping, in the connection's quoting mode; a type not listed here goes to asyncmy."""

    # A statement must fit in the server's max_allowed_packet (1 MiB on the oldest servers, which
    # asyncmy also assumes): at most 4 bytes a character in UTF-8, 250,000 characters always fit.
    MAX_STATEMENT_CHARS = 250_000

    def __init__(self, no_backslash_escapes: bool) -> None:
        self._escape: Callable[[str], str] = _double_quotes if no_backslash_escapes else escape_string
        self._datetimes: dict[datetime, str] = {}
        self._by_type: dict[type[Any], Callable[[Any], str]] = {
            str: self._string,
            Decimal: decimal_text,  # exponent notation would be read as a DOUBLE
            int: str,
            bool: _bool_literal,
            type(None): _null_literal,
            datetime: self._datetime,
        }

    def _string(self, value: str) -> str:
        return "'" + self._escape(value) + "'"

    def _datetime(self, value: datetime) -> str:
        # isoformat costs more than all of a row's other values; a batch's rows share a few times.
        found = self._datetimes.get(value)
        if found is None:
            if value.tzinfo is not None:
                return self._other(value)
            found = self._datetimes[value] = "'" + value.isoformat(" ") + "'"
        return found

    def _other(self, value: Any) -> str:
        """Types without a fast path, as asyncmy's `Connection.literal` writes them."""
        if isinstance(value, str):  # str subclasses, StrEnum members: their text, quoted
            return self._string(value)
        if isinstance(value, bytes | bytearray):
            return escape_bytes_prefixed(bytes(value))
        return str(escape_item(value, "utf8mb4"))

    def literal(self, value: Any) -> str:
        return (self._by_type.get(type(value)) or self._other)(value)

    def row(self, values: Sequence[Any]) -> str:
        by_type, other = self._by_type, self._other
        return "(" + ",".join([(by_type.get(type(v)) or other)(v) for v in values]) + ")"

    def statements(self, head: str, rows: Iterable[Sequence[Any]], tail: str = "") -> list[str]:
        """`head` + the rows' VALUES lists + `tail`, in as few statements as the size cap allows."""
        return finish(self.statement_steps(head, rows, tail))

    def statement_steps(
        self, head: str, rows: Iterable[Sequence[Any]], tail: str = ""
    ) -> Generator[None, None, list[str]]:
        """`statements`, pausing every PAUSE_EVERY rows (see `project_cooperatively`)."""
        statements: list[str] = []
        parts: list[str] = []
        size = 0
        for n, values in enumerate(rows, 1):
            text = self.row(values)
            if parts and size + len(text) > self.MAX_STATEMENT_CHARS:
                statements.append(head + ",".join(parts) + tail)
                parts, size = [], 0
            parts.append(text)
            size += len(text) + 1
            if n % PAUSE_EVERY == 0:
                yield
        if parts:
            statements.append(head + ",".join(parts) + tail)
        return statements


PAUSE_EVERY = 128  # rows: about a millisecond of rendering
T = TypeVar("T")


def finish(steps: Generator[None, None, T]) -> T:
    """Run a stepped computation to its end, without pausing."""
    try:
        while True:
            next(steps)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def finish_cooperatively(steps: Generator[None, None, T]) -> T:
    """Run a stepped computation to its end, giving the event loop a turn at each step."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        await asyncio.sleep(0)


def _double_quotes(value: str) -> str:
    return value.replace("'", "''")  # what asyncmy does in this mode


def _bool_literal(value: bool) -> str:
    return "1" if value else "0"


def _null_literal(_: None) -> str:
    return "NULL"


_INSERT_PARTS = re.compile(r"^(.*?\bVALUES\s*)\((?:\s*%s\s*,)*\s*%s\s*\)(.*)$", re.S)


@dataclass(frozen=True, slots=True)
class MultiRowInsert:
    """An INSERT written with one `VALUES (%s, ...)` row, sent as one statement for many rows."""

    head: str
    tail: str

    @classmethod
    def of(cls, sql: str) -> MultiRowInsert:
        match = _INSERT_PARTS.match(sql)
        if match is None:
            raise ValueError(f"not a single-row INSERT with placeholders only: {sql[:80]!r}")
        return cls(match.group(1), match.group(2))

    def statements(self, literals: SqlLiterals, rows: Iterable[Sequence[Any]]) -> list[str]:
        return literals.statements(self.head, rows, self.tail)

    def statement_steps(
        self, literals: SqlLiterals, rows: Iterable[Sequence[Any]]
    ) -> Generator[None, None, list[str]]:
        return literals.statement_steps(self.head, rows, self.tail)

    async def run(self, cur: Any, rows: Sequence[Sequence[Any]]) -> None:
        for statement in self.statements(SqlLiterals(no_backslash_escapes(cur.connection)), rows):
            await cur.execute(statement)  # no args: asyncmy leaves the text as it is


async def _unseen(cur: Any, events: Sequence[tuple[Event, int | None]]) -> list[tuple[Event, int | None]]:
    ids = list(dict.fromkeys(e.event_id for e, _ in events))
    in_list = SqlLiterals(no_backslash_escapes(cur.connection)).row(ids)
    await cur.execute(f"SELECT event_id FROM processed_events WHERE event_id IN {in_list}")  # nosec B608  # ids rendered by SqlLiterals (asyncmy escaping, tested)
    return _first_of_each(events, seen={row[0] for row in await cur.fetchall()})


def _first_of_each(
    events: Sequence[tuple[Event, int | None]], seen: set[str]
) -> list[tuple[Event, int | None]]:
    """The events whose id is not in `seen`, each id once (the first delivery of it)."""
    fresh: list[tuple[Event, int | None]] = []
    for event, seq in events:
        if event.event_id not in seen:
            seen.add(event.event_id)
            fresh.append((event, seq))
    return fresh


@dataclass(frozen=True, slots=True)
class ProjectedBatch:
    """A batch's statements, rendered without a connection: all but strategy_stats, whose
    deltas read the positions back after this batch's statements have run."""

    events: list[tuple[Event, int | None]]  # their processed_events rows are rendered when written
    statements: list[str]
    opened: list[PositionOpened]
    closed: list[PositionClosed]
    no_backslash_escapes: bool


def project(events: Sequence[tuple[Event, int | None]], no_backslash_escapes: bool) -> ProjectedBatch:
    """The statements writing `events` (repeats within the batch dropped), as if none of them
    had been stored before; `MysqlStore.write` checks that they were not."""
    return finish(_projection(events, no_backslash_escapes))


async def project_cooperatively(
    events: Sequence[tuple[Event, int | None]], no_backslash_escapes: bool
) -> ProjectedBatch:
    """`project`, giving the event loop a turn about every millisecond: rendering a batch takes
    tens of milliseconds, and the writer must not wait that long to send MySQL its next
    statement."""
    return await finish_cooperatively(_projection(events, no_backslash_escapes))


def _projection(
    events: Sequence[tuple[Event, int | None]], no_backslash_escapes: bool
) -> Generator[None, None, ProjectedBatch]:
    fresh = _first_of_each(events, seen=set())
    literals = SqlLiterals(no_backslash_escapes)
    statements: list[str] = []
    decided = [e for e, _ in fresh if isinstance(e, SignalDecided)]
    opened = [e for e, _ in fresh if isinstance(e, PositionOpened)]
    closed = [e for e, _ in fresh if isinstance(e, PositionClosed)]
    dead = [e for e, _ in fresh if isinstance(e, SignalDead)]
    if decided:
        statements += yield from _INSERT_DECISION.statement_steps(literals, map(_decision_row, decided))
    if dead:
        statements += yield from _INSERT_DEAD.statement_steps(literals, map(_dead_row, dead))
    controls = [e for e, _ in fresh if isinstance(e, ControlApplied)]
    if controls:
        statements += yield from _INSERT_CONTROL.statement_steps(literals, map(_control_row, controls))
    if opened or closed:
        rows = _strategy_position_rows(opened, closed)
        yield
        statements += yield from _UPSERT_STRATEGY_POSITION.statement_steps(literals, rows)
    if opened:
        statements += yield from _INSERT_CONTRIBUTION.statement_steps(
            literals, map(_contribution_row, opened)
        )
    if closed:
        statements += yield from _INSERT_CLOSE.statement_steps(literals, map(_close_row, closed))
    funded = [e for e, _ in fresh if isinstance(e, PositionFunding)]
    if funded:
        statements += yield from _INSERT_FUNDING.statement_steps(literals, map(_funding_row, funded))
        totals: dict[str, Decimal] = {}
        for f in funded:
            totals[f.strategy_id] = totals.get(f.strategy_id, ZERO) + f.amount
        statements += yield from _ADD_STRATEGY_FUNDING.statement_steps(literals, totals.items())
    if closed:
        # The original attribution query's columns on the contribution (migration 008).
        ids = sorted({e.strategy_position_id for e in closed})
        yield
        statements.append(
            "UPDATE position_contributions c JOIN strategy_positions sp"  # nosec B608  # ids rendered by SqlLiterals (asyncmy escaping, tested)
            " ON sp.strategy_position_id = c.strategy_position_id"
            " SET c.status = sp.status, c.contribution_pnl = sp.realized_pnl,"
            " c.exit_price = IF(sp.closed_quantity > 0, sp.exit_notional / sp.closed_quantity, NULL)"
            f" WHERE c.strategy_position_id IN {literals.row(ids)}"
        )
    positional = [e for e, _ in fresh if isinstance(e, PositionOpened | PositionClosed)]
    if positional:
        statements += yield from _UPSERT_EXCHANGE_POSITION.statement_steps(
            literals, _fold_exchange_positions(positional)
        )
    return ProjectedBatch(fresh, statements, opened, closed, no_backslash_escapes)


# A row that exists already is left as it is and not counted: the count says how many are new.
_CLAIM_PROCESSED = MultiRowInsert.of(
    "INSERT INTO processed_events (event_id, event_type, stream_seq, processed_at) VALUES (%s, %s, %s, %s)"
    " ON DUPLICATE KEY UPDATE event_id = event_id"
)
_INSERT_DECISION = MultiRowInsert.of(
    "INSERT INTO signal_decisions (event_id, signal_id, strategy_id, symbol, action, outcome,"
    " reason_code, reason, confidence, strategy_position_ids, decided_at, risk_limit, risk_figure)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)


def _decision_row(e: SignalDecided) -> tuple[Any, ...]:
    return (
        e.event_id, e.signal_id, e.strategy_id, e.symbol, e.action.value, e.outcome.value, e.reason_code,
        e.reason[:1024], e.confidence, json.dumps(e.strategy_position_ids), _utc(e.occurred_at),
        e.limit, e.figure,
    )  # fmt: skip


_INSERT_CONTROL = MultiRowInsert.of(
    "INSERT INTO control_actions (event_id, command_id, command, strategy_id, symbol, outcome, cause,"
    " reason, closed_positions, halted, applied_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)


def _control_row(e: ControlApplied) -> tuple[Any, ...]:
    halted = [{"strategy_id": h.strategy_id, "symbol": h.symbol, "cause": h.cause,
               "until": h.until.isoformat() if h.until else None} for h in e.halted]  # fmt: skip
    return (
        e.event_id, e.command_id, e.command, e.strategy_id, e.symbol, e.outcome, e.cause, e.reason[:1024],
        json.dumps(e.closed_positions), json.dumps(halted), _utc(e.occurred_at),
    )  # fmt: skip


_INSERT_DEAD = MultiRowInsert.of(
    "INSERT INTO dead_letters (event_id, subject, reason_code, errors, payload, strategy_id, received_at)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s)"
)


def _dead_row(e: SignalDead) -> tuple[Any, ...]:
    return (
        e.event_id, e.subject[:255], e.reason_code, json.dumps(e.errors), e.payload,
        e.strategy_id[:64] if e.strategy_id else None,
        _utc(e.received_at),
    )  # fmt: skip


# One statement for the batch's opens and closes. A position opened in this batch is inserted
# with its closes of the batch already folded in (most positions open and close within one
# batch); one opened earlier exists, so only the UPDATE part runs, adding the batch's deltas.
_UPSERT_STRATEGY_POSITION = MultiRowInsert.of(
    "INSERT INTO strategy_positions (strategy_position_id, strategy_id, signal_id, symbol, position_side,"
    " exchange_position_id, status, entry_price, quantity, remaining_quantity, take_profit_price,"
    " stop_loss_price, confidence, entry_fee, client_order_id, exchange_order_id, timeframe, metadata,"
    " opened_at, closed_quantity, exit_fees, exit_notional, gross_pnl, realized_pnl, close_reason, closed_at)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,"
    " %s, %s, %s)"
    " ON DUPLICATE KEY UPDATE remaining_quantity = VALUES(remaining_quantity),"
    " closed_quantity = closed_quantity + VALUES(closed_quantity), exit_fees = exit_fees + VALUES(exit_fees),"
    " exit_notional = exit_notional + VALUES(exit_notional), gross_pnl = gross_pnl + VALUES(gross_pnl),"
    " realized_pnl = realized_pnl + VALUES(realized_pnl), close_reason = VALUES(close_reason),"
    " status = VALUES(status), closed_at = VALUES(closed_at)"
)


def _strategy_position_rows(
    opened: list[PositionOpened], closed: list[PositionClosed]
) -> list[tuple[Any, ...]]:
    closes = _fold_strategy_closes(closed)
    rows: list[tuple[Any, ...]] = []
    for e in opened:
        c = closes.pop(e.strategy_position_id, None) or _FoldedCloses(remaining=e.quantity)
        rows.append((
            e.strategy_position_id, e.strategy_id, e.signal_id, e.symbol, e.side.value,
            e.exchange_position.exchange_position_id, c.status, e.entry_price, e.quantity, c.remaining,
            e.take_profit_price, e.stop_loss_price, e.confidence, e.fee, e.client_order_id, e.exchange_order_id,
            e.timeframe, json.dumps(e.metadata, default=str) if e.metadata is not None else None,
            _utc(e.occurred_at), *c.deltas(),
        ))  # fmt: skip
    for position_id, c in closes.items():
        # Opened in an earlier batch: the columns before remaining_quantity's deltas only
        # fill the INSERT part, which never runs (an open precedes its closes in the stream).
        rows.append((
            position_id, "", "", "", "LONG", "", c.status, 0, 0, c.remaining, None, None, 0, 0, "", "", None,
            None, c.last_at, *c.deltas(),
        ))  # fmt: skip
    return rows


_INSERT_CONTRIBUTION = MultiRowInsert.of(
    "INSERT INTO position_contributions (contribution_id, exchange_position_id, strategy_position_id,"
    " strategy_id, symbol, position_side, sequence, quantity, entry_price, quantity_before,"
    " quantity_after, avg_entry_price_after, created_at)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)


def _contribution_row(e: PositionOpened) -> tuple[Any, ...]:
    ep = e.exchange_position
    return (
        e.contribution.contribution_id, ep.exchange_position_id, e.strategy_position_id, e.strategy_id,
        e.symbol, e.side.value, e.contribution.sequence, e.quantity, e.entry_price, ep.quantity_before,
        ep.quantity_after, ep.avg_entry_price, _utc(e.occurred_at),
    )  # fmt: skip


_INSERT_CLOSE = MultiRowInsert.of(
    "INSERT INTO position_closes (event_id, strategy_position_id, strategy_id, exchange_position_id, symbol,"
    " position_side, closed_quantity, remaining_quantity, entry_price, exit_price, exchange_quantity_after,"
    " gross_pnl, entry_fee_share, exit_fee, fee, realized_pnl, close_reason, client_order_id,"
    " exchange_order_id, signal_id, closed_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,"
    " %s, %s, %s, %s, %s, %s, %s, %s)"
)


def _close_row(e: PositionClosed) -> tuple[Any, ...]:
    return (
        e.event_id, e.strategy_position_id, e.strategy_id, e.exchange_position.exchange_position_id, e.symbol,
        e.side.value, e.closed_quantity, e.remaining_quantity, e.entry_price, e.exit_price,
        e.exchange_position.quantity_after, e.gross_pnl, e.entry_fee_share, e.exit_fee, e.fee, e.realized_pnl, e.close_reason.value, e.client_order_id,
        e.exchange_order_id, e.signal_id, _utc(e.occurred_at),
    )  # fmt: skip


@dataclass(slots=True)
class _FoldedCloses:
    """One strategy position's closes in a batch: its final state and the sums to add."""

    remaining: Decimal
    closed_quantity: Decimal = ZERO
    exit_fees: Decimal = ZERO
    exit_notional: Decimal = ZERO
    gross_pnl: Decimal = ZERO
    realized_pnl: Decimal = ZERO
    close_reason: str | None = None
    last_at: datetime | None = None

    @property
    def status(self) -> str:
        return "closed" if self.remaining == 0 else "open"

    def deltas(self) -> tuple[Any, ...]:
        closed_at = self.last_at if self.remaining == 0 else None
        return (
            self.closed_quantity, self.exit_fees, self.exit_notional, self.gross_pnl, self.realized_pnl,
            self.close_reason, closed_at,
        )  # fmt: skip


def _fold_strategy_closes(closed: list[PositionClosed]) -> dict[str, _FoldedCloses]:
    folded: dict[str, _FoldedCloses] = {}
    for e in closed:
        c = folded.get(e.strategy_position_id)
        if c is None:
            c = folded[e.strategy_position_id] = _FoldedCloses(remaining=e.remaining_quantity)
        c.remaining = e.remaining_quantity
        c.closed_quantity += e.closed_quantity
        c.exit_fees += e.exit_fee
        c.exit_notional += e.exit_price * e.closed_quantity
        c.gross_pnl += e.gross_pnl
        c.realized_pnl += e.realized_pnl
        c.close_reason = e.close_reason.value
        c.last_at = _utc(e.occurred_at)
    return folded


_INSERT_FUNDING = MultiRowInsert.of(
    "INSERT INTO funding_payments (event_id, strategy_position_id, strategy_id, symbol, position_side,"
    " exchange_position_id, amount, rate, mark_price, funding_time, venue_ref, recorded_at)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
_ADD_STRATEGY_FUNDING = MultiRowInsert.of(
    "INSERT INTO strategy_stats (strategy_id, total_funding) VALUES (%s, %s)"
    " ON DUPLICATE KEY UPDATE total_funding = total_funding + VALUES(total_funding)"
)


def _funding_row(e: PositionFunding) -> tuple[Any, ...]:
    return (
        e.event_id, e.strategy_position_id, e.strategy_id, e.symbol, e.side.value, e.exchange_position_id,
        e.amount, e.rate, e.mark_price, _utc(e.funding_time), e.venue_ref[:128], _utc(e.occurred_at),
    )  # fmt: skip


_UPSERT_EXCHANGE_POSITION = MultiRowInsert.of(
    "INSERT INTO exchange_positions (exchange_position_id, position_key, symbol, position_side, status,"
    " quantity, max_quantity, avg_entry_price, contributions, realized_pnl, total_fees, opened_at, closed_at,"
    " updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON DUPLICATE KEY UPDATE status = VALUES(status), quantity = VALUES(quantity),"
    " max_quantity = GREATEST(max_quantity, VALUES(max_quantity)),"
    " avg_entry_price = IF(VALUES(quantity) = 0, avg_entry_price, VALUES(avg_entry_price)),"
    " contributions = contributions + VALUES(contributions), realized_pnl = realized_pnl + VALUES(realized_pnl),"
    " total_fees = total_fees + VALUES(total_fees), closed_at = VALUES(closed_at),"
    " updated_at = VALUES(updated_at)"
)


def _fold_exchange_positions(events: list[PositionOpened | PositionClosed]) -> list[tuple[Any, ...]]:
    """Per exchange position: final state from the batch's last event, deltas summed in order."""
    folded: dict[str, list[Any]] = {}
    for e in events:
        ep = e.exchange_position
        at = _utc(e.occurred_at)
        row = folded.get(ep.exchange_position_id)
        if row is None:
            row = folded[ep.exchange_position_id] = [
                ep.exchange_position_id, ep.key, e.symbol, e.side.value, "open", 0, 0, 0, 0, 0, 0, at, None, at,
            ]  # fmt: skip
        flat = ep.quantity_after == 0
        row[4] = "closed" if flat else "open"
        row[5] = ep.quantity_after
        row[6] = max(row[6], ep.quantity_after)
        if not flat:  # a flat position keeps the average it was closed at
            row[7] = ep.avg_entry_price
        if isinstance(e, PositionOpened):
            row[8] += 1
            row[10] += e.fee
        else:
            row[9] += e.realized_pnl
            row[10] += e.exit_fee
        row[12] = at if flat else None
        row[13] = at
    return [tuple(row) for row in folded.values()]


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
    return [tuple(r) for r in stats.values()]
