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


async def test_a_half_open_mysql_link_is_noticed_by_the_read_timeout_and_shows_as_stalled(
    nats_server: EmbeddedNats, mysql_url: str, mysql_server: MysqlTarget
) -> None:
    """A link that goes silent (no FIN, no RST) would hold a write for ever without a read
    timeout, with readiness green. With MYSQL_READ_TIMEOUT the write fails and is retried on a
    new connection; meanwhile the stalled time grows and readiness reports it."""
    async with TcpProxy(mysql_server.host, mysql_server.port) as proxy:
        direct = MysqlTarget.parse(mysql_url)
        auth = direct.user + (f":{direct.password}" if direct.password else "")
        via_proxy = f"mysql://{auth}@127.0.0.1:{proxy.port}/{direct.database}"
        settings = {"MYSQL_READ_TIMEOUT": 1, "ATTRIBUTION_STALL_SECONDS": 1}
        async with Pipeline(nats_server.url, via_proxy, **settings) as pipeline:
            await pipeline.tick("ETHUSDT", "3000")
            await pipeline.decision(
                await pipeline.publish("s1", "ETHUSDT", "buy", quantity="0.01", confidence=0.9)
            )
            await pipeline.mysql_caught_up()
            attribution = pipeline.attribution
            assert attribution is not None
            assert (await attribution.checks())["attribution_progress"] is True
            connections_before = proxy.connections

            proxy.go_silent()
            await pipeline.decision(
                await pipeline.publish("s2", "ETHUSDT", "buy", quantity="0.01", confidence=0.9)
            )
            await eventually(lambda: attribution.stalled_seconds() > 1.5 or None, timeout=20, what="a stall")
            assert (await attribution.checks())["attribution_progress"] is False
            await eventually(
                lambda: proxy.connections > connections_before or None,
                timeout=20,
                what="a new connection after the read timed out",
            )
            proxy.restore()
            await pipeline.mysql_caught_up(timeout=60)
            await eventually(lambda: attribution.stalled_seconds() == 0 or None, what="the stall over")
            assert (await attribution.checks())["attribution_progress"] is True
