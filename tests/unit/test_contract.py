"""The reason codes the engine gives are the ones its docs list."""

from __future__ import annotations

from pathlib import Path

from engine.domain.reasons import DeadLetter, Reason

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_reason_code_is_documented() -> None:
    docs = "".join(p.read_text() for p in DOCS.rglob("*.md"))
    assert [code.value for code in (*Reason, *DeadLetter) if f"`{code.value}`" not in docs] == []


def test_the_catalogue_is_in_step_with_the_schemas_migrations_and_metrics() -> None:
    """Every event field of schemas/, every table and view of migrations/, every metric: named in
    docs/contract.md; and no link of the docs leaves the repository."""
    import json
    import re

    contract = (DOCS / "contract.md").read_text()
    root = DOCS.parent
    for path in sorted((root / "schemas").glob("*.json")):
        schema = json.loads(path.read_text())
        if path.stem in ("signal", "price_tick"):
            continue  # the input contract has its own sections
        row = next((line for line in contract.splitlines() if f"`{path.name}`" in line), "")
        assert row, f"{path.name} has no row in the catalogue"
        missing = [f for f in schema["properties"] if f not in ("event_id", "type", "schema_version", "occurred_at")
                   and f"`{f}`" not in row]  # fmt: skip
        assert missing == [], (path.name, missing)
    sql = "".join(p.read_text() for p in (root / "migrations").glob("*.sql"))
    names = set(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", sql)) | set(
        re.findall(r"CREATE (?:OR REPLACE )?VIEW (\w+)", sql)
    )
    metrics = set(re.findall(r'"(tradeengine_[a-z_]+)"', (root / "engine" / "metrics.py").read_text()))
    assert sorted(n for n in names | metrics if f"`{n}`" not in contract) == []
    for doc in [root / "README.md", *DOCS.rglob("*.md")]:
        for target in re.findall(r"\]\(([^)#]+)", doc.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (doc.parent / target).exists(), (
                    f"{doc.name}: link {target} leaves the repository or is broken"
                )
