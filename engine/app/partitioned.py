"""A worker process over several signal partitions (SIGNAL_PARTITIONS > 1, issue #16).

Each partition is run by one `Worker` at a time (a lane: its own durable, state, snapshots and
crash-loop breaker, its symbols only), under a lease in the KV bucket `tradeengine_partitions`.
Every process renews its entry in `tradeengine_members` and, each quarter of
PARTITION_LEASE_SECONDS, applies `engine.domain.partitions.plan` to what it sees: it takes free
partitions up to its fair share and gives one back while it holds more. A process that dies
stops renewing; its leases and its membership expire within PARTITION_LEASE_SECONDS (at once
when another process on the same host sees its pid gone), and the others take its partitions.
A lane that cannot renew in time fences itself before anyone else can take its lease (the lease
is checked before each order and each store), and its orders' client ids are derived from the
signal, so an order sent late by it is a duplicate at the venue, not a second fill.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from nats.js.errors import NoKeysError
from nats.js.kv import KeyValue

from engine import metrics
from engine.adapters.gateway import ExchangeGateway
from engine.adapters.leases import (
    MEMBERS_BUCKET,
    NO_ENTRY,
    PARTITIONS_BUCKET,
    Holder,
    Lease,
    LeaseTaken,
    open_bucket,
)
from engine.adapters.nats_bus import NatsBus
from engine.app.layout import claim_layout
from engine.app.worker import Worker
from engine.config import Settings
from engine.domain.partitions import lane_name, partition_of, plan

log = structlog.get_logger(__name__)


@dataclass
class Lane:
    partition: int
    worker: Worker
    task: asyncio.Task[None]


class PartitionedWorker:
    def __init__(
        self,
        settings: Settings,
        bus: NatsBus,
        lane_venue: Callable[[Callable[[str], bool]], ExchangeGateway],
        start_venue: Callable[[], Awaitable[None]],
    ) -> None:
        self.settings, self.bus = settings, bus
        self.lane_venue, self.start_venue = lane_venue, start_venue
        self.partitions = settings.signal_partitions
        self.seconds = settings.partition_lease_seconds
        self.holder = Holder.this_process()
        self.lanes: dict[int, Lane] = {}
        self.ready = asyncio.Event()
        self.stopping = asyncio.Event()
        self._members: KeyValue | None = None
        self._leases: KeyValue | None = None

    @property
    def every(self) -> float:
        return self.seconds / 4

    def stop(self) -> None:
        self.stopping.set()
        for lane in self.lanes.values():
            lane.worker.stop()

    async def run(self) -> None:
        await claim_layout(self.bus, self.settings)
        await self.start_venue()
        js, replicas = self.bus.js, self.bus.replicas
        self._members = await open_bucket(js, MEMBERS_BUCKET, self.seconds, replicas)
        self._leases = await open_bucket(js, PARTITIONS_BUCKET, self.seconds, replicas)
        metrics.OPEN_STRATEGY_POSITIONS.set_function(
            lambda: sum(len(lane.worker.book.positions) for lane in self.lanes.values())
        )
        metrics.SIGNAL_PARTITIONS.set(self.partitions)
        metrics.PARTITIONS_HELD.set_function(lambda: len(self.lanes))
        log.info(
            "partitions.joining",
            partitions=self.partitions,
            holder=self.holder.describe(),
            lease_seconds=self.seconds,
        )
        try:
            await self._heartbeat()
            # Peers starting now register within a round: wait one, so the first claims are shared.
            await self._pause(self.every)
            while not self.stopping.is_set():
                await self._round()
                if all(lane.worker.ready.is_set() for lane in self.lanes.values()):
                    self.ready.set()
                await self._pause(self.every)
        finally:
            self.ready.clear()
            for lane in self.lanes.values():
                lane.worker.stop()
            ended = await asyncio.gather(*(lane.task for lane in self.lanes.values()), return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._members.delete(self.holder.instance)
            log.info("partitions.left", held=sorted(self.lanes))
            for outcome in ended:
                if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
                    raise outcome

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def _heartbeat(self) -> None:
        assert self._members is not None
        try:
            await self._members.put(self.holder.instance, self.holder.encode())
        except Exception as exc:  # NATS away: the leases fence themselves if it lasts
            log.warning("partitions.heartbeat_failed", error=repr(exc)[:200])

    async def _round(self) -> None:
        await self._heartbeat()
        for partition, lane in list(self.lanes.items()):
            if lane.task.done():
                del self.lanes[partition]
                if lane.task.exception() is not None:
                    raise lane.task.exception() or RuntimeError("lane failed")
                log.info("partitions.lane_ended", partition=partition)
        try:
            members, taken = await self._live_members(), await self._taken()
        except Exception as exc:
            log.warning("partitions.view_failed", error=repr(exc)[:200])
            return
        if any(lane.worker.stopping.is_set() for lane in self.lanes.values()):
            return  # one partition moves at a time: wait for the one being given back
        step = plan(
            self.partitions, frozenset(self.lanes), taken, members, zlib.crc32(self.holder.instance.encode())
        )
        for partition in step.release:
            log.info("partitions.releasing", partition=partition, members=members, why="above the fair share")
            self.lanes[partition].worker.stop()
        for partition in step.take:
            await self._take(partition)

    async def _live_members(self) -> int:
        assert self._members is not None
        alive = 0
        for key in await _keys(self._members):
            with contextlib.suppress(*NO_ENTRY):
                holder = Holder.decode((await self._members.get(key)).value)
                if holder is not None and not holder.gone():
                    alive += 1
        return max(alive, 1)

    async def _taken(self) -> frozenset[int]:
        """Partitions whose lease another live process holds."""
        assert self._leases is not None
        prefix = lane_name(self.settings.worker_durable, 0)[:-1]
        taken = set()
        for key in await _keys(self._leases):
            if not key.startswith(prefix) or not key[len(prefix) :].isdigit():
                continue
            partition = int(key[len(prefix) :])
            if partition in self.lanes:
                continue
            with contextlib.suppress(*NO_ENTRY):
                holder = Holder.decode((await self._leases.get(key)).value)
                if holder is None or not holder.gone():  # a dead holder's lease is taken over
                    taken.add(partition)
        return frozenset(taken)

    async def _take(self, partition: int) -> None:
        name = lane_name(self.settings.worker_durable, partition)
        lease = Lease(self.bus.js, name, self.seconds, self.bus.replicas, PARTITIONS_BUCKET, self.holder)
        try:
            if not await lease.acquire(False, self.stopping, lambda _: None):
                return
        except LeaseTaken:
            return  # another process was quicker
        except Exception as exc:
            log.warning("partitions.take_failed", partition=partition, error=repr(exc)[:200])
            return

        def owns(symbol: str) -> bool:
            return partition_of(symbol, self.partitions) == partition

        worker = Worker(self.settings, self.bus, self.lane_venue(owns), partition=partition)
        task = asyncio.create_task(worker.run(lease), name=f"partition-{partition}")
        self.lanes[partition] = Lane(partition, worker, task)
        log.info("partitions.taken", partition=partition, held=sorted(self.lanes))

    async def checks(self) -> dict[str, bool]:
        return {
            "worker_partitions": self.ready.is_set()
            and all(lane.worker.ready.is_set() for lane in self.lanes.values())
        }

    def details(self) -> dict[str, Any]:
        found: dict[str, Any] = {"partitions_held": sorted(self.lanes)}
        for lane in self.lanes.values():
            for key, value in lane.worker.details().items():
                found.setdefault(key, value)
        return found


async def _keys(kv: KeyValue) -> list[str]:
    try:
        return list(await kv.keys())
    except NoKeysError:
        return []
