"""Recovery reads the whole EVENTS stream through a one-off push consumer: every event, in
order, across many batches, and the consumer is gone afterwards."""

from __future__ import annotations

import pytest

from engine.adapters.embedded_nats import EmbeddedNats
from engine.adapters.nats_bus import EVENTS_STREAM, NatsBus
from engine.domain.events import SignalDecided
from engine.domain.model import Action, Outcome, derive_id
from tests.helpers import NOW

pytestmark = pytest.mark.integration


def decision(n: int) -> SignalDecided:
    return SignalDecided(
        event_id=derive_id("replay-test", str(n)), occurred_at=NOW, signal_id=f"r{n}", strategy_id="s",
        symbol="BTCUSDT", action=Action.BUY, outcome=Outcome.REJECTED, reason_code="test", reason=str(n),
    )  # fmt: skip


async def test_replay_reads_every_event_in_order_and_leaves_no_consumer(nats_server: EmbeddedNats) -> None:
    bus = await NatsBus.connect(nats_server.url, "replay-test")
    try:
        await bus.ensure_streams()
        assert [e async for e in bus.replay_events()] == []
        events = [decision(n) for n in range(2_500)]
        for start in range(0, len(events), 500):
            await bus.publish_events(events[start : start + 500])
        replayed = [e async for e in bus.replay_events(batch=300)]
        assert [e.event_id for e in replayed] == [e.event_id for e in events]
        assert replayed[-1] == events[-1]
        consumers = await bus.js.consumers_info(EVENTS_STREAM)
        assert [c.name for c in consumers] == []
    finally:
        await bus.close()
