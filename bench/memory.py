"""Worker RSS with 100,000 open strategy positions (paper mode), against an empty worker.

The positions are stored as events, and the worker rebuilds its book from them on start, so this
also times recovery. Target (issue #6): < 150 MB.

    python -m bench.memory [--positions N]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
import urllib.request
from decimal import Decimal
from pathlib import Path

from bench.common import machine, rss_mb
from bench.worker_throughput import worker_env
from engine.adapters.embedded_nats import EmbeddedNats, free_port
from engine.adapters.nats_bus import NatsBus
from engine.adapters.snapshots import SnapshotStore
from engine.domain.events import ContributionRef, ExchangePositionRef, PositionOpened, SignalDecided
from engine.domain.model import Action, Outcome, PositionSide, derive_client_order_id, derive_id
from tests.helpers import NOW

SYMBOLS = ["BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "ADAUSDT", "DOGEUSDT"]


def events(n: int) -> list[PositionOpened | SignalDecided]:
    out: list[PositionOpened | SignalDecided] = []
    totals: dict[str, Decimal] = {}
    sequences: dict[str, int] = {}
    for i in range(n):
        symbol = SYMBOLS[i % len(SYMBOLS)]
        side = PositionSide.LONG if (i // len(SYMBOLS)) % 2 else PositionSide.SHORT
        key = f"{symbol}_{side.value}"
        qty = Decimal("0.01")
        before = totals.get(key, Decimal(0))
        totals[key] = before + qty
        sequences[key] = sequences.get(key, 0) + 1
        strategy, signal_id = f"strategy_{i % 8}", f"m{i}"
        sp = derive_id("strategy-position", strategy, signal_id)
        entry = Decimal(100 + i % 50)
        out.append(PositionOpened(
            event_id=derive_id("position.opened", sp), occurred_at=NOW, strategy_position_id=sp,
            strategy_id=strategy, signal_id=signal_id, symbol=symbol, side=side, quantity=qty, entry_price=entry,
            take_profit_price=entry * Decimal("1.5") if side is PositionSide.LONG else entry / 2,
            stop_loss_price=entry / 2 if side is PositionSide.LONG else entry * Decimal("1.5"),
            fee=Decimal("0.0005") * entry * qty, client_order_id=derive_client_order_id(signal_id),
            exchange_order_id=f"paper-{i}", confidence=Decimal("0.8"),
            exchange_position=ExchangePositionRef(
                exchange_position_id=derive_id("ep", key), key=key, quantity_before=before,
                quantity_after=before + qty, avg_entry_price=entry,
            ),
            contribution=ContributionRef(contribution_id=derive_id("contribution", sp), sequence=sequences[key]),
        ))  # fmt: skip
        out.append(SignalDecided(
            event_id=derive_id("signal.decided", strategy, signal_id), occurred_at=NOW, signal_id=signal_id,
            strategy_id=strategy, symbol=symbol, action=Action.BUY if side is PositionSide.LONG else Action.SELL,
            outcome=Outcome.ACCEPTED, reason_code="accepted", reason="bench", strategy_position_ids=[sp],
        ))  # fmt: skip
    return out


async def worker_rss(url: str, until_snapshot: bool = False) -> tuple[float, float]:
    """(RSS in MB once ready, seconds from spawn to ready); with `until_snapshot`, the worker
    runs on until its snapshot of the state is stored."""
    port = free_port()
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "worker"], env={**worker_env(url), "HTTP_PORT": str(port)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        while not await asyncio.to_thread(_ready, port):  # /readyz turns 200 after recovery
            await asyncio.sleep(0.05)
        ready = time.perf_counter() - started
        await asyncio.sleep(0.5)  # let the allocator settle after recovery
        rss = rss_mb(proc.pid)
        if until_snapshot:
            await _snapshot_stored(url)
        return rss, ready
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def _snapshot_stored(url: str) -> None:
    bus = await NatsBus.connect(url, "bench-snapshot")
    try:
        store = SnapshotStore(bus.js, "tradeengine-worker", None)
        while await store.load() is None:
            await asyncio.sleep(0.2)
    finally:
        await bus.close()


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
            return bool(resp.status == 200)
    except Exception:
        return False


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--positions", type=int, default=100_000)
    args = parser.parse_args()
    print(f"# worker memory — {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedNats(free_port(), Path(tmp) / "nats").start()
        try:
            bus = await NatsBus.connect(server.url, "bench-loader")
            await bus.ensure_streams()
            empty, _ = await worker_rss(server.url)
            history = events(args.positions)
            for i in range(0, len(history), 2000):
                await bus.publish_events(history[i : i + 2000])
            await bus.close()
            loaded, recovery = await worker_rss(server.url, until_snapshot=True)
            _, from_snapshot = await worker_rss(server.url)
        finally:
            server.stop()
    print(f"  empty worker                 : {empty:6.0f} MB RSS")
    print(f"  {args.positions:,} open positions : {loaded:6.0f} MB RSS   (target < 150 MB)")
    print(f"  per position                 : {(loaded - empty) * 1024 * 1024 / args.positions:6.0f} bytes")
    print(f"  recovery ({len(history):,} events)  : {recovery:6.1f} s from spawn to ready")
    print(
        f"  recovery from a snapshot     : {from_snapshot:6.1f} s from spawn to ready (SNAPSHOT_EVERY_EVENTS)"
    )


if __name__ == "__main__":
    asyncio.run(main())
