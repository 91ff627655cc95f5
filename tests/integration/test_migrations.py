"""A migration that stopped half-way (MySQL commits each DDL statement) resumes where it stopped."""

from __future__ import annotations

from pathlib import Path

import asyncmy.errors
import pytest

from engine.adapters.mysql_store import MysqlStore
from engine.config import MysqlTarget

pytestmark = pytest.mark.integration


async def test_a_half_applied_migration_resumes_after_its_last_statement(
    tmp_path: Path, mysql_url: str
) -> None:
    (tmp_path / "001_first.sql").write_text(
        "CREATE TABLE first_table (id INT PRIMARY KEY);\n"
        "CREATE TABLE second_table (id INT PRIMARY KEY, ref INT NOT NULL REFERENCES nowhere_yet (id));\n"
        "CREATE VIEW both_tables AS SELECT f.id FROM first_table f JOIN second_table s ON s.id = f.id;\n"
    )
    store = await MysqlStore.open(MysqlTarget.parse(mysql_url))
    try:
        with pytest.raises(asyncmy.errors.OperationalError):  # the second statement fails
            await store.migrate(tmp_path)
        # The operator fixes the broken statement; the first one must not run again (it would fail).
        (tmp_path / "001_first.sql").write_text(
            "CREATE TABLE first_table (id INT PRIMARY KEY);\n"
            "CREATE TABLE second_table (id INT PRIMARY KEY);\n"
            "CREATE VIEW both_tables AS SELECT f.id FROM first_table f JOIN second_table s ON s.id = f.id;\n"
        )
        assert await store.migrate(tmp_path) == ["001_first"]
        assert await store.migrate(tmp_path) == []
        async with store.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("SELECT COUNT(*) FROM both_tables")
            assert (await cur.fetchone())[0] == 0
            await cur.execute(
                "SELECT step FROM schema_migration_steps WHERE version = '001_first' ORDER BY step"
            )
            assert [row[0] for row in await cur.fetchall()] == [0, 1, 2]
    finally:
        await store.close()


async def test_a_statement_applied_but_not_recorded_before_a_kill_counts_as_done(
    tmp_path: Path, mysql_url: str
) -> None:
    (tmp_path / "001_table.sql").write_text(
        "CREATE TABLE t_a (id INT PRIMARY KEY);\nALTER TABLE t_a ADD COLUMN x INT;\n"
    )
    store = await MysqlStore.open(MysqlTarget.parse(mysql_url))
    try:
        assert await store.migrate(tmp_path / "none") == []  # creates the bookkeeping tables
        async with store.pool.acquire() as conn, conn.cursor() as cur:
            # What a kill right after the ALTER (committed by MySQL) and before its record leaves:
            await cur.execute("CREATE TABLE t_a (id INT PRIMARY KEY)")
            await cur.execute("ALTER TABLE t_a ADD COLUMN x INT")
            await cur.execute("INSERT INTO schema_migration_steps (version, step) VALUES ('001_table', 0)")
            await conn.commit()
        assert await store.migrate(tmp_path) == ["001_table"]
        (tmp_path / "002_more.sql").write_text("CREATE TABLE t_b (id INT PRIMARY KEY);\n")
        async with store.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("CREATE TABLE t_b (id INT PRIMARY KEY)")  # killed before any record
            await conn.commit()
        assert await store.migrate(tmp_path) == ["002_more"]
    finally:
        await store.close()
