"""NATS JetStream: streams, the ordered event publisher, replay, consumers and price ticks."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import nats
import nats.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    StorageType,
    StreamConfig,
    SubjectTransform,
)
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from engine import metrics
from engine.adapters.event_signing import SIGNATURE_HEADER, EventSigner
from engine.adapters.nats_acks import AckCollector
from engine.adapters.nats_consumers import (
    DurableConsumer,
    jetstream_position,
    jetstream_sequences,
    next_batch,
)
from engine.config import ConfigError
from engine.domain.events import Event, decode_event, encode_event, event_subject
from engine.domain.partitions import signal_transform

log = structlog.get_logger(__name__)


SIGNALS_STREAM = "SIGNALS"


CONTROL_STREAM = "CONTROL"


EVENTS_STREAM = "EVENTS"


SIGNAL_SUBJECTS = ["signals.>"]


EVENT_SUBJECTS = ["decisions.>", "positions.>", "deadletter.>", "orders.>", "risk.>"]


CONTROL_SUBJECTS = ["control.>"]


PRICE_SUBJECT = "prices.>"
PRICE_HISTORY_STREAM = "PRICE_HISTORY"
PRICE_HISTORY_SUBJECTS = ["price_history.>"]


MSG_ID = "Nats-Msg-Id"


DAY = 86_400.0


def signal_msg_id(strategy_id: str, signal_id: str) -> str:
    """The Nats-Msg-Id of a signal: JetStream drops a second message with the same id within
    the duplicate window, so the id carries the strategy; one strategy's ids never suppress
    another's."""
    return f"{strategy_id}:{signal_id}"


class NatsUnavailable(RuntimeError):
    """NATS could not be reached (or refused us) at start: the message names the server."""


def redact_url(url: str) -> str:
    """The URL(s) without user names, passwords or tokens."""
    shown = []
    for one in url.split(","):
        parts = urlsplit(one.strip())
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        shown.append(urlunsplit((parts.scheme, netloc, parts.path, "", "")) if parts.scheme else "<bad url>")
    return ",".join(shown)


class PartitionsUnsupported(ConfigError):
    """The server cannot map signals to partitions."""


def _version(nc: Client) -> str:
    found = nc.connected_server_version
    return f"{found.major}.{found.minor}.{found.patch}"


def _transform(config: StreamConfig) -> tuple[str, str] | None:
    found = config.subject_transform
    return (found.src, found.dest) if found is not None else None


class StreamReadStalled(Exception):
    """A stream being read stopped delivering before its end."""


class NatsBus:
    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(publish_async_max_pending=8192)
        self._publish_lock = asyncio.Lock()
        self.closing = False
        self.on_reconnect: list[Callable[[], None]] = []  # e.g. reconcile: we may have missed things
        self._acks: AckCollector | None = None
        self.signer: EventSigner | None = None  # signs what this bus stores in EVENTS
        self.replicas = 1  # of the streams and KV buckets this bus creates (STREAM_REPLICAS)
        # SIGNAL_PARTITIONS, set by a worker that has checked the layout may change
        # (engine.app.layout); None: the SIGNALS stream's partition mapping is left as it is.
        self.partitions: int | None = None
        # PRICE_HISTORY_DAYS, set by a worker (0: none kept); None: the stream is not this
        # process's to create or change.
        self.price_history_days: int | None = None
        self.price_history_interval = 10  # PRICE_HISTORY_INTERVAL: the stream's duplicate window spans 3

    @classmethod
    async def connect(
        cls, url: str, name: str, connect_timeout: float = 5.0, auth: dict[str, Any] | None = None
    ) -> NatsBus:
        """Connect, or fail within `connect_timeout` with one line naming the server and the
        last error (a wrong address, a refused login): nats-py itself would retry forever.
        Once connected, a lost connection is retried forever."""
        bus: NatsBus | None = None
        last_error: list[str] = []

        async def on_disconnect() -> None:
            if bus is None or not bus.closing:
                log.warning("nats.disconnected", url=redact_url(url))

        async def on_reconnect() -> None:
            log.info("nats.reconnected")
            for hook in bus.on_reconnect if bus else ():
                hook()

        async def on_error(exc: Exception) -> None:
            if bus is None:
                last_error.append(str(exc) or type(exc).__name__)
                return  # said once, in NatsUnavailable, not twice a second
            log.warning("nats.error", error=str(exc), url=redact_url(url))

        connecting = asyncio.ensure_future(
            nats.connect(
                [one.strip() for one in url.split(",") if one.strip()],  # a cluster: any of them
                name=name,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                connect_timeout=min(connect_timeout, 2.0),
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                error_cb=on_error,
                **(auth or {}),
            )
        )
        try:
            nc = await asyncio.wait_for(connecting, connect_timeout)
        except Exception as exc:
            why = last_error[-1] if last_error else (str(exc) or type(exc).__name__)
            raise NatsUnavailable(
                f"cannot connect to NATS at {redact_url(url)} within {connect_timeout:g}s: {why}"
                " (set NATS_URL, or NATS_CONNECT_TIMEOUT)"
            ) from None
        bus = cls(nc)
        return bus

    async def close(self) -> None:
        """Flush what we published and close. Not drain: our pull subscriptions have no
        callback, so draining them would wait forever; unacked messages are redelivered."""
        self.closing = True
        if not self.nc.is_closed:
            if self.nc.is_connected:
                await self.nc.flush(timeout=2)
            await self.nc.close()

    async def ensure_streams(self, only: tuple[str, ...] | None = None) -> None:
        """Create or update the streams (`only` these); safe to call from every process on every
        start. A stream already as configured is left alone: a role whose credentials may only
        read a stream (attribution under deploy/nats permissions) needs no right to change it."""
        mapping = signal_transform(self.partitions or 1)
        for config in (
            StreamConfig(
                name=SIGNALS_STREAM,
                # Partitioned, only `signals.<strategy_id>.<symbol>` is taken (and mapped): any
                # other subject would be stored where no partition reads; its publisher is
                # refused at once instead.
                subjects=[mapping[0]] if mapping else SIGNAL_SUBJECTS,
                storage=StorageType.FILE,
                num_replicas=self.replicas,
                duplicate_window=300.0,
                max_age=30 * DAY,
                subject_transform=SubjectTransform(*mapping) if mapping else None,
            ),
            StreamConfig(
                name=EVENTS_STREAM,
                subjects=EVENT_SUBJECTS,
                storage=StorageType.FILE,
                num_replicas=self.replicas,
                duplicate_window=900.0,
            ),
            # Halt, resume and flatten wait here for the worker, even while none runs.
            StreamConfig(
                name=CONTROL_STREAM,
                subjects=CONTROL_SUBJECTS,
                storage=StorageType.FILE,
                num_replicas=self.replicas,
                duplicate_window=300.0,
                max_age=7 * DAY,
            ),
            *(
                [
                    StreamConfig(
                        name=PRICE_HISTORY_STREAM,
                        subjects=PRICE_HISTORY_SUBJECTS,
                        storage=StorageType.FILE,
                        num_replicas=self.replicas,
                        # A bar's id is its symbol and interval: whichever worker records it, and
                        # one taking a partition over within three intervals, it is stored once.
                        duplicate_window=min(
                            max(300.0, 3.0 * self.price_history_interval), self.price_history_days * DAY
                        ),
                        max_age=self.price_history_days * DAY,
                    )
                ]
                if self.price_history_days
                else []
            ),
        ):
            if only is not None and config.name not in only:
                continue
            try:
                current = (await self.js.stream_info(config.name or "")).config
            except NotFoundError:
                await self.js.add_stream(config)
                continue
            if config.name == SIGNALS_STREAM and self.partitions is None:  # not this process's to change
                config.subjects, config.subject_transform = current.subjects, current.subject_transform
            if (
                current.subjects,
                current.duplicate_window,
                current.max_age,
                current.num_replicas or 1,
                _transform(current),
            ) != (
                config.subjects,
                config.duplicate_window,
                config.max_age or current.max_age,
                config.num_replicas,
                _transform(config),
            ):
                await self.js.update_stream(config)
        if mapping and (only is None or SIGNALS_STREAM in only):
            kept = _transform((await self.js.stream_info(SIGNALS_STREAM)).config)
            if kept != mapping:
                # A server before 2.10 ignores the transform: signals would wait on subjects no
                # partition reads.
                raise PartitionsUnsupported(
                    f"SIGNAL_PARTITIONS={self.partitions}: nats-server {_version(self.nc)} did not "
                    "keep the SIGNALS stream's subject "
                    "transform (needs 2.10 or newer); use SIGNAL_PARTITIONS=1 on this server"
                )

    async def signal_partitions(self) -> int | None:
        """How many partitions the SIGNALS stream maps signals to now (1: none); None when the
        stream does not exist yet."""
        try:
            found = _transform((await self.js.stream_info(SIGNALS_STREAM)).config)
        except NotFoundError:
            return None
        if found is None:
            return 1
        count = found[1].rpartition("partition(")[2].split(",")[0]
        return int(count) if count.isdigit() else 1

    async def publish_events(self, events: Sequence[Event], ack_timeout: float = 10.0) -> None:
        """Publish in order and return once JetStream has stored every one of them.

        The lock keeps stream order equal to production order across concurrent callers,
        which replay relies on (an open is stored before its close)."""
        await self.publish_stored(
            [(event_subject(event), encode_event(event), event.event_id) for event in events], ack_timeout
        )

    async def publish_stored(
        self,
        messages: Sequence[tuple[str, bytes, str]],
        ack_timeout: float = 10.0,
        stream: str = EVENTS_STREAM,
    ) -> None:
        """(subject, payload, Nats-Msg-Id) messages into `stream`, in order, acked by JetStream;
        signed with the events' key when the stream is EVENTS."""
        if not messages:
            return
        if self._acks is None:
            self._acks = AckCollector(self.nc)
            await self._acks.start()
        async with self._publish_lock:
            batch = self._acks.expect(len(messages), stream)
            try:
                signer = self.signer if stream == EVENTS_STREAM else None
                for i, (subject, payload, msg_id) in enumerate(messages):
                    headers = {MSG_ID: msg_id}
                    if signer is not None:
                        headers[SIGNATURE_HEADER] = signer.sign(subject, payload)
                    await self.nc.publish(subject, payload, reply=batch.reply(i), headers=headers)
            except BaseException:
                self._acks.forget(batch)
                raise
        try:
            # Acks of publishes in flight when the connection drops never come: bound the wait,
            # and let the caller publish again (same Nats-Msg-Id, so nothing is stored twice).
            await asyncio.wait_for(asyncio.shield(batch.done), ack_timeout)
        finally:
            self._acks.forget(batch)
        if batch.errors:
            raise RuntimeError(f"JetStream refused {len(batch.errors)} message(s): {batch.errors[0][:300]!r}")

    async def publish_signal(self, subject: str, payload: bytes, signal_id: str | None) -> bool:
        """Returns False when JetStream recognised a duplicate Nats-Msg-Id."""
        headers = {MSG_ID: signal_id} if signal_id else None
        ack = await self.js.publish(subject, payload, headers=headers)
        return not ack.duplicate

    async def replay_events(
        self,
        batch: int = 2000,
        idle_wait: float = 5.0,
        after: int = 0,
        accept: Callable[[str], bool] | None = None,
    ) -> AsyncIterator[Event]:
        """Every event stored so far (after stream sequence `after`; with `accept`, those whose
        subject it accepts, undecoded otherwise), oldest first. A push
        consumer of our own, deleted after: the same in-order batches as the roles' consumers,
        without a pull request and a `next_msg` task per message (recovery of 200k events:
        33 -> 17 s)."""
        info = await self.js.stream_info(EVENTS_STREAM)
        last = info.state.last_seq
        if info.state.messages == 0 or last <= after:
            return
        name = f"replay-{uuid.uuid4().hex[:16]}"
        # Left behind by a crash, it goes by itself once nobody has used it for two minutes. At
        # most a batch unacked: a batch of the largest events (dead letters) stays far below what
        # nats-py buffers for a subscription before it drops messages.
        consumer = DurableConsumer(self, EVENTS_STREAM, name, ">", batch, inactive_threshold=120.0)
        consumer._started_at = after + 1  # a new consumer starts where it is told to
        await consumer.restart()
        try:
            while True:
                msgs = await consumer.next_batch(batch, idle_wait=idle_wait)
                if not msgs:
                    continue  # a slow server; or lost deliveries, which next_batch sees to
                signer = self.signer
                for msg in msgs:
                    if accept is not None and not accept(msg.subject):
                        continue
                    if signer is not None and not signer.trusts(msg.subject, msg.data, msg.headers):
                        # Not stored by a worker: a forged open must not come back into the book.
                        metrics.EVENTS_DISTRUSTED.labels("worker").inc()
                        log.error(
                            "events.unsigned_ignored",
                            subject=msg.subject,
                            stream_seq=jetstream_sequences(msg)[0],
                        )
                        continue
                    yield decode_event(msg.data)
                await msgs[-1].ack()  # AckPolicy.ALL: after a gap the consumer restarts past these
                stream_seq, pending = jetstream_position(msgs[-1])
                if stream_seq >= last or pending == 0:
                    return
        finally:
            await consumer.delete()

    async def read_stream(
        self,
        stream: str,
        since: datetime | None = None,
        until: datetime | None = None,
        subject: str = ">",
        idle_wait: float = 10.0,
    ) -> AsyncIterator[Msg]:
        """The messages on `subject` a stream holds from `since` (its first when None) through
        `until` (what it holds now when None), oldest first, through an ordered consumer of our
        own: nothing is acked, nothing another consumer reads changes. A stream that does not
        exist holds nothing; one that stops answering before its end raises StreamReadStalled
        rather than passing for complete."""
        try:
            stored = await self.js.stream_info(stream)
        except NotFoundError:
            return
        if stored.state.messages == 0:
            return
        last, start = stored.state.last_seq, stored.state.first_seq
        if since is not None:
            # The sequence `since` starts at, asked of a consumer that lapses by itself: an
            # ordered consumer re-made after a gap starts by sequence, and the server refuses a
            # start time beside one.
            probe = await self.js.add_consumer(
                stream,
                ConsumerConfig(
                    deliver_policy=DeliverPolicy.BY_START_TIME,
                    opt_start_time=since.astimezone(UTC),
                    ack_policy=AckPolicy.NONE,
                    inactive_threshold=2.0,
                ),
            )
            start = (probe.delivered.stream_seq if probe.delivered else start - 1) + 1
            if start > last:
                return
        sub = await self.js.subscribe(
            subject,
            stream=stream,
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start),
            pending_msgs_limit=1_000_000,
        )
        try:
            reading = await sub.consumer_info()
            if not reading.num_pending and not (reading.delivered and reading.delivered.consumer_seq):
                return  # nothing stored on `subject` from `start` on, and nothing delivered
            messages = sub.messages  # not next_msg: two tasks a message (about 20 % slower)
            while True:
                try:
                    async with asyncio.timeout(idle_wait):
                        msg = await anext(messages)
                except TimeoutError:
                    raise StreamReadStalled(
                        f"{stream}: nothing came for {idle_wait:g} s before its end (sequence {last}); try again"
                    ) from None
                meta = msg.metadata
                if until is not None and meta.timestamp > until:
                    return
                yield msg
                if meta.sequence.stream >= last or meta.num_pending == 0:
                    return
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def ack_floor(self, stream: str, durable: str) -> int:
        """The stream sequence up to which the durable has acknowledged (0 if it is new)."""
        try:
            info = await self.js.consumer_info(stream, durable)
        except NotFoundError:
            return 0
        return info.ack_floor.stream_seq if info.ack_floor else 0

    async def durable_consumer(
        self, stream: str, durable: str, subject: str, max_ack_pending: int = 4096, start_at: int = 0
    ) -> DurableConsumer:
        """Our durable consumer, at its ack floor; one not made yet starts at stream sequence
        `start_at` (0: the stream's start)."""
        consumer = DurableConsumer(self, stream, durable, subject, max_ack_pending)
        consumer._started_at = start_at
        await consumer.restart()
        return consumer

    async def _subscribe_at_ack_floor(
        self,
        stream: str,
        durable: str,
        subject: str,
        max_ack_pending: int,
        inactive_threshold: float | None = None,
        resume_at: int = 0,
    ) -> tuple[JetStreamContext.PushSubscription, int, int]:
        """(Re)start our durable push consumer at its ack floor and subscribe to it; returns the
        subscription, the stream sequence it starts at, and the last stream sequence the
        consumer it replaced had delivered (messages in flight at a crash lie between the two).

        - Ack policy ALL: our roles finish whole batches in stream order, so acking the last
          message of a batch acknowledges the batch.
        - Push, not pull: a pull either waits for a full batch (latency) or costs a round trip
          per batch (throughput); push delivers continuously and `next_batch` takes what came.
        - Restart at the ack floor: messages handed to a process that died are otherwise
          redelivered only after ack_wait, behind newer ones; re-creating the consumer at
          floor + 1 redelivers them at once and in stream order. Our dedupe ledger makes the
          already-processed ones no-ops. This assumes one process per durable (DESIGN §4.3).
        - Deleting and creating are two requests: if the create fails, the consumer is gone and
          its floor with it. `resume_at` (where this process last started it) stands in then,
          rather than the start of the stream.
        """
        start_seq, delivered = resume_at, 0
        with contextlib.suppress(NotFoundError):
            info = await self.js.consumer_info(stream, durable)
            start_seq = (info.ack_floor.stream_seq if info.ack_floor else 0) + 1
            delivered = info.delivered.stream_seq if info.delivered else 0
            await self.js.delete_consumer(stream, durable)
        config = ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.ALL,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if start_seq > 1 else DeliverPolicy.ALL,
            opt_start_seq=start_seq if start_seq > 1 else None,
            ack_wait=60.0,
            max_ack_pending=max_ack_pending,
            filter_subject=subject,
            inactive_threshold=inactive_threshold,
        )
        sub = await self.js.subscribe(
            subject, durable=durable, stream=stream, config=config, manual_ack=True,
            pending_msgs_limit=max_ack_pending * 2,
        )  # fmt: skip
        return sub, start_seq, delivered

    next_batch = staticmethod(next_batch)

    async def subscribe_prices(self, handler: Callable[[Msg], Awaitable[None]]) -> Any:
        return await self.nc.subscribe(PRICE_SUBJECT, cb=handler, pending_msgs_limit=65_536)
