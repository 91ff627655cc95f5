"""Workers over signal partitions (issue #16, item 7), each run on a private nats-server with the
paper venue listing 500 more markets:

- a burst of signals over many symbols (a candle close: 10,000 over 500 symbols by default),
  preloaded, drained by one worker without partitions and by 1, 2 and 3 workers over
  SIGNAL_PARTITIONS partitions: signals/s, and CPU-seconds per signal summed over the workers
  (which must not grow with the number of workers);
- takeover: three workers, one killed with SIGKILL holding its share, a signal published on each
  of its partitions right after the kill; the time until every one of them is decided, p50/max
  over several kills (the killed worker is started again between kills);
- restart against history: spawn to ready from a snapshot, with 100,000 and 1,000,000 events of
  history (the snapshot is the worker's own, taken after a first whole replay).

    python -m bench.partitions [--signals N] [--symbols S] [--partitions P] [--kills K] [--history 100000,1000000]
                               [--parts burst,takeover,restart]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import machine, median
from bench.memory import _ready, worker_rss
from bench.worker_throughput import worker_env
from engine.adapters.embedded_nats import EmbeddedNats, free_port
from engine.adapters.leases import PARTITIONS_BUCKET, Holder
from engine.adapters.nats_bus import SIGNALS_STREAM, NatsBus
from engine.domain.events import SignalDecided
from engine.domain.model import Action, Outcome, derive_id
from engine.domain.partitions import lane_name, partition_of
from tests.helpers import NOW

STRATEGIES = [f"strategy_{i}" for i in range(8)]


def symbols(count: int) -> list[str]:
    return [f"T{i:03d}USDT" for i in range(count)]


def env(url: str, partitions: int, extra: int, **more: str) -> dict[str, str]:
    return worker_env(url) | {
        "SIGNAL_PARTITIONS": str(partitions), "PAPER_EXTRA_MARKETS": str(extra),
        "MAX_SIGNAL_AGE_SECONDS": "3600", **more,
    }  # fmt: skip


def payload(rng: random.Random, n: int, names: list[str], tag: str = "b") -> tuple[str, bytes, str]:
    symbol, strategy = rng.choice(names), rng.choice(STRATEGIES)
    roll = rng.random()
    action = "close" if roll < 0.1 else ("buy" if roll < 0.55 else "sell")
    body: dict[str, Any] = {"strategy_id": strategy, "symbol": symbol, "action": action, "signal_id": f"{tag}{n}",
                            "confidence": "0.9", "price": "10"}  # fmt: skip
    if action != "close":
        body |= {"quantity": "1", "take_profit_pct": "0.004", "stop_loss_pct": "0.004"}
    return f"signals.{strategy}.{symbol}", json.dumps(body).encode(), f"{tag}{n}"


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spawn(environment: dict[str, str], port: int | None = None) -> subprocess.Popen[bytes]:
    if port is not None:
        environment = environment | {"HTTP_PORT": str(port)}
    return subprocess.Popen([sys.executable, "-m", "engine.cli", "worker"], env=environment,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def burst(workers: int, partitions: int, n: int, count: int, tmp: Path) -> tuple[float, float]:
    """(signals/s, CPU-seconds per signal over the workers): `n` signals published at once to
    workers that are up, from the first publish to every lane's last ack."""
    server = EmbeddedNats(free_port(), tmp / f"nats-burst-{workers}-{partitions}").start()
    names = symbols(count)
    try:
        bus = await NatsBus.connect(server.url, "bench-burst")
        bus.partitions = partitions
        await bus.ensure_streams()
        lanes: list[int | None] = [None] if partitions == 1 else list(range(partitions))
        durables = [lane_name("tradeengine-worker", p) for p in lanes]
        ports = [free_port() for _ in range(workers)]
        procs = [spawn(env(server.url, partitions, count), port) for port in ports]
        try:
            await _until(lambda: all(_ready(port) for port in ports), 120)
            if partitions > 1:
                await _until_async(lambda: _all_held(bus, partitions), 60)
                await _until(lambda: all(_ready(port) for port in ports), 120)
            rng = random.Random(42)
            cpu0, started = sum(cpu_seconds(proc.pid) for proc in procs), time.perf_counter()
            futures = []
            for i in range(n):
                subject, body, msg_id = payload(rng, i, names)
                futures.append(await bus.js.publish_async(subject, body, headers={"Nats-Msg-Id": msg_id}))
            await asyncio.gather(*futures)
            goal = await _goal(bus, lanes)
            while await _drained(bus, durables, goal) < len(durables):
                await asyncio.sleep(0.005)
            elapsed = time.perf_counter() - started
            cpu = sum(cpu_seconds(proc.pid) for proc in procs) - cpu0
        finally:
            for proc in procs:
                stop(proc)
            await bus.close()
        return n / elapsed, cpu / n
    finally:
        server.stop()


async def _goal(bus: NatsBus, lanes: list[int | None]) -> dict[int | None, int]:
    """Each lane's last stream sequence: its consumer is drained when its ack floor reaches it."""
    goal: dict[int | None, int] = {}
    for p in lanes:
        subject = "signals.>" if p is None else f"signals.*.*.{p}"
        try:
            goal[p] = (await bus.js.get_last_msg(SIGNALS_STREAM, subject)).seq or 0
        except Exception:
            goal[p] = 0
    return goal


async def _drained(bus: NatsBus, durables: list[str], goal: dict[int | None, int]) -> int:
    """How many lanes have acked their last signal."""
    done = 0
    for durable, last in zip(durables, goal.values(), strict=True):
        with contextlib.suppress(Exception):
            info = await bus.js.consumer_info(SIGNALS_STREAM, durable)
            done += (info.ack_floor.stream_seq if info.ack_floor else 0) >= last
    return done


async def takeover(partitions: int, kills: int, count: int, tmp: Path) -> list[float]:
    server = EmbeddedNats(free_port(), tmp / "nats-takeover").start()
    names = symbols(count)
    by_partition: dict[int, str] = {}
    for name in names:
        by_partition.setdefault(partition_of(name, partitions), name)
    times: list[float] = []
    try:
        bus = await NatsBus.connect(server.url, "bench-takeover")
        bus.partitions = partitions
        await bus.ensure_streams()
        decided: dict[str, float] = {}

        async def on_decision(msg: Any) -> None:
            decided.setdefault(json.loads(msg.data)["signal_id"], time.perf_counter())

        await bus.nc.subscribe("decisions.>", cb=on_decision)
        ports = [free_port() for _ in range(3)]
        procs = [spawn(env(server.url, partitions, count), port) for port in ports]
        try:
            for k in range(kills):
                await _until(lambda: all(_ready(port) for port in ports), 120)
                await _until_async(lambda: _all_held(bus, partitions), 60)
                held = await _holders(bus)
                victim = max(range(3), key=lambda i: sum(pid == procs[i].pid for pid in held.values()))
                orphans = [p for p, pid in held.items() if pid == procs[victim].pid]
                os.kill(procs[victim].pid, signal.SIGKILL)
                procs[victim].wait()
                killed = time.perf_counter()
                probes = []
                for p in orphans:
                    probe = f"probe-{k}-{p}"
                    body = {"strategy_id": "strategy_0", "symbol": by_partition[p], "action": "hold",
                            "signal_id": probe, "confidence": "0.9"}  # fmt: skip
                    await bus.js.publish(f"signals.strategy_0.{by_partition[p]}", json.dumps(body).encode())
                    probes.append(probe)
                await _until(lambda probes=probes: all(p in decided for p in probes), 120)
                times.append(max(decided[p] for p in probes) - killed)
                procs[victim] = spawn(env(server.url, partitions, count), ports[victim])
        finally:
            for proc in procs:
                stop(proc)
            await bus.close()
        return times
    finally:
        server.stop()


async def _holders(bus: NatsBus) -> dict[int, int]:
    try:
        kv = await bus.js.key_value(PARTITIONS_BUCKET)
        keys = await kv.keys()
    except Exception:
        return {}
    found = {}
    for key in keys:
        try:
            holder = Holder.decode((await kv.get(key)).value)
        except Exception:  # released since it was listed
            continue
        if holder is not None:
            found[int(key.rsplit("-p", 1)[1])] = holder.pid
    return found


async def _all_held(bus: NatsBus, partitions: int) -> bool:
    return len(await _holders(bus)) == partitions


async def _until(probe: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(probe):
        if time.monotonic() > deadline:
            raise TimeoutError("bench: a condition never came")
        await asyncio.sleep(0.01)


async def _until_async(probe: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await probe():
        if time.monotonic() > deadline:
            raise TimeoutError("bench: a condition never came")
        await asyncio.sleep(0.05)


async def restart(history: int, tmp: Path) -> tuple[float, float]:
    """(seconds from spawn to ready replaying all `history` events, from the snapshot after it)."""
    server = EmbeddedNats(free_port(), tmp / f"nats-history-{history}").start()
    try:
        bus = await NatsBus.connect(server.url, "bench-history")
        await bus.ensure_streams()
        batch = []
        for i in range(history):
            signal_id = f"h{i}"
            batch.append(SignalDecided(
                event_id=derive_id("signal.decided", "strategy_0", signal_id), occurred_at=NOW, signal_id=signal_id,
                strategy_id=STRATEGIES[i % 8], symbol="BTCUSDT", action=Action.HOLD, outcome=Outcome.IGNORED,
                reason_code="hold", reason="bench history",
            ))  # fmt: skip
            if len(batch) == 5000:
                await bus.publish_events(batch)
                batch = []
        if batch:
            await bus.publish_events(batch)
        await bus.close()
        _, whole = await worker_rss(server.url, until_snapshot=True)
        _, snapshot = await worker_rss(server.url)
        return whole, snapshot
    finally:
        server.stop()


async def bursts(args: argparse.Namespace, tmp: Path) -> None:
    print(f"burst: {args.signals:,} preloaded signals over {args.symbols} symbols, drained by")
    base_rate, base_cpu = await burst(1, 1, args.signals, args.symbols, tmp)
    print(f"  1 worker, no partitions    : {base_rate:7.0f} signals/s  {base_cpu * 1e6:6.0f} CPU-µs/signal")
    for workers in (1, 2, 3):
        rate, cpu = await burst(workers, args.partitions, args.signals, args.symbols, tmp)
        print(f"  {workers} worker(s), {args.partitions} partitions : {rate:7.0f} signals/s  "
              f"{cpu * 1e6:6.0f} CPU-µs/signal  (rate x{rate / base_rate:.2f}, CPU x{cpu / base_cpu:.2f})")  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--signals", type=int, default=10_000)
    parser.add_argument("--symbols", type=int, default=500)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--history", default="100000,1000000")
    parser.add_argument("--parts", default="burst,takeover,restart", help="which benches to run")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    print(f"# workers over partitions — {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        if "burst" in parts:
            await bursts(args, Path(tmp))
        if args.kills and "takeover" in parts:
            times = await takeover(args.partitions, args.kills, args.symbols, Path(tmp))
            print(f"takeover, 3 workers, {args.partitions} partitions, {args.kills} SIGKILLs (kill to the "
                  f"orphaned partitions' probes decided): p50 {median(times):.2f} s, max {max(times):.2f} s")  # fmt: skip
        histories = [int(h) for h in args.history.split(",") if h] if "restart" in parts else []
        for history in histories:
            whole, snapshot = await restart(history, Path(tmp))
            print(f"restart with {history:,} events of history: whole replay {whole:5.1f} s, "
                  f"from the snapshot {snapshot:4.1f} s (spawn to ready)")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
