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
from engine.domain.price_history import PriceBar
from engine.domain.signals import Signal

MODELS: dict[str, type[Any]] = {
    "signal": Signal,
    "price_tick": PriceTick,
    "price_bar": PriceBar,
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


# pydantic writes its own constraint names (ge, gt, le, lt) beside an anyOf of number and
# decimal string, and JSON Schema ignores unknown keywords: the constraints go where a standard
# validator enforces them, on the number (bounds) and on the string (a pattern).
_STRING_PATTERNS = {
    "positive": r"^\s*\+?(?=[^eE]*[1-9])(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$",
    "fraction": r"^\s*\+?0*\.(?=\d*[1-9])\d+\s*$",
    "unit": r"^\s*\+?(0*\.\d+|0+\.?|0*1(\.0*)?)\s*$",
    "any": r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$",
}
_LIMIT = 10**9  # every amount is below 10^9 in size (docs/contract.md)


def _standard_bounds(node: Any) -> Any:
    if isinstance(node, list):
        return [_standard_bounds(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _standard_bounds(value) for key, value in node.items()}
    bounds = {key: node.pop(key) for key in ("ge", "gt", "le", "lt") if key in node}
    if not bounds:
        return node
    kind = (
        "unit" if bounds == {"ge": 0, "le": 1}
        else "fraction" if bounds == {"gt": 0, "lt": 1}
        else "positive" if bounds == {"gt": 0}
        else "any"
    )  # fmt: skip
    number: dict[str, Any] = {"type": "number", "exclusiveMaximum": _LIMIT, "exclusiveMinimum": -_LIMIT}
    names = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}
    number |= {names[key]: value for key, value in bounds.items()}
    node["anyOf"] = [number, {"type": "string", "pattern": _STRING_PATTERNS[kind]}]
    return node


def render() -> dict[str, str]:
    out: dict[str, str] = {}
    for name, model in MODELS.items():
        # Signals are validated as input; events are documented as they are written.
        mode: Any = "validation" if model in (Signal, PriceTick) else "serialization"
        schema = _standard_bounds(TypeAdapter(model).json_schema(mode=mode))
        if model is Signal:  # the worker also takes epoch seconds or milliseconds
            schema["properties"]["timestamp"]["anyOf"] = [
                {"format": "date-time", "type": "string"}, {"pattern": r"^\d+(\.\d+)?$", "type": "string"},
                {"type": "number", "minimum": 0}, {"type": "null"},
            ]  # fmt: skip
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
