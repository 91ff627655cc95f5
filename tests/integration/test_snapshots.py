"""A start independent of history (issue #16): the worker snapshots its state every
SNAPSHOT_EVERY_EVENTS stored events; the next start loads the snapshot and replays only the
events after it, and ends with the state a whole replay gives."""

from __future__ import annotations

import random
from typing import Any

import pytest

from engine.adapters.nats_bus import NatsBus
from engine.adapters.snapshots import SnapshotStore
from engine.app.desk import fold_events
from tests.integration.harness import eventually_async

pytestmark = pytest.mark.integration


async def test_a_restart_loads_the_snapshot_and_replays_only_the_tail(make_pipeline: Any) -> None:
    rng = random.Random(7)
    async with make_pipeline(SNAPSHOT_EVERY_EVENTS="40") as pipeline:
        assert pipeline.client is not None
        await pipeline.tick("ETHUSDT", "3000")
        for n in range(40):
            action = rng.choice(["buy", "sell", "buy", "close"])
            fields = {"confidence": "0.9", "signal_id": f"s-{n}"} | (
                {} if action == "close" else {"quantity": "0.1"}
            )
            if action != "close":
                fields |= {"take_profit_pct": "0.01", "stop_loss_pct": "0.01"}
            await pipeline.decision(await pipeline.publish(f"st{n % 3}", "ETHUSDT", action, **fields))
            if n % 7 == 6:
                await pipeline.tick("ETHUSDT", rng.choice(["2960", "3000", "3040"]))
        store = SnapshotStore(pipeline.client.jetstream(), pipeline.settings.worker_durable, None)

        async def snapshot_taken() -> bool:
            return await store.load() is not None

        await eventually_async(snapshot_taken, timeout=20, what="a snapshot")
        seq, _, _ = await store.load() or (0, "", {})
        total = await pipeline.stored_event_count()
        assert 0 < seq <= total
        await pipeline.stop_worker()
        await pipeline.start_worker()
        worker = pipeline.worker
        assert worker is not None
        whole = await fold_events(NatsBus(pipeline.client))
        assert list(worker.book.positions.values()) == list(whole.book.positions.values())
        assert worker.book.exchange == whole.book.exchange
        assert worker.ledger._signals == whole.ledger._signals
        assert worker.recovered == (seq, total - seq)  # the tail only


async def test_a_snapshot_without_the_workers_signature_is_not_loaded(make_pipeline: Any) -> None:
    """With EVENTS_SIGNING_KEY, a snapshot someone else wrote (here: an empty book, signed with
    another key) is ignored, and the whole stream is replayed."""
    key = "a-signing-key-of-the-desk-0123"
    async with make_pipeline(EVENTS_SIGNING_KEY=key, SNAPSHOT_EVERY_EVENTS="1000") as pipeline:
        assert pipeline.client is not None and pipeline.worker is not None
        await pipeline.tick("ETHUSDT", "3000")
        await pipeline.decision(
            await pipeline.publish("s1", "ETHUSDT", "buy", quantity="0.1", confidence="0.9")
        )
        total = await pipeline.stored_event_count()
        from engine.adapters.event_signing import EventSigner
        from engine.domain import snapshot
        from engine.domain.state import EngineState

        forger = SnapshotStore(
            pipeline.client.jetstream(), pipeline.settings.worker_durable, EventSigner("x" * 20)
        )
        created = (await pipeline.client.jetstream().stream_info("EVENTS")).created
        assert created is not None
        await forger.save(
            total, SnapshotStore.compress(snapshot.json_pieces(EngineState())), created.isoformat()
        )
        await pipeline.stop_worker()
        await pipeline.start_worker()
        assert pipeline.worker.recovered == (0, total)  # not the forged empty book
        assert len(pipeline.worker.book.positions) == 1


async def test_a_snapshot_of_another_stream_is_not_loaded(make_pipeline: Any) -> None:
    """EVENTS deleted and made again: the snapshot of the old stream is not this stream's."""
    async with make_pipeline(SNAPSHOT_EVERY_EVENTS="3") as pipeline:
        assert pipeline.client is not None and pipeline.worker is not None
        await pipeline.tick("ETHUSDT", "3000")
        for n in range(2):  # four events: a snapshot
            await pipeline.decision(
                await pipeline.publish(f"s{n}", "ETHUSDT", "buy", quantity="0.1", confidence="0.9")
            )
        store = SnapshotStore(pipeline.client.jetstream(), pipeline.settings.worker_durable, None)

        async def snapshot_taken() -> bool:
            return await store.load() is not None

        await eventually_async(snapshot_taken, timeout=20, what="a snapshot")
        await pipeline.stop_worker()
        await pipeline.client.jetstream().delete_stream("EVENTS")
        await pipeline.start_worker()
        assert pipeline.worker.recovered == (0, 0) and not pipeline.worker.book.positions


async def test_a_snapshot_of_many_chunks_reads_back_whole_and_a_changed_chunk_is_refused(
    nats_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store reads the object's chunks itself, a few requests at a time, and checks them
    against the digest the object was written with; when its own read fails it falls back to
    nats-py's, which checks the digest too."""
    import nats
    from nats.js.errors import DigestMismatchError

    from engine.adapters import snapshots

    monkeypatch.setattr(snapshots, "FETCH_CHUNKS", 3)
    body = random.Random(7).randbytes(1_300_000)  # 10 chunks of 128 KiB: 4 requests
    client = await nats.connect(nats_server.url)
    try:
        js = client.jetstream()
        store = SnapshotStore(js, "many-chunks", None)
        await store.save(42, body, "stream-made-at")
        blob = store.encode(42, "stream-made-at", body)
        info = await (await store._bucket()).get_info("many-chunks")
        assert await store._pull(info) == blob

        async def refused(_: Any) -> bytes:
            raise TimeoutError("as a NATS user without the pull permission sees it")

        with monkeypatch.context() as patched:
            patched.setattr(store, "_pull", refused)
            assert await store._read() == blob  # nats-py's read

        chunks = f"$O.{snapshots.BUCKET}.C.{info.nuid}"
        stream = f"OBJ_{snapshots.BUCKET}"
        size = 128 * 1024  # nats-py's chunk size
        assert info.chunks == -(-len(blob) // size) == 10
        changed = bytearray(blob)
        changed[size * 5] ^= 1  # one bit of the sixth chunk, the object's size kept
        await js.purge_stream(stream, subject=chunks)
        for start in range(0, len(changed), size):
            await js.publish(chunks, bytes(changed[start : start + size]))
        with pytest.raises(ValueError, match="do not match its digest"):
            await store._pull(info)
        with pytest.raises(DigestMismatchError):
            await store.load()  # and the fallback refuses it too: the worker replays the stream
    finally:
        await client.close()
