"""Writes schemas/*.json from the pydantic models: `python -m engine.schemas_gen`.

The wire contract lives in the models; a test fails when the checked-in files drift."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from engine.domain.events import (
    ControlApplied,
    OrderFailed,
    OrderSettled,
    OrderSubmitted,
    PositionClosed,
    PositionFunding,
    PositionOpened,
    PositionReconciled,
    PriceTick,
    SignalDead,
    SignalDecided,
)
from engine.domain.signals import Signal

MODELS: dict[str, type[Any]] = {
    "signal": Signal,
    "price_tick": PriceTick,
    "signal_decided": SignalDecided,
    "position_opened": PositionOpened,
    "position_closed": PositionClosed,
    "signal_dead": SignalDead,
    "order_submitted": OrderSubmitted,
    "order_settled": OrderSettled,
    "order_failed": OrderFailed,
    "position_reconciled": PositionReconciled,
    "position_funding": PositionFunding,
    "control_applied": ControlApplied,
}
SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas"


def render() -> dict[str, str]:
    out: dict[str, str] = {}
    for name, model in MODELS.items():
        # Signals are validated as input; events are documented as they are written.
        mode: Any = "validation" if model in (Signal, PriceTick) else "serialization"
        schema = TypeAdapter(model).json_schema(mode=mode)
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://tradeengine.dev/schemas/{name}.json"
        out[f"{name}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def main() -> int:
    SCHEMA_DIR.mkdir(exist_ok=True)
    for filename, text in render().items():
        (SCHEMA_DIR / filename).write_text(text)
        print(f"wrote schemas/{filename}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
