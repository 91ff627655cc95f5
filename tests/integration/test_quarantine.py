"""An event MySQL refuses for good is quarantined with its error; the projection goes on."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

import pytest

from engine.domain.events import encode_event, event_subject
from tests.integration.harness import Pipeline, eventually_async

pytestmark = pytest.mark.integration


async def test_an_event_mysql_refuses_is_quarantined_and_the_rest_is_projected(pipeline: Pipeline) -> None:
    await pipeline.tick("ETHUSDT", "3000")
    await pipeline.decision(await pipeline.publish("s1", "ETHUSDT", "buy", quantity="0.1", confidence=0.9))
    await pipeline.mysql_caught_up()
    good = pipeline.opened()[0]
    bad = dataclasses.replace(
        good, event_id="bad-event-1", strategy_position_id="bad-position", quantity=Decimal("1e30")
    )  # valid JSON, but no DECIMAL(36,18) column can hold it
    await pipeline.publish_raw(event_subject(bad), encode_event(bad), bad.event_id)
    after = await pipeline.publish("s2", "ETHUSDT", "buy", quantity="0.2", confidence=0.9)
    await pipeline.decision(after)
    stored = await pipeline.stored_event_count()

    async def projected() -> bool:
        rows = await pipeline.query(
            "SELECT (SELECT COUNT(*) FROM processed_events) AS done,"
            " (SELECT COUNT(*) FROM quarantined_events) AS aside"
        )
        return rows[0]["done"] == stored - 1 and rows[0]["aside"] == 1

    await eventually_async(projected, timeout=20, what="the good events projected, the bad one aside")
    (row,) = await pipeline.query("SELECT event_id, event_type, error FROM quarantined_events")
    assert (row["event_id"], row["event_type"]) == ("bad-event-1", "position.opened")
    assert "Out of range" in row["error"]
    positions = await pipeline.query("SELECT strategy_id FROM strategy_positions ORDER BY strategy_id")
    assert [p["strategy_id"] for p in positions] == ["s1", "s2"]
