"""MariaDB's connection is cut mid-run (a TCP proxy drops every connection and refuses new ones):
the attribution consumer retries the same batch, and once MariaDB is reachable again MySQL holds
every stored event exactly once. The worker never notices: it does not depend on MySQL."""

from __future__ import annotations

import asyncmy
import pytest

from engine.adapters.embedded_nats import EmbeddedNats
from engine.config import MysqlTarget
from engine.domain.model import Outcome
from tests.integration.harness import Pipeline, eventually
from tests.integration.proxy import TcpProxy

pytestmark = pytest.mark.integration


async def count_directly(target: MysqlTarget, table: str) -> int:
    conn = await asyncmy.connect(
        host=target.host,
        port=target.port,
        user=target.user,
        password=target.password,
        database=target.database,
    )
    try:
        async with conn.cursor() as cur:
            await cur.execute(f"SELECT COUNT(*) FROM {table}")
            (n,) = await cur.fetchone()
            return int(n)
    finally:
        conn.close()


async def test_a_mysql_outage_loses_and_doubles_nothing(
    nats_server: EmbeddedNats, mysql_url: str, mysql_server: MysqlTarget
) -> None:
    async with TcpProxy(mysql_server.host, mysql_server.port) as proxy:
        direct = MysqlTarget.parse(mysql_url)
        auth = direct.user + (f":{direct.password}" if direct.password else "")
        via_proxy = f"mysql://{auth}@127.0.0.1:{proxy.port}/{direct.database}"
        async with Pipeline(nats_server.url, via_proxy, MAX_ACCUMULATIONS_PER_POSITION=100) as pipeline:
            await pipeline.tick("ETHUSDT", "3000")
            first = [
                await pipeline.publish("s1", "ETHUSDT", "buy", quantity="0.01", confidence=0.9)
                for _ in range(10)
            ]
            for signal_id in first:
                await pipeline.decision(signal_id)
            await pipeline.mysql_caught_up()
            persisted_before_cut = await count_directly(direct, "processed_events")

            proxy.cut()
            second = [
                await pipeline.publish("s2", "ETHUSDT", "sell", quantity="0.01", confidence=0.9)
                for _ in range(20)
            ]
            for signal_id in second:  # trading goes on without MySQL
                assert (await pipeline.decision(signal_id)).outcome is Outcome.ACCEPTED
            await pipeline.tick("ETHUSDT", "3010")
            await eventually(lambda: proxy.refused >= 2, what="the consumer retrying against the cut link")
            assert await count_directly(direct, "processed_events") == persisted_before_cut
            connections_before = proxy.connections
            proxy.restore()

            await pipeline.mysql_caught_up(timeout=60)
            assert proxy.connections > connections_before  # it reconnected
            stored = await pipeline.stored_event_count()
            rows = await pipeline.query(
                "SELECT (SELECT COUNT(*) FROM processed_events) AS events,"
                " (SELECT COUNT(*) FROM strategy_positions) AS positions,"
                " (SELECT COUNT(*) FROM signal_decisions) AS decisions"
            )
            assert rows == [{"events": stored, "positions": 30, "decisions": 30}]
            assert pipeline.attribution is not None
            attribution = pipeline.attribution
            await eventually(lambda: attribution.ready.is_set(), what="attribution still running")
