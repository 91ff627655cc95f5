"""The reason codes the engine gives are the ones its docs list."""

from __future__ import annotations

from pathlib import Path

from engine.domain.reasons import DeadLetter, Reason

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_reason_code_is_documented() -> None:
    docs = "".join(p.read_text() for p in DOCS.rglob("*.md"))
    assert [code.value for code in (*Reason, *DeadLetter) if f"`{code.value}`" not in docs] == []
