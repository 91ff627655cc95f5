"""The attribution consumer renders a batch's SQL while the batch before it is written: the
rendering must match the one-shot rendering, and must give the event loop turns meanwhile."""

from __future__ import annotations

import asyncio
from decimal import Decimal

from engine.adapters.mysql_projection import project, project_cooperatively
from engine.adapters.mysql_sql import PAUSE_EVERY
from engine.domain.events import Event
from tests.helpers import Harness


async def history(signals: int) -> list[tuple[Event, int | None]]:
    h = Harness()
    await h.tick("ETHUSDT", Decimal(3000))
    for n in range(signals):
        await h.signal(f"s{n % 3}", "ETHUSDT", "buy" if n % 2 else "sell", signal_id=f"p{n}",
                       quantity="0.01", confidence="0.8", take_profit_pct="0.01", stop_loss_pct="0.01")  # fmt: skip
        if n % 7 == 0:
            await h.tick("ETHUSDT", Decimal(3000 + (n % 50) - 25))
    return [(event, n) for n, event in enumerate(h.events)]


async def test_cooperative_projection_is_the_same_and_yields() -> None:
    events = await history(600)
    assert len(events) > 4 * PAUSE_EVERY
    turns = 0
    done = asyncio.Event()

    async def count_turns() -> None:
        nonlocal turns
        while not done.is_set():
            turns += 1
            await asyncio.sleep(0)

    counter = asyncio.create_task(count_turns())
    cooperative = await project_cooperatively(events + events[:10], no_backslash_escapes=False)
    done.set()
    await counter
    one_shot = project(events + events[:10], no_backslash_escapes=False)
    assert cooperative.statements == one_shot.statements
    assert [e.event_id for e, _ in cooperative.events] == [e.event_id for e, _ in events]  # repeats dropped
    assert turns >= len(events) // PAUSE_EVERY
