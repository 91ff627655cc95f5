"""Risk limits: per key before conflicts, in total net of what a reversal releases."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

from engine.domain.decide import Accepted, Refused
from engine.domain.model import PositionMode
from tests.helpers import Harness

D = Decimal


async def test_the_key_limit_is_checked_before_conflicts() -> None:
    h = Harness(mode=PositionMode.ONE_WAY)
    h.rules = dataclasses.replace(h.rules, max_notional_per_key=D("500"))
    await h.tick("ETHUSDT", "3000")
    assert isinstance(await h.signal("a", "ETHUSDT", "sell", quantity="0.1", confidence="0.9"), Accepted)
    # Weaker than the open SHORT (a conflict) and over the LONG key's limit: risk is reported.
    verdict = await h.signal("b", "ETHUSDT", "buy", quantity="0.2", confidence="0.7")
    assert isinstance(verdict, Refused) and verdict.reason_code == "risk_limit_key"
    verdict = await h.signal("c", "ETHUSDT", "buy", quantity="0.1", confidence="0.7")
    assert isinstance(verdict, Refused) and verdict.reason_code == "opposite_conflict"


async def test_the_total_limit_counts_what_a_reversal_releases() -> None:
    h = Harness(mode=PositionMode.ONE_WAY)
    h.rules = dataclasses.replace(h.rules, max_total_notional=D("400"))
    await h.tick("ETHUSDT", "3000")
    assert isinstance(await h.signal("a", "ETHUSDT", "sell", quantity="0.1", confidence="0.7"), Accepted)
    too_much = await h.signal("b", "BTCUSDT", "buy", quantity="0.003", confidence="0.9", price="45000")
    assert isinstance(too_much, Refused) and too_much.reason_code == "risk_limit_total"  # 300 + 135 > 400
    # 300 open; the reversal closes them and opens 360: within the limit net of the release.
    reversal = await h.signal("c", "ETHUSDT", "buy", quantity="0.12", confidence="0.9")
    assert isinstance(reversal, Accepted), reversal
    assert h.book.total_cost() == D("360")
