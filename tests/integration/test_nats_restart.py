"""The NATS server dies and comes back mid-run: every signal is still decided exactly once."""

from __future__ import annotations

import pytest

from engine.adapters.embedded_nats import EmbeddedNats
from engine.domain.model import Outcome
from tests.integration.harness import Pipeline, eventually
from tests.integration.venues import VENUES, Emulator, venue_called

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("venue_name", VENUES)
async def test_worker_rides_out_a_nats_restart(
    nats_server: EmbeddedNats, mysql_url: str, venue_name: str
) -> None:
    async with venue_called(venue_name) as venue:
        await ride_out_a_nats_restart(nats_server, mysql_url, venue)


async def ride_out_a_nats_restart(nats_server: EmbeddedNats, mysql_url: str, venue: Emulator | None) -> None:
    settings = venue.venue_settings() if venue else {}
    emulated = venue.exchange if venue else None
    async with Pipeline(
        nats_server.url, mysql_url, emulated, MAX_ACCUMULATIONS_PER_POSITION=100, **settings
    ) as pipeline:
        await pipeline.tick("BTCUSDT", "45000")
        before = [
            await pipeline.publish("s1", "BTCUSDT", "buy", quantity="0.001", confidence=0.9)
            for _ in range(20)
        ]
        for signal_id in before:
            await pipeline.decision(signal_id)

        nats_server.stop(kill=True)  # kill -9: no goodbye to the clients
        nats_server.start()  # same port, same store: the streams survive
        assert pipeline.worker is not None
        worker = pipeline.worker
        await eventually(lambda: worker.bus.nc.is_connected, timeout=30, what="worker reconnect")

        await pipeline.tick("BTCUSDT", "45100")
        after = [
            await pipeline.publish("s2", "BTCUSDT", "sell", quantity="0.001", confidence=0.9)
            for _ in range(20)
        ]
        for signal_id in after:
            assert (await pipeline.decision(signal_id, timeout=30)).outcome is Outcome.ACCEPTED
        decided = [d.signal_id for d in pipeline.decisions()]
        assert sorted(decided) == sorted(before + after)  # each exactly once
        assert len(pipeline.opened()) == 40
        await pipeline.mysql_caught_up(timeout=30)
        rows = await pipeline.query("SELECT COUNT(*) AS n FROM strategy_positions")
        assert rows[0]["n"] == 40
        assert pipeline.venue_order_count() == 40
        if venue is not None:
            assert venue.exchange.state()["duplicate_client_ids"] == {}
