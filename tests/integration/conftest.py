"""Real servers only: a nats-server from the pinned wheel per test (own port, own store, stopped by
PID) and a fresh MariaDB database per test on the local server (dropped afterwards)."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncmy
import pytest

from engine.adapters.embedded_nats import EmbeddedNats, free_port, port_is_open
from engine.config import MysqlTarget
from tests.integration.harness import Pipeline
from tests.integration.venues import Emulator, running_emulator

TEST_MYSQL_URL = os.environ.get("TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/mysql")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(free_port(), tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mysql_server() -> Iterator[MysqlTarget]:
    target = MysqlTarget.parse(TEST_MYSQL_URL)
    if port_is_open(target.host, target.port):
        yield target
        return
    if shutil.which("docker") and os.environ.get("DOCKER_HOST", "") != "none":
        try:
            from testcontainers.mysql import MySqlContainer

            with MySqlContainer("mariadb:11", username="root", password="test") as container:
                yield MysqlTarget.parse(
                    f"mysql://root:test@{container.get_container_host_ip()}:"
                    f"{container.get_exposed_port(3306)}/mysql"
                )
                return
        except Exception as exc:  # no engine behind the client
            pytest.fail(f"MariaDB not reachable at {target!r} and testcontainers failed: {exc}")
    pytest.fail(f"MariaDB not reachable at {target!r}: start it (see .ci/run) or set TEST_MYSQL_URL")


@pytest.fixture
async def mysql_url(mysql_server: MysqlTarget) -> AsyncIterator[str]:
    name = f"te_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    auth = mysql_server.user + (f":{mysql_server.password}" if mysql_server.password else "")
    yield f"mysql://{auth}@{mysql_server.host}:{mysql_server.port}/{name}"
    conn = await asyncmy.connect(
        host=mysql_server.host, port=mysql_server.port, user=mysql_server.user, password=mysql_server.password
    )
    try:
        async with conn.cursor() as cur:
            await cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        conn.close()


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    async with running_emulator() as running:
        yield running


@pytest.fixture
def venue() -> Emulator | None:
    """The paper venue; a module that runs its scenarios on both venues overrides this with
    its own parametrized `venue` fixture (see test_pipeline.py)."""
    return None


def _venue_overrides(venue: Emulator | None) -> dict[str, object]:
    return {} if venue is None else venue.venue_settings()


@pytest.fixture
async def pipeline(
    nats_server: EmbeddedNats, mysql_url: str, venue: Emulator | None
) -> AsyncIterator[Pipeline]:
    """Worker + attribution consumer in this process, hedge mode, default policies."""
    emulated = venue.exchange if venue else None
    async with Pipeline(nats_server.url, mysql_url, emulated, **_venue_overrides(venue)) as running:
        yield running


@pytest.fixture
def make_pipeline(nats_server: EmbeddedNats, mysql_url: str, venue: Emulator | None) -> object:
    """For tests that need other settings: `async with make_pipeline(POSITION_MODE=...)`."""

    def factory(**overrides: object) -> Pipeline:
        emulated = venue.exchange if venue else None
        return Pipeline(nats_server.url, mysql_url, emulated, **(_venue_overrides(venue) | overrides))

    return factory
