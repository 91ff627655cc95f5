"""A replay of the live configuration over the live period reproduces the booked strategy PnL
exactly (issue #18): what the worker booked through NATS and the paper venue, the replay of the
same signals and ticks makes again, to the last decimal."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from engine.app.replay import Config, load_recording, replay
from tests.integration.harness import Pipeline

pytestmark = pytest.mark.integration


async def test_replaying_the_live_configuration_gives_the_booked_pnl(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    rng = random.Random(18)
    lines: list[dict[str, Any]] = []

    async def tick(price: str) -> None:
        await pipeline.tick("ETHUSDT", price)
        lines.append({"at": datetime.now(UTC).isoformat(), "tick": {"symbol": "ETHUSDT", "price": price}})

    async def signal(n: int) -> None:
        action = rng.choice(["buy", "sell", "buy", "close"])
        fields: dict[str, Any] = {"confidence": str(rng.choice(["0.5", "0.7", "0.9"])), "signal_id": f"r-{n}"}
        if action != "close":
            fields |= {"quantity": "0.1", "take_profit_pct": "0.01", "stop_loss_pct": "0.01"}
        strategy = f"s{n % 3}"
        sid = await pipeline.publish(strategy, "ETHUSDT", action, **fields)
        await pipeline.decision(sid)
        payload = {"strategy_id": strategy, "symbol": "ETHUSDT", "action": action, **fields}
        lines.append({"at": datetime.now(UTC).isoformat(), "signal": payload})

    await tick("3000")
    for n in range(40):
        await signal(n)
        if n % 4 == 3:
            await tick(rng.choice(["2960", "3000", "3035"]))
    await pipeline.mysql_caught_up()
    path = tmp_path / "live.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")

    settings = pipeline.settings
    live = Config(
        settings.same_direction_conflict_resolution, settings.position_mode, settings.min_confidence
    )
    (result,) = (await replay(load_recording(str(path)), [live], settings)).values()
    assert result["in_force"]
    booked: dict[str, Decimal] = {}
    for event in pipeline.closed():
        booked[event.strategy_id] = booked.get(event.strategy_id, Decimal(0)) + event.realized_pnl
    replayed = {s: f["net_pnl"] for s, f in result["strategies"].items() if f["trades"]}
    assert replayed == booked and booked  # exactly, per strategy
    assert {s: f["trades"] for s, f in result["strategies"].items() if f["trades"]} == {
        s: sum(1 for e in pipeline.closed() if e.strategy_id == s) for s in booked
    }
