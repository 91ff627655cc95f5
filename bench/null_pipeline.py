"""The transport's own limit: consume a signal, publish one event, ack — no domain at all.

Same batch shape as the worker (fetch, publish all with acks awaited, then ack all), so the
ratio worker / null is the cost of everything tradeengine adds. Run: python -m bench.null_pipeline URL
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import uvloop

from engine.adapters.nats_bus import SIGNALS_STREAM, NatsBus, jetstream_sequences


async def run(url: str) -> None:
    bus = await NatsBus.connect(url, "null-pipeline")
    await bus.ensure_streams()
    sub = await bus.durable_consumer(SIGNALS_STREAM, "null-pipeline", "signals.>")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    while not stop.is_set():
        msgs = await sub.next_batch(256, idle_wait=0.5)
        out = []
        for msg in msgs:
            signal_id = (msg.headers or {}).get("Nats-Msg-Id", "")
            body = json.dumps({"signal_id": signal_id, "seq": jetstream_sequences(msg)[0]}).encode()
            out.append(("decisions.null", body, f"n-{signal_id}"))
        await bus.publish_stored(out)  # the worker's own publish path: the same transport cost
        if msgs:
            await msgs[-1].ack()
    await bus.close()


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # the same loop as the worker
        runner.run(run(sys.argv[1]))
