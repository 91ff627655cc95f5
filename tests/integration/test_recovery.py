"""Restarts and redeliveries: the worker rebuilds its book from EVENTS and never executes twice."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from prometheus_client import REGISTRY

from engine.adapters.nats_bus import SIGNALS_STREAM, NatsBus
from engine.adapters.paper import PaperExchange
from engine.app.worker import Worker
from engine.domain.model import CloseReason, Outcome
from tests.helpers import make_signal
from tests.integration.harness import Pipeline, eventually, eventually_async

D = Decimal
pytestmark = pytest.mark.integration


async def test_restart_rebuilds_the_book_and_tp_still_fires(pipeline: Pipeline) -> None:
    await pipeline.tick("ETHUSDT", "3000")
    await pipeline.decision(
        await pipeline.publish("a", "ETHUSDT", "buy", quantity="0.1", confidence=0.8, take_profit=3100)
    )
    await pipeline.decision(await pipeline.publish("b", "ETHUSDT", "sell", quantity="0.2", confidence=0.8))
    await pipeline.decision(await pipeline.publish("b", "ETHUSDT", "close", quantity="0.05"))
    assert pipeline.worker is not None
    before = {pid: sp.remaining for pid, sp in pipeline.worker.book.positions.items()}

    await pipeline.stop_worker()
    worker = await pipeline.start_worker()
    assert {pid: sp.remaining for pid, sp in worker.book.positions.items()} == before
    assert isinstance(worker.gateway, PaperExchange)
    assert worker.gateway.position("ETHUSDT", "SHORT") == D("0.15")  # type: ignore[arg-type]

    await pipeline.tick("ETHUSDT", "3100")
    await pipeline.wait_events(
        lambda _: any(c.close_reason is CloseReason.TAKE_PROFIT for c in pipeline.closed()), "TP"
    )
    tp = next(c for c in pipeline.closed() if c.close_reason is CloseReason.TAKE_PROFIT)
    assert tp.strategy_id == "a" and tp.realized_pnl == D("10") - D("0.15") - D("0.155")


async def test_signal_redelivered_after_a_crash_is_not_executed_again(pipeline: Pipeline) -> None:
    """A worker stores a signal's events, then dies before acking: JetStream redelivers it."""
    await pipeline.tick("BTCUSDT", "45000")
    await pipeline.stop_worker()
    sid = await pipeline.publish("s1", "BTCUSDT", "buy", quantity="0.001", confidence=0.9)

    assert pipeline.settings.nats_url
    doomed_bus = await NatsBus.connect(pipeline.settings.nats_url, "doomed-worker")
    doomed = Worker(pipeline.settings, doomed_bus, PaperExchange())
    doomed.last_prices["BTCUSDT"] = D("45000")
    sub = await doomed_bus.durable_consumer(SIGNALS_STREAM, pipeline.settings.worker_durable, "signals.>")
    (msg,) = await sub.next_batch(1, idle_wait=5)
    await doomed.on_signal_message(msg)
    await doomed._flush()  # events stored ...
    await msg.nak()  # ... and the ack never comes: redelivered at once
    await doomed_bus.close()

    skipped_before = REGISTRY.get_sample_value("tradeengine_signals_redelivered_total") or 0
    worker = await pipeline.start_worker()
    assert pipeline.worker_bus is not None
    js = pipeline.worker_bus.js

    async def redelivery_acked() -> bool:
        info = await js.consumer_info(SIGNALS_STREAM, pipeline.settings.worker_durable)
        return info.num_redelivered == 0 and info.num_pending == 0 and info.num_ack_pending == 0

    await eventually_async(redelivery_acked, what="the redelivered signal to be acked")
    assert REGISTRY.get_sample_value("tradeengine_signals_redelivered_total") == skipped_before + 1
    await pipeline.decision(sid)
    assert [d.outcome for d in pipeline.decisions()] == [Outcome.ACCEPTED]
    assert len(pipeline.opened()) == 1
    assert isinstance(worker.gateway, PaperExchange) and worker.gateway.orders == {}


async def test_open_stored_but_decision_lost_is_completed_not_re_executed(pipeline: Pipeline) -> None:
    await pipeline.tick("BTCUSDT", "45000")
    await pipeline.decision(
        await pipeline.publish("s1", "BTCUSDT", "buy", quantity="0.001", confidence=0.9, signal_id="x1")
    )
    opened = pipeline.opened()[0]
    await pipeline.stop_worker()
    # Re-create the crash window on a fresh server state: same opened event, no decision.
    worker = Worker(pipeline.settings, NatsBus(pipeline.client), PaperExchange())  # type: ignore[arg-type]
    worker.ledger.apply(opened)
    worker.book.apply(opened)
    await worker.on_signal(
        make_signal("s1", "BTCUSDT", "buy", quantity="0.001", confidence="0.9", signal_id="x1"), 99
    )
    (decided,) = worker._outbox
    assert decided.type == "signal.decided" and decided.reason_code == "recovered"  # type: ignore[union-attr]
    assert worker.gateway.orders == {}  # type: ignore[attr-defined]


async def test_duplicate_after_restart_is_recognised(pipeline: Pipeline) -> None:
    await pipeline.tick("BTCUSDT", "45000")
    await pipeline.decision(
        await pipeline.publish("s1", "BTCUSDT", "buy", quantity="0.001", confidence=0.9, signal_id="dup")
    )
    await pipeline.stop_worker()
    await pipeline.start_worker()
    again = b'{"strategy_id":"s1","symbol":"BTCUSDT","action":"buy","quantity":0.001,"signal_id":"dup"}'
    await pipeline.publish_raw("signals.s1.BTCUSDT", again, "second-publication")
    await pipeline.wait_events(lambda _: len(pipeline.decisions()) == 2, "duplicate decision")
    assert pipeline.decisions()[1].outcome is Outcome.DUPLICATE
    assert len(pipeline.opened()) == 1


async def test_a_delivery_the_client_never_saw_is_not_acked_past(pipeline: Pipeline) -> None:
    """Ack policy ALL acknowledges everything up to the acked message: a delivery the client
    dropped (a slow consumer) must be fetched again, not acknowledged unprocessed."""
    await pipeline.stop_worker()
    sids = [await pipeline.publish("s1", "BTCUSDT", "hold", signal_id=f"gap-{n}") for n in range(3)]
    assert pipeline.settings.nats_url
    bus = await NatsBus.connect(pipeline.settings.nats_url, "gap-test")
    try:
        consumer = await bus.durable_consumer(SIGNALS_STREAM, pipeline.settings.worker_durable, "signals.>")
        assert consumer.sub is not None
        await consumer.sub.next_msg(timeout=5)  # delivered, never seen by the role
        await eventually(lambda: consumer.sub is not None and consumer.sub.pending_msgs == 2, what="the rest")
        assert not consumer.restarting
        assert await consumer.next_batch(10, idle_wait=1) == []  # the gap is noticed at once
        assert consumer.restarting  # roles send their pending acks before the next call
        batch = await consumer.next_batch(10, idle_wait=5)  # re-created at the ack floor
        assert not consumer.restarting
        assert [m.metadata.sequence.stream for m in batch] == [1, 2, 3]
        assert [json.loads(m.data)["signal_id"] for m in batch] == sids
    finally:
        await bus.close()
