"""Worker throughput and latency against the null pipeline, on a private nats-server.

Prints signals/s for the worker and for the null pipeline over the same preloaded signals, their
ratio, and p50/p99 signal -> decision latency at a fixed offered rate. A third run, the floor,
adds to the null pipeline what any worker must spend per signal besides its domain (validation,
and building, encoding and storing as many events), so worker / floor is the domain's own cost.
Targets (issue #6):
>= 5,000 signals/s, ratio >= 0.5, p99 < 5 ms at 1,000/s.

    python -m bench.worker_throughput [--signals N] [--rate R] [--seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import machine, percentile, rss_mb
from engine.adapters.embedded_nats import EmbeddedNats, free_port
from engine.adapters.nats_bus import SIGNALS_STREAM, NatsBus

SYMBOLS = {"BTCUSDT": 45000.0, "ETHUSDT": 3000.0, "BNBUSDT": 600.0, "SOLUSDT": 150.0,
           "XRPUSDT": 0.6, "ADAUSDT": 0.5, "DOGEUSDT": 0.15}  # fmt: skip
QTY = {"BTCUSDT": "0.001", "ETHUSDT": "0.01", "BNBUSDT": "0.05", "SOLUSDT": "0.1",
       "XRPUSDT": "20", "ADAUSDT": "20", "DOGEUSDT": "100"}  # fmt: skip
STRATEGIES = [f"strategy_{i}" for i in range(8)]


def signal_payload(rng: random.Random, n: int, prices: dict[str, float]) -> tuple[str, bytes, str]:
    symbol = rng.choice(list(SYMBOLS))
    strategy = rng.choice(STRATEGIES)
    roll = rng.random()
    action = "close" if roll < 0.1 else ("buy" if roll < 0.55 else "sell")
    payload: dict[str, Any] = {
        "strategy_id": strategy, "symbol": symbol, "action": action, "signal_id": f"b{n}",
        "confidence": round(rng.uniform(0.65, 0.99), 2), "price": prices[symbol],
    }  # fmt: skip
    if action != "close":
        payload |= {"quantity": QTY[symbol], "take_profit_pct": 0.004, "stop_loss_pct": 0.004}
    return f"signals.{strategy}.{symbol}", json.dumps(payload).encode(), f"b{n}"


def worker_env(url: str) -> dict[str, str]:
    return {
        **os.environ, "NATS_URL": url, "MAX_ACCUMULATIONS_PER_POSITION": "1000000", "MIN_CONFIDENCE": "0",
        "LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"), "LOG_FORMAT": "json",
    }  # fmt: skip


def start(kind: str, url: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "engine.cli", "worker"] if kind == "worker" else [
        sys.executable, "-m", "bench.null_pipeline", url, *(["--floor"] if kind == "floor" else [])]  # fmt: skip
    return subprocess.Popen(cmd, env=worker_env(url), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def ticker(
    nc: Any, prices: dict[str, float], rng: random.Random, done: asyncio.Event, rate: float
) -> int:
    """Random-walk ticks so TP/SL levels (0.4% away) are crossed while signals flow."""
    sent = 0
    while not done.is_set():
        symbol = rng.choice(list(SYMBOLS))
        prices[symbol] *= 1 + rng.uniform(-0.003, 0.003)
        await nc.publish(
            f"prices.{symbol}", json.dumps({"symbol": symbol, "price": f"{prices[symbol]:.6g}"}).encode()
        )
        sent += 1
        await asyncio.sleep(1 / rate)
    return sent


async def throughput(kind: str, n: int, tmp: Path) -> tuple[float, int, float]:
    server = EmbeddedNats(free_port(), tmp / f"nats-{kind}").start()
    rng = random.Random(42)
    prices = dict(SYMBOLS)
    try:
        bus = await NatsBus.connect(server.url, "bench-driver")
        await bus.ensure_streams()
        futures = []
        for i in range(n):
            subject, body, msg_id = signal_payload(rng, i, prices)
            futures.append(await bus.js.publish_async(subject, body, headers={"Nats-Msg-Id": msg_id}))
        await asyncio.gather(*futures)
        durable = "tradeengine-worker" if kind == "worker" else "null-pipeline"  # floor: a null pipeline
        proc = start(kind, server.url)
        done = asyncio.Event()
        ticks = asyncio.create_task(ticker(bus.nc, prices, rng, done, rate=500))
        first = last = 0.0
        try:
            while True:
                try:
                    info = await bus.js.consumer_info(SIGNALS_STREAM, durable)
                except Exception:
                    await asyncio.sleep(0.02)
                    continue
                acked = info.ack_floor.stream_seq if info.ack_floor else 0
                if acked and not first:
                    first = time.perf_counter()
                if acked >= n:
                    last = time.perf_counter()
                    break
                await asyncio.sleep(0.01)
            peak = rss_mb(proc.pid)
        finally:
            done.set()
            tick_count = await ticks
            stop(proc)
            await bus.close()
        return n / (last - first), tick_count, peak
    finally:
        server.stop()


async def latency(kind: str, rate: int, seconds: float, tmp: Path, tick_rate: float = 0) -> list[float]:
    """Signal -> decision latency at a steady offered rate. With `tick_rate`, prices move as in
    the throughput run, so TPs and SLs keep the book at its usual size; without, nothing ever
    closes but close signals, and each of them closes a strategy's ever-growing pile at once."""
    server = EmbeddedNats(free_port(), tmp / f"nats-lat-{kind}-{tick_rate:.0f}").start()
    rng = random.Random(7)
    prices = dict(SYMBOLS)
    try:
        bus = await NatsBus.connect(server.url, "bench-latency")
        await bus.ensure_streams()
        proc = start(kind, server.url)
        sent: dict[str, float] = {}
        received: dict[str, float] = {}

        async def on_decision(msg: Any) -> None:
            now = time.perf_counter()
            received.setdefault(json.loads(msg.data)["signal_id"], now)

        await bus.nc.subscribe("decisions.>", cb=on_decision)
        consumer = "tradeengine-worker" if kind == "worker" else "null-pipeline"
        while True:  # ready once its durable consumer exists
            try:
                await bus.js.consumer_info(SIGNALS_STREAM, consumer)
                break
            except Exception:
                await asyncio.sleep(0.05)
        total = int(rate * seconds)
        done = asyncio.Event()
        ticks = (
            asyncio.create_task(ticker(bus.nc, prices, random.Random(11), done, tick_rate))
            if tick_rate
            else None
        )
        started = time.perf_counter()
        for i in range(total):
            target = started + i / rate
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            subject, body, msg_id = signal_payload(rng, i, prices)
            sent[msg_id] = time.perf_counter()
            await bus.nc.publish(subject, body, headers={"Nats-Msg-Id": msg_id})
        deadline = time.perf_counter() + 30
        while len(received) < total and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        done.set()
        if ticks is not None:
            await ticks
        stop(proc)
        await bus.close()
        # the first second is warm-up (imports, JIT-less caches, first consumer pulls)
        return [(received[k] - sent[k]) * 1000 for k in sent if k in received and sent[k] > started + 1]
    finally:
        server.stop()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--signals", type=int, default=20_000)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    print(f"# worker vs null pipeline — {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        null_rate, _, _ = await throughput("null", args.signals, Path(tmp))
        floor_rate, _, _ = await throughput("floor", args.signals, Path(tmp))
        worker_rate, ticks, rss = await throughput("worker", args.signals, Path(tmp))
        print(f"throughput, {args.signals} preloaded signals (8 strategies, 7 symbols, both sides, closes):")
        print(f"  null pipeline : {null_rate:8.0f} signals/s")
        print(
            f"  floor         : {floor_rate:8.0f} signals/s  (validation + the worker's 2.79 events, no domain)"
        )
        print(
            f"  worker        : {worker_rate:8.0f} signals/s  ({ticks} ticks sent meanwhile, RSS {rss:.0f} MB)"
        )
        print(f"  ratio         : {worker_rate / null_rate:8.2f}   (targets: >= 5000/s, ratio >= 0.5)")
        print(f"  worker / floor: {worker_rate / floor_rate:8.2f}   (what the domain itself costs)")
        for tick_rate, workload in (
            (500, "500 ticks/s: TPs/SLs close slices"),
            (0, "no ticks: slices pile up"),
        ):
            for kind in ("null", "worker"):
                lat = await latency(kind, args.rate, args.seconds, Path(tmp), tick_rate)
                print(f"latency at {args.rate}/s, {workload:<34}, {kind:<6}: p50 {percentile(lat, 50):6.2f} ms  "
                      f"p99 {percentile(lat, 99):6.2f} ms  max {max(lat):6.2f} ms  (n={len(lat)})")  # fmt: skip
        print("  (target: worker p99 < 5 ms)")


if __name__ == "__main__":
    asyncio.run(main())
