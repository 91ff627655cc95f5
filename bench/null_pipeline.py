"""The transport's own limit: consume a signal, publish one event, ack — no domain at all.

Same batch shape as the worker (fetch, publish all with acks awaited, then ack all), so the
ratio worker / null is the cost of everything tradeengine adds.

With `--floor`, each signal also costs what any worker of this wire contract must spend on it,
whatever its domain: the signal is validated (`parse_signal`), and as many real events as the
worker publishes per signal on the bench's mix (2.79) are built, encoded and stored. The ratio
worker / floor is then the cost of the domain alone: deciding, the book, TP/SL, attribution.

    python -m bench.null_pipeline URL [--floor]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from datetime import UTC, datetime
from decimal import Decimal

import uvloop

from engine.adapters.nats_bus import SIGNALS_STREAM, NatsBus
from engine.adapters.nats_consumers import jetstream_sequences
from engine.domain.events import SignalDecided, encode_event, event_subject
from engine.domain.model import Outcome, derive_id
from engine.domain.signals import Signal, parse_signal

EVENTS_PER_SIGNAL = Decimal("2.79")  # the worker's, on bench.worker_throughput's mix (bench.worker_hotpath)


def floor_events(sig: Signal, sequence: int, owed: Decimal) -> tuple[list[tuple[str, bytes, str]], Decimal]:
    """The signal's share of the worker's events (a decision each, built and encoded as the
    worker builds them), carrying the fraction over to the next signal."""
    owed += EVENTS_PER_SIGNAL
    count = int(owed)
    out = []
    for n in range(count):
        event = SignalDecided(
            event_id=derive_id("floor", sig.strategy_id, sig.id, str(n)),
            occurred_at=datetime.now(UTC),
            signal_id=sig.id,
            strategy_id=sig.strategy_id,
            symbol=sig.symbol,
            action=sig.action,
            outcome=Outcome.ACCEPTED,
            reason_code="accepted",
            reason="floor",
            strategy_position_ids=[derive_id("floor-position", sig.strategy_id, sig.id)],
            confidence=sig.confidence,
            signal_sequence=sequence,
        )
        out.append((event_subject(event), encode_event(event), event.event_id))
    return out, owed - count


async def run(url: str, floor: bool) -> None:
    bus = await NatsBus.connect(url, "null-pipeline")
    await bus.ensure_streams()
    sub = await bus.durable_consumer(SIGNALS_STREAM, "null-pipeline", "signals.>")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    owed = Decimal(0)
    print("ready", flush=True)
    while not stop.is_set():
        msgs = await sub.next_batch(256, idle_wait=0.5)
        out = []
        for msg in msgs:
            sequence = jetstream_sequences(msg)[0]
            parsed = parse_signal(msg.subject, msg.data) if floor else None
            if isinstance(parsed, Signal):
                events, owed = floor_events(parsed, sequence, owed)
                out.extend(events)
                continue
            signal_id = (msg.headers or {}).get("Nats-Msg-Id", "")
            body = json.dumps({"signal_id": signal_id, "seq": sequence}).encode()
            out.append(("decisions.null", body, f"n-{signal_id}"))
        await bus.publish_stored(out)  # the worker's own publish path: the same transport cost
        if msgs:
            await msgs[-1].ack()
    await bus.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--floor", action="store_true")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # the same loop as the worker
        runner.run(run(args.url, args.floor))
