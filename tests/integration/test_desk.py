"""The desk view from NATS alone: `tradeengine positions` folds the events as a worker would and
values the slices at the worker's last prices; `tradeengine status --json` adds the streams and
the roles' lag to the halts."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from tests.integration.harness import Pipeline, eventually_async
from tests.integration.test_risk import cli

pytestmark = pytest.mark.integration
D = Decimal


async def test_positions_and_status_as_a_desk_sees_them(pipeline: Pipeline) -> None:
    url = pipeline.settings.nats_url
    assert url
    await pipeline.tick("BTCUSDT", "45000")
    for strategy, qty in (("alpha", "0.01"), ("beta", "0.02")):
        await pipeline.decision(
            await pipeline.publish(
                strategy, "BTCUSDT", "buy", quantity=qty, take_profit="50000", stop_loss="40000"
            )
        )
    await pipeline.tick("BTCUSDT", "46000")

    async def price_stored() -> bool:
        shown = json.loads((await cli(url, "positions", "--json")).stdout)
        return bool(shown["positions"]) and shown["positions"][0]["last_price"] == "46000"

    await eventually_async(price_stored, timeout=20, what="the last price in KV")
    shown: dict[str, Any] = json.loads((await cli(url, "positions", "--json")).stdout)
    (key,) = shown["positions"]
    assert (key["key"], key["quantity"], key["avg_entry_price"]) == ("BTCUSDT_LONG", "0.03", "45000")
    assert [(s["strategy_id"], s["quantity"], s["unrealized_pnl"], s["take_profit"]) for s in key["slices"]] == [
        ("alpha", "0.01", "10", "50000"), ("beta", "0.02", "20", "50000"),
    ]  # fmt: skip
    assert shown["exposure"]["beta"] == {"notional": "900", "unrealized_pnl": "20"}
    only = json.loads((await cli(url, "positions", "--json", "--strategy", "alpha")).stdout)
    assert [s["strategy_id"] for s in only["positions"][0]["slices"]] == ["alpha"]
    text = (await cli(url, "positions")).stdout
    assert "BTCUSDT_LONG" in text and "uPnL" in text

    status = json.loads((await cli(url, "status", "--json")).stdout)
    assert status["halted"] == []
    assert status["streams"]["SIGNALS"]["messages"] == 2
    assert status["consumers"]["worker"]["pending"] == 0


async def test_positions_beside_what_the_venue_holds(nats_server: Any, mysql_url: str, emulator: Any) -> None:
    import asyncio
    import os
    import sys

    from tests.integration.harness import Pipeline

    settings = emulator.venue_settings()
    async with Pipeline(nats_server.url, mysql_url, emulator.exchange, **settings) as pipeline:
        await pipeline.tick("ETHUSDT", "3000")
        await pipeline.decision(
            await pipeline.publish("s1", "ETHUSDT", "buy", quantity="0.2", confidence="0.9")
        )
        emulator.exchange.by_hand("ETHUSDT", "LONG", "SELL", D("0.05"), False)  # someone reduces it by hand
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "EXCHANGE"))}
        env |= {"NATS_URL": nats_server.url} | {
            k: str(v) for k, v in settings.items() if k.startswith("EXCHANGE")
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engine.cli", "positions", "--json", "--venue", env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, err.decode()
        shown = json.loads(out)
        (key,) = shown["positions"]
        assert (key["key"], key["quantity"], key["venue_quantity"]) == ("ETHUSDT_LONG", "0.2", "0.15")


async def test_the_desk_fold_ends_when_the_last_event_is_gone_or_not_ours(pipeline: Pipeline) -> None:
    import asyncio

    from engine.adapters.nats_bus import NatsBus
    from engine.app.desk import fold_events

    assert pipeline.client is not None
    await pipeline.tick("BTCUSDT", "45000")
    await pipeline.decision(await pipeline.publish("a", "BTCUSDT", "buy", quantity="0.01"))
    js = pipeline.client.jetstream()
    await js.publish("positions.closed.BTCUSDT.LONG", b"not an event")  # unreadable, and last
    state = await asyncio.wait_for(fold_events(NatsBus(pipeline.client)), 10)
    assert [sp.strategy_id for sp in state.book.positions.values()] == ["a"]
    last = (await js.stream_info("EVENTS")).state.last_seq
    await js.delete_msg("EVENTS", last)  # the last message gone: the fold still ends
    state = await asyncio.wait_for(fold_events(NatsBus(pipeline.client)), 10)
    assert len(state.book.positions) == 1
