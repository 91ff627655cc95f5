"""Risk limits and the kill switch (issue #15) against real NATS and MariaDB: halts, resume and
flatten through the CLI's own code, surviving a restart; limits from RISK_FILE; a day's loss
that halts a strategy."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from engine.app import commands
from engine.domain.events import ControlApplied
from engine.domain.model import CloseReason, Outcome
from tests.integration.harness import Pipeline, eventually

D = Decimal
pytestmark = pytest.mark.integration


def controls(pipeline: Pipeline) -> list[ControlApplied]:
    return [e for e in pipeline.events if isinstance(e, ControlApplied)]


async def decided(
    pipeline: Pipeline, strategy: str, symbol: str, action: str, **fields: Any
) -> tuple[str, Any]:
    decision = await pipeline.decision(await pipeline.publish(strategy, symbol, action, **fields))
    return decision.reason_code, decision


async def cli(nats_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The command line, without blocking the loop the worker under test runs on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "RISK_"))}
    env["NATS_URL"] = nats_url
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.cli", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return subprocess.CompletedProcess(args, process.returncode, out.decode(), err.decode())


async def test_halt_resume_and_flatten_survive_a_restart(pipeline: Pipeline) -> None:
    settings = pipeline.settings
    await pipeline.tick("BTCUSDT", "45000")
    await pipeline.tick("ETHUSDT", "3000")
    for strategy, symbol, qty in (
        ("alpha", "BTCUSDT", "0.01"),
        ("beta", "BTCUSDT", "0.02"),
        ("alpha", "ETHUSDT", "0.1"),
    ):
        assert (await decided(pipeline, strategy, symbol, "buy", quantity=qty))[0] == "accepted"

    assert await commands.control(settings, "halt", "alpha", None, "drawdown review", 10) == 0
    code, decision = await decided(pipeline, "alpha", "BTCUSDT", "buy", quantity="0.01")
    assert (code, decision.outcome) == ("halted", Outcome.REJECTED)
    assert "strategy alpha is halted" in decision.reason
    assert (await decided(pipeline, "beta", "ETHUSDT", "buy", quantity="0.1"))[0] == "accepted"
    # A halt stops new risk only: the halted strategy may still close.
    assert (await decided(pipeline, "alpha", "ETHUSDT", "close"))[0] == "accepted"
    # Halting again changes nothing, and says so.
    assert await commands.control(settings, "halt", "alpha", None, None, 10) == 0
    assert controls(pipeline)[-1].outcome == "unchanged"

    venue_orders = pipeline.venue_order_count()
    assert await commands.control(settings, "flatten", None, "BTCUSDT", None, 10) == 0
    flattened = controls(pipeline)[-1]
    assert flattened.command == "flatten" and len(flattened.closed_positions) == 2
    manual = [e for e in pipeline.closed() if e.close_reason is CloseReason.MANUAL]
    assert sorted(e.strategy_id for e in manual) == ["alpha", "beta"]
    assert pipeline.venue_order_count() == venue_orders + 1  # one order for the key's two slices
    assert pipeline.worker is not None
    assert {sp.symbol for sp in pipeline.worker.book.positions.values()} == {"ETHUSDT"}
    assert (await decided(pipeline, "gamma", "BTCUSDT", "buy", quantity="0.01"))[0] == "halted"

    await pipeline.stop_worker()
    await pipeline.start_worker()
    assert (await decided(pipeline, "alpha", "ETHUSDT", "buy", quantity="0.1"))[0] == "halted"
    assert (await decided(pipeline, "gamma", "BTCUSDT", "buy", quantity="0.01"))[0] == "halted"
    assert settings.nats_url
    shown = await cli(settings.nats_url, "status")
    assert shown.returncode == 0, shown.stderr
    assert "HALTED strategy alpha" in shown.stdout and "HALTED symbol BTCUSDT" in shown.stdout

    resumed = await cli(settings.nats_url, "resume", "--strategy", "alpha")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed strategy alpha" in resumed.stdout
    assert (await decided(pipeline, "alpha", "ETHUSDT", "buy", quantity="0.1"))[0] == "accepted"
    assert (await decided(pipeline, "alpha", "BTCUSDT", "buy", quantity="0.01"))[0] == "halted"  # symbol halt
    assert await commands.control(settings, "resume", None, None, None, 10) == 0
    assert (await decided(pipeline, "alpha", "BTCUSDT", "buy", quantity="0.01"))[0] == "accepted"
    assert "nothing is halted" in (await cli(settings.nats_url, "status")).stdout

    await pipeline.mysql_caught_up()
    rows = await pipeline.query(
        "SELECT command, outcome, strategy_id, symbol FROM control_actions ORDER BY applied_at"
    )
    assert [(r["command"], r["outcome"]) for r in rows][:2] == [("halt", "applied"), ("halt", "unchanged")]
    assert ("flatten", "applied", None, "BTCUSDT") in [tuple(r.values()) for r in rows]


async def test_a_bad_command_is_refused_with_its_reason(pipeline: Pipeline) -> None:
    assert pipeline.client is not None
    await pipeline.client.jetstream().publish("control.halt", b'{"strategy_id": "a.b"}')
    await pipeline.client.jetstream().publish("control.explode", b"{}")
    await pipeline.wait_events(lambda _: len(controls(pipeline)) == 2, "two refusals")
    assert [c.outcome for c in controls(pipeline)] == ["rejected", "rejected"]
    assert "strategy_id must match" in controls(pipeline)[0].reason
    assert "unknown command" in controls(pipeline)[1].reason
    assert (await decided(pipeline, "alpha", "BTCUSDT", "buy", quantity="0.01", price="45000"))[
        0
    ] == "accepted"
    assert (await cli(pipeline.settings.nats_url or "", "halt", "--strategy", "no.dots")).returncode == 2


async def test_limits_from_the_risk_file(make_pipeline: Any, tmp_path: Path) -> None:
    risk_file = tmp_path / "risk.toml"
    risk_file.write_text(
        """
[default]
max_positions = 2
orders_per_minute = 3

[strategies.alpha]
symbols = ["BTCUSDT"]
max_notional = 1000
"""
    )
    async with make_pipeline(RISK_FILE=str(risk_file)) as pipeline:
        await pipeline.tick("BTCUSDT", "45000")
        await pipeline.tick("ETHUSDT", "3000")
        assert (await decided(pipeline, "alpha", "ETHUSDT", "buy", quantity="0.01"))[
            0
        ] == "symbol_not_allowed"
        assert (await decided(pipeline, "alpha", "BTCUSDT", "buy", quantity="0.02"))[0] == "accepted"  # 900
        code, over = await decided(pipeline, "alpha", "BTCUSDT", "buy", quantity="0.01")  # 1350
        assert code == "risk_limit_strategy" and (over.limit, over.figure) == (D(1000), D(1350))
        assert (await decided(pipeline, "beta", "ETHUSDT", "buy", quantity="0.01"))[0] == "accepted"
        assert (await decided(pipeline, "beta", "ETHUSDT", "buy", quantity="0.01"))[0] == "accepted"
        code, full = await decided(pipeline, "beta", "ETHUSDT", "buy", quantity="0.01")
        assert code == "risk_limit_positions" and (full.limit, full.figure) == (D(2), D(3))
        assert (await decided(pipeline, "beta", "ETHUSDT", "close"))[0] == "accepted"
        assert (await decided(pipeline, "beta", "ETHUSDT", "buy", quantity="0.01"))[0] == "accepted"
        code, fast = await decided(pipeline, "beta", "ETHUSDT", "buy", quantity="0.01")
        assert code == "rate_limited" and fast.limit == D(3)  # the fourth opening within a minute
        await pipeline.mysql_caught_up()
        rows = await pipeline.query(
            "SELECT reason_code, risk_limit, risk_figure FROM signal_decisions WHERE reason_code LIKE 'risk%%'"
            " ORDER BY reason_code"
        )
        assert [(r["reason_code"], r["risk_limit"], r["risk_figure"]) for r in rows] == [
            ("risk_limit_positions", D(2), D(3)),
            ("risk_limit_strategy", D(1000), D(1350)),
        ]


async def test_a_day_of_losses_halts_the_strategy_until_midnight(make_pipeline: Any) -> None:
    async with make_pipeline(DAILY_LOSS_LIMIT="10") as pipeline:
        await pipeline.tick("BTCUSDT", "45000")
        assert (await decided(pipeline, "alpha", "BTCUSDT", "buy", quantity="0.01", stop_loss="44000"))[
            0
        ] == "accepted"
        assert (await decided(pipeline, "beta", "BTCUSDT", "buy", quantity="0.001"))[0] == "accepted"
        await pipeline.tick("BTCUSDT", "43990")  # alpha loses about 10.1 plus fees
        halt = await eventually(
            lambda: next((c for c in controls(pipeline) if c.cause == "daily_loss"), None)
        )
        assert (halt.strategy_id, halt.outcome) == ("alpha", "applied") and halt.until is not None
        code, decision = await decided(pipeline, "alpha", "BTCUSDT", "buy", quantity="0.01")
        assert (code, decision.outcome) == ("daily_loss_limit", Outcome.REJECTED)
        assert (await decided(pipeline, "beta", "BTCUSDT", "buy", quantity="0.001"))[0] == "accepted"
        await pipeline.stop_worker()
        await pipeline.start_worker()
        assert (await decided(pipeline, "alpha", "BTCUSDT", "buy", quantity="0.01"))[0] == "daily_loss_limit"
        assert len([c for c in controls(pipeline) if c.cause == "daily_loss"]) == 1  # not halted twice
