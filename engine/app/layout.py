"""The SIGNALS stream's layout: one durable over `signals.>`, or SIGNAL_PARTITIONS partitions
(issue #16). A worker starts only on the layout it is configured for; it changes the layout
only when nothing runs on the old one and no signal waits in it, since a signal left on an old
subject would be read by nobody, and one read under both layouts could be executed twice."""

from __future__ import annotations

import contextlib

import structlog
from nats.js.errors import NotFoundError

from engine.adapters.leases import LEASE_BUCKET, PARTITIONS_BUCKET, Holder
from engine.adapters.nats_bus import SIGNALS_STREAM, NatsBus
from engine.config import ConfigError, Settings
from engine.domain.partitions import lane_name, signal_filter

log = structlog.get_logger(__name__)


async def claim_layout(bus: NatsBus, settings: Settings) -> None:
    """Make the streams, with SIGNALS laid out for SIGNAL_PARTITIONS; ConfigError (exit 2) when
    another layout is in use or has signals waiting."""
    wanted = settings.signal_partitions
    current = await bus.signal_partitions()
    if current is not None and current != wanted:
        busy = await _in_use(bus, settings.worker_durable, current)
        if busy:
            raise ConfigError(
                f"SIGNAL_PARTITIONS={wanted}: the SIGNALS stream is laid out for {current} "
                f"partition(s), and {'; '.join(busy)}. Set SIGNAL_PARTITIONS={current}, or stop every "
                f"worker of that layout once its signals are decided, then start these"
            )
        log.warning("partitions.relaid", before=current, now=wanted)
    bus.partitions = wanted
    await bus.ensure_streams()


async def _in_use(bus: NatsBus, durable: str, partitions: int) -> list[str]:
    """What keeps the layout of `partitions` from changing: a live lease, a signal waiting."""
    lanes: list[int | None] = [None] if partitions == 1 else list(range(partitions))
    bucket = LEASE_BUCKET if partitions == 1 else PARTITIONS_BUCKET
    found: list[str] = []
    kv = None
    with contextlib.suppress(Exception):
        kv = await bus.js.key_value(bucket)
    for lane in lanes:
        name = lane_name(durable, lane)
        if kv is not None:
            with contextlib.suppress(Exception):
                holder = Holder.decode((await kv.get(name)).value)
                if holder is not None and not holder.gone():
                    found.append(f"{name} is run by {holder.describe()}")
                    continue
        try:
            info = await bus.js.consumer_info(SIGNALS_STREAM, name)
            waiting = info.num_pending + info.num_ack_pending
        except NotFoundError:  # never consumed: everything on its subjects waits
            waiting = await _stored_on(bus, signal_filter(lane) if lane is not None else "signals.*.*")
        if waiting:
            found.append(f"{waiting} signal(s) wait for {name}")
    return found


async def _stored_on(bus: NatsBus, subject: str) -> int:
    info = await bus.js.stream_info(SIGNALS_STREAM, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())
