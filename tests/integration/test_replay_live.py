"""A replay of the live configuration over the live period reproduces the booked strategy PnL
exactly (issue #18): what the worker booked through NATS and the paper venue, the replay of the
same signals and ticks makes again, to the last decimal: from a recording made by hand, and from
what NATS kept (the SIGNALS stream and the worker's PRICE_HISTORY bars)."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from engine.adapters.nats_bus import NatsBus
from engine.app.replay import Config, Recorded, check_booked, load_recording, record_from_streams, replay
from tests.integration.harness import Pipeline, eventually_async

pytestmark = pytest.mark.integration


async def test_replaying_the_live_configuration_gives_the_booked_pnl(
    make_pipeline: Any, tmp_path: Path
) -> None:
    async with make_pipeline(PRICE_HISTORY_INTERVAL=1) as pipeline:
        await replay_live(pipeline, tmp_path)


async def replay_live(pipeline: Pipeline, tmp_path: Path) -> None:
    rng = random.Random(18)
    lines: list[dict[str, Any]] = []
    started = datetime.now(UTC) - timedelta(seconds=1)

    standing: list[str] = []  # the last price ticked

    async def tick(price: str) -> None:
        if standing == [price]:
            return  # the price stands: no tick (pipeline.tick would publish none)
        standing[:] = [price]
        # One tick a second: each is a bar of its own (PRICE_HISTORY_INTERVAL=1), kept exactly.
        now = datetime.now(UTC)
        await asyncio.sleep(1 - now.microsecond / 1e6 + 0.01)
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

    # What NATS kept gives the same: the signals as stored, the ticks from the worker's bars.
    assert pipeline.client is not None
    reader, kept = NatsBus(pipeline.client), tmp_path / "kept.jsonl"
    ticks = sum(1 for line in lines if "tick" in line)

    recorded: list[Recorded] = []

    async def all_kept() -> bool:
        recorded[:] = [
            await record_from_streams(reader, str(kept), started, datetime.now(UTC), symbols={"ETHUSDT"})
        ]
        return recorded[0].counts["ticks"] == ticks

    await eventually_async(all_kept, 15.0, what=f"every tick in the price history ({ticks})")
    assert recorded[0].counts["signals"] == 40
    from_streams = await replay(str(kept), [live], settings)
    assert next(iter(from_streams.values()))["strategies"] == result["strategies"]
    # ... and the command's own check against what was booked says so.
    assert {s: pnl for s, pnl in recorded[0].booked.items() if pnl} == booked
    assert check_booked(from_streams, recorded[0].booked) is True
