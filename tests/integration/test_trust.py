"""Trust in the streams (issue #15): with EVENTS_SIGNING_KEY, an event nobody but a worker could
have signed is ignored by the worker's replay and quarantined by the attribution consumer; the
forged PnL never reaches the views."""

from __future__ import annotations

import json
from typing import Any

import pytest

from engine.domain.events import encode_event
from engine.domain.model import Outcome
from tests.integration.harness import eventually_async

pytestmark = pytest.mark.integration
KEY = "k3y-for-signing-events-0123456789"


async def test_forged_events_are_ignored_on_replay_and_quarantined(make_pipeline: Any) -> None:
    async with make_pipeline(EVENTS_SIGNING_KEY=KEY) as pipeline:
        await pipeline.tick("BTCUSDT", "45000")
        real = await pipeline.publish("alpha", "BTCUSDT", "buy", quantity="0.01")
        assert (await pipeline.decision(real)).outcome is Outcome.ACCEPTED
        opened = pipeline.opened()[0]
        stored = await pipeline.stored_event_count()
        # As someone with publish rights on EVENTS but not the key would forge them: a copy of
        # a real open under another strategy (with a made-up signature), and a close worth
        # 99,676 to alpha (with none).
        await _forge_open(pipeline, opened, "mallory")
        await _forge_close(pipeline, opened)
        await eventually_async(lambda: _stored(pipeline, stored + 2), what="forged events stored")

        async def both_quarantined() -> bool:
            return len(await pipeline.query("SELECT error FROM quarantined_events")) == 2

        await eventually_async(both_quarantined, what="the forged events quarantined")
        quarantined = await pipeline.query("SELECT error FROM quarantined_events")
        assert sorted(r["error"] for r in quarantined) == [
            f"positions.{kind}.BTCUSDT.LONG: no valid worker signature" for kind in ("closed", "opened")
        ]

        async def alpha_projected() -> bool:  # the good half of a batch may commit after the quarantine
            return bool(
                await pipeline.query("SELECT 1 FROM strategy_performance WHERE strategy_id = 'alpha'")
            )

        await eventually_async(alpha_projected, what="alpha's own open projected")
        perf = await pipeline.query("SELECT strategy_id, total_pnl FROM strategy_performance")
        assert {r["strategy_id"] for r in perf} == {"alpha"} and perf[0]["total_pnl"] <= 0

        await pipeline.stop_worker()
        await pipeline.start_worker()
        assert pipeline.worker is not None
        assert [sp.strategy_id for sp in pipeline.worker.book.positions.values()] == ["alpha"]


async def _forge_open(pipeline: Any, like: Any, strategy: str) -> None:
    payload = json.loads(encode_event(like))
    payload |= {"event_id": "forged-open-1", "strategy_position_id": "forged-sp-1", "strategy_id": strategy}
    await pipeline.client.jetstream().publish(
        "positions.opened.BTCUSDT.LONG", json.dumps(payload).encode(), headers={"Tradeengine-Sig": "00" * 32}
    )


async def _forge_close(pipeline: Any, opened: Any) -> None:
    payload = {
        "event_id": "forged-close-1", "type": "position.closed", "schema_version": 1,
        "occurred_at": "2026-12-01T00:00:00Z", "strategy_position_id": opened.strategy_position_id,
        "strategy_id": "alpha", "symbol": "BTCUSDT", "side": "LONG", "closed_quantity": "0.01",
        "remaining_quantity": "0", "entry_price": "45000", "exit_price": "9999999", "gross_pnl": "99676",
        "entry_fee_share": "0", "exit_fee": "0", "fee": "0", "realized_pnl": "99676", "close_reason": "manual",
        "client_order_id": "x", "exchange_order_id": "y",
        "exchange_position": {"exchange_position_id": "e", "key": "BTCUSDT_LONG", "quantity_before": "0.01",
                              "quantity_after": "0", "avg_entry_price": "45000"},
    }  # fmt: skip
    await pipeline.client.jetstream().publish("positions.closed.BTCUSDT.LONG", json.dumps(payload).encode())


async def _stored(pipeline: Any, count: int) -> bool:
    return bool(await pipeline.stored_event_count() >= count)
