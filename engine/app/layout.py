"""The SIGNALS stream's layout: one durable over `signals.>`, or SIGNAL_PARTITIONS partitions
(issue #16). A worker starts only on the layout it is configured for. It changes the layout
only when no worker of the old one is up and no signal or command waits for one, since a signal
left on an old subject would be read by nobody, one read under both layouts could be executed
twice, and a command read again by a new consumer would be applied twice (a flatten closing
positions opened since). One change at a time, under a lock:

1. the new layout's consumers (signals and control) start at the streams' ends, its stale
   ones from an earlier era deleted;
2. the stream's mapping flips;
3. signals published on the old layout's subjects between the check and the flip are relayed
   to the new one (published again; the worker's dedupe keeps them once);
4. the old layout's consumers are deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from engine.adapters.leases import (
    LEASE_BUCKET,
    MEMBERS_BUCKET,
    NO_ENTRY,
    PARTITIONS_BUCKET,
    Holder,
    Lease,
    bucket_keys,
)
from engine.adapters.nats_bus import CONTROL_STREAM, SIGNALS_STREAM, NatsBus
from engine.config import ConfigError, Settings
from engine.domain.partitions import lane_name, signal_filter

log = structlog.get_logger(__name__)
RELAY_WAIT = 5.0  # seconds for the relay's reader to deliver what it counts


def lanes_of(partitions: int) -> list[int | None]:
    return [None] if partitions == 1 else list(range(partitions))


def member_prefix(durable: str, partitions: int) -> str:
    """The key prefix, in KV `tradeengine_members`, of the workers of one layout."""
    return f"{durable}.{partitions}."


async def claim_layout(bus: NatsBus, settings: Settings) -> None:
    """Make the streams, with SIGNALS laid out for SIGNAL_PARTITIONS (and PRICE_HISTORY kept
    PRICE_HISTORY_DAYS: the workers record it); ConfigError (exit 2) when another layout is in
    use or has signals or commands waiting."""
    wanted, durable = settings.signal_partitions, settings.worker_durable
    bus.price_history_days = settings.price_history_days
    bus.price_history_interval = settings.price_history_interval
    current = await bus.signal_partitions()
    if current is not None and current != wanted:
        lock = Lease(bus.js, f"{durable}-layout", settings.worker_lease_seconds, bus.replicas)
        await lock.acquire(True, asyncio.Event(), lambda _: None)
        try:
            current = await bus.signal_partitions()  # another process may have changed it meanwhile
            if current is not None and current != wanted:
                await _change(bus, durable, current, wanted)
                return
        finally:
            await lock.release()
    bus.partitions = wanted
    await bus.ensure_streams()


async def check_layout(bus: NatsBus, settings: Settings) -> None:
    """Before a worker acts: the layout is still its own (ConfigError otherwise)."""
    found = await bus.signal_partitions()
    if found is not None and found != settings.signal_partitions:
        raise ConfigError(
            f"SIGNAL_PARTITIONS={settings.signal_partitions}: the SIGNALS stream was laid out for "
            f"{found} partition(s) by other workers; this one stops"
        )


async def _change(bus: NatsBus, durable: str, old: int, new: int) -> None:
    signals_end = (await bus.js.stream_info(SIGNALS_STREAM)).state.last_seq
    # From one worker, the signals that wait for it (none ran yet; or it stopped with a backlog)
    # are relayed onto the partitions, in order; between partition counts they must be decided
    # first, since a partition's subjects mean another symbol set under another count.
    busy = await _in_use(bus, durable, old, signals_waiting_count=old > 1)
    if busy:
        raise ConfigError(
            f"SIGNAL_PARTITIONS={new}: the SIGNALS stream is laid out for {old} partition(s), and "
            f"{'; '.join(busy)}. Set SIGNAL_PARTITIONS={old}, or stop every worker of that layout "
            "once its signals are decided, then start these"
        )
    control_end = (await bus.js.stream_info(CONTROL_STREAM)).state.last_seq
    for lane in lanes_of(new):
        name = lane_name(durable, lane)
        await _start_at(bus, SIGNALS_STREAM, name, signal_filter(lane), signals_end + 1)
        await _start_at(bus, CONTROL_STREAM, f"{name}-control", "control.>", control_end + 1)
    relay_from = await _ack_floor(bus, lane_name(durable, None)) if old == 1 else signals_end
    bus.partitions = new
    await bus.ensure_streams()
    relayed = await _relay(bus, durable, old, relay_from)
    for lane in lanes_of(old):
        name = lane_name(durable, lane)
        if name not in {lane_name(durable, n) for n in lanes_of(new)}:
            for stream, consumer in ((SIGNALS_STREAM, name), (CONTROL_STREAM, f"{name}-control")):
                with contextlib.suppress(NotFoundError):
                    await bus.js.delete_consumer(stream, consumer)
    log.warning("partitions.relaid", before=old, now=new, relayed=relayed)


async def _start_at(bus: NatsBus, stream: str, durable: str, subject: str, seq: int) -> None:
    """A consumer that has handled everything before `seq` (the runner re-creates it at its ack
    floor); one of an earlier era is replaced."""
    with contextlib.suppress(NotFoundError):
        await bus.js.delete_consumer(stream, durable)
    await bus.js.add_consumer(
        stream,
        ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.ALL,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=seq,
            filter_subject=subject,
        ),
    )


async def _ack_floor(bus: NatsBus, name: str) -> int:
    try:
        info = await bus.js.consumer_info(SIGNALS_STREAM, name)
    except NotFoundError:
        return 0  # never consumed: all of it waits
    return info.ack_floor.stream_seq if info.ack_floor else 0


async def _relay(bus: NatsBus, durable: str, old: int, after: int) -> int:
    """Signals stored on the one worker's subjects after `after` (its ack floor: a backlog, or
    published between the check and the flip): published again as
    `signals.<strategy>.<symbol>`, which the new layout maps (one already decided comes back as a
    duplicate, never executed twice).
    Under partitions both layouts use 4-token subjects: those are read by the new layout's
    consumers (each from `after` on), and one on a partition not its symbol's is dead-lettered
    `bad_subject` rather than run out of order."""
    if old > 1:
        return 0
    sub = await bus.js.subscribe(
        "signals.*.*",
        stream=SIGNALS_STREAM,
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1),
    )
    relayed = 0
    try:
        info = await sub.consumer_info()
        # What it holds: delivered to this subscription already, and still to come.
        for _ in range((info.delivered.consumer_seq if info.delivered else 0) + (info.num_pending or 0)):
            msg = await sub.next_msg(timeout=RELAY_WAIT)
            msg_id = (msg.headers or {}).get("Nats-Msg-Id", f"seq-{msg.metadata.sequence.stream}")
            try:
                await bus.js.publish(msg.subject, msg.data, headers={"Nats-Msg-Id": f"{msg_id}:relaid"})
                relayed += 1
            except Exception as exc:
                log.error("partitions.relay_failed", subject=msg.subject, error=repr(exc)[:200],
                          payload=json.dumps(msg.data.decode("utf-8", "replace"))[:500])  # fmt: skip
    finally:
        await sub.unsubscribe()
    return relayed


async def _in_use(
    bus: NatsBus, durable: str, partitions: int, signals_waiting_count: bool = True
) -> list[str]:
    """What keeps the layout of `partitions` from changing: a worker of it up, a command waiting
    for one, and (`signals_waiting_count`) a signal waiting for one."""
    bucket = LEASE_BUCKET if partitions == 1 else PARTITIONS_BUCKET
    found: list[str] = []
    leases = members = None
    with contextlib.suppress(Exception):
        leases = await bus.js.key_value(bucket)
    with contextlib.suppress(Exception):
        members = await bus.js.key_value(MEMBERS_BUCKET)
    if members is not None:
        with contextlib.suppress(Exception):
            prefix, up = member_prefix(durable, partitions), 0
            for key in await bucket_keys(bus.js, MEMBERS_BUCKET):
                if key.startswith(prefix):
                    with contextlib.suppress(*NO_ENTRY):
                        holder = Holder.decode((await members.get(key)).value)
                        up += holder is not None and not holder.gone()
            if up:
                found.append(f"{up} worker(s) of that layout are up")
    for lane in lanes_of(partitions):
        name = lane_name(durable, lane)
        if leases is not None:
            with contextlib.suppress(Exception):
                holder = Holder.decode((await leases.get(name)).value)
                if holder is not None and not holder.gone():
                    found.append(f"{name} is run by {holder.describe()}")
                    continue
        if signals_waiting_count:
            try:
                info = await bus.js.consumer_info(SIGNALS_STREAM, name)
                waiting = info.num_pending + info.num_ack_pending
            except NotFoundError:  # never consumed: everything on its subjects waits
                waiting = await _stored_on(bus, signal_filter(lane) if lane is not None else "signals.*.*")
            if waiting:
                found.append(f"{waiting} signal(s) wait for {name}")
        with contextlib.suppress(NotFoundError):
            info = await bus.js.consumer_info(CONTROL_STREAM, f"{name}-control")
            waiting = info.num_pending + info.num_ack_pending
            if waiting:
                found.append(f"{waiting} command(s) wait for {name}")
    return found


async def _stored_on(bus: NatsBus, subject: str) -> int:
    info = await bus.js.stream_info(SIGNALS_STREAM, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())
