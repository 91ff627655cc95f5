"""The attribution writer renders SQL literals itself (engine.adapters.mysql_store.SqlLiterals):
they must be what asyncmy writes, and whatever goes in must come back out of MariaDB unchanged,
in both of the server's quoting modes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal, localcontext
from typing import Any

import asyncmy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.adapters import mysql_store
from engine.adapters.embedded_nats import EmbeddedNats
from engine.adapters.mysql_projection import project
from engine.adapters.mysql_sql import MultiRowInsert, SqlLiterals, no_backslash_escapes
from engine.adapters.mysql_store import ConcurrentWrite, MysqlStore
from engine.adapters.nats_bus import NatsBus
from engine.app.attribution import AttributionConsumer
from engine.config import MysqlTarget, load_settings
from engine.domain.events import SignalDecided
from engine.domain.model import Action, CloseReason, Outcome, derive_id

pytestmark = pytest.mark.integration

VALUES = st.one_of(
    st.text(),
    st.text(alphabet="'\"\\\x00\n\r\x1a%s"),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.integers(),
    st.booleans(),
    st.none(),
    st.datetimes(),
    st.datetimes(timezones=st.just(UTC)),
    st.floats(allow_nan=False, allow_infinity=False),
)


def examples(strategy: st.SearchStrategy[Any], count: int) -> list[Any]:
    """Hypothesis-generated values, collected for use against a live connection."""
    found: list[Any] = []

    @settings(max_examples=count, database=None)
    @given(strategy)
    def collect(value: Any) -> None:
        found.append(value)

    collect()
    return found


@pytest.fixture
async def conn(mysql_server: MysqlTarget) -> AsyncIterator[Any]:
    name = f"te_literals_{uuid.uuid4().hex[:8]}"
    conn = await asyncmy.connect(
        host=mysql_server.host, port=mysql_server.port, user=mysql_server.user, password=mysql_server.password
    )
    try:
        async with conn.cursor() as cur:
            await cur.execute(f"CREATE DATABASE `{name}`")
            await cur.execute(f"USE `{name}`")
            await cur.execute(
                "CREATE TABLE t (n INT PRIMARY KEY, s TEXT CHARACTER SET utf8mb4, d DECIMAL(36, 18),"
                " at DATETIME(6), i BIGINT, b BOOL)"
            )
        yield conn
    finally:
        async with conn.cursor() as cur:
            await cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


@pytest.mark.parametrize("sql_mode", ["", "NO_BACKSLASH_ESCAPES"])
async def test_literals_are_what_asyncmy_writes(conn: Any, sql_mode: str) -> None:
    async with conn.cursor() as cur:
        await cur.execute(f"SET SESSION sql_mode = '{sql_mode}'")
    literals = SqlLiterals(no_backslash_escapes(conn))
    assert no_backslash_escapes(conn) == bool(sql_mode)
    for value in examples(VALUES, 600):
        assert literals.literal(value) == conn.literal(value), value
    quoted = "'a''b'" if sql_mode else "'a\\'b'"
    assert literals.row(["a'b", Decimal("1E-8"), None]) == f"({quoted},0.00000001,NULL)"


@pytest.mark.parametrize("sql_mode", ["", "NO_BACKSLASH_ESCAPES"])
async def test_what_goes_in_comes_back_out(conn: Any, sql_mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with conn.cursor() as cur:
        await cur.execute(f"SET SESSION sql_mode = '{sql_mode}'")
    texts = [
        *examples(st.text(alphabet=st.characters(exclude_categories=["Cs"])), 150),
        "'; DROP TABLE t; --",
        "\\'",
        "\\",
        "%s %(x)s",
        "\x00\x1a\n\r\t",
        "emoji \U0001f680 and ümlauts",
    ]
    decimals = [
        Decimal("1E-18"),
        Decimal("-12345678901234567.000000000000000001"),
        Decimal("0E-7"),
        Decimal(0),
    ]
    rows = [
        (n, text, decimals[n % len(decimals)], datetime(2026, 11, 25, 15, 0, 0, n), 2**62 + n, n % 2 == 0)
        for n, text in enumerate(texts)
    ]
    insert = MultiRowInsert.of("INSERT INTO t (n, s, d, at, i, b) VALUES (%s, %s, %s, %s, %s, %s)")
    monkeypatch.setattr(SqlLiterals, "MAX_STATEMENT_CHARS", 2_000)  # several statements
    async with conn.cursor() as cur:
        await insert.run(cur, rows)
        await cur.execute("SELECT n, s, d, at, i, b FROM t ORDER BY n")
        stored = await cur.fetchall()
    assert [(n, s, d, at, i, bool(b)) for n, s, d, at, i, b in stored] == rows


def test_only_placeholder_rows_make_a_multi_row_insert() -> None:
    insert = MultiRowInsert.of("INSERT INTO t (a, b) VALUES (%s, %s) ON DUPLICATE KEY UPDATE b = VALUES(b)")
    assert (insert.head, insert.tail) == (
        "INSERT INTO t (a, b) VALUES ",
        " ON DUPLICATE KEY UPDATE b = VALUES(b)",
    )
    with pytest.raises(ValueError, match="placeholders only"):
        MultiRowInsert.of("INSERT INTO t (a, b) VALUES (%s, 'open')")


async def test_str_subclasses_and_lower_case_exponents(conn: Any) -> None:
    literals = SqlLiterals(no_backslash_escapes(conn))

    class Text(str):
        pass

    for value in (Action.BUY, CloseReason.TAKE_PROFIT, Text("it's")):
        assert literals.literal(value) == conn.literal(value)
    with localcontext(capitals=0):
        assert str(Decimal("1E-7")) == "1e-7"
        assert literals.literal(Decimal("1E-7")) == "0.0000001"


@pytest.fixture
async def store(mysql_url: str) -> AsyncIterator[MysqlStore]:
    store = await MysqlStore.open(MysqlTarget.parse(mysql_url))
    await store.migrate()
    yield store
    await store.close()


def decided(n: int, reason: str = "r") -> tuple[SignalDecided, int]:
    return SignalDecided(
        event_id=derive_id("literals-test", str(n)), occurred_at=datetime(2026, 11, 25, tzinfo=UTC),
        signal_id=f"l{n}", strategy_id="s", symbol="BTCUSDT", action=Action.BUY, outcome=Outcome.REJECTED,
        reason_code="test", reason=reason,
    ), n  # fmt: skip


async def test_a_batch_rendered_for_the_other_quoting_mode_is_rendered_again(store: MysqlStore) -> None:
    reason = "it's a \\ backslash"
    events = [decided(1, reason)]
    quoting = await store.quoting()
    assert await store.write(events, project(events, no_backslash_escapes=not quoting)) == 1
    async with store.pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT reason FROM signal_decisions")
        assert await cur.fetchall() == ((reason,),)
        await cur.execute("SELECT COUNT(*) FROM processed_events")
        assert await cur.fetchone() == (1,)
        await conn.commit()


async def test_events_stored_by_another_writer_meanwhile_are_not_written_twice(
    store: MysqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = [decided(n) for n in range(3)]
    assert await store.write(events[:2]) == 2

    async def checked_before_the_other_writer_committed(_: Any, batch: Any) -> list[Any]:
        return list(batch)

    monkeypatch.setattr(mysql_store, "_unseen", checked_before_the_other_writer_committed)
    with pytest.raises(ConcurrentWrite):
        await store.write(events)
    assert await store.write(events[:1]) == 0  # alone, it is found stored
    monkeypatch.undo()
    assert await store.write(events) == 1  # the retry


async def test_ids_mysql_holds_equal_are_found_stored_not_retried_forever(
    store: MysqlStore, nats_server: EmbeddedNats
) -> None:
    """processed_events compares ids as its collation does (case-insensitively); the writer's
    dedupe compares exactly. The batch is written in parts until each event is settled."""
    stored, new = decided(1), decided(2)
    assert await store.write([stored]) == 1
    same_to_mysql = (replace(stored[0], event_id=stored[0].event_id.upper()), 3)
    with pytest.raises(ConcurrentWrite):
        await store.write([same_to_mysql, new])
    bus = await NatsBus.connect(nats_server.url, "literals-test")
    try:
        consumer = AttributionConsumer(load_settings(nats_url=nats_server.url), bus, store)
        assert await consumer._write_or_quarantine([same_to_mysql, new]) == 1
    finally:
        await bus.close()
    async with store.pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT COUNT(*) FROM processed_events")
        assert await cur.fetchone() == (2,)
        await cur.execute("SELECT COUNT(*) FROM quarantined_events")
        assert await cur.fetchone() == (0,)
        await conn.commit()
