

def test_every_reason_code_is_documented() -> None:
    from pathlib import Path

    from engine.domain.reasons import DeadLetter, Reason

    docs = "".join(p.read_text() for p in (Path(__file__).resolve().parents[2] / "docs").rglob("*.md"))
    assert [code.value for code in (*Reason, *DeadLetter) if f"`{code.value}`" not in docs] == []
