"""The worker's own cost per signal, without the transport: the same signals and ticks as
`bench.worker_throughput`, fed straight into `Worker.process_batch` with a bus that encodes
each event (subject, bytes, id) as the real one does but sends nothing.

Prints microseconds per signal (the best of R fresh workers: the machine is shared) and events
and orders per signal; `--profile` adds a cProfile listing.

    python -m bench.worker_hotpath [--signals N] [--repeat R] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import random
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from bench.common import machine
from bench.worker_throughput import SYMBOLS, signal_payload
from engine.adapters.paper import PaperExchange
from engine.app.worker import Worker
from engine.config import Settings
from engine.domain.events import Event, encode_event, event_subject
from engine.logs import configure_logging


class EncodingBus:
    """Encodes what the worker publishes, as `NatsBus.publish_events` does, and keeps a count."""

    def __init__(self) -> None:
        self.events = 0
        self.on_reconnect: list[Any] = []

    async def publish_events(self, events: Sequence[Event]) -> None:
        for event in events:
            event_subject(event), encode_event(event), event.event_id
        self.events += len(events)


class FakeMsg:
    def __init__(self, subject: str, data: bytes, sequence: int) -> None:
        self.subject, self.data, self.headers = subject, data, None
        self.reply = f"$JS.ACK.SIGNALS.tradeengine-worker.1.{sequence}.{sequence}.0.0"

    async def ack(self) -> None:
        return None


def build(n: int, batch: int) -> tuple[list[list[FakeMsg]], list[list[tuple[str, bytes]]]]:
    """Batches of signals, and after each batch the ticks that arrived meanwhile (1 per 4)."""
    rng = random.Random(42)
    prices = dict(SYMBOLS)
    batches, ticks = [], []
    for start in range(0, n, batch):
        msgs = []
        for i in range(start, min(n, start + batch)):
            subject, body, _ = signal_payload(rng, i, prices)
            msgs.append(FakeMsg(subject, body, i + 1))
        batches.append(msgs)
        batch_ticks = []
        for _ in range(len(msgs) // 4):
            symbol = rng.choice(list(SYMBOLS))
            prices[symbol] *= 1 + rng.uniform(-0.003, 0.003)
            batch_ticks.append(
                (f"prices.{symbol}", f'{{"symbol":"{symbol}","price":"{prices[symbol]:.6g}"}}'.encode())
            )
        ticks.append(batch_ticks)
    return batches, ticks


async def run_once(
    n: int, profiler: cProfile.Profile | None
) -> tuple[float, Worker, EncodingBus, PaperExchange]:
    settings = Settings(max_accumulations_per_position=1_000_000, min_confidence=0)  # type: ignore[call-arg]
    bus = EncodingBus()
    venue = PaperExchange(settings.position_mode)
    worker = Worker(settings, bus, venue)  # type: ignore[arg-type]
    batches, ticks = build(n, settings.fetch_batch)
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 1000)
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    for msgs, batch_ticks in zip(batches, ticks, strict=True):
        await worker.process_batch(msgs)  # type: ignore[arg-type]
        for subject, data in batch_ticks:
            await worker.on_price_message(SimpleNamespace(subject=subject, data=data))  # type: ignore[arg-type]
        await asyncio.sleep(0)  # let the tick runners go
        while any(not t.done() for t in worker.prices.tick_runners.values()):
            await asyncio.sleep(0)
    await worker._flush()
    elapsed = time.perf_counter() - started
    if profiler:
        profiler.disable()
    gc.unfreeze()
    return elapsed, worker, bus, venue


async def run(n: int, repeat: int, profile: bool) -> None:
    configure_logging(None, "WARNING")
    profiler = cProfile.Profile() if profile else None
    print(f"# worker hot path, no transport — {machine()}")
    per_signal = []
    for _ in range(repeat):
        elapsed, worker, bus, venue = await run_once(n, profiler)
        per_signal.append(elapsed * 1e6 / n)
    print(f"  {n} signals and {n // 4} ticks a run, {bus.events / n:.2f} events and "
          f"{len(venue.orders) / n:.2f} orders per signal, {len(worker.book.positions)} positions open at the end")  # fmt: skip
    runs = " ".join(f"{us:.0f}" for us in per_signal)
    best = min(per_signal)
    print(f"  µs per signal: best {best:.1f} ({1e6 / best:,.0f} signals/s); runs: {runs}")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(35)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--signals", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run(args.signals, args.repeat, args.profile))


if __name__ == "__main__":
    main()
