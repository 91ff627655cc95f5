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


def recording(path: Path, funding_rate: str | None = None) -> str:
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
    if funding_rate is not None:  # paid before the TP, at the last price (45000)
        lines.insert(
            -1, {"at": "2026-11-30T12:03:00Z", "funding": {"symbol": "BTCUSDT", "rate": funding_rate}}
        )
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


async def test_funding_and_exposure_and_every_core_give_the_same_figures(tmp_path: Path) -> None:
    """A recording's funding is paid on what each configuration holds then; the grid run in
    parallel processes gives what one process gives, byte for byte; the HTML page draws each
    configuration's equity."""
    from datetime import UTC, datetime

    from engine.app.report import render_replay_html

    path = recording(tmp_path / "rec.jsonl", funding_rate="0.001")
    configs = grid(["accumulate", "strongest_wins"], ["hedge", "one-way"], ["0.6"])
    alone = await replay(path, configs, load_settings(), jobs=1)
    together = await replay(path, configs, load_settings(), jobs=2)
    assert to_json(together) == to_json(alone)
    a = alone["accumulate/hedge/conf>=0.6"]["strategies"]["A"]
    paid = -D("0.001") * D("0.01") * D("45000")  # a long pays a positive rate, at the last price
    assert a["funding"] == paid and a["net_pnl"] == D("10") - D("0.0005") * (D("450") + D("460")) + paid
    assert a["peak_exposure"] == D("450")
    only_a = alone["strongest_wins/hedge/conf>=0.6"]
    assert only_a["strategies"]["B"]["funding"] == 0  # B never held: it pays nothing
    assert alone["accumulate/hedge/conf>=0.6"]["equity"][-1][1] == a["net_pnl"] * 2  # A and B alike
    page = render_replay_html(alone, path, datetime(2026, 12, 1, tzinfo=UTC))
    assert "replay-equity-chart" in page and "* accumulate/hedge/conf&gt;=0.6" in page
    assert "strongest_wins/one-way/conf&gt;=0.6" in page and "<script src=" not in page


def test_a_bad_funding_line_is_named(tmp_path: Path) -> None:
    import pytest

    from engine.app.replay import iter_recording

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"at": "2026-11-30T12:00:00Z", "funding": {"symbol": "X", "rate": "x"}}) + "\n")
    with pytest.raises(
        ValueError, match=r"bad.jsonl:1: not a record: funding needs a symbol and a finite rate"
    ):
        list(iter_recording(str(bad)))


async def test_subjects_unlisted_symbols_open_slices_and_the_risk_file_in_force(tmp_path: Path) -> None:
    """A recorded subject is the one the worker judges (a payload naming another strategy is
    dead-lettered, as live); a symbol the paper venue does not list is named, not replayed; the
    slices still open at the end are counted; with RISK_FILE set, the grid's configuration
    without a risk file of its own is the one in force."""
    lines = [
        {"at": "2026-11-30T12:00:00Z", "tick": {"symbol": "BTCUSDT", "price": "45000"}},
        {"at": "2026-11-30T12:00:01Z", "subject": "signals.A.BTCUSDT",
         "signal": {"strategy_id": "B", "symbol": "BTCUSDT", "action": "buy", "quantity": "0.01", "signal_id": "x"}},
        {"at": "2026-11-30T12:00:02Z", "subject": "signals.A.BTCUSDT",
         "signal": {"strategy_id": "A", "symbol": "BTCUSDT", "action": "buy", "quantity": "0.01", "signal_id": "y"}},
        {"at": "2026-11-30T12:00:03Z", "tick": {"symbol": "NOPEUSDT", "price": "1"}},
    ]  # fmt: skip
    path = tmp_path / "rec.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    risk = tmp_path / "risk.toml"
    risk.write_text("[default]\nmax_positions = 5\n")
    settings = load_settings(risk_file=str(risk))
    (result,) = (await replay(str(path), grid(["accumulate"], ["hedge"], ["0.6"]), settings)).values()
    assert result["in_force"]
    assert result["strategies"]["B"]["rejected"] == {"dead:identity_mismatch": 1}
    assert result["strategies"]["A"]["opened"] == 1 and result["strategies"]["A"]["open_at_end"] == 1
    assert result["unlisted_symbols"] == ["NOPEUSDT"]


async def test_a_csv_recording_gives_what_the_same_json_lines_give(tmp_path: Path) -> None:
    import pytest

    from engine.app.replay import iter_recording

    source = recording(tmp_path / "rec.jsonl", funding_rate="0.001")
    as_csv(Path(source), tmp_path / "rec.csv")
    configs = grid(["accumulate", "strongest_wins"], ["hedge"], ["0.6", "0.8"])
    from_csv = await replay(str(tmp_path / "rec.csv"), configs, load_settings())
    assert to_json(from_csv) == to_json(await replay(source, configs, load_settings()))
    (tmp_path / "bad.csv").write_text("at,type,symbol,price\n2026-11-30T12:00:00Z,trade,BTCUSDT,1\n")
    with pytest.raises(
        ValueError, match=r"bad.csv:2: not a record: type must be one of signal, tick, funding"
    ):
        list(iter_recording(str(tmp_path / "bad.csv")))


def as_csv(source: Path, target: Path) -> None:
    """The same recording as CSV: a column per field."""
    import csv

    columns = ["at", "type", "strategy_id", "symbol", "action", "quantity", "confidence", "take_profit",
               "signal_id", "timestamp", "price", "rate"]  # fmt: skip
    with target.open("w", newline="") as out:
        writer = csv.DictWriter(out, columns)
        writer.writeheader()
        for line in source.read_text().splitlines():
            raw = json.loads(line)
            kind = next(k for k in ("signal", "tick", "funding") if k in raw)
            writer.writerow({"at": raw["at"], "type": kind, **raw[kind]})
