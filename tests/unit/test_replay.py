"""`tradeengine replay` on known answers: the same recording through each conflict policy and a
MIN_CONFIDENCE gives what each policy must give by construction, the figures are exact, and two
runs are the same byte for byte. No NATS, no venue: the replay's worker has no bus."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

from engine.app.desk import to_json
from engine.app.replay import grid, load_recording, replay
from engine.config import load_settings

D = Decimal


def recording(path: Path) -> str:
    lines = [
        {"at": "2026-11-30T12:00:00Z", "tick": {"symbol": "BTCUSDT", "price": "45000"}},
        {"at": "2026-11-30T12:00:01Z", "signal": {"strategy_id": "A", "symbol": "BTCUSDT", "action": "buy",
                                                  "quantity": "0.01", "confidence": "0.9", "take_profit": "46000",
                                                  "signal_id": "a1", "timestamp": "2026-11-30T12:00:01Z"}},
        {"at": "2026-11-30T12:00:02Z", "signal": {"strategy_id": "B", "symbol": "BTCUSDT", "action": "buy",
                                                  "quantity": "0.01", "confidence": "0.7", "take_profit": "46000",
                                                  "signal_id": "b1", "timestamp": "2026-11-30T12:00:02Z"}},
        {"at": "2026-11-30T12:00:03Z", "signal": {"strategy_id": "B", "symbol": "BTCUSDT", "action": "buy"}},
        {"at": "2026-11-30T12:05:00Z", "tick": {"symbol": "BTCUSDT", "price": "46000"}},
    ]  # fmt: skip
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return str(path)


async def test_each_policy_gives_what_it_must(tmp_path: Path) -> None:
    records = load_recording(recording(tmp_path / "rec.jsonl"))
    configs = grid(["accumulate", "strongest_wins", "reject_duplicates"], ["hedge"], ["0.6", "0.8"])
    results = await replay(records, configs, load_settings())
    a_tp = D("10") - D("0.0005") * (D("450") + D("460"))  # 9.545
    for label, result in results.items():
        a = result["strategies"]["A"]
        assert (a["trades"], a["tp_hits"], a["net_pnl"]) == (1, 1, a_tp), label
        b = result["strategies"]["B"]
        assert b["rejected"].get("dead:invalid_field") == 1, label  # the buy without a size
    accumulate = results["accumulate/hedge/conf>=0.6"]
    assert accumulate["in_force"] and accumulate["strategies"]["B"]["trades"] == 1
    assert (
        results["strongest_wins/hedge/conf>=0.6"]["strategies"]["B"]["rejected"]["weaker_than_existing"] == 1
    )
    assert results["reject_duplicates/hedge/conf>=0.6"]["strategies"]["B"]["rejected"]["position_exists"] == 1
    assert results["accumulate/hedge/conf>=0.8"]["strategies"]["B"]["rejected"]["low_confidence"] == 1
    assert not results["accumulate/hedge/conf>=0.8"]["in_force"]
    again = await replay(records, configs, load_settings())
    assert to_json(again) == to_json(results)  # deterministic, byte for byte


async def test_risk_files_in_the_grid_and_csv(tmp_path: Path) -> None:
    from engine.app.replay import csv_rows

    records = load_recording(recording(tmp_path / "rec.jsonl"))
    strict, loose = tmp_path / "strict.toml", tmp_path / "loose.toml"
    strict.write_text('[strategies.B]\nsymbols = ["ETHUSDT"]\n')
    loose.write_text("[default]\nmax_positions = 5\n")
    results = await replay(
        records, grid(["accumulate"], ["hedge"], ["0.6"], [str(strict), str(loose)]), load_settings()
    )
    by_file = {label.rsplit("=", 1)[1]: r["strategies"]["B"] for label, r in results.items()}
    assert (
        by_file["strict.toml"]["rejected"]["symbol_not_allowed"] == 1
        and by_file["strict.toml"]["trades"] == 0
    )
    assert by_file["loose.toml"]["trades"] == 1
    rows = csv_rows(results)
    assert rows[0][:3] == ["configuration", "in_force", "strategy"] and len(rows) == 1 + 2 * 2
    assert any(row[2] == "A" and row[8] == "9.545" for row in rows[1:])
