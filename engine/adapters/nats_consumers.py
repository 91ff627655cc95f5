"""Our JetStream consumers: the durable push consumer that delivers contiguous batches, and
the sequences of a delivery read from its reply subject."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import nats
import nats.errors
import structlog
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from engine import metrics

if TYPE_CHECKING:
    from engine.adapters.nats_bus import NatsBus

log = structlog.get_logger(__name__)


async def next_batch(
    sub: JetStreamContext.PushSubscription, batch: int, idle_wait: float, linger: float = 0.0
) -> list[Msg]:
    """Wait up to `idle_wait` for one message, then take what else has arrived; with
    `linger`, keep collecting for up to that long (throughput over latency)."""
    try:
        msgs = [await sub.next_msg(timeout=idle_wait)]
    except (nats.errors.TimeoutError, TimeoutError):
        return []
    deadline = time.monotonic() + linger
    while len(msgs) < batch:
        if sub.pending_msgs > 0:
            msgs.append(_take_pending(sub))
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            msgs.append(await sub.next_msg(timeout=remaining))
        except (nats.errors.TimeoutError, TimeoutError):
            break
    return msgs


def _take_pending(sub: JetStreamContext.PushSubscription) -> Msg:
    """A message already delivered to `sub`, taken as `next_msg` would take it, without the
    task, timer and uuid `next_msg` spends per call (~15 us, per signal and per event).
    Relies on nats-py's queue bookkeeping as of the pinned 2.16.0 (tests cover it)."""
    msg: Msg = sub._pending_queue.get_nowait()
    sub._pending_size -= len(msg.data)
    sub._pending_queue.task_done()
    return msg


def _plain_ack_tokens(msg: Msg) -> list[str] | None:
    """The tokens of a JetStream delivery's reply subject in its v1 form,
    `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>`, all
    a plain server sends; None for the domain / account-hash form and anything odd, which
    nats-py's `msg.metadata` reads. That builds two dataclasses and a datetime per message
    (14 % of the attribution consumer's profile)."""
    tokens = (msg.reply or "").split(".")
    return tokens if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK" else None


def jetstream_sequences(msg: Msg) -> tuple[int, int]:
    """(stream, consumer) sequence of a JetStream delivery."""
    tokens = _plain_ack_tokens(msg)
    if tokens is not None:
        return int(tokens[5]), int(tokens[6])
    pair = msg.metadata.sequence
    return pair.stream, pair.consumer


def jetstream_position(msg: Msg) -> tuple[int, int]:
    """(stream sequence, messages pending after it) of a JetStream delivery."""
    tokens = _plain_ack_tokens(msg)
    if tokens is not None:
        return int(tokens[5]), int(tokens[8])
    return msg.metadata.sequence.stream, msg.metadata.num_pending


def contiguous_prefix(
    msgs: Sequence[Msg], last_consumer_seq: int | None
) -> tuple[list[Msg], int | None, bool]:
    """The messages up to the first gap in consumer sequence, the last sequence taken, and
    whether a gap was found. A gap is a delivery this client never saw (e.g. dropped as a
    slow consumer); with ack policy ALL, acking past it would acknowledge it unprocessed."""
    taken: list[Msg] = []
    last = last_consumer_seq
    for msg in msgs:
        seq = jetstream_sequences(msg)[1]
        if last is not None and seq != last + 1:
            return taken, last, True
        taken.append(msg)
        last = seq
    return taken, last, False


class DurableConsumer:
    """Our durable push consumer, delivering contiguous batches only: after a gap the role
    acks what it took, and the next call re-creates the consumer at its ack floor, which
    redelivers the missing message first."""

    def __init__(
        self,
        bus: NatsBus,
        stream: str,
        durable: str,
        subject: str,
        max_ack_pending: int,
        inactive_threshold: float | None = None,
    ) -> None:
        self.bus, self.stream, self.durable, self.subject = bus, stream, durable, subject
        self.max_ack_pending, self.inactive_threshold = max_ack_pending, inactive_threshold
        self.sub: JetStreamContext.PushSubscription | None = None
        self._last_seq: int | None = None
        self._gap = False
        self._started_at = 0  # the stream sequence the consumer was last started at
        # (ack floor, last delivered stream sequence) when this process first started it, if
        # messages were in flight then: delivered to a process that ended without acking them.
        self.in_flight_at_start: tuple[int, int] | None = None
        self._first_start = True
        self._quiet_past: int | None = None  # delivered past what we took, at the last quiet spell

    @property
    def restarting(self) -> bool:
        """The next `next_batch` re-creates the consumer at its ack floor: whoever still has
        acks of earlier batches to send must send them first, or the floor is stale and a late
        ack lands on the new consumer."""
        return self._gap

    async def restart(self) -> None:
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
            await self.bus.nc.flush(timeout=5)  # our last ack reaches the server first
        self.sub, self._started_at, delivered = await self.bus._subscribe_at_ack_floor(
            self.stream,
            self.durable,
            self.subject,
            self.max_ack_pending,
            self.inactive_threshold,
            self._started_at,
        )
        if self._first_start and delivered >= self._started_at:
            self.in_flight_at_start = (self._started_at - 1, delivered)
        self._first_start = False
        self._last_seq, self._gap, self._quiet_past = 0, False, None  # a new consumer delivers 1 first

    async def delete(self) -> None:
        """Unsubscribe and delete the consumer (a one-off one, such as a replay's)."""
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
        with contextlib.suppress(NotFoundError):
            await self.bus.js.delete_consumer(self.stream, self.durable)

    async def next_batch(self, batch: int, idle_wait: float, linger: float = 0.0) -> list[Msg]:
        if self._gap:
            await self.restart()
        assert self.sub is not None
        msgs = await next_batch(self.sub, batch, idle_wait, linger)
        if not msgs:
            await self._look_for_a_lost_tail()
            return []
        self._quiet_past = None
        taken, self._last_seq, self._gap = contiguous_prefix(msgs, self._last_seq)
        if self._gap:
            metrics.CONSUMER_GAPS.labels(self.durable).inc()
            log.warning(
                "consumer.gap",
                durable=self.durable,
                after=self._last_seq,
                dropped_from_batch=len(msgs) - len(taken),
            )
        return taken

    async def _look_for_a_lost_tail(self) -> None:
        """Nothing came for a while. A gap shows when a later delivery arrives; if the latest
        ones were lost on the way, none will, and they would come again only after ack_wait.
        The server says how far it has delivered. A delivery can be on its way while we ask, so
        only two quiet spells in a row that see the same delivery past what we took, with
        nothing waiting in the client, count as a loss: then restart at the ack floor."""
        assert self.sub is not None
        try:
            info = await self.bus.js.consumer_info(self.stream, self.durable, timeout=1.0)
        except NotFoundError:
            log.warning("consumer.missing", durable=self.durable)  # deleted from outside
            self._gap = True  # re-created where this process last started it, or at its floor
            return
        except Exception:  # the server may be away: the next quiet spell asks again
            return
        delivered = info.delivered.consumer_seq if info.delivered else None
        if delivered is None or self._last_seq is None or delivered <= self._last_seq:
            self._quiet_past = None
            return
        if delivered == self._quiet_past and self.sub.pending_msgs == 0:
            self._gap = True
            metrics.CONSUMER_GAPS.labels(self.durable).inc()
            log.warning("consumer.gap", durable=self.durable, after=self._last_seq, delivered=delivered)
        self._quiet_past = delivered
