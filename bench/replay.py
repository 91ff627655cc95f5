"""`tradeengine replay` speed (issue #18): records per second through one configuration, and a
grid's wall time in one process against one process per core, in the same run.

A synthetic desk: SIGNALS signals over SYMBOLS symbols from 8 strategies with TP/SL, and TICKS
ticks of a random walk between them, written as a recording once and replayed per
configuration. The issue's scale (1,000,000 signals and 10,000,000 ticks per configuration, in
minutes) is extrapolated from the per-record rates printed here.

    python -m bench.replay [--signals N] [--ticks N] [--grid N]"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from bench.common import machine
from engine.app.replay import grid, replay
from engine.config import load_settings
from engine.logs import configure_logging

SYMBOLS = ["BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT"]


def write_recording(path: Path, signals: int, ticks: int, seed: int = 18) -> None:
    rng = random.Random(seed)
    prices = {"BTCUSDT": 45000.0, "ETHUSDT": 3000.0, "BNBUSDT": 600.0, "SOLUSDT": 150.0, "XRPUSDT": 0.6}
    quantity = {"BTCUSDT": "0.001", "ETHUSDT": "0.01", "BNBUSDT": "0.05", "SOLUSDT": "0.1", "XRPUSDT": "10"}
    at = datetime(2026, 11, 1, tzinfo=UTC)
    every = max(1, ticks // max(1, signals))  # ticks between two signals
    with path.open("w") as out:
        sent_signals = sent_ticks = 0
        while sent_signals < signals or sent_ticks < ticks:
            at += timedelta(milliseconds=250)
            if sent_ticks < ticks:
                symbol = rng.choice(SYMBOLS)
                prices[symbol] *= 1 + rng.gauss(0, 0.002)
                price = f"{prices[symbol]:.4f}" if prices[symbol] < 10 else f"{prices[symbol]:.2f}"
                out.write(
                    json.dumps({"at": at.isoformat(), "tick": {"symbol": symbol, "price": price}}) + "\n"
                )
                sent_ticks += 1
            if sent_signals < signals and (sent_ticks % every == 0 or sent_ticks >= ticks):
                symbol = rng.choice(SYMBOLS)
                action = rng.choices(["buy", "sell", "close"], [4, 4, 1])[0]
                payload: dict[str, object] = {
                    "strategy_id": f"s{rng.randrange(8)}", "symbol": symbol, "action": action,
                    "confidence": rng.choice(["0.55", "0.65", "0.75", "0.9"]), "signal_id": f"sig-{sent_signals}",
                }  # fmt: skip
                if action != "close":
                    payload |= {
                        "quantity": quantity[symbol],
                        "take_profit_pct": "0.01",
                        "stop_loss_pct": "0.01",
                    }
                out.write(json.dumps({"at": at.isoformat(), "signal": payload}) + "\n")
                sent_signals += 1


async def from_streams(signals: int, bars: int, tmp: Path) -> tuple[float, dict[str, int]]:
    """Seconds `record_from_streams` takes to read `signals` signals and `bars` four-point bars
    back from a private nats-server into a recording."""
    from engine.adapters.embedded_nats import EmbeddedNats, free_port
    from engine.adapters.nats_bus import PRICE_HISTORY_STREAM, NatsBus
    from engine.app.replay import record_from_streams
    from engine.domain.price_history import PriceBar, PricePoint, encode_bar

    server = EmbeddedNats(free_port(), tmp / "nats").start()
    try:
        bus = await NatsBus.connect(server.url, "bench-replay")
        bus.price_history_days = 30
        await bus.ensure_streams()
        for n in range(0, signals, 1000):
            await asyncio.gather(*(
                bus.js.publish(f"signals.s{i % 8}.BTCUSDT", json.dumps({
                    "strategy_id": f"s{i % 8}", "symbol": "BTCUSDT", "action": "buy", "quantity": "0.001",
                    "confidence": "0.9", "signal_id": f"b-{i}"}).encode())
                for i in range(n, min(n + 1000, signals))
            ))  # fmt: skip
        start = datetime.now(UTC) - timedelta(seconds=10 * bars)
        batch = []
        for i in range(bars):
            at = start + timedelta(seconds=10 * i)
            points = tuple(PricePoint(at + timedelta(seconds=k), Decimal(45000 + k)) for k in range(4))
            bar = PriceBar(SYMBOLS[i % 5], at, 10, points, 4)
            batch.append((f"price_history.{bar.symbol}", encode_bar(bar), bar.msg_id))
            if len(batch) == 1000:
                await bus.publish_stored(batch, stream=PRICE_HISTORY_STREAM)
                batch = []
        if batch:
            await bus.publish_stored(batch, stream=PRICE_HISTORY_STREAM)
        started = time.perf_counter()
        recorded = await record_from_streams(bus, str(tmp / "from-streams.jsonl"), start, datetime.now(UTC))
        seconds = time.perf_counter() - started
        await bus.close()
        assert recorded.counts["signals"] == signals, recorded.counts
        return seconds, recorded.counts
    finally:
        server.stop()


async def run(signals: int, ticks: int, configs: int) -> dict[str, float]:
    settings = load_settings(exchange="paper", http_port=None)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "recording.jsonl"
        write_recording(path, signals, ticks)
        records = signals + ticks
        one = grid(["accumulate"], ["hedge"], ["0.6"])
        started = time.perf_counter()
        result = await replay(str(path), one, settings, jobs=1)
        single = time.perf_counter() - started
        trades = sum(f["trades"] for f in next(iter(result.values()))["strategies"].values())
        several = grid(["accumulate", "strongest_wins", "reject_duplicates", "accumulate"][:configs] or ["accumulate"],
                       ["hedge"], ["0.6"])[:configs]  # fmt: skip
        while len(several) < configs:
            several += grid(["accumulate"], ["one-way"], [f"0.{5 + len(several)}"])
        started = time.perf_counter()
        alone = await replay(str(path), several, settings, jobs=1)
        sequential = time.perf_counter() - started
        started = time.perf_counter()
        together = await replay(str(path), several, settings, jobs=os.cpu_count() or 1)
        parallel = time.perf_counter() - started
        assert json.dumps(alone, default=str) == json.dumps(together, default=str)  # the same figures
    return {
        "records": records, "trades": trades, "single_s": single, "records_per_s": records / single,
        "signals_per_s_share": signals / single, "configs": len(several), "sequential_s": sequential,
        "parallel_s": parallel, "speedup": sequential / parallel,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--signals", type=int, default=20_000)
    parser.add_argument("--ticks", type=int, default=200_000)
    parser.add_argument("--grid", type=int, default=4)
    args = parser.parse_args()
    configure_logging(None, "WARNING")  # as the command does: the replay's decisions are figures
    figures = asyncio.run(run(args.signals, args.ticks, args.grid))
    with tempfile.TemporaryDirectory() as scratch:
        bars = args.ticks // 4
        seconds, counts = asyncio.run(from_streams(args.signals, bars, Path(scratch)))
    print(f"machine: {machine()}")
    print(f"recording: {args.signals:,} signals, {args.ticks:,} ticks, 5 symbols, 8 strategies")
    print(f"one configuration: {figures['single_s']:.1f} s, {figures['records_per_s']:,.0f} records/s, "
          f"{figures['trades']:,.0f} closes")  # fmt: skip
    print(f"grid of {figures['configs']:.0f}: one process {figures['sequential_s']:.1f} s, "
          f"{os.cpu_count()} processes {figures['parallel_s']:.1f} s (x{figures['speedup']:.2f}), same figures")  # fmt: skip
    print(f"extrapolated at this rate and mix, 1M signals + 10M ticks per configuration: about "
          f"{11_000_000 / figures['records_per_s'] / 60:.0f} min")  # fmt: skip
    rate = (counts["signals"] + bars) / seconds
    print(f"reading them from NATS (record_from_streams): {counts['signals']:,} signals and {bars:,} bars "
          f"({counts['ticks']:,} ticks) in {seconds:.1f} s, {rate:,.0f} messages/s; 1M signals + 2.5M bars: about "
          f"{3_500_000 / rate / 60:.0f} min")  # fmt: skip


if __name__ == "__main__":
    main()
