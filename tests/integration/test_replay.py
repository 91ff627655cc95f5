"""Recovery reads the whole EVENTS stream through a one-off push consumer: every event, in
order, across many batches, and the consumer is gone afterwards."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from nats.aio.msg import Msg

from engine.adapters import nats_consumers
from engine.adapters.embedded_nats import EmbeddedNats
from engine.adapters.nats_bus import EVENTS_STREAM, SIGNALS_STREAM, NatsBus
from engine.adapters.nats_consumers import DurableConsumer, jetstream_sequences
from engine.domain.events import SignalDecided
from engine.domain.model import Action, Outcome, derive_id
from tests.helpers import NOW

pytestmark = pytest.mark.integration


def decision(n: int) -> SignalDecided:
    return SignalDecided(
        event_id=derive_id("replay-test", str(n)), occurred_at=NOW, signal_id=f"r{n}", strategy_id="s",
        symbol="BTCUSDT", action=Action.BUY, outcome=Outcome.REJECTED, reason_code="test", reason=str(n),
    )  # fmt: skip


def lose_once(monkeypatch: pytest.MonkeyPatch, stream_seq: int) -> list[int]:
    """The client loses the delivery of `stream_seq` once, if it is the last of what arrived
    (as a slow consumer or a reconnect can); returns the list it records the loss in."""
    taken = nats_consumers.next_batch
    lost: list[int] = []

    async def losing(sub: Any, batch: int, idle_wait: float, linger: float = 0.0) -> list[Msg]:
        msgs = await taken(sub, batch, idle_wait, linger)
        if msgs and not lost and jetstream_sequences(msgs[-1])[0] == stream_seq:
            lost.append(jetstream_sequences(msgs.pop())[0])
        return msgs

    monkeypatch.setattr(nats_consumers, "next_batch", losing)
    return lost


async def signals_consumer(bus: NatsBus, durable: str, signals: int) -> DurableConsumer:
    """A durable consumer on SIGNALS, which holds `signals` messages."""
    await bus.ensure_streams()
    for n in range(signals):
        await bus.publish_signal("signals.s.BTCUSDT", b"{}", f"{durable}-{n}")
    return await bus.durable_consumer(SIGNALS_STREAM, durable, "signals.>")


async def test_replay_reads_every_event_in_order_and_leaves_no_consumer(nats_server: EmbeddedNats) -> None:
    bus = await NatsBus.connect(nats_server.url, "replay-test")
    try:
        await bus.ensure_streams()
        assert [e async for e in bus.replay_events()] == []
        events = [decision(n) for n in range(2_500)]
        for start in range(0, len(events), 500):
            await bus.publish_events(events[start : start + 500])
        replayed = [e async for e in bus.replay_events(batch=300)]
        assert [e.event_id for e in replayed] == [e.event_id for e in events]
        assert replayed[-1] == events[-1]
        consumers = await bus.js.consumers_info(EVENTS_STREAM)
        assert [c.name for c in consumers] == []
    finally:
        await bus.close()


async def test_replay_takes_again_what_the_client_lost_at_the_end(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gap shows only when a later message arrives; the stream's last deliveries have none."""
    lost = lose_once(monkeypatch, stream_seq=300)
    bus = await NatsBus.connect(nats_server.url, "replay-test")
    try:
        await bus.ensure_streams()
        events = [decision(n) for n in range(300)]
        await bus.publish_events(events)
        async with asyncio.timeout(20):  # redelivery after ack_wait (60 s) would be too late
            replayed = [e async for e in bus.replay_events(batch=100, idle_wait=0.2)]
        assert lost == [300], "the last delivery was not lost: the test did not test anything"
        assert [e.event_id for e in replayed] == [e.event_id for e in events]
    finally:
        await bus.close()


async def test_a_live_consumer_takes_again_what_the_client_lost_at_the_end(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only replay: a role's consumer that lost its latest deliveries gets them again after
    a quiet spell, not after ack_wait (a minute)."""
    lost = lose_once(monkeypatch, stream_seq=3)
    bus = await NatsBus.connect(nats_server.url, "replay-test")
    try:
        consumer = await signals_consumer(bus, "tail-test", signals=3)
        seen: set[int] = set()
        async with asyncio.timeout(20):  # ack_wait is 60 s
            while len(seen) < 3:
                for msg in await consumer.next_batch(10, idle_wait=0.2):
                    seen.add(jetstream_sequences(msg)[0])
        assert lost == [3] and seen == {1, 2, 3}
    finally:
        await bus.close()


async def until(condition: Any, seconds: float = 10.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_delivery_waiting_in_the_client_is_not_taken_for_lost(nats_server: EmbeddedNats) -> None:
    bus = await NatsBus.connect(nats_server.url, "replay-test")
    try:
        await bus.ensure_streams()
        consumer = await bus.durable_consumer(SIGNALS_STREAM, "quiet-test", "signals.>")
        await bus.publish_signal("signals.s.BTCUSDT", b"{}", "quiet-1")
        assert consumer.sub is not None
        sub = consumer.sub
        await until(lambda: sub.pending_msgs == 1)  # delivered, not yet taken
        for _ in range(3):  # quiet spells, as next_batch would have them
            await consumer._look_for_a_lost_tail()
        assert not consumer.restarting
        assert [jetstream_sequences(m)[0] for m in await consumer.next_batch(10, idle_wait=1)] == [1]
    finally:
        await bus.close()


async def test_a_restart_whose_re_create_failed_resumes_where_it_started(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-creating is a delete, then a create. If the create fails, the consumer and its ack floor
    are gone; the next attempt must not start from the beginning of the stream."""
    bus = await NatsBus.connect(nats_server.url, "replay-test")
    try:
        consumer = await signals_consumer(bus, "restart-test", signals=5)
        taken: list[Msg] = []
        async with asyncio.timeout(10):
            while len(taken) < 3:
                taken += await consumer.next_batch(3 - len(taken), idle_wait=1)
        await taken[-1].ack()
        await bus.nc.flush()
        await consumer.restart()  # starts at 4
        subscribe = bus.js.subscribe

        async def refused(*args: Any, **kwargs: Any) -> Any:
            raise TimeoutError("the create did not get through")

        monkeypatch.setattr(bus.js, "subscribe", refused)
        with pytest.raises(TimeoutError):
            await consumer.restart()
        monkeypatch.setattr(bus.js, "subscribe", subscribe)
        await consumer.restart()
        again = await consumer.next_batch(10, idle_wait=1)
        assert [jetstream_sequences(m)[0] for m in again][:1] == [4]
    finally:
        await bus.close()


async def test_reading_a_stream_by_time_and_subject(nats_server: EmbeddedNats) -> None:
    """`read_stream` (tradeengine replay's reader): from a time, through a time, on a subject;
    a stream that does not exist holds nothing; and it leaves no consumer behind."""
    from datetime import UTC, datetime, timedelta

    bus = await NatsBus.connect(nats_server.url, "read-stream-test")
    try:
        assert [m async for m in bus.read_stream("PRICE_HISTORY")] == []  # none made yet
        await bus.ensure_streams()
        await bus.publish_events([decision(n) for n in range(5)])
        middle = datetime.now(UTC)
        await bus.publish_events([decision(n) for n in range(5, 3005)])
        whole = [m async for m in bus.read_stream(EVENTS_STREAM)]
        assert [m.metadata.sequence.stream for m in whole] == list(range(1, 3006))
        later = [m async for m in bus.read_stream(EVENTS_STREAM, since=middle)]
        assert [m.metadata.sequence.stream for m in later] == list(range(6, 3006))
        cut = whole[99].metadata.timestamp
        through = [m async for m in bus.read_stream(EVENTS_STREAM, since=middle, until=cut)]
        assert through and through[-1].metadata.timestamp <= cut < whole[len(through) + 5].metadata.timestamp
        assert [m async for m in bus.read_stream(EVENTS_STREAM, subject="positions.>")] == []
        assert [
            m async for m in bus.read_stream(EVENTS_STREAM, since=datetime.now(UTC) + timedelta(hours=1))
        ] == []
        assert len([m async for m in bus.read_stream(EVENTS_STREAM, subject="decisions.BTCUSDT")]) == 3005

        async def ours() -> list[str]:
            return [c.name async for c in _consumers(bus)]

        deadline = asyncio.get_running_loop().time() + 15
        while await ours():  # the probes lapse by themselves, the readers are removed at once
            assert asyncio.get_running_loop().time() < deadline, await ours()
            await asyncio.sleep(0.2)
    finally:
        await bus.close()


async def _consumers(bus: NatsBus) -> Any:
    for info in await bus.js.consumers_info(EVENTS_STREAM):
        yield info
