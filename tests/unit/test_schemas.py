from __future__ import annotations

import json
from decimal import Decimal

import jsonschema

from engine.schemas_gen import SCHEMA_DIR, render
from tests.helpers import Harness


def test_checked_in_schemas_match_the_models() -> None:
    for filename, text in render().items():
        path = SCHEMA_DIR / filename
        assert path.exists(), f"{filename} missing: run `make schemas`"
        assert path.read_text() == text, f"{filename} is stale: run `make schemas`"


async def test_real_events_validate_against_their_schemas() -> None:
    h = Harness()
    await h.tick("ETHUSDT", "3000")
    await h.signal("a", "ETHUSDT", "buy", quantity="0.1", confidence="0.8", take_profit_pct="0.05")
    await h.tick("ETHUSDT", "3150")
    opened, closed = h.events
    for event, name in ((opened, "position_opened"), (closed, "position_closed")):
        schema = json.loads((SCHEMA_DIR / f"{name}.json").read_text())
        document = json.loads(event.model_dump_json())
        jsonschema.validate(document, schema)
        assert isinstance(document["entry_price"], str)  # amounts travel as decimal strings
        assert Decimal(document["entry_price"]) == Decimal("3000")
        assert document["occurred_at"].endswith("Z")
