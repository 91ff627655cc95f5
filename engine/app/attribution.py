"""The attribution consumer: EVENTS stream -> MySQL tables and views (DESIGN §2, §5)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

import asyncmy.errors
import structlog
from nats.aio.msg import Msg

from engine import metrics
from engine.adapters.mysql_store import (
    PAUSE_EVERY,
    ConcurrentWrite,
    MysqlStore,
    ProjectedBatch,
    project_cooperatively,
)
from engine.adapters.nats_bus import EVENTS_STREAM, DurableConsumer, NatsBus, jetstream_sequences
from engine.config import Settings
from engine.domain.events import Event, decode_event

log = structlog.get_logger(__name__)
# MySQL refusing the values themselves (out of range, too long, a broken reference): retrying
# cannot help. Connection losses and deadlocks are OperationalError and are retried.
PERMANENT_DATA_ERRORS = (asyncmy.errors.DataError, asyncmy.errors.IntegrityError)
# A batch as received, decoded and rendered as SQL by the reader, for the writer.
Decoded = tuple[list[Msg], list[tuple[Event, int | None]], ProjectedBatch]


class AttributionConsumer:
    def __init__(self, settings: Settings, bus: NatsBus, store: MysqlStore) -> None:
        self.settings = settings
        self.bus = bus
        self.store = store
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def checks(self) -> dict[str, bool]:
        try:
            mysql = await asyncio.wait_for(self.store.ping(), 2.0)
        except Exception:
            mysql = False
        return {"attribution_consumer": self.ready.is_set(), "mysql": mysql}

    async def report_lag(self, every: float = 5.0) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(Exception):
                info = await self.bus.js.consumer_info(EVENTS_STREAM, self.settings.attribution_durable)
                metrics.CONSUMER_PENDING.labels("attribution").set(info.num_pending)
                metrics.CONSUMER_ACK_PENDING.labels("attribution").set(info.num_ack_pending)
                metrics.CONSUMER_REDELIVERED.labels("attribution").set(info.num_redelivered)
                metrics.ATTRIBUTION_LAG.set(info.num_pending + info.num_ack_pending)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), every)

    async def run(self) -> None:
        await self.bus.ensure_streams()
        await self.store.migrate()
        sub = await self.bus.durable_consumer(EVENTS_STREAM, self.settings.attribution_durable, ">")
        self.ready.set()
        log.info("attribution.ready", database=self.store.target.database)
        lag = asyncio.create_task(self.report_lag())
        # Receiving, decoding and rendering the next batch's SQL overlaps with MySQL writing this
        # one; batches are still written and acked one at a time, in stream order.
        decoded: asyncio.Queue[Decoded] = asyncio.Queue(maxsize=1)
        await self.store.quoting()
        reader = asyncio.create_task(self._read(sub, decoded))
        try:
            while not self._stopping.is_set():
                getter = asyncio.ensure_future(decoded.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    reader.result()  # the reader died: raise what killed it
                    break
                msgs, batch, projected = getter.result()
                await self.persist(msgs, batch, projected)
                decoded.task_done()
        finally:
            self.ready.clear()
            self._stopping.set()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await lag
            log.info("attribution.stopped")

    async def _read(self, sub: DurableConsumer, decoded: asyncio.Queue[Decoded]) -> None:
        while not self._stopping.is_set():
            if sub.restarting:
                await decoded.join()  # every batch taken is written and acked before the restart
            # Analysts can wait 50 ms; MySQL prefers few large transactions to many small ones.
            msgs = await sub.next_batch(2000, idle_wait=0.5, linger=0.05)
            if msgs:
                batch: list[tuple[Event, int | None]] = []
                for start in range(0, len(msgs), PAUSE_EVERY):  # the writer gets the loop in between
                    batch += self.decode(msgs[start : start + PAUSE_EVERY])
                    await asyncio.sleep(0)
                # In the quoting mode the writer last saw; if the server's changed, it renders again.
                projected = await project_cooperatively(batch, self.store.no_backslash_escapes)
                await decoded.put((msgs, batch, projected))

    @staticmethod
    def decode(msgs: list[Msg]) -> list[tuple[Event, int | None]]:
        batch: list[tuple[Event, int | None]] = []
        for msg in msgs:
            try:
                batch.append((decode_event(msg.data), jetstream_sequences(msg)[0]))
            except ValueError as exc:
                # Not ours to judge: keep it out of MySQL, keep it in the stream, move on.
                log.error("attribution.undecodable", subject=msg.subject, error=str(exc)[:500])
        return batch

    async def persist(
        self,
        msgs: list[Msg],
        batch: list[tuple[Event, int | None]] | None = None,
        projected: ProjectedBatch | None = None,
    ) -> None:
        if batch is None:
            batch = self.decode(msgs)
        delay = 0.1
        while True:
            try:
                new = await self._write_or_quarantine(batch, projected)
                break
            except Exception as exc:  # a lost connection or a deadlock: retry the same batch
                log.warning("attribution.write_failed", error=repr(exc)[:500], events=len(batch))
                if self._stopping.is_set():
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        if msgs:
            await msgs[-1].ack()  # AckPolicy.ALL: acknowledges the whole batch
        metrics.ATTRIBUTION_BATCH.observe(len(batch))
        for event_type, count in Counter(event.type for event, _ in batch).items():
            metrics.child(metrics.EVENTS_PERSISTED, event_type).inc(count)
        log.debug("attribution.persisted", events=len(batch), new=new)

    async def _write_or_quarantine(
        self, batch: list[tuple[Event, int | None]], projected: ProjectedBatch | None = None
    ) -> int:
        """Write the batch; if MySQL refuses its data for good, find the refused events by
        halving (order kept) and quarantine them, so one bad event cannot stall the rest. A
        batch some of whose events turn out stored meanwhile (ConcurrentWrite) is halved too:
        alone, each is then written or found stored."""
        try:
            return await self.store.write(batch, projected)
        except (*PERMANENT_DATA_ERRORS, ConcurrentWrite) as exc:
            if len(batch) == 1:  # a single event never raises ConcurrentWrite
                event, seq = batch[0]
                log.error(
                    "attribution.quarantined", event_id=event.event_id, type=event.type, error=str(exc)[:500]
                )
                metrics.EVENTS_QUARANTINED.labels(event.type).inc()
                await self.store.quarantine(event, seq, repr(exc))
                return 0
            middle = len(batch) // 2
            return await self._write_or_quarantine(batch[:middle]) + await self._write_or_quarantine(
                batch[middle:]
            )
