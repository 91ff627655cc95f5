"""MySQL under least privilege and TLS (issue #15, item 4), on real MariaDB: the grant script's
users on the local server, and TLS against a MariaDB this test starts with certificates it
makes (the shared server has TLS off)."""

from __future__ import annotations

import os
import shutil
import string
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncmy
import pytest

from engine.adapters.embedded_nats import free_port, port_is_open
from engine.adapters.mysql_store import MysqlStore
from engine.config import MysqlTarget
from tests.integration.test_nats_auth import make_certificates

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
PASSWORDS = {
    "MIGRATE_PASSWORD": "mig-pw-1234",
    "ATTRIBUTION_PASSWORD": "attr-pw-5678",
    "ANALYST_PASSWORD": "ana-pw-9012",
}


async def _admin(target: MysqlTarget, *statements: str, db: str | None = None) -> list[tuple[object, ...]]:
    conn = await asyncmy.connect(
        host=target.host, port=target.port, user=target.user, password=target.password, db=db,
        ssl=target.ssl_context(),
    )  # fmt: skip
    rows: list[tuple[object, ...]] = []
    try:
        async with conn.cursor() as cur:
            for statement in statements:
                await cur.execute(statement)
                rows = list(await cur.fetchall() or [])
        await conn.commit()
    finally:
        conn.close()
    return rows


@pytest.fixture
async def granted(mysql_server: MysqlTarget) -> AsyncIterator[str]:
    db = f"te_grants_{uuid.uuid4().hex[:8]}"
    base = MysqlTarget(mysql_server.host, mysql_server.port, mysql_server.user, mysql_server.password, db)
    store = await MysqlStore.open(base)
    await store.migrate()
    await store.close()
    sql = string.Template((ROOT / "deploy/mysql/grants.sql").read_text()).substitute(DB=db, **PASSWORDS)
    body = "\n".join(line for line in sql.splitlines() if not line.startswith("--"))
    await _admin(mysql_server, *(s.strip() for s in body.split(";") if s.strip()))
    try:
        yield db
    finally:
        await _admin(
            mysql_server,
            f"DROP DATABASE IF EXISTS `{db}`",
            *(f"DROP USER IF EXISTS '{u}'@'%'" for u in ("te_migrate", "te_attribution", "te_analyst")),
        )


def _as(server: MysqlTarget, user: str, password: str, db: str) -> MysqlTarget:
    return MysqlTarget(server.host, server.port, user, password, db)


async def test_the_grant_script_gives_each_role_what_it_needs_and_no_more(
    granted: str, mysql_server: MysqlTarget
) -> None:
    analyst = _as(mysql_server, "te_analyst", PASSWORDS["ANALYST_PASSWORD"], granted)
    attribution = _as(mysql_server, "te_attribution", PASSWORDS["ATTRIBUTION_PASSWORD"], granted)
    migrate = _as(mysql_server, "te_migrate", PASSWORDS["MIGRATE_PASSWORD"], granted)

    # Every view of the migrations is granted to analysts, and nothing else is.
    views = {
        row[0]
        for row in await _admin(mysql_server, f"SHOW FULL TABLES IN `{granted}` WHERE Table_type = 'VIEW'")
    }
    for view in views:
        await _admin(analyst, f"SELECT * FROM {view} LIMIT 1", db=granted)
    for forbidden in (
        "SELECT * FROM signal_decisions", "SELECT * FROM strategy_positions",
        "INSERT INTO processed_events (event_id, event_type, processed_at) VALUES ('x', 'y', NOW())",
    ):  # fmt: skip
        with pytest.raises(asyncmy.errors.OperationalError, match="denied"):
            await _admin(analyst, forbidden, db=granted)

    # The attribution consumer writes its tables and runs (no DDL: MIGRATE_ON_START=false) ...
    await _admin(
        attribution,
        "INSERT INTO processed_events (event_id, event_type, processed_at) VALUES ('x', 'y', NOW())",
        db=granted,
    )
    store = await MysqlStore.open(attribution, create_database=False)
    try:
        await store.check_migrated()
    finally:
        await store.close()
    for ddl in ("DROP TABLE processed_events", "CREATE TABLE t (x INT)", f"CREATE DATABASE `{granted}_x`"):
        with pytest.raises(asyncmy.errors.OperationalError, match="denied"):
            await _admin(attribution, ddl, db=granted)
    # ... and the migration user owns the schema, in this database only.
    store = await MysqlStore.open(migrate, create_database=False)
    try:
        assert await store.migrate() == []
    finally:
        await store.close()
    with pytest.raises(asyncmy.errors.OperationalError, match="denied"):
        await _admin(migrate, "SELECT * FROM mysql.user")


async def test_attribution_without_ddl_rights_names_the_missing_migrations(mysql_server: MysqlTarget) -> None:
    db = f"te_empty_{uuid.uuid4().hex[:8]}"
    await _admin(mysql_server, f"CREATE DATABASE `{db}`")
    try:
        store = await MysqlStore.open(
            _as(mysql_server, mysql_server.user, mysql_server.password, db), create_database=False
        )
        try:
            with pytest.raises(
                RuntimeError, match=r"lacks migrations 001_core_tables.*run `tradeengine migrate`"
            ):
                await store.check_migrated()
        finally:
            await store.close()
    finally:
        await _admin(mysql_server, f"DROP DATABASE `{db}`")


@pytest.fixture
def tls_mariadb(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A MariaDB of our own that accepts only TLS connections, stopped by PID."""
    if not shutil.which("mariadb-install-db") or not shutil.which("mariadbd"):
        pytest.fail("mariadb-install-db / mariadbd missing: the MariaDB server package is needed")
    make_certificates(tmp_path)
    data, port = tmp_path / "data", free_port()
    subprocess.run(
        ["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
         "--auth-root-authentication-method=normal", "--skip-test-db"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    server = subprocess.Popen(
        ["mariadbd", "--no-defaults", f"--datadir={data}", f"--port={port}", "--bind-address=127.0.0.1",
         f"--socket={tmp_path / 'mysqld.sock'}", "--user=root", f"--pid-file={tmp_path / 'mysqld.pid'}",
         f"--log-error={tmp_path / 'mysqld.err'}", "--require-secure-transport=ON",
         f"--ssl-ca={tmp_path / 'ca.pem'}", f"--ssl-cert={tmp_path / 'server.pem'}",
         f"--ssl-key={tmp_path / 'server.key'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not port_is_open("127.0.0.1", port):
            assert server.poll() is None, (tmp_path / "mysqld.err").read_text()[-2000:]
            assert time.monotonic() < deadline, "MariaDB with TLS did not start"
            time.sleep(0.1)
        subprocess.run(
            ["mariadb", "--no-defaults", f"--socket={tmp_path / 'mysqld.sock'}", "-uroot", "-e",
             "DELETE FROM mysql.global_priv WHERE User = ''; FLUSH PRIVILEGES;"
             " CREATE USER 'te'@'%' IDENTIFIED BY 'te-pw'; GRANT ALL ON *.* TO 'te'@'%'"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        yield port, tmp_path
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _migrate(url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MYSQL_")}
    env.update(MYSQL_URL=url, MYSQL_CONNECT_TIMEOUT="5")
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", "migrate"], env=env, capture_output=True, text=True, timeout=120
    )


async def test_tls_to_mysql_when_asked(tls_mariadb: tuple[int, Path]) -> None:
    port, certs = tls_mariadb
    plain = _migrate(f"mysql://te:te-pw@127.0.0.1:{port}/te_tls")
    assert plain.returncode == 1, plain.stderr  # the server takes TLS connections only
    ok = _migrate(f"mysql://te:te-pw@127.0.0.1:{port}/te_tls?ssl-ca={certs / 'ca.pem'}")
    assert ok.returncode == 0, ok.stderr
    target = MysqlTarget.parse(f"mysql://te:te-pw@127.0.0.1:{port}/te_tls?ssl-ca={certs / 'ca.pem'}")
    ((_, cipher),) = await _admin(target, "SHOW SESSION STATUS LIKE 'Ssl_cipher'")
    assert cipher  # encrypted
    other_ca = certs / "other"
    other_ca.mkdir()
    make_certificates(other_ca)  # a CA that did not sign the server's certificate
    refused = _migrate(f"mysql://te:te-pw@127.0.0.1:{port}/te_tls?ssl-ca={other_ca / 'ca.pem'}")
    assert refused.returncode == 1 and "certificate verify failed" in refused.stderr
    mutual = _migrate(
        f"mysql://te:te-pw@127.0.0.1:{port}/te_tls?ssl-mode=VERIFY_IDENTITY&ssl-ca={certs / 'ca.pem'}"
        f"&ssl-cert={certs / 'client.pem'}&ssl-key={certs / 'client.key'}"
    )
    assert mutual.returncode == 0, mutual.stderr
