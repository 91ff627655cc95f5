"""The attribution consumer: EVENTS stream -> MySQL tables and views (DESIGN §2, §5)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import Any

import asyncmy.errors
import structlog
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from engine import metrics
from engine.adapters.mysql_projection import ProjectedBatch, project_cooperatively
from engine.adapters.mysql_sql import PAUSE_EVERY
from engine.adapters.mysql_store import ConcurrentWrite, MysqlStore
from engine.adapters.nats_bus import EVENTS_STREAM, NatsBus
from engine.adapters.nats_consumers import DurableConsumer, jetstream_sequences
from engine.config import Settings
from engine.domain.events import Event, decode_event
from engine.domain.partitions import event_symbol, lane_name, partition_of

log = structlog.get_logger(__name__)
# MySQL errors that say the server, the connection or the schema is not usable now, whatever
# the events hold: waited out (retried, readiness fails, an alert fires), never quarantined.
# Lock waits and deadlocks; too many connections, shutdown, lost or killed connections;
# privileges; a missing table or column; a full disk or a read-only server; a node not ready
# (Galera), an interrupted query, a statement time limit.
OUTAGE_CODES = frozenset(
    {1205, 1213, 1040, 1053, 1077, 1152, 1153, 1158, 1159, 1160, 1161, 1927, 1044, 1045, 1142, 1143,
     1227, 1146, 1054, 1021, 1114, 1290, 1836, 4031, 1047, 1317, 1969, 3024}
)  # fmt: skip


def is_outage(exc: BaseException) -> bool:
    """An error that retrying the same batch can get past: the network, the server, the
    schema. Anything else (MySQL refusing the values, arithmetic on an impossible row, a value
    our projection cannot handle) belongs to the events: they are set aside, never retried."""
    if isinstance(exc, OSError | TimeoutError | asyncmy.errors.InterfaceError):
        return True
    if isinstance(exc, asyncmy.errors.MySQLError):
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        # No code, or a client-side one (2000-2999: lost connection, gone away, read timeout).
        return code is None or 2000 <= code < 3000 or code in OUTAGE_CODES
    return False


# A batch as received, decoded and rendered as SQL by the reader, for the writer.
Decoded = tuple[list[Msg], list[tuple[Event, int | None]], ProjectedBatch]


class AttributionConsumer:
    """One consumer of EVENTS. With ATTRIBUTION_PARTITIONS > 1, one of several: it writes the
    events of its partition's symbols (those of no symbol: partition 0), acks every event, and
    so keeps each position's events in order while the others write theirs beside it."""

    def __init__(
        self,
        settings: Settings,
        bus: NatsBus,
        store: MysqlStore,
        partition: int | None = None,
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.store = store
        self.partition, self.partitions = partition, settings.attribution_partitions
        self.durable = lane_name(settings.attribution_durable, partition)
        self.role = "attribution" if partition is None else self.durable
        self.start_at = 0  # where its durable starts if not made yet (0: the stream's start)
        self.lag = 0  # events stored in EVENTS, not yet acked by it
        self.persisted = 0  # events of its share written (or found written) since it started
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._ping: asyncio.Future[bool] | None = None
        self._writing_since: float | None = None
        self._undecodable: list[
            tuple[str, bytes, int, str]
        ] = []  # to quarantine with the batch  # monotonic time the batch being written came

    def stop(self) -> None:
        self._stopping.set()

    def mine(self, subject: str) -> bool:
        if self.partition is None:
            return True
        symbol = event_symbol(subject)
        return partition_of(symbol, self.partitions) == self.partition if symbol else self.partition == 0

    def stalled_seconds(self) -> float:
        """How long the batch being written has waited for MySQL (0 when none is): a projection
        stuck on an outage shows here, whatever the consumer's pending counts say."""
        since = self._writing_since
        return 0.0 if since is None else time.monotonic() - since

    async def checks(self) -> dict[str, bool]:
        # Never cancel a ping: a query cancelled on a pooled asyncmy connection can leave the
        # pool short of a connection for good, and then the writer waits on it for ever. A
        # ping that takes long runs on (bounded by MYSQL_READ_TIMEOUT) and answers later probes.
        if self._ping is None or self._ping.done():
            self._ping = asyncio.ensure_future(self.store.ping())
        done, _ = await asyncio.wait({self._ping}, timeout=2.0)
        mysql = bool(done) and self._ping.exception() is None and self._ping.result()
        return {
            "attribution_consumer": self.ready.is_set(),
            "mysql": mysql,
            "attribution_progress": self.stalled_seconds() < self.settings.attribution_stall_seconds,
        }

    async def report_lag(self, every: float = 5.0) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(Exception):
                info = await self.bus.js.consumer_info(EVENTS_STREAM, self.durable)
                metrics.CONSUMER_PENDING.labels(self.role).set(info.num_pending)
                metrics.CONSUMER_ACK_PENDING.labels(self.role).set(info.num_ack_pending)
                metrics.CONSUMER_REDELIVERED.labels(self.role).set(info.num_redelivered)
                self.lag = info.num_pending + info.num_ack_pending
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), every)

    async def prepare(self) -> None:
        """The stream and the schema, before any consumer of the role starts."""
        await self.bus.ensure_streams(only=(EVENTS_STREAM,))
        if self.settings.migrate_on_start:
            await self.store.migrate()
        else:
            await self.store.check_migrated()

    async def run(self, prepared: bool = False) -> None:
        if not prepared:
            await self.prepare()
        sub = await self.bus.durable_consumer(EVENTS_STREAM, self.durable, ">", start_at=self.start_at)
        self.ready.set()
        log.info("attribution.ready", database=self.store.target.database, consumer=self.durable)
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

    def decode(self, msgs: list[Msg]) -> list[tuple[Event, int | None]]:
        batch: list[tuple[Event, int | None]] = []
        mine = self.mine
        for msg in msgs:
            if not mine(msg.subject):
                continue  # another consumer's symbol: acked with the batch, written by that one
            sequence = jetstream_sequences(msg)[0]
            signer = self.bus.signer
            if signer is not None and not signer.trusts(msg.subject, msg.data, msg.headers):
                # Not stored by a worker (a forged close would add PnL to a strategy): the
                # projection never sees it; quarantine keeps it for whoever investigates.
                log.error("attribution.unsigned", subject=msg.subject, stream_seq=sequence)
                metrics.EVENTS_DISTRUSTED.labels("attribution").inc()
                self._undecodable.append(
                    (msg.subject, bytes(msg.data), sequence, "no valid worker signature")
                )
                continue
            try:
                batch.append((decode_event(msg.data), sequence))
            except Exception as exc:
                # Not an event of ours: out of the projection, into quarantine with its error
                # (the stream keeps it too).
                log.error(
                    "attribution.undecodable", subject=msg.subject, stream_seq=sequence, error=str(exc)[:500]
                )
                metrics.EVENTS_QUARANTINED.labels("undecodable").inc()
                self._undecodable.append((msg.subject, bytes(msg.data), sequence, repr(exc)))
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
        self._writing_since = time.monotonic()
        try:
            while True:
                try:
                    undecodable, self._undecodable = self._undecodable, []
                    for subject, data, sequence, error in undecodable:
                        await self.store.quarantine_raw(subject, data, sequence, error)
                    new = await self._write_or_quarantine(batch, projected)
                    break
                except Exception as exc:  # an outage (see is_outage): retry the same batch
                    self._undecodable[:0] = undecodable
                    log.warning("attribution.write_failed", error=repr(exc)[:500], events=len(batch))
                    if self._stopping.is_set():
                        raise
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
        finally:
            self._writing_since = None
        self.persisted += len(batch)
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
        except Exception as exc:
            if not isinstance(exc, ConcurrentWrite) and is_outage(exc):
                raise
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


class AttributionConsumers:
    """The attribution role: one consumer, or ATTRIBUTION_PARTITIONS of them side by side on
    one pool of MySQL connections. A new layout's consumers start where the consumers of the
    layout before it had all got to (events already written are recognised and skipped)."""

    def __init__(self, settings: Settings, bus: NatsBus, store: MysqlStore) -> None:
        self.settings, self.bus, self.store = settings, bus, store
        count = settings.attribution_partitions
        self.consumers = [
            AttributionConsumer(settings, bus, store, None if count == 1 else k) for k in range(count)
        ]
        self.ready = asyncio.Event()  # every consumer is
        metrics.ATTRIBUTION_STALLED.set_function(self.stalled_seconds)
        metrics.ATTRIBUTION_LAG.set_function(lambda: sum(c.lag for c in self.consumers))

    def stalled_seconds(self) -> float:
        return max(c.stalled_seconds() for c in self.consumers)

    def stop(self) -> None:
        for consumer in self.consumers:
            consumer.stop()

    def details(self) -> dict[str, Any]:
        return {"attribution_stalled_seconds": round(self.stalled_seconds(), 1)}

    async def checks(self) -> dict[str, bool]:
        found: dict[str, bool] = {}
        for consumer in self.consumers:
            for name, ok in (await consumer.checks()).items():
                found[name] = found.get(name, True) and ok
        return found

    async def run(self) -> None:
        consumers = self.consumers
        await consumers[0].prepare()  # the schema once, before the consumers start side by side
        start_at = await layout_floor(
            self.bus, self.settings.attribution_durable, [c.durable for c in consumers]
        )
        for consumer in consumers:
            consumer.start_at = start_at
        tasks = [asyncio.create_task(c.run(prepared=True)) for c in consumers]
        all_ready = asyncio.create_task(self._all_ready())
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # one failed: the role fails (and the others stop below)
        finally:
            self.ready.clear()
            all_ready.cancel()
            self.stop()
            await asyncio.gather(*tasks, all_ready, return_exceptions=True)

    async def _all_ready(self) -> None:
        await asyncio.gather(*(c.ready.wait() for c in self.consumers))
        self.ready.set()


async def layout_floor(bus: NatsBus, base: str, durables: list[str]) -> int:
    """Where consumers of this layout not made yet start: after what every attribution consumer
    of another layout had acked (0, the stream's start, when there is none)."""
    floors = []
    try:
        found = await bus.js.consumers_info(EVENTS_STREAM)
    except NotFoundError:
        found = []
    except Exception as exc:  # not allowed to list them: from the stream's start, written ones skipped
        log.warning("attribution.layout_floor_unknown", error=repr(exc)[:300])
        found = []
    for info in found:
        name = info.name or ""
        if name in durables or not (name == base or name.startswith(f"{base}-p")):
            continue
        floors.append(info.ack_floor.stream_seq if info.ack_floor else 0)
    return min(floors) + 1 if floors else 0
