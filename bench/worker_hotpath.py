"""The worker's own cost per signal, without the transport: the same signals and ticks as
`bench.worker_throughput`, fed straight into `Worker.process_batch` with a bus that encodes
each event (subject, bytes, id) as the real one does but sends nothing.

Prints microseconds per signal and events per signal; `--profile` adds a cProfile listing.

    python -m bench.worker_hotpath [--signals N] [--profile]
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
        self.metadata = SimpleNamespace(sequence=SimpleNamespace(stream=sequence))

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


async def run(n: int, profile: bool) -> None:
    settings = Settings(max_accumulations_per_position=1_000_000, min_confidence=0)  # type: ignore[call-arg]
    configure_logging(settings.log_format, "WARNING")
    bus = EncodingBus()
    worker = Worker(settings, bus, PaperExchange(settings.position_mode))  # type: ignore[arg-type]
    batches, ticks = build(n, settings.fetch_batch)
    gc.freeze()
    gc.set_threshold(50_000, 50, 1000)
    profiler = cProfile.Profile() if profile else None
    started, cpu_started = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    for msgs, batch_ticks in zip(batches, ticks, strict=True):
        await worker.process_batch(msgs)  # type: ignore[arg-type]
        for subject, data in batch_ticks:
            await worker.on_price_message(SimpleNamespace(subject=subject, data=data))  # type: ignore[arg-type]
        await asyncio.sleep(0)  # let the tick runners go
        while any(not t.done() for t in worker._tick_runners.values()):
            await asyncio.sleep(0)
    await worker._flush()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    if profiler:
        profiler.disable()
    print(f"# worker hot path, no transport — {machine()}")
    print(f"  {n} signals, {sum(map(len, ticks))} ticks: {elapsed * 1e6 / n:7.1f} µs per signal "
          f"(CPU {cpu * 1e6 / n:.1f} µs) "
          f"({n / elapsed:,.0f} signals/s), {bus.events / n:.2f} events per signal, "
          f"{len(worker.book.positions)} positions open at the end")  # fmt: skip
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(35)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--signals", type=int, default=20_000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run(args.signals, args.profile))


if __name__ == "__main__":
    main()
